"""Exact resume of a fit's randomness: the global RNG states travel in every Lightning checkpoint."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from collapse.distributed import Dist
from collapse.errors import UserError
from datamodules.synthetic import batches_trained


class RngStateCallback(Callback):
    """Store the global RNG states in every Lightning checkpoint and restore them on resume.

    A fit resumed from a mid-fit checkpoint then continues the random streams (dropout, noise,
    loader seeds) where the interrupted fit left them, as an unbroken fit would. In a multi-process
    run each rank's states are gathered into the checkpoint and each rank gets its own back.

    When: a checkpoint of an epoch's end is restored as the fit resumes, since the unbroken fit too made the next
    epoch's loader (which draws its seed) after writing it. A mid-epoch checkpoint (:class:`TimedCheckpoint`) is
    restored just before the first resumed batch: the unbroken fit had made that epoch's loader long before, so
    the draws of the resumed fit's new loader must not count.
    """

    def __init__(self) -> None:
        self._trainer: Any = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer

    def _mid_epoch(self) -> bool:
        """Whether a checkpoint written now is one of the middle of an epoch (Lightning's counts)."""
        trainer = self._trainer
        return trainer is not None and 0 < batches_trained(trainer) < trainer.num_training_batches

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
        when = {"mid_epoch": True} if self._mid_epoch() else {}
        dist = Dist()
        if not dist.active:
            return {**self._local_state(), **when}
        # Every rank dumps the checkpoint (rank 0 writes it), so this collective is reached by all.
        states: list[Any] = [None] * dist.world_size
        torch.distributed.all_gather_object(states, self._local_state())
        return {"ranks": states, **when}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mid_epoch"):
            self._pending = state_dict  # put back at the first resumed batch
            return
        self._restore(state_dict)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._restore(pending)

    def _restore(self, state_dict: dict[str, Any]) -> None:
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
