"""Fast story sampling from a trained causal LM: a KV-cached decoder with continuous batching.

Every generation of the TinyStories experiment replaces (or extends) its training corpus with stories
sampled from the previous generation's model, so sampling throughput bounds how many generations fit
in a run. :class:`StorySampler` turns a transformers causal LM into a corpus of ``n`` stories. Its
``native`` backend, below, runs GPT-2 (``GPT2LMHeadModel``) and the Llama family (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``: :data:`NATIVE_MODELS`); its ``hf`` backend runs any other
causal LM through transformers' ``generate()`` (:func:`choose_backend`). The native backend:

* **Its own KV-cached decoder** (:class:`KVDecoder`), written here against the model's weights and
  matching the transformers math (checked against the model's forward logits in the tests). The
  cache is STATIC: per layer, buffers of shape ``(batch, kv_heads, max_len, head_dim)`` with one
  current position per slot. Each decode step feeds ONE token per slot, writes its key/value at that
  slot's own position and attends over positions ``<= position`` (a boolean mask), so slots need
  not be aligned.
* **Continuous batching.** The batch is ``batch_size`` slots. A slot whose story ends (it samples
  ``EOT`` after its prompt, or reaches ``max_len`` tokens) is recorded and immediately restarts at
  position 0 with the next story; nobody waits for the longest story of a batch. Exactly ``n``
  stories are launched, and the run lasts until all ``n`` have finished, so short stories are not
  over-represented. Row ``i`` of the output is the ``i``-th story launched.
* **Prompts are forced tokens.** A slot still inside its prompt does not sample: its next token is
  the prompt's. There is no separate prefill.
* **Reproducible randomness.** All randomness comes from the caller's ``torch.Generator``, with a
  fixed consumption per step (one uniform per slot, plus one pool index per slot for
  ``first_token_inclusive``), whatever the slots are doing. Tokens are drawn by inverse CDF
  (cumulative sum of the probabilities, then a binary search of the uniform in it), so two
  decoders whose logits differ by rounding (~1e-6) draw the same tokens: the cached and the
  uncached (``use_cache=False``, the original transformers forward) samplers agree token for token.

The two strategies are those of the code of Gerstgrasser et al. ("Is Model Collapse Inevitable?"):

* ``bos_fixed_length``: every story starts from ``[EOT]``.
* ``first_token_inclusive``: every story starts from ``[EOT, t]``, ``t`` the first token of a real
  training story (drawn uniformly from a pool of such tokens that the caller gives).

Both stop at ``EOT`` or at ``max_len`` tokens (the prompt and the final ``EOT`` included).

Speed. On CUDA the default is bfloat16 and a compiled decode step replayed as a CUDA graph (static
shapes, no data-dependent Python branching; one host sync every :data:`SYNC_EVERY` steps). Reading
the KV cache is most of a step's memory traffic at a long context, so the static path attends over a
length bucket (:data:`LENGTH_BUCKET`), not the whole buffer: at each sync it reads the largest position
in use and picks the smallest multiple of the bucket width that the slots cannot outgrow before the
next sync. The step is compiled once, with the length as a symbol, and each bucket's step is captured
as its own CUDA graph, all of them before the first story starts (logged with the seconds it took). On
CPU the default is float32 eager, where each step attends only to the cache prefix in use (one host
sync per step, which costs nothing there). The first compiled call compiles (seconds to a minute);
later calls with the same architecture and settings reuse it. The two caches take 2 * layers *
batch_size * kv_heads * (max_len + 1) * head_dim values of the decoder dtype (e.g. 2 * 8 * 64 * 8 * 513
* 32 * 4 bytes = 538 MB for gpt2-9m at batch 64 in float32).

Randomness in detail: at every step the sampler draws ``torch.rand(batch)`` (then, for
``first_token_inclusive``, ``torch.randint(len(pool), (batch,))``) from the generator, for all slots;
slot b uses element b. A slot launching a story takes its candidate first token of that step. So
the output depends only on the model, the config, ``n`` and the generator state; and two samples of
``n1, n2 >= batch_size`` stories from the same generator state share their first ``min(n1, n2)`` rows
(slots run independently). The generator's state after a call is not specified (the compiled path may
run a few extra steps at the end).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from collapse.errors import ConfigError
from collapse.progress import report_within

log = logging.getLogger(__name__)

STRATEGIES = ("bos_fixed_length", "first_token_inclusive")
"""Accepted values of :attr:`SamplingConfig.strategy`."""
COMPILE_MODES = ("auto", "off", "on")
"""Accepted values of :attr:`SamplingConfig.compile`."""
DTYPES = ("auto", "float32", "bfloat16")
"""Accepted values of :attr:`SamplingConfig.dtype`."""
MIN_TEMPERATURE = 1e-6
"""The smallest ``--sampling.temperature``: float32 logits of any size a model gives, divided by it, stay finite."""
BACKENDS = ("auto", "native", "hf")
"""Accepted values of :attr:`SamplingConfig.backend`."""
ATTENTIONS = ("auto", "bucket", "flex")
"""Accepted values of :attr:`SamplingConfig.attention`."""
FLEX_BLOCK = 128
"""Key/value block of ``--sampling.attention flex``: a slot reads its cache in blocks of this many positions."""
NATIVE_MODELS = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
"""The architectures of the native KV-cached decoder: transformers ``model_type`` -> causal LM class. Mistral and
Qwen2 share Llama's layout (``model.layers[i].self_attn.{q,k,v,o}_proj``, SwiGLU ``mlp.{gate,up,down}_proj``,
RMSNorms, RoPE); Qwen2 adds q/k/v biases and both may use a sliding attention window."""
SYNC_EVERY = 8
"""Decode steps between two host syncs of the static (compiled) path: finished stories are queued on
the device and copied to the host, and the stopping condition checked, every this many steps."""
LENGTH_BUCKET = 128
"""Width of the attention-length buckets of the static path: between two syncs every slot attends over the
cache prefix of the smallest multiple of this (or the context) that holds all positions the slots can reach
by the next sync, so a step reads the cache up to about the longest story in progress, not the context."""

# RoPE variants whose frequencies change with the sequence length at run time; the decoder reads the
# frequencies once, so it cannot follow them.
_DYNAMIC_ROPE = ("dynamic", "longrope")


# ---------------------------------------------------------------------------------------------- config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def prompt_length(strategy: str) -> int:
    """Tokens of the prompt of ``strategy``: 1 (``[EOT]``) or 2 (``[EOT, first token]``)."""
    return 2 if strategy == "first_token_inclusive" else 1


@dataclass
class SamplingConfig:
    """Settings of story sampling (the ``--sampling.*`` flags)."""

    strategy: str = "bos_fixed_length"
    """``bos_fixed_length``: stories start from ``[EOT]``; ``first_token_inclusive``: from ``[EOT, t]``, ``t``
    the first token of a random real training story. Both stop at ``EOT`` or ``max_len`` tokens."""
    temperature: float = 1.0
    """Softmax temperature (>= 1e-6): the logits are divided by it before any filtering."""
    top_k: int | None = None
    """Keep only the ``top_k`` most likely tokens (>= 1); None: no top-k filtering."""
    top_p: float | None = None
    """Nucleus sampling: keep the most likely tokens up to cumulative probability ``top_p``, in (0, 1]; None: off."""
    max_len: int | None = None
    """Tokens per story at most, prompt and final ``EOT`` included; None: the model's context length."""
    batch_size: int | str = "auto"
    """Stories decoded concurrently (slots of the continuous batch); ``auto``: :func:`auto_batch_size` (64 off
    CUDA; on CUDA as many as fit a 16 GiB KV-cache budget, from 64 to 1,024)."""
    compile: str = "auto"
    """``on``: compile the decode step (static shapes; replayed as a CUDA graph on CUDA); ``off``: eager;
    ``auto``: on for CUDA, off on CPU."""
    dtype: str = "auto"
    """Decoder precision: ``float32``, ``bfloat16``, or ``auto`` (bfloat16 on CUDA, float32 on CPU)."""
    attention: str = "auto"
    """How the native decoder's static (GPU) path reads the KV cache. ``bucket``: every slot attends over one
    length bucket that holds the longest story in progress (SDPA); ``flex``: FlexAttention over the whole
    context, each slot reading only the blocks of :data:`FLEX_BLOCK` positions up to its own position, so a
    long story in progress no longer makes every slot read that far (one CUDA graph, no buckets); ``auto``:
    ``bucket``, until ``flex`` is measured on GPUs. The eager CPU path always reads the prefix in use."""
    backend: str = "auto"
    """``native``: this module's KV-cached decoder (GPT-2 and the Llama family: Llama, Mistral, Qwen2);
    ``hf``: transformers' ``generate()`` with a static cache (any causal LM; slower, float32); ``auto``:
    native when the architecture is supported, else hf."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--sampling.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        t = self.temperature
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0):
            raise ConfigError(f"--sampling.temperature must be > 0, got {t!r}")
        if t < MIN_TEMPERATURE:
            raise ConfigError(
                f"--sampling.temperature must be >= {MIN_TEMPERATURE:g} (logits divided by less can overflow float32 "
                f"into NaN probabilities), got {t!r}; for greedy decoding use --sampling.top_k 1"
            )
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            raise ConfigError(f"--sampling.top_k must be an integer >= 1 or None, got {self.top_k!r}")
        p = self.top_p
        if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1):
            raise ConfigError(f"--sampling.top_p must be in (0, 1] or None, got {p!r}")
        need = prompt_length(self.strategy) + 1
        if self.max_len is not None and not (_is_int(self.max_len) and self.max_len >= need):
            raise ConfigError(
                f"--sampling.max_len must be an integer >= {need} (the prompt of {self.strategy} plus one token) "
                f"or None, got {self.max_len!r}"
            )
        if self.batch_size != "auto" and not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise ConfigError(f"--sampling.batch_size must be a positive integer or auto, got {self.batch_size!r}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"--sampling.compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--sampling.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--sampling.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"--sampling.attention must be one of {ATTENTIONS}, got {self.attention!r}")


CPU_SLOTS = 64
"""``--sampling.batch_size auto`` off CUDA: a CPU step's time grows with the slots, so more buy little there."""
GPU_KV_BUDGET = 16 * 2**30
"""``--sampling.batch_size auto`` on CUDA: bytes the KV caches may reserve (bfloat16, the whole context per slot).
A decoding step reads the weights once for all slots, so on a GPU more slots mean more tokens per step."""
GPU_MAX_SLOTS = 1024
"""``--sampling.batch_size auto`` on CUDA: slots at most."""
KV_MEMORY_SHARE = 0.75
"""The most of a GPU's memory that the sampler's KV caches may reserve: the weights, each step's logits and the
compiled step need the rest (:func:`check_kv_memory`)."""


def kv_bytes_per_slot(config: Any, max_len: int, dtype_bytes: int = 2) -> int:
    """Bytes of one slot's key and value caches over ``max_len`` positions, for a transformers ``config``."""
    layers, heads = int(config.num_hidden_layers), int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * layers * kv_heads * head_dim * (max_len + 1) * dtype_bytes


def auto_batch_size(config: Any, max_len: int, on_gpu: bool, dtype_bytes: int = 2) -> int:
    """The slots of ``--sampling.batch_size auto``: :data:`CPU_SLOTS` off CUDA; on CUDA the largest power of two
    from :data:`CPU_SLOTS` to :data:`GPU_MAX_SLOTS` whose KV caches (``dtype_bytes`` per value: 2 for the native
    decoder's bfloat16, 4 for generate() in float32) fit :data:`GPU_KV_BUDGET` (bfloat16 at a
    2,048 context: 512 for gpt2-9m and llama2-12m, 256 for llama2-42m, 128 for llama2-126m). It depends only
    on the model's shape, the context and the device type, so a run's samples do not depend on which GPU drew
    them."""
    if not on_gpu:
        return CPU_SLOTS
    slots, per_slot = GPU_MAX_SLOTS, kv_bytes_per_slot(config, max_len, dtype_bytes)
    while slots > CPU_SLOTS and slots * per_slot > GPU_KV_BUDGET:
        slots //= 2
    return slots


def check_kv_memory(config: Any, max_len: int, slots: int, memory: int | None, dtype_bytes: int = 2) -> None:
    """Refuse, before anything is trained, ``slots`` whose KV caches would take more than :data:`KV_MEMORY_SHARE` of
    ``memory`` (bytes of the smallest GPU the run uses; None: unknown, nothing checked).

    ``--sampling.batch_size auto`` does not look at the GPU (a run's samples must not depend on which GPU drew
    them), and the slots are part of the run's config: a GPU too small for them would run out of memory when the
    first generation's training is done, and a smaller setting would then be another run. The message names the
    most slots that fit.
    """
    if memory is None:
        return
    per_slot = kv_bytes_per_slot(config, max_len, dtype_bytes)
    if slots * per_slot <= KV_MEMORY_SHARE * memory:
        return
    most = int(KV_MEMORY_SHARE * memory // per_slot)
    fits = 1 << (most.bit_length() - 1) if most else 0
    advice = (
        f"pass --sampling.batch_size {fits} (the most slots, a power of two, that fit)"
        if fits
        else "not even one slot fits: use a shorter --sampling.max_len or --data.max_seq_len"
    )
    raise ConfigError(
        f"sampling {slots} stories at once (--sampling.batch_size) reserves {slots * per_slot / 2**30:.1f} GiB of KV "
        f"cache ({max_len} positions each, {dtype_bytes} bytes per value), more than "
        f"{KV_MEMORY_SHARE:.0%} of this GPU's {memory / 2**30:.1f} GiB: {advice}"
    )


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The decoder precision of ``--sampling.dtype`` on ``device``: ``auto`` is bfloat16 on CUDA, else float32."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def resolve_compile(setting: str, device: torch.device) -> bool:
    """Whether ``--sampling.compile`` compiles the decode step on ``device``: ``auto`` means on CUDA only."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


# -------------------------------------------------------------------------------------------- backends


def _rope_type(config: Any) -> str:
    """The RoPE type of a transformers config (``rope_parameters``, formerly ``rope_scaling``); ``default`` if none."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(params, Mapping):
        return str(params.get("rope_type", params.get("type", "default")))
    return "default"


def native_unsupported(config: Any, model: torch.nn.Module | None = None) -> str | None:
    """Why the native decoder cannot run a model of ``config`` (and class ``type(model)``, if given); None if it can."""
    kind = getattr(config, "model_type", None)
    if kind not in NATIVE_MODELS:
        return f"the native decoder runs {', '.join(NATIVE_MODELS)} models, not {kind!r}"
    if model is not None and type(model).__name__ != NATIVE_MODELS[kind]:
        return f"the native decoder runs {NATIVE_MODELS[kind]} for {kind!r}, not {type(model).__name__}"
    if kind == "gpt2" and getattr(config, "add_cross_attention", False):
        return "the native decoder does not run GPT-2 models with cross-attention (add_cross_attention)"
    if kind != "gpt2" and _rope_type(config) in _DYNAMIC_ROPE:
        return f"the native decoder does not run models with rope_type {_rope_type(config)!r}"
    return None


def _generating_class(config: Any) -> type | None:
    """The transformers causal LM class of ``config`` if it can ``generate()``; None if there is none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError):
        return None
    return cls if cls.can_generate() else None


def choose_backend(config: Any, setting: str = "auto", model: torch.nn.Module | None = None) -> str:
    """``native`` or ``hf``: how ``--sampling.backend setting`` samples a model of ``config`` (and ``model``'s class).

    ``auto`` is native when :func:`native_unsupported` finds nothing, else hf. Raises :class:`ConfigError`
    for ``native`` on an unsupported architecture, and for a model that has no causal LM with
    ``generate()`` in transformers (it cannot be sampled at all), so a run refuses it before training.
    """
    if setting not in BACKENDS:
        raise ConfigError(f"--sampling.backend must be one of {BACKENDS}, got {setting!r}")
    reason = native_unsupported(config, model)
    if setting != "hf" and reason is None:
        return "native"
    if setting == "native":
        raise ConfigError(f"--sampling.backend native: {reason}; use --sampling.backend hf (or auto)")
    if model is not None:
        can = callable(getattr(model, "generate", None)) and type(model).can_generate()
    else:
        can = _generating_class(config) is not None
    if not can:
        kind = getattr(config, "model_type", type(config).__name__)
        raise ConfigError(
            f"a {kind!r} model cannot be sampled: transformers has no causal LM with generate() for it; "
            "use a causal LM (--model.preset, or a causal LM checkpoint in --model.init_from)"
        )
    return "hf"


# --------------------------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class _Arch:
    """The shape and constants of a supported model: everything the decode step needs besides tensors."""

    kind: str  # "gpt2" | "llama"
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    hidden: int
    vocab: int
    eps: float
    act: str
    scales: tuple[float, ...]  # softmax scale of each layer's attention scores
    positions: int  # position limit of the model
    attention: str  # "sdpa" | "matmul" | "flex": how single-query attention is computed (see _attend)
    windows: tuple[int | None, ...]  # each layer's sliding attention window (None: full causal attention)


def _arch_of(model: torch.nn.Module, device: torch.device) -> _Arch:
    """Read the architecture of a GPT-2 or Llama-family model (:data:`NATIVE_MODELS`); ConfigError for any other."""
    c = model.config
    reason = native_unsupported(c, model)
    if reason is not None:
        raise ConfigError(f"{reason}; use --sampling.backend hf (or auto)")

    # SDPA is the fused kernel on CUDA. On CPU, for one query per slot, two plain batched matmuls measured
    # about as fast as SDPA, and they handle grouped-query attention without repeating the cache: so on CUDA
    # too for grouped queries, where SDPA with a mask has no fused kernel (flash attention takes no mask) and
    # its math fallback repeats each layer's cache per step (set below, once the kv heads are known).
    attention = "sdpa" if device.type == "cuda" else "matmul"
    if c.model_type == "gpt2":
        head_dim = c.n_embd // c.n_head
        # GPT-2 scores: q.k / sqrt(head_dim) (scale_attn_weights), further / (layer index + 1) with
        # scale_attn_by_inverse_layer_idx; reorder_and_upcast_attn only changes eager rounding.
        base = head_dim**-0.5 if c.scale_attn_weights else 1.0
        scales = tuple(base / (i + 1) if c.scale_attn_by_inverse_layer_idx else base for i in range(c.n_layer))
        return _Arch(
            "gpt2", c.n_layer, c.n_head, c.n_head, head_dim, c.n_embd, c.vocab_size, float(c.layer_norm_epsilon),
            c.activation_function, scales, int(c.n_positions), attention, (None,) * c.n_layer,
        )  # fmt: skip
    # Llama, Mistral, Qwen2: one layout (see NATIVE_MODELS).
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    if rope_type in _DYNAMIC_ROPE:
        raise ConfigError(f"the native decoder does not run models with rope_type {rope_type!r}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = c.num_key_value_heads or c.num_attention_heads
    if n_kv != c.num_attention_heads:
        attention = "matmul"
    layers = model.model.layers
    scales = tuple(float(getattr(layer.self_attn, "scaling", head_dim**-0.5)) for layer in layers)
    # Qwen2 sets a window per layer (its layer_types); Mistral one for all layers in its config; Llama none.
    windows = tuple(getattr(layer.self_attn, "sliding_window", getattr(c, "sliding_window", None)) for layer in layers)
    return _Arch(
        "llama", c.num_hidden_layers, c.num_attention_heads, n_kv, head_dim, c.hidden_size, c.vocab_size,
        float(c.rms_norm_eps), c.hidden_act, scales, int(c.max_position_embeddings), attention,
        tuple(None if w is None else int(w) for w in windows),
    )  # fmt: skip


def _read_weights(model: torch.nn.Module, arch: _Arch, dtype: torch.dtype, max_len: int) -> dict[str, Any]:
    """The model's current weights as the decoder uses them: detached, in ``dtype``, some fused.

    float32 weights of a float32 model are the parameters themselves (no copy); the fused ones (Llama's
    q/k/v and gate/up projections) and the RoPE tables are small fresh tensors. Called at every
    :meth:`StorySampler.sample`, so weights trained between calls are always the ones sampled from.
    """

    def get(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(dtype)

    def cat(*ts: torch.Tensor | None) -> torch.Tensor | None:
        return None if any(t is None for t in ts) else torch.cat([t.detach() for t in ts], 0).to(dtype)

    w: dict[str, Any] = {"lm_w": get(model.lm_head.weight), "lm_b": get(getattr(model.lm_head, "bias", None))}
    if arch.kind == "gpt2":
        t = model.transformer
        w.update(wte=get(t.wte.weight), wpe=get(t.wpe.weight), lnf_w=get(t.ln_f.weight), lnf_b=get(t.ln_f.bias))
        # transformers' Conv1D computes x @ W + b with W of shape (in, out): kept as is, used with addmm.
        w["layers"] = [
            {
                "ln1_w": get(b.ln_1.weight),
                "ln1_b": get(b.ln_1.bias),
                "qkv_w": get(b.attn.c_attn.weight),
                "qkv_b": get(b.attn.c_attn.bias),
                "o_w": get(b.attn.c_proj.weight),
                "o_b": get(b.attn.c_proj.bias),
                "ln2_w": get(b.ln_2.weight),
                "ln2_b": get(b.ln_2.bias),
                "fc_w": get(b.mlp.c_fc.weight),
                "fc_b": get(b.mlp.c_fc.bias),
                "proj_w": get(b.mlp.c_proj.weight),
                "proj_b": get(b.mlp.c_proj.bias),
            }
            for b in t.h
        ]
        return w
    m = model.model
    w.update(wte=get(m.embed_tokens.weight), norm_w=get(m.norm.weight))
    # RoPE tables, computed as transformers does: angle[p, i] = p * inv_freq[i] in float32, duplicated
    # over the two halves of the head dimension, then cos/sin times the rope type's attention scaling,
    # cast to the model dtype. Reading inv_freq from the model's own rotary module covers every static
    # rope type (default, linear, llama3, yarn, ...) and any rope theta (config.rope_parameters).
    rotary = m.rotary_emb
    inv_freq = rotary.inv_freq.detach().to(torch.float32)
    angles = torch.arange(max_len, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    w["cos"], w["sin"] = (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
    w["layers"] = []
    for layer in m.layers:
        a, mlp = layer.self_attn, layer.mlp
        w["layers"].append(
            {
                "in_w": get(layer.input_layernorm.weight),
                # One matmul for q, k and v: rows [q (H hd); k (Hkv hd); v (Hkv hd)].
                "qkv_w": cat(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                "qkv_b": cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
                "o_w": get(a.o_proj.weight),
                "o_b": get(a.o_proj.bias),
                "post_w": get(layer.post_attention_layernorm.weight),
                # One matmul for the SwiGLU gate and up projections: rows [gate; up].
                "gu_w": cat(mlp.gate_proj.weight, mlp.up_proj.weight),
                "gu_b": cat(mlp.gate_proj.bias, mlp.up_proj.bias),
                "down_w": get(mlp.down_proj.weight),
                "down_b": get(mlp.down_proj.bias),
            }
        )
    return w


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activation ``name`` of a transformers config (``ACT2FN``), with fused kernels for the usual ones."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        # GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the tanh approximation.
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name in ("silu", "swish"):
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    from transformers.activations import ACT2FN

    return ACT2FN[name](x)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: w * (x / sqrt(mean(x^2) + eps)), normalised in float32 and cast back before the gain."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, transformers' rotate_half convention: x cos + [-x2, x1] sin, with x = [x1, x2] split in halves."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _flex_block_mask(pos: torch.Tensor, length: int, window: int | None) -> Any:
    """FlexAttention block mask of one query per slot over a cache of ``length`` positions (a multiple of
    :data:`FLEX_BLOCK`): slot b reads only the blocks that hold its visible positions t <= pos[b] (and, with a
    sliding ``window``, t > pos[b] - window), with those positions masked exactly inside the blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = length // FLEX_BLOCK
    last = torch.div(pos, FLEX_BLOCK, rounding_mode="floor") + 1  # blocks 0 .. last - 1 hold t <= pos
    first = torch.zeros_like(last)  # the first block read; with a window, the one that holds pos - window + 1
    if window is not None:
        first = torch.div((pos - window + 1).clamp(min=0), FLEX_BLOCK, rounding_mode="floor")
    order = torch.arange(blocks, device=pos.device)
    kv_indices = (first[:, None] + order[None, :]).clamp(max=blocks - 1).to(torch.int32)[:, None, None, :]
    kv_num_blocks = (last - first).to(torch.int32)[:, None, None]

    def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        seen = kv_idx <= pos[b]
        return seen if window is None else seen & (kv_idx > pos[b] - window)

    return BlockMask.from_kv_blocks(
        kv_num_blocks, kv_indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=visible, seq_lengths=(1, length),
        compute_q_blocks=False,  # the query-side indices serve only a backward pass
    )  # fmt: skip


def _attend(arch: _Arch, scale: float, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
    """Single-query attention of each slot over its cache: (B, H, hd) x (B, Hkv, T, hd) -> (B, H * hd).

    ``mask`` (B, T) is True where position t <= the slot's position (a :func:`_flex_block_mask` for
    ``flex``). Head h reads kv head h // (H / Hkv), transformers' repeat_kv convention for grouped-query
    attention.
    """
    b, n_head, hd = q.shape
    if arch.attention == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        # The scale is applied to the query, as a product computed in 4-D: the compiled FlexAttention takes its
        # query only as a 4-D buffer (a 4-D view of a 3-D result failed to compile).
        q4 = q.reshape(b, n_head, 1, hd) * scale
        out = flex_attention(q4, k, v, block_mask=mask, scale=1.0, enable_gqa=arch.n_kv_head != n_head)
        return out.reshape(b, n_head * hd)
    if arch.attention == "sdpa":
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale,
            enable_gqa=arch.n_kv_head != n_head,
        )  # fmt: skip
        return out.reshape(b, n_head * hd)
    # Grouped queries: (B, Hkv, group, hd) @ (B, Hkv, hd, T) -> scores (B, Hkv, group, T), so kv heads are
    # never repeated; softmax in float32 over the visible positions, then (B, Hkv, group, T) @ (B, Hkv, T, hd).
    group = n_head // arch.n_kv_head
    qg = q.view(b, arch.n_kv_head, group, hd)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, n_head * hd)


def _decode(
    arch: _Arch,
    w: Mapping[str, Any],
    k_cache: Sequence[torch.Tensor],
    v_cache: Sequence[torch.Tensor],
    tokens: torch.Tensor,
    pos: torch.Tensor,
    rows: torch.Tensor,
    span: torch.Tensor,
) -> torch.Tensor:
    """One decode step: next-token logits (B, V) in float32 of ``tokens`` (B,) fed at positions ``pos`` (B,).

    Writes each slot's key/value at (slot, pos) of every layer's cache (a list of L tensors (B, Hkv, T, hd))
    and attends
    over the cache positions t in ``span`` (the positions 0, 1, ..., length - 1) with t <= pos: a length
    bucket on the static path, just past the largest position in use on the eager path (positions beyond
    a slot's own are masked either way, so stale entries of an earlier story in that slot are never read).
    The length is a tensor dimension, not a Python int, so that a compiled step takes it as a symbol from
    its first compilation; and the caches keep one spare position, so that a span is never the whole buffer
    (a slice of the whole buffer would be compiled apart).
    """
    b = tokens.shape[0]
    n_head, n_kv, hd = arch.n_head, arch.n_kv_head, arch.head_dim
    if arch.attention == "flex":  # the whole cache; each slot reads only its own blocks
        length = k_cache[0].shape[2]
        masks = {w: _flex_block_mask(pos, length, w) for w in arch.windows}
    else:
        length = span.shape[0]
        causal = span[None, :] <= pos[:, None]  # (B, T): True = visible
        # A sliding window W keeps the positions t with pos - W < t <= pos (transformers' sliding-window mask).
        masks = {w: causal if w is None else causal & (span[None, :] > pos[:, None] - w) for w in arch.windows}
    if arch.kind == "gpt2":
        # h_0 = wte[token] + wpe[pos] (learned absolute positions).
        x = F.embedding(tokens, w["wte"]) + F.embedding(pos, w["wpe"])
        for i, lw in enumerate(w["layers"]):
            h = F.layer_norm(x, (arch.hidden,), lw["ln1_w"], lw["ln1_b"], arch.eps)
            qkv = torch.addmm(lw["qkv_b"], h, lw["qkv_w"]).view(b, 3, n_head, hd)  # fused c_attn: [q; k; v]
            q, k, v = qkv.unbind(1)
            k_cache[i][rows, :, pos] = k
            v_cache[i][rows, :, pos] = v
            a = _attend(
                arch, arch.scales[i], q, k_cache[i][:, :, :length], v_cache[i][:, :, :length], masks[arch.windows[i]]
            )
            x = x + torch.addmm(lw["o_b"], a, lw["o_w"])
            h = F.layer_norm(x, (arch.hidden,), lw["ln2_w"], lw["ln2_b"], arch.eps)
            h = _act(arch.act, torch.addmm(lw["fc_b"], h, lw["fc_w"]))
            x = x + torch.addmm(lw["proj_b"], h, lw["proj_w"])
        x = F.layer_norm(x, (arch.hidden,), w["lnf_w"], w["lnf_b"], arch.eps)
    else:
        x = F.embedding(tokens, w["wte"])
        cos, sin = w["cos"][pos][:, None, :], w["sin"][pos][:, None, :]  # (B, 1, hd), broadcast over heads
        n_qk = (n_head + n_kv) * hd
        for i, lw in enumerate(w["layers"]):
            h = _rms_norm(x, lw["in_w"], arch.eps)
            qkv = F.linear(h, lw["qkv_w"], lw["qkv_b"])
            qk = _rotate(qkv[:, :n_qk].view(b, n_head + n_kv, hd), cos, sin)  # RoPE on q and k at once
            q, k = qk[:, :n_head], qk[:, n_head:]
            v = qkv[:, n_qk:].view(b, n_kv, hd)
            k_cache[i][rows, :, pos] = k
            v_cache[i][rows, :, pos] = v
            a = _attend(
                arch, arch.scales[i], q, k_cache[i][:, :, :length], v_cache[i][:, :, :length], masks[arch.windows[i]]
            )
            x = x + F.linear(a, lw["o_w"], lw["o_b"])
            h = _rms_norm(x, lw["post_w"], arch.eps)
            gate, up = F.linear(h, lw["gu_w"], lw["gu_b"]).chunk(2, dim=-1)
            x = x + F.linear(_act(arch.act, gate) * up, lw["down_w"], lw["down_b"])  # SwiGLU
        x = _rms_norm(x, w["norm_w"], arch.eps)
    return F.linear(x, w["lm_w"], w["lm_b"]).float()


class KVDecoder:
    """A static-KV-cache decoder of a transformers GPT-2 or Llama model, one token per slot and step.

    Reads the model's weights when built (build a new one after training the model). ``step(tokens,
    pos)`` feeds ``tokens[b]`` at position ``pos[b]`` of slot ``b`` and returns the next-token logits
    (B, V) in float32; a slot restarts a sequence simply by being fed position 0 again. Positions must
    be fed in order within a sequence (each attends to the cache entries 0..pos of its slot).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        attention: str | None = None,
    ) -> None:
        param = next(model.parameters())
        self.device = param.device
        self.dtype = dtype or param.dtype
        self.arch = _arch_of(model, self.device)
        if attention is not None:
            self.arch = replace(self.arch, attention=attention)
        if max_len > self.arch.positions:
            raise ValueError(f"max_len {max_len} exceeds the model's position limit {self.arch.positions}")
        self.batch_size, self.max_len = batch_size, max_len
        self.weights = _read_weights(model, self.arch, self.dtype, max_len)
        # One spare position, never written or read, so that no attention span is the whole buffer (_decode);
        # FlexAttention reads whole blocks: the buffer is a multiple of the block.
        cache_len = max_len + 1
        if self.arch.attention == "flex":
            cache_len = -(-cache_len // FLEX_BLOCK) * FLEX_BLOCK
        shape = (batch_size, self.arch.n_kv_head, cache_len, self.arch.head_dim)
        # One tensor per layer, not one (L, ...) buffer: a compiled step writes each new key in place only into a
        # whole tensor; into a layer's view of a stacked buffer, inductor copied the layer's cache out, wrote the
        # key, and copied it back (the whole cache several times per step). The compiled FlexAttention on CPU also
        # read a layer's view at the buffer's start (its storage offset lost), i.e. layer 0's cache for every layer.
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.arch.n_layer)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.arch.n_layer)]
        self.rows = torch.arange(batch_size, device=self.device)
        self.positions = torch.arange(cache_len, device=self.device)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Logits (B, V) after feeding ``tokens`` (B,) at ``pos`` (B,); attend over the first ``length`` positions.

        ``length`` defaults to the full buffer (static shapes); any value above ``pos.max()`` gives the
        same logits.
        """
        length = self.max_len if length is None else length
        return _decode(self.arch, self.weights, self.k_cache, self.v_cache, tokens, pos, self.rows, self.span(length))

    def span(self, length: int) -> torch.Tensor:
        """The positions 0, ..., length - 1 (a view, its length marked dynamic for a compiled step)."""
        if not 0 < length <= self.max_len:
            raise ValueError(f"attention length {length} outside 1..{self.max_len}")
        view = self.positions[:length]
        torch._dynamo.maybe_mark_dynamic(view, 0)
        return view


# -------------------------------------------------------------------------------------------- sampling


_CDF_BLOCK = 64
"""Block width of the two-level inverse CDF of :func:`sample_tokens`."""


def sample_tokens(
    logits: torch.Tensor,
    u: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits`` (B, V) by inverse CDF with the uniforms ``u`` (B,) in [0, 1).

    In float32: z = logits / temperature; top-k keeps the tokens whose z is at least the k-th largest
    (ties kept); p = softmax(z); top-p keeps, in decreasing order of p, each token whose preceding mass
    is < top_p * sum(p) (the smallest set reaching top_p; the most likely token always). With the CDF
    c_i = p_1 + ... + p_i of the kept tokens, the token drawn is the first i with c_i > u * c_V: token i
    with probability p_i / c_V, i.e. renormalised over the kept tokens. A filtered token (p_i = 0) is
    never drawn, since c_i = c_{i-1} there. The same ``u`` and logits equal up to rounding give the same
    token unless u * c_V falls within rounding of a boundary c_i (probability ~1e-6 per draw).
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    vocab = z.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        before = cum - sorted_p  # mass of the more likely tokens
        drop_sorted = before >= top_p * cum[:, -1:]
        probs = probs.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), 0.0)
    return _inverse_cdf(probs, u)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index i with c_i > u * c_V, c the cumulative sum of the non-negative ``weights`` (B, V) along V.

    Two levels, because a cumulative sum over a whole vocabulary is a slow sequential scan on CPU: the
    CDF of block sums (blocks of :data:`_CDF_BLOCK` tokens) picks the block, then the CDF within that
    block picks the token. The target is capped just below the total (u * c_V may round up to it) and
    the remainder within the block just below the block's own total, so the index always has w_i > 0.
    """
    b, vocab = weights.shape
    zero = weights.new_zeros(())
    width = _CDF_BLOCK if vocab > 4 * _CDF_BLOCK else vocab
    n_blocks = -(-vocab // width)
    if n_blocks * width != vocab:
        weights = F.pad(weights, (0, n_blocks * width - vocab))
    blocks = weights.view(b, n_blocks, width)
    block_cdf = blocks.sum(dim=-1).cumsum(dim=-1)  # (B, n_blocks)
    total = block_cdf[:, -1:]
    target = torch.minimum(u[:, None].to(total.dtype) * total, torch.nextafter(total, zero))
    j = torch.searchsorted(block_cdf, target, right=True).clamp_(max=n_blocks - 1)  # (B, 1)
    before = torch.where(j > 0, block_cdf.gather(1, (j - 1).clamp_(min=0)), zero)  # mass of blocks < j
    inner_cdf = blocks.gather(1, j[:, :, None].expand(b, 1, width)).squeeze(1).cumsum(dim=-1)  # (B, width)
    rest = torch.minimum(target - before, torch.nextafter(inner_cdf[:, -1:], zero))
    k = torch.searchsorted(inner_cdf, rest, right=True).clamp_(max=width - 1)
    # Weights that are not finite (a diverged model's NaN logits) order nothing: the clamps keep the id a token
    # of the vocabulary even then, so the step cannot index past the embedding (the module refuses such a model).
    return (j * width + k).squeeze(-1).clamp_(max=vocab - 1)


@dataclass(frozen=True)
class _Plan:
    """Constants of one sampling loop (hashable: the key of a compiled step)."""

    arch: _Arch | None  # None: the uncached reference
    batch: int
    max_len: int
    queue: int  # rows of the finished-story queue (a dummy row follows)
    prompt_len: int
    eot: int
    temperature: float
    top_k: int | None
    top_p: float | None


def _advance(plan: _Plan, s: dict[str, torch.Tensor], sampled: torch.Tensor, candidates: torch.Tensor | None) -> None:
    """Bookkeeping of one step, vectorised over slots and free of host syncs (in place on the state ``s``).

    Each slot fed the token at position ``pos``; its next token (position ``pos + 1``) is the sampled one,
    or the prompt's while still inside the prompt. A story is done when that token is a sampled EOT or
    its length ``pos + 2`` reaches max_len. Done stories are appended to the queue (in slot order), and
    each of those slots launches the next story id; ids past n mean "idle". Idle slots keep feeding
    [EOT] at position 0 (their work is thrown away) until all slots are idle.
    """
    n = s["n"]
    npos = s["pos"] + 1
    tok = sampled
    eos = sampled == plan.eot
    if plan.prompt_len > 1:  # first_token_inclusive: position 1 is the story's first token, forced
        forced = npos < plan.prompt_len
        tok = torch.where(forced, s["first"], sampled)
        eos = eos & ~forced
    s["seq"][s["rows"], npos] = tok.to(s["seq"].dtype)
    done = eos | (npos >= plan.max_len - 1)
    emit = done & (s["story"] < n)
    emit_l = emit.long()
    rank = emit_l.cumsum(0) - emit_l  # among emitting slots: 0, 1, 2, ... in slot order
    dest = torch.where(emit, s["q_ptr"] + rank, plan.queue)  # non-emitting slots write the dummy row
    s["q_tok"][dest] = s["seq"]
    s["q_meta"][dest] = torch.stack((s["story"], npos + 1, eos.long()), dim=1)  # (story id, length, finished)
    n_emit = emit_l.sum()
    s["q_ptr"].add_(n_emit)
    story = torch.where(emit, torch.minimum(s["next_id"] + rank, n), s["story"])
    s["next_id"].add_(n_emit)
    reset = emit | (story >= n)
    s["story"].copy_(story)
    s["pos"].copy_(torch.where(reset, 0, npos))
    s["cur"].copy_(torch.where(reset, plan.eot, tok))
    if plan.prompt_len > 1:
        s["first"].copy_(torch.where(reset, candidates, s["first"]))


def _cached_step(
    plan: _Plan,
    w: Mapping[str, Any],
    k_cache: Sequence[torch.Tensor],
    v_cache: Sequence[torch.Tensor],
    s: dict[str, torch.Tensor],
    u: torch.Tensor,
    candidates: torch.Tensor | None,
    span: torch.Tensor,
) -> None:
    """Decode, sample and advance every slot by one token (the unit that is compiled / graph-captured), attending
    over the positions ``span`` (:meth:`KVDecoder.span`)."""
    logits = _decode(plan.arch, w, k_cache, v_cache, s["cur"], s["pos"], s["rows"], span)
    _advance(plan, s, sample_tokens(logits, u, plan.temperature, plan.top_k, plan.top_p), candidates)


_COMPILED: dict[_Plan, Callable] = {}


@dataclass
class _Engine:
    """What a sampler keeps between calls for one plan, so that drawing a corpus chunk by chunk reads the weights,
    allocates the caches and captures the CUDA graphs once: the decoder, the loop state (reset in place at each
    call: the graphs read it where it is), the bound decode step and the graphs' fixed input buffers."""

    decoder: KVDecoder
    s: dict[str, torch.Tensor]
    step: Callable
    fallback: Callable | None  # the uncompiled step, should compiling fail under --sampling.compile auto
    u_buf: torch.Tensor
    cand_buf: torch.Tensor | None
    replays: dict[int, Callable[[], None]] = field(default_factory=dict)  # attention length -> replay
    pool: Any = None  # the CUDA graphs' shared memory pool
    graphs_ok: bool = True
    compiled: bool = False  # whether ``step`` is the compiled one


def _compiled_step(plan: _Plan) -> Callable:
    """torch.compile of the static step of ``plan``, made once per plan and reused (weights are arguments).

    Tensor shapes are fixed by the plan but for the attention span's length, a symbol from the first
    compilation (:func:`_decode`): one compilation serves every length bucket."""
    if plan not in _COMPILED:
        _COMPILED[plan] = torch.compile(functools.partial(_cached_step, plan), dynamic=None)
    return _COMPILED[plan]


class StorySampler:
    """Sample a corpus of stories from a causal LM: natively (GPT-2, Llama family) or with generate() (see above).

    ``max_len`` is the model's context length, used when ``cfg.max_len`` is None; ``cfg.max_len`` may not
    exceed it. ``first_tokens``: the candidate first tokens (token 1 of each real training story, with
    repeats, so that frequent first tokens are drawn more often), required by ``first_token_inclusive``.
    The model is read at every :meth:`sample` call, so one sampler serves a model that keeps training.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: SamplingConfig,
        *,
        max_len: int,
        eot_id: int = 0,
        pad_id: int = 1,
        first_tokens: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        device = next(model.parameters()).device
        # ConfigError for a model that cannot be sampled (or not natively with --sampling.backend native).
        self.backend = choose_backend(model.config, cfg.backend, model)
        self.arch = _arch_of(model, device) if self.backend == "native" else None
        vocab = self.vocab = self.arch.vocab if self.arch else int(model.get_output_embeddings().weight.shape[0])
        positions = self.arch.positions if self.arch else _position_limit(model.config)
        if cfg.max_len is not None and cfg.max_len > max_len:
            raise ConfigError(f"--sampling.max_len must be at most {max_len} (the context length), got {cfg.max_len}")
        self.max_len = cfg.max_len if cfg.max_len is not None else max_len
        self.prompt_len = prompt_length(cfg.strategy)
        if not (_is_int(self.max_len) and self.max_len >= self.prompt_len + 1):
            raise ConfigError(
                f"--sampling.max_len must be at least {self.prompt_len + 1} (the prompt of {cfg.strategy} plus one "
                f"token), got {self.max_len!r}"
            )
        if positions is not None and self.max_len > positions:
            raise ConfigError(
                f"--sampling.max_len must be at most {positions} (the model's position limit), got {self.max_len}"
            )
        for name, value in (("eot_id", eot_id), ("pad_id", pad_id)):
            if not (_is_int(value) and 0 <= value < vocab):
                raise ValueError(f"{name} must be a token id in [0, {vocab}), got {value!r}")
        self.eot_id, self.pad_id = eot_id, pad_id
        self.first_tokens: torch.Tensor | None = None
        if cfg.strategy == "first_token_inclusive":
            if isinstance(first_tokens, torch.Tensor):
                pool = first_tokens.detach().cpu().reshape(-1)
            else:
                pool = torch.as_tensor(np.asarray(first_tokens if first_tokens is not None else [])).reshape(-1)
            if pool.numel() == 0:
                raise ConfigError(
                    "--sampling.strategy first_token_inclusive needs the first tokens of real stories, none were given"
                )
            if pool.is_floating_point() or pool.dtype == torch.bool or int(pool.min()) < 0 or int(pool.max()) >= vocab:
                raise ValueError(f"first_tokens must be token ids in [0, {vocab})")
            self.first_tokens = pool.long()
        self._force_static = False  # tests: take the static (bucketed) path without compiling
        self._engines: dict[tuple[_Plan, bool], _Engine] = {}
        self._weights: tuple[tuple[int, int], ...] | None = None  # the weights the engines were built from
        self._bucket = LENGTH_BUCKET  # tests: narrower buckets
        self._whole_context = False  # --sampling.attention flex on the static path: no length buckets
        self._flex_read = 0  # flex: cache positions the slots read per step, as of the last sync
        self._stories_done = 0  # of the current sample() call, as of the last sync
        self.last_draw: dict[str, int] = {"steps": 0, "slots": 0, "attended": 0}
        """Of the last :meth:`sample` call (native backend): decoding ``steps``, ``slots`` and ``attended``, the
        sum over steps of slots x attention length, i.e. the cache positions each step read (host counts)."""

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, use_cache: bool = True) -> dict[str, np.ndarray]:
        """Sample ``n`` stories: ``{"tokens", "lengths", "finished"}`` as NumPy arrays.

        ``tokens`` (n, max_len) uint16 (int32 for vocabularies over 65,536 tokens): each row the prompt,
        the sampled tokens and, if finished, the final EOT, then ``pad_id``. ``lengths`` (n,) int32 counts
        all of a row's tokens but the padding; ``finished`` (n,) bool is True when the story ended with a
        sampled EOT (False: cut at max_len). Row i is the i-th story launched.

        All randomness comes from ``generator`` (on the model's device): the output is a function of the
        model, the config, ``n`` and the generator's state. ``use_cache=False`` runs the original
        transformers forward on every slot's whole sequence at each step instead of the KV-cached
        decoder: slow, for checking; it draws the same tokens. The model's train/eval mode is restored.
        """
        if not (_is_int(n) and n >= 0):
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        device = next(self.model.parameters()).device
        if generator.device.type != device.type:
            raise ValueError(f"the generator is on {generator.device}, the model on {device}; they must match")
        out_dtype = np.uint16 if self.vocab <= 1 << 16 else np.int32
        tokens = np.full((n, self.max_len), self.pad_id, dtype=out_dtype)
        lengths = np.zeros(n, dtype=np.int32)
        finished = np.zeros(n, dtype=bool)
        if n == 0:
            return {"tokens": tokens, "lengths": lengths, "finished": finished}
        was_training = self.model.training
        self.model.eval()
        self.last_draw = {"steps": 0, "slots": 0, "attended": 0}
        self._stories_done = 0  # reported to a progress line as stories finish (report_within)
        try:
            if self.backend == "hf" and use_cache:
                self._run_hf(n, generator, device, tokens, lengths, finished)
            else:
                self._run(n, generator, use_cache, device, tokens, lengths, finished)
        finally:
            self.model.train(was_training)
        return {"tokens": tokens, "lengths": lengths, "finished": finished}

    # ------------------------------------------------------------------------------------ internals

    def _run(
        self,
        n: int,
        generator: torch.Generator,
        use_cache: bool,
        device: torch.device,
        tokens: np.ndarray,
        lengths: np.ndarray,
        finished: np.ndarray,
    ) -> None:
        cfg = self.cfg
        compiles = resolve_compile(cfg.compile, device)
        compiled = use_cache and compiles
        static = use_cache and (compiled or self._force_static)
        # The static path keeps every slot even for fewer stories (the spare ones idle): one engine, one
        # compilation and one set of graphs per sampler, where a short last chunk would build a second of each.
        # The uncached reference takes the same slots, so that it draws the same tokens.
        batch = self.slots(device) if compiles or self._force_static else min(self.slots(device), n)
        arch = _arch_of(self.model, device) if use_cache else None
        if arch is not None and static and cfg.attention == "flex":
            arch = replace(arch, attention="flex")
        plan = _Plan(
            arch, batch, self.max_len, SYNC_EVERY * batch, self.prompt_len, self.eot_id, float(cfg.temperature),
            cfg.top_k, cfg.top_p,
        )  # fmt: skip
        self._whole_context = arch is not None and arch.attention == "flex"  # no length buckets
        pool = None if self.first_tokens is None else self.first_tokens.to(device)

        def draw_candidates() -> torch.Tensor | None:
            # first_token_inclusive: one candidate first token per slot and step (fixed consumption); a slot
            # launching a story takes its candidate, the others ignore theirs.
            if pool is None:
                return None
            return pool[torch.randint(len(pool), (batch,), generator=generator, device=device)]

        if use_cache:
            engine = self._engine(plan, device, compiled)
            self._reset_state(engine.s, plan, n, draw_candidates())
            s, step = engine.s, engine.step
        else:
            s = self._initial_state(plan, n, device, draw_candidates())
            model = self.model

            def step(u: torch.Tensor, cand: torch.Tensor | None, length: int) -> None:
                logits = self._reference_logits(model, s, length)
                _advance(plan, s, sample_tokens(logits, u, plan.temperature, plan.top_k, plan.top_p), cand)

        if static and self._use_graphs(device):
            self._loop_cuda_graph(plan, engine, generator, draw_candidates, tokens, lengths, finished)
            return
        steps, length = 0, self.max_len
        while True:
            if static:
                if steps % SYNC_EVERY == 0:  # the only reads from the device: one every SYNC_EVERY steps
                    active, length = self._sync(s, tokens, lengths, finished)
                    if not active:
                        break
            else:
                # Eager: attend only to the positions in use (one host sync per step; free on CPU).
                pos_max, active = torch.stack([s["pos"].max(), (s["story"] < s["n"]).sum()]).tolist()
                if active == 0:
                    break
                length = pos_max + 1
            u = torch.rand(batch, generator=generator, device=device)
            step(u, draw_candidates(), length)
            steps += 1
            self._count_step(batch, length)
            if not static and steps % SYNC_EVERY == 0:
                self._flush(s, tokens, lengths, finished)
        self._flush(s, tokens, lengths, finished)

    def _engine(self, plan: _Plan, device: torch.device, compiled: bool) -> _Engine:
        """The :class:`_Engine` of ``plan``, built on first use and kept while the model's weights stay the same.

        The weights are checked at every call (each parameter's storage and version counter, which any
        in-place update such as an optimizer step or a loaded state dict advances): when they have changed,
        every engine is dropped and the decoder reads them again.
        """
        weights = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if weights != self._weights:
            self._engines.clear()
            self._weights = weights
        key = (plan, compiled)
        if key not in self._engines:
            decoder = KVDecoder(
                self.model, plan.batch, self.max_len, dtype=resolve_dtype(self.cfg.dtype, device),
                attention=plan.arch.attention,
            )  # fmt: skip
            candidates = None if self.first_tokens is None else torch.zeros(plan.batch, dtype=torch.long, device=device)
            s = self._initial_state(plan, plan.batch, device, candidates)
            w, kc, vc = decoder.weights, decoder.k_cache, decoder.v_cache

            def bind(fn: Callable) -> Callable:
                return lambda u, cand, length: fn(w, kc, vc, s, u, cand, decoder.span(length))

            eager_step = functools.partial(_cached_step, plan)
            fallback = bind(eager_step) if compiled and self.cfg.compile == "auto" else None
            self._engines[key] = _Engine(
                decoder, s, bind(_compiled_step(plan) if compiled else eager_step), fallback,
                u_buf=torch.full((plan.batch,), 0.5, device=device),
                cand_buf=None if candidates is None else candidates.clone(), compiled=compiled,
            )  # fmt: skip
        return self._engines[key]

    def _count_step(self, slots: int, length: int) -> None:
        draw = self.last_draw
        draw["steps"] += 1
        draw["slots"] = slots
        # flex: the blocks each slot read at the last sync (a slot crossing into a new block before the next
        # sync reads one more, not counted); else every slot attends over the same length.
        draw["attended"] += self._flex_read if self._whole_context else slots * length

    def slots(self, device: torch.device) -> int:
        """Stories decoded at once on ``device``: ``--sampling.batch_size``, or :func:`auto_batch_size` for auto."""
        if self.cfg.batch_size == "auto":
            dtype_bytes = 4 if self.backend == "hf" else 2
            return auto_batch_size(self.model.config, self.max_len, device.type == "cuda", dtype_bytes)
        return int(self.cfg.batch_size)

    def release(self) -> None:
        """Free what the sampler keeps between calls (decoders, KV caches, CUDA graphs); the next call rebuilds it.

        On a GPU the freed memory (the graphs' private pool included) goes back to the device, so that the next
        generation's training can use it.
        """
        on_cuda = any(e.s["pos"].device.type == "cuda" for e in self._engines.values())
        self._engines.clear()
        self._weights = None
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def _run_hf(
        self,
        n: int,
        generator: torch.Generator,
        device: torch.device,
        tokens: np.ndarray,
        lengths: np.ndarray,
        finished: np.ndarray,
    ) -> None:
        """The hf backend: transformers' ``generate()`` on chunks of ``batch_size`` stories, with a static cache.

        Per chunk the prompts' first tokens (``first_token_inclusive``) and then one seed are drawn from
        ``generator``; ``generate()`` samples from the global RNG, forked and seeded with that seed, so the
        output is still a function of the generator's state. The filters are transformers' (top-k, then
        top-p, after the temperature), in the model's own dtype (float32 as trained).
        """
        from transformers import GenerationConfig

        cfg = self.cfg
        batch = min(self.slots(device), n)
        # Models that compile with full graphs take a static cache; the others keep their dynamic one.
        static = bool(getattr(self.model, "_can_compile_fullgraph", False))
        settings = GenerationConfig(
            do_sample=True, temperature=float(cfg.temperature), top_k=cfg.top_k or 0,
            top_p=1.0 if cfg.top_p is None else float(cfg.top_p), max_length=self.max_len, min_length=0,
            repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, num_return_sequences=1,
            eos_token_id=self.eot_id, pad_token_id=self.pad_id, bos_token_id=self.eot_id,
            cache_implementation="static" if static else None,
        )  # fmt: skip
        pool = None if self.first_tokens is None else self.first_tokens.to(device)
        for start in range(0, n, batch):
            b = min(batch, n - start)
            prompt = torch.full((b, self.prompt_len), self.eot_id, dtype=torch.long, device=device)
            if pool is not None:
                prompt[:, 1] = pool[torch.randint(len(pool), (b,), generator=generator, device=device)]
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = self.model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=settings
                )
            seq = out[:, : self.max_len].cpu()
            eot = seq[:, self.prompt_len :] == self.eot_id  # (b, T - prompt): the first one ends the story
            ended = eot.any(dim=1)
            length = torch.where(ended, self.prompt_len + eot.int().argmax(dim=1) + 1, seq.shape[1])
            keep = torch.arange(seq.shape[1])[None, :] < length[:, None]
            rows = slice(start, start + b)
            tokens[rows, : seq.shape[1]] = seq.masked_fill(~keep, self.pad_id).numpy()
            lengths[rows] = length.numpy()
            finished[rows] = ended.numpy()
            self._stories_done += b
            report_within(self._stories_done)

    def _use_graphs(self, device: torch.device) -> bool:
        """Whether the static step is replayed as a CUDA graph (on CUDA; a method so tests can simulate it)."""
        return device.type == "cuda"

    def _initial_state(
        self, plan: _Plan, n: int, device: torch.device, candidates: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Slots 0..B-1 start stories 0..B-1 at position 0 with token EOT; empty queue."""
        batch, max_len = plan.batch, plan.max_len

        def full(shape: tuple[int, ...], value: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.full(shape, value, dtype=dtype, device=device)

        seq_dtype = torch.int32 if self.vocab < 2**31 else torch.long
        s = {
            "rows": torch.arange(batch, device=device),
            "positions": torch.arange(max_len, device=device),
            "n": torch.tensor(n, device=device),
            "next_id": torch.tensor(batch, device=device),
            "story": torch.arange(batch, device=device),
            "pos": full((batch,), 0),
            "cur": full((batch,), self.eot_id),
            # Every sequence starts with EOT; position 0 is never written after this.
            "seq": full((batch, max_len), self.eot_id, seq_dtype),
            "q_tok": full((plan.queue + 1, max_len), self.pad_id, seq_dtype),
            "q_meta": full((plan.queue + 1, 3), 0),
            "q_ptr": torch.tensor(0, device=device),
        }
        if candidates is not None:
            s["first"] = candidates.clone()
        return s

    def _reset_state(self, s: dict[str, torch.Tensor], plan: _Plan, n: int, candidates: torch.Tensor | None) -> None:
        """Put a kept state back to :meth:`_initial_state`'s values for ``n`` stories, in place."""
        s["n"].fill_(n)
        s["next_id"].fill_(plan.batch)
        s["story"].copy_(s["rows"])
        s["pos"].zero_()
        s["cur"].fill_(self.eot_id)
        s["seq"].fill_(self.eot_id)
        s["q_tok"].fill_(self.pad_id)
        s["q_meta"].zero_()
        s["q_ptr"].zero_()
        if candidates is not None:
            s["first"].copy_(candidates)

    def _reference_logits(self, model: torch.nn.Module, s: dict[str, torch.Tensor], length: int) -> torch.Tensor:
        """Next-token logits of every slot from the transformers forward on its whole sequence (no cache).

        The slots' sequences form a right-padded batch (B, length) with an attention mask; the logits
        are those at each slot's last position.
        """
        visible = s["positions"][:length][None, :] <= s["pos"][:, None]
        ids = s["seq"][:, :length].long().masked_fill(~visible, self.pad_id)
        logits = model(input_ids=ids, attention_mask=visible.long(), use_cache=False).logits
        return logits[s["rows"], s["pos"]].float()

    def _attention_lengths(self) -> list[int]:
        """Every length :meth:`_attention_length` can give: the bucket's multiples below max_len, and max_len."""
        if self._whole_context:
            return [self.max_len]
        return sorted({min(self.max_len, k * self._bucket) for k in range(1, -(-self.max_len // self._bucket) + 1)})

    def _attention_length(self, pos_max: int) -> int:
        """The bucketed attention length of the next :data:`SYNC_EVERY` static steps, given the largest position
        in use: positions grow by at most one per step, so those steps feed positions < pos_max + SYNC_EVERY."""
        if self._whole_context:  # flex: every slot reads its own blocks of the whole cache
            return self.max_len
        need = pos_max + SYNC_EVERY
        return min(self.max_len, -(-need // self._bucket) * self._bucket)

    def _sync(
        self, s: dict[str, torch.Tensor], tokens: np.ndarray, lengths: np.ndarray, finished: np.ndarray
    ) -> tuple[bool, int]:
        """The static path's sync point: flush the finished stories and return (whether any story is still
        running or waiting, the attention length of the next steps). Two reads from the device: the counts,
        then (when stories finished) their rows and metadata together."""
        blocks = (torch.div(s["pos"], FLEX_BLOCK, rounding_mode="floor") + 1).sum()  # flex: blocks the slots read
        count, active, pos_max, blocks = torch.stack(
            [s["q_ptr"], (s["story"] < s["n"]).sum(), s["pos"].max(), blocks]
        ).tolist()
        self._flex_read = blocks * FLEX_BLOCK
        self._flush(s, tokens, lengths, finished, count)
        return active > 0, self._attention_length(pos_max)

    def _flush(
        self,
        s: dict[str, torch.Tensor],
        tokens: np.ndarray,
        lengths: np.ndarray,
        finished: np.ndarray,
        count: int | None = None,
    ) -> None:
        """Copy the queued finished stories (``count`` of them, if already read) to the output rows of their ids
        (padding past their length)."""
        count = int(s["q_ptr"]) if count is None else count
        if count:
            meta = s["q_meta"][:count]
            rows = s["q_tok"][:count].masked_fill(s["positions"][None, :] >= meta[:, 1:2], self.pad_id)
            # One read from the device for both (the metadata as the first three columns, in int32 like the
            # tokens: story ids, lengths and flags all fit).
            read = torch.cat((meta.to(torch.int32), rows.to(torch.int32)), dim=1).cpu().numpy()
            ids, lens, fins = read[:, :3].T
            tokens[ids] = read[:, 3:]
            lengths[ids] = lens
            finished[ids] = fins.astype(bool)
            self._stories_done += count
            report_within(self._stories_done)
        s["q_ptr"].zero_()

    def _loop_cuda_graph(
        self,
        plan: _Plan,
        engine: _Engine,
        generator: torch.Generator,
        draw_candidates: Callable[[], torch.Tensor | None],
        tokens: np.ndarray,
        lengths: np.ndarray,
        finished: np.ndarray,
    ) -> None:
        """The static step captured as a CUDA graph per attention length and replayed; a host sync every
        SYNC_EVERY steps, where the next steps' length bucket is chosen (:meth:`_sync`).

        The uniforms (and first-token candidates) are drawn eagerly into the engine's fixed buffers before
        each replay, so the graphs hold no random number generation. Every bucket's graph is captured at the
        engine's first call, after warm-up runs (the first of which compiles), and kept for later calls; a
        length found missing later (none is, unless a capture failed) is warmed up when first needed. The
        warm-up runs with every slot idle (an idle slot feeds ``[EOT]`` at position 0), and the state is
        saved before and restored after it: so the only cache entries it writes are those of ``[EOT]`` at
        position 0, which every story starts with, and stories in progress read the same values there as
        before. Should a warm-up (compilation) fail and a ``fallback`` step be given, that one is used from
        then on, with a warning; should a capture fail, the steps run without graphs from then on, with a
        warning. The graphs share one memory pool: they run one at a time and keep nothing in it between
        replays (every output is written into the state in place).
        """
        s, u_buf, cand_buf = engine.s, engine.u_buf, engine.cand_buf
        device = s["pos"].device

        def warm_up(fn: Callable, length: int) -> None:
            saved = {k: v.clone() for k, v in s.items()}
            s["story"].copy_(s["n"].expand_as(s["story"]))  # every slot idle: [EOT] at position 0
            s["pos"].zero_()
            s["cur"].fill_(plan.eot)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    for _ in range(3):
                        fn(u_buf, cand_buf, length)
            finally:
                torch.cuda.current_stream().wait_stream(side)
                for k, v in s.items():
                    v.copy_(saved[k])

        def replay_of(length: int) -> Callable[[], None]:
            try:
                warm_up(engine.step, length)
            except Exception as exc:
                if engine.fallback is None:
                    raise
                log.warning("sampling: compiling the decode step failed (%s); running it uncompiled", exc)
                engine.step, engine.fallback, engine.compiled = engine.fallback, None, False
                warm_up(engine.step, length)
            fn = engine.step
            if engine.graphs_ok:
                try:
                    engine.pool = torch.cuda.graph_pool_handle() if engine.pool is None else engine.pool
                    graph = torch.cuda.CUDAGraph()
                    # thread_local: CUDA calls of other threads (a data loader's pin-memory thread) do not
                    # invalidate the capture, as they would in the default global mode.
                    with torch.cuda.graph(graph, pool=engine.pool, capture_error_mode="thread_local"):
                        fn(u_buf, cand_buf, length)
                    return graph.replay
                except Exception as exc:  # a capture failure must not lose the run: warn and go on without graphs
                    log.warning("sampling: CUDA graph capture failed (%s); running the compiled step without it", exc)
                    engine.graphs_ok = False
                    torch.cuda.synchronize()
            return lambda: fn(u_buf, cand_buf, length)

        if not engine.replays:
            start = time.perf_counter()
            buckets = self._attention_lengths()
            for length in buckets:
                engine.replays[length] = replay_of(length)
            torch.cuda.synchronize()
            log.info(
                "sampling: decode step (%s) and %d CUDA graphs (attention lengths %d..%d) ready in %.1fs",
                "compiled" if engine.compiled else "not compiled",
                len(buckets) if engine.graphs_ok else 0,
                buckets[0],
                buckets[-1],
                time.perf_counter() - start,
            )
        steps, length = 0, self.max_len
        while True:
            if steps % SYNC_EVERY == 0:
                active, length = self._sync(s, tokens, lengths, finished)
                if not active:
                    break
            if length not in engine.replays:
                engine.replays[length] = replay_of(length)
            torch.rand(plan.batch, generator=generator, device=device, out=u_buf)
            if cand_buf is not None:
                cand_buf.copy_(draw_candidates())
            engine.replays[length]()
            steps += 1
            self._count_step(plan.batch, length)
        self._flush(s, tokens, lengths, finished)


def _position_limit(config: Any) -> int | None:
    """``max_position_embeddings`` (``n_positions`` for GPT-2) of a transformers config; None if it has none."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def sample_stats(out: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Summary of a :meth:`StorySampler.sample` result: ``n``, ``finished_fraction``, ``mean_length``, ``max_length``.

    Fractions and means are NaN for an empty sample.
    """
    lengths = np.asarray(out["lengths"])
    n = int(lengths.size)
    if n == 0:
        return {"n": 0, "finished_fraction": float("nan"), "mean_length": float("nan"), "max_length": 0}
    return {
        "n": n,
        "finished_fraction": float(np.mean(out["finished"])),
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
    }


__all__ = [
    "ATTENTIONS",
    "BACKENDS",
    "COMPILE_MODES",
    "DTYPES",
    "STRATEGIES",
    "SYNC_EVERY",
    "NATIVE_MODELS",
    "KVDecoder",
    "SamplingConfig",
    "auto_batch_size",
    "check_kv_memory",
    "kv_bytes_per_slot",
    "StorySampler",
    "choose_backend",
    "native_unsupported",
    "prompt_length",
    "resolve_compile",
    "resolve_dtype",
    "sample_stats",
    "sample_tokens",
]
