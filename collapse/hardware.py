"""Process-wide settings that make CPU training fast.

Training a transformer on a CPU allocates and frees the same large buffers every step (the logits
of a batch over an 8,000-token vocabulary are over 100 MB). glibc's ``malloc`` serves blocks that
large with a fresh ``mmap`` and hands them back with ``munmap`` when freed, so every step pays to
have the kernel zero-fill new pages: on the 2-core build machine more than half of a TinyStories
generation's wall time was kernel time (sys 38 s of 47 s). :func:`retain_freed_memory` tells
``malloc`` to keep freed memory in the heap for the next step instead; the same generation then
takes 19 s. The cost is that the process keeps its peak memory until it exits, which a training
process does anyway.

Set ``COLLAPSE_KEEP_MALLOC=1`` to leave the allocator alone (for example to profile memory).

On a CUDA GPU, :func:`tf32_matmuls` lets float32 matrix products (a ``32-true`` run, the float32 parts of
a mixed-precision one) use TF32 tensor cores.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TOP_PAD_BYTES = 64 << 20
"""Extra heap requested with each growth, so a growing heap is extended a few times, not every step."""

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Make glibc's ``malloc`` reuse freed memory instead of returning it to the kernel; True if applied.

    Three ``mallopt`` settings: no ``mmap`` for large blocks (they come from the heap, where freed
    blocks are reused), never trim the heap's top, and grow it in 64 MB steps. A no-op returning
    False off Linux/glibc (macOS's allocator caches large blocks itself) or with ``COLLAPSE_KEEP_MALLOC=1``.
    Safe to call more than once.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("COLLAPSE_KEEP_MALLOC", "") not in ("", "0"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    ok = mallopt(_M_TOP_PAD, _TOP_PAD_BYTES) == 1 and ok
    _applied = ok
    return ok


def tf32_matmuls() -> bool:
    """On a CUDA machine, let float32 matrix products and convolutions use TF32 (``torch.set_float32_matmul_precision
    ("high")``: 10 mantissa bits per product, float32 sums), the speed Lightning suggests; True if applied.

    A no-op in a process that has not imported torch (the analytic recipes never load it), without CUDA (a
    CPU computes float32 exactly as before), when a precision other than torch's default was chosen already,
    or with ``COLLAPSE_FULL_FP32=1`` (full float32 products, e.g. to compare against a reference run).
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or os.environ.get("COLLAPSE_FULL_FP32", "") not in ("", "0"):
        return False
    if torch.get_float32_matmul_precision() != "highest":  # somebody chose already
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def smallest_gpu_memory() -> int | None:
    """Total memory, in bytes, of the smallest CUDA device this process sees; None without torch loaded, without
    CUDA, or where it cannot be read."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        count = torch.cuda.device_count()
        return min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) if count else None
    except Exception:  # noqa: BLE001 - no driver, a stand-in for CUDA in the tests, ...: nothing to go by
        return None


__all__ = ["retain_freed_memory", "smallest_gpu_memory", "tf32_matmuls"]
