"""Exact resume of a fit's randomness: the global RNG states travel in every Lightning checkpoint."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from collapse.distributed import Dist
from collapse.errors import UserError


class RngStateCallback(Callback):
    """Store the global RNG states in every Lightning checkpoint and restore them on resume.

    A fit resumed from a mid-fit checkpoint then continues the random streams (dropout, noise,
    loader seeds) where the interrupted fit left them, as an unbroken fit would. In a multi-process
    run each rank's states are gathered into the checkpoint and each rank gets its own back.
    """

    @staticmethod
    def _local_state() -> dict[str, Any]:
        # Plain lists and tensors only, so that checkpoints load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def state_dict(self) -> dict[str, Any]:
        dist = Dist()
        if not dist.active:
            return self._local_state()
        # Every rank dumps the checkpoint (rank 0 writes it), so this collective is reached by all.
        states: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(states, self._local_state())
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ranks" in state_dict:
            ranks = state_dict["ranks"]
            dist = Dist()
            if len(ranks) != dist.world_size:
                raise UserError(
                    f"the checkpoint was written by {len(ranks)} processes, this run has {dist.world_size}; "
                    "resume with the same --trainer.devices and --trainer.num_nodes"
                )
            state_dict = ranks[dist.rank]
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


__all__ = ["RngStateCallback"]
