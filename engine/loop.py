"""The generation loop shared by every Lightning recipe.

Generation 0 trains on real data; generation g > 0 trains on the workflow's mix of real data and the
synthetic sets drawn from earlier generations' models. Per generation g, :func:`run_generations`:

1. skips g if ``gen_XXX`` is already in the store (after verifying its checksums);
2. seeds everything from ``(seed, g)`` (a separate stream per step, see :func:`derive_seed`);
3. builds the :class:`SyntheticAccumulatingDataModule` and a freshly initialised model, or with
   ``warm_start`` the previous generation's weights;
4. fits it, unless the staging folder already holds the fitted weights (``model.pt``); a fit killed
   half-way resumes from its last Lightning checkpoint (``checkpoints/last.ckpt`` in staging);
5. samples the next synthetic set with :class:`SyntheticDataCallback` at the end of the fit, on the
   fit's device(s) (or at the start of the test when an earlier run fitted it);
6. tests it on the real test set and stages ``metrics.json``: test metrics (``test_loss``, ...), training-set
   counts, the optimizer steps the fit took (``train_steps``) and the modality's scores of the synthetic set
   (``sample_...``, :meth:`Modality.evaluate_samples`, which may also stage pictures such as ``samples.png``);
7. commits the generation (``manifest.json``, rename to ``gen_XXX``), rewrites ``metrics.csv``,
   prints one progress line and logs the metrics and pictures to W&B.

With several processes (``--trainer.devices 2 --trainer.strategy ddp``, torchrun, SLURM) every
process runs this loop: global rank 0 decides which steps are left and alone writes, the others
train, sample and test their share (:mod:`collapse.distributed`).

Every step's output is written atomically and each step is skipped when its output exists, so a
run killed at any point (even SIGKILL) resumes with the same command and ends with exactly the
files and numbers of an unbroken run. Every random stream depends only on ``(seed, g, step)``.

Fixed compute (``--steps_per_generation``, see :class:`LoopConfig`): under accumulate the training set
grows every generation, so a fixed number of epochs gives later generations more optimizer steps.
With ``steps_per_generation`` set, a generation's trainer gets as many epochs (reshuffled passes over
its training set) as S optimizer steps need and stops at the S-th step, so every generation takes
exactly S steps whatever its training-set size. Mid-fit checkpoints stay at epoch ends (Lightning cannot
resume a plain data loader mid-epoch exactly), so a fit shorter than one pass that is killed starts over.

A modality plugs in through :class:`Modality`: its real data module, its model and its trainer
settings. This module imports torch and Lightning; the NumPy-only parts of the project
(``datamodules.workflows``, ``collapse.store``, the rest of ``collapse``) never import it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from callbacks.fixed_steps import StopAtStep
from callbacks.progress import LineProgress, progress_bar_wanted
from callbacks.rng_state import RngStateCallback
from callbacks.synthetic_data import SyntheticDataCallback, on_device
from callbacks.timed_checkpoint import MidEpochResume, TimedCheckpoint
from collapse.atomic import atomic_torch_save, atomic_write_json
from collapse.cli import secondary_process
from collapse.contract import EXACT_MEANS, Modality, RealDataModule
from collapse.distributed import Dist, forward_signal, launch, wants_processes
from collapse.errors import ConfigError, Terminated, UserError, first_line
from collapse.progress import DEFAULT_INTERVAL, check_interval, check_log_level, console
from collapse.rundir import (
    METRICS,
    config_defaults,
    config_dict,
    prepare_run_dir,
    release_run_dir,
    resolve_out_dir,
    upgrade_metric_names,
    write_metrics,
)
from collapse.seeding import MAX_SEED, derive_seed
from collapse.store import GenerationStore, StoreError
from collapse.tracking import Tracker, WandbConfig, check_mode
from datamodules.synthetic import SyntheticAccumulatingDataModule
from datamodules.workflows import Workflow, WorkflowError
from engine.trainer import FixedStepsTrainer, check_loop_settings, tracker_logging, use_atomic_checkpoints

MODEL_FILE = "model.pt"
"""Fitted weights (``state_dict``) of a generation, in its folder."""
METRICS_FILE = "metrics.json"
"""Test metrics and training-set counts of a generation, in its folder."""
CHECKPOINT_DIR = "checkpoints"
"""Mid-fit Lightning checkpoints inside a staging folder (removed once the fit is saved)."""
LAST_CKPT = "last.ckpt"
FIT_FILE = "fit.json"
"""The optimizer steps of a saved fit, staged beside ``model.pt`` until they are in metrics.json (never published)."""
FIRST = "first"
"""``--steps_per_generation first``: every later generation takes as many optimizer steps as generation 0."""
METRIC_COLUMNS = ("workflow", "seed", "generation", "metric", "value")

# Lightning messages that say nothing about a run of this loop (resuming into a non-empty checkpoint
# folder is expected; tiny data sets need no loader workers).
_NOISE = (
    r".*does not have many workers.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*GPU available but not used.*",
    r".*Total length of .* across ranks is zero.*",  # no validation set: Lightning skips validation
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # A module that prepares its batches on the host (the causal LM packs and counts them there) overrides
    # on_before_batch_transfer; the data modules define none, so the module's hook is the one wanted.
    r".*You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a.*",
)


@dataclass
class LoopConfig:
    """Settings of a generation loop run (recipes extend it with their model and data settings)."""

    out_dir: str
    """Run directory: config.yaml, metrics.csv and one gen_XXX folder per finished generation."""
    workflow: str = "accumulate"
    """Data workflow, e.g. replace, accumulate, accumulate_subsample(size=512), mix(real=256, synthetic=1024)."""
    generations: int = 5
    """Number of generations; generation 0 trains on real data only."""
    seed: int = 0
    """Run seed; every random step of generation g is seeded from (seed, g)."""
    real_size: int | None = None
    """Real examples at generation 0 (n); default: the whole real training set."""
    warm_start: bool = False
    """Start each generation from the previous generation's weights instead of a fresh initialisation."""
    num_synthetic: int | None = None
    """Samples drawn from each model; default: what the workflow trains on (multiplier x real_size)."""
    batch_size: int = 64
    """Training batch size (also the val/test batch size)."""
    sample_batch_size: int = 1024
    """Samples per sampling call (part of the sampling seed: changing it changes the samples)."""
    num_workers: int = 0
    """Data loader worker processes."""
    steps_per_generation: int | str | None = None
    """Fixed compute, to control for training-set size: optimizer steps per generation. None (null, the default):
    every generation trains for the trainer's max_epochs, so a growing (accumulate) set gets more steps; first:
    generations 1, 2, ... take exactly as many steps as generation 0 took (read back from gen_000/metrics.json, so
    a resumed run keeps them; generation 0 is unaffected); an integer S: every generation, 0 included, takes
    exactly S steps. A generation makes reshuffled passes over its (unchanged) training set until the S-th step,
    the last pass cut short: of a set larger than S batches it sees a random subset, each example at most once.
    Steps are optimizer steps per process, as Lightning counts them (global_step)."""
    overwrite: bool = False
    """Replace a run with a different config in out_dir instead of refusing: only its own outputs (config.yaml,
    metrics, gen_XXX, ...) are deleted, other files in the folder are kept."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging."""
    log_level: str = "INFO"
    """Console messages shown (on stderr): DEBUG, INFO (data counts, progress lines), WARNING or ERROR."""
    progress_every: float = DEFAULT_INTERVAL
    """Seconds between progress lines (training, test, sampling, scoring) when stdout is not a terminal (a log
    file, CI, a W&B agent); on a terminal Lightning's progress bar shows the fit. 0: a line for every step."""
    checkpoint_minutes: float = 10.0
    """Minutes of training between mid-epoch checkpoints, so that a killed fit whose epochs are long (a published
    TinyStories generation is one epoch) loses at most about that much; the fit resumes from one exactly as it
    would have gone on. 0: only at the end of each epoch. May differ on resume."""

    def __post_init__(self) -> None:
        _check_steps_per_generation(self.steps_per_generation)
        if isinstance(self.checkpoint_minutes, bool) or not (
            isinstance(self.checkpoint_minutes, (int, float)) and 0 <= self.checkpoint_minutes < math.inf
        ):
            raise ConfigError(
                f"--checkpoint_minutes must be a number of minutes >= 0 (0: only at epoch ends), "
                f"got {self.checkpoint_minutes!r}"
            )
        self.log_level = check_log_level(self.log_level)
        self.progress_every = check_interval(self.progress_every)


@dataclass
class LoopResult:
    """What :func:`run_generations` did."""

    out_dir: Path
    metrics: dict[int, dict[str, float]]
    """Per generation (all finished ones, including earlier runs'): the contents of its metrics.json, every metric
    name in its current spelling (``test_loss``, also for a generation an older version wrote as ``test/loss``)."""
    fitted: list[int]
    """Generations whose model was fitted (fully or resumed from a checkpoint) by this call."""
    committed: list[int]
    """Generations finished by this call (the others were finished by an earlier run)."""


def run_generations(
    modality: Modality,
    cfg: LoopConfig,
    *,
    recipe: str | None = None,
    config: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    verbose: bool = False,
) -> LoopResult:
    """Run (or resume) ``cfg.generations`` generations of ``modality`` under ``cfg.workflow``.

    Args:
        modality: the data and model.
        cfg: the loop settings.
        recipe: recipe name for config.yaml and W&B; default: ``modality.name``.
        config: the full recipe config written to config.yaml and guarded on resume; default: ``cfg``.
        callbacks: extra Lightning callbacks for every generation's trainer.
        verbose: keep Lightning's own info messages and warnings.

    For the length of the run the project's log messages (``--log_level``) and progress lines
    (``--progress_every``) go to stderr as ``[recipe] message`` (see :func:`collapse.progress.console`).
    """
    with console(cfg.log_level, recipe or modality.name, cfg.progress_every), _signals_stop_the_run():
        return _run_generations(modality, cfg, recipe, config, callbacks, verbose)


def _run_generations(
    modality: Modality,
    cfg: LoopConfig,
    recipe: str | None,
    config: Mapping[str, Any] | None,
    callbacks: Sequence[Callback],
    verbose: bool,
) -> LoopResult:
    wf = check_settings(modality, cfg)
    recipe = recipe or modality.name
    with _quiet_lightning(enabled=not verbose):
        dist = launch(modality.trainer_kwargs(0))

    real = modality.real_datamodule()
    dist.on_zero(real.prepare_data)  # downloads and caches once, before every rank reads them
    real.setup("fit")
    real_size, num_synthetic = check_sizes(modality, cfg, real)

    full_config = dict(config) if config is not None else config_dict(cfg)

    def _start() -> Path:
        # Locks the run directory for this whole call (rank 0 only); a larger --generations continues a run.
        target = resolve_out_dir(cfg.out_dir, full_config)
        out = prepare_run_dir(
            target, recipe, full_config, cfg.overwrite, extendable=True, defaults=config_defaults(type(cfg))
        )
        try:
            modality.start_run(out)
        except BaseException:
            release_run_dir(out)
            raise
        return out

    out = dist.on_zero(_start)
    store = GenerationStore(out)
    ctx = _GenerationContext(modality, cfg, wf, store, real, real_size, num_synthetic, list(callbacks), dist)
    # One W&B run per recipe run, from rank 0 only.
    tracker = Tracker(cfg.wandb if dist.is_zero else WandbConfig(mode="disabled"), recipe, out, full_config)
    ctx.tracker = tracker  # the fits' training curves go to the same W&B run
    fitted: list[int] = []
    committed: list[int] = []
    failed = True
    try:
        with _quiet_lightning(enabled=not verbose):
            for g in range(cfg.generations):
                t0 = time.perf_counter()
                if dist.on_zero(lambda g=g: store.is_complete(g) and bool(store.verify(g))):
                    if dist.is_zero:
                        print(ctx.progress_line(g, _read_metrics(store, g), "finished earlier"), flush=True)
                    continue
                did_fit, metrics = ctx.make(g)
                if did_fit:
                    fitted.append(g)
                committed.append(g)
                seconds = time.perf_counter() - t0
                dist.on_zero(lambda g=g, m=metrics, t=seconds: ctx.report(g, m, t, tracker))
        all_metrics = dist.on_zero(
            lambda: {g: _read_metrics(store, g) for g in store.completed() if g < cfg.generations}
        )
        if dist.is_zero:
            tracker.save_file(write_metrics_csv(store, wf.label, cfg.seed))
        failed = False
    finally:
        tracker.finish(failed)
        release_run_dir(out)
    return LoopResult(out, all_metrics, fitted, committed)


class _GenerationContext:
    """Makes one generation in its staging folder, each step skipped when its output is staged.

    In a multi-process run every rank runs :meth:`make`; rank 0 decides which steps are left, and
    alone writes the generation's files (see :mod:`collapse.distributed`).
    """

    def __init__(
        self,
        modality: Modality,
        cfg: LoopConfig,
        wf: Workflow,
        store: GenerationStore,
        real: RealDataModule,
        real_size: int,
        num_synthetic: int,
        callbacks: list[Callback],
        dist: Dist,
    ):
        self.modality, self.cfg, self.wf, self.store = modality, cfg, wf, store
        self.real, self.real_size, self.num_synthetic = real, real_size, num_synthetic
        self.callbacks = callbacks
        self.dist = dist
        self.tracker: Tracker | None = None
        self._first_steps: int | None = None  # generation 0's optimizer steps, read once (steps_per_generation first)

    def fixed_steps(self, g: int) -> int | None:
        """The optimizer steps generation ``g`` must take (``--steps_per_generation``), or None: its epochs decide."""
        spec = self.cfg.steps_per_generation
        if spec is None:
            return None
        if spec != FIRST:
            return int(spec)
        if g == 0:
            return None  # generation 0 sets the budget with its configured epochs
        if self._first_steps is None:
            # From the committed (checksummed) generation 0, not from this process's memory, so a resumed run
            # (or one whose generation 0 was made by an earlier call) uses the same budget as an unbroken one.
            self._first_steps = self.dist.on_zero(lambda: _first_generation_steps(self.store))
        return self._first_steps

    def _plan(self, g: int) -> dict[str, Any]:
        """Rank 0: open the staging folder, drop a killed run's torn files, say which steps are done."""
        store = self.store
        stage = store.begin(g)
        for stale in stage.rglob(".*.tmp-*"):  # half-written files of a killed run (this loop is the only writer)
            stale.unlink()
        _remove_hpc_checkpoints(stage)
        staged_metrics = store.staged(g, METRICS_FILE)
        return {
            "fitted": store.staged(g, MODEL_FILE) is not None,
            "checkpoint": _resumable_checkpoint(stage / CHECKPOINT_DIR / LAST_CKPT),
            "metrics": _load_metrics(staged_metrics) if staged_metrics is not None else None,
        }

    def make(self, g: int) -> tuple[bool, dict[str, float]]:
        """Make and commit generation ``g``; return (whether it was fitted now, its metrics)."""
        cfg, store, dist = self.cfg, self.store, self.dist
        plan = dist.on_zero(lambda: self._plan(g))
        stage = store.staging(g)
        pl.seed_everything(derive_seed(cfg.seed, g, "init"), workers=True, verbose=False)
        dm = SyntheticAccumulatingDataModule(
            self.real,
            self.wf,
            store,
            g,
            real_size=self.real_size,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
        )
        model = _build_model(self.modality, g)
        if cfg.warm_start and g > 0:
            dist.on_zero(lambda: store.verify(g - 1) and None)
            _load_weights(model, store.path(g - 1) / MODEL_FILE)

        sampler = SyntheticDataCallback(
            store,
            g,
            num_samples=self.num_synthetic,
            batch_size=cfg.sample_batch_size,
            seed=derive_seed(cfg.seed, g, "sample"),
            sampling_settings=self.modality.sampling_settings(),
        )
        steps = self.fixed_steps(g)
        trainer = self._trainer(g, stage, sampler, dm, steps)

        if plan["metrics"] is None and not plan["fitted"]:
            _test_batches_exist(trainer, dm, g, model)  # Lightning would find out only after the training
        did_fit = False
        if plan["fitted"]:
            _load_weights(model, stage / MODEL_FILE)
        else:
            # Different ranks draw different noise (dropout, latents); one process keeps the plain seed.
            purpose = "fit" if dist.world_size == 1 else f"fit-rank{dist.rank}"
            pl.seed_everything(derive_seed(cfg.seed, g, purpose), workers=True, verbose=False)
            with _interrupt_passes_through(), _settings_fit_the_data(g):
                trainer.fit(model, datamodule=dm, ckpt_path=plan["checkpoint"])  # samples in on_fit_end
            if trainer.interrupted:
                raise KeyboardInterrupt
            if steps is not None and trainer.global_step != steps:
                # The epochs were sized to reach S, so only something outside the loop stops short (an early-stopping
                # callback, a gradient-accumulation schedule): the budget would silently differ.
                raise UserError(
                    f"generation {g} stopped after {trainer.global_step} of the {steps} optimizer steps that "
                    "--steps_per_generation asks for; remove what stops the fit early (e.g. early stopping)"
                )
            taken = trainer.global_step
            dist.on_zero(lambda: self._save_fit(stage, model, taken))
            did_fit = True

        metrics = plan["metrics"]
        if metrics is None:
            pl.seed_everything(derive_seed(cfg.seed, g, "test"), workers=True, verbose=False)
            with _interrupt_passes_through(), _settings_fit_the_data(g):
                results = trainer.test(model, datamodule=dm, verbose=False)  # samples first, if the fit did not
            tested = {k: float(v) for k, v in sorted((results[0] if results else {}).items())}
            metrics = dist.on_zero(lambda: self._finish_metrics(g, stage, sampler, tested, dm))
        # Rank 0's answer on every rank: rank 0 may already have committed (and moved) the staging folder, and a
        # rank that looked for itself would then start drawing alone and wait for the others forever.
        if not dist.on_zero(sampler.is_done):  # only when an earlier run staged the metrics by hand
            with on_device(model, trainer.strategy.root_device):  # the test's teardown left it on the CPU
                sampler.sample_into_store(model, dist.rank, dist.world_size, dist.barrier)

        dist.on_zero(lambda: self._commit(g, sampler))
        return did_fit, metrics

    @staticmethod
    def _save_fit(stage: Path, model: pl.LightningModule, steps: int) -> None:
        # The step count first: model.pt marks the fit as done, and a run that resumes after it must find both.
        atomic_write_json(stage / FIT_FILE, {"train_steps": int(steps)})
        atomic_torch_save(_weights(model), stage / MODEL_FILE)
        shutil.rmtree(stage / CHECKPOINT_DIR, ignore_errors=True)
        _remove_hpc_checkpoints(stage)

    def _finish_metrics(
        self, g: int, stage: Path, sampler: SyntheticDataCallback, tested: dict[str, float], dm: Any
    ) -> dict[str, float]:
        """Rank 0: test metrics + training-set counts + the modality's sample metrics, staged as metrics.json."""
        metrics = dict(tested)
        metrics.update({k: float(v) for k, v in sorted(self.modality.derived_metrics(tested).items())})
        metrics.update(dm.train_composition())
        fit = stage / FIT_FILE
        if fit.is_file():  # absent only for a fit staged by a version of the loop that did not count its steps
            metrics["train_steps"] = int(json.loads(fit.read_text())["train_steps"])
        arrays = {name: np.load(stage / f"{name}.npy", mmap_mode="r") for name in sampler.recorded_arrays()}
        # A generation that drew no synthetic set (the only one of a one-generation run) has nothing to score.
        extra = self.modality.evaluate_samples(stage, arrays, g) if self.num_synthetic > 0 else {}
        metrics.update({k: float(v) for k, v in sorted(extra.items())})
        self.store.save_json(g, METRICS_FILE, metrics)
        return metrics

    def _commit(self, g: int, sampler: SyntheticDataCallback) -> None:
        stage = self.store.staging(g)
        (stage / FIT_FILE).unlink(missing_ok=True)  # its number is in metrics.json now
        # A run killed after saving the fit but before dropping its mid-fit checkpoints, or after recording the set
        # but before dropping its chunks, leaves them staged, and a resume skips those steps: never publish them.
        shutil.rmtree(stage / CHECKPOINT_DIR, ignore_errors=True)
        if sampler.is_done():
            sampler.drop_chunks()
        settings = dict(sampler.settings)
        self.store.commit(
            g,
            num_samples=self.num_synthetic,
            sampling=settings,
            sample_arrays=sampler.recorded_arrays(),
            ragged_arrays=sampler.recorded_ragged(),
            workflow=self.wf.label,
            seed=self.cfg.seed,
            warm_start=self.cfg.warm_start,
        )

    def report(self, g: int, metrics: Mapping[str, float], seconds: float, tracker: Tracker) -> None:
        """Rank 0, after a commit: metrics.csv, the progress line, W&B (metrics and the generation's pictures)."""
        write_metrics_csv(self.store, self.wf.label, self.cfg.seed)
        print(self.progress_line(g, metrics, f"{seconds:.1f}s"), flush=True)
        tracker.log({**metrics, "generation_seconds": seconds}, generation=g)
        for picture in sorted(self.store.path(g).glob("*.png")):
            tracker.log_image(f"samples/{picture.stem}", picture, generation=g)
        for text in sorted(self.store.path(g).glob("samples*.txt")):  # sample texts (e.g. stories), one per block
            tracker.log_texts(f"samples/{text.stem}", _text_blocks(text.read_text(encoding="utf-8")), generation=g)

    def _trainer(
        self,
        g: int,
        stage: Path,
        sampler: SyntheticDataCallback,
        dm: SyntheticAccumulatingDataModule,
        steps: int | None,
    ) -> pl.Trainer:
        kwargs: dict[str, Any] = {
            "default_root_dir": str(stage),
            "logger": False,
            "enable_progress_bar": progress_bar_wanted(),  # on a terminal; else LineProgress writes lines
            "enable_model_summary": False,
        }
        user = dict(self.modality.trainer_kwargs(g))
        user_callbacks = list(user.pop("callbacks", None) or [])
        kwargs.update(user)
        kwargs["logger"], logging = tracker_logging(kwargs.get("logger"), self.tracker, g, user_callbacks)
        callbacks: list[Callback] = [*user_callbacks, *logging, *self.callbacks, sampler, RngStateCallback()]
        if not kwargs.get("enable_progress_bar"):
            callbacks.append(LineProgress(f"gen {g}", self.cfg.progress_every, steps))
        trainer_cls: type[pl.Trainer] = pl.Trainer
        if steps is not None:
            per_epoch = _optimizer_steps_per_epoch(
                dm.train_batches_per_epoch(self.dist.world_size),
                kwargs.get("accumulate_grad_batches", 1),
                kwargs.get("limit_train_batches"),
            )
            # The passes S steps need, the last one cut short by StopAtStep; a schedule over max_epochs (the toy's
            # cosine) then spans the fit. Not max_steps: Lightning (2.6) resumes a fit that has max_steps from an
            # end-of-epoch checkpoint by running that epoch's end again and counting it twice, so a resumed fit
            # would see other batches than an unbroken one; the epoch-based resume is exact.
            kwargs["max_epochs"] = math.ceil(steps / per_epoch)
            kwargs["max_steps"] = -1
            callbacks.append(StopAtStep(steps))
            trainer_cls = FixedStepsTrainer
        ckpt_kwargs = self.modality.checkpoint_kwargs(g)
        if ckpt_kwargs is not None:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=stage / CHECKPOINT_DIR,
                    filename=Path(LAST_CKPT).stem,
                    save_top_k=1,
                    enable_version_counter=False,
                    **ckpt_kwargs,
                )
            )
            callbacks.append(MidEpochResume())  # also for a run resumed with --checkpoint_minutes 0
            if self.cfg.checkpoint_minutes > 0:
                callbacks.append(TimedCheckpoint(stage / CHECKPOINT_DIR / LAST_CKPT, self.cfg.checkpoint_minutes))
            kwargs["enable_checkpointing"] = True
        trainer = trainer_cls(callbacks=callbacks, **kwargs)
        _without_slurm_requeue(trainer)
        _without_lightning_s_sigterm(trainer)
        use_atomic_checkpoints(trainer)
        if isinstance(trainer, FixedStepsTrainer):
            trainer.fixed_steps = steps
        return trainer

    def progress_line(self, g: int, metrics: Mapping[str, float], tail: str) -> str:
        """``[toy] accumulate seed=0 gen 2/4 test_loss=1.234 train=300 (real 100, synthetic 200) 1.2s``."""
        shown = [k for k in metrics if k.startswith(("test", "sample"))]
        tests = " ".join(f"{k}={metrics[k]:.4g}" for k in shown)
        size = metrics.get("train_size")
        train = (
            f" train={size:.0f} (real {metrics.get('train_real', 0):.0f}, "
            f"synthetic {metrics.get('train_synthetic', 0):.0f})"
            if size is not None
            else ""
        )
        gens = f"gen {g}/{self.cfg.generations - 1}"
        return f"[{self.modality.name}] {self.wf.label} seed={self.cfg.seed} {gens} {tests}{train} {tail}"


def write_metrics_csv(store: GenerationStore, workflow: str, seed: int) -> Path:
    """Rewrite ``<run>/metrics.csv`` (long format) from every finished generation's metrics.json."""
    rows = []
    for g in store.completed():
        for name, value in sorted(_read_metrics(store, g).items()):
            rows.append((workflow, seed, g, name, value))
    path = store.root / METRICS
    write_metrics(path, METRIC_COLUMNS, rows)
    return path


SAMPLE_TEXT_SEPARATOR = "<|endoftext|>"
"""The line that ends each sample in a ``samples*.txt`` file of a generation (the TinyStories file format)."""


def _text_blocks(text: str) -> list[str]:
    """The samples of a ``samples*.txt`` file: the blocks between :data:`SAMPLE_TEXT_SEPARATOR` lines."""
    blocks = [b.strip() for b in re.split(rf"^{re.escape(SAMPLE_TEXT_SEPARATOR)}$", text, flags=re.MULTILINE)]
    return [b for b in blocks if b]


def _read_metrics(store: GenerationStore, g: int) -> dict[str, float]:
    """A finished generation's metrics.json, with today's metric names (an older ``test/loss`` as ``test_loss``)."""
    path = store.path(g) / METRICS_FILE
    try:
        return _load_metrics(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing from a finished generation") from None


def _load_metrics(path: Path) -> dict[str, float]:
    """A metrics.json (finished or staged) with every metric name in its current spelling
    (:func:`collapse.rundir.metric_name`: runs made before the names were unified hold ``test/loss``, ...)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: not a JSON object of metric names and values")
    return upgrade_metric_names(data)


def _weights(model: torch.nn.Module) -> dict[str, Any]:
    """``model.state_dict()`` as ``model.pt`` keeps it: the same bytes however the fit went. The exact-means module
    (:data:`~collapse.contract.EXACT_MEANS`, made by the first evaluation, holding no weights) would otherwise
    enter the state_dict's per-module metadata only if this process evaluated before saving (not when a fit
    killed after its last epoch resumes from that epoch's checkpoint)."""
    state = model.state_dict()
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        state._metadata = type(meta)(  # type: ignore[attr-defined]
            (name, value) for name, value in meta.items() if name.split(".")[0] != EXACT_MEANS
        )
    return state


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a torn or foreign file
        raise StoreError(f"{path}: cannot be loaded as a state_dict ({exc})") from None
    model.load_state_dict(state)


HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"
"""What Lightning's SLURM auto-requeue saves into ``default_root_dir`` (the staging folder) on SIGUSR1."""


def _without_slurm_requeue(trainer: pl.Trainer) -> None:
    """Switch Lightning's SLURM auto-requeue off for ``trainer`` (whatever cluster environment it found or was given).

    On SIGUSR1 Lightning saves a mid-epoch ``hpc_ckpt_N.ckpt`` into the staging folder and requeues the job;
    then any fit or test without an explicit checkpoint loads it: a fit would resume mid-epoch (not exactly),
    and the test would score that checkpoint's stale weights instead of the fitted model. The loop resumes
    by itself from its own checkpoints when the same command runs again (a requeued job included). The
    environment itself is left as Lightning chose it (torchrun under SLURM keeps its own ranks); only the flag
    that Lightning reads when a fit starts is cleared.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    connector = getattr(trainer, "_accelerator_connector", None)
    environment = getattr(connector, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False


def _remove_hpc_checkpoints(stage: Path) -> None:
    """Delete Lightning's SLURM requeue checkpoints from a staging folder (:func:`_without_slurm_requeue`): read by
    nothing of the loop, they would be loaded into its next fit or test, and committed with the generation."""
    for path in stage.glob(HPC_CHECKPOINTS):
        path.unlink()


def _resumable_checkpoint(path: Path) -> str | None:
    """``path`` if it holds a complete checkpoint to resume the fit from, else None (and remove it)."""
    if not path.is_file():
        return None
    if zipfile.is_zipfile(path):  # torch.save writes a zip archive; a torn one lacks its central directory
        return str(path)
    path.unlink()
    return None


def _check_steps_per_generation(value: Any) -> None:
    """Refuse a ``--steps_per_generation`` that is not None, ``first`` or a positive integer (one-line ConfigError)."""
    if value is None or value == FIRST:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    raise ConfigError(
        f"--steps_per_generation must be a positive integer, {FIRST!r} (generation 0's step count) "
        f"or None (epochs as configured), got {value!r}"
    )


def _first_generation_steps(store: GenerationStore) -> int:
    """Rank 0: the optimizer steps generation 0 took, from its committed metrics.json."""
    steps = _read_metrics(store, 0).get("train_steps")
    if not isinstance(steps, (int, float)) or steps < 1 or steps != int(steps):
        raise StoreError(
            f"{store.path(0) / METRICS_FILE}: no step count (train_steps) for --steps_per_generation {FIRST}; "
            "generation 0 was made by an older version of the loop: rerun with --overwrite true"
        )
    return int(steps)


def _optimizer_steps_per_epoch(batches: int, accumulate: Any, limit: Any) -> int:
    """Optimizer steps of one epoch of ``batches`` loader batches, counted as Lightning counts them.

    ``limit_train_batches`` caps the batches (an int) or keeps a fraction of them (a float, rounded down); with
    ``accumulate_grad_batches`` A Lightning steps every A batches and on the last batch: ceil(batches / A).
    """
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    accumulate = accumulate if isinstance(accumulate, int) and accumulate >= 1 else 1
    return max(1, math.ceil(batches / accumulate))


def _build_model(modality: Modality, g: int) -> Any:
    """Generation ``g``'s model from ``modality``; a model too large for this machine's memory (size flags far past
    what it holds) is a UserError, not an allocator's traceback."""
    try:
        return modality.build_model(g)
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "can't allocate memory" not in str(exc):
            raise
        size = re.search(r"allocate (\d+) bytes", str(exc))
        need = f"{int(size.group(1)) / 2**30:.3g} GiB for one of its tensors" if size else first_line(exc)
        raise UserError(
            f"generation {g}'s model does not fit in this machine's memory ({need}); lower its size (--model.*)"
            + ("; config.yaml has these settings, so run again with --overwrite or another --out_dir" if g == 0 else "")
        ) from None


def check_settings(modality: Modality, cfg: LoopConfig) -> Workflow:
    """The workflow of ``cfg``, after every check of the settings that needs no data (UserError on a bad one).

    Run before anything is written; a recipe's ``--dry_run`` runs it too, so a dry run refuses what the run would.
    """
    wf = Workflow.parse(cfg.workflow)
    _validate(cfg)
    check_mode(cfg.wandb)
    trainer_kwargs = modality.trainer_kwargs(0)
    check_loop_settings(trainer_kwargs, cfg.steps_per_generation)
    with _quiet_lightning():  # the probe Trainer's banner is not the run's
        wants_processes(trainer_kwargs)  # devices, nodes, strategy usable on this machine
    return wf


def check_sizes(modality: Modality, cfg: LoopConfig, real: Any) -> tuple[int, int]:
    """``(real_size, num_synthetic)`` of the run, checked against the real data module ``real`` (set up).

    UserError where the workflow needs more real data than there is, or ``--num_synthetic`` is too small.
    """
    wf = Workflow.parse(cfg.workflow)
    available = len(real.train_dataset)
    real_size = cfg.real_size if cfg.real_size is not None else available
    try:
        wf.check(real_size, cfg.generations, available)
    except WorkflowError as exc:
        hint = f" ({wf.label} needs more real data than generation 0 uses: set --real_size)"
        raise WorkflowError(str(exc) + (hint if cfg.real_size is None and wf.adds_real_data else "")) from None
    modality.check_real_data(real, real_size, cfg)
    needed = wf.synthetic_size(real_size) if cfg.generations > 1 else 0
    num_synthetic = needed if cfg.num_synthetic is None else cfg.num_synthetic
    if num_synthetic < needed:
        raise UserError(f"--num_synthetic {num_synthetic} is less than the {needed} samples {wf.label} trains on")
    if num_synthetic > MAX_SYNTHETIC:  # checked before generation 0 trains, not when its set is drawn
        flag = "--num_synthetic" if cfg.num_synthetic is not None else f"workflow {wf.label}"
        raise UserError(
            f"{flag} asks for synthetic sets of {num_synthetic} samples, more than the {MAX_SYNTHETIC} a run "
            "can draw and store; lower it"
        )
    return real_size, num_synthetic


MAX_SYNTHETIC = 2**31 - 1
"""The most samples one generation's synthetic set may hold (a bound far past the published sets, 2.12M stories)."""


def _validate(cfg: LoopConfig) -> None:
    _check_steps_per_generation(cfg.steps_per_generation)
    checks = [
        ("generations", cfg.generations, 1),
        ("batch_size", cfg.batch_size, 1),
        ("sample_batch_size", cfg.sample_batch_size, 1),
        ("seed", cfg.seed, 0),
        ("num_workers", cfg.num_workers, 0),
    ]
    if cfg.real_size is not None:
        checks.append(("real_size", cfg.real_size, 1))
    if cfg.num_synthetic is not None:
        checks.append(("num_synthetic", cfg.num_synthetic, 0))
    for flag, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"--{flag} must be an integer >= {low}, got {value!r}")
    if cfg.seed > MAX_SEED:
        raise UserError(f"--seed must be at most {MAX_SEED} (2**63 - 1), got {cfg.seed}")


@contextlib.contextmanager
def _signals_stop_the_run() -> Iterator[None]:
    """For the length of a run, SIGTERM (a scheduler's time limit, ``kill``, ``docker stop``) stops it as Ctrl-C does:
    :class:`Terminated` is raised wherever the run is (fit, test, sampling, scoring, commit), the processes this one
    started for the other ranks get the signal too, and the recipe ends with its resume line and status 143.

    Ctrl-C (SIGINT) raises KeyboardInterrupt, as Python's own handler does, and is passed on the same way: a Ctrl-C
    to rank 0 alone would leave the others to fail on its lost connection, and once they have stopped, Lightning's
    observer of them SIGKILLs this process within seconds, cutting its clean-up short (status 137, no resume line).

    Lightning's own SIGTERM handling is off in the loop's Trainers (:func:`_without_lightning_s_sigterm`): it stops
    only between batches (not at all on a test's last one), ends with status 0, and in a multi-process run broadcasts
    from inside the signal handler, which hangs when the other ranks are inside a collective of their own. A second
    signal while the first stops the run is ignored, except a second Ctrl-C on rank 0, which cuts its clean-up
    short; a process forked from this one (a data-loader worker) meets the signal's usual action.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()
    stop: type[BaseException] | None = None  # what the run is stopping with, once a signal came

    def handler(signum: int, frame: Any) -> None:
        nonlocal stop
        if os.getpid() != owner:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # what Python's own handler does there
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stop is not None:
            if signum == signal.SIGINT and not secondary_process():
                raise KeyboardInterrupt  # a second Ctrl-C on rank 0 cuts a slow clean-up (a W&B upload) short
            return  # rank 0 passes its signal on to ranks that the terminal's or the scheduler's reached as well
        stop = KeyboardInterrupt if signum == signal.SIGINT else Terminated
        forward_signal(signum)
        raise _stopped(stop)

    # A Ctrl-C that the run was started to ignore (a background job of a shell script) stays ignored, as in Python.
    signums = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    except BaseException as exc:
        # What the stopping run met on its way out is the stop's doing: data-loader workers signalled with the rest
        # of the process group (a scheduler's time limit) die, and their loader raises about it as the stop
        # unwinds; a rank that rank 0 left inside a collective gets a lost connection. (A GeneratorExit is this
        # generator's own close, when the stop reached the rank inside the ``with`` statement's exit.)
        if stop is not None and not isinstance(exc, (stop, GeneratorExit)):
            raise _stopped(stop) from exc
        raise
    finally:
        for signum, handler_before in previous.items():
            if stop is not None and signum == signal.SIGINT and secondary_process():
                # The terminal's Ctrl-C and rank 0's passed-on one both reach this rank; the later one would break
                # into its exit with a traceback. (A second SIGTERM meets its default action: no traceback, and a
                # rank whose exit hangs can still be ended.)
                handler_before = signal.SIG_IGN
            signal.signal(signum, handler_before if handler_before is not None else signal.SIG_DFL)


def _stopped(stop: type[BaseException]) -> BaseException:
    """A fresh exception of the kind a run stopped by a signal raises."""
    return Terminated("terminated (SIGTERM)") if stop is Terminated else KeyboardInterrupt()


def _without_lightning_s_sigterm(trainer: pl.Trainer) -> None:
    """Keep ``trainer`` from installing its SIGTERM handler for its fits and tests and from sharing its flag
    between processes at every step (:func:`_signals_stop_the_run` handles the signal for the whole run)."""
    from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

    class LoopSignals(_SignalConnector):
        def register_signal_handlers(self) -> None:
            self.received_sigterm = False
            self._original_handlers = {}  # nothing replaced, nothing to put back

    trainer._signal_connector = LoopSignals(trainer)
    # Nor broadcast its SIGTERM flag before every training batch of a multi-process fit: a collective and a read
    # back to the host per step (on GPUs, a wait for the step's kernels before the next batch can be queued).
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None


@contextlib.contextmanager
def _interrupt_passes_through() -> Iterator[None]:
    """Let a Ctrl-C inside ``trainer.fit`` or ``trainer.test`` reach the caller as a KeyboardInterrupt, and a
    SIGTERM as :class:`Terminated`.

    Lightning (2.6) catches a Ctrl-C, tears the trainer down, ignores SIGINT from then on and calls
    ``sys.exit(1)``: the recipe would end with status 1, without the line on how to resume, and the
    rest of the loop would never know. That SystemExit is raised while the KeyboardInterrupt is being
    handled, which tells it apart from any other exit. SIGINT gets back the handler it had before.
    A SIGTERM reaching a Trainer whose own handling is on (not the loop's: :func:`_signals_stop_the_run`)
    Lightning turns into its ``SIGTERMException`` at the next batch, a SystemExit without a status: the
    recipe would end with status 0, as if it had finished; it becomes :class:`Terminated` here too.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SIGTERMException:
        raise Terminated("terminated (SIGTERM)") from None
    except SystemExit as exc:
        if not isinstance(exc.__context__, KeyboardInterrupt):
            raise
        if handler is not None:  # None: a handler not set from Python, which cannot be put back
            with contextlib.suppress(ValueError):  # not the main thread: the handler was never changed
                signal.signal(signal.SIGINT, handler)
        raise KeyboardInterrupt from None


def _trainer_argument_names() -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}


def _test_batches_exist(trainer: pl.Trainer, dm: Any, g: int, model: Any = None) -> None:
    """Refuse, before generation ``g`` trains, evaluation settings that leave a process without a test batch (or,
    with validation, a validation batch): a ``--trainer.limit_test_batches`` fraction that keeps none, or, with
    several processes, an evaluation set whose smallest share (each rank scores every W-th example) is empty or
    cut to nothing by the fraction. A rank without batches skips the evaluation the others wait in.

    The loaders are the whole sets' (no process split yet), so what is refused here is refused on every rank.
    """
    world = max(1, int(getattr(trainer, "world_size", 1) or 1))
    for stage, limit in (("test", trainer.limit_test_batches), ("val", trainer.limit_val_batches)):
        if stage == "val" and (limit == 0 or not _validates(model)):
            continue
        fraction = isinstance(limit, float) and 0 < limit < 1
        if world == 1 and not fraction:
            continue
        try:
            loader = getattr(dm, f"{stage}_dataloader")()
            batches = len(loader)  # an empty list of loaders (no validation set): 0
        except (TypeError, NotImplementedError, AttributeError):  # no loader, or none with a length
            continue
        if not batches:
            continue
        size, batch_size = _dataset_size(loader), getattr(loader, "batch_size", None)
        flag = f"--trainer.limit_{stage}_batches"
        if world > 1 and size is not None and batch_size:
            share = size // world  # rank W - 1 has the fewest examples
            if share == 0:
                raise UserError(
                    f"the {stage} set of generation {g} has {size} examples, fewer than the {world} processes: "
                    f"some would score none while the others wait for them; use fewer processes or more {stage} data"
                )
            batches = -(-share // batch_size)  # the smallest rank's batches
        if fraction and int(batches * limit) == 0:
            whose = " (the smallest process's share)" if world > 1 else ""
            raise UserError(
                f"the --trainer settings do not fit generation {g}'s data: {flag} {limit} of "
                f"{batches} {stage} batches{whose} is no batch; give at least {1 / batches:.4g}, or a number of batches"
            )


def _validates(model: Any) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return model is not None and is_overridden("validation_step", model, pl.LightningModule)


def _dataset_size(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


_MONITOR_MISSING = re.compile(r"conditioned on metric .* which is not available|could not find the monitored key")
"""Lightning's refusal of a callback's ``monitor`` that the module does not log (EarlyStopping, ModelCheckpoint)."""


@contextlib.contextmanager
def _settings_fit_the_data(g: int) -> Iterator[None]:
    """Turn Lightning's refusal of a Trainer setting that only the data shows to be wrong into one UserError.

    ``--trainer.limit_val_batches 0.01`` of a one-batch validation set, or ``--trainer.val_check_interval``
    beyond the epoch's batches, pass every check made before the data is read and are refused inside
    ``fit``/``test``; so is a callback that monitors a metric the module does not log. Only errors that name a
    Trainer argument or such a metric are turned; any other error keeps its traceback.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        yield
    except (MisconfigurationException, ValueError, RuntimeError) as exc:
        text = " ".join(str(exc).split())
        if _MONITOR_MISSING.search(text):  # an EarlyStopping or ModelCheckpoint of --trainer.callbacks
            raise UserError(
                f"a --trainer.callbacks monitor names a metric that generation {g} does not log: {text}"
            ) from None
        named = [k for k in _trainer_argument_names() if f"`{k}`" in text or f"`{k}=" in text]
        if isinstance(exc, RuntimeError) or not named:
            raise
        for key in named:
            text = text.replace(f"`{key}`", f"--trainer.{key}").replace(f"`{key}=", f"`--trainer.{key} ")
        raise UserError(f"the --trainer settings do not fit generation {g}'s data: {text}") from None


@contextlib.contextmanager
def _quiet_lightning(enabled: bool = True) -> Iterator[None]:
    """Silence Lightning's info lines (accelerator summary, ``max_epochs`` reached) and known noise warnings."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in _NOISE:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


__all__ = [
    "LoopConfig",
    "LoopResult",
    "check_settings",
    "check_sizes",
    "run_generations",
    "write_metrics_csv",
]
