"""The Trainer settings every Lightning recipe shares (``--trainer.*``), and their hardware-dependent defaults.

Every argument of ``lightning.Trainer.__init__`` is a ``--trainer.NAME`` flag: :class:`TrainerConfig` is built on
a dataclass made from the Trainer's own signature (:class:`LightningTrainerArgs`, every field None = Lightning's
default), with typed, validated fields for the settings the recipes choose themselves (accelerator, precision,
epochs, ...). A recipe holds a :class:`TrainerConfig` (recipes that need more, such as the language model's
``compile``, subclass it) and changes its defaults by value, e.g. ``TrainerConfig(gradient_clip_val=1.0)``.
Before the run, :func:`resolve_trainer` fills what depends on the machine (accelerator, precision, epochs per
generation), so config.yaml records what actually ran and a resumed run on other hardware is refused as a
different config.

Objects (callbacks, loggers, a profiler, plugins, a strategy) are given the Lightning CLI way, as
``class_path``/``init_args`` in a config file or ``--trainer.callbacks+=LearningRateMonitor`` on the command
line. The config keeps them as that description (so config.yaml records and round-trips them) and
:meth:`TrainerConfig.lightning_kwargs` builds fresh objects for every generation's Trainer.

The loop adds the rest of the Trainer (staging folder, checkpoints, sampling and fixed-compute callbacks, the W&B
logger) and owns those arguments (:data:`LOOP_OWNED`); :class:`FixedStepsTrainer` is the Trainer it uses under
``--steps_per_generation``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import re
import time
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import lightning.pytorch as pl
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import Strategy

from callbacks.progress import throughput_reader
from collapse.atomic import atomic_torch_save
from collapse.errors import ConfigError, UserError

T = TypeVar("T", bound="TrainerConfig")

PRECISIONS = (
    "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
    "transformer-engine", "transformer-engine-float16", "32", "16", "bf16", "64",
)  # fmt: skip
"""The ``--trainer.precision`` values Lightning accepts (2.x names first, then its short aliases)."""

LOOP_OWNED: Mapping[str, str] = {
    "default_root_dir": "the loop gives each generation its own staging folder",
    "enable_checkpointing": "the loop checkpoints each fit into its staging folder so that a killed fit resumes",
    "num_sanity_val_steps": "sanity validation would draw from the global random streams before the fit and "
    "change every later random number of a generation",
}
"""Trainer arguments the generation loop sets itself, and why (given as flags, they are refused)."""

FIXED_STEPS_OWNED = ("max_steps", "min_steps", "max_time")
"""Trainer arguments the loop sets under ``--steps_per_generation`` (refused with it: :func:`check_loop_settings`)."""

_TYPES: Mapping[str, Any] = {
    # No bool: True would write Lightning's default logger into the generation's folder, False is the default.
    "logger": Logger | list[Logger] | None,
}


def _trainer_docs() -> dict[str, str]:
    """Each Trainer argument's description, from ``Trainer.__init__``'s docstring (for ``--help``)."""
    docs: dict[str, str] = {}
    name = None
    for line in (pl.Trainer.__init__.__doc__ or "").splitlines():
        match = re.match(r"^\s{12}(\w+): (.*)$", line)
        if match:
            name = match.group(1)
            docs[name] = match.group(2).strip()
        elif name and line.strip() and line.startswith(" " * 16):
            docs[name] += " " + line.strip()
        elif not line.strip():
            name = None
    return docs


def _lightning_args() -> type:
    """A dataclass with one field per ``lightning.Trainer.__init__`` argument, each ``Optional`` with default None."""
    hints = typing.get_type_hints(pl.Trainer.__init__)
    docs = _trainer_docs()
    fields, lines = [], []
    for name in inspect.signature(pl.Trainer.__init__).parameters:
        if name == "self":
            continue
        hint = _TYPES.get(name, hints.get(name, Any))
        fields.append((name, typing.Optional[hint], dataclasses.field(default=None)))  # noqa: UP045 - a runtime type
        if name in LOOP_OWNED:
            lines.append(f"    {name}: set by the loop, refused here: {LOOP_OWNED[name]}")
        else:
            lines.append(f"    {name}: {docs.get(name, 'see lightning.Trainer')} (None: Lightning's default)")
    doc = "Every lightning.Trainer argument (None: Lightning's default).\n\nArgs:\n" + "\n".join(lines)
    return dataclasses.make_dataclass("LightningTrainerArgs", fields, namespace={"__doc__": doc})


LightningTrainerArgs = _lightning_args()
"""One ``Optional`` field per ``lightning.Trainer.__init__`` argument, derived from its signature (default None)."""


@dataclass
class TrainerConfig(LightningTrainerArgs):
    """Lightning Trainer settings (``--trainer.*``: every lightning.Trainer argument); the loop sets the rest."""

    accelerator: str = "auto"
    """cpu, gpu, mps or auto (a GPU when there is one)."""
    devices: int | str = 1
    """Devices per node: 2 with --trainer.strategy ddp trains on two GPUs (or two CPU processes)."""
    strategy: str | Strategy = "auto"
    """auto, ddp, fsdp, ... (or a class_path): how several devices share the work (ddp re-launches this command per
    device)."""
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
            _check_int(flag, getattr(self, flag), 1)
        if self.num_nodes > _MAX_INT32:  # torch's process-group setup takes a 32-bit integer
            raise ConfigError(f"--trainer.num_nodes must be at most {_MAX_INT32}, got {self.num_nodes!r}")
        if self.max_epochs is not None:
            _check_int("max_epochs", self.max_epochs, 1)
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ConfigError(f"--trainer.gradient_clip_val must be > 0 or None, got {self.gradient_clip_val!r}")
        # Checked here, before the run directory exists: Lightning would refuse them only when the Trainer is
        # built, after config.yaml is written (and the corrected command would then be a different config).
        if self.precision is not None and str(self.precision) not in PRECISIONS:
            raise ConfigError(f"--trainer.precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if (
            str(self.precision).startswith("transformer-engine")
            and importlib.util.find_spec("transformer_engine") is None
        ):
            raise ConfigError(
                f"--trainer.precision {self.precision} needs NVIDIA's transformer_engine package, which is not "
                "installed; use bf16-mixed (or install it)"
            )
        from lightning.pytorch.accelerators import AcceleratorRegistry
        from lightning.pytorch.strategies import StrategyRegistry

        accelerators = ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))
        if self.accelerator not in accelerators:
            choices = ", ".join(accelerators)
            raise ConfigError(f"--trainer.accelerator must be one of {choices}; got {self.accelerator!r}")
        strategies = ("auto", *sorted(StrategyRegistry.available_strategies()))
        if isinstance(self.strategy, str) and self.strategy not in strategies:
            raise ConfigError(
                f"--trainer.strategy must be auto, ddp, fsdp or another Lightning strategy name; got {self.strategy!r}"
            )
        for name, why in LOOP_OWNED.items():
            if getattr(self, name) is not None:
                raise ConfigError(f"--trainer.{name} cannot be set: {why}")
        for name, low in _AT_LEAST.items():
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low)
        for name in (
            "limit_train_batches",
            "limit_val_batches",
            "limit_test_batches",
            "limit_predict_batches",
            "overfit_batches",
        ):
            _check_fraction_or_count(name, getattr(self, name))
        interval = self.val_check_interval
        if isinstance(interval, (int, float)) and not isinstance(interval, bool) and not interval > 0:
            # Lightning accepts 0 and then divides by it in the first epoch.
            raise ConfigError(
                f"--trainer.val_check_interval must be a number of batches >= 1, a fraction of an epoch in (0, 1] "
                f"or a time; got {interval!r}"
            )
        if self.barebones:
            raise ConfigError(
                "--trainer.barebones must stay false: barebones mode turns checkpointing off, and the loop checkpoints "
                "each fit into its staging folder so that a killed fit resumes"
            )
        callbacks = self.callbacks if isinstance(self.callbacks, list) else [self.callbacks]
        if any(_is_a(c, ModelCheckpoint) for c in callbacks if c is not None):
            raise ConfigError(
                "--trainer.callbacks: a ModelCheckpoint cannot be added: the loop checkpoints each fit into its "
                "staging folder so that a killed fit resumes"
            )
        if any(
            getattr(self, f.name) is not None for f in dataclasses.fields(LightningTrainerArgs) if f.name not in _TYPED
        ):
            self._try_on_lightning()

    def lightning_kwargs(self) -> dict[str, Any]:
        """``lightning.Trainer`` keyword arguments: the settings that are set, no sanity validation run.

        Objects given as ``class_path``/``init_args`` are built afresh on every call (one set per generation's
        Trainer). Sanity validation is off because it would draw from the global RNGs before the fit and so
        change every later random number of a generation (and it checks nothing the first epoch does not).
        """
        kwargs = {
            f.name: _build(f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in self.not_for_lightning and getattr(self, f.name) is not None
        }
        return {**kwargs, "num_sanity_val_steps": 0}

    def _try_on_lightning(self) -> None:
        """Build a throwaway CPU Trainer from these settings so that Lightning's own refusals come before the run.

        The hardware settings are left out: they are checked above, and resolved for the machine later.
        """
        hardware = {"accelerator", "devices", "strategy", "num_nodes", "precision"}
        kwargs = {k: v for k, v in self.lightning_kwargs().items() if k not in hardware}
        kwargs.update(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)
        kwargs.setdefault("logger", False)
        try:
            with _quiet():
                pl.Trainer(**kwargs)
        except Exception as exc:  # Lightning raises MisconfigurationException, ValueError, TypeError, ...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"--trainer: Lightning refuses these settings: {first}") from None


_MAX_INT32 = 2**31 - 1

_AT_LEAST: Mapping[str, int] = {
    "min_epochs": 0,
    "min_steps": 0,
    "max_steps": -1,
    "log_every_n_steps": 1,
    "check_val_every_n_epoch": 1,
    "reload_dataloaders_every_n_epochs": 0,
}
"""Integer Trainer arguments and their smallest accepted value."""

_TYPED = frozenset(name for name in TrainerConfig.__annotations__ if name != "not_for_lightning")
"""The Trainer arguments with a typed field of :class:`TrainerConfig` (validated there, not by a throwaway Trainer)."""


def _is_a(value: Any, cls: type) -> bool:
    """Whether ``value`` (an object or a ``class_path`` description) is a ``cls``."""
    if isinstance(value, Mapping) and isinstance(value.get("class_path"), str):
        module, _, name = value["class_path"].rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            return False
        return isinstance(found, type) and issubclass(found, cls)
    return isinstance(value, cls)


def _has_class_path(value: Any) -> bool:
    if isinstance(value, Mapping):
        return "class_path" in value
    if isinstance(value, list):
        return any(_has_class_path(v) for v in value)
    return False


def _build(name: str, value: Any) -> Any:
    """The Trainer argument ``name`` with its ``class_path`` descriptions made into objects (a fresh set per call)."""
    if not _has_class_path(value):
        return value
    from jsonargparse import ArgumentParser

    hint = typing.get_type_hints(TrainerConfig)[name]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument(f"--{name}", type=hint)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    try:
        with _quiet():
            return instantiate(parser.parse_object({name: copy.deepcopy(value)}))[name]
    except Exception as exc:  # noqa: BLE001 - an import, a type or the class's own __init__ can refuse
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--trainer.{name}: cannot be built ({first})") from None


def check_loop_settings(trainer_kwargs: Mapping[str, Any], steps_per_generation: Any) -> None:
    """Refuse the Trainer arguments the loop sets itself under ``--steps_per_generation`` (before the run starts)."""
    if steps_per_generation is None:
        return
    for name in FIXED_STEPS_OWNED:
        if trainer_kwargs.get(name) not in (None, -1):
            raise ConfigError(
                f"--trainer.{name} cannot be set with --steps_per_generation: the loop sizes every generation's fit "
                "to the steps it asks for (drop one of the two)"
            )


class TrackerLogger(Logger):
    """A Lightning logger that writes a fit's metrics to the run's open W&B run (the :class:`Tracker`).

    Every row carries ``generation``, ``trainer/global_step`` (the generation's optimizer step) and
    ``trainer/step`` (steps of the whole run, the x axis of the training curves), and
    ``trainer/steps_per_s`` (throughput since the previous row), and ``trainer/<unit>_per_s`` for each unit the
    fitted module counts (``throughput_counts()``: ``trainer/tokens_per_s`` of a language model, this process's).
    Test metrics are left to the loop, which logs them once per generation.
    """

    def __init__(self, tracker: Any, generation: int):
        super().__init__()
        self.tracker = tracker
        self.generation = generation
        self.counts: Callable[[], Mapping[str, int]] | None = None
        """The fitted module's ``throughput_counts`` (set when the fit starts, by :class:`ThroughputSource`)."""
        self._last: tuple[int, float, Mapping[str, int]] | None = None

    @property
    def name(self) -> str:
        return "wandb"

    @property
    def version(self) -> str:
        run = getattr(self.tracker, "run", None)
        return str(getattr(run, "id", "offline"))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The run's config is already on the W&B run (config.yaml's contents)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        row = {
            ("trainer/epoch" if k == "epoch" else k): float(v) for k, v in metrics.items() if not k.startswith("test")
        }
        if step is None or set(row) <= {"trainer/epoch"}:  # nothing but the epoch (a test's rows)
            return
        now = time.perf_counter()
        counts = dict(self.counts()) if self.counts is not None else {}
        if self._last is not None and step > self._last[0] and now > self._last[1]:
            seconds = now - self._last[1]
            row["trainer/steps_per_s"] = (step - self._last[0]) / seconds
            for unit, before in self._last[2].items():
                if unit in counts:
                    row[f"trainer/{unit}_per_s"] = (counts[unit] - before) / seconds
        if self._last is None or step > self._last[0]:
            self._last = (step, now, counts)
        log = getattr(self.tracker, "log_training", None)
        if log is not None:
            log(row, generation=self.generation, step=step)

    def finalize(self, status: str) -> None:
        end = getattr(self.tracker, "end_fit", None)
        if self._last is not None and end is not None:
            end(self._last[0])
        self._last = None


def tracker_logging(
    user_logger: Any, tracker: Any, generation: int, user_callbacks: Sequence[Callback] = ()
) -> tuple[Any, list[Callback]]:
    """The ``logger`` for generation ``generation``'s Trainer, and the callbacks it needs.

    The fit's curves go to the run's W&B run (:class:`TrackerLogger`; a no-op where there is none: W&B disabled, or
    not rank 0, so that every process has a logger and callbacks that need one, such as a user's
    LearningRateMonitor, work everywhere). With an open W&B run the learning rate is monitored too, unless the
    user's callbacks already do. Loggers given with ``--trainer.logger`` are kept beside it.
    """
    users = [] if user_logger in (None, False) else (user_logger if isinstance(user_logger, list) else [user_logger])
    loggers = [TrackerLogger(tracker, generation), *users]
    callbacks: list[Callback] = [ThroughputSource(loggers[0])]
    if getattr(tracker, "run", None) is None or any(isinstance(c, LearningRateMonitor) for c in user_callbacks):
        return loggers, callbacks
    return loggers, [*callbacks, LearningRateMonitor()]


class ThroughputSource(Callback):
    """Hands the fitted module's ``throughput_counts`` to a :class:`TrackerLogger` when the fit starts."""

    def __init__(self, logger: TrackerLogger):
        self.logger = logger

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.logger.counts = throughput_reader(pl_module)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's info lines and warnings while building a throwaway Trainer or a described object."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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
    """``trainer`` with its hardware-dependent defaults filled: accelerator, devices, precision and epochs per
    generation.

    Explicit settings are kept; an ``auto`` accelerator becomes ``gpu`` or ``cpu``, and ``auto`` or -1 devices
    on a GPU the number of visible GPUs (1 on a CPU), so that config.yaml records how many processes train: a
    run resumed on another number of GPUs is then refused as a different config instead of mixing two
    experiments (other global batch, data shards, seeds) in one run. "CPU" below means any accelerator other
    than a CUDA GPU.
    """
    on_gpu = uses_gpu(trainer.accelerator)
    accelerator = "gpu" if on_gpu else ("cpu" if trainer.accelerator == "auto" else trainer.accelerator)
    devices = trainer.devices
    if str(devices).strip() in ("auto", "-1") and accelerator in ("gpu", "cpu"):
        import torch

        devices = max(1, torch.cuda.device_count()) if on_gpu else 1
    return dataclasses.replace(
        trainer,
        accelerator=accelerator,
        devices=devices,
        precision=trainer.precision or (gpu_precision if on_gpu else cpu_precision),
        max_epochs=trainer.max_epochs or (gpu_epochs if on_gpu else cpu_epochs),
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with each checkpoint written beside its target and renamed over it.

    Lightning (2.6) writes a checkpoint into the system's temporary folder and then moves it into place. Where that
    folder is on another file system than the run (a node's local ``/tmp`` beside run directories on shared
    storage), the move is a copy over the previous checkpoint: a kill during the copy leaves a torn file and no
    whole one, and ``/tmp`` must hold a whole checkpoint. Here it goes through :func:`atomic_torch_save`: the
    previous checkpoint stays whole until the new one is, nothing is written outside the run directory, and a full
    disk comes out as the ``OSError`` it is, naming the file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` where it would write with Lightning's own
    :class:`TorchCheckpointIO`; a writer of the user's (``--trainer.plugins``) or of a strategy (XLA, ...) is kept."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


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


def _check_int(flag: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"--trainer.{flag} must be an integer >= {low}, got {value!r}")


def _check_fraction_or_count(flag: str, value: Any) -> None:
    """A ``limit_*_batches``: None, a count of batches (an integer >= 0) or a fraction of them (0.0 to 1.0)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"--trainer.{flag} must be a number of batches or a fraction, got {value!r}")
    if (isinstance(value, int) and value < 0) or (isinstance(value, float) and not 0.0 <= value <= 1.0):
        raise ConfigError(
            f"--trainer.{flag} must be an integer >= 0 (batches) or a fraction between 0.0 and 1.0, got {value!r}"
        )


__all__ = [
    "FIXED_STEPS_OWNED",
    "AtomicCheckpointIO",
    "LOOP_OWNED",
    "FixedStepsTrainer",
    "LightningTrainerArgs",
    "TrackerLogger",
    "TrainerConfig",
    "check_loop_settings",
    "resolve_trainer",
    "tracker_logging",
    "use_atomic_checkpoints",
    "uses_gpu",
]
