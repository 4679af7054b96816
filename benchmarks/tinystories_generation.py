"""Time one TinyStories generation, phase by phase, and project it to the published corpus size.

One generation of the recipe, on ``--stories`` stand-in stories at the preset's own context: train one epoch
(the published setting), evaluate on the test stories, sample as many stories as were trained on (or
``--sample_stories``), in the recipe's chunks and at its concurrency for the device (``--chunk``,
``--sampling_batch_size``), then score them as the recipe does on rank 0 (decode, write ``stories.txt``,
distinct-n and rare-word coverage: :class:`evaluation.stories.StorySampleEvaluator`; the real corpus's rare
words, found once per run, are timed apart as ``rare_words_seconds`` and left out of the projection).
Training packs and compiles as the recipe does by default for the device (both on a GPU, neither on a CPU;
``--pack`` / ``--no-pack``, ``--compile`` / ``--no-compile`` and ``--attn_implementation`` override). Each
phase prints its seconds and real (non-padding) tokens per second; the projection scales the measured rates
to the published corpus (2.12M training stories, 21,990 validation stories used as the test set), at this
run's mean tokens per training story:

    minutes = (S * t / r_train + S_test * t / r_test + S * t / r_sample + S * t / r_score + w) / 60,

with S the published stories, t the mean tokens of a training story here, r the tokens per second of each
phase (sampling's and scoring's measured on the stories this model drew) and w the warm-ups: the sampler's
(one draw of ``--sampling_batch_size`` stories before the timed one: on a GPU it compiles the decode step
and captures its CUDA graphs, a cost paid once per generation, not per story) and, for a compiled model,
training's (``train_warmup_seconds``: ``--train_warmup`` steps and test batches of a throwaway model, which
compile the training and evaluation graphs before the timed fit). Sampling is projected at the training
stories' length, not at this model's: a model trained on the published corpus draws stories like it, while
one epoch of a few thousand stories leaves a model that seldom ends a story, so that its stories run on to
the context (``sample_mean_tokens`` and ``sample_finished_fraction`` show how far; ``--lr`` and
``--warmup_steps`` give a short run a schedule that learns the end of a story, and a draw of runaway stories
costs more time than the published one will). Stand-in stories are not TinyStories stories (their lengths
differ), so the projection is a rough estimate; on a real corpus, pass ``--data.source``-like settings
through the recipe instead. ``train_mfu`` is the training phase's model FLOPs per second over the device's
dense bf16 peak, counted as ``mfu_counting`` says (:mod:`benchmarks.mfu`, as in
``benchmarks/lm_training.py``; the whole ``fit`` is timed, start-up included); ``n/a`` without a known peak
(a CPU, a GPU not in the table: pass ``--peak_tflops``).

    python benchmarks/tinystories_generation.py --device cpu --preset gpt2-2m --stories 200
    python benchmarks/tinystories_generation.py --device cuda --preset llama2-42m --stories 20000

The last line is ``projected_minutes_per_generation_published: X``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.lm_training import add_training_flags, recipe_defaults  # noqa: E402
from benchmarks.mfu import counting_text, flop_shape, mfu_text, resolve_peak, training_flops  # noqa: E402
from collapse.hardware import retain_freed_memory, tf32_matmuls  # noqa: E402
from datamodules.tinystories import TinyStoriesDataConfig, TinyStoriesDataModule  # noqa: E402
from datamodules.tokenizer import EOT_ID, PAD_ID  # noqa: E402
from evaluation.stories import DiversityConfig, StorySampleEvaluator  # noqa: E402
from lit_modules.causal_lm import CausalLMConfig, CausalLMModule, default_context  # noqa: E402
from recipes.tinystories import CPU_CHUNK, GPU_CHUNK_WAVES  # noqa: E402
from samplers.story_sampler import SamplingConfig, auto_batch_size  # noqa: E402

PUBLISHED_TRAIN_STORIES = 2_120_000
"""Training stories of TinyStories (about 2.12M), the size of a published generation."""
PUBLISHED_TEST_STORIES = 21_990
"""Validation stories of TinyStories, the published test set."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="gpt2-2m")
    p.add_argument(
        "--stories",
        type=int,
        default=200,
        help="stand-in training stories (and stories sampled, unless --sample_stories)",
    )
    p.add_argument("--test_stories", type=int, default=None, help="default: a quarter of --stories, at least 8")
    p.add_argument(
        "--sample_stories", type=int, default=None,
        help="stories sampled and scored (default: --stories, as the recipe; fewer keep a long training run short)",
    )  # fmt: skip
    p.add_argument("--batch_size", type=int, default=16, help="training batch size, in stories")
    p.add_argument(
        "--sampling_batch_size", type=int, default=None,
        help="stories decoded concurrently (default: the recipe's, --sampling.batch_size auto)",
    )  # fmt: skip
    p.add_argument(
        "--chunk", type=int, default=None,
        help="stories per sampling call, as the recipe's --sample_batch_size (default: the recipe's for the device)",
    )  # fmt: skip
    p.add_argument("--vocab_size", type=int, default=8000)
    add_training_flags(p, modes=False)
    p.add_argument(
        "--train_warmup", type=int, default=None,
        help="training steps (and test batches) of a throwaway model run first, timed apart (default: 10 compiled, 0)",
    )  # fmt: skip
    p.add_argument("--precision", default=None, help="default: bf16-mixed on cuda, 32-true on cpu")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's, as the recipe)")
    p.add_argument("--warmup_steps", type=int, default=None, help="warmup steps (default: the preset's)")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: the GPU table)")
    args = p.parse_args(argv)
    if args.stories < 1 or args.batch_size < 1:
        p.error("--stories and --batch_size must be positive")
    if any(v is not None and v < 1 for v in (args.sampling_batch_size, args.chunk, args.sample_stories)):
        p.error("--sampling_batch_size, --chunk and --sample_stories must be positive")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        p.error("--lr must be a positive number")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        p.error("--warmup_steps must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args = recipe_defaults(p, args)
    if args.train_warmup is None:
        args.train_warmup = 10 if args.compile else 0
    if args.train_warmup < 0:
        p.error("--train_warmup must be >= 0")
    return args


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    retain_freed_memory()  # as the recipe's command line does
    tf32_matmuls()
    model_cfg = CausalLMConfig(
        preset=args.preset, vocab_size=args.vocab_size, pack=args.pack, attn_implementation=args.attn_implementation,
        lr=args.lr, warmup_steps=args.warmup_steps,
    )  # fmt: skip
    context = default_context(model_cfg)
    test = args.test_stories or max(8, args.stories // 4)
    data = TinyStoriesDataModule(
        TinyStoriesDataConfig(num_real=args.stories, num_test=test, vocab_size=args.vocab_size, max_seq_len=context),
        batch_size=args.batch_size,
    )
    data.prepare_data()
    data.setup("fit")

    def build() -> CausalLMModule:
        torch.manual_seed(0)
        built = CausalLMModule(
            CausalLMConfig(**{**vars(model_cfg), "max_seq_len": context}),
            bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID,
        )  # fmt: skip
        if args.compile:
            built.model.compile()  # as the recipe does
        return built

    def make_trainer(**limits: int) -> pl.Trainer:
        return pl.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=1,
            precision=args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true"), gradient_clip_val=1.0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, **limits,
        )  # fmt: skip

    module = build()
    on_gpu = args.device == "cuda"
    slots = args.sampling_batch_size or auto_batch_size(module.model.config, context, on_gpu)
    chunk = args.chunk or (GPU_CHUNK_WAVES * slots if on_gpu else CPU_CHUNK)
    module.configure_sampling(SamplingConfig(batch_size=slots), max_len=context)
    train_tokens = int(data.train_dataset.lengths().sum())
    shape = flop_shape(module.model)
    train_flops = training_flops(shape, data.train_dataset.lengths().tolist())
    peak, source = resolve_peak(args.device, args.peak_tflops)
    test_tokens = int(data.test_dataset.lengths().sum())
    print(f"device: {args.device}  preset: {args.preset}  backend: {module_backend(module)}  "
          f"pack: {args.pack}  compile: {args.compile}  attention: {args.attn_implementation}")  # fmt: skip
    print(f"mfu_counting: {counting_text(shape, peak, source)}")
    result: dict[str, float | int] = {}

    def emit(key: str, value: float | int) -> None:
        """Print one result as soon as it is known (a run cut short by a time limit keeps the phases it finished)."""
        result[key] = value
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}", flush=True)

    schedule = (("lr", float(module.config.lr)), ("warmup_steps", int(module.config.warmup_steps)))
    for key, value in (("context", context), ("sampling_slots", slots), ("sampling_chunk", chunk), *schedule):
        emit(key, value)
    emit("stories", args.stories)
    sampled = args.sample_stories or args.stories
    emit("sample_stories", sampled)

    # A compiled model compiles its training and its evaluation graphs at their first batches: a cost of the
    # process (every later generation of a run reuses the code), timed apart on a throwaway model and added
    # to the projection once, like the sampler's warm-up, not scaled with the stories.
    train_warmup_s = 0.0
    if args.train_warmup:
        spare, spare_trainer = build(), make_trainer(max_steps=args.train_warmup, limit_test_batches=args.train_warmup)
        train_warmup_s, _ = timed(args.device, lambda: spare_trainer.fit(spare, data.train_dataloader()))
        test_warmup_s, _ = timed(args.device, lambda: spare_trainer.test(spare, data.test_dataloader(), verbose=False))
        train_warmup_s += test_warmup_s
        del spare, spare_trainer
    emit("train_warmup_seconds", train_warmup_s)
    trainer = make_trainer()
    train_s, _ = timed(args.device, lambda: trainer.fit(module, train_dataloaders=data.train_dataloader()))
    emit("train_seconds", train_s)
    emit("train_tokens_per_s", train_tokens / train_s)
    print(f"train_mfu: {mfu_text(train_flops / train_s, peak)}", flush=True)
    test_s, _ = timed(args.device, lambda: trainer.test(module, dataloaders=data.test_dataloader(), verbose=False))
    emit("test_seconds", test_s)
    emit("test_tokens_per_s", test_tokens / test_s)
    module.to("cuda" if args.device == "cuda" else "cpu")
    gen = torch.Generator(device="cuda" if args.device == "cuda" else "cpu").manual_seed(0)
    # One story: the sampler compiles and captures for all its slots at its first call whatever it draws, so this
    # times that first-call cost alone, not a draw as large as the timed one on top of it.
    warmup_s, _ = timed(args.device, lambda: module.sample(1, gen))
    emit("sample_warmup_seconds", warmup_s)
    sample_s, drawn = timed(args.device, lambda: sample_in_chunks(module, sampled, chunk, gen))
    lengths = drawn["lengths"]
    sample_tokens = int(lengths.sum())
    emit("sample_seconds", sample_s)
    emit("sample_tokens_per_s", sample_tokens / sample_s)
    per_story_train = train_tokens / args.stories
    emit("train_mean_tokens", per_story_train)
    emit("sample_mean_tokens", sample_tokens / sampled)
    emit("sample_finished_fraction", float(np.mean(drawn["finished"])))
    # Scoring, as the recipe's rank 0 does after each generation's test (the others wait for it).
    scorer = StorySampleEvaluator(DiversityConfig(), data)
    rare_s, _ = timed("cpu", scorer.rare_words)  # once per run: left out of the per-generation projection
    emit("rare_words_seconds", rare_s)
    with tempfile.TemporaryDirectory() as stage:
        score_s, _ = timed("cpu", lambda: scorer(Path(stage), drawn, 0))
    emit("score_seconds", score_s)
    emit("score_stories_per_s", sampled / score_s)
    emit("score_tokens_per_s", sample_tokens / score_s)
    projected = (
        PUBLISHED_TRAIN_STORIES * per_story_train / result["train_tokens_per_s"]
        + PUBLISHED_TEST_STORIES * per_story_train / result["test_tokens_per_s"]
        + PUBLISHED_TRAIN_STORIES * per_story_train / result["sample_tokens_per_s"]
        + PUBLISHED_TRAIN_STORIES * per_story_train / result["score_tokens_per_s"]
        + warmup_s
        + train_warmup_s
    ) / 60
    emit("projected_minutes_per_generation_published", projected)
    return result


def sample_in_chunks(module: CausalLMModule, n: int, chunk: int, gen: torch.Generator) -> dict[str, np.ndarray]:
    """``n`` stories drawn as the recipe draws them: one sampler call per chunk of ``chunk`` stories (each chunk
    ends when its longest story does, so the chunk size shows in the rate); the chunks' arrays concatenated."""
    chunks = [module.sample(min(chunk, n - start), gen) for start in range(0, n, chunk)]
    return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


def module_backend(module: CausalLMModule) -> str:
    from samplers.story_sampler import choose_backend

    return choose_backend(module.model.config, module.sampling.backend, module.model)


if __name__ == "__main__":
    main()
