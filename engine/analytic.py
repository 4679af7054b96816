"""The generation loop of the analytic recipes, vectorised over seeds, in NumPy only.

An analytic recipe describes one grid cell as a :class:`Problem` whose arrays carry a leading seed
axis ``S``: real data ``(S, R, ...)``, synthetic sets ``(S, m, ...)``, metrics ``(S,)``. The loop
below is the same as the Lightning recipes' loop (fit, evaluate on real data, sample the next
synthetic set, and the same :class:`~datamodules.workflows.Workflow` decides every training set)
but runs all seeds at once and never imports torch or Lightning.

Resume granularity is the grid cell: each finished cell is written atomically to
``<out_dir>/cells/<cell>.csv``, then its record (row count, sha256) to ``<cell>.json``, and skipped when the
command is run again if the two agree (a cut, edited or foreign cell file is recomputed, never half-read);
``metrics.csv`` is the concatenation of the cells in grid order.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import re
import shutil
import signal
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from collapse.cells import cell_problem, write_cell
from collapse.cli import die_with_parent, positive_ints, watch_parent
from collapse.errors import UserError, first_line
from collapse.progress import (
    DEFAULT_INTERVAL,
    Progress,
    check_interval,
    check_log_level,
    console,
    progress_interval,
)
from collapse.rundir import (
    METRICS,
    TAIL_COLUMNS,
    concat_csv,
    config_defaults,
    config_dict,
    prepare_run_dir,
    release_run_dir,
    resolve_out_dir,
)
from collapse.seeding import MAX_SEED
from collapse.tracking import Tracker, WandbConfig, check_mode, resolve
from datamodules.workflows import REAL, TrainingSet, Workflow, parse_workflows


class Problem(Protocol):
    """One grid cell of an analytic recipe, vectorised over ``num_seeds`` seeds."""

    metrics: tuple[str, ...]

    def real(self, count: int) -> np.ndarray:
        """The real training data of every seed, ``(S, count, ...)``."""

    def fit(self, ts: TrainingSet, parts: list[np.ndarray]) -> Any:
        """Fit one model per seed on the training set ``ts``; ``parts[i]`` is source i, ``(S, len_i, ...)``."""

    def evaluate(self, model: Any) -> dict[str, np.ndarray]:
        """Metrics of every seed's model on real held-out data, each ``(S,)``."""

    def sample(self, model: Any, rng: np.random.Generator, count: int) -> np.ndarray:
        """A synthetic set of ``count`` examples from every seed's model, ``(S, count, ...)``.

        A problem may also define ``sample_summary(model, rng, count)``: a draw of the *sufficient
        statistics* of such a set (an object with a ``count`` attribute), exact in distribution, which
        the loop uses when the workflow only ever trains on whole synthetic sets.
        """


def gather(parts: Sequence[np.ndarray], index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the concatenation of ``parts`` (each ``(S, len_i, ...)``) at per-seed ``index`` ``(S, m)``.

    Returns ``(values (S, m, ...), row)`` where ``row`` is the index inside the part each value came
    from. Nothing but the selected rows is copied.
    """
    lengths = np.array([p.shape[1] for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pos = np.searchsorted(offsets, index, side="right") - 1  # (S, m) part of each pool index
    row = index - offsets[pos]
    S, m = index.shape
    out = np.empty((S * m,) + parts[0].shape[2:], dtype=np.result_type(*parts))
    # Group the requests by part (one sort), then read each part once with one fancy index.
    flat_pos, flat_row = pos.ravel(), row.ravel()
    flat_seed = np.repeat(np.arange(S), m)
    order = np.argsort(flat_pos, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(flat_pos, minlength=len(parts)))])
    for i, part in enumerate(parts):
        take = order[bounds[i] : bounds[i + 1]]
        if take.size:
            out[take] = part[flat_seed[take], flat_row[take]]
    out = out.reshape((S, m) + parts[0].shape[2:])
    return out, row


class PrefixCache:
    """Additive statistics of whole sources, reused while each training set extends the previous one.

    Under accumulate, generation t's sources are generation t-1's plus one new synthetic set, so a
    generation costs one new set's statistics, not the whole pool's, and only one combined
    statistic is kept in memory.
    """

    def __init__(self, stats: Callable[[np.ndarray], Any], merge: Callable[[Any, Any], Any]):
        self.stats, self.merge = stats, merge
        self._keys: tuple = ()
        self._value: Any = None

    def __call__(self, ts: TrainingSet, parts: Sequence[np.ndarray]) -> Any:
        keys = tuple(ts.sources)
        n = len(self._keys)
        start, value = (n, self._value) if n and keys[:n] == self._keys else (0, None)
        for part in parts[start:]:
            piece = self.stats(part)
            value = piece if value is None else self.merge(value, piece)
        self._keys, self._value = keys, value
        return value


def _part(data: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of a set; a set kept only as a summary (see ``Problem``) is used whole."""
    if isinstance(data, np.ndarray):
        return data[:, start:stop]
    if start != 0 or stop != data.count:
        raise ValueError(f"a summarised synthetic set can only be used whole, not rows {start}:{stop}")
    return data


@dataclass(frozen=True)
class Cell:
    """One point of a recipe's grid: a workflow and the values of the grid parameters."""

    workflow: Workflow
    params: dict[str, Any]

    @property
    def key(self) -> str:
        text = "__".join([self.workflow.label] + [f"{k}={v}" for k, v in self.params.items()])
        safe = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)
        return f"{safe}-{zlib.crc32(text.encode()):08x}"

    @property
    def stream(self) -> int:
        """A 32-bit id of this cell for seeding: a cell's results do not depend on the rest of the grid."""
        return zlib.crc32(self.key.encode())

    def describe(self) -> str:
        return " ".join([self.workflow.label] + [f"{k}={v}" for k, v in self.params.items()])


def grid(workflows: Sequence[Workflow], **axes: Sequence[Any]) -> list[Cell]:
    """All cells of workflows x axes, in a stable order (workflow outermost)."""
    names = list(axes)
    return [Cell(wf, dict(zip(names, values))) for wf in workflows for values in itertools.product(*axes.values())]


def simulate(
    problem: Problem,
    workflow: Workflow,
    real_size: int,
    generations: int,
    num_seeds: int,
    seed: int,
    stream: int = 0,
    progress: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    scratch: Path | None = None,
    memory_budget: int = 2 << 30,
) -> dict[str, np.ndarray]:
    """Run one cell: ``generations`` model fits for ``num_seeds`` seeds at once.

    Returns each metric as ``(generations, num_seeds)``. Generation 0 fits real data; the synthetic
    set drawn from model g (``workflow.synthetic_size(real_size)`` examples) feeds generation g + 1 on.
    Once the retained sets pass ``memory_budget`` bytes, later ones go to memory-mapped files in
    ``scratch`` (if given), so a large accumulate pool is never held in memory as a whole.
    """
    workflow.check(real_size, generations)
    keep_all = workflow.keeps_earlier_sets
    real = problem.real(workflow.real_needed(real_size, generations))
    summarise = getattr(problem, "sample_summary", None)
    synthetic: dict[int, np.ndarray] = {}
    in_memory = real.nbytes
    out = {name: np.empty((generations, num_seeds)) for name in problem.metrics}
    for t in range(generations):
        ts = workflow.training_set(t, real_size, seed=(seed << 32) | stream, num_seeds=num_seeds)
        parts = [_part(real if src == REAL else synthetic[src], start, stop) for src, start, stop in ts.sources]
        model = problem.fit(ts, parts)
        values = problem.evaluate(model)
        for name in problem.metrics:
            out[name][t] = values[name]
        if progress is not None:
            progress(t, values)
        if t + 1 < generations:
            rng = np.random.default_rng([seed, stream, t, 1])
            count = workflow.synthetic_size(real_size)
            if summarise is not None and workflow.trains_on_whole_sets:
                new = summarise(model, rng, count)  # whole sets only: their sufficient statistics will do
            else:
                new = problem.sample(model, rng, count)
            if not keep_all:  # replace-like workflows never look further back than the newest set
                synthetic.clear()
            elif isinstance(new, np.ndarray) and scratch is not None and in_memory + new.nbytes > memory_budget:
                # The pool outgrew the budget: keep this set on disk, memory-mapped; gathers read only their rows.
                scratch.mkdir(parents=True, exist_ok=True)
                np.save(scratch / f"set_{t:03d}.npy", new)
                new = np.load(scratch / f"set_{t:03d}.npy", mmap_mode="r")
            else:
                in_memory += getattr(new, "nbytes", 0)
            synthetic[t] = new
    return out


def cell_rows(cell: Cell, values: dict[str, np.ndarray], seed: int) -> list[str]:
    """CSV lines (no header) for one cell: workflow, grid values, seed, generation, metric, value."""
    prefix = ",".join([_csv_field(cell.workflow.label)] + [_csv_field(str(v)) for v in cell.params.values()])
    lines: list[str] = []
    for metric, arr in values.items():
        G, S = arr.shape
        seeds = [f"{prefix},{seed + s}," for s in range(S)]
        for g in range(G):
            tail = f",{metric},"
            # Python floats: repr gives the shortest text that reads back exactly ("inf" for infinity).
            values_text = map(repr, arr[g].tolist())
            lines.extend(map("".join, zip(seeds, itertools.repeat(str(g)), itertools.repeat(tail), values_text)))
    return lines


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


@dataclass(frozen=True)
class _CellJob:
    """Everything needed to run one cell, picklable so that a worker process can run it."""

    recipe: str
    label: str  # "cell i/N"
    cell: Cell
    make_problem: Callable[[Cell, np.random.Generator], Problem]
    real_size: int
    generations: int
    num_seeds: int
    seed: int
    log_every: int
    path: Path
    scratch: Path
    columns: tuple[str, ...]
    progress_every: float = DEFAULT_INTERVAL  # also a line whenever this many seconds passed since the last one


def _run_cell(job: _CellJob) -> dict[str, np.ndarray]:
    """Run one cell and write its CSV atomically; returns its metrics ``(G, S)``."""
    t0 = time.perf_counter()
    head = f"[{job.recipe}] {job.label} {job.cell.describe()}"
    last = job.generations - 1
    printed = [t0]  # when the last line was printed: a slow cell also prints every progress_every seconds

    def progress(g: int, values: dict[str, np.ndarray]) -> None:
        now = time.perf_counter()
        if g % max(1, job.log_every) == 0 or g == last or now - printed[0] >= job.progress_every:
            shown = " ".join(f"{k}={_mean(v):.4g}" for k, v in values.items())
            print(f"{head} gen {g}/{last} {shown} ({now - t0:.1f}s)", flush=True)
            printed[0] = now

    try:
        problem = job.make_problem(job.cell, np.random.default_rng([job.seed, job.cell.stream, 0]))
        values = simulate(
            problem, job.cell.workflow, job.real_size, job.generations, job.num_seeds, job.seed, job.cell.stream,
            progress, job.scratch,
        )  # fmt: skip
    except MemoryError as exc:  # NumPy's "Unable to allocate 37.3 GiB ...": sizes beyond this machine
        raise UserError(
            f"cell {job.cell.describe()} does not fit in memory ({first_line(exc)}); choose smaller sizes "
            "(dimension, samples per generation, --num_seeds)"
        ) from None
    finally:
        shutil.rmtree(job.scratch, ignore_errors=True)
    write_cell(job.path, job.columns, cell_rows(job.cell, values, job.seed))
    return values


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Worker processes inherit this environment: one BLAS thread each, so workers x threads <= cores."""
    keys = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker_start(parent: int) -> None:
    """Initializer of every worker process: it ends with the recipe and leaves Ctrl-C to it.

    Without this a ``kill -9`` of the recipe left its workers (and the resource tracker, which waits for
    them) alive for ever, waiting for cells from a queue that the workers themselves keep open. A
    terminal's Ctrl-C reaches the whole process group; the recipe stops the pool, so the workers ignore it
    rather than each print a traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # held back since the start; now ignored
    if not die_with_parent(parent):
        watch_parent(parent)


@contextmanager
def _sigint_held() -> Iterator[None]:
    """Block SIGINT in this thread while it starts worker processes.

    A signal mask survives fork and exec, so a worker starts with SIGINT blocked until its initializer
    ignores it: a Ctrl-C cannot kill it, traceback and all, while it is still importing. This process
    still gets the Ctrl-C, through another thread or once the mask is restored.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's workers and shut it down, dropping the cells not finished.

    For every way out of the grid but success (Ctrl-C, a failed cell): the pool's own shutdown would
    wait for the running cells, and start the queued ones, before the recipe could exit. Finished cells
    are on disk already; the others run again on resume.

    A worker stopped while it sends a result leaves half a message in the result pipe, and the pool's
    thread would wait for the rest for ever (this process holds the pipe's writing end too): once the
    workers are gone, that end is closed, so the thread reads end-of-file instead and gives up.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=30)
    writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)
    if writer is not None:
        writer.close()
    pool.shutdown(wait=True, cancel_futures=True)


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_grid(
    recipe: str,
    cells: Sequence[Cell],
    make_problem: Callable[[Cell, np.random.Generator], Problem],
    real_size_of: Callable[[Cell], int],
    out_dir: str | Path,
    generations: int,
    num_seeds: int,
    seed: int,
    tracker: GridTracker | None = None,
    log_every: int = 10,
    workers: int = 1,
) -> Path:
    """Run every cell not finished yet, write ``<out_dir>/metrics.csv`` and return its path.

    With ``workers > 1`` the cells run in that many worker processes (started fresh, one BLAS thread
    each; ``make_problem`` must then be picklable, e.g. a module-level function or a partial of one).
    A cell's numbers depend only on the seed and the cell, never on the worker that ran it. Each cell
    computed now goes to W&B through ``tracker`` as it finishes (its per-generation means over seeds).
    """
    out = Path(out_dir)
    cell_dir = out / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    columns = ("workflow", *cells[0].params, *TAIL_COLUMNS)
    t_start = time.perf_counter()
    jobs = []
    for i, cell in enumerate(cells, 1):
        path = cell_dir / f"{cell.key}.csv"
        if path.is_file():
            problem = cell_problem(path)
            if problem is None:
                print(f"[{recipe}] cell {i}/{len(cells)} {cell.describe()}: finished earlier, kept", flush=True)
                continue
            print(f"[{recipe}] cell {i}/{len(cells)} {cell.describe()}: {path} {problem}; recomputing", flush=True)
        jobs.append(
            _CellJob(
                recipe,
                f"cell {i}/{len(cells)}",
                cell,
                make_problem,
                real_size_of(cell),
                generations,
                num_seeds,
                seed,
                log_every,
                path,
                out / ".scratch" / cell.key,
                columns,
                progress_interval(),
            )  # fmt: skip
        )

    cells_done = Progress(len(jobs), "grid", "cells")  # a line every --progress_every seconds, however cells run

    def record(job: _CellJob, values: dict[str, np.ndarray]) -> None:
        cells_done.update()
        if tracker is not None:
            means = {k: [_mean(v[g]) for g in range(generations)] for k, v in values.items()}
            tracker.log_cell(job.cell, means, job.path)

    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked BLAS or W&B threads
        # The workers are started from this thread (by submit), which the kernel's parent-death signal is tied to.
        pool = ProcessPoolExecutor(
            min(workers, len(jobs)), mp_context=ctx, initializer=_worker_start, initargs=(os.getpid(),)
        )
        try:
            with _single_threaded_blas(), _sigint_held():
                futures = {pool.submit(_run_cell, job): job for job in jobs}
            for future in as_completed(futures):
                record(futures[future], future.result())
        except BaseException:
            _stop_workers(pool)
            raise
        pool.shutdown()
    else:
        for job in jobs:
            record(job, _run_cell(job))
    cells_done.close()
    parts = [cell_dir / f"{c.key}.csv" for c in cells]
    metrics = out / METRICS
    concat_csv(metrics, parts, rows_multiple_of=generations * num_seeds)
    if tracker is not None:
        tracker.save_file(metrics)
    print(f"[{recipe}] {len(cells)} cells done in {time.perf_counter() - t_start:.1f}s -> {metrics}", flush=True)
    return metrics


def _mean(v: np.ndarray) -> float:
    """Mean of the finite values (inf when every value is +inf, as for a singular Gaussian's NLL)."""
    v = np.asarray(v)
    finite = v[np.isfinite(v)]
    if finite.size:
        return float(finite.mean())
    return float("inf") if v.size and np.all(v == np.inf) else float("nan")


def cell_config(config: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """A run's config narrowed to one grid cell: its workflow (label) and grid parameters as single values."""
    return {**config, "workflow": cell.workflow.label, **cell.params}


class GridTracker:
    """W&B logging of a grid, each metric under its own name (``mean_sq_error``, as metrics.csv's ``metric`` column).

    W&B keeps one value per key and step (``generation``), so each cell needs a W&B run of its own for its
    metrics to keep their plain names: a one-cell grid (every run of a sweep file, which gives one value per grid
    axis) logs to the recipe run's W&B run, whose config then holds the cell's parameters (``workflow``, ``dim``,
    ``n_samples``, ...) as single values; a grid of several cells opens one W&B run per cell as the cell finishes
    (:class:`Tracker` with ``part``: named by :meth:`Cell.describe`, grouped by ``--wandb.group`` or the run
    directory's name, the cell's parameters in its config, its ``cells/`` file attached), logs it and closes it.
    Either way the runs of an experiment overlay metric by metric in W&B. Cells finished by an earlier run are not
    logged again.
    """

    def __init__(self, cfg: WandbConfig, recipe: str, out: Path, config: dict[str, Any], cells: Sequence[Cell]):
        self.cfg, self.recipe, self.out, self.config = cfg, recipe, out, config
        self.enabled = resolve(cfg).mode != "disabled"
        self.run = Tracker(cfg, recipe, out, cell_config(config, cells[0])) if len(cells) == 1 else None

    def log_cell(self, cell: Cell, means: dict[str, list[float]], path: Path) -> None:
        """Log a finished cell: ``means[name][g]`` is metric ``name``'s mean over seeds at generation g."""
        if not self.enabled:
            return
        own = self.run is None
        run = self.run
        if run is None:
            run = Tracker(self.cfg, self.recipe, self.out, cell_config(self.config, cell), part=cell.describe())
        failed = True
        try:
            generations = len(next(iter(means.values()), []))
            for g in range(generations):
                run.log({name: values[g] for name, values in means.items()}, generation=g)
            if own:
                run.save_file(path)
            failed = False
        finally:
            if own:
                run.finish(failed)

    def save_file(self, path: Path) -> None:
        """Attach ``path`` (the run's metrics.csv) to the recipe run's W&B run, where it has one (a one-cell grid)."""
        if self.run is not None:
            self.run.save_file(path)

    def finish(self, failed: bool = False) -> None:
        """End the recipe run's W&B run, if it has one (``failed``: see :meth:`Tracker.finish`)."""
        if self.run is not None:
            self.run.finish(failed)


@dataclass
class AnalyticConfig:
    """Flags shared by the analytic recipes (each recipe adds its grid axes)."""

    out_dir: str = "runs/analytic"
    """Run directory (created; re-running the same command resumes after the last finished cell). A {hash}
    in it is replaced by a hash of the config, giving each distinct config its own folder (W&B sweeps)."""
    workflow: str | list[str] = field(default_factory=lambda: ["replace", "accumulate", "accumulate_subsample"])
    """Workflow or list of workflows: replace, replace_multiple, accumulate, accumulate_subsample, mix, fresh_real;
    parameters as name(key=value, ...), e.g. 'accumulate_subsample(size=50)' or 'mix(real=100, synthetic=400)'."""
    generations: int = 100
    """Number of generations, counting generation 0 (fitted on real data)."""
    num_seeds: int = 100
    """Independent repetitions, computed at once (vectorised)."""
    seed: int = 0
    """Base random seed; a run is reproducible from it."""
    overwrite: bool = False
    """Replace a run with a different config in --out_dir instead of refusing: only its own outputs (config.yaml,
    metrics, cells, ...) are deleted, other files in the folder are kept."""
    log_every: int = 10
    """Print a progress line every this many generations of each cell (1 = every generation)."""
    workers: int = 0
    """Grid cells run in parallel in this many processes; 0 = one per available CPU core. Results do not
    depend on it."""
    report: bool = True
    """Write <out_dir>/report/ (plots and a markdown table) when the grid is done."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging (offline by default)."""
    log_level: str = "INFO"
    """Console messages shown (on stderr): DEBUG, INFO (progress lines), WARNING or ERROR."""
    progress_every: float = DEFAULT_INTERVAL
    """Seconds between the grid's progress lines (cells done, rate, ETA, on stderr); a cell also prints its line
    (on stdout) whenever this long has passed since its last, whatever --log_every says. 0: every cell, every
    generation."""

    def __post_init__(self) -> None:
        self.log_level = check_log_level(self.log_level)
        self.progress_every = check_interval(self.progress_every)


def launch(
    recipe: str,
    cfg: AnalyticConfig,
    axes: dict[str, list[Any]],
    make_problem: Callable[[Cell, np.random.Generator], Problem],
    real_size_of: Callable[[Cell], int],
) -> Path:
    """Validate the shared flags, prepare the run directory, run the grid, write the report.

    For the length of the run the project's log messages (``--log_level``) and progress lines
    (``--progress_every``) go to stderr as ``[recipe] message`` (see :func:`collapse.progress.console`).
    """
    with console(cfg.log_level, recipe, cfg.progress_every):
        return _launch(recipe, cfg, axes, make_problem, real_size_of)


def _launch(
    recipe: str,
    cfg: AnalyticConfig,
    axes: dict[str, list[Any]],
    make_problem: Callable[[Cell, np.random.Generator], Problem],
    real_size_of: Callable[[Cell], int],
) -> Path:
    positive_ints("generations", cfg.generations)
    positive_ints("num_seeds", cfg.num_seeds)
    if cfg.workers < 0:
        raise UserError(f"--workers must be >= 0 (0 = one per CPU core), got {cfg.workers}")
    if isinstance(cfg.log_every, bool) or not isinstance(cfg.log_every, int) or cfg.log_every < 1:
        raise UserError(f"--log_every must be an integer >= 1 (1 = every generation), got {cfg.log_every!r}")
    if cfg.seed < 0:
        raise UserError(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.seed + cfg.num_seeds - 1 > MAX_SEED:  # replicates are labelled seed .. seed + num_seeds - 1
        raise UserError(f"--seed + --num_seeds - 1 must be at most {MAX_SEED} (2**63 - 1), got {cfg.seed}")
    workflows = parse_workflows(cfg.workflow)
    for axis, values in axes.items():
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"--{axis} lists {repeated[0]} twice; give each value once")
    check_mode(cfg.wandb)
    cells = grid(workflows, **axes)
    for cell in cells:
        try:
            cell.workflow.check(real_size_of(cell), cfg.generations)
        except UserError as exc:
            raise UserError(f"{exc} (cell {cell.describe()})") from None
    config = config_dict(cfg)
    # Locked until the report is written; a changed --generations is refused (cells are computed for one count).
    out = prepare_run_dir(
        resolve_out_dir(cfg.out_dir, config),
        recipe,
        config,
        overwrite=cfg.overwrite,
        defaults=config_defaults(type(cfg)),
    )
    try:
        tracker = GridTracker(cfg.wandb, recipe, out, config, cells)
        failed = True
        try:
            metrics = run_grid(
                recipe,
                cells,
                make_problem,
                real_size_of,
                out,
                cfg.generations,
                cfg.num_seeds,
                cfg.seed,
                tracker=tracker,
                log_every=cfg.log_every,
                workers=cfg.workers or available_cores(),
            )
            failed = False
        finally:
            tracker.finish(failed)
        if cfg.report:
            from tooling.report import make_report

            print(f"[{recipe}] report -> {make_report([out], out / 'report')}", flush=True)
    finally:
        release_run_dir(out)
    return metrics
