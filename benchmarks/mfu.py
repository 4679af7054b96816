"""Model FLOPs utilisation (MFU) of causal-LM training: the FLOP count of a batch and the GPUs' peak rates.

Model FLOPs of one training step (forward and backward) on a story of ``l`` real (non-padding) tokens:

    F(l) = 6 N l + 12 n_layer d_attn l^2,

i.e. ``6 N + 12 n_layer d_attn T`` per real token with ``T = l``, the convention of the PaLM paper's
appendix B (6N, plus 12 L H Q T for attention, H Q = d_attn the attention width):

* ``6 N``: each parameter that enters a matrix multiply costs 2 FLOPs per token forward and 4 backward.
  N is every parameter but the input embeddings (the token and learned position lookups, which multiply
  nothing), with the output head counted, also when it is tied to the token embedding: the head is a
  d x V matrix multiply on every token (at V = 8,000 it is about a quarter of gpt2-9m's N).
* ``12 n_layer d_attn T``: per layer, ``Q K^T`` and ``A V`` cost 2 d_attn T FLOPs each per token forward,
  three times that with the backward; counted over all T keys (the causal mask's skipped half is not
  subtracted, as in PaLM).
* ``T`` is the story's real length, not the padded row length: attention to padding, and the padding rows'
  matrix multiplies, are work the hardware does but the model does not need, so they lower MFU instead of
  counting. Packed rows (each story attending only to itself) give the same count.

MFU = model FLOPs per second / the device's dense bf16 peak (:func:`resolve_peak`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH200\b(?!.*\bNVL\b)", 989.4),  # H200 SXM: 1,979 TFLOP/s with 2:4 sparsity, half of it dense
    (r"\bH100\b.*\b(SXM|HBM3)\b", 989.4),  # H100 SXM ("NVIDIA H100 80GB HBM3"); the PCIe and NVL cards are slower
    (r"\bA100\b", 312.0),  # A100 SXM and PCIe
    (r"\bL4\b", 121.0),  # L4: 242 TFLOP/s with sparsity (not the L40 / L40S)
)
"""Dense bf16 tensor-core peak in TFLOP/s by CUDA device name (a regular expression), from the vendor datasheets."""

NO_PEAK = "n/a (no peak known; pass --peak_tflops)"
"""What an MFU line says when the device's peak is unknown."""

PEAK_MEMORY_TBS: tuple[tuple[str, float], ...] = (
    (r"\bH200\b(?!.*\bNVL\b)", 4.8),  # H200 SXM, HBM3e
    (r"\bH100\b.*\b(SXM|HBM3)\b", 3.35),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    (r"\bA100-SXM4-80GB\b", 2.039),
    (r"\bA100-SXM4-40GB\b", 1.555),
    (r"\bL4\b", 0.3),
)
"""Peak device-memory bandwidth in TB/s by CUDA device name (a regular expression), from the vendor datasheets."""


@dataclass(frozen=True)
class FlopShape:
    """What the FLOP count needs of a model: N (matrix-multiply parameters), layers and attention width."""

    matmul_params: int
    n_layer: int
    d_attn: int


def flop_shape(model: nn.Module) -> FlopShape:
    """The :class:`FlopShape` of a transformers causal LM, read from the built model and its config.

    N: the unique parameters outside ``nn.Embedding`` modules, plus the output head's weight when it is
    one of those embeddings (tied). ``d_attn`` = heads x head width (``hidden_size`` unless ``head_dim`` is set).
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids)
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in embedding_ids:
        n += head.weight.numel()  # tied: the token embedding is also the d x V output multiply
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FlopShape(matmul_params=n, n_layer=config.num_hidden_layers, d_attn=heads * head_dim)


def training_flops(shape: FlopShape, lengths: Iterable[int]) -> float:
    """Model FLOPs of one training pass (forward and backward) over stories of real lengths ``lengths``.

    sum over stories of ``6 N l + 12 n_layer d_attn l^2``.
    """
    lengths = [int(length) for length in lengths]
    return flops_of_sums(shape, sum(lengths), sum(length * length for length in lengths))


def flops_of_sums(shape: FlopShape, tokens: float, squares: float) -> float:
    """:func:`training_flops` from the sums over the stories of ``l`` (``tokens``) and of ``l^2`` (``squares``)."""
    return 6.0 * shape.matmul_params * float(tokens) + 12.0 * shape.n_layer * shape.d_attn * float(squares)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak (TFLOP/s) of the CUDA device named ``device_name``, or None when it is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def resolve_peak(device: str, flag: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s or None, where it comes from): ``--peak_tflops`` if given, else the table for a CUDA device."""
    if flag is not None:
        return flag, "--peak_tflops"
    if not device.startswith("cuda"):
        return None, "none known for a CPU"
    import torch

    name = torch.cuda.get_device_name()
    peak = peak_tflops(name)
    return peak, f"{name}, vendor datasheet" if peak is not None else f"{name} is not in the table"


def peak_memory_tbs(device_name: str) -> float | None:
    """Peak memory bandwidth (TB/s) of the CUDA device named ``device_name``, or None when it is not in the table."""
    return next((tbs for pattern, tbs in PEAK_MEMORY_TBS if re.search(pattern, device_name)), None)


def resolve_bandwidth(device: str, flag: float | None) -> tuple[float | None, str]:
    """(peak memory bandwidth TB/s or None, where it comes from): ``--bandwidth_tbs`` if given, else the table."""
    if flag is not None:
        return flag, "--bandwidth_tbs"
    if not device.startswith("cuda"):
        return None, "none known for a CPU"
    import torch

    name = torch.cuda.get_device_name()
    found = peak_memory_tbs(name)
    return found, f"{name}, vendor datasheet" if found is not None else f"{name} is not in the table"


def mfu_text(flops_per_s: float, peak: float | None) -> str:
    """The value of an MFU line: the fraction of the peak, or :data:`NO_PEAK`."""
    return NO_PEAK if peak is None else f"{flops_per_s / (peak * 1e12):.3f}"


def counting_text(shape: FlopShape, peak: float | None, source: str) -> str:
    """The value of the ``mfu_counting`` line: the formula, this model's numbers and the peak used."""
    peak_text = f"{peak:g} TFLOP/s dense bf16 ({source})" if peak is not None else f"no peak ({source})"
    return (
        f"6*N + 12*n_layer*d_attn*T FLOPs per real token, T = the story's real length (padding not counted); "
        f"N = {shape.matmul_params} matmul parameters (all but the input embeddings; output head counted), "
        f"n_layer = {shape.n_layer}, d_attn = {shape.d_attn}; peak: {peak_text}"
    )
