"""Seeds derived from a run's seed: one independent random stream per generation and step."""

from __future__ import annotations

import zlib

import numpy as np

MAX_SEED = 2**63 - 1
"""The largest run seed (and seed label): metrics.csv's seed column is read as a 64-bit integer."""


def derive_seed(seed: int, generation: int, purpose: str) -> int:
    """A 32-bit seed that depends only on ``(seed, generation, purpose)``.

    Every random step of a generation (initialisation, shuffling, fitting, sampling) gets its own
    stream, so skipping a finished step on resume leaves the later steps' randomness unchanged.
    """
    if seed < 0 or generation < 0:
        raise ValueError(f"seed and generation must be >= 0, got {seed} and {generation}")
    tag = zlib.crc32(purpose.encode())
    return int(np.random.SeedSequence([seed, generation, tag]).generate_state(1)[0])


__all__ = ["MAX_SEED", "derive_seed"]
