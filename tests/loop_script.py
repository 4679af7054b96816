"""A tiny toy-modality run of the generation loop, shared by the loop tests and run as a script by them.

As a script (``python tests/loop_script.py OUT_DIR WORKFLOW [--kill GEN:EPOCH]``) it runs the same
configuration as :func:`tiny_config` and, with ``--kill``, sends itself SIGKILL when generation
GEN starts training epoch EPOCH (``GEN:fit`` kills when generation GEN's fit starts), so the tests
can check that the next run resumes to the numbers of an unbroken one.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from collapse.tracking import WandbConfig  # noqa: E402
from datamodules.toy import GaussianPointsConfig  # noqa: E402
from engine.loop import LoopConfig, run_generations  # noqa: E402
from engine.trainer import TrainerConfig  # noqa: E402
from recipes.toy_gaussian import GaussianModality, ToyGaussianConfig  # noqa: E402

REAL_SIZE = 32
GENERATIONS = 3
MAX_EPOCHS = 3


class Recorder(pl.Callback):
    """Counts fits and training epochs per generation, and keeps each fit's initial weights."""

    def __init__(self, generation: int, record: dict[str, Any]):
        self.generation = generation
        self.record = record

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record.setdefault("fits", []).append(self.generation)
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.record.setdefault("initial_state", {})[self.generation] = state

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record.setdefault("epochs", []).append((self.generation, trainer.current_epoch))


class KillAt(pl.Callback):
    """SIGKILLs this process when ``generation`` starts epoch ``epoch`` (or its fit, for epoch None)."""

    def __init__(self, epoch: int | None):
        self.epoch = epoch

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch is None:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.epoch is not None and trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def gaussian_modality(max_epochs: int, **data: Any) -> GaussianModality:
    """The toy recipe's modality with these real-data sizes (``--data.*``) and epochs, on the CPU."""
    cfg = ToyGaussianConfig(
        out_dir="unused",  # the loop's settings come from tiny_config
        data=GaussianPointsConfig(**data),
        trainer=TrainerConfig(accelerator="cpu", max_epochs=max_epochs),
    )
    return GaussianModality(cfg)


class TinyModality(GaussianModality):
    """The toy modality, small and fast: 128 real points (32 used), 3 epochs, recording callbacks per generation."""

    def __init__(self, *, max_epochs: int = MAX_EPOCHS, kill: tuple[int, int | None] | None = None, **data: Any):
        sizes = {"num_train": 128, "num_val": 32, "num_test": 64, **data}
        super().__init__(gaussian_modality(max_epochs, **sizes).cfg)
        self.log: dict[str, Any] = {}
        self.kill = kill

    def trainer_kwargs(self, generation: int) -> dict[str, Any]:
        callbacks: list[pl.Callback] = [Recorder(generation, self.log)]
        if self.kill is not None and self.kill[0] == generation:
            callbacks.append(KillAt(self.kill[1]))
        return {**super().trainer_kwargs(generation), "callbacks": callbacks}


def tiny_config(out_dir: str | Path, workflow: str, **overrides: Any) -> LoopConfig:
    """The loop settings of every tiny run (W&B disabled)."""
    settings: dict[str, Any] = {
        "out_dir": str(out_dir),
        "workflow": workflow,
        "generations": GENERATIONS,
        "seed": 0,
        "real_size": REAL_SIZE,
        "batch_size": 16,
        "sample_batch_size": 24,
        "wandb": WandbConfig(mode="disabled"),
    }
    settings.update(overrides)
    return LoopConfig(**settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("workflow")
    parser.add_argument("--kill", help="GEN:EPOCH or GEN:fit")
    args = parser.parse_args(argv)
    kill = None
    if args.kill:
        gen, _, when = args.kill.partition(":")
        kill = (int(gen), None if when == "fit" else int(when))
    run_generations(TinyModality(kill=kill), tiny_config(args.out_dir, args.workflow), recipe="toy")


if __name__ == "__main__":
    main()
