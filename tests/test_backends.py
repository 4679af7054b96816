"""Sampling backends of the TinyStories recipe: any local causal LM checkpoint, native or through generate()."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from collapse.cli import parse_config
from collapse.errors import ConfigError
from datamodules.tokenizer import EOT_ID, PAD_ID
from recipes.tinystories import TinyStoriesConfig, main, resolve

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tinystories.py"
VOCAB = 320
POSITIONS = 64
IDS = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, "pad_token_id": PAD_ID}
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
CHECKPOINTS = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=POSITIONS, **IDS)
    ),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, **SMALL, **IDS)),
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_key_value_heads=2, **SMALL, **IDS)
    ),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_key_value_heads=2, **SMALL, **IDS)
    ),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=VOCAB, max_position_embeddings=POSITIONS, **SMALL, **IDS)
    ),
}
NATIVE = {"gpt2", "llama", "mistral", "qwen2"}

FLAGS = [
    "--data.num_real", "24",
    "--data.num_test", "8",
    "--data.vocab_size", str(VOCAB),
    "--model.vocab_size", str(VOCAB),
    "--model.warmup_steps", "1",
    "--trainer.accelerator", "cpu",
    "--trainer.max_epochs", "1",
    "--batch_size", "8",
    "--sample_batch_size", "12",
    "--sampling.batch_size", "8",
    "--wandb.mode", "disabled",
]  # fmt: skip


def checkpoint(folder: Path, kind: str) -> Path:
    """A tiny random ``kind`` causal LM saved with save_pretrained (offline, no hub)."""
    torch.manual_seed(0)
    CHECKPOINTS[kind]().save_pretrained(folder / kind)
    return folder / kind


def config(out: Path, *extra: str) -> TinyStoriesConfig:
    return parse_config(TinyStoriesConfig, ["--out_dir", str(out), *FLAGS, *extra])


@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_dry_run_tells_the_backend_of_each_checkpoint(tmp_path, kind, capsys):
    ckpt = checkpoint(tmp_path, kind)
    out = tmp_path / "run"
    assert main(config(out, "--model.init_from", str(ckpt), "--dry_run", "true")) is None
    printed = capsys.readouterr().out
    assert f"sampling backend: {'native' if kind in NATIVE else 'hf'}" in printed
    assert f"context: {POSITIONS}" in printed  # the checkpoint's position limit, below the published 2,048
    main(config(out, "--model.init_from", str(ckpt), "--dry_run", "true", "--sampling.backend", "hf"))
    assert "sampling backend: hf" in capsys.readouterr().out
    assert not out.exists()
    with pytest.raises(ConfigError, match=f"--data.max_seq_len must be at most {POSITIONS} .*--model.init_from"):
        resolve(config(out, "--model.init_from", str(ckpt), "--data.max_seq_len", str(POSITIONS + 1)))


def test_an_encoder_that_would_see_the_next_token_is_refused_and_its_decoder_form_taken(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    shape = {"vocab_size": VOCAB, "max_position_embeddings": POSITIONS, **SMALL, **IDS}
    BertLMHeadModel(BertConfig(**shape)).save_pretrained(tmp_path / "bert")  # bidirectional: is_decoder false
    with pytest.raises(ConfigError, match='a bert model lets every token attend .*"is_decoder": true'):
        resolve(config(tmp_path / "run", "--model.init_from", str(tmp_path / "bert")))
    BertLMHeadModel(BertConfig(**shape, is_decoder=True)).save_pretrained(tmp_path / "bert_decoder")
    cfg = resolve(config(tmp_path / "run", "--model.init_from", str(tmp_path / "bert_decoder")))
    assert cfg.model.init_from == str(tmp_path / "bert_decoder")


ENCODER_SHAPE = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 64}  # fmt: skip
XLM_SHAPE = {"vocab_size": 50, "emb_dim": 32, "n_layers": 1, "n_heads": 2}
XLNET_SHAPE = {"vocab_size": 50, "d_model": 32, "n_layer": 1, "n_head": 2, "d_inner": 64}


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("bert", {}), ("bert", {"is_decoder": True}), ("roberta", {}), ("roberta", {"is_decoder": True}),
        ("bert-generation", {}), ("bert-generation", {"is_decoder": True}),
        ("xlm", {**XLM_SHAPE, "is_decoder": True}), ("xlm", {**XLM_SHAPE, "causal": True}), ("xlnet", XLNET_SHAPE),
        ("gpt2", {"vocab_size": 50, "n_embd": 32, "n_layer": 1, "n_head": 2}), ("llama", {}),
    ],
)  # fmt: skip
def test_the_rule_for_models_that_attend_ahead_matches_what_they_do(kind, settings):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_modules.causal_lm import attends_ahead

    shape = settings if "vocab_size" in settings else {**ENCODER_SHAPE, **settings}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **shape)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    later = ids.clone()
    later[0, 3] = 9  # only the last token differs: a causal model's first position cannot tell
    with torch.no_grad():
        sees = not torch.allclose(model(input_ids=ids).logits[0, 0], model(input_ids=later).logits[0, 0])
    assert attends_ahead(model.config) == sees


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta", "camembert", "bert", "gpt2", "llama"])
def test_the_position_limit_is_the_longest_input_the_model_takes(kind):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_modules.causal_lm import position_limit

    if kind == "gpt2":
        config = AutoConfig.for_model(kind, vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=20)
    else:
        shape = {**ENCODER_SHAPE, "max_position_embeddings": 20}
        config = AutoConfig.for_model(kind, **shape, **({"is_decoder": True} if kind != "llama" else {}))
    model = AutoModelForCausalLM.from_config(config).eval()
    limit = position_limit(model.config)  # RoBERTa's positions start after its padding id: 18 of 20
    with torch.no_grad():
        assert model(input_ids=torch.full((1, limit), 5)).logits.shape[1] == limit
    if kind != "llama":  # rotary positions have no table to run out of
        with pytest.raises((IndexError, RuntimeError)), torch.no_grad():
            model(input_ids=torch.full((1, limit + 1), 5))


def test_native_backend_of_an_unsupported_checkpoint_is_refused(tmp_path):
    ckpt = checkpoint(tmp_path, "gpt_neox")
    with pytest.raises(ConfigError, match="--sampling.backend native: the native decoder runs"):
        resolve(config(tmp_path / "run", "--model.init_from", str(ckpt), "--sampling.backend", "native"))


def test_a_gpu_packs_and_compiles_the_preset_layouts_by_default_and_config_records_it(tmp_path, monkeypatch):
    import recipes.tinystories as recipe

    def fast(*extra: str) -> tuple[bool, bool]:
        cfg = resolve(config(tmp_path / "run", *extra))
        recorded = recipe.config_dict(cfg)
        assert (recorded["model"]["pack"], recorded["trainer"]["compile"]) == (cfg.model.pack, cfg.trainer.compile)
        return cfg.model.pack, cfg.trainer.compile

    ckpts = {kind: str(checkpoint(tmp_path, kind)) for kind in CHECKPOINTS}
    assert fast("--model.init_from", ckpts["llama"]) == (False, False)  # a CPU: neither
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve() only asks; nothing runs on a GPU
    monkeypatch.setattr(recipe, "has_triton", lambda: True)
    gpu = ("--trainer.accelerator", "auto")
    expected = {"gpt2": (True, True), "llama": (True, True), "mistral": (False, False), "qwen2": (False, False)}
    expected["gpt_neox"] = (False, False)  # sampled through generate(), which would call the compiled forward
    assert {kind: fast(*gpu, "--model.init_from", path) for kind, path in ckpts.items()} == expected
    assert fast(*gpu) == (True, True)  # the gpt2-2m preset
    assert fast(*gpu, "--model.init_from", ckpts["llama"], "--sampling.backend", "hf") == (True, False)
    flex = ("--model.attn_implementation", "flex_attention")
    assert fast(*gpu, "--model.init_from", ckpts["llama"], *flex) == (True, True)  # a block-sparse mask
    with pytest.raises(ConfigError, match="flex_attention: GPT2LMHeadModel does not support"):
        fast(*gpu, *flex)  # refused before anything is trained
    flash = ("--model.attn_implementation", "flash_attention_2")
    if importlib.util.find_spec("flash_attn") is None:  # the packages these tests install have none
        with pytest.raises(ConfigError, match="flash_attention_2: FlashAttention2 has been toggled on"):
            fast(*gpu, *flash)
    else:
        assert fast(*gpu, *flash) == (False, True)  # no mask of each story's own tokens: no packing
    assert fast(*gpu, "--model.pack", "false", "--trainer.compile", "reduce-overhead") == (False, "reduce-overhead")
    assert fast(*gpu, "--model.init_from", ckpts["qwen2"], "--model.pack", "true") == (True, False)  # when asked
    monkeypatch.setattr(recipe, "has_triton", lambda: False)
    assert fast(*gpu) == (True, False)  # torch.compile cannot make GPU kernels without triton


def run_recipe(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "MODEL_COLLAPSE_CACHE": str(tmp_path / "c")}
    cmd = [sys.executable, str(RECIPE), "--out_dir", str(tmp_path / "run"), *FLAGS, *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_a_model_that_cannot_be_sampled_is_refused_in_one_line_before_training(tmp_path):
    folder = tmp_path / "t5"
    config = T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    T5ForConditionalGeneration(config).save_pretrained(folder)  # a whole checkpoint: config and weights
    proc = run_recipe(tmp_path, "--model.init_from", str(folder))
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'t5' model cannot be sampled" in errors[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "gpt_neox"])
def test_a_checkpoint_trains_and_samples_two_generations(tmp_path, kind):
    # Qwen2 used to train a whole generation and then fail to sample; GPT-NeoX samples through generate().
    ckpt = checkpoint(tmp_path, kind)
    out = tmp_path / "run"
    result = main(config(out, "--model.init_from", str(ckpt), "--workflow", "replace", "--generations", "2"))
    assert result.committed == [0, 1]
    lengths = [np.load(p) for p in sorted(out.glob("gen_000/**/lengths.npy"))]
    assert lengths and all(((x >= 2) & (x <= POSITIONS)).all() for x in lengths)
    stories = sorted(out.glob("gen_000/**/stories.txt"))
    assert stories and stories[0].read_text().strip()
    data = json.loads((out / "data.json").read_text())
    assert data["max_seq_len"] == POSITIONS
