"""Fixed compute: end a fit at an exact optimizer step (``--steps_per_generation``)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class StopAtStep(Callback):
    """End the fit once ``trainer.global_step`` (optimizer steps, per process) reaches ``steps``.

    Checked after every training batch, and at the start of training for a fit resumed from a checkpoint
    written at exactly ``steps``. Every process steps together, so all of them stop at the same batch.
    """

    def __init__(self, steps: int):
        self.steps = steps

    def _check(self, trainer: pl.Trainer) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._check(trainer)


__all__ = ["StopAtStep"]
