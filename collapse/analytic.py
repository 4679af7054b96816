"""The generation loop of the analytic recipes, vectorised over seeds, in NumPy only.

An analytic recipe describes one grid cell as a :class:`Problem` whose arrays carry a leading seed
axis ``S``: real data ``(S, R, ...)``, synthetic sets ``(S, m, ...)``, metrics ``(S,)``. The loop
below is the same as the Lightning recipes' loop (fit, evaluate on real data, sample the next
synthetic set, and the same :class:`~datamodules.workflows.Workflow` decides every training set)
but runs all seeds at once and never imports torch or Lightning.

Resume granularity is the grid cell: each finished cell is written atomically to
``<out_dir>/cells/<cell>.csv`` and skipped when the command is run again; ``metrics.csv`` is the
concatenation of the cells in grid order.
"""

from __future__ import annotations

import itertools
import re
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from collapse.atomic import atomic_open
from collapse.cli import positive_ints
from collapse.errors import UserError
from collapse.rundir import (
    METRICS,
    TAIL_COLUMNS,
    RunDirError,
    concat_csv,
    config_dict,
    prepare_run_dir,
    resolve_out_dir,
)
from collapse.tracking import Tracker, WandbConfig
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
        """A synthetic set of ``count`` examples from every seed's model, ``(S, count, ...)``."""


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
    out = np.empty((S, m) + parts[0].shape[2:], dtype=np.result_type(*parts))
    seed_of = np.broadcast_to(np.arange(S)[:, None], (S, m))
    for i, part in enumerate(parts):
        sel = pos == i
        if sel.any():
            out[sel] = part[seed_of[sel], row[sel]]
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
    keep_all = workflow.name not in ("replace", "replace_multiple", "mix")
    real = problem.real(workflow.real_needed(real_size, generations))
    synthetic: dict[int, np.ndarray] = {}
    in_memory = real.nbytes
    out = {name: np.empty((generations, num_seeds)) for name in problem.metrics}
    for t in range(generations):
        ts = workflow.training_set(t, real_size, seed=(seed << 32) | stream, num_seeds=num_seeds)
        parts = [(real if src == REAL else synthetic[src])[:, start:stop] for src, start, stop in ts.sources]
        model = problem.fit(ts, parts)
        values = problem.evaluate(model)
        for name in problem.metrics:
            out[name][t] = values[name]
        if progress is not None:
            progress(t, values)
        if t + 1 < generations:
            rng = np.random.default_rng([seed, stream, t, 1])
            new = problem.sample(model, rng, workflow.synthetic_size(real_size))
            if not keep_all:  # replace-like workflows never look further back than the newest set
                synthetic.clear()
            elif scratch is not None and in_memory + new.nbytes > memory_budget:
                # The pool outgrew the budget: keep this set on disk, memory-mapped; gathers read only their rows.
                scratch.mkdir(parents=True, exist_ok=True)
                np.save(scratch / f"set_{t:03d}.npy", new)
                new = np.load(scratch / f"set_{t:03d}.npy", mmap_mode="r")
            else:
                in_memory += new.nbytes
            synthetic[t] = new
    return out


def cell_rows(cell: Cell, values: dict[str, np.ndarray], seed: int) -> list[str]:
    """CSV lines (no header) for one cell: workflow, grid values, seed, generation, metric, value."""
    prefix = ",".join([_csv_field(cell.workflow.label)] + [_csv_field(str(v)) for v in cell.params.values()])
    lines = []
    for metric, arr in values.items():
        G, S = arr.shape
        for g in range(G):
            row = arr[g].tolist()  # Python floats: repr gives the shortest exact text ("inf" for infinity)
            lines.extend(f"{prefix},{seed + s},{g},{metric},{row[s]!r}" for s in range(S))
    return lines


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def run_grid(
    recipe: str,
    cells: Sequence[Cell],
    make_problem: Callable[[Cell, np.random.Generator], Problem],
    real_size_of: Callable[[Cell], int],
    out_dir: str | Path,
    generations: int,
    num_seeds: int,
    seed: int,
    tracker: Tracker | None = None,
    log_every: int = 10,
) -> Path:
    """Run every cell not finished yet, write ``<out_dir>/metrics.csv`` and return its path."""
    out = Path(out_dir)
    cell_dir = out / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    columns = ["workflow", *cells[0].params, *TAIL_COLUMNS]
    t_start = time.perf_counter()
    for i, cell in enumerate(cells, 1):
        path = cell_dir / f"{cell.key}.csv"
        head = f"[{recipe}] cell {i}/{len(cells)} {cell.describe()}"
        if path.is_file():
            print(f"{head}: finished earlier, kept", flush=True)
            continue
        t0 = time.perf_counter()
        problem = make_problem(cell, np.random.default_rng([seed, cell.stream, 0]))

        def progress(g: int, values: dict[str, np.ndarray], head: str = head, t0: float = t0) -> None:
            if g % max(1, log_every) == 0 or g == generations - 1:
                shown = " ".join(f"{k}={_mean(v):.4g}" for k, v in values.items())
                print(f"{head} gen {g}/{generations - 1} {shown} ({time.perf_counter() - t0:.1f}s)", flush=True)

        real_size = real_size_of(cell)
        scratch = out / ".scratch" / cell.key
        try:
            values = simulate(
                problem, cell.workflow, real_size, generations, num_seeds, seed, cell.stream, progress, scratch
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        with atomic_open(path, "w") as fh:
            fh.write(",".join(columns) + "\n")
            fh.write("\n".join(cell_rows(cell, values, seed)) + "\n")
        if tracker is not None:
            for g in range(generations):
                tracker.log({f"{cell.describe()}/{k}": _mean(v[g]) for k, v in values.items()}, generation=g)
    parts = [cell_dir / f"{c.key}.csv" for c in cells]
    _check_cells(parts, generations * num_seeds)
    metrics = out / METRICS
    concat_csv(metrics, parts)
    print(f"[{recipe}] {len(cells)} cells done in {time.perf_counter() - t_start:.1f}s -> {metrics}", flush=True)
    return metrics


def _check_cells(parts: Sequence[Path], rows_per_metric: int) -> None:
    """A cell file must hold a whole number of metrics' worth of rows (atomic writes make this hold)."""
    for p in parts:
        with open(p, "rb") as fh:
            n = sum(1 for _ in fh) - 1
        if n <= 0 or n % rows_per_metric:
            raise RunDirError(f"{p}: {n} rows, expected a multiple of {rows_per_metric}; delete it to recompute")


def _mean(v: np.ndarray) -> float:
    """Mean of the finite values (inf when every value is +inf, as for a singular Gaussian's NLL)."""
    v = np.asarray(v)
    finite = v[np.isfinite(v)]
    if finite.size:
        return float(finite.mean())
    return float("inf") if v.size and np.all(v == np.inf) else float("nan")


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
    """Replace an existing run in --out_dir that has a different config (otherwise refused)."""
    log_every: int = 10
    """Print a progress line every this many generations of each cell (1 = every generation)."""
    report: bool = True
    """Write <out_dir>/report/ (plots and a markdown table) when the grid is done."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases logging (offline by default)."""


def launch(
    recipe: str,
    cfg: AnalyticConfig,
    axes: dict[str, list[Any]],
    make_problem: Callable[[Cell, np.random.Generator], Problem],
    real_size_of: Callable[[Cell], int],
) -> Path:
    """Validate the shared flags, prepare the run directory, run the grid, write the report."""
    positive_ints("generations", cfg.generations)
    positive_ints("num_seeds", cfg.num_seeds)
    if cfg.seed < 0:
        raise UserError(f"--seed must be >= 0, got {cfg.seed}")
    workflows = parse_workflows(cfg.workflow)
    cells = grid(workflows, **axes)
    for cell in cells:
        try:
            cell.workflow.check(real_size_of(cell), cfg.generations)
        except UserError as exc:
            raise UserError(f"{exc} (cell {cell.describe()})") from None
    config = config_dict(cfg)
    out = prepare_run_dir(resolve_out_dir(cfg.out_dir, config), recipe, config, overwrite=cfg.overwrite)
    tracker = Tracker(cfg.wandb, recipe, out, config)
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
        )
    finally:
        tracker.finish()
    if cfg.report:
        from recipes.report import make_report

        print(f"[{recipe}] report -> {make_report([out], out / 'report')}", flush=True)
    return metrics
