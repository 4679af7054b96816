"""Story sampling from causal LMs (samplers.story_sampler): the KV-cached decoder and the continuous batcher."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from collapse.errors import ConfigError
from lit_modules.causal_lm import CausalLMConfig, build_model
from samplers import story_sampler as lm_sampling
from samplers.story_sampler import KVDecoder, SamplingConfig, StorySampler, sample_stats, sample_tokens

VOCAB = 96
EOT, PAD = 0, 1


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and a busy machine stalls multi-threaded kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """``model`` in eval mode with every parameter nudged, so biases and norm gains are not 0/1 any more."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def preset_model(preset: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturbed(build_model(CausalLMConfig(preset=preset, vocab_size=VOCAB)), seed)


def gqa_llama(seed: int = 0) -> nn.Module:
    """Llama with 2 kv heads for 4 query heads, rope theta 500, biases everywhere and a tied head."""
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 500.0}
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_parameters=rope, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True,
    )  # fmt: skip
    return perturbed(LlamaForCausalLM(config), seed)


def qwen2(seed: int = 0) -> nn.Module:
    """Qwen2 (q/k/v biases, no o bias) with 2 kv heads, untied head, and a sliding window of 6 on its second layer."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=6,
        max_window_layers=1, tie_word_embeddings=False,
    )  # fmt: skip
    return perturbed(Qwen2ForCausalLM(config), seed)


def mistral(seed: int = 0) -> nn.Module:
    """Mistral with 1 kv head for 4 query heads and a sliding window of 5 on every layer."""
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, sliding_window=5,
    )  # fmt: skip
    return perturbed(MistralForCausalLM(config), seed)


def neox(seed: int = 0) -> nn.Module:
    """A GPT-NeoX: a causal LM the native decoder does not run (sampled with the hf backend)."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, eos_token_id=EOT, bos_token_id=EOT, pad_token_id=PAD,
    )  # fmt: skip
    return perturbed(GPTNeoXForCausalLM(config), seed)


MODELS = {
    "llama": lambda: preset_model("tiny"),
    "gpt2": lambda: preset_model("gpt2-tiny"),
    "llama-gqa": gqa_llama,
    "qwen2-window": qwen2,
    "mistral-window": mistral,
}


def with_eot_bias(model: nn.Module, bias: float) -> nn.Module:
    """Replace the output head by one with a bias that adds ``bias`` to the EOT logit (same weights)."""
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[EOT] = bias
    model.set_output_embeddings(head)
    return model


def sampler(model: nn.Module, max_len: int = 24, first_tokens=None, **cfg) -> StorySampler:
    return StorySampler(model, SamplingConfig(**cfg), max_len=max_len, first_tokens=first_tokens)


def draw(s: StorySampler, n: int, seed: int, **kwargs) -> dict[str, np.ndarray]:
    return s.sample(n, torch.Generator().manual_seed(seed), **kwargs)


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for key in ("tokens", "lengths", "finished"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
def test_decoder_logits_equal_the_transformers_forward(name, attention):
    model = MODELS[name]()
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits  # (3, 20, V)
    dec = KVDecoder(model, 3, 32)
    dec.arch = dataclasses.replace(dec.arch, attention=attention)
    # Slot b starts its real sequence at step 4 b; before that it runs a junk sequence from position 0,
    # whose cache entries must be masked once the slot restarts at position 0.
    junk = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(2))
    got = torch.zeros_like(expected)
    for t in range(20 + 8):
        offset = torch.tensor([0, 4, 8])
        p = t - offset
        tokens = torch.where(p >= 0, ids[torch.arange(3), p.clamp(0, 19)], junk[t])
        pos = torch.where(p >= 0, p, t)
        fed = (p >= 0) & (p < 20)
        pos = torch.where(p >= 20, 0, pos)  # finished slots idle at position 0
        length = None if t % 2 else int(pos.max()) + 1  # full static buffer and the sliced prefix
        logits = dec.step(tokens, pos, length)
        for b in torch.nonzero(fed).flatten().tolist():
            got[b, p[b]] = logits[b]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decoder_in_bfloat16_stays_close_to_float32():
    model = MODELS["llama"]()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    dec = KVDecoder(model, 2, 16, dtype=torch.bfloat16)
    got = torch.stack([dec.step(ids[:, t], torch.full((2,), t)) for t in range(12)], 1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)


def test_top_k_one_and_tiny_temperature_are_argmax():
    logits = torch.randn(50, VOCAB, generator=torch.Generator().manual_seed(0))
    u = torch.rand(50, generator=torch.Generator().manual_seed(1))
    argmax = logits.argmax(-1)
    assert torch.equal(sample_tokens(logits, u, top_k=1), argmax)
    assert torch.equal(sample_tokens(logits, u, temperature=1e-6), argmax)
    assert torch.equal(sample_tokens(logits, u, top_p=1e-6), argmax)


def test_inverse_cdf_draws_follow_the_filtered_renormalised_distribution():
    # Three tokens with probabilities 0.5, 0.3, 0.2; top_p = 0.7 keeps {0, 1} (mass before token 2 is 0.8).
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(4, 3)
    u = torch.tensor([0.0, 0.62, 0.63, 0.999999])
    assert sample_tokens(logits, u).tolist() == [0, 1, 1, 2]
    assert sample_tokens(logits, u, top_p=0.7).tolist() == [0, 0, 1, 1]  # boundary at 0.5 / 0.8 = 0.625
    assert sample_tokens(logits, u, top_k=2).tolist() == [0, 0, 1, 1]
    assert sample_tokens(logits, torch.ones(4)).tolist() == [2, 2, 2, 2]  # u rounding up to 1 still valid
    assert sample_tokens(logits, torch.ones(4), top_k=1).tolist() == [0, 0, 0, 0]  # never a filtered token


@pytest.mark.parametrize("vocab", [300, 8000, 8001])
def test_two_level_inverse_cdf_equals_one_cumulative_sum(vocab):
    # Large vocabularies go through block sums first; the token must be the one of a single float64 CDF.
    gen = torch.Generator().manual_seed(vocab)
    logits = 3 * torch.randn(64, vocab, generator=gen)
    logits[:, ::7] = float("-inf")  # filtered tokens in every block
    u = torch.rand(64, generator=gen)
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    expected = torch.searchsorted(cdf, u.double()[:, None] * cdf[:, -1:], right=True).squeeze(-1)
    got = sample_tokens(logits, u)
    assert torch.equal(got, expected)
    assert torch.isfinite(logits[torch.arange(64), got]).all()


@pytest.mark.parametrize("vocab", [3, 300, 8000, 8001])
def test_logits_that_are_not_finite_still_draw_tokens_of_the_vocabulary(vocab):
    # A diverged model's NaN (or inf) logits order nothing; the drawn id must still index the embedding.
    logits = torch.randn(6, vocab)
    logits[0] = float("nan")
    logits[1, vocab // 2] = float("nan")
    logits[2, -1] = float("inf")
    logits[3] = float("inf")
    logits[4] = float("-inf")
    for filters in ({}, {"top_k": 2, "top_p": 0.9}):
        got = sample_tokens(logits, torch.rand(6, generator=torch.Generator().manual_seed(vocab)), **filters)
        assert ((got >= 0) & (got < vocab)).all()


# ------------------------------------------------------------------------------ cached == uncached


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("strategy", ["bos_fixed_length", "first_token_inclusive"])
@pytest.mark.parametrize("filters", [{}, {"temperature": 1.5, "top_k": 40, "top_p": 0.95}], ids=["plain", "filtered"])
def test_kv_cached_sampling_draws_the_same_tokens_as_the_uncached_forward(name, strategy, filters):
    # An EOT bias giving stories of many lengths (top-k/top-p make EOT likelier: a smaller bias there).
    model = with_eot_bias(MODELS[name](), 1.0 if filters else 2.0)
    s = sampler(model, max_len=20, first_tokens=[5, 9, 9, 17], strategy=strategy, batch_size=4, **filters)
    cached = draw(s, 11, seed=3)
    uncached = draw(s, 11, seed=3, use_cache=False)
    assert_same(cached, uncached)
    assert cached["finished"].any() and len(np.unique(cached["lengths"])) > 3  # slots restart at various steps
    s._force_static = True  # the static path: full-buffer attention, no per-step host sync
    assert_same(draw(s, 11, seed=3), cached)


@pytest.mark.parametrize("window", [None, 5])
def test_a_flex_block_mask_reads_only_each_slots_blocks_and_masks_the_rest_exactly(window, monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(lm_sampling, "FLEX_BLOCK", 4)
    torch.manual_seed(0)
    pos = torch.tensor([0, 3, 4, 9, 15])  # block boundaries at 4, 8, 12
    q, k, v = torch.randn(5, 2, 1, 8), torch.randn(5, 2, 16, 8), torch.randn(5, 2, 16, 8)
    mask = lm_sampling._flex_block_mask(pos, 16, window)
    t = torch.arange(16)
    visible = t[None, :] <= pos[:, None]
    if window is not None:
        visible &= t[None, :] > pos[:, None] - window
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])
    # Compiled: the eager reference applies the mask function everywhere and ignores which blocks are read.
    torch.testing.assert_close(torch.compile(flex_attention)(q, k, v, block_mask=mask), want)
    assert mask.kv_num_blocks.flatten().tolist() == ([1, 1, 2, 3, 4] if window is None else [1, 1, 2, 2, 2])
    assert mask.kv_indices[:, 0, 0, 0].tolist() == ([0, 0, 0, 0, 0] if window is None else [0, 0, 0, 1, 2])


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("block", [128, 4])
def test_flex_attention_on_the_static_path_draws_the_same_tokens(name, block, monkeypatch):
    # --sampling.attention flex: the whole cache, each slot reading only its blocks (4-position blocks make the
    # slots' reads differ, and sliding windows skip leading blocks).
    monkeypatch.setattr(lm_sampling, "FLEX_BLOCK", block)
    model = with_eot_bias(MODELS[name](), 2.0)
    kwargs = {"max_len": 20, "batch_size": 4, "top_k": 12, "strategy": "first_token_inclusive", "first_tokens": [5, 9]}
    eager = draw(sampler(model, **kwargs), 11, seed=3)
    flex = sampler(model, attention="flex", **kwargs)
    flex._force_static = True
    assert_same(draw(flex, 11, seed=3), eager)
    (engine,) = flex._engines.values()
    cache = engine.decoder.k_cache[0].shape[2]
    assert cache == (24 if block == 4 else 128)  # the context and its spare position, in whole blocks
    d = flex.last_draw
    assert d["attended"] <= d["steps"] * 4 * cache
    if block == 4:
        assert d["attended"] < 0.75 * d["steps"] * 4 * cache  # most slots read fewer blocks than the cache holds


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "mistral-window"])
def test_compiled_flex_attention_reads_the_right_blocks_and_draws_the_same_tokens(name, monkeypatch):
    # Compiled, FlexAttention reads only the blocks of each slot's block mask (eager it ignores them): 4-position
    # blocks over a 24-position cache, a sliding window skipping leading blocks, every layer its own cache.
    monkeypatch.setattr(lm_sampling, "FLEX_BLOCK", 4)
    model = with_eot_bias(MODELS[name](), 2.0)
    eager = draw(sampler(model, max_len=20, batch_size=4, top_k=12), 11, seed=3)
    flex = sampler(model, max_len=20, batch_size=4, top_k=12, attention="flex", compile="on")
    assert_same(draw(flex, 11, seed=3), eager)


@pytest.mark.parametrize("strategy", ["bos_fixed_length", "first_token_inclusive"])
def test_length_buckets_of_the_static_path_draw_the_same_tokens(strategy, monkeypatch):
    # The static path attends over a bucket that holds every position the slots can reach before the next sync;
    # narrow buckets (4 tokens, context 40) make it change often, up and down, within one draw.
    model = with_eot_bias(MODELS["gpt2"](), 1.5)
    s = sampler(model, max_len=40, batch_size=4, strategy=strategy, first_tokens=[5, 9, 17])
    eager = draw(s, 13, seed=5)
    used = []
    step = lm_sampling._cached_step
    monkeypatch.setattr(lm_sampling, "_cached_step", lambda *a: used.append(len(a[-1])) or step(*a))
    s.release()  # the engine built by the eager draw holds the unpatched step
    s._force_static, s._bucket = True, 4
    assert_same(draw(s, 13, seed=5), eager)
    assert len(set(used)) >= 3 and min(used) >= lm_sampling.SYNC_EVERY and max(used) <= 40
    assert all(length % 4 == 0 or length == 40 for length in used)
    assert any(b < a for a, b in zip(used, used[1:]))  # down again when the long stories end


def test_the_attention_length_covers_every_position_until_the_next_sync():
    s = sampler(preset_model("gpt2-tiny"), max_len=300)
    sync = lm_sampling.SYNC_EVERY
    assert s._attention_length(0) == 128  # positions 0 .. SYNC_EVERY - 1 next
    assert s._attention_length(128 - sync) == 128 and s._attention_length(128 - sync + 1) == 256
    assert s._attention_length(290) == 300  # never past the context
    for pos_max in range(300):
        assert s._attention_length(pos_max) >= min(pos_max + sync, 300)


# --------------------------------------------------------------------------------------- stopping


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generation_stops_at_eot_and_pads_after_it(name):
    model = with_eot_bias(MODELS[name](), 4.0)  # EOT about 35% per step
    out = draw(sampler(model, max_len=40, batch_size=8), 50, seed=0)
    toks, lengths = out["tokens"], out["lengths"]
    assert out["finished"].all()
    assert lengths.min() == 2 and lengths.max() > 3  # short, but not all of length 2
    for row, length in zip(toks, lengths):
        assert row[0] == EOT and row[length - 1] == EOT
        assert EOT not in row[1 : length - 1]
        assert (row[length:] == PAD).all()


def test_generation_respects_max_len_when_eot_never_comes():
    model = with_eot_bias(MODELS["gpt2"](), -1e4)
    out = draw(sampler(model, max_len=17, batch_size=4, strategy="first_token_inclusive", first_tokens=[3]), 9, 0)
    assert out["tokens"].shape == (9, 17)
    assert (out["lengths"] == 17).all() and not out["finished"].any()
    assert (out["tokens"][:, :2] == [EOT, 3]).all() and EOT not in out["tokens"][:, 1:]


# ---------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2-window", "mistral-window"])
def test_hf_backend_greedy_stories_equal_the_native_ones(name):
    # top_k = 1 makes both backends greedy, so their stories must agree token for token (windows included:
    # stories of up to 20 tokens outgrow the windows of 5 and 6).
    model = with_eot_bias(MODELS[name](), 0.5)
    kwargs = {"max_len": 20, "batch_size": 4, "top_k": 1, "strategy": "first_token_inclusive"}
    pool = [5, 9, 17, 23, 40, 61]
    native = draw(sampler(model, first_tokens=pool, **kwargs), 24, seed=2)
    hf = draw(sampler(model, first_tokens=pool, backend="hf", **kwargs), 24, seed=2)
    assert sampler(model, backend="hf").backend == "hf" and sampler(model).backend == "native"
    # The backends draw prompts from different streams: compare the greedy story of each first token.
    stories = {}
    for out in (native, hf):
        for row, length, done in zip(out["tokens"], out["lengths"], out["finished"]):
            stories.setdefault(int(row[1]), set()).add((tuple(row.tolist()), int(length), bool(done)))
    assert len(stories) >= 4 and all(len(v) == 1 for v in stories.values()), stories
    assert native["lengths"].max() > 7 and len(np.unique(native["lengths"])) > 2  # past the windows


def test_hf_backend_samples_any_causal_lm_reproducibly_and_stops_at_eot():
    model = with_eot_bias(neox(), 3.0)
    s = sampler(model, max_len=30, batch_size=4, first_tokens=[7, 8], strategy="first_token_inclusive")
    assert s.backend == "hf"  # auto: GPT-NeoX is not native
    a, b, c = draw(s, 10, 4), draw(s, 10, 4), draw(s, 10, 5)
    assert_same(a, b)
    assert not np.array_equal(a["tokens"], c["tokens"])
    assert a["tokens"].shape == (10, 30) and a["tokens"].dtype == np.uint16 and a["lengths"].dtype == np.int32
    assert a["finished"].any() and len(np.unique(a["lengths"])) > 2
    for row, length, done in zip(a["tokens"], a["lengths"], a["finished"]):
        assert row[0] == EOT and row[1] in (7, 8)
        assert EOT not in row[2 : length - 1] and (row[length:] == PAD).all()
        assert (row[length - 1] == EOT) == done and (done or length == 30)
    assert model.training is False  # perturbed() left it in eval mode; the sampler restores the mode
    model.train()
    draw(s, 2, 0)
    assert model.training


def test_backend_choice_by_architecture():
    for name in ("llama", "gpt2", "qwen2-window", "mistral-window"):
        model = MODELS[name]()
        assert lm_sampling.choose_backend(model.config, "auto", model) == "native"
        assert lm_sampling.choose_backend(model.config, "hf", model) == "hf"
    other = neox()
    assert lm_sampling.choose_backend(other.config, "auto", other) == "hf"
    assert lm_sampling.choose_backend(other.config) == "hf"  # from the config alone, as before training
    with pytest.raises(ConfigError, match="--sampling.backend native: the native decoder runs"):
        lm_sampling.choose_backend(other.config, "native")
    from transformers import T5Config

    with pytest.raises(ConfigError, match="a 't5' model cannot be sampled"):
        lm_sampling.choose_backend(T5Config(vocab_size=VOCAB), "auto")


# ------------------------------------------------------------------------------------ the sampler


@pytest.mark.parametrize(("n", "batch_size"), [(13, 4), (3, 8), (1, 1)])
def test_exactly_n_stories_reproducible_from_the_seed(n, batch_size):
    s = sampler(with_eot_bias(MODELS["llama"](), 2.0), batch_size=batch_size)
    a, b, c = draw(s, n, 5), draw(s, n, 5), draw(s, n, 6)
    assert a["tokens"].shape == (n, 24) and a["tokens"].dtype == np.uint16
    assert a["lengths"].shape == a["finished"].shape == (n,)
    assert a["lengths"].dtype == np.int32 and a["finished"].dtype == bool
    assert (a["lengths"] >= 2).all() and (a["tokens"][:, 0] == EOT).all()
    assert_same(a, b)
    assert not np.array_equal(a["tokens"], c["tokens"])


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_a_draw_reports_its_finished_stories_as_it_goes(backend):
    # A chunk of thousands of stories takes minutes: the progress line moves as stories finish, not per chunk.
    from collapse.progress import progress_within

    s = sampler(with_eot_bias(MODELS["llama"](), 2.0), batch_size=4, backend=backend)
    reports: list[int] = []
    with progress_within(reports.append):
        out = draw(s, 40, 3)
    assert len(reports) >= 3 and reports[-1] == 40, reports
    assert all(a < b for a, b in zip(reports, reports[1:])), reports
    assert_same(out, draw(s, 40, 3))  # reporting changes nothing drawn; and outside a block nothing is called


def test_rows_are_stories_in_launch_order_so_more_stories_extend_the_sample():
    # Every slot consumes its own uniform at every step whatever it does, so the first n stories launched
    # do not depend on how many more follow.
    s = sampler(
        with_eot_bias(MODELS["gpt2"](), 2.0), batch_size=4, strategy="first_token_inclusive", first_tokens=[7, 8]
    )
    short, long = draw(s, 10, 2), draw(s, 25, 2)
    assert_same(short, {k: v[:10] for k, v in long.items()})


@pytest.mark.parametrize("pool", [np.array([5, 9, 9, 17]), torch.tensor([[5, 9], [9, 17]]), [5, 9, 9, 17]])
def test_first_token_inclusive_prompts_come_from_the_pool(pool):
    out = draw(sampler(MODELS["llama"](), strategy="first_token_inclusive", first_tokens=pool, batch_size=8), 60, 1)
    assert (out["tokens"][:, 0] == EOT).all()
    firsts = out["tokens"][:, 1].tolist()
    assert set(firsts) == {5, 9, 17}
    assert firsts.count(9) > firsts.count(5)  # drawn from the pool with its repeats (binomial(60, 1/2) vs (60, 1/4))
    assert (out["lengths"] >= 3).all()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_near_zero_temperature_and_top_k_one_are_greedy_decoding(name):
    model = MODELS[name]()
    max_len = 16
    ids = torch.tensor([[EOT]])
    with torch.no_grad():
        while ids.shape[1] < max_len:
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if nxt == EOT:
                break
    greedy = ids[0].numpy()
    for cfg in ({"top_k": 1}, {"temperature": 1e-6}):
        out = draw(sampler(model, max_len=max_len, batch_size=2, **cfg), 3, seed=0)
        for row, length in zip(out["tokens"], out["lengths"]):
            np.testing.assert_array_equal(row[:length], greedy)


def test_zero_stories_give_empty_arrays():
    out = draw(sampler(MODELS["llama"]()), 0, 0)
    assert out["tokens"].shape == (0, 24) and out["tokens"].dtype == np.uint16
    assert out["lengths"].shape == (0,) and out["finished"].shape == (0,)
    assert sample_stats(out)["n"] == 0


def test_sampling_keeps_mode_and_weights_and_reads_new_weights_at_each_call():
    model = MODELS["gpt2"]().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = sampler(model, batch_size=4)
    first = draw(s, 8, 0)
    draw(s, 3, 0, use_cache=False)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not first["finished"].all()
    with_eot_bias(model, 1e4)  # "training" between calls: now every story ends at once
    out = draw(s, 8, 0)
    assert out["finished"].all() and (out["lengths"] == 2).all()


def test_bfloat16_sampling_runs_on_cpu():
    out = draw(sampler(with_eot_bias(MODELS["llama"](), 2.0), dtype="bfloat16", batch_size=4), 6, 0)
    assert out["tokens"].shape == (6, 24) and (out["tokens"] < VOCAB).all()


def test_sample_stats():
    out = {"lengths": np.array([2, 4, 6], dtype=np.int32), "finished": np.array([True, True, False])}
    assert sample_stats(out) == {"n": 3, "finished_fraction": pytest.approx(2 / 3), "mean_length": 4.0, "max_length": 6}


def test_cuda_graph_loop_draws_the_same_tokens_simulated_on_cpu(monkeypatch, caplog):
    # The CUDA-graph loop (warm-up with state restore, buffers refilled from the generator before each replay,
    # flush and stop every few steps) run on CPU with stand-ins for torch.cuda; the capture itself "fails",
    # so the loop replays the step directly, as it does after a real capture failure.
    class Stream:
        def wait_stream(self, other) -> None:
            pass

    def no_capture(graph, pool=None):
        raise RuntimeError("no CUDA graphs on CPU")

    for name, value in {
        "Stream": Stream, "current_stream": Stream, "stream": lambda stream: contextlib.nullcontext(),
        "CUDAGraph": object, "graph": no_capture, "synchronize": lambda: None, "graph_pool_handle": lambda: None,
    }.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, value)
    for strategy in ("bos_fixed_length", "first_token_inclusive"):
        for bucket in (128, 4):  # one length (the context); or buckets 8, 12, 16, 20, each warmed up mid-run
            model = with_eot_bias(MODELS["llama"](), 2.0)
            s = sampler(model, max_len=20, batch_size=4, top_k=12, strategy=strategy, first_tokens=[5, 9, 17])
            eager = draw(s, 11, seed=3)
            s._force_static, s._bucket = True, bucket
            monkeypatch.setattr(s, "_use_graphs", lambda device: True)
            assert_same(draw(s, 11, seed=3), eager)
    assert caplog.text.count("CUDA graph capture failed") == 4  # once per draw, not once per bucket
    # Every bucket is warmed up (on the side stream) and captured before the first story starts; a bucket found
    # missing later is warmed up mid-draw, with stories in progress: a warm-up must write no cache entry but those
    # of [EOT] at position 0, the same in every story (a story ending within its steps would otherwise restart
    # over the entries of the story in progress in its slot).
    caplog.set_level(logging.INFO, logger=lm_sampling.__name__)
    side, positions = [False], []

    @contextlib.contextmanager
    def on_side_stream(stream):
        side[0] = True
        yield
        side[0] = False

    step = lm_sampling._cached_step

    def spy(plan, w, kc, vc, s, *rest):
        positions.append((side[0], s["pos"].clone()))
        return step(plan, w, kc, vc, s, *rest)

    monkeypatch.setattr(torch.cuda, "stream", on_side_stream)
    monkeypatch.setattr(lm_sampling, "_cached_step", spy)
    model = with_eot_bias(MODELS["gpt2"](), 1.5)
    s = sampler(model, max_len=40, batch_size=6)
    eager = draw(s, 30, seed=5)
    s._force_static, s._bucket = True, 4
    monkeypatch.setattr(s, "_use_graphs", lambda device: True)
    positions.clear()
    assert_same(draw(s, 30, seed=5), eager)
    warm = [pos for on_side, pos in positions if on_side]
    # Every bucket (4, 8, ..., 40) is warmed up (3 steps each) before the first story starts, every slot idle.
    assert len(warm) == 3 * 10 and all((pos == 0).all() for pos in warm)
    assert all(on_side for on_side, _ in positions[:30]) and not any(on_side for on_side, _ in positions[30:])
    assert "sampling: decode step (not compiled) and 0 CUDA graphs (attention lengths 4..40) ready in" in caplog.text
    (engine,) = s._engines.values()
    for length in [length for length in engine.replays if length > 8]:
        del engine.replays[length]  # as if never captured: warmed up when first needed, mid-draw
    positions.clear()
    assert_same(draw(s, 30, seed=5), eager)
    warm = [pos for on_side, pos in positions if on_side]
    assert len(warm) >= 3 * 2 and all((pos == 0).all() for pos in warm)
    first_warm = next(i for i, (on_side, _) in enumerate(positions) if on_side)
    assert any((pos > 0).any() for _, pos in positions[:first_warm])  # while stories were in progress
    positions.clear()
    assert_same(draw(s, 30, seed=5), eager)  # the next call (the next chunk) reuses every bucket's step
    assert positions and not any(on_side for on_side, _ in positions)

    # --sampling.compile auto: should compiling fail, the uncompiled step takes over.
    def broken_compile(plan):
        def step(*args):
            raise RuntimeError("no compiler")

        return step

    monkeypatch.setattr(lm_sampling, "resolve_compile", lambda setting, device: True)
    monkeypatch.setattr(lm_sampling, "_compiled_step", broken_compile)
    s = sampler(with_eot_bias(MODELS["gpt2"](), 2.0), max_len=20, batch_size=4, compile="auto")
    eager = draw(s, 11, seed=3, use_cache=False)
    monkeypatch.setattr(s, "_use_graphs", lambda device: True)
    assert_same(draw(s, 11, seed=3), eager)
    assert "compiling the decode step failed (no compiler)" in caplog.text
    s = sampler(with_eot_bias(MODELS["gpt2"](), 2.0), max_len=20, batch_size=4, compile="on")
    monkeypatch.setattr(s, "_use_graphs", lambda device: True)
    with pytest.raises(RuntimeError, match="no compiler"):
        draw(s, 11, seed=3)


@pytest.mark.slow
def test_compiled_static_step_draws_the_same_tokens_on_cpu():
    from torch._dynamo.utils import counters

    model = with_eot_bias(MODELS["llama"](), 2.0)
    eager = draw(sampler(model, max_len=20, batch_size=4, top_k=12), 11, seed=3)
    graphs = counters["stats"]["unique_graphs"]
    assert_same(draw(sampler(model, max_len=20, batch_size=4, top_k=12, compile="on"), 11, seed=3), eager)
    compiled = sampler(model, max_len=20, batch_size=4, top_k=12, compile="on")
    compiled._bucket = 4  # attention lengths 8, 12, 16 and 20 (the whole context), up and down
    assert_same(draw(compiled, 11, seed=3), eager)
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one compilation serves every length


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "greedy"}, "--sampling.strategy must be one of"),
        ({"temperature": 0}, "--sampling.temperature must be > 0, got 0"),
        ({"temperature": float("nan")}, "--sampling.temperature must be > 0"),
        ({"temperature": 1e-45}, r"--sampling.temperature must be >= 1e-06 .* use --sampling.top_k 1"),
        ({"top_k": 0}, "--sampling.top_k must be an integer >= 1"),
        ({"top_p": 0.0}, r"--sampling.top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"--sampling.top_p must be in \(0, 1\]"),
        ({"max_len": 1}, "--sampling.max_len must be an integer >= 2"),
        ({"max_len": 2, "strategy": "first_token_inclusive"}, "--sampling.max_len must be an integer >= 3"),
        ({"batch_size": 0}, "--sampling.batch_size must be a positive integer"),
        ({"batch_size": "many"}, "--sampling.batch_size must be a positive integer or auto"),
        ({"attention": "paged"}, "--sampling.attention must be one of"),
        ({"compile": "yes"}, "--sampling.compile must be one of"),
        ({"dtype": "float16"}, "--sampling.dtype must be one of"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingConfig(**kwargs)


def test_the_smallest_temperature_allowed_keeps_the_largest_float32_logits_finite():
    from samplers.story_sampler import MIN_TEMPERATURE

    logits = torch.tensor([[3.0e32, -3.0e32, 0.0, 1.0]])
    assert torch.equal(sample_tokens(logits, torch.tensor([0.5]), temperature=MIN_TEMPERATURE), torch.tensor([0]))
    assert torch.isnan(torch.softmax(logits.float() / 1e-45, dim=-1)).all()  # what a smaller one gave


@pytest.mark.parametrize("static", [False, True])
def test_each_draw_counts_its_steps_and_the_cache_positions_its_steps_attended(static):
    s = sampler(with_eot_bias(MODELS["gpt2"](), 1.5), max_len=40, batch_size=4)
    s._force_static, s._bucket = static, 8
    out = draw(s, 10, seed=2)
    lengths = out["lengths"].astype(int)
    d = s.last_draw
    assert d["slots"] == 4
    assert d["steps"] >= lengths.max() - 1 and d["steps"] >= (lengths - 1).sum() / 4  # the longest story; 4 at a time
    needed = int(((lengths - 1) * lengths // 2).sum())  # positions 1, 2, ..., L - 1 read over a story's steps
    assert needed <= d["attended"] <= d["steps"] * 4 * 40
    if static:
        assert d["attended"] % (4 * 8) == 0  # whole buckets of 8, for every slot
    engines = dict(s._engines)
    short = draw(s, 3, seed=2)
    assert s.last_draw["steps"] < d["steps"]  # counted per call
    # Fewer stories than slots: the eager path decodes 3 slots; the static path keeps its 4 (one idle) and its
    # one engine (caches, compiled step, graphs) rather than building a second for the short draw.
    assert s.last_draw["slots"] == (4 if static else 3)
    if static:
        assert s._engines == engines and len(engines) == 1
    assert short["lengths"].shape == (3,) and (short["lengths"] > 1).all()


def test_auto_concurrency_is_64_off_cuda_and_fills_a_kv_budget_on_cuda():
    from lit_modules.causal_lm import CausalLMConfig, model_config

    gpt2_9m = model_config(CausalLMConfig(preset="gpt2-9m"))
    # 2 caches x 8 layers x 256 (8 heads of 32) x 2,049 positions x 2 bytes = 16.8 MB per slot
    assert lm_sampling.kv_bytes_per_slot(gpt2_9m, 2048) == 2 * 8 * 256 * 2049 * 2
    assert lm_sampling.auto_batch_size(gpt2_9m, 2048, on_gpu=False) == 64
    assert lm_sampling.auto_batch_size(gpt2_9m, 2048, on_gpu=True) == 512  # 1,024 would take 17.2 GB > 16 GiB
    assert lm_sampling.auto_batch_size(gpt2_9m, 256, on_gpu=True) == 1024  # the cap
    assert lm_sampling.auto_batch_size(gpt2_9m, 2048, on_gpu=True, dtype_bytes=4) == 256  # generate() in float32
    big = model_config(CausalLMConfig(preset="llama2-126m"))
    assert lm_sampling.auto_batch_size(big, 2048, on_gpu=True) == 128
    wide = model_config(CausalLMConfig(preset="llama2-126m"))
    wide.num_hidden_layers = 200  # no number of slots fits the budget: still 64
    assert lm_sampling.auto_batch_size(wide, 2048, on_gpu=True) == 64
    s = sampler(MODELS["gpt2"](), max_len=20)
    assert s.cfg.batch_size == "auto" and s.slots(torch.device("cpu")) == 64
    assert sampler(MODELS["gpt2"](), max_len=20, batch_size=5).slots(torch.device("cpu")) == 5


def test_bad_sampler_inputs_are_config_errors():
    model = MODELS["llama"]()
    for pool in (None, []):
        with pytest.raises(ConfigError, match="first_token_inclusive needs the first tokens of real stories"):
            sampler(model, strategy="first_token_inclusive", first_tokens=pool)
    with pytest.raises(ConfigError, match="--sampling.max_len must be at least 3"):
        sampler(model, max_len=2, strategy="first_token_inclusive", first_tokens=[4])
    with pytest.raises(ConfigError, match="--sampling.max_len must be at most 24"):
        StorySampler(model, SamplingConfig(max_len=30), max_len=24)
    with pytest.raises(ConfigError, match="--sampling.max_len must be at most 512"):
        sampler(model, max_len=1000)  # beyond the preset's position limit
    with pytest.raises(ValueError, match="first_tokens must be token ids"):
        sampler(model, strategy="first_token_inclusive", first_tokens=[VOCAB])
    with pytest.raises(ConfigError, match="backend native: the native decoder runs gpt2, llama, mistral, qwen2 models"):
        sampler(neox(), backend="native")
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        draw(sampler(model), -1, 0)


def test_a_sampler_keeps_its_decoder_between_calls_until_the_weights_change():
    # Drawing a corpus chunk by chunk reads the weights, allocates the caches (and captures the graphs) once;
    # every call still draws what a fresh sampler draws, and a weight update is seen at the next call.
    model = with_eot_bias(MODELS["llama"](), 2.0)
    kept = sampler(model, max_len=20, batch_size=4, strategy="first_token_inclusive", first_tokens=[5, 9, 17])
    first = draw(kept, 11, seed=3)
    (engine,) = kept._engines.values()
    assert_same(draw(kept, 11, seed=4), draw(sampler(model, max_len=20, batch_size=4,
                strategy="first_token_inclusive", first_tokens=[5, 9, 17]), 11, seed=4))  # fmt: skip
    assert list(kept._engines.values()) == [engine]  # the same decoder, state and buffers
    assert_same(draw(kept, 11, seed=3), first)
    with torch.no_grad():
        model.get_output_embeddings().bias[EOT] += 3.0  # in place, as an optimizer step
    fresh = draw(sampler(model, max_len=20, batch_size=4, strategy="first_token_inclusive", first_tokens=[5, 9, 17]),
                 11, seed=3)  # fmt: skip
    assert_same(draw(kept, 11, seed=3), fresh)
    assert fresh["lengths"].mean() < first["lengths"].mean()  # EOT likelier: the update was read
    (rebuilt,) = kept._engines.values()
    assert rebuilt is not engine
    kept.release()
    assert not kept._engines
