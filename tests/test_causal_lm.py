"""The causal language models of the TinyStories modality (lit_modules.causal_lm)."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader

import lit_modules.causal_lm as causal_lm
from collapse.errors import ConfigError, UserError
from lit_modules.causal_lm import (
    IGNORE_INDEX,
    PREDICTED,
    PRESETS,
    PUBLISHED_PARAMETERS,
    CausalLMConfig,
    CausalLMModule,
    build_model,
    count_parameters,
    describe,
    lr_factor,
    model_config,
)

TINY = {"preset": "tiny", "vocab_size": 64, "warmup_steps": 0}


@pytest.fixture(autouse=True)
def quiet_lightning():
    """Silence Lightning's advice about dataloader workers and tiny logging intervals."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
        yield


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def random_tokens(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


# ------------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMETERS))
def test_preset_parameter_counts_equal_the_published_ones(preset):
    with torch.device("meta"):  # no memory, even for 126M parameters
        model = build_model(CausalLMConfig(preset=preset, vocab_size=8000))
    assert count_parameters(model) == PUBLISHED_PARAMETERS[preset]
    assert f"parameters: {PUBLISHED_PARAMETERS[preset]}" in describe(CausalLMConfig(preset=preset)).splitlines()


def test_tied_and_untied_heads_and_tiny_counts():
    with torch.device("meta"):
        gpt2 = build_model(CausalLMConfig(preset="gpt2-9m"))
        llama = build_model(CausalLMConfig(preset="tiny", vocab_size=8000))
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied: counted once
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight
    v, d, f, layers = 8000, 32, 64, 2
    assert count_parameters(llama) == 2 * v * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d
    assert set(PUBLISHED_PARAMETERS) < set(PRESETS)


def test_special_token_ids_reach_the_model():
    with torch.device("meta"):
        default = build_model(CausalLMConfig(preset="gpt2-tiny"))
        model = build_model(CausalLMConfig(preset="tiny"), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    assert default.config.bos_token_id is None and default.config.eos_token_id is None  # not GPT-2's 50256
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
    assert model.generation_config.eos_token_id == 2
    with pytest.raises(ValueError, match="eos_token_id"):
        build_model(CausalLMConfig(preset="tiny", vocab_size=64), eos_token_id=64)


# ------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        ({"preset": "gpt5"}, "--model.preset must be one of"),
        ({"vocab_size": 0}, "--model.vocab_size"),
        ({"vocab_size": 8000.5}, "--model.vocab_size"),
        ({"max_seq_len": 0}, "--model.max_seq_len"),
        ({"preset": "gpt2-tiny", "max_seq_len": 513}, "--model.max_seq_len must be at most 512"),
        ({"lr": 0.0}, "--model.lr"),
        ({"weight_decay": -0.1}, "--model.weight_decay"),
        ({"warmup_steps": -1}, "--model.warmup_steps"),
        ({"attn_implementation": "fast"}, "--model.attn_implementation"),
        ({"init_from": "/no/such/checkpoint"}, "--model.init_from .*/no/such/checkpoint"),
    ],
)
def test_bad_settings_name_the_flag(settings, flag):
    with pytest.raises(ConfigError, match=flag):
        CausalLMConfig(**settings)


def test_init_from_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match=f"--model.init_from .*{tmp_path}.*config.json"):
        CausalLMConfig(init_from=str(tmp_path))


def test_init_from_a_file_or_without_weights_says_so(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match=f"checkpoint directory; {tmp_path / 'model.bin'} is a file"):
        CausalLMConfig(init_from=str(tmp_path / "model.bin"))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ConfigError, match="holds no weights .*model.safetensors"):
        CausalLMConfig(init_from=str(tmp_path))


@pytest.mark.parametrize(
    "config",
    ["", "{not json", '{"vocab_size": 64}', '{"model_type": "no-such-model"}', '{"model_type": "gpt2", "n_embd": "x"}'],
)
def test_init_from_an_unreadable_config_is_one_config_error(tmp_path, config):
    (tmp_path / "config.json").write_text(config)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=f"--model.init_from {tmp_path}: its config.json is not one") as excinfo:
        model_config(CausalLMConfig(init_from=str(tmp_path), vocab_size=64))
    assert "\n" not in str(excinfo.value)


def test_init_from_damaged_or_misshapen_weights_is_one_user_error(tmp_path):
    source = build_model(CausalLMConfig(**TINY))
    source.save_pretrained(tmp_path / "good")
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "good", damaged)
    (damaged / "model.safetensors").write_bytes(b"\xff" * 64)
    misshapen = tmp_path / "misshapen"
    shutil.copytree(tmp_path / "good", misshapen)
    wider = json.loads((misshapen / "config.json").read_text())
    wider["intermediate_size"] *= 2  # the config no longer describes the stored weights
    (misshapen / "config.json").write_text(json.dumps(wider))
    for folder, reason in [(damaged, "its weights cannot be loaded"), (misshapen, "do not have the shapes")]:
        with pytest.raises(UserError, match=reason) as excinfo:
            build_model(CausalLMConfig(init_from=str(folder), vocab_size=64))
        assert "\n" not in str(excinfo.value)


def test_module_rejects_unknown_settings_and_long_batches():
    with pytest.raises(ValueError, match="unknown causal LM settings"):
        CausalLMModule(preset="tiny", hidden=3)
    module = CausalLMModule(**TINY, max_seq_len=16)
    assert module.max_seq_len == 16 and CausalLMModule(**TINY).max_seq_len == 512
    with pytest.raises(ValueError, match="max_seq_len=16"):
        module.token_loss({"input_ids": random_tokens(2, 17, 64, seed=0)})


# ------------------------------------------------------------------------------------------ init_from


def test_init_from_round_trip(tmp_path):
    torch.manual_seed(0)
    source = build_model(CausalLMConfig(**TINY), bos_token_id=1, eos_token_id=2)
    source.save_pretrained(tmp_path)  # safetensors
    assert (tmp_path / "model.safetensors").is_file()

    module = CausalLMModule(vocab_size=64, init_from=str(tmp_path), max_seq_len=128)
    loaded = module.model.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    assert module.model.config.eos_token_id == 2 and module.num_parameters == count_parameters(source)
    assert describe(CausalLMConfig(vocab_size=64, init_from=str(tmp_path))).splitlines()[1:] == [
        f"parameters: {count_parameters(source)}",
        "vocab_size: 64",
        "context: 512",
    ]

    with pytest.raises(ConfigError, match=f"--model.vocab_size is 8000 .*--model.init_from {tmp_path}.*64"):
        build_model(CausalLMConfig(vocab_size=8000, init_from=str(tmp_path)))
    with pytest.raises(ConfigError, match="--model.max_seq_len must be at most 512"):
        build_model(CausalLMConfig(vocab_size=64, max_seq_len=1024, init_from=str(tmp_path)))


# ------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("preset", ["tiny", "gpt2-tiny"])
def test_initial_loss_is_log_vocab(preset):
    torch.manual_seed(0)
    module = CausalLMModule(preset=preset, vocab_size=8000).eval()
    with torch.no_grad():
        loss, n = module.token_loss({"input_ids": random_tokens(4, 32, 8000, seed=1)})
    assert n == 4 * 31
    assert loss.item() == pytest.approx(math.log(8000), rel=0.1)


def test_overfits_one_batch():
    torch.manual_seed(0)
    module = CausalLMModule(**TINY)
    batch = {"input_ids": random_tokens(4, 32, 64, seed=2)}
    optimizer = torch.optim.AdamW(module.parameter_groups(), lr=1e-2)
    with torch.no_grad():
        first = module.token_loss(batch)[0].item()
    for _ in range(100):
        loss, _ = module.token_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = module.token_loss(batch)[0].item()
    assert first == pytest.approx(math.log(64), rel=0.1)
    assert last < 0.3 * first


def test_labels_default_to_inputs_with_padding_masked():
    module = CausalLMModule(**TINY, pad_token_id=0)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    _, _, labels = module.prepare_batch({"input_ids": ids, "attention_mask": mask})
    assert labels.tolist() == [[5, 6, 7, IGNORE_INDEX], [8, 9, IGNORE_INDEX, IGNORE_INDEX]]
    _, none, labels = module.prepare_batch(ids)  # no mask: the pad id marks padding
    assert none is None and labels.tolist() == [[5, 6, 7, IGNORE_INDEX], [8, 9, IGNORE_INDEX, IGNORE_INDEX]]
    given = torch.full_like(ids, IGNORE_INDEX)
    assert module.prepare_batch({"input_ids": ids, "labels": given})[2] is given


def test_lr_schedule():
    assert lr_factor(0, 10, 110) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110) == pytest.approx(1.0)
    assert lr_factor(10, 10, 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110) == pytest.approx(0.55)
    assert lr_factor(110, 10, 110) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110) == pytest.approx(0.1)
    assert lr_factor(500, 10, float("inf")) == 1.0
    assert lr_factor(0, 0, 100) == 1.0


def test_weight_decay_on_matrices_only():
    module = CausalLMModule(**TINY, weight_decay=0.05)
    decay, no_decay = module.parameter_groups()
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is module.model.model.embed_tokens.weight for p in decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == module.num_parameters


def dict_batches(n: int, length: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    ids = random_tokens(n, length, vocab, seed)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]


def test_trainer_fit_and_test_log_the_loss(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(preset="tiny", vocab_size=64, warmup_steps=2, lr=1e-2)
    train = DataLoader(dict_batches(32, 16, 64, seed=3), batch_size=8, shuffle=True)
    val = DataLoader(dict_batches(8, 16, 64, seed=4), batch_size=8)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, train, val)
    assert trainer.global_step == 4
    assert {"train_loss", "val_loss"} <= set(trainer.callback_metrics)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-2 * lr_factor(4, 2, 4))  # decayed to 10%
    (result,) = trainer.test(module, val, verbose=False)
    assert math.isfinite(result["test_loss"]) and 0 < result["test_loss"] < 2 * math.log(64)

    trainer.save_checkpoint(tmp_path / "last.ckpt")  # flat hyperparameters rebuild the same model
    restored = CausalLMModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert restored.config == module.config
    for name, tensor in module.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name


def test_the_training_loss_is_a_curve_point_at_every_logging_interval():
    from lightning.pytorch.loggers.logger import Logger

    class Rows(Logger):
        name, version = "rows", "0"

        def __init__(self):
            super().__init__()
            self.rows: list[tuple[int, dict]] = []

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    torch.manual_seed(0)
    module = CausalLMModule(preset="tiny", vocab_size=64, warmup_steps=2, lr=1e-2)
    train = DataLoader(dict_batches(48, 16, 64, seed=3), batch_size=8)  # 6 steps
    logger = Rows()
    quiet_trainer(max_epochs=1, logger=logger, log_every_n_steps=2).fit(module, train)
    points = [(step, row["train_loss"]) for step, row in logger.rows if "train_loss" in row]
    assert [step for step, _ in points] == [1, 3, 5]  # every 2nd optimizer step, not only once per epoch
    assert all(0 < loss < 2 * math.log(64) for _, loss in points)


def test_test_loss_is_the_per_token_mean_over_batches():
    torch.manual_seed(0)
    module = CausalLMModule(**TINY).eval()
    ids_a, ids_b = random_tokens(2, 12, 64, seed=5), random_tokens(3, 8, 64, seed=6)
    mask_a = torch.ones_like(ids_a)
    mask_a[0, 5:] = 0  # 4 + 11 = 15 predicted tokens
    mask_b = torch.ones_like(ids_b)
    mask_b[:, 3:] = 0  # 3 * 2 = 6 predicted tokens
    batches = [{"input_ids": ids_a, "attention_mask": mask_a}, {"input_ids": ids_b, "attention_mask": mask_b}]
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for _ in range(20):  # fit batch a, so the two batch means differ clearly
        optimizer.zero_grad()
        module.token_loss(batches[0])[0].backward()
        optimizer.step()

    # Independent reference: sum of token cross-entropies over both batches / number of tokens.
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += int((targets != -100).sum())
    assert count == 21
    with torch.no_grad():
        batch_means = [module.token_loss(b)[0].item() for b in batches]

    (result,) = quiet_trainer().test(module, DataLoader(batches, batch_size=None), verbose=False)
    assert result["test_loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["test_loss"] != pytest.approx(sum(batch_means) / 2, rel=0.05)  # not the mean of batch means


@pytest.fixture
def fresh_dynamo():
    """Compiled flex attention leaves torch.compile's caches marked for other shapes (automatic dynamic shapes):
    a later compile of flex_attention elsewhere would take a shape-generic CPU kernel that fails to build. Reset."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def padded_stories(lengths: list[int], vocab: int = 64, pad: int = 1) -> dict[str, torch.Tensor]:
    """A right-padded batch of stories of the given lengths (ids >= 2, padding ``pad``), as the data module makes."""
    gen = torch.Generator().manual_seed(sum(lengths))
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(2, vocab, (n,), generator=gen)
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_packed_rows_keep_each_story_to_itself():
    from lit_modules.causal_lm import pack_stories

    batch = padded_stories([6, 2, 3, 4])
    packed = pack_stories(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert packed["input_ids"].shape == (3, 6)  # [6], [4, 2], [3]: first-fit by decreasing length
    assert packed["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1]
    assert packed["labels"][1, 4] == IGNORE_INDEX and packed["labels"][1, 5] == batch["input_ids"][1, 1]
    mask = packed["attention_mask"][1, 0]
    assert mask[5, 4] and mask[5, 5] and not mask[5, 3] and not mask[3, 4] and mask[3, 0]
    assert packed["attention_mask"][2, 0, 5].tolist() == [False] * 5 + [True]  # padding sees only itself


@pytest.mark.parametrize(
    "preset,attention",
    [("tiny", "sdpa"), ("tiny", "eager"), ("gpt2-tiny", "sdpa"), ("gpt2-tiny", "eager"), ("tiny", "flex_attention")],
)
def test_packed_loss_equals_the_one_story_per_row_loss(preset, attention, fresh_dynamo):
    # flex_attention: the block-sparse mask (forward only here: torch has no flex backward on a CPU).
    torch.manual_seed(0)
    cfg = {"preset": preset, "vocab_size": 64}
    plain = CausalLMModule(**cfg, pad_token_id=1).eval()  # eval: GPT-2's dropout off
    packed = CausalLMModule(**cfg, attn_implementation=attention, pack=True, pad_token_id=1).eval()
    packed.load_state_dict(plain.state_dict())
    batch = padded_stories([17, 3, 9, 12, 5, 2, 20])
    with torch.no_grad():
        loss, n = plain.token_loss(batch)
        loss_packed, n_packed = packed.token_loss(batch)
        # The exact per-token mean over the real tokens, from each story alone (no padding at all).
        total, count = 0.0, 0
        for ids, m in zip(batch["input_ids"], batch["attention_mask"]):
            story = ids[: int(m.sum())][None]
            logits = plain(story)[0, :-1]
            total += float(F.cross_entropy(logits, story[0, 1:], reduction="sum"))
            count += story.shape[1] - 1
    assert n == n_packed == count
    torch.testing.assert_close(loss_packed, loss, atol=1e-5, rtol=1e-5)
    assert float(loss_packed) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("preset,attention", [("tiny", "sdpa"), ("tiny", "eager"), ("gpt2-tiny", "sdpa")])
def test_packed_training_step_gives_the_one_story_per_row_gradients(preset, attention):
    # The loss is not all: what training does with a packed batch is its gradient, so every parameter's must be
    # the unpacked one's (eval mode: GPT-2's dropout off; the gradients are computed all the same).
    torch.manual_seed(0)
    cfg = {"preset": preset, "vocab_size": 64}
    plain = CausalLMModule(**cfg, pad_token_id=1).eval()
    packed = CausalLMModule(**cfg, attn_implementation=attention, pack=True, pad_token_id=1).eval()
    packed.load_state_dict(plain.state_dict())
    batch = padded_stories([17, 3, 9, 12, 5, 2, 20])
    for module in (plain, packed):
        module.zero_grad()
        module.token_loss(module.on_before_batch_transfer(dict(batch), 0))[0].backward()
    grads = {name: p.grad for name, p in plain.named_parameters()}
    assert all(g is not None for g in grads.values())
    for name, p in packed.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_packed_test_gives_the_exact_mean_per_real_test_token():
    # End to end under trainer.test: batches packed several stories to a row give the test loss of one story per
    # row, and both are the mean over every real test token (not a mean of batch means).
    torch.manual_seed(0)
    plain = CausalLMModule(**TINY, pad_token_id=1)
    packed = CausalLMModule(**TINY, pack=True, pad_token_id=1)
    packed.load_state_dict(plain.state_dict())
    batches = [padded_stories([9, 4, 7, 3, 3]), padded_stories([5, 12]), padded_stories([2])]
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            for ids, m in zip(batch["input_ids"], batch["attention_mask"]):
                story = ids[: int(m.sum())][None]
                total += float(F.cross_entropy(plain.eval()(story)[0, :-1], story[0, 1:], reduction="sum"))
                count += story.shape[1] - 1
    results = [
        quiet_trainer().test(module, DataLoader(batches, batch_size=None), verbose=False)[0]["test_loss"]
        for module in (plain, packed)
    ]
    assert count == 37 and packed.packs
    assert results[0] == pytest.approx(total / count, rel=1e-5)
    assert results[1] == pytest.approx(total / count, rel=1e-5)


def test_packing_by_default_follows_the_device_and_the_model_layout():
    from lit_modules.causal_lm import packs_by_default

    llama = CausalLMModule(**TINY, pad_token_id=1)
    assert llama.config.pack is None and not llama.packs  # unset, on a CPU: one story per row
    assert "story_ids" not in llama.on_before_batch_transfer(padded_stories([5, 3]), 0)
    assert CausalLMModule(**TINY, pack=True, pad_token_id=1).packs
    assert packs_by_default(llama.model.config, "sdpa", on_gpu=True)
    assert not packs_by_default(llama.model.config, "sdpa", on_gpu=False)
    assert not packs_by_default(llama.model.config, "flash_attention_2", on_gpu=True)
    gpt2 = CausalLMModule(preset="gpt2-tiny", vocab_size=64, pad_token_id=1)
    assert packs_by_default(gpt2.model.config, "eager", on_gpu=True)
    other = transformers.AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=32, num_attention_heads=4)
    assert not packs_by_default(other, "sdpa", on_gpu=True)  # packs only when asked


def test_packing_needs_an_explicit_mask_kernel():
    with pytest.raises(ConfigError, match="--model.pack true needs --model.attn_implementation sdpa, eager or flex"):
        CausalLMConfig(preset="tiny", pack=True, attn_implementation="flash_attention_2")
    assert CausalLMConfig(preset="tiny", pack=True, attn_implementation="flex_attention").pack


def test_the_flex_block_mask_is_the_dense_story_mask_and_skips_the_blocks_between_stories():
    from lit_modules.causal_lm import pack_rows, story_block_mask, story_mask

    # Two rows of 512 positions: stories of 200, 150 and 130 tokens then padding; one of 300 and one of 212.
    lengths = [200, 150, 130, 300, 212]
    batch = padded_stories(lengths)
    batch = {k: F.pad(v, (0, 512 - v.shape[1]), value=1 if k == "input_ids" else 0) for k, v in batch.items()}
    packed = pack_rows(batch["input_ids"], batch["attention_mask"], batch["labels"], pad_id=1)
    story_ids = packed["story_ids"]
    assert story_ids.shape == (2, 512)
    block = story_block_mask(story_ids)
    dense = story_mask(story_ids)[:, 0]
    b, q, k = torch.meshgrid(torch.arange(2), torch.arange(512), torch.arange(512), indexing="ij")
    from_mod = block.mask_mod(b, torch.zeros_like(b), q, k)  # the exact mask flex applies inside each block
    assert torch.equal(from_mod, dense)
    # Block-sparse: each row visits only the 128 x 128 blocks holding a pair of one story's tokens, far fewer
    # than the 10 blocks of a causal 512-wide row.
    visited = block.kv_num_blocks + (block.full_kv_num_blocks if block.full_kv_num_blocks is not None else 0)
    needed = [len({(q // 128, k // 128) for q in range(512) for k in range(q + 1) if dense[r, q, k]}) for r in range(2)]
    assert visited.sum(dim=-1).flatten().tolist() == needed
    assert max(needed) < 10


def block_sets(num: torch.Tensor, index: torch.Tensor) -> list[set[int]]:
    """The key blocks listed for each (row, head, query block) of a BlockMask's counts and indices."""
    return [set(index[r, h, q, : int(num[r, h, q])].tolist()) for r, h, q in np.ndindex(*num.shape)]


def test_the_flex_block_lists_are_those_torch_derives_from_the_whole_mask():
    # story_block_mask lists its blocks from where the stories start; torch's create_block_mask evaluates the
    # mask at every position. Both must list the same partial and full blocks, for queries and for keys
    # (backward), at widths that are and are not multiples of the block, with all-padding rows.
    from torch.nn.attention.flex_attention import create_block_mask

    from lit_modules.causal_lm import pack_rows, pad_rows, story_block_mask

    rng = np.random.default_rng(0)
    full_blocks = 0
    for width in (64, 192, 256, 384, 640):
        for trial in range(6):
            count = int(rng.integers(1, 12))
            cap = width if trial % 2 else min(width, 150)  # long stories spanning blocks, or many short ones
            lengths = rng.integers(1, cap + 1, size=count).tolist()
            if trial == 0:  # a story filling its row: whole blocks, and a last block cut short by the width
                lengths = [width, width // 2 + 1, 3]
            batch = padded_stories([max(lengths)] + lengths)
            batch = {k: F.pad(v, (0, width - v.shape[1]), value=1 if k == "input_ids" else 0) for k, v in batch.items()}
            packed = pack_rows(batch["input_ids"], batch["attention_mask"], batch["labels"], pad_id=1)
            if trial == 5:
                packed = pad_rows(packed, packed["input_ids"].shape[0] + 2, pad_id=1)
            story_ids = packed["story_ids"]
            reads = _HostReads()
            with reads:
                ours = story_block_mask(story_ids)
            assert reads.count == 0  # built without waiting for the device, as the step goes on queueing
            theirs = create_block_mask(ours.mask_mod, story_ids.shape[0], None, width, width, device="cpu")
            assert ours.seq_lengths == theirs.seq_lengths and ours.BLOCK_SIZE == theirs.BLOCK_SIZE
            for kind in ("kv", "full_kv", "q", "full_q"):
                mine = block_sets(getattr(ours, f"{kind}_num_blocks"), getattr(ours, f"{kind}_indices"))
                torch_s = block_sets(getattr(theirs, f"{kind}_num_blocks"), getattr(theirs, f"{kind}_indices"))
                assert mine == torch_s, (width, lengths, kind)
            full_blocks += int(ours.full_kv_num_blocks.sum())
    assert full_blocks > 0  # the whole-block case was among those compared


@pytest.mark.parametrize("pack", [False, True])
def test_a_batch_prepared_on_the_host_gives_the_same_loss_and_count(pack):
    torch.manual_seed(0)
    module = CausalLMModule(**TINY, pack=pack, pad_token_id=1).eval()
    batch = padded_stories([17, 3, 9, 12, 5, 2, 20])
    ready = module.on_before_batch_transfer(batch, 0)
    assert ready[PREDICTED] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 61
    assert ("story_ids" in ready) == pack  # packed rows travel without their (R, 1, T, T) mask
    if pack:
        assert ready["input_ids"].shape[0] < batch["input_ids"].shape[0]
    assert module.on_before_batch_transfer(ready, 0) is ready  # prepared once
    with torch.no_grad():
        loss, n = module.token_loss(batch)
        loss_ready, n_ready = module.token_loss(ready)
    assert n == n_ready == 61
    torch.testing.assert_close(loss_ready, loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("pack", [False, True])
def test_training_and_test_steps_read_no_count_back_from_the_device(pack, monkeypatch):
    # On a GPU, reading the predicted-token count inside a step (int(tensor)) waits for the device every step.
    # Lightning's fit and test must bring the count from the host (on_before_batch_transfer), never count in a step.
    torch.manual_seed(0)
    module = CausalLMModule(**TINY, pack=pack, pad_token_id=1)
    in_step, counted_in_step, steps = [False], [], []
    count = causal_lm.count_predicted
    step = CausalLMModule.model_step

    def counting(labels):
        counted_in_step.append(in_step[0])
        return count(labels)

    def stepping(self, batch, stage):
        in_step[0] = True
        try:
            steps.append(stage)
            return step(self, batch, stage)
        finally:
            in_step[0] = False

    monkeypatch.setattr(causal_lm, "count_predicted", counting)
    monkeypatch.setattr(CausalLMModule, "model_step", stepping)
    batches = [padded_stories([9, 4, 7]), padded_stories([5, 12])]
    quiet_trainer(max_steps=4).fit(module, DataLoader(batches, batch_size=None))
    (result,) = quiet_trainer().test(module, DataLoader(batches, batch_size=None), verbose=False)
    assert steps.count("train") == 4 and steps.count("test") == 2
    assert len(counted_in_step) == 6 and not any(counted_in_step)  # once per batch, always before the step
    assert math.isfinite(result["test_loss"])


def test_adamw_is_fused_on_request_and_lightning_still_clips_under_bf16_mixed():
    # Lightning refuses to clip for a fused optimizer under any mixed precision; the module clips itself.
    torch.manual_seed(0)
    assert not CausalLMModule(**TINY).make_optimizer("bf16-mixed").defaults["fused"]  # CPU default: not fused
    module = CausalLMModule(**TINY, fused_optimizer=True, pad_token_id=1)
    clip, before, after = 0.01, [], []

    def norm() -> float:
        return float(
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
        )

    class Norms(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before the clipping
            before.append(norm())

        def on_train_start(self, trainer, pl_module):
            assert trainer.optimizers[0].defaults["fused"]

    clipping = module.configure_gradient_clipping

    def clip_and_measure(*args, **kwargs):
        clipping(*args, **kwargs)
        after.append(norm())

    module.configure_gradient_clipping = clip_and_measure
    batches = [padded_stories([9, 4, 7]), padded_stories([5, 12])]
    trainer = quiet_trainer(max_steps=3, precision="bf16-mixed", gradient_clip_val=clip, callbacks=[Norms()])
    trainer.fit(module, DataLoader(batches, batch_size=None))
    assert len(before) == len(after) == 3
    assert min(before) > clip and max(after) <= clip * (1 + 1e-4)


def test_a_fused_adamw_refuses_to_clip_scaled_gradients():
    from types import SimpleNamespace

    module = CausalLMModule(**TINY, fused_optimizer=True)
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("bf16-mixed", "cpu")
    plugin.scaler = object()  # as 16-mixed has
    module._trainer = SimpleNamespace(precision_plugin=plugin)
    with pytest.raises(ConfigError, match="cannot clip gradients under 16-mixed"):
        module.configure_gradient_clipping(module.make_optimizer(), 1.0, "norm")
    with pytest.raises(ConfigError, match="--model.fused_optimizer must be true, false or None"):
        CausalLMConfig(preset="tiny", fused_optimizer="yes")


@pytest.mark.parametrize("pack", [False, True])
def test_rows_padded_to_a_multiple_give_the_same_loss(pack):
    # Padding every batch to a multiple of 16 tokens (64 on a GPU by default) bounds the shapes a compiled model
    # sees; padding is left out of the loss, so the loss and the count of predicted tokens do not change.
    torch.manual_seed(0)
    plain = CausalLMModule(**TINY, pack=pack, pad_token_id=1, pad_to_multiple=1).eval()
    padded = CausalLMModule(**TINY, pack=pack, pad_token_id=1, pad_to_multiple=16).eval()
    padded.load_state_dict(plain.state_dict())
    batch = padded_stories([17, 3, 9, 12, 5, 2, 20])
    ready, wide = plain.host_batch(batch), padded.host_batch(batch)
    assert ready["input_ids"].shape[1] == 20 and wide["input_ids"].shape[1] == 32
    wide_as_can_be = CausalLMModule(**TINY, pad_to_multiple=1000)
    assert wide_as_can_be.host_batch(batch)["input_ids"].shape[1] == wide_as_can_be.max_seq_len < 1000  # the context
    with torch.no_grad():
        loss, n = plain.token_loss(ready)
        loss_wide, n_wide = padded.token_loss(wide)
    assert n == n_wide == 61
    torch.testing.assert_close(loss_wide, loss, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="--model.pad_to_multiple must be a positive integer"):
        CausalLMConfig(preset="tiny", pad_to_multiple=0)


def test_right_padded_rows_go_without_a_mask_and_keep_their_loss():
    # Right padding needs no attention mask for the loss (causal attention never reaches the padding after a
    # story); without one, attention takes its causal kernel and transformers never reads a mask back.
    from lit_modules.causal_lm import right_padded

    torch.manual_seed(0)
    module = CausalLMModule(**TINY, pad_token_id=1).eval()
    batch = padded_stories([17, 3, 9, 12, 5, 2, 20])
    assert right_padded(batch["attention_mask"])
    ready = module.host_batch(batch)
    assert "attention_mask" not in ready and ready[PREDICTED] == 61
    left = {k: v.flip(1) for k, v in batch.items()}  # the same stories, padded on the left
    assert not right_padded(left["attention_mask"])
    assert torch.equal(module.host_batch(left)["attention_mask"], left["attention_mask"])  # kept
    gap = batch["attention_mask"].clone()
    gap[0, 3] = 0  # a hole inside a story
    assert not right_padded(gap)
    with torch.no_grad():
        loss, n = module.token_loss(ready)
        masked = module.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    assert n == 61
    torch.testing.assert_close(loss, masked, atol=1e-6, rtol=1e-6)


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that read a tensor's value back to the host (on a GPU: a wait for the device)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("preset", ["gpt2-tiny", "tiny"])
@pytest.mark.parametrize("pack", [False, True])
def test_a_training_step_reads_back_only_what_transformers_needs_to_tell_packing(preset, pack, caplog):
    # A read inside the step makes the host wait for the device at every eager step on a GPU. GPT-2 looked
    # for padding in the ids of every unmasked batch (to warn about it): gone. What is left in eager mode, one
    # story per row: transformers' check of the position ids for packed rows (skipped when compiled).
    torch.manual_seed(0)
    module = CausalLMModule(**{**TINY, "preset": preset}, pack=pack, pad_token_id=1)
    ready = module.host_batch(padded_stories([9, 4, 7]))
    reads = _HostReads()
    with caplog.at_level("WARNING"), reads:
        loss, _ = module.token_loss(ready)
        loss.backward()
    assert reads.count == (0 if pack else 1)
    assert "attention_mask" not in caplog.text


def test_batches_for_a_gpu_are_page_locked_before_the_copy(monkeypatch):
    # A copy from pageable memory makes the host wait for the GPU's queue; every tensor of a prepared batch
    # (new ones too: padded, packed) is page-locked first. Simulated: the module believes it is on a GPU.
    pinned = []

    def pin(self):
        pinned.append(tuple(self.shape))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a: False)
    for pack in (False, True):
        pinned.clear()
        module = CausalLMModule(**TINY, pack=pack, pad_token_id=1)
        module._device = torch.device("cuda", 0)
        ready = module.on_before_batch_transfer(padded_stories([17, 3, 9]), 0)
        assert len(pinned) == sum(isinstance(v, torch.Tensor) for v in ready.values()) >= 2
        assert ready["input_ids"].shape[1] == 64  # padded to the GPU's multiple


def test_under_cuda_graphs_each_forward_starts_a_graph_step_and_the_loss_is_copied_out(monkeypatch):
    torch.manual_seed(0)
    module = CausalLMModule(**TINY, pad_token_id=1).eval()
    marks, outputs = [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    forward = module.model.forward

    def spy(*args, **kwargs):
        outputs.append(forward(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(module.model, "forward", spy)
    batch = module.host_batch(padded_stories([7, 5]))
    with torch.no_grad():
        plain, _ = module.token_loss(batch)
        assert marks == [] and plain is outputs[-1].loss  # off by default: nothing added
        module.cuda_graph_steps = True
        copied, _ = module.token_loss(batch)
    assert marks == [1] and copied is not outputs[-1].loss  # a copy, outside the graphs' memory
    torch.testing.assert_close(copied, plain)


def test_the_module_keeps_its_sampler_between_chunks_and_frees_it_when_sampling_ends():
    from samplers.story_sampler import SamplingConfig

    torch.manual_seed(0)
    module = CausalLMModule(CausalLMConfig(preset="gpt2-tiny", vocab_size=64, max_seq_len=16), bos_token_id=0,
                            eos_token_id=0, pad_token_id=1)  # fmt: skip
    module.configure_sampling(SamplingConfig(batch_size=4))
    first = module.sample(6, torch.Generator().manual_seed(1))
    sampler = module._sampler
    module.sample(6, torch.Generator().manual_seed(2))
    assert module._sampler is sampler and sampler._engines  # one decoder for every chunk
    module.end_sampling()
    assert module._sampler is None and not sampler._engines
    again = module.sample(6, torch.Generator().manual_seed(1))
    assert (again["tokens"] == first["tokens"]).all()
    module.configure_sampling(SamplingConfig(batch_size=2))  # new settings: a new sampler
    assert module._sampler is None


def test_a_diverged_model_is_refused_before_it_is_sampled():
    from collapse.errors import UserError
    from samplers.story_sampler import SamplingConfig

    module = CausalLMModule(CausalLMConfig(preset="gpt2-tiny", vocab_size=64, max_seq_len=16), bos_token_id=0,
                            eos_token_id=0, pad_token_id=1)  # fmt: skip
    module.configure_sampling(SamplingConfig(batch_size=4))
    assert module.sample(2, torch.Generator().manual_seed(0))["lengths"].shape == (2,)
    with torch.no_grad():
        next(module.model.parameters())[0, 0] = float("nan")  # as after a step with a far too high learning rate
    with pytest.raises(UserError, match=r"NaN or inf in 1 of its \d+ weight tensors: its training diverged"):
        module.sample(2, torch.Generator().manual_seed(0))


def test_an_attention_kernel_the_model_or_machine_cannot_train_with_is_refused_before_training():
    from lit_modules.causal_lm import check_attention, model_config

    def check(on_gpu: bool, **cfg) -> None:
        config = CausalLMConfig(**{**TINY, **cfg})
        check_attention(config, model_config(config), on_gpu)

    for name in ("sdpa", "eager"):
        check(False, attn_implementation=name)
    check(True, attn_implementation="flex_attention")  # a Llama on a GPU
    with pytest.raises(ConfigError, match="flex_attention trains only on a GPU"):
        check(False, attn_implementation="flex_attention")
    with pytest.raises(ConfigError, match="flex_attention: GPT2LMHeadModel does not support") as gpt2:
        check(True, preset="gpt2-tiny", attn_implementation="flex_attention")
    assert "Please" not in str(gpt2.value)  # transformers' advice to file an issue is dropped
    with pytest.raises(ConfigError, match="flash_attention_2 runs only on a GPU"):
        check(False, attn_implementation="flash_attention_2")


def test_flex_attention_is_refused_for_a_model_with_attention_dropout(tmp_path):
    from lit_modules.causal_lm import check_attention, model_config

    llama = transformers.AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        attention_dropout=0.1,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(llama).save_pretrained(tmp_path)
    config = CausalLMConfig(vocab_size=64, init_from=str(tmp_path), attn_implementation="flex_attention")
    with pytest.raises(ConfigError, match="has no attention dropout, and this model's is 0.1"):
        check_attention(config, model_config(config), on_gpu=True)


@pytest.mark.slow
def test_a_compiled_model_takes_flex_block_masks_of_any_shape_and_keeps_the_loss(fresh_dynamo):
    # The recipe's GPU defaults compile the model; packed rows change shape from batch to batch, and so does
    # their BlockMask. Forward only (no flex backward on a CPU): same losses as one story per row, and the
    # second shape gives one shape-generic graph that the later shapes reuse.
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    plain = CausalLMModule(**TINY, pad_token_id=1).eval()
    flex = CausalLMModule(**TINY, attn_implementation="flex_attention", pack=True, pad_token_id=1).eval()
    flex.load_state_dict(plain.state_dict())
    flex.model.compile()
    graphs = counters["stats"]["unique_graphs"]
    for lengths in ([17, 3, 9, 12, 5, 2, 20], [30, 4, 7, 9], [25, 25, 25, 1, 2, 3, 40, 11], [50, 8, 8]):
        batch = padded_stories(lengths)
        with torch.no_grad():
            torch.testing.assert_close(flex.token_loss(batch)[0], plain.token_loss(batch)[0], atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 2


def test_shape_buckets_for_cuda_graphs_by_hand():
    from lit_modules.causal_lm import graph_rows, graph_width

    assert [graph_rows(r) for r in (1, 7, 8, 9, 11, 16, 17, 21, 33)] == [1, 7, 8, 10, 12, 16, 20, 24, 40]
    assert all(r <= graph_rows(r) < 1.25 * r for r in range(1, 300))  # under a fifth padding rows
    assert [graph_width(w, 2048, packed=True) for w in (5, 128, 129, 520, 1500)] == [128, 128, 256, 1024, 2048]
    assert [graph_width(w, 2048, packed=False) for w in (5, 65, 256, 257, 520, 1030)] == [64, 128, 256, 320, 640, 1280]
    assert all(w <= graph_width(w, 2048, packed=False) < 1.25 * w for w in range(256, 2049))
    assert graph_width(300, 320, packed=True) == 320 and graph_width(300, 300, packed=False) == 300  # the context


@pytest.mark.parametrize("pack", [False, True])
def test_under_cuda_graphs_batches_take_few_shapes_and_the_same_loss(pack, monkeypatch):
    # Each new input shape is a new CUDA graph recording: under reduce-overhead, rows are widened to a few widths
    # and packed batches get all-padding rows up to a few row counts; the loss and its count stay the same.
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    torch.manual_seed(0)
    plain = CausalLMModule(**TINY, pack=pack, pad_token_id=1, max_seq_len=160).eval()
    graphed = CausalLMModule(**TINY, pack=pack, pad_token_id=1, max_seq_len=160, pad_to_multiple=64).eval()
    graphed.load_state_dict(plain.state_dict())
    graphed.cuda_graph_steps = True
    gen = torch.Generator().manual_seed(5)
    shapes: dict[bool, set] = {False: set(), True: set()}
    for i in range(24):
        lengths = torch.randint(2, 160, (16,), generator=gen).tolist()
        batch = padded_stories(lengths)
        for module in (plain, graphed):
            ready = module.host_batch(batch)
            shapes[module.cuda_graph_steps].add(tuple(ready["input_ids"].shape))
        if i < 3:
            with torch.no_grad():
                (loss, n), (loss_g, n_g) = plain.token_loss(batch), graphed.token_loss(batch)
            assert n == n_g
            torch.testing.assert_close(loss_g, loss, atol=1e-5, rtol=1e-5)
    assert len(shapes[True]) < len(shapes[False]) / 2
    rows = {r for r, _ in shapes[True]}
    widths = {w for _, w in shapes[True]}
    assert widths <= ({128, 160} if pack else {64, 128, 160})
    if not pack:
        assert rows == {16}  # one story per row: the batch size, as it was
