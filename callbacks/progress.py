"""Training and test progress you can watch, on a terminal or not.

On a terminal Lightning draws its progress bar; in a log file (CI, ``nohup``, a W&B agent) the bar's
carriage returns make one unreadable line, so there :class:`LineProgress` writes plain
:class:`~collapse.progress.Progress` lines instead, every ``--progress_every`` seconds::

    [toy_gaussian] training gen 1: 300/1200 steps (25%), 9.8 steps/s, ETA 1m32s, loss 1.23
    [toy_gaussian] test gen 1: 40/100 batches (40%), 31.2 batches/s, ETA 2s

A model that counts what it trains on (``throughput_counts()``, e.g. a language model's tokens) adds that
rate to the training lines: ``..., loss 3.41, 182345 tokens/s``. A step that outlasts the interval (the
first steps of a compiled model compile) still gets its line, from a background thread that reads only
the host clock and the step count: ``training gen 1: 0/1200 steps (0%), 0 steps/s, no new steps for 45s``.

:func:`progress_bar_wanted` says which of the two a Trainer gets.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import lightning.pytorch as pl
import torch

from collapse.progress import Progress, number_text


def progress_bar_wanted(stream: TextIO | None = None) -> bool:
    """Whether Lightning's progress bar should draw: when its stream (stdout, where the bar draws) is a terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def throughput_reader(module: Any) -> Callable[[], Mapping[str, int]] | None:
    """The module's ``throughput_counts`` (host-side counts of what it has trained on, by unit), if it has one."""
    counts = getattr(module, "throughput_counts", None)
    return counts if callable(counts) else None


class RateMeter:
    """Rates of a module's ``throughput_counts`` since the meter started (per second, by unit), on the host."""

    def __init__(self, module: Any, clock: Callable[[], float] = time.monotonic):
        self._read = throughput_reader(module)
        self._clock = clock
        self._t0 = clock()
        self._start = dict(self._read()) if self._read else {}

    def rates(self) -> dict[str, float]:
        if not self._read:
            return {}
        elapsed = self._clock() - self._t0
        if elapsed <= 0:
            return {}
        now = self._read()
        return {unit: (int(now[unit]) - int(start)) / elapsed for unit, start in self._start.items() if unit in now}

    def text(self) -> str:
        return ", ".join(f"{number_text(rate)} {unit}/s" for unit, rate in self.rates().items())


def _count(value: Any) -> int | None:
    """A batch or step count from Lightning (an int, a float, ``inf`` or a list of them per loader) or None."""
    total = sum(value) if isinstance(value, (list, tuple)) else value
    if total is None or (isinstance(total, float) and not math.isfinite(total)):
        return None
    return int(total)


class LineProgress(pl.Callback):
    """Plain progress lines for the fit (optimizer steps), validation and test (batches), from global rank 0.

    The loss shown is the last training batch's, read from the device only when a line is written
    (reading it every step would wait for the GPU every step).

    Args:
        name: what the lines say after the phase, e.g. ``"gen 3"``.
        interval: seconds between lines; default: ``--progress_every`` of the running recipe (30 s).
        total_steps: the fit's optimizer steps when they are fixed in advance (``--steps_per_generation``);
            default: Lightning's estimate from the epochs.
    """

    def __init__(self, name: str = "", interval: float | None = None, total_steps: int | None = None):
        self.name = name
        self.interval = interval
        self.total_steps = total_steps
        self._train: Progress | None = None
        self._eval: Progress | None = None
        self._loss: torch.Tensor | None = None
        self._meter: RateMeter | None = None

    def _what(self, phase: str) -> str:
        return f"{phase} {self.name}".strip()

    def _loss_text(self) -> str:
        parts = [f"loss {float(self._loss):.4g}" if self._loss is not None else ""]
        parts.append(self._meter.text() if self._meter is not None else "")
        return ", ".join(p for p in parts if p)

    # ---- fit --------------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = self.total_steps if self.total_steps is not None else _count(trainer.estimated_stepping_batches)
        self._loss = None
        self._meter = RateMeter(pl_module)
        self._train = Progress(
            total, self._what("training"), "steps", interval=self.interval, done=trainer.global_step,
            rank=trainer.global_rank, heartbeat=True,
        )  # fmt: skip

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._loss = loss.detach()  # no .item() here: that would wait for the device every step
        if self._train is not None:
            self._train.update(done=trainer.global_step, extra=self._loss_text)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train is not None:
            self._train.close(extra=self._loss_text)
            self._train = None

    # ---- validation and test ---------------------------------------------------------------------------------------
    def _start_eval(self, trainer: pl.Trainer, phase: str, batches: Any) -> None:
        self._eval = Progress(
            _count(batches),
            self._what(phase),
            "batches",
            interval=self.interval,
            rank=trainer.global_rank,
            heartbeat=True,
        )

    def _eval_batch(self) -> None:
        if self._eval is not None:
            self._eval.update()

    def _end_eval(self) -> None:
        if self._eval is not None:
            self._eval.close()
            self._eval = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start_eval(trainer, "validation", trainer.num_val_batches)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not trainer.sanity_checking:
            self._eval_batch()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._end_eval()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_eval(trainer, "test", trainer.num_test_batches)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_batch()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_eval()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        for progress in (self._train, self._eval):
            if progress is not None:
                progress.stop()  # no closing line, and no heartbeat left running after a failed fit
        self._train = self._eval = None


__all__ = ["LineProgress", "progress_bar_wanted"]
