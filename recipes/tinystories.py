"""A causal transformer pretrained from scratch each generation on stories, then on its own stories.

The headline experiment of Gerstgrasser et al. ("Is Model Collapse Inevitable?"): generation 0
pretrains a GPT-2 or Llama 2 style model on real stories; every later generation pretrains a fresh
model (or, with ``--model.init_from``, fine-tunes one local checkpoint again: Kazdan et al.'s setting)
on the workflow's mix of real stories and the stories sampled from earlier generations' models. The
byte-level BPE is trained once, on the real training stories, and frozen in ``<out_dir>/tokenizer.json``,
so losses compare across generations. Each generation is scored on the same real held-out stories:

* ``test_loss``: mean next-token cross-entropy in nats per token (all tokens of the held-out stories,
  identical every generation), and ``test_perplexity`` = exp(test_loss);
* its synthetic corpus: ``sample_distinct_1/2/3`` (distinct word n-grams / all n-grams),
  ``sample_rare_word_coverage`` (the fraction of the real training set's rare words, those in
  fewer than 0.5% of its stories, that the synthetic corpus still uses), ``sample_word_types``,
  ``sample_mean_tokens`` and ``sample_finished_fraction`` (stories that ended with EOT rather than
  at the length limit). Generation g's synthetic stories are stored as token ids (``tokens.npy``: the
  stories back to back, without padding; ``lengths.npy``) and as text (``stories.txt``); ``samples.txt``
  holds a few for reading.

The default data is an offline stand-in corpus made by this project (simple-English stories with a
heavy-tailed vocabulary; :mod:`datamodules.story_corpus`), never to be reported as TinyStories;
``--data.source hub`` reads the real TinyStories (``roneneldan/TinyStories``).

    python recipes/tinystories.py --workflow replace --out_dir runs/lm_replace
    python recipes/tinystories.py --dry_run true --model.preset llama2-42m
    python recipes/tinystories.py --data.source hub --model.preset gpt2-9m --trainer.devices 4 --trainer.strategy ddp
"""

from __future__ import annotations

if __spec__ is None:  # run as `python recipes/x.py`: check this python has the project before importing it
    import _env_check  # noqa: F401  (next to this file; exits with one error line if the project is missing)

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from collapse.atomic import atomic_write_json, atomic_write_text
from collapse.cli import run, secondary_process
from collapse.contract import Modality
from collapse.errors import ConfigError, UserError
from collapse.hardware import smallest_gpu_memory
from collapse.progress import console
from collapse.rundir import config_dict, resolve_out_dir
from datamodules.tinystories import TinyStoriesDataConfig, TinyStoriesDataModule
from datamodules.tokenizer import EOT_ID, PAD_ID, TOKENIZER_FILE, encodes_alike, tokenizer_hash
from engine.loop import LoopConfig, LoopResult, check_settings, check_sizes, run_generations
from engine.trainer import TrainerConfig, resolve_trainer
from evaluation.stories import DiversityConfig, StorySampleEvaluator
from lit_modules.causal_lm import (
    FAST_TRAINING_MODELS,
    FUSED_16_MIXED_CLIPPING,
    CausalLMConfig,
    CausalLMModule,
    check_attention,
    check_checkpoint_weights,
    default_context,
    describe,
    model_config,
    packs_by_default,
    position_limit,
)
from samplers.story_sampler import SamplingConfig, auto_batch_size, check_kv_memory, choose_backend

log = logging.getLogger(__name__)

CPU_PRESET = "gpt2-2m"
"""Default model: small enough for three generations on 2 CPU cores in a few minutes (use gpt2-9m etc. on a GPU)."""
EPOCHS = 1
"""Epochs per generation over a real corpus: one, as in Gerstgrasser et al. (accumulate's fits grow with its
training set)."""
STAND_IN_EPOCHS = 2
"""Epochs per generation over the 1,000-story stand-in default: after one pass the laptop model's stories are
too poor to say anything about collapse (test loss 4.8 nats against 3.7 after two)."""
CPU_CHUNK = 512
"""Default ``--sample_batch_size`` on a CPU."""
GPU_LOADER_WORKERS = 4
"""Default ``--num_workers`` on a GPU (at most; see :func:`gpu_loader_workers`)."""
GPU_CHUNK_WAVES = 8
"""Default ``--sample_batch_size`` on a GPU, in multiples of ``--sampling.batch_size``."""
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""The modes of torch.compile that ``--trainer.compile`` accepts besides true and false."""
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""The modes of :data:`COMPILE_MODES` that replay the compiled steps as CUDA graphs (inductor's
``triton.cudagraphs``): the module then marks each step and keeps its batches to a few shapes
(:attr:`~lit_modules.causal_lm.CausalLMModule.cuda_graph_steps`)."""
DATA_FILE = "data.json"
"""The real data's label and counts (stories read, empty ones dropped, bytes replaced, truncated), in the run dir."""


@dataclass
class LMTrainerConfig(TrainerConfig):
    """Lightning Trainer settings (``--trainer.*``), and whether to compile the model."""

    gradient_clip_val: float | None = 1.0
    """Clip gradients to this norm (None: no clipping)."""
    compile: bool | str | None = None
    """torch.compile the model for training: true (torch's default mode), false, or a mode of
    :data:`COMPILE_MODES` (``reduce-overhead`` replays each step's kernels as CUDA graphs). Default: true on a
    GPU for GPT-2 and Llama-family models when triton is installed, false elsewhere (:func:`fast_training`).
    On one H100, ``true`` with ``--model.pack true`` trained llama2-42m 1.55x as fast as eager."""

    not_for_lightning: ClassVar[tuple[str, ...]] = ("compile",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compile is not None and not isinstance(self.compile, bool) and self.compile not in COMPILE_MODES:
            raise ConfigError(
                f"--trainer.compile must be true, false or one of {', '.join(COMPILE_MODES)}; got {self.compile!r}"
            )
        if self.compile in CUDA_GRAPH_MODES and self.accumulate_grad_batches > 1:
            # Each micro-batch replays the graphs into the same memory, which holds the gradients summed so far.
            raise ConfigError(
                f"--trainer.compile {self.compile} (CUDA graphs) cannot accumulate gradients: each batch's replay "
                "overwrites the gradients of the one before; set --trainer.accumulate_grad_batches 1 (and a larger "
                "--batch_size), or --trainer.compile true"
            )


class LMModality(Modality):
    """Stories (real) modelled by a causal transformer (:mod:`lit_modules.causal_lm`), scored as stories.

    ``run_dir``: the run directory whose frozen tokenizer the real data module reuses (None: never reuse one).
    """

    name = "lm"

    def __init__(self, cfg: TinyStoriesConfig, run_dir: str | Path | None = None):
        self.cfg = cfg
        self.data = cfg.data  # read by the real-data checks
        self.real = TinyStoriesDataModule(cfg.data, run_dir=run_dir)
        self.evaluator = StorySampleEvaluator(cfg.diversity, self.real)

    def real_datamodule(self) -> TinyStoriesDataModule:
        return self.real

    def check_real_data(self, real: Any, real_size: int, cfg: LoopConfig) -> None:
        if real_size < cfg.batch_size:
            raise UserError(
                f"the real training set has {real_size} stories, fewer than one batch (--batch_size {cfg.batch_size}); "
                "use more real stories or a smaller --batch_size"
            )
        check_checkpoint_weights(self.cfg.model)  # a damaged or foreign checkpoint, before anything is written
        stats = getattr(real, "data_stats", {}) or {}
        numbers = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        counts = ", ".join(f"{k} {v}" for k, v in numbers.items())
        if counts:
            log.info("real data (%s): %s", getattr(real, "label", self.data.source), counts)

    def start_run(self, out_dir: Path) -> None:
        """Freeze the tokenizer in the run directory (or check that the one there is the one in use)."""
        real = self.real_datamodule()
        stats = {"label": getattr(real, "label", self.data.source), **(getattr(real, "data_stats", {}) or {})}
        atomic_write_json(Path(out_dir) / DATA_FILE, stats)  # what was read, dropped, replaced, truncated
        check_checkpoint_tokenizer(self.cfg.model, real.tokenizer)
        path = Path(out_dir) / TOKENIZER_FILE
        ours = tokenizer_hash(real.tokenizer)
        if path.exists():
            from tokenizers import Tokenizer

            theirs = tokenizer_hash(Tokenizer.from_file(str(path)))
            if theirs != ours:
                raise UserError(
                    f"{path} differs from the tokenizer of this data; a run's tokenizer never changes "
                    "(restore the file, or start a new run with another --out_dir)"
                )
            return
        atomic_write_text(path, real.tokenizer.to_str())

    def build_model(self, generation: int) -> CausalLMModule:
        real = self.real_datamodule()
        module = CausalLMModule(self.cfg.model, bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID)
        first = real.first_tokens() if self.cfg.sampling.strategy == "first_token_inclusive" else None
        module.configure_sampling(self.cfg.sampling, max_len=self.data.max_seq_len, first_tokens=first)
        compile_setting = self.cfg.trainer.compile
        if compile_setting not in (False, None):  # resolve() sets it; None (unresolved) compiles nothing
            mode = None if compile_setting is True else compile_setting
            module.model.compile(mode=mode)  # in place: the state_dict keys (model.pt, checkpoints) stay the same
            module.cuda_graph_steps = mode in CUDA_GRAPH_MODES
        return module

    def trainer_kwargs(self, generation: int) -> dict[str, Any]:
        return self.cfg.trainer.lightning_kwargs()

    def sampling_settings(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.cfg.sampling), "max_len": self.data.max_seq_len}

    def derived_metrics(self, tested: Mapping[str, float]) -> dict[str, float]:
        loss = tested.get("test_loss")
        return {} if loss is None else {"test_perplexity": math.exp(min(loss, 700.0))}

    def evaluate_samples(self, stage: Path, arrays: Mapping[str, np.ndarray], generation: int) -> dict[str, float]:
        return self.evaluator(stage, arrays, generation)


@dataclass
class TinyStoriesConfig(LoopConfig):
    """Pretrain a causal transformer on stories, generation after generation, under a data workflow."""

    out_dir: str = "runs/tinystories"
    """Run directory: config.yaml, tokenizer.json, metrics.csv and one gen_XXX folder per finished generation."""
    generations: int = 3
    """Number of generations; generation 0 trains on real stories only."""
    batch_size: int = 16
    """Training batch size per device, in stories (also the test batch size)."""
    sample_batch_size: int | None = None
    """Stories per sampling chunk file (part of the sampling seed; a chunk is what a killed run keeps); default:
    512 on a CPU, 8 x --sampling.batch_size on a GPU (so each slot draws several stories per chunk and the slots
    idle little while a chunk's longest story finishes). --sampling.batch_size run concurrently."""
    num_workers: int | None = None
    """Data loader worker processes per device; default: 0 on a CPU (the steps use its cores), on a GPU up to 4
    (fewer where the machine has fewer cores per device), which collate, pad and pack the next batches while the
    GPU runs a step. The batches are the same either way."""
    dry_run: bool = False
    """Build the data (read, tokenised, cached), the model (on the meta device: prints parameters: N) and the
    sampler, print them, and exit without touching out_dir."""
    data: TinyStoriesDataConfig = field(default_factory=TinyStoriesDataConfig)
    """Real stories: source (stand_in, hub, hub_v2, txt, jsonl, arrow), sizes, context length."""
    model: CausalLMConfig = field(default_factory=lambda: CausalLMConfig(preset=CPU_PRESET))
    """The transformer: preset (gpt2-9m, llama2-12m, llama2-42m, llama2-126m, ...) or init_from, optimiser."""
    trainer: LMTrainerConfig = field(default_factory=LMTrainerConfig)
    """Lightning Trainer settings: devices, strategy, precision (default: bf16-mixed on a GPU or a CPU with native
    bf16, AVX512-BF16 or AMX; else 32-true), epochs per generation (default: 1, the published setting, on a real
    corpus; 2 on the stand-in corpus), compile."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How synthetic stories are drawn: strategy, temperature, top-k/top-p, concurrent sequences."""
    diversity: DiversityConfig = field(default_factory=DiversityConfig)
    """How synthetic corpora are scored."""


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16-mixed training steps run faster."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


def resolve(cfg: TinyStoriesConfig) -> TinyStoriesConfig:
    """Fill the hardware- and data-dependent defaults (precision, epochs) and tie the data, model and sampler together.

    The model's context is the data's ``max_seq_len`` and its vocabulary the tokenizer's size, so
    config.yaml records what ran; conflicting explicit settings are a :class:`ConfigError`.
    """
    epochs = STAND_IN_EPOCHS if cfg.data.source == "stand_in" else EPOCHS
    cpu_precision = "bf16-mixed" if cpu_has_bf16() else "32-true"
    trainer = resolve_trainer(cfg.trainer, gpu_epochs=epochs, cpu_epochs=epochs, cpu_precision=cpu_precision)
    if cfg.model.vocab_size != cfg.data.vocab_size:
        raise ConfigError(
            f"--model.vocab_size {cfg.model.vocab_size} and --data.vocab_size {cfg.data.vocab_size} differ; "
            "the model's vocabulary is the tokenizer's: set both"
        )
    if cfg.model.fused_optimizer and str(trainer.precision) in ("16-mixed", "16") and trainer.gradient_clip_val:
        raise ConfigError(FUSED_16_MIXED_CLIPPING)  # refused at the first step otherwise, after the data is ready
    backend = sampling_backend(cfg.model, cfg.sampling)  # refuse a model that cannot be sampled before it trains
    data_seq, model_seq = cfg.data.max_seq_len, cfg.model.max_seq_len
    if data_seq is not None and model_seq is not None and model_seq != data_seq:
        raise ConfigError(
            f"--model.max_seq_len {model_seq} differs from --data.max_seq_len {data_seq}; "
            "set --data.max_seq_len (the model's context follows it)"
        )
    # One context for the data, the model and the sampler: the one set, else the preset's (2,048 for the
    # published presets, so no story is cut at a laptop length; 256 for the laptop presets).
    seq = data_seq or default_context(cfg.model)
    if data_seq is not None:  # beyond the model's positions: name the flag that was set, not the model's
        limit = position_limit(model_config(dataclasses.replace(cfg.model, max_seq_len=None)))
        if data_seq > limit:
            of = f"the checkpoint in --model.init_from {cfg.model.init_from}" if cfg.model.init_from else "the preset"
            raise ConfigError(
                f"--data.max_seq_len must be at most {limit} (the position limit of {of}), got {data_seq}"
            )
    model = dataclasses.replace(cfg.model, max_seq_len=seq)  # re-checks the position limit
    data = dataclasses.replace(cfg.data, max_seq_len=seq)
    if cfg.sampling.max_len is not None and cfg.sampling.max_len > seq:
        raise ConfigError(f"--sampling.max_len must be at most --data.max_seq_len ({seq}), got {cfg.sampling.max_len}")
    # Concurrency and chunk size follow the device type (and the model's shape), never a particular GPU, and
    # config.yaml records the numbers: a CPU run keeps 64 slots and chunks of 512, as before. A GPU too small for
    # the slots' KV caches is refused here, before anything is trained or written.
    on_gpu = trainer.accelerator == "gpu"
    sampling = cfg.sampling
    dtype_bytes = 4 if backend == "hf" or sampling.dtype == "float32" else 2  # generate() samples in float32
    if sampling.batch_size == "auto":
        slots = auto_batch_size(model_config(model), sampling.max_len or seq, on_gpu, dtype_bytes)
        sampling = dataclasses.replace(sampling, batch_size=slots)
    if on_gpu and not secondary_process():  # the first process refuses for the run; the others stay off CUDA here
        check_kv_memory(
            model_config(model), sampling.max_len or seq, sampling.batch_size, smallest_gpu_memory(), dtype_bytes
        )
    workers = cfg.num_workers
    if workers is None:
        workers = gpu_loader_workers(trainer.devices, *available_cores()) if on_gpu else 0
    chunk = cfg.sample_batch_size
    if chunk is None:
        chunk = GPU_CHUNK_WAVES * sampling.batch_size if on_gpu else CPU_CHUNK
    # Packing and compiling follow the device type and the model's layout; config.yaml records the outcome.
    hf_config = model_config(model)  # a checkpoint's position limit bounds the context
    check_attention(model, hf_config, on_gpu)
    pack, compiled = fast_training(hf_config, model.attn_implementation, on_gpu, backend)
    if model.pack is None:
        model = dataclasses.replace(model, pack=pack)
    if trainer.compile is None:
        trainer = dataclasses.replace(trainer, compile=compiled)
    elif trainer.compile in CUDA_GRAPH_MODES and not on_gpu:
        log.warning(
            "--trainer.compile %s replays CUDA graphs, which need a CUDA GPU: on the %s it only compiles, and "
            "recompiles for new batch shapes (slower than --trainer.compile false at first)",
            trainer.compile, trainer.accelerator,
        )  # fmt: skip
    return dataclasses.replace(
        cfg, trainer=trainer, model=model, data=data, sampling=sampling, sample_batch_size=chunk, num_workers=workers
    )


def available_cores() -> tuple[int, bool]:
    """``(cores this process may run on, whether they are its own)``: its own under ``srun`` with
    ``--cpus-per-task`` and one process per task (each task bound to its share), shared by the machine's
    processes otherwise (the recipe's own launcher; ``torchrun``, also inside an ``srun`` task)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = os.environ
    own = "SLURM_CPUS_PER_TASK" in env and "SLURM_PROCID" in env and "LOCAL_WORLD_SIZE" not in env
    return cores, own


def gpu_loader_workers(devices: int | str, cores: int, own_cores: bool = False) -> int:
    """Loader workers per process on a GPU: :data:`GPU_LOADER_WORKERS`, or fewer so that the processes of this
    machine (one per device of ``devices``: a count, ``"0,1"``, or ``auto``/-1 for every visible GPU) and
    their workers do not outnumber its ``cores`` (each process keeps one core for itself). With ``own_cores``
    (a scheduler gave this process its share, SLURM's ``--cpus-per-task``) the cores are not divided again."""
    if own_cores:
        return max(0, min(GPU_LOADER_WORKERS, cores - 1))
    text = str(devices).strip()
    if "," in text or text.startswith("["):
        processes = len([d for d in text.strip("[]").split(",") if d.strip()])
    elif text.lstrip("-").isdigit() and int(text) > 0:
        processes = int(text)
    else:  # auto, -1: every visible GPU
        import torch

        processes = max(1, torch.cuda.device_count())
    return max(0, min(GPU_LOADER_WORKERS, cores // processes - 1))


def has_triton() -> bool:
    """Whether torch.compile can generate GPU kernels here (triton installed and usable)."""
    try:
        from torch.utils._triton import has_triton as probe
    except ImportError:  # a torch without the probe: try the package itself
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    return bool(probe())


def fast_training(config: Any, attn_implementation: str, on_gpu: bool, backend: str) -> tuple[bool, bool]:
    """``(pack, compile)``: the defaults of ``--model.pack`` and ``--trainer.compile`` for this model and device.

    Both on a GPU for the layouts they were measured and tested with (:data:`FAST_TRAINING_MODELS`: the
    presets, and checkpoints of those types): on one H100 the two together trained llama2-42m 1.55x as fast
    as eager at batch 64. Compiling also needs triton, and a model sampled natively (``generate()`` would
    call the compiled forward with a growing cache). Off on a CPU, where compiling costs more than it gains
    in a short run, and for other architectures (each can still be asked for).
    """
    pack = packs_by_default(config, attn_implementation, on_gpu)
    compiled = bool(on_gpu and getattr(config, "model_type", None) in FAST_TRAINING_MODELS and backend == "native")
    return pack, compiled and has_triton()


def check_checkpoint_tokenizer(model: CausalLMConfig, tokenizer: Any) -> None:
    """Refuse an ``--model.init_from`` checkpoint whose ``tokenizer.json`` encodes text otherwise than ``tokenizer``.

    The run tokenises its data with its own tokenizer (trained on the real training stories, or the run's
    frozen one); a checkpoint trained on other ids would read every story as other words. A checkpoint
    folder without a ``tokenizer.json`` cannot be checked: a warning says so.
    """
    if model.init_from is None:
        return
    path = Path(model.init_from) / TOKENIZER_FILE
    if not path.is_file():
        log.warning(
            "--model.init_from %s has no %s: cannot check that the checkpoint was trained with this run's tokenizer",
            model.init_from,
            TOKENIZER_FILE,
        )
        return
    from tokenizers import Tokenizer

    try:
        theirs = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: cannot be read as a tokenizer ({first})") from None
    if not encodes_alike(theirs, tokenizer):
        raise UserError(
            f"--model.init_from {model.init_from}: its {TOKENIZER_FILE} encodes text otherwise than this run's "
            "tokenizer, so the checkpoint would read every story as other words; fine-tune a checkpoint made with "
            "this data's tokenizer (e.g. one exported from a run on the same --data settings)"
        )


def sampling_backend(model: CausalLMConfig, sampling: SamplingConfig) -> str:
    """``native`` or ``hf``: how the run's stories will be sampled (ConfigError when the model cannot be)."""
    return choose_backend(model_config(model), sampling.backend)


def dry_run(cfg: TinyStoriesConfig) -> None:
    """Build everything a run needs except the run directory, print what was built, and write nothing there.

    The data module reads, cleans and tokenises the real data and trains (or finds) the tokenizer,
    all into the shared cache, so a bad file or setting fails here and the real run starts from the
    cache; the model is built with its real configuration on the meta device (exact parameter count,
    no memory); the sampler is configured as the run would configure it.
    """
    modality = LMModality(cfg)
    wf = check_settings(modality, cfg)  # what the run refuses before reading data, the dry run refuses too
    print(describe(cfg.model))
    real = modality.real_datamodule()
    print(real.describe())
    real.prepare_data()
    real.setup("fit")
    stats = real.data_stats
    counts = ", ".join(f"{k} {v}" for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool))
    print(f"data read: {counts}")
    real_size, num_synthetic = check_sizes(modality, cfg, real)
    print(
        f"workflow: {wf.label}, {cfg.generations} generations of {real_size} real stories"
        + (f" and {num_synthetic} sampled per generation" if cfg.generations > 1 else "")
    )
    check_checkpoint_tokenizer(cfg.model, real.tokenizer)
    import torch

    with torch.device("meta"):
        module = CausalLMModule(cfg.model, bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID)
    first = real.first_tokens() if cfg.sampling.strategy == "first_token_inclusive" else None
    module.configure_sampling(cfg.sampling, max_len=cfg.data.max_seq_len, first_tokens=first)
    print(f"lightning module: {type(module).__name__} (built on the meta device), sampling {cfg.sampling.strategy}")
    print(f"training: pack {str(cfg.model.pack).lower()}, compile {str(cfg.trainer.compile).lower()}")
    print(f"sampling backend: {sampling_backend(cfg.model, cfg.sampling)}")
    print(f"sampling: {cfg.sampling.batch_size} stories at once, chunks of {cfg.sample_batch_size} stories")


def main(cfg: TinyStoriesConfig) -> LoopResult | None:
    """Run (or resume) the generations; return what the loop did (None for a dry run)."""
    cfg = resolve(cfg)
    if cfg.dry_run:
        with console(cfg.log_level, "tinystories", cfg.progress_every):  # preparing a large corpus: progress lines
            dry_run(cfg)
        return None
    # With --overwrite the folder may hold another run's tokenizer, about to be deleted: never reuse it.
    run_dir = None if cfg.overwrite else resolve_out_dir(cfg.out_dir, config_dict(cfg))
    return run_generations(LMModality(cfg, run_dir=run_dir), cfg, recipe="tinystories")


if __name__ == "__main__":
    run(main, TinyStoriesConfig)


__all__ = ["LMModality", "LMTrainerConfig", "TinyStoriesConfig", "fast_training", "main", "resolve"]
