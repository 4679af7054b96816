"""Where the time of a TinyStories training step and of story sampling goes, read from a torch profile.

The training phase is the Lightning path of ``benchmarks/lm_training.py`` (same stand-in stories, model,
optimiser, clipping and precision; ``--pack`` / ``--no-pack`` and ``--compile`` / ``--no-compile`` as there,
by default the recipe's for the device): after ``--warmup`` steps,
``--steps`` steps are timed without the profiler, then ``--steps`` more are profiled. The sampling phase
then draws ``--samples`` stories from the trained model with the module's own sampler (the recipe's
defaults for the device: KV cache, compiled step and CUDA graphs on a GPU), once to warm up, once timed,
once profiled. Each phase prints:

* ``<phase>_wall_ms``: wall time of a step (training) or of the whole draw (sampling), without the profiler;
* ``<phase>_device_busy``: on a GPU, the fraction of the profiled wall time in which at least one kernel
  (or copy) ran; the rest is time the GPU waits for the host (Python, launches, synchronisations);
* ``<phase>_time_by_kind``: how the kernel time (GPU) or the operators' own time (CPU) splits into
  ``matmul`` (cuBLAS / CUTLASS products), ``attention`` (flash, memory-efficient or cuDNN attention),
  ``optimizer`` (AdamW and gradient clipping), ``copy`` (copies and fills) and ``other`` (elementwise,
  norms, softmax, cross-entropy, sampling);
* ``<phase>_library_share``: the part of the wall time spent inside the matmul and attention kernels,
  i.e. what a faster library, not this project's code, would have to speed up;
* ``<phase>_kernels``: kernel launches (GPU) or leaf operators (CPU) per step (training) or per token
  position (sampling), and ``<phase>_syncs``: host waits for the GPU (stream, event or device
  synchronisations and copies to the host) per step or per draw;
* the top kernels or operators by time.

    python benchmarks/lm_profile.py                                           # CPU, gpt2-2m, a few seconds
    python benchmarks/lm_profile.py --device cuda --preset llama2-42m --batch_size 64 --steps 10
    python benchmarks/lm_profile.py --device cuda --preset llama2-42m --batch_size 64 --pack --compile

Profiling adds some host time of its own, so the profiled steps are slower than ``<phase>_wall_ms``; the
shares are of the profiled window.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from benchmarks.lm_training import add_training_flags, loader, make_data, make_module, recipe_defaults  # noqa: E402
from collapse.hardware import retain_freed_memory, tf32_matmuls  # noqa: E402
from samplers.story_sampler import SamplingConfig  # noqa: E402

KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product|cudnn.*mha", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|xmma|nvjet|splitk|triton_tem_|^aten::(mm|addmm|bmm|baddbmm)$", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor_apply|_foreach_|clip_grad|fused_.*norm", re.I)),
    ("copy", re.compile(r"memcpy|memset|^aten::(copy_|fill_|zero_)$", re.I)),
)
"""Kinds of kernels (GPU) and operators (CPU), by name, first match wins; anything else is ``other``."""
OTHER = "other"
LIBRARY_KINDS = ("matmul", "attention")
SYNC = re.compile(r"^cuda(Stream|Event|Device)Synchronize$|^cudaMemcpy$")
"""Host waits for the GPU (CUDA runtime calls): synchronisations, which a copy to the host (``.item()``,
``.tolist()``) also makes, and synchronous copies."""
OPTIMIZER_SCOPE = "Optimizer.step"
"""Prefix of the profiler's annotation around ``optimizer.step()``."""
STEP_SCOPE = "forward_backward"
"""Annotation around the module's ``training_step`` and ``backward``, which Lightning runs inside
``optimizer.step()`` (as its closure): on a CPU, an operator inside ``optimizer.step()`` but outside these
is ``optimizer`` (the update and gradient clipping)."""


ANNOTATIONS = re.compile(rf"^({re.escape(OPTIMIZER_SCOPE)}|{STEP_SCOPE}$|ProfilerStep#)")
"""Names of annotated ranges (``record_function``, Lightning's and the optimizer's own) that the profiler also
puts on the GPU's timeline: spans that enclose kernels, not kernels."""


def is_annotation(event) -> bool:
    """Whether a profiler event is an annotated range rather than a kernel, copy or operator."""
    return bool(getattr(event, "is_user_annotation", False)) or bool(ANNOTATIONS.search(event.name))


def kind_of(name: str, in_optimizer: bool = False) -> str:
    """The kind of a kernel or operator called ``name`` (``in_optimizer``: run inside ``optimizer.step()``)."""
    if in_optimizer:
        return "optimizer"
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return OTHER


@dataclass
class Breakdown:
    """What a profiled window spent its time on: per-kind and per-name microseconds, launches and host waits."""

    wall_us: float
    on_gpu: bool
    busy_us: float = 0.0
    by_kind: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    by_name: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0]))
    launches: int = 0
    syncs: int = 0

    @property
    def total_us(self) -> float:
        return sum(self.by_kind.values())

    def kind_text(self) -> str:
        total = self.total_us or 1.0
        kinds = [k for k, _ in KINDS] + [OTHER]
        return " | ".join(f"{k} {100 * self.by_kind.get(k, 0.0) / total:.1f}%" for k in kinds)

    def library_share(self) -> float:
        """Matmul and attention time over the window's wall time (GPU), or over all operator time (CPU)."""
        library = sum(self.by_kind.get(k, 0.0) for k in LIBRARY_KINDS)
        return library / (self.wall_us if self.on_gpu else (self.total_us or 1.0))

    def top(self, count: int, per: float) -> list[str]:
        total = self.total_us or 1.0
        rows = sorted(self.by_name.items(), key=lambda item: -item[1][0])[:count]
        return [
            f"  {100 * us / total:5.1f}%  {us / per / 1e3:8.3f} ms  x{calls / per:7.1f}  {name[:100]}"
            for name, (us, calls) in rows
        ]


def _union_us(spans: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end <= reach:
            continue
        busy += end - max(start, reach)
        reach = end
    return busy


def _inside(event, prefix: str) -> bool:
    """Whether a CPU event runs inside one whose name starts with ``prefix``."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def breakdown(prof: profile, wall_s: float, on_gpu: bool) -> Breakdown:
    """Split a finished profile: GPU kernels and copies on a GPU (not the annotated ranges that the profiler
    also draws there); operators' own (self) time on a CPU."""
    out = Breakdown(wall_us=wall_s * 1e6, on_gpu=on_gpu)
    events = prof.events()
    if on_gpu:
        device = [e for e in events if e.device_type == DeviceType.CUDA and not is_annotation(e)]
        for e in device:
            us = e.time_range.end - e.time_range.start
            kind = kind_of(e.name)
            out.by_kind[kind] += us
            out.by_name[e.name][0] += us
            out.by_name[e.name][1] += 1
        out.launches = len(device)
        out.busy_us = _union_us((e.time_range.start, e.time_range.end) for e in device)
        out.syncs = sum(1 for e in events if SYNC.search(e.name))
        return out
    for e in events:
        if e.device_type != DeviceType.CPU or not e.name.startswith("aten::"):
            continue
        us = e.self_cpu_time_total
        in_optimizer = _inside(e, OPTIMIZER_SCOPE) and not _inside(e, STEP_SCOPE)
        out.by_kind[kind_of(e.name, in_optimizer)] += us
        out.by_name[e.name][0] += us
        out.by_name[e.name][1] += 1
        if not any(c.name.startswith("aten::") for c in e.cpu_children):
            out.launches += 1
    return out


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


def _activities(on_gpu: bool) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]


class StepWindows(pl.Callback):
    """Time steps [warmup, warmup + k) without the profiler, then profile steps [warmup + k, warmup + 2k)."""

    def __init__(self, warmup: int, steps: int, on_gpu: bool):
        self.warmup, self.steps, self.on_gpu = warmup, steps, on_gpu
        self.t0 = 0.0
        self.plain_s = 0.0
        self.profiled_s = 0.0
        self.prof: profile | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if step == self.warmup:
            _sync(self.on_gpu)
            self.t0 = time.perf_counter()
        elif step == self.warmup + self.steps:
            _sync(self.on_gpu)
            self.plain_s = time.perf_counter() - self.t0
            self.prof = profile(activities=_activities(self.on_gpu))
            self.prof.start()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        _sync(self.on_gpu)
        self.profiled_s = time.perf_counter() - self.t0
        if self.prof is not None:
            self.prof.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-2m")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stories", type=int, default=400, help="real training stories (stand-in corpus)")
    p.add_argument("--batch_size", type=int, default=16, help="training batch size, in stories")
    p.add_argument("--warmup", type=int, default=3, help="training steps before the timed ones")
    p.add_argument("--steps", type=int, default=5, help="training steps timed, then as many profiled")
    p.add_argument("--precision", default=None, help="default: bf16-mixed on cuda, 32-true on cpu")
    p.add_argument(
        "--max_seq_len", type=int, default=None,
        help="context (default: the preset's, as the recipe: 2048 for the published presets, 256 for the laptop ones)",
    )  # fmt: skip
    add_training_flags(p)
    p.add_argument("--samples", type=int, default=32, help="stories per sampling draw; 0 skips sampling")
    p.add_argument("--sampling_batch_size", type=int, default=16, help="stories decoded concurrently")
    p.add_argument(
        "--sample_len", type=int, default=256,
        help="longest story drawn, in tokens (a few training steps do not teach a model to end a story: at the "
        "training context its draw would run on to 2,048 tokens)",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=8, help="kernels (operators) listed per phase")
    args = p.parse_args(argv)
    if min(args.stories, args.batch_size, args.steps, args.sampling_batch_size, args.sample_len) < 1 or args.warmup < 0:
        p.error(
            "--stories, --batch_size, --steps, --sampling_batch_size and --sample_len must be positive, --warmup >= 0"
        )
    if args.samples < 0:
        p.error("--samples must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return recipe_defaults(p, args)


def report(phase: str, b: Breakdown, plain_ms: float, per: float, unit: str, top: int) -> None:
    """Print one phase's lines (``per``: steps or token positions in the profiled window)."""
    print(f"{phase}_wall_ms: {plain_ms:.2f} (per {unit}, without the profiler)")
    busy = f"{b.busy_us / b.wall_us:.3f}" if b.on_gpu else "n/a (cpu)"
    print(f"{phase}_device_busy: {busy}")
    print(f"{phase}_time_by_kind: {b.kind_text()}")
    what = "of the wall time" if b.on_gpu else "of the operator time"
    print(f"{phase}_library_share: {b.library_share():.3f} ({what} in matmul and attention)")
    launches = "kernels" if b.on_gpu else "leaf operators"
    print(f"{phase}_kernels: {b.launches / per:.1f} {launches} per {unit}")
    print(f"{phase}_syncs: {b.syncs / per:.2f} host waits per {unit}" if b.on_gpu else f"{phase}_syncs: n/a (cpu)")
    print(f"{phase} top {top} by time (share, ms per {unit}, calls per {unit}, name):")
    for line in b.top(top, per):
        print(line)


def _annotated(fn: Callable) -> Callable:
    def run(*args, **kwargs):
        with record_function(STEP_SCOPE):
            return fn(*args, **kwargs)

    return run


def profile_training(args: argparse.Namespace, on_gpu: bool) -> pl.LightningModule:
    """Fit warmup + 2 x steps steps, time and profile as :class:`StepWindows`; print the phase; return the module."""
    data = make_data(args)
    module = make_module(args, data.tokenizer.get_vocab_size())
    for hook in ("training_step", "backward"):  # Lightning runs both inside optimizer.step(), as its closure
        setattr(module, hook, _annotated(getattr(module, hook)))
    windows = StepWindows(args.warmup, args.steps, on_gpu)
    precision = args.precision or ("bf16-mixed" if on_gpu else "32-true")
    trainer = pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=1, precision=precision,
        max_steps=args.warmup + 2 * args.steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[windows],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader(data, args.batch_size, args.device))
    b = breakdown(windows.prof, windows.profiled_s, on_gpu)
    report("train", b, 1e3 * windows.plain_s / args.steps, args.steps, "step", args.top)
    return module


def _timed(on_gpu: bool, fn: Callable[[], dict]) -> tuple[float, dict]:
    _sync(on_gpu)
    start = time.perf_counter()
    out = fn()
    _sync(on_gpu)
    return time.perf_counter() - start, out


def profile_sampling(args: argparse.Namespace, module: pl.LightningModule, on_gpu: bool) -> None:
    """Draw ``--samples`` stories three times (warm-up, timed, profiled); print the phase."""
    device = "cuda" if on_gpu else "cpu"
    module.to(device)
    module.configure_sampling(
        SamplingConfig(batch_size=args.sampling_batch_size), max_len=min(args.sample_len, args.max_seq_len)
    )
    gen = torch.Generator(device=device).manual_seed(0)
    module.sample(min(args.samples, args.sampling_batch_size), gen)  # compile, capture, allocate
    seconds, out = _timed(on_gpu, lambda: module.sample(args.samples, gen))
    tokens = int(out["lengths"].sum())
    with profile(activities=_activities(on_gpu)) as prof:
        profiled_s, profiled = _timed(on_gpu, lambda: module.sample(args.samples, gen))
    positions = int(profiled["lengths"].max())  # decoding steps are at least the longest story
    print(f"sample: {args.samples} stories, {tokens} tokens in {seconds:.3f} s ({tokens / seconds:.0f} tokens/s)")
    b = breakdown(prof, profiled_s, on_gpu)
    report("sample", b, 1e3 * seconds, 1.0, "draw", args.top)
    print(f"sample_kernels_per_position: {b.launches / max(positions, 1):.1f} (over the longest story's {positions})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    retain_freed_memory()
    tf32_matmuls()  # as the recipe does: float32 products on TF32 tensor cores of a CUDA GPU
    on_gpu = args.device == "cuda"
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(
        f"device: {args.device} ({name})  preset: {args.preset}  pack: {args.pack}  compile: {args.compile}  "
        f"attention: {args.attn_implementation}"
    )
    module = profile_training(args, on_gpu)
    if args.samples:
        profile_sampling(args, module, on_gpu)


if __name__ == "__main__":
    main()
