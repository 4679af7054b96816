"""Benchmark: StorySampler (KV cache + continuous batching) against a loop over transformers ``generate``.

Both draw the same number of stories from the same small causal LM, at the same batch size, with plain
ancestral sampling (temperature 1, no top-k/top-p), starting from ``[EOT]`` and stopping at ``EOT`` or the
context length. So that story lengths are realistic (the baseline pads every batch to its longest
story), the model is first trained briefly on the offline stand-in corpus:

1. ``generate_stories`` makes a corpus; a byte-level BPE is trained on it and padded to ``--vocab``;
2. the model (``--preset``: a key of ``lit_modules.causal_lm.PRESETS`` or of :data:`BENCH_PRESETS`) is
   trained for ``--train_steps`` AdamW steps on batches of whole stories ``[EOT] + story + [EOT]``
   (right-padded; padding has no loss), so every story starts at position 0 as in sampling;
3. (a) ``StorySampler.sample(n)`` and (b) ``model.generate(...)`` over batches of ``--batch_size`` until
   ``n`` stories are done are each timed (after a short warm-up of both, timed apart: on a GPU the
   sampler's warm-up compiles its step and captures its CUDA graphs).

The last line is ``speedup_vs_hf_generate: X`` with X = (b) time / (a) time. Other processes busy on the
same cores slow both down, (a) more (many short multi-threaded kernels per step, each stalled when a
thread is preempted); ``--threads 1`` makes the comparison less sensitive to that.

    python benchmarks/lm_generation.py                        # defaults (a few minutes on 2 CPU cores)
    python benchmarks/lm_generation.py --stories 200 --train_steps 50    # quick check
    python benchmarks/lm_generation.py --device cuda --preset llama2-12m --stories 5000 --batch_size 256
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mfu import flop_shape, resolve_bandwidth  # noqa: E402
from collapse.hardware import retain_freed_memory, tf32_matmuls
from datamodules.story_corpus import STAND_IN_LABEL, generate_stories  # noqa: E402
from datamodules.tokenizer import EOT_ID, PAD_ID, encode_stories, pad_vocab_to, train_bpe  # noqa: E402
from lit_modules.causal_lm import PRESETS, CausalLMConfig, build_model, lr_factor, position_limit  # noqa: E402
from samplers.story_sampler import (  # noqa: E402
    ATTENTIONS,
    SamplingConfig,
    StorySampler,
    kv_bytes_per_slot,
    resolve_dtype,
    sample_stats,
)

BENCH_PRESETS = {
    # A Llama small enough to train for a few hundred steps in about a minute on 2 CPU cores (1.2M parameters,
    # most of them the two 8000 x 64 embedding matrices).
    "bench-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
"""Benchmark-only architectures (``--preset``), in the format of ``lit_modules.causal_lm.PRESETS``."""


def make_model(preset: str, vocab: int) -> torch.nn.Module:
    """A fresh model of ``preset`` with EOT as BOS/EOS and PAD as padding."""
    if preset in PRESETS:
        return build_model(CausalLMConfig(preset=preset, vocab_size=vocab), EOT_ID, EOT_ID, PAD_ID)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        **BENCH_PRESETS[preset], vocab_size=vocab, bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def train(model: torch.nn.Module, encoded: list[list[int]], steps: int, batch: int, lr: float, seed: int) -> float:
    """AdamW on random batches of whole stories (right-padded, no loss on padding); returns the last loss."""
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, steps))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        rows = [encoded[i] for i in rng.integers(len(encoded), size=batch)]
        width = max(map(len, rows))
        ids = torch.full((batch, width), PAD_ID, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        mask = ids != PAD_ID
        ids, mask = ids.to(device), mask.to(device)
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  train step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return loss.item()


def hf_generate(
    model: torch.nn.Module, n: int, batch: int, max_len: int, seed: int, device: torch.device
) -> tuple[list[int], list[bool]]:
    """n stories from a loop over ``model.generate`` in batches: (lengths, finished) per story.

    A story's length counts its tokens up to and including its first EOT after the prompt (finished),
    or the whole row when it has none (cut at max_len).
    """
    torch.manual_seed(seed)
    lengths: list[int] = []
    finished: list[bool] = []
    while len(lengths) < n:
        b = min(batch, n - len(lengths))
        prompt = torch.full((b, 1), EOT_ID, dtype=torch.long, device=device)
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0,
            top_p=1.0, max_length=max_len, eos_token_id=EOT_ID, pad_token_id=PAD_ID,
        ).cpu()  # fmt: skip
        for row in out:
            eot = torch.nonzero(row[1:] == EOT_ID)
            if len(eot):
                lengths.append(int(eot[0]) + 2)
                finished.append(True)
            else:
                lengths.append(len(row))
                finished.append(False)
    return lengths, finished


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's flags (``argv``: default, the command line)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stories", type=int, default=2000, help="stories sampled by each method")
    p.add_argument("--batch_size", type=int, default=64, help="concurrent stories (slots / generate batch)")
    p.add_argument("--preset", default="bench-llama", help=f"one of {sorted(PRESETS) + sorted(BENCH_PRESETS)}")
    p.add_argument("--train_steps", type=int, default=150)
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--corpus", type=int, default=4000, help="stories of the training corpus")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--max_len", type=int, default=512, help="context length (tokens per story at most)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "on"], help="--sampling.compile")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="--sampling.dtype")
    p.add_argument("--attention", default="auto", choices=list(ATTENTIONS), help="--sampling.attention")
    p.add_argument(
        "--skip_generate", action="store_true", help="time the sampler only (no generate() loop, no speedup line)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument(
        "--bandwidth_tbs", type=float, default=None,
        help="device memory bandwidth for the memory bound (default: the GPU table of benchmarks/mfu.py)",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    retain_freed_memory()  # as the recipe does; both methods run in this process
    tf32_matmuls()  # as the recipe does: float32 products on TF32 tensor cores of a CUDA GPU
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(a.seed)

    print(f"corpus: {a.corpus} {STAND_IN_LABEL}", flush=True)
    stories = generate_stories(a.corpus, a.seed)
    tokenizer = train_bpe(stories, a.vocab)
    pad_vocab_to(tokenizer, a.vocab)
    encoded = [ids[: a.max_len] for ids in encode_stories(tokenizer, stories)]
    corpus_lengths = np.array([len(ids) for ids in encoded])
    print(f"corpus story length: mean {corpus_lengths.mean():.1f}, max {corpus_lengths.max()} tokens")

    model = make_model(a.preset, a.vocab).to(device)
    max_len = min(a.max_len, position_limit(model.config))
    n_params = sum(q.numel() for q in model.parameters())
    print(f"model: {a.preset} ({model.config.model_type}, {n_params} parameters), context {max_len}", flush=True)
    t0 = time.perf_counter()
    loss = train(model, encoded, a.train_steps, a.train_batch, a.lr, a.seed)
    print(f"trained {a.train_steps} steps in {time.perf_counter() - t0:.1f}s, final loss {loss:.3f}", flush=True)

    cfg = SamplingConfig(batch_size=a.batch_size, compile=a.compile, dtype=a.dtype, attention=a.attention)
    sampler = StorySampler(model, cfg, max_len=max_len, eot_id=EOT_ID, pad_id=PAD_ID)
    gen = torch.Generator(device=device)
    with torch.no_grad():
        # Warm-up (not in the comparison): first-call costs of both (allocator, kernels; on a GPU the sampler's
        # compilation and CUDA graphs), printed on their own.
        sync(device)
        t0 = time.perf_counter()
        sampler.sample(1, gen.manual_seed(a.seed + 1))  # a compiled sampler readies all its slots at any size
        sync(device)
        t_warm_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        if not a.skip_generate:
            hf_generate(model, min(a.batch_size, 4), min(a.batch_size, 4), 16, a.seed, device)
        sync(device)
        t_warm_hf = time.perf_counter() - t0
        print(f"warm-up: StorySampler {t_warm_ours:.1f}s, HF generate {t_warm_hf:.1f}s", flush=True)

        sync(device)
        t0 = time.perf_counter()
        ours = sampler.sample(a.stories, gen.manual_seed(a.seed + 2))
        sync(device)
        t_ours = time.perf_counter() - t0
        # The sampler's figures first, flushed: a generate() loop cut short by a time limit leaves them standing.
        stats = sample_stats(ours)
        tok_ours = int(ours["lengths"].sum())
        threads = torch.get_num_threads()
        print(f"device: {device}, torch threads: {threads}, batch size: {a.batch_size}, stories: {a.stories}")
        print(f"sampling dtype: {cfg.dtype}, compile: {cfg.compile}, attention: {cfg.attention}")
        print(
            f"StorySampler:    {t_ours:8.2f}s  {a.stories / t_ours:8.1f} stories/s  {tok_ours / t_ours:9.0f} tokens/s  "
            f"mean length {stats['mean_length']:.1f}  finished {stats['finished_fraction']:.3f}"
        )
        if sampler.backend == "native":
            for line in memory_bound_lines(model, sampler, ours["lengths"], t_ours, device, a.bandwidth_tbs):
                print(line)
        sys.stdout.flush()
        if a.skip_generate:
            return
        t0 = time.perf_counter()
        hf_lengths, hf_finished = hf_generate(model, a.stories, a.batch_size, max_len, a.seed + 3, device)
        sync(device)
        t_hf = time.perf_counter() - t0

    tok_hf = int(sum(hf_lengths))
    print(
        f"HF generate:     {t_hf:8.2f}s  {a.stories / t_hf:8.1f} stories/s  {tok_hf / t_hf:9.0f} tokens/s  "
        f"mean length {np.mean(hf_lengths):.1f}  finished {np.mean(hf_finished):.3f}"
    )
    speedup = t_hf / t_ours if t_ours > 0 else math.inf
    print(f"speedup_vs_hf_generate: {speedup:.2f}")


def memory_bound_lines(
    model: torch.nn.Module, sampler: StorySampler, lengths: np.ndarray, seconds: float, device: torch.device,
    bandwidth_flag: float | None,
) -> list[str]:  # fmt: skip
    """How the timed draw compares with the memory limit of decoding.

    Every decoding step must read the weights once (all the matrices that multiply: the output head included,
    the input embeddings not), and a story of L tokens must read its cached keys and values at 1, 2, ..., L - 1
    positions over its L - 1 steps: (L - 1) L / 2 position reads. Their bytes over the device's bandwidth are
    the least time the draw can take; ``memory_bound_fraction`` is that over the measured time.
    ``kv_read_efficiency`` is those position reads over the positions the steps attended (slots x attention
    length, summed over steps): what the length buckets and idle slots add.
    """
    dtype_bytes = torch.tensor([], dtype=resolve_dtype(sampler.cfg.dtype, device)).element_size()
    draw = sampler.last_draw
    weight_bytes = flop_shape(model).matmul_params * dtype_bytes
    per_position = kv_bytes_per_slot(model.config, 0, dtype_bytes)  # one position, keys and values, every layer
    lengths = lengths.astype(np.int64)
    needed = int(((lengths - 1) * lengths // 2).sum())
    least_bytes = draw["steps"] * weight_bytes + needed * per_position
    bandwidth, source = resolve_bandwidth(device.type, bandwidth_flag)
    lines = [
        f"decode: {draw['steps']} steps at {draw['slots']} slots; weights {weight_bytes / 1e6:.1f} MB per step, "
        f"KV {per_position / 1e3:.1f} kB per position; {least_bytes / 1e9:.2f} GB to read at least",
        f"kv_read_efficiency: {needed / max(draw['attended'], 1):.3f} (positions the stories needed / attended)",
    ]
    if bandwidth is None:
        lines.append(f"memory_bound_fraction: n/a (bandwidth: {source}; pass --bandwidth_tbs)")
    else:
        least_s = least_bytes / (bandwidth * 1e12)
        lines.append(
            f"memory_bound_fraction: {least_s / seconds:.3f} (at least {least_s:.3f}s at {bandwidth:g} TB/s, {source})"
        )
    return lines


if __name__ == "__main__":
    main()
