"""When :class:`TimedCheckpoint` writes a mid-epoch checkpoint: after an optimizer step, on a look at the clock every
CHECK_EVERY steps once the minutes have passed, never mid-accumulation nor at an epoch's last batch. (That a fit
resumed from one goes on exactly: ``test_mnist_vae_recipe`` and ``test_tinystories_recipe``.)"""

from __future__ import annotations

import pytest

import callbacks.timed_checkpoint as timed
from callbacks.timed_checkpoint import TimedCheckpoint


class _Trainer:
    world_size = 1

    def __init__(self, batches: int):
        self.global_step, self.num_training_batches, self.saved = 0, batches, []

    def save_checkpoint(self, path) -> None:
        self.saved.append(self.global_step)


def _epoch(checkpoint: TimedCheckpoint, trainer: _Trainer, clock: list[float], accumulate: int = 1) -> None:
    for batch_idx in range(trainer.num_training_batches):
        trainer.global_step = (batch_idx + 1) // accumulate  # the optimizer steps every `accumulate` batches
        clock[0] += 1.0  # a second per batch
        checkpoint.on_train_batch_end(trainer, None, None, None, batch_idx)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [0.0]
    monkeypatch.setattr(timed.time, "monotonic", lambda: now[0])
    return now


def test_a_checkpoint_after_the_first_look_at_the_clock_past_the_minutes(tmp_path, clock):
    trainer = _Trainer(batches=100)
    checkpoint = TimedCheckpoint(tmp_path / "last.ckpt", minutes=0.5)  # 30 s: due from step 30, looked at on 32
    checkpoint.on_train_start(trainer, None)
    _epoch(checkpoint, trainer, clock)
    assert trainer.saved == [32, 64, 96]  # the clock restarts at each write


def test_never_between_the_micro_batches_of_an_accumulated_step(tmp_path, clock):
    trainer = _Trainer(batches=200)
    checkpoint = TimedCheckpoint(tmp_path / "last.ckpt", minutes=1e-9)
    checkpoint.on_train_start(trainer, None)
    _epoch(checkpoint, trainer, clock, accumulate=2)  # 200 batches, 100 steps
    assert trainer.saved == [16, 32, 48, 64, 80, 96]  # once per step, at the batch that stepped


def test_not_at_an_epoch_s_last_batch_where_the_epoch_s_own_checkpoint_follows(tmp_path, clock):
    trainer = _Trainer(batches=32)
    checkpoint = TimedCheckpoint(tmp_path / "last.ckpt", minutes=1e-9)
    checkpoint.on_train_start(trainer, None)
    _epoch(checkpoint, trainer, clock)
    assert trainer.saved == [16]  # step 32 ends the epoch


def test_no_time_span_is_refused():
    with pytest.raises(ValueError, match="minutes"):
        TimedCheckpoint("last.ckpt", minutes=0)
