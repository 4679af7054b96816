"""Training throughput of the TinyStories recipe's Lightning path against a plain PyTorch loop.

Both train the same model (same preset, same initial weights) on the same batches (one loader order for
both, epoch by epoch, shuffled as the recipe's training set: the real stand-in stories, one story per row,
padded to the longest in the batch) with the same optimiser, schedule, gradient clipping and precision, for
the same number of steps. The Lightning path is what the recipe runs: ``CausalLMModule`` under
``lightning.Trainer`` (its per-step ``train_loss`` logging, the recipe's callbacks apart from checkpoints).
The plain loop calls the module's own loss function and optimiser (fused AdamW on a GPU) and prepares each
batch on the host as the module's ``on_before_batch_transfer`` does, so the two differ only in the
training-loop machinery. Tokens and FLOPs are summed on the device and read back once per run, so the timing
itself adds no per-step wait for the GPU. Both paths pack and compile as the recipe does by default for the
device (``--model.pack`` and ``--trainer.compile``: both on a GPU, neither on a CPU); ``--pack`` /
``--no-pack`` and ``--compile`` / ``--no-compile`` override, ``--attn_implementation`` picks the attention
kernel (sdpa; flex_attention gives packed rows a block-sparse mask), and the settings are printed.

Throughput is real (non-padding) tokens per second over the steps after ``--warmup`` (so start-up
and the first, slower steps do not count), best of ``--repeats`` alternating runs of each. Each path's
MFU (``plain_loop_mfu``, ``lightning_mfu``) is its best run's model FLOPs per second over the device's
dense bf16 peak, counted as ``mfu_counting`` says (:mod:`benchmarks.mfu`: 6N + 12 n_layer d_attn T per
real token, T the story's real length); the peak comes from a table of GPUs by name, or
``--peak_tflops``; without one (a CPU, an unknown GPU) the MFU lines say ``n/a``.

    python benchmarks/lm_training.py                       # CPU, gpt2-2m, 40 timed steps
    python benchmarks/lm_training.py --device cuda --preset llama2-42m --batch_size 32 --steps 200
    python benchmarks/lm_training.py --device cuda --peak_tflops 756    # a GPU not in the table (H100 PCIe)

The last line is ``lightning_vs_plain_loop: X`` (Lightning tokens/s divided by the plain loop's).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.mfu import FlopShape, counting_text, flop_shape, flops_of_sums, mfu_text, resolve_peak  # noqa: E402
from collapse.hardware import retain_freed_memory, tf32_matmuls  # noqa: E402
from datamodules.tinystories import TinyStoriesDataConfig, TinyStoriesDataModule  # noqa: E402
from lit_modules.causal_lm import PACK_ATTENTION, CausalLMConfig, CausalLMModule  # noqa: E402
from recipes.tinystories import COMPILE_MODES, CUDA_GRAPH_MODES  # noqa: E402  (the modes of --trainer.compile)

PLAIN_PRECISIONS = ("bf16-mixed", "bf16-true", "32-true")
"""The precisions that the plain loop computes as Lightning does (16-mixed would need a gradient scaler)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-2m")
    p.add_argument("--stories", type=int, default=1200, help="real training stories (stand-in corpus)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each path; the best counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision", default=None, choices=PLAIN_PRECISIONS,
        help="both paths' arithmetic (default: bf16-mixed on cuda, 32-true on cpu)",
    )  # fmt: skip
    p.add_argument(
        "--max_seq_len", type=int, default=None,
        help="context (default: the preset's, as the recipe: 2048 for the published presets, 256 for the laptop ones)",
    )  # fmt: skip
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: the GPU table)")
    add_training_flags(p, "both paths ")
    return recipe_defaults(p, p.parse_args(argv))


def add_training_flags(p: argparse.ArgumentParser, who: str = "", modes: bool = True) -> None:
    """``--pack`` / ``--no-pack``, ``--compile`` / ``--no-compile`` (unset: the recipe's defaults for the device,
    :func:`recipe_defaults`) and, with ``modes``, ``--compile_mode``."""
    yes_no = argparse.BooleanOptionalAction
    p.add_argument(
        "--pack", action=yes_no, default=None,
        help=f"{who}pack stories several to a row (--model.pack); default: the recipe's for the device",
    )  # fmt: skip
    p.add_argument(
        "--compile", action=yes_no, default=None,
        help=f"{who}torch.compile the model (--trainer.compile); default: the recipe's for the device",
    )  # fmt: skip
    p.add_argument(
        "--attn_implementation", default="sdpa", choices=PACK_ATTENTION,
        help=f"{who}attention kernel (--model.attn_implementation); flex_attention: packed rows with a block-sparse "
        "mask (a GPU, a Llama model)",
    )  # fmt: skip
    if modes:
        p.add_argument(
            "--compile_mode", default=None, choices=COMPILE_MODES,
            help="torch.compile mode (implies --compile; default: torch's); reduce-overhead replays CUDA graphs",
        )  # fmt: skip


def recipe_defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``pack`` and ``compile`` left unset filled as the recipe fills ``--model.pack`` and
    ``--trainer.compile`` for this device and preset (:func:`recipes.tinystories.fast_training`): on a GPU
    both, on a CPU neither; an unset ``max_seq_len`` as the recipe's context for the preset. A
    ``--compile_mode`` implies compiling; with ``--no-compile`` it is an error of ``p``."""
    mode = getattr(args, "compile_mode", None)
    if mode is not None and args.compile is False:
        p.error("--compile_mode needs --compile")
    from transformers import AutoConfig

    from lit_modules.causal_lm import PRESETS
    from recipes.tinystories import fast_training

    config = AutoConfig.for_model(**PRESETS[args.preset])
    if getattr(args, "max_seq_len", 0) is None:  # the recipe's context for the preset
        from lit_modules.causal_lm import CausalLMConfig, default_context

        args.max_seq_len = default_context(CausalLMConfig(preset=args.preset))
    pack, compiled = fast_training(config, args.attn_implementation, str(args.device).startswith("cuda"), "native")
    if args.pack is None:
        args.pack = pack
    if args.compile is None:
        args.compile = compiled or mode is not None
    return args


def compile_stats() -> tuple[int, int]:
    """(graphs compiled, graph breaks) in this process so far, from torch.compile's own counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def make_data(args: argparse.Namespace) -> TinyStoriesDataModule:
    cfg = TinyStoriesDataConfig(num_real=args.stories, num_test=50, max_seq_len=args.max_seq_len)
    data = TinyStoriesDataModule(cfg)
    data.prepare_data()
    data.setup("fit")
    return data


def loader(data: TinyStoriesDataModule, batch_size: int, device: str) -> DataLoader:
    """The training batches, the same in the same order for both paths; page-locked for a GPU, as the recipe's.

    Shuffled as the recipe's training set is (its sampler, whose order depends only on the seed and the epoch
    that Lightning sets, or the plain loop does), so that both paths see the same batches in every epoch.
    """
    from datamodules.synthetic import ShuffledShardSampler

    dataset, pin = data.train_dataset, device.startswith("cuda")
    order = ShuffledShardSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=order, collate_fn=data.collate_fn, pin_memory=pin)


def make_module(args: argparse.Namespace, vocab_size: int, compile_model: bool = True) -> CausalLMModule:
    """The same model for both paths (seed 0), packing and compiled as the flags say (as the recipe does it)."""
    torch.manual_seed(0)
    cfg = CausalLMConfig(
        preset=args.preset, vocab_size=vocab_size, max_seq_len=args.max_seq_len, warmup_steps=10, pack=args.pack,
        attn_implementation=args.attn_implementation,
    )  # fmt: skip
    module = CausalLMModule(cfg, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if args.compile and compile_model:
        mode = getattr(args, "compile_mode", None)
        module.model.compile(mode=mode)  # in place, as recipes/tinystories.py does with --trainer.compile true
        module.cuda_graph_steps = mode in CUDA_GRAPH_MODES
    return module


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Counter:
    """Real tokens and model FLOPs of the timed batches, summed where the batches are (on the GPU) and read
    back once at the end: reading them every step would make each step wait for the device."""

    def __init__(self, shape: FlopShape):
        self.shape = shape
        self.tokens: torch.Tensor | int = 0
        self.squares: torch.Tensor | int = 0
        self.shapes: set[tuple[int, ...]] = set()  # (rows, width) of the batches: each new one may compile or
        self.positions = 0  # record a CUDA graph; positions: rows x width summed (real tokens and padding)

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        if "story_ids" in batch:  # packed rows: a story's length is how often its id occurs (-1: padding)
            ids = batch["story_ids"].flatten() + 1
            lengths = torch.zeros(ids.numel() + 1, dtype=torch.long, device=ids.device)
            lengths = lengths.scatter_add_(0, ids, torch.ones_like(ids))[1:]
        elif "attention_mask" in batch:
            lengths = batch["attention_mask"].sum(dim=1)  # each story's real length
        else:  # right-padded rows, sent without a mask: a story's tokens are those with a label
            lengths = (batch["labels"] != -100).sum(dim=1)
        self.tokens = self.tokens + lengths.sum()
        self.squares = self.squares + (lengths * lengths).sum()
        self.shapes.add(tuple(batch["input_ids"].shape))
        self.positions += batch["input_ids"].numel()

    def batch_text(self) -> str:
        """The batches' distinct shapes and the real tokens' share of the positions computed (after totals)."""
        shapes = ", ".join(f"{r}x{w}" for r, w in sorted(self.shapes)[:6]) + (", ..." if len(self.shapes) > 6 else "")
        share = int(self.tokens) / max(self.positions, 1)
        return f"{len(self.shapes)} shapes (rows x width: {shapes}); real tokens {share:.1%} of the positions"

    def totals(self) -> tuple[int, float]:
        """(real tokens, model FLOPs) so far."""
        return int(self.tokens), flops_of_sums(self.shape, int(self.tokens), int(self.squares))


class Timer(pl.Callback):
    """Real tokens and model FLOPs per second of the training batches after the first ``warmup``."""

    def __init__(self, warmup: int, device: str, shape: FlopShape):
        self.warmup, self.device = warmup, device
        self.counter = Counter(shape)
        self.t0: float | None = None
        self.seconds = 0.0
        self.graphs_at_start = compile_stats()[0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup:
            _sync(self.device)
            self.t0 = time.perf_counter()
            self.graphs_at_start = compile_stats()[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.t0 is not None:
            self.counter.add(batch)

    def on_train_end(self, trainer, pl_module):
        _sync(self.device)
        self.seconds = time.perf_counter() - self.t0


def run_lightning(args: argparse.Namespace, data: TinyStoriesDataModule, precision: str) -> tuple[float, float]:
    """(real tokens per second, model FLOPs per second) of the Lightning path."""
    module = make_module(args, data.tokenizer.get_vocab_size())
    timer = Timer(args.warmup, args.device, flop_shape(module.model))
    trainer = pl.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision=precision,
        max_steps=args.warmup + args.steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader(data, args.batch_size, args.device))
    tokens, flops = timer.counter.totals()
    report_compiles("lightning", timer.graphs_at_start, args)
    print(f"lightning batches: {timer.counter.batch_text()}")
    return tokens / timer.seconds, flops / timer.seconds


def report_compiles(path: str, graphs_at_start: int, args: argparse.Namespace) -> None:
    """With --compile: graphs compiled during the timed steps (recompilations there slow the figure) and so far."""
    if args.compile:
        graphs, breaks = compile_stats()
        print(f"{path} compiles: {graphs - graphs_at_start} in the timed steps; {graphs} graphs, {breaks} graph breaks "
              "in this process so far")  # fmt: skip


def run_plain(args: argparse.Namespace, data: TinyStoriesDataModule, precision: str) -> tuple[float, float]:
    """(real tokens per second, model FLOPs per second) of the plain loop."""
    module = make_module(args, data.tokenizer.get_vocab_size()).to(args.device)
    if precision == "bf16-true":  # as Lightning's bf16-true: bfloat16 weights, no autocast
        module.to(torch.bfloat16)
    counter = Counter(flop_shape(module.model))
    module.train()
    total = args.warmup + args.steps
    optimizer = module.make_optimizer(precision)  # as configure_optimizers: fused AdamW on a GPU
    from lit_modules.causal_lm import lr_factor

    warm = module.config.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warm, float(total)))
    autocast = precision == "bf16-mixed"  # float32 weights, bfloat16 products
    t0, step, graphs_at_start = None, 0, 0
    batches, epoch = loader(data, args.batch_size, args.device), 0
    while step < total:
        batches.sampler.set_epoch(epoch)  # as Lightning's fit loop does at each epoch's start
        epoch += 1
        for batch in batches:
            if step == args.warmup:
                _sync(args.device)
                t0 = time.perf_counter()
                graphs_at_start = compile_stats()[0]
            batch = module.on_before_batch_transfer(batch, 0)  # as under Lightning: counted on the host, pinned
            batch = {k: v.to(args.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
                loss, _ = module.token_loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if t0 is not None:
                counter.add(batch)
            step += 1
            if step >= total:
                break
    _sync(args.device)
    seconds = time.perf_counter() - t0
    tokens, flops = counter.totals()
    report_compiles("plain loop", graphs_at_start, args)
    print(f"plain loop batches: {counter.batch_text()}")
    return tokens / seconds, flops / seconds


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    retain_freed_memory()  # as the recipe does; both loops run in this process
    tf32_matmuls()  # as the recipe does: float32 products on TF32 tensor cores of a CUDA GPU
    precision = args.precision or ("bf16-mixed" if args.device.startswith("cuda") else "32-true")
    data = make_data(args)
    batches = math.ceil(len(data.train_dataset) / args.batch_size)
    print(f"device: {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'})")
    print(f"torch threads: {torch.get_num_threads()}, precision: {precision}, preset: {args.preset}, "
          f"pack: {args.pack}, compile: {args.compile} ({args.compile_mode or 'default'} mode), "
          f"attention: {args.attn_implementation}")  # fmt: skip
    print(f"data: {len(data.train_dataset)} stories, {batches} batches of {args.batch_size} per epoch")
    peak, source = resolve_peak(args.device, args.peak_tflops)
    with torch.device("meta"):  # the architecture only: no memory, no weights
        shape = flop_shape(make_module(args, data.tokenizer.get_vocab_size(), compile_model=False).model)
    plain, lightning = [], []  # (tokens/s, FLOPs/s) of each run
    for run in range(1, args.repeats + 1):  # each run's figures printed at once: a cut-short benchmark keeps them
        for name, runner, runs in (("plain loop", run_plain, plain), ("lightning", run_lightning, lightning)):
            runs.append(runner(args, data, precision))
            print(f"{name} run {run}: {runs[-1][0]:.0f} tokens/s, mfu {mfu_text(runs[-1][1], peak)}", flush=True)
    best_plain, best_lightning = max(plain), max(lightning)  # the runs with the most tokens/s
    ratio = best_lightning[0] / best_plain[0]
    print(f"best: plain {best_plain[0]:.0f} tokens/s, lightning {best_lightning[0]:.0f} tokens/s")
    print(f"mfu_counting: {counting_text(shape, peak, source)}")
    print(f"plain_loop_mfu: {mfu_text(best_plain[1], peak)}")
    print(f"lightning_mfu: {mfu_text(best_lightning[1], peak)}")
    print(f"lightning_vs_plain_loop: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
