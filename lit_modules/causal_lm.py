"""Causal transformer language models for the TinyStories modality, built from configs with ``transformers``.

The TinyStories experiment of Gerstgrasser et al. ("Is Model Collapse Inevitable?") pretrains a fresh
causal transformer from scratch in every generation: GPT-2 (9M parameters) and Llama 2 style models
(12M, 42M, 126M), all with an 8,000-token vocabulary. :data:`PRESETS` gives architectures whose
parameter counts equal the published ones exactly (:data:`PUBLISHED_PARAMETERS`, unique parameters,
tied embeddings counted once); the models are built from a ``transformers`` config, with nothing
downloaded. Alternatively every generation starts from one local Hugging Face checkpoint
(``init_from``), the fine-tuning setting of Kazdan et al.

Training minimises the mean next-token cross-entropy in nats over the predicted tokens, the
shifted loss of the Hugging Face model (labels -100 are ignored):

    loss = -1/N sum_{b, t : labels[b, t+1] != -100} log p(labels[b, t+1] | input_ids[b, :t+1]),

with N the number of predicted tokens of the batch. ``<stage>_loss`` is logged with weight N, so
its epoch value is the per-token mean over the whole stage, across DDP ranks too, and the test
perplexity is ``exp(test_loss)`` (computed afterwards from the logged value: the exp of batch means
would not average to it). The optimiser is AdamW with linear warmup then cosine decay to 10% of
the learning rate over the fit (:func:`lr_factor`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from collapse.contract import SamplingModule
from collapse.errors import ConfigError, UserError, first_line
from lit_modules import config_with_overrides

IGNORE_INDEX = -100
"""Label of positions without a loss (the Hugging Face convention)."""
PREDICTED = "num_predicted"
"""Batch key of the predicted-token count, counted on the host (:meth:`CausalLMModule.host_batch`)."""
FINAL_LR_RATIO = 0.1
"""The cosine schedule decays the learning rate to this fraction of ``lr``."""
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
"""Accepted values of :attr:`CausalLMConfig.attn_implementation`."""

# Each preset: the transformers ``model_type`` plus keyword arguments of its config class; the
# vocabulary size comes from CausalLMConfig.vocab_size. Parameter counts with V = 8000 (d: width,
# L: layers, f: feed-forward width, P: positions):
#
#   GPT-2 (tied lm_head, biases, learned positions, LayerNorm with gain and bias):
#     V d + P d + L (12 d^2 + 13 d) + 2 d
#     per layer: qkv 3d^2 + 3d, attn proj d^2 + d, mlp 2 * 4d^2 + 4d + d, two LayerNorms 4d,
#     i.e. 12 d^2 + 13 d; final LayerNorm 2 d.
#     gpt2-9m: 8000*256 + 2048*256 + 8*(12*256^2 + 13*256) + 2*256 = 8,890,880.
#   Llama (untied lm_head, no biases, RoPE without parameters, RMSNorm with gain only):
#     2 V d + L (4 d^2 + 3 d f + 2 d) + d
#     per layer: q, k, v, o 4 d^2 (num_key_value_heads = num_attention_heads), SwiGLU gate/up/down
#     3 d f, two RMSNorms 2 d; final RMSNorm d.
#     llama2-12m:  2*8000*256 + 8*(4*256^2 + 3*256*1024 + 2*256) + 256 = 12,488,960.
#     llama2-42m:  2*8000*512 + 8*(4*512^2 + 3*512*2048 + 2*512) + 512 = 41,755,136.
#     llama2-126m: 2*8000*768 + 12*(4*768^2 + 3*768*3072 + 2*768) + 768 = 125,553,408.
# The GPT-2 dropouts are the transformers defaults (0.1), the Llama ones 0 (also the defaults).
_LLAMA = {
    "model_type": "llama",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
}
_GPT2 = {
    "model_type": "gpt2",
    "n_positions": 2048,
    "tie_word_embeddings": True,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
}
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-9m": {**_GPT2, "n_embd": 256, "n_layer": 8, "n_head": 8, "n_inner": 1024},
    "llama2-12m": {
        **_LLAMA,
        "hidden_size": 256,
        "num_hidden_layers": 8,
        "intermediate_size": 1024,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "llama2-42m": {
        **_LLAMA,
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "intermediate_size": 2048,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "llama2-126m": {
        **_LLAMA,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
    },
    # A laptop-sized GPT-2 (not from the paper): the TinyStories recipe's CPU default, 1,882,880 parameters
    # at V = 8000 (8000*128 + 512*128 + 4*(12*128^2 + 13*128) + 2*128); no dropout, since CPU runs are short.
    "gpt2-2m": {
        **_GPT2,
        "n_embd": 128,
        "n_layer": 4,
        "n_head": 4,
        "n_inner": 512,
        "n_positions": 512,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    },
    # Test-sized models (not from the paper).
    "tiny": {
        **_LLAMA,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
    },
    "gpt2-tiny": {**_GPT2, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 512},
}
"""Architectures by name: ``model_type`` (a transformers model type) and the config's keyword arguments."""

DEFAULT_OPTIMISATION = (5e-4, 100)
"""(peak learning rate, warmup steps) of the published-size presets and of checkpoints (``init_from``)."""
PRESET_OPTIMISATION: dict[str, tuple[float, int]] = {
    "gpt2-2m": (2e-3, 10),
    "tiny": (2e-3, 10),
    "gpt2-tiny": (2e-3, 10),
}
"""Presets whose default (peak learning rate, warmup steps) differ: the small models of short CPU runs."""

PUBLISHED_CONTEXT = 2048
"""Context length of the published TinyStories models (the presets' position limit): their runs train and sample
whole stories up to this many tokens."""
PRESET_CONTEXT: dict[str, int] = {"gpt2-2m": 256, "tiny": 256, "gpt2-tiny": 256}
"""Presets whose default context is shorter than :data:`PUBLISHED_CONTEXT`: the laptop and test models, whose
short CPU runs keep a short context (their position limit stays 512)."""

PUBLISHED_PARAMETERS: dict[str, int] = {
    "gpt2-9m": 8_890_880,
    "llama2-12m": 12_488_960,
    "llama2-42m": 41_755_136,
    "llama2-126m": 125_553_408,
}
"""Parameter counts of the published TinyStories models (vocabulary 8,000); the presets reproduce them exactly."""


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""The weight files of a ``save_pretrained`` folder (one of them, or the index of its shards)."""


@dataclass
class CausalLMConfig:
    """Settings of the causal language model (the ``--model.*`` flags)."""

    preset: str = "gpt2-9m"
    """Architecture, a key of :data:`PRESETS`; ignored when ``init_from`` is set."""
    vocab_size: int = 8000
    """Vocabulary size (of the tokenizer); must equal the checkpoint's with ``init_from``."""
    max_seq_len: int | None = None
    """Context length used for training and sampling, at most the model's position limit; default: that limit."""
    lr: float | None = None
    """Peak AdamW learning rate (after warmup; cosine-decayed to 10% of it over the fit); default: the preset's
    (:data:`PRESET_OPTIMISATION`: 5e-4 for the published sizes, 2e-3 for the small CPU presets)."""
    weight_decay: float = 0.1
    """AdamW weight decay of the matrices (embeddings and output head included; not of biases or norm gains)."""
    warmup_steps: int | None = None
    """Optimizer steps of linear learning-rate warmup; default: the preset's (100, or 10 for the small presets)."""
    init_from: str | None = None
    """A local Hugging Face checkpoint directory (with config.json) every generation starts from; None: from scratch."""
    attn_implementation: str = "sdpa"
    """Attention kernel of transformers: one of :data:`ATTN_IMPLEMENTATIONS`."""
    pack: bool | None = None
    """Pack the stories of a batch several to a row (first-fit, by decreasing length), each attending only
    to itself (an explicit block-diagonal causal mask, positions restarting at 0): fewer padded tokens, the
    same loss over the same predicted tokens. Needs ``attn_implementation`` sdpa or eager. Default (None):
    on when the model is on a CUDA device and :func:`packs_by_default` holds for it, off elsewhere."""
    pad_to_multiple: int | None = None
    """Pad each batch's rows to a multiple of this many tokens (at most the context), so a compiled model sees
    a few shapes instead of one per longest story; padding is left out of the loss, so the loss is the same.
    Default: 64 when the model is on a CUDA device, 1 (the longest story of the batch) elsewhere."""
    fused_optimizer: bool | None = None
    """AdamW's fused kernels (a few kernels per step for all parameters); default: on when the parameters are
    on a CUDA device and the precision is not 16-mixed (whose gradient scaler a fused step would unscale
    after clipping). Gradient clipping (``--trainer.gradient_clip_val``) still applies."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"--model.preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        if not _is_positive_int(self.vocab_size):
            raise ConfigError(f"--model.vocab_size must be a positive integer, got {self.vocab_size!r}")
        if self.max_seq_len is not None and not _is_positive_int(self.max_seq_len):
            raise ConfigError(f"--model.max_seq_len must be a positive integer or None, got {self.max_seq_len!r}")
        if self.init_from is None and self.max_seq_len is not None:
            preset = PRESETS[self.preset]
            limit = preset.get("max_position_embeddings", preset.get("n_positions"))
            if self.max_seq_len > limit:
                raise ConfigError(
                    f"--model.max_seq_len must be at most {limit} (the position limit of preset {self.preset!r}), "
                    f"got {self.max_seq_len}"
                )
        chosen = PRESET_OPTIMISATION.get(self.preset) if self.init_from is None else None
        default_lr, default_warmup = chosen or DEFAULT_OPTIMISATION
        if self.lr is None:
            self.lr = default_lr
        if self.warmup_steps is None:
            self.warmup_steps = default_warmup
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--model.lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)) or (
            self.weight_decay < 0
        ):
            raise ConfigError(f"--model.weight_decay must be a non-negative number, got {self.weight_decay!r}")
        if not (_is_positive_int(self.warmup_steps) or (isinstance(self.warmup_steps, int) and self.warmup_steps == 0)):
            raise ConfigError(f"--model.warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"--model.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"
            )
        if self.pack is not None and not isinstance(self.pack, bool):
            raise ConfigError(f"--model.pack must be true, false or None, got {self.pack!r}")
        if self.pack and self.attn_implementation not in PACK_ATTENTION:
            raise ConfigError(
                f"--model.pack true needs --model.attn_implementation sdpa, eager or flex_attention (a mask of "
                f"each story's own tokens), "
                f"got {self.attn_implementation!r}"
            )
        if self.pad_to_multiple is not None and not _is_positive_int(self.pad_to_multiple):
            raise ConfigError(
                f"--model.pad_to_multiple must be a positive integer or None, got {self.pad_to_multiple!r}"
            )
        if self.fused_optimizer is not None and not isinstance(self.fused_optimizer, bool):
            raise ConfigError(f"--model.fused_optimizer must be true, false or None, got {self.fused_optimizer!r}")
        if self.init_from is not None:
            path = Path(self.init_from).expanduser()
            if not path.is_dir():
                what = "is a file" if path.exists() else "does not exist"
                raise ConfigError(f"--model.init_from must be a local checkpoint directory; {path} {what}")
            if not (path / "config.json").is_file():
                raise ConfigError(
                    f"--model.init_from must be a Hugging Face checkpoint directory; {path} has no config.json"
                )
            if not any((path / name).is_file() for name in WEIGHT_FILES):
                raise ConfigError(
                    f"--model.init_from {path} holds no weights (none of {', '.join(WEIGHT_FILES)}); a "
                    "save_pretrained folder has them"
                )
            self.init_from = str(path)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


PADDED_POSITIONS = frozenset(
    {"roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod"}
)
"""Families whose position ids start after the padding id (``pad_token_id + 1``), as RoBERTa's do."""


def position_limit(config: PretrainedConfig) -> int:
    """Longest sequence a model of ``config`` handles: ``max_position_embeddings`` (``n_positions`` for GPT-2),
    less the ``pad_token_id + 1`` positions that RoBERTa-style models (:data:`PADDED_POSITIONS`) never use."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value is not None:
            skipped = (
                (int(getattr(config, "pad_token_id", None) or 0) + 1) if config.model_type in PADDED_POSITIONS else 0
            )
            return int(value) - skipped
    raise ValueError(f"cannot tell the position limit of a {type(config).__name__}")


def default_context(cfg: CausalLMConfig) -> int:
    """The context length of a run that sets none: ``cfg.max_seq_len`` if set, else the preset's.

    The published presets (and checkpoints) use :data:`PUBLISHED_CONTEXT`, capped at the model's position
    limit; the laptop and test presets :data:`PRESET_CONTEXT`. Reads only the config (of ``init_from`` too).
    """
    if cfg.max_seq_len is not None:
        return cfg.max_seq_len
    if cfg.init_from is None and cfg.preset in PRESET_CONTEXT:
        return PRESET_CONTEXT[cfg.preset]
    return min(PUBLISHED_CONTEXT, position_limit(model_config(cfg)))


FAST_TRAINING_MODELS = ("gpt2", "llama")
"""Model types (``config.model_type``) that a GPU run packs and compiles by default: the presets' layouts,
whose packed loss the tests compare with the one-story-per-row loss and which were measured compiled on a GPU."""
FUSED_16_MIXED_CLIPPING = (
    "--model.fused_optimizer true cannot clip gradients under 16-mixed (the fused step unscales them after "
    "clipping): use bf16-mixed, --model.fused_optimizer false, or no --trainer.gradient_clip_val"
)
"""The refusal of a fused AdamW with clipping under 16-mixed (its gradient scaler)."""
PACK_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Values of ``attn_implementation`` that take the block-diagonal mask of packed rows: dense, (R, 1, T, T)
(:func:`story_mask`: sdpa, eager), or block-sparse (:func:`story_block_mask`: flex_attention, which skips the
blocks of keys outside each story instead of computing and masking them)."""


def packs_by_default(config: PretrainedConfig, attn_implementation: str, on_gpu: bool) -> bool:
    """Whether ``--model.pack`` unset means packing: on a GPU, for :data:`FAST_TRAINING_MODELS` with an attention
    kernel of :data:`PACK_ATTENTION` (other architectures may build their masks otherwise; they pack when asked)."""
    kind = getattr(config, "model_type", None)
    return bool(on_gpu and kind in FAST_TRAINING_MODELS and attn_implementation in PACK_ATTENTION)


CAUSAL_FLAGS = {"xlm": "causal", "flaubert": "causal"}
"""Encoder families made causal by a config flag other than ``is_decoder``."""
NEVER_CAUSAL = frozenset({"xlnet"})
"""Families ``AutoModelForCausalLM`` builds that attend to later tokens whatever their config says (permutation LM)."""


def causal_flag(config: PretrainedConfig) -> str | None:
    """The config flag that makes a model of ``config`` causal (``is_decoder`` for BERT, RoBERTa, ...; ``causal``
    for XLM), or None for a family that is causal by construction (GPT-2, Llama, ...) or never (XLNet)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = config.model_type
    if kind in CAUSAL_FLAGS:
        return CAUSAL_FLAGS[kind]
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES or kind == "bert-generation":
        return "is_decoder"
    return None


def attends_ahead(config: PretrainedConfig) -> bool:
    """Whether a model built by ``AutoModelForCausalLM`` with ``config`` (the built model's own config, which some
    classes change) lets each token attend to later ones: an encoder family whose :func:`causal_flag` is not set,
    or one that is never causal. The tests check this against the models' behaviour."""
    flag = causal_flag(config)
    return config.model_type in NEVER_CAUSAL or (flag is not None and not getattr(config, flag, False))


def check_attention(cfg: CausalLMConfig, config: PretrainedConfig, on_gpu: bool) -> None:
    """Refuse, before anything is trained, an ``attn_implementation`` that this model or machine cannot train with.

    Flex attention has no backward on a CPU and no attention dropout; the flash-attention kernels run only on a
    GPU. Then the model class must offer the kernel and its package must be installed: transformers' own checks,
    on the architecture built on the meta device (nothing allocated); and the model must be causal
    (:func:`attends_ahead`). ``config``: the model's transformers config (:func:`model_config`). Raises
    :class:`ConfigError`.
    """
    name = cfg.attn_implementation
    flag = f"--model.attn_implementation {name}"
    if name == "flex_attention" and not on_gpu:
        raise ConfigError(f"{flag} trains only on a GPU (torch has no flex attention backward on a CPU); use sdpa")
    if name.startswith("flash_attention") and not on_gpu:
        raise ConfigError(f"{flag} runs only on a GPU; use sdpa")
    try:
        with torch.device("meta"):
            built = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    except (ValueError, ImportError) as exc:  # transformers: unsupported by the class, or the package is missing
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason.split(". Please")[0].rstrip(".")  # drop the advice to file an issue with transformers
        raise ConfigError(f"{flag}: {reason}") from None
    if attends_ahead(built.config):
        kind, flag = built.config.model_type, causal_flag(built.config)
        fix = (
            f'unless its config.json says "{flag}": true, so it would learn to copy the next token; set that to '
            "train it as a causal LM"
            if flag is not None
            else "(it is not a causal LM), so it would learn to copy the next token; use a causal model"
        )
        raise ConfigError(
            f"--model.init_from {cfg.init_from}: a {kind} model lets every token attend to the tokens after it {fix}"
        )
    if name == "flex_attention":
        dropout = max(float(getattr(config, key, 0.0) or 0.0) for key in ("attention_dropout", "attn_pdrop"))
        if dropout > 0:
            raise ConfigError(f"{flag} has no attention dropout, and this model's is {dropout}; use sdpa")


def model_config(
    cfg: CausalLMConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PretrainedConfig:
    """The transformers config of the model ``cfg`` describes: from its preset, or read from ``init_from``.

    Preset models get exactly the given special-token ids (None stays None, replacing e.g. GPT-2's
    default 50256, which is outside an 8,000-token vocabulary). A checkpoint keeps its own ids
    unless one is given. Raises :class:`ConfigError` when the checkpoint's vocabulary size differs from
    ``cfg.vocab_size`` or ``cfg.max_seq_len`` exceeds its position limit; ``ValueError`` for an id
    outside the vocabulary.
    """
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    for name, value in ids.items():
        if value is not None and not (isinstance(value, int) and 0 <= value < cfg.vocab_size):
            raise ValueError(f"{name} must be None or an integer in [0, {cfg.vocab_size}), got {value!r}")
    if cfg.init_from is None:
        return AutoConfig.for_model(**PRESETS[cfg.preset], vocab_size=cfg.vocab_size, **ids)
    try:
        config = AutoConfig.from_pretrained(cfg.init_from, local_files_only=True)
    except Exception as exc:  # invalid JSON, no or an unknown model_type, a field of the wrong type: several types
        raise ConfigError(
            f"--model.init_from {cfg.init_from}: its config.json is not one transformers can read ({first_line(exc)})"
        ) from None
    if config.vocab_size != cfg.vocab_size:
        raise ConfigError(
            f"--model.vocab_size is {cfg.vocab_size} but the checkpoint in --model.init_from {cfg.init_from} "
            f"has vocab_size {config.vocab_size}; set --model.vocab_size={config.vocab_size} and use its tokenizer"
        )
    if cfg.max_seq_len is not None and cfg.max_seq_len > position_limit(config):
        raise ConfigError(
            f"--model.max_seq_len must be at most {position_limit(config)} (the position limit of the checkpoint "
            f"in --model.init_from {cfg.init_from}), got {cfg.max_seq_len}"
        )
    for name, value in ids.items():
        if value is not None:
            setattr(config, name, value)
    return config


def build_model(
    cfg: CausalLMConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> transformers.PreTrainedModel:
    """A causal LM: freshly initialised from ``cfg.preset``, or the weights of ``cfg.init_from`` (local files only).

    Built on the current default device (``with torch.device("meta"):`` builds a preset, or a checkpoint's
    architecture, without memory and without reading weights).
    Loaded checkpoints are cast to float32 (the training precision is the Trainer's business). The
    special-token ids go to the model config and its generation config; see :func:`model_config`.
    """
    config = model_config(cfg, bos_token_id, eos_token_id, pad_token_id)
    # On the meta device (a dry run) a checkpoint's architecture is built from its config: no weights read.
    if cfg.init_from is None or torch.empty(0).device.type == "meta":
        model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.init_from, config=config, local_files_only=True, attn_implementation=cfg.attn_implementation
            )
        except Exception as exc:  # damaged files, weights of another shape: transformers raises several types
            reason = (
                "its weights do not have the shapes its config.json describes"
                if "mismatched" in str(exc)
                else f"its weights cannot be loaded ({first_line(exc)})"
            )
            raise UserError(f"--model.init_from {cfg.init_from}: {reason}") from None
        model = model.to(torch.float32).train()  # from_pretrained returns eval mode (dropout off)
    if getattr(model, "loss_type", "ForCausalLM") is None:
        # transformers >= 4.46 picks the loss from the class name; "GPT2LMHeadModel" matches none and would
        # warn once before falling back to the same shifted causal-LM cross-entropy. Name it instead.
        model.loss_type = "ForCausalLM"
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(generation, name, getattr(config, name, None))
    for module in model.modules():
        if isinstance(module, transformers.PreTrainedModel):
            # Right-padded rows go without an attention mask on purpose (CausalLMModule.host_batch). Some
            # architectures (GPT-2) look for padding in the ids of every such batch to warn about it: a read
            # back to the host, which on a GPU makes every eager step wait for the device, and a warning that
            # would make a user doubt a loss that is right.
            module.warn_if_padding_and_no_attention_mask = _padding_without_mask_is_intended
    return model


def check_checkpoint_weights(cfg: CausalLMConfig) -> None:
    """Refuse an ``--model.init_from`` checkpoint whose weight files cannot be this model's, before anything is
    trained or written: a safetensors file (or shard) whose header cannot be read, a tensor of another shape than
    the architecture of its config.json has, or no tensor with a name of that architecture; a ``.bin`` file that
    is neither a torch zip archive nor a pickle. Only headers are read (instant, whatever the model's size); the
    weights themselves are read when the model is built. Raises :class:`UserError`."""
    if cfg.init_from is None:
        return
    import json
    import zipfile

    folder = Path(cfg.init_from)
    with torch.device("meta"):  # the architecture of the checkpoint's config.json, nothing allocated
        model = AutoModelForCausalLM.from_config(model_config(cfg))
    prefix = f"{model.base_model_prefix}."
    ours = {name.removeprefix(prefix): tuple(t.shape) for name, t in model.state_dict().items()}
    files = [folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                shards = json.loads((folder / index).read_text())["weight_map"].values()
                files += [folder / shard for shard in sorted(set(shards))]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UserError(f"{folder / index}: not a weight index ({first_line(exc)})") from None
    theirs: dict[str, tuple[int, ...]] = {}
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:  # reads the header only
                    theirs |= {key.removeprefix(prefix): tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            except Exception as exc:  # safetensors raises its own error types for a damaged header
                raise UserError(f"{path}: cannot be read as safetensors weights ({first_line(exc)})") from None
        else:
            try:
                with open(path, "rb") as fh:
                    pickled = fh.read(1) == b"\x80"  # a pickle's protocol opcode (the format before torch 1.6)
                usable = pickled or zipfile.is_zipfile(path)
            except OSError as exc:
                raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
            if not usable:
                raise UserError(f"{path}: not a torch checkpoint (neither a zip archive nor a pickle)")
    if not theirs:
        return  # .bin weights: their names and shapes are known only once they are loaded
    common = ours.keys() & theirs.keys()
    if not common:
        raise UserError(
            f"--model.init_from {folder}: none of its {len(theirs)} weight tensors is named as a "
            f"{model.config.model_type} model's parameters (e.g. {min(theirs)}), so none would be loaded"
        )
    wrong = sorted(name for name in common if ours[name] != theirs[name])
    if wrong:
        name = wrong[0]
        raise UserError(
            f"--model.init_from {folder}: its weights do not have the shapes its config.json describes ({name}: "
            f"{list(theirs[name])} in the file, {list(ours[name])} in the model; {len(wrong)} tensors differ)"
        )


def _padding_without_mask_is_intended(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
    """Stands in for transformers' check for padding without a mask (see :func:`build_model`)."""


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


def describe(cfg: CausalLMConfig) -> str:
    """A short description of the model ``cfg`` builds, for a ``--dry_run``: ``key: value`` lines.

    For example ``model: gpt2-9m (gpt2)``, ``parameters: 8890880``, ``context: 2048``. The model is
    built on the meta device (no memory, no weights read), so this is instant even for large models.
    """
    config = model_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    name = cfg.preset if cfg.init_from is None else cfg.init_from
    context = cfg.max_seq_len if cfg.max_seq_len is not None else position_limit(config)
    return "\n".join(
        [
            f"model: {name} ({config.model_type})",
            f"parameters: {count_parameters(model)}",
            f"vocab_size: {config.vocab_size}",
            f"context: {context}",
        ]
    )


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Pack a right-padded batch (B, T) of stories into R <= B rows of width T, several stories to a row.

    Stories go first-fit by decreasing length (``attention_mask`` row sums) into rows of T tokens. Returns
    ``input_ids`` (R, T), ``position_ids`` (R, T) restarting at 0 with each story, ``labels`` (R, T) with
    -100 on padding and on each story's first token (never predicted in a row of its own either, so the
    predicted tokens are the same) and ``story_ids`` (R, T): the batch row of each token's story, -1 on
    padding (:func:`story_mask` turns it into the attention mask). A loop over the stories: run it on the host
    (the module packs each batch before it goes to the device), not one small kernel per story on a GPU.
    """
    b, width = input_ids.shape
    lengths = attention_mask.sum(dim=1).tolist()
    order = sorted(range(b), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        slot = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if slot is None:
            rows.append([])
            free.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        free[slot] -= lengths[i]
    n_rows = len(rows)
    ids = input_ids.new_full((n_rows, width), pad_id)
    pos = torch.zeros((n_rows, width), dtype=torch.long, device=input_ids.device)
    lab = labels.new_full((n_rows, width), IGNORE_INDEX)
    doc = torch.full((n_rows, width), -1, dtype=torch.long, device=input_ids.device)  # story of each token
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            ids[r, at : at + n] = input_ids[i, :n]
            pos[r, at : at + n] = torch.arange(n, device=input_ids.device)
            lab[r, at : at + n] = labels[i, :n]
            lab[r, at] = IGNORE_INDEX
            doc[r, at : at + n] = i
            at += n
    return {"input_ids": ids, "position_ids": pos, "labels": lab, "story_ids": doc}


def graph_width(width: int, limit: int, packed: bool) -> int:
    """Row width of a batch ``width`` tokens wide under CUDA graphs, so that a run records graphs for a few widths,
    not every multiple of 64; never below ``width`` nor above ``limit`` (the context) unless ``width`` is.

    Packed rows: the next of 128, 256, 512, ... (a wider row holds more stories, so little is wasted). One story
    per row: the next multiple of 64 up to 256, then four sizes per doubling (320, 384, 448, 512, 640, ...):
    under a fifth of each row is added padding.
    """
    if packed:
        bucket = 128
        while bucket < width:
            bucket *= 2
    else:
        step = max(64, 1 << max(0, (width - 1).bit_length() - 3))
        bucket = -(-width // step) * step
    return max(width, min(bucket, limit))


def graph_rows(rows: int) -> int:
    """Row count of a packed batch of ``rows`` rows under CUDA graphs: up to 8 as is, then the next of 10, 12, 14,
    16, 20, 24, 28, 32, 40, ... (four sizes per doubling: under a fifth of the rows are padding, and a run
    records a graph for a few row counts, not every one)."""
    if rows <= 8:
        return max(rows, 1)
    step = 2 ** ((rows - 1).bit_length() - 3)
    return -(-rows // step) * step


def pad_rows(packed: dict[str, torch.Tensor], rows: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows (:func:`pack_rows`) with all-padding rows appended up to ``rows``: no story, no loss."""
    extra = rows - packed["input_ids"].shape[0]
    if extra <= 0:
        return packed
    fill = {"input_ids": pad_id, "position_ids": 0, "labels": IGNORE_INDEX, "story_ids": -1}
    return {k: nn.functional.pad(v, (0, 0, 0, extra), value=fill[k]) for k, v in packed.items()}


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of ``attention_mask`` (B, T) is 1s then 0s: each story from position 0, padding after it.

    Reads the tensor: call it on the host, not on a GPU tensor in a step."""
    lengths = attention_mask.sum(dim=1, keepdim=True)
    return bool(torch.equal(attention_mask != 0, torch.arange(attention_mask.shape[1]) < lengths))


def _pinned(value: Any) -> Any:
    """A CPU tensor in page-locked memory (itself if it already is); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.is_pinned():
        return value.pin_memory()
    return value


def story_mask(story_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask (R, 1, T, T) bool of packed rows with ``story_ids`` (R, T) (-1: padding), on their device.

    True where query t may attend to key s: s <= t within the same story (block-diagonal causal); a padding
    position sees only itself. Built with a few tensor operations, no host round trip.
    """
    width = story_ids.shape[1]
    t = torch.arange(width, device=story_ids.device)
    causal = t[None, :, None] >= t[None, None, :]  # (1, T, T): key s <= query t
    same = (story_ids[:, :, None] == story_ids[:, None, :]) & (story_ids[:, :, None] >= 0)
    mask = (causal & same) | torch.eye(width, dtype=torch.bool, device=story_ids.device)[None]
    return mask[:, None]


FLEX_TRAIN_BLOCK = 128
"""Block of :func:`story_block_mask`: flex attention's default, positions per query and key block."""


def story_block_mask(story_ids: torch.Tensor) -> Any:
    """The mask of :func:`story_mask` as a FlexAttention ``BlockMask`` of packed rows with ``story_ids`` (R, T).

    Block-sparse: flex attention visits only the blocks (128 x 128 positions) that hold a pair of one story's
    tokens, so a row of many short stories costs about the sum of the stories' squares, not T squared. Blocks
    wholly inside one story and below the diagonal are marked full (no mask is evaluated in them).

    The block lists come from where each story starts, in a few tensor operations of R x T / 128 elements on
    the stories' device, once per batch: torch's ``create_block_mask`` would evaluate the mask at all R x T x T
    positions instead (a few GB of temporaries at 64 rows of 2,048 positions, every step). This needs each
    story's tokens in one unbroken run of its row, as :func:`pack_rows` and :func:`pad_rows` lay them out (a story
    split in two would lose the blocks between its parts); the mask inside each visited block is the exact one of
    :func:`story_mask`.
    """
    from torch.nn.attention.flex_attention import BlockMask

    size = FLEX_TRAIN_BLOCK
    width = story_ids.shape[1]
    blocks = -(-width // size)
    device = story_ids.device
    t = torch.arange(width, device=device)
    opens = torch.ones_like(story_ids, dtype=torch.bool)
    opens[:, 1:] = story_ids[:, 1:] != story_ids[:, :-1]
    start = torch.cummax(torch.where(opens, t, 0), dim=1).values  # where the run of each token's story begins
    block = torch.arange(blocks, device=device)
    first_q = block * size  # the first and last query of each block
    last_q = ((block + 1) * size).clamp(max=width) - 1
    # Key blocks j < i hold a query's story only if that story runs through the first query of block i.
    story_in = story_ids[:, first_q] >= 0
    first = torch.where(story_in, torch.div(start[:, first_q], size, rounding_mode="floor"), block)
    # Full: one story runs from the key block's first position to the query block's last, in whole blocks.
    whole = (story_ids[:, last_q] >= 0) & ((block + 1) * size <= width)
    full_from = torch.where(whole, torch.div(start[:, last_q] + size - 1, size, rounding_mode="floor"), block)
    full_from = torch.minimum(torch.maximum(full_from, first), block)
    # Partial blocks: first .. full_from - 1, then the diagonal; full blocks: full_from .. i - 1.
    partial = first[..., None] + block
    partial = torch.where(partial < full_from[..., None], partial, partial - full_from[..., None] + block[:, None])
    full = full_from[..., None] + block

    def same_story(b: Any, h: Any, q: Any, k: Any) -> Any:
        story = story_ids[b, q]
        return ((story == story_ids[b, k]) & (q >= k) & (story >= 0)) | (q == k)

    def lists(index: torch.Tensor) -> torch.Tensor:
        return index.clamp(max=blocks - 1).to(torch.int32)[:, None]  # (R, 1, blocks, blocks): one head

    return BlockMask.from_kv_blocks(
        (full_from - first + 1).to(torch.int32)[:, None], lists(partial),
        (block - full_from).to(torch.int32)[:, None], lists(full),
        BLOCK_SIZE=size, mask_mod=same_story, seq_lengths=(width, width),
    )  # fmt: skip


def pack_stories(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """:func:`pack_rows` with the attention mask: ``input_ids``, ``position_ids``, ``labels`` (R, T) and
    ``attention_mask`` (R, 1, T, T) bool (:func:`story_mask`)."""
    packed = pack_rows(input_ids, attention_mask, labels, pad_id)
    packed["attention_mask"] = story_mask(packed.pop("story_ids"))
    return packed


def lr_factor(step: int, warmup_steps: int, total_steps: float, final_ratio: float = FINAL_LR_RATIO) -> float:
    """Learning rate of optimizer step ``step`` (0-based) as a fraction of the peak.

    Linear warmup (step + 1) / warmup_steps for the first ``warmup_steps`` steps, then cosine decay
    from 1 to ``final_ratio`` over the remaining steps up to ``total_steps``:

        f = r + (1 - r) (1 + cos(pi p)) / 2,  p = min(1, (step - warmup_steps) / (total_steps - warmup_steps)).

    With an unknown (infinite) or too short ``total_steps`` the rate stays at the peak after warmup.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(total_steps) or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def count_predicted(labels: torch.Tensor) -> int:
    """Predicted tokens of a batch with ``labels`` (B, T): labels[:, 1:] != -100 (a host sync on a GPU)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class HostBatcher:
    """What a training or test batch goes through on the host before it reaches the device: checked, labelled,
    padded to a multiple, packed (with ``pack``), its predicted tokens counted. A small picklable object, so the
    data loader's worker processes can run it (:meth:`CausalLMModule.loader_batch_fn`) while the main process
    drives the GPU; :meth:`CausalLMModule.host_batch` runs the same in the main process.

    Args:
        max_seq_len: the context; a longer batch is refused.
        pad_token_id: the pad id (padding without a mask is found by it; packed rows are padded with it).
        multiple: rows are padded to a multiple of this many positions (64 on a GPU: fewer distinct shapes).
        pack: pack the stories of a batch into rows of the batch's width (:func:`pack_rows`).
        graphs: the model runs as CUDA graphs: widths and packed row counts are rounded further
            (:func:`graph_width`, :func:`graph_rows`), since each new shape is a new graph recording.
    """

    max_seq_len: int
    pad_token_id: int | None
    multiple: int = 1
    pack: bool = False
    graphs: bool = False

    def prepare(
        self, batch: Mapping[str, torch.Tensor] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(input_ids, attention_mask, labels)`` of a batch: see :meth:`CausalLMModule.prepare_batch`."""
        if isinstance(batch, torch.Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(f"expected a dict batch with 'input_ids', got {type(batch).__name__}")
        input_ids = batch["input_ids"]
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be int64 of shape (B, T), got {input_ids.dtype} {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.max_seq_len:
            raise ValueError(f"sequences of {input_ids.shape[1]} tokens exceed max_seq_len={self.max_seq_len}")
        attention_mask = batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = input_ids.clone()
            if attention_mask is not None:
                labels[attention_mask == 0] = IGNORE_INDEX
            elif self.pad_token_id is not None:
                labels[input_ids == self.pad_token_id] = IGNORE_INDEX
        for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(
                    f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(tensor.shape)}"
                )
        return input_ids, attention_mask, labels

    def __call__(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, Any]:
        """The batch ready-made for :meth:`CausalLMModule.token_loss`: see :meth:`CausalLMModule.host_batch`."""
        input_ids, attention_mask, labels = self.prepare(batch)
        n = count_predicted(labels)
        width = min(-(-input_ids.shape[1] // self.multiple) * self.multiple, self.max_seq_len)
        if self.graphs:  # CUDA graphs record one graph per shape: a few widths and row counts
            width = graph_width(width, self.max_seq_len, self.pack and attention_mask is not None)
        pad_id = self.pad_token_id or 0
        if width > input_ids.shape[1]:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            extra = width - input_ids.shape[1]
            input_ids = nn.functional.pad(input_ids, (0, extra), value=pad_id)
            attention_mask = nn.functional.pad(attention_mask, (0, extra), value=0)
            labels = nn.functional.pad(labels, (0, extra), value=IGNORE_INDEX)
        if self.pack and attention_mask is not None:
            packed = pack_rows(input_ids, attention_mask, labels, pad_id)
            if self.graphs:
                packed = pad_rows(packed, graph_rows(packed["input_ids"].shape[0]), pad_id)
            return {**packed, PREDICTED: n}
        if attention_mask is not None and input_ids.device.type == "cpu" and right_padded(attention_mask):
            # Right padding needs no mask for the loss: the causal mask already keeps every real token from the
            # padding after it, and padding has no loss. Without a mask, attention runs its causal kernel
            # (flash attention on a GPU) and transformers does not read the mask back to inspect it.
            attention_mask = None
        out = {"input_ids": input_ids, "labels": labels, PREDICTED: n}
        if attention_mask is not None:
            out["attention_mask"] = attention_mask
        return out


class CausalLMModule(SamplingModule):
    """Lightning wrapper of a transformers causal LM: token cross-entropy training and per-token logging.

    Build it from a :class:`CausalLMConfig`, keyword overrides of its fields, or both:
    ``CausalLMModule(CausalLMConfig(preset="tiny"))``, ``CausalLMModule(preset="tiny", vocab_size=64)``.
    The resolved settings and the special-token ids are the hyperparameters (flat, so
    ``load_from_checkpoint`` rebuilds the same model; with ``init_from`` the directory must still exist).

    A batch is a dict with ``input_ids`` (B, T) int64 and optionally ``attention_mask`` (B, T) (1: real
    token, 0: padding) and ``labels`` (B, T) (-100 where no loss); a bare (B, T) tensor is taken as
    ``input_ids``. Without labels the targets are the inputs with padding masked (:meth:`prepare_batch`).

    Logged per stage: ``<stage>_loss``, mean cross-entropy in nats per predicted token, weighted by the
    number of predicted tokens (exact per-token mean over the stage and over DDP ranks). Perplexity
    is ``exp(test_loss)``, computed from the logged value.
    """

    ragged_samples = {"tokens": "lengths"}
    """The sampled stories are stored without their padding (a story's row is as long as the context)."""

    def __init__(
        self,
        config: CausalLMConfig | None = None,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **overrides: Any,
    ):
        super().__init__()
        # replace() runs CausalLMConfig's checks on the result.
        self.config = config_with_overrides(CausalLMConfig, config, overrides, "causal LM")
        self.save_hyperparameters(
            {
                **asdict(self.config),
                "bos_token_id": bos_token_id,
                "eos_token_id": eos_token_id,
                "pad_token_id": pad_token_id,
            }
        )
        self.model = build_model(self.config, bos_token_id, eos_token_id, pad_token_id)
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.sampling: Any = None
        self._sample_max_len: int | None = None
        self._first_tokens: Any = None
        self._sampler: Any = None  # kept between sample() calls (chunks), until end_sampling or a new config
        self.max_seq_len = self.config.max_seq_len or position_limit(self.model.config)
        """Context length for training and sampling (the config's, or the model's position limit)."""
        self._tokens_trained = 0
        self.cuda_graph_steps = False
        """Set when the model is compiled with ``mode="reduce-overhead"`` (CUDA graphs): each forward then starts
        a new graph step and the loss is copied out of the graphs' memory, which the next replay overwrites."""

    @property
    def packs(self) -> bool:
        """Whether training batches are packed: ``pack`` if set, else :func:`packs_by_default` on this device."""
        return self.host_batcher().pack

    @property
    def num_parameters(self) -> int:
        """Number of unique parameters of the model (tied embeddings counted once)."""
        return count_parameters(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits of ``input_ids`` (B, T): shape ``(B, T, V)``; position t predicts token t + 1."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def configure_sampling(self, cfg: Any, max_len: int | None = None, first_tokens: Any = None) -> None:
        """Set how :meth:`sample` draws stories: a :class:`samplers.story_sampler.SamplingConfig`.

        ``max_len``: longest story in tokens (default: the config's ``max_len``, else :attr:`max_seq_len`);
        ``first_tokens``: the pool of real first tokens for the ``first_token_inclusive`` strategy.
        """
        from samplers.story_sampler import SamplingConfig

        if not isinstance(cfg, SamplingConfig):
            raise TypeError(f"expected a SamplingConfig, got {type(cfg).__name__}")
        length = cfg.max_len or max_len or self.max_seq_len
        if length > self.max_seq_len:
            raise ConfigError(f"--sampling.max_len must be at most the context length {self.max_seq_len}, got {length}")
        self.sampling, self._sample_max_len, self._first_tokens = cfg, length, first_tokens
        self.end_sampling()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> dict[str, Any]:
        """``n`` stories drawn with ``generator`` (see :class:`samplers.story_sampler.StorySampler`).

        Returns ``tokens`` (n, max_len) uint16 padded with the pad id, ``lengths`` and ``finished``.
        """
        from samplers.story_sampler import SamplingConfig, StorySampler

        if self.sampling is None:
            self.configure_sampling(SamplingConfig())
        self._check_finite_weights()
        if self._sampler is None or self._sampler.model is not self.model:
            self._sampler = StorySampler(
                self.model,
                self.sampling,
                max_len=self._sample_max_len,
                eot_id=self.eos_token_id if self.eos_token_id is not None else 0,
                pad_id=self.pad_token_id if self.pad_token_id is not None else 1,
                first_tokens=self._first_tokens,
            )
        return self._sampler.sample(n, generator)

    def _check_finite_weights(self) -> None:
        """Refuse to sample a model whose weights hold NaN or inf (its training diverged): its stories would be
        noise, and the next generation would train on them. One read from the device per call."""
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        if not params:
            return
        finite = torch.stack([torch.isfinite(p).all() for p in params])
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise UserError(
                f"the trained model has NaN or inf in {bad} of its {len(params)} weight tensors: its training "
                "diverged (see train_loss), and it cannot be sampled; start again in a new --out_dir with a lower "
                "--model.lr (the generations before this one are complete)"
            )

    def end_sampling(self) -> None:
        """Free what :meth:`sample` keeps between calls (the sampler's decoder, KV caches and CUDA graphs, which
        let a corpus drawn chunk by chunk read the weights and capture the graphs once)."""
        if self._sampler is not None:
            self._sampler.release()
        self._sampler = None

    def prepare_batch(
        self, batch: Mapping[str, torch.Tensor] | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(input_ids, attention_mask, labels)`` of a batch, each (B, T); the mask may be None.

        Missing labels are the input ids with -100 at padding: where ``attention_mask`` is 0 if there
        is a mask, else where ``input_ids == pad_token_id`` if a pad id is set (with pad = eos, give a
        mask, or the eos tokens lose their loss too), else nowhere. Raises ``ValueError`` for a batch
        of the wrong shape or longer than :attr:`max_seq_len`.
        """
        return self.host_batcher().prepare(batch)

    def host_batcher(self, device_type: str | None = None) -> HostBatcher:
        """The host-side preparation of this module's batches (:class:`HostBatcher`), for a model on a device of
        ``device_type`` (default: where the model is now): padding multiple and packing follow the device."""
        on_cuda = (device_type or self.device.type) == "cuda"
        pack = self.config.pack
        if pack is None:
            pack = packs_by_default(self.model.config, self.config.attn_implementation, on_cuda)
        multiple = self.config.pad_to_multiple or (64 if on_cuda else 1)
        return HostBatcher(self.max_seq_len, self.pad_token_id, multiple, pack, self.cuda_graph_steps)

    def loader_batch_fn(self) -> HostBatcher:
        """The data loaders run :meth:`host_batcher` on each batch, in their worker processes when there are some
        (``--num_workers``), so packing and counting overlap the GPU's step instead of delaying the next one."""
        return self.host_batcher()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the host, before Lightning moves ``batch`` to the device: count its predicted tokens and, with
        ``pack``, pack its stories (:meth:`host_batch`), so a training step never waits for the GPU to read a
        count back and packing costs no per-story kernels there. A batch the loader already prepared
        (:meth:`loader_batch_fn`) passes as it is."""
        if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
            if batch["input_ids"].device.type == "cpu" and PREDICTED not in batch:
                ready = self.host_batch(batch)
                if self.device.type == "cuda":  # page-locked, so that the copy is asynchronous: a copy from
                    # pageable memory would make the host wait for the GPU's queue at every step
                    ready = {k: _pinned(v) for k, v in ready.items()}
                return ready
        return batch

    def host_batch(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> dict[str, Any]:
        """``batch`` as :meth:`token_loss` takes it ready-made: its tensors, padded to ``pad_to_multiple``
        (packed with ``pack``: ``input_ids``, ``position_ids``, ``labels``, ``story_ids``; unpacked, without
        ``attention_mask`` where every row is right-padded, :func:`right_padded`), and ``num_predicted`` (an
        int). Under CUDA graphs (:attr:`cuda_graph_steps`) the width is padded further to :func:`graph_width`
        and packed rows are added up to :func:`graph_rows`: each new shape would be a new graph recording."""
        return self.host_batcher()(batch)

    def token_loss(self, batch: Mapping[str, torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(loss, n)``: mean cross-entropy (nats) over the batch's ``n`` predicted tokens, and ``n``.

        The predicted tokens are labels[:, 1:] != -100 (position t predicts token t + 1); the loss is the
        Hugging Face model's shifted loss. A batch without predicted tokens gives loss 0 (with a graph).
        A batch from :meth:`host_batch` brings its count (and, packed, its rows); any other goes through
        :meth:`host_batch` here, where it is (one host sync per step on a GPU).
        """
        if not (isinstance(batch, Mapping) and PREDICTED in batch):
            batch = self.host_batch(batch)
        n = batch[PREDICTED]
        graphs = self.cuda_graph_steps
        if graphs:  # a new step of the CUDA graphs of a model compiled with mode="reduce-overhead"
            torch.compiler.cudagraph_mark_step_begin()
        if "story_ids" in batch:  # packed
            out = self._packed_forward(batch["input_ids"], batch["position_ids"], batch["labels"], batch["story_ids"])
        else:
            out = self.model(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                use_cache=False,
            )  # fmt: skip
        loss = out.loss if n > 0 else out.logits.sum() * 0.0  # HF's mean over 0 tokens is nan
        # A CUDA graph's outputs are overwritten by its next replay; the logged loss outlives the step.
        return (loss.clone() if graphs else loss), n

    def _packed_forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, story_ids: torch.Tensor
    ) -> Any:
        if self.config.attn_implementation == "flex_attention":
            mask = story_block_mask(story_ids)
            return self.model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids, labels=labels, use_cache=False
            )
        mask = story_mask(story_ids)
        if self.config.attn_implementation == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        return self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, labels=labels, use_cache=False
        )

    def model_step(self, batch: Mapping[str, torch.Tensor] | torch.Tensor, stage: str) -> torch.Tensor:
        """Mean token cross-entropy of a batch, logged as ``<stage>_loss``.

        Validation and test: with weight = predicted tokens (:meth:`log_mean`), so the logged value is
        sum_batches(loss * n) / sum_batches(n) (summed over ranks), i.e. the per-token mean
        of the whole stage; exp(test_loss) is the test perplexity. Training: the step's own loss (this rank's
        batch), a point of the training curve at every ``--trainer.log_every_n_steps`` (read back from the
        device only then, not every step).
        """
        loss, n = self.token_loss(batch)
        if stage == "train":
            self._tokens_trained += n  # a host count (host_batch): no wait for the device
            self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=n)
        else:
            self.log_mean(f"{stage}_loss", loss, n)  # exact per-token mean over the stage and every process
        return loss

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def on_train_start(self) -> None:
        self._tokens_trained = 0

    def throughput_counts(self) -> dict[str, int]:
        """Predicted tokens of the training batches this process has stepped on in the current fit."""
        return {"tokens": self._tokens_trained}

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "test")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups: weight decay on the matrices (ndim >= 2), none on vectors.

        Matrices include the token (and GPT-2 position) embeddings and the output head, as in
        nanoGPT and the transformers Trainer's defaults; biases and LayerNorm/RMSNorm gains are not
        decayed (shrinking them towards 0 is not a meaningful prior). Tied tensors appear once.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def make_optimizer(self, precision: str | None = None) -> torch.optim.AdamW:
        """AdamW over :meth:`parameter_groups` with torch's (and the transformers Trainer's) betas (0.9, 0.999)
        and eps 1e-8; fused (``fused_optimizer``, default: on a CUDA device unless ``precision`` is 16-mixed)."""
        fused = self.config.fused_optimizer
        if fused is None:
            on_cuda = all(p.device.type == "cuda" for p in self.parameters())
            fused = on_cuda and str(precision) not in ("16-mixed", "16", "16-true")
        return torch.optim.AdamW(self.parameter_groups(), lr=self.config.lr, fused=fused or None)

    def configure_optimizers(self) -> dict[str, Any]:
        # Linear warmup then cosine decay to 10% of lr over the fit's optimizer steps (see lr_factor).
        optimizer = self.make_optimizer(self.trainer.precision)
        total = float(self.trainer.estimated_stepping_batches)
        warmup = self.config.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Lightning's clipping, also for a fused AdamW under bf16-mixed: Lightning refuses to clip for any fused
        optimizer under mixed precision (it cannot tell bf16, which has no gradient scaler, from 16-mixed), so
        here the gradients, unscaled as they are, are clipped directly."""
        from lightning.pytorch.plugins.precision import MixedPrecision

        raw = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        fused = any(group.get("fused") for group in raw.param_groups)
        plugin = self.trainer.precision_plugin
        if not fused or not gradient_clip_val or type(plugin) is not MixedPrecision:  # FSDP, DeepSpeed: their own
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if plugin.scaler is not None:
            raise ConfigError(FUSED_16_MIXED_CLIPPING)
        params = [p for group in raw.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)


__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "FAST_TRAINING_MODELS",
    "FUSED_16_MIXED_CLIPPING",
    "FINAL_LR_RATIO",
    "IGNORE_INDEX",
    "PACK_ATTENTION",
    "PREDICTED",
    "PRESETS",
    "PRESET_CONTEXT",
    "PUBLISHED_CONTEXT",
    "WEIGHT_FILES",
    "check_checkpoint_weights",
    "CAUSAL_FLAGS",
    "NEVER_CAUSAL",
    "PADDED_POSITIONS",
    "attends_ahead",
    "causal_flag",
    "PUBLISHED_PARAMETERS",
    "CausalLMConfig",
    "CausalLMModule",
    "build_model",
    "check_attention",
    "count_parameters",
    "default_context",
    "describe",
    "graph_rows",
    "graph_width",
    "lr_factor",
    "model_config",
    "pack_rows",
    "pack_stories",
    "packs_by_default",
    "pad_rows",
    "position_limit",
    "right_padded",
    "story_block_mask",
    "story_mask",
]
