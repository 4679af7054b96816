"""The Trainer settings every Lightning recipe shares (``--trainer.*``), and their hardware-dependent defaults.

A recipe holds a :class:`TrainerConfig` (recipes that need more, such as the language model's ``compile``,
subclass it) and changes its defaults by value, e.g. ``TrainerConfig(gradient_clip_val=1.0)``. Before the
run, :func:`resolve_trainer` fills what depends on the machine (accelerator, precision, epochs per
generation), so config.yaml records what actually ran and a resumed run on other hardware is refused
as a different config.

The loop adds the rest of the Trainer (staging folder, checkpoints, sampling and fixed-compute callbacks);
:class:`FixedStepsTrainer` is the Trainer it uses under ``--steps_per_generation``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import lightning.pytorch as pl

from collapse.errors import ConfigError, UserError

T = TypeVar("T", bound="TrainerConfig")

PRECISIONS = (
    "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
    "transformer-engine", "transformer-engine-float16", "32", "16", "bf16", "64",
)  # fmt: skip
"""The ``--trainer.precision`` values Lightning accepts (2.x names first, then its short aliases)."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (``--trainer.*``); the rest of the Trainer is set by the loop."""

    accelerator: str = "auto"
    """cpu, gpu, mps or auto (a GPU when there is one)."""
    devices: int | str = 1
    """Devices per node: 2 with --trainer.strategy ddp trains on two GPUs (or two CPU processes)."""
    strategy: str = "auto"
    """auto, ddp, fsdp, ...: how several devices share the work (ddp re-launches this command per device)."""
    num_nodes: int = 1
    """Machines (with torchrun or SLURM, which start the processes)."""
    precision: str | None = None
    """32-true, bf16-mixed, 16-mixed, ...; default: the recipe's choice for the hardware (see its --help)."""
    max_epochs: int | None = None
    """Epochs per generation; default: the recipe's choice for the hardware (see its --help)."""
    gradient_clip_val: float | None = None
    """Clip gradients to this norm (None: no clipping)."""
    accumulate_grad_batches: int = 1
    """Optimizer step every this many batches (effective batch = batch_size x devices x this)."""

    not_for_lightning: ClassVar[tuple[str, ...]] = ()
    """Fields of a subclass that the recipe applies itself (not Trainer arguments)."""

    def __post_init__(self) -> None:
        for flag in ("num_nodes", "accumulate_grad_batches"):
            _check_int(flag, getattr(self, flag))
        if self.max_epochs is not None:
            _check_int("max_epochs", self.max_epochs)
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ConfigError(f"--trainer.gradient_clip_val must be > 0 or None, got {self.gradient_clip_val!r}")
        # Checked here, before the run directory exists: Lightning would refuse them only when the Trainer is
        # built, after config.yaml is written (and the corrected command would then be a different config).
        if self.precision is not None and str(self.precision) not in PRECISIONS:
            raise ConfigError(f"--trainer.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        from lightning.pytorch.accelerators import AcceleratorRegistry
        from lightning.pytorch.strategies import StrategyRegistry

        accelerators = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
        if self.accelerator not in accelerators:
            choices = ", ".join(accelerators)
            raise ConfigError(f"--trainer.accelerator must be one of {choices}; got {self.accelerator!r}")
        strategies = ("auto", *sorted(StrategyRegistry.available_strategies()))
        if self.strategy not in strategies:
            raise ConfigError(
                f"--trainer.strategy must be auto, ddp, fsdp or another Lightning strategy name; got {self.strategy!r}"
            )

    def lightning_kwargs(self) -> dict[str, Any]:
        """``lightning.Trainer`` keyword arguments: the settings that are set, no sanity validation run.

        Sanity validation is off because it would draw from the global RNGs before the fit and so change
        every later random number of a generation (and it checks nothing the first epoch does not).
        """
        kwargs = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self.not_for_lightning and getattr(self, f.name) is not None
        }
        return {**kwargs, "num_sanity_val_steps": 0}


def uses_gpu(accelerator: str) -> bool:
    """Whether ``--trainer.accelerator`` means a CUDA GPU here; asking for one on a machine with none is a UserError."""
    import torch

    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--trainer.accelerator {accelerator}: no CUDA GPU is visible on this machine")
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def resolve_trainer(
    trainer: T,
    *,
    gpu_epochs: int,
    cpu_epochs: int,
    gpu_precision: str = "bf16-mixed",
    cpu_precision: str = "32-true",
) -> T:
    """``trainer`` with its hardware-dependent defaults filled: accelerator, precision and epochs per generation.

    Explicit settings are kept; ``auto`` becomes ``gpu`` or ``cpu``. "CPU" below means any accelerator
    other than a CUDA GPU.
    """
    on_gpu = uses_gpu(trainer.accelerator)
    accelerator = "gpu" if on_gpu else ("cpu" if trainer.accelerator == "auto" else trainer.accelerator)
    return dataclasses.replace(
        trainer,
        accelerator=accelerator,
        precision=trainer.precision or (gpu_precision if on_gpu else cpu_precision),
        max_epochs=trainer.max_epochs or (gpu_epochs if on_gpu else cpu_epochs),
    )


class FixedStepsTrainer(pl.Trainer):
    """A Trainer whose ``estimated_stepping_batches`` is at most ``fixed_steps`` (where the fit is stopped).

    Under ``--steps_per_generation`` the loop gives the Trainer enough epochs for S optimizer steps and stops
    the fit at the S-th (:class:`callbacks.fixed_steps.StopAtStep`). Without ``max_steps`` Lightning would count
    every batch of those epochs, and a schedule sized by it (the LM's warmup + cosine decay) would not reach
    its end.
    """

    fixed_steps: int | None = None

    @property
    def estimated_stepping_batches(self) -> int | float:
        estimate = super().estimated_stepping_batches
        return estimate if self.fixed_steps is None else min(estimate, self.fixed_steps)


def _check_int(flag: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--trainer.{flag} must be an integer >= 1, got {value!r}")


__all__ = ["FixedStepsTrainer", "TrainerConfig", "resolve_trainer", "uses_gpu"]
