"""Mid-epoch checkpoints every few minutes of training, for fits whose epochs are long.

A published-size TinyStories generation is one epoch of 2.12M stories: tens of minutes on a GPU, all of it lost
to a kill if the fit were checkpointed only at the ends of epochs. :class:`TimedCheckpoint` writes the fit's
checkpoint (the same ``last.ckpt`` as the loop's end-of-epoch one) once ``minutes`` of training have passed since
the last, after an optimizer step. A fit resumed from it continues exactly as the unbroken fit would: the loader
starts at the next batch (:class:`datamodules.synthetic.ResumableLoader`) and the random streams are put back
where they were at that step (:class:`callbacks.rng_state.RngStateCallback`).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class TimedCheckpoint(Callback):
    """Write ``path`` after the first optimizer step that ends ``minutes`` or more after the last write (or the
    start of training), unless it ends the epoch (the end-of-epoch checkpoint follows anyway).

    The clock is read every :attr:`CHECK_EVERY` optimizer steps only; in a multi-process run rank 0's reading is
    broadcast then (one small collective per :attr:`CHECK_EVERY` steps, not per step), so every rank writes at the
    same step, as Lightning's checkpointing needs. Never between the micro-batches of an accumulated step: the
    gradients summed so far are not in a checkpoint.
    """

    CHECK_EVERY = 16
    """Optimizer steps between readings of the clock."""

    def __init__(self, path: str | Path, minutes: float):
        if not minutes > 0:
            raise ValueError(f"minutes must be > 0, got {minutes!r}")
        self.path = Path(path)
        self.seconds = 60.0 * minutes
        self._since = time.monotonic()
        self._looked_at = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.monotonic()
        self._looked_at = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._looked_at or step % self.CHECK_EVERY:
            return  # no optimizer step since the last look (accumulating), or not a step to look at the clock
        self._looked_at = step
        due = time.monotonic() - self._since >= self.seconds
        if trainer.world_size > 1:
            due = bool(trainer.strategy.broadcast(due, src=0))
        if due and batch_idx + 1 < trainer.num_training_batches:
            trainer.save_checkpoint(self.path)
            self._since = time.monotonic()


class MidEpochResume(Callback):
    """Make sure a fit resumed from a mid-epoch checkpoint starts its loader where the checkpoint says.

    Lightning hands the loader its saved state (:class:`datamodules.synthetic.ResumableLoader`) when it sets up the
    fit's data after restoring the checkpoint. A module that asks for ``trainer.estimated_stepping_batches`` in
    ``configure_optimizers`` (the language model's learning-rate schedule does) makes Lightning set the data up
    before that, when there is no state to hand over yet, and it then keeps that loader: the resumed fit would
    start the epoch's batches from the first. Here, as training starts, a state Lightning still holds is taken as
    the sign of that, and the fit's data is set up once more, now with the state. (Lightning 2.6's ``FitLoop``: its
    ``_combined_loader_states_to_load``, emptied once handed over, and ``_combined_loader``, which a new set-up
    replaces.)
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop
        if getattr(loop, "_combined_loader_states_to_load", None) and loop.restarting:
            loop._combined_loader = None
            loop.setup_data()


__all__ = ["MidEpochResume", "TimedCheckpoint"]
