"""One command per paper figure: our finished runs next to the published values.

    python -m tooling.figures --list
    python -m tooling.figures FIGURE_ID RUN_DIR [RUN_DIR ...] --out DIR [--cells 'dim=10,n_samples=100']
        [--max_rows 4] [--published FILE]

For a figure of ``tooling/published_results.yaml`` (see :mod:`tooling.published`) the command picks the
runs of the figure's recipe among the given run dirs (a folder holding run dirs counts as its run dirs;
a run dir without ``metrics.csv`` is read from its W&B offline copy ``wandb/offline-run-*/files/metrics.csv``,
its finished ``gen_XXX/metrics.json`` or its finished grid cells ``cells/*.csv``) and writes into ``--out``:

* ``<figure>.png``: a row per setting of our runs (cell), three panels: ours (mean over seeds, shaded 95%
  interval, closed form dashed where :func:`tooling.report.safe_theory_curve` knows it), the published values of the
  matching panel (on our generation axis: generation = the paper's iteration - ``iteration_offset``), and
  both relative to generation 0, ``1 + (v - v_0) / |v_0|`` (= v / v_0 for positive values), the shapes side
  by side. Our CPU runs are stand-ins: the published *level* is often not comparable, the shape is.
* ``<figure>_published.png``: every published panel of the figure.
* ``report.md`` and ``report.html`` (the same content; images by relative path): the runs used, the skipped
  runs with the reason each, a table of ours vs published per workflow (first, last, last/first), a shape
  verdict per workflow computed from the data (rules below), the published values, the real x synthetic
  grid where the figure has one, and the runs' sample pictures (``gen_XXX/samples.png``).

Shape rules, on r = the relative level at the last generation (last / first for positive values):
``rising``: r > 1.05; ``flat``: |r - 1| <= 0.10; ``bounded``: r <= 1.1 pi^2/6 (accumulate's bound,
pi^2/6 = 1.645 in the closed forms and Dey and Donoho's); ``between``: r between accumulate's and replace's
in the same setting (0.02 slack). Our curves are judged on the 95% interval over seeds of r (r per seed): a
shape holds when the whole interval meets its rule, fails when none of it does, and cannot be told when the
interval straddles the limit (the ratio of the means over seeds, with the ratio estimator's interval); with
one seed the single value decides and the verdict says it is from one seed.
The published values are single curves, judged on their values.

Protocols: a run's ``steps_per_generation`` (config.yaml; absent or null: the epochs, as in older runs) gives
it a ``protocol`` setting, "epochs per generation" or "fixed compute (steps of gen 0)", once any run trained
at fixed compute, so each protocol gets a row of its own; a real-only run (``mix(real=N, synthetic=0)``) is
drawn dash-dotted. Every accumulate curve's ratio to its first generation is checked against pi^2/6 (the
"accumulate bound" column, on the intervals; a dashed line at pi^2/6 in the relative panel).

A run dir that cannot be used (missing, unfinished, truncated, another recipe or version) is one line in
"Skipped runs" and one ``warning:`` line; it never stops the report.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from collapse.atomic import atomic_write_text
from collapse.cells import cell_problem
from collapse.errors import UserError
from collapse.rundir import CONFIG, METRICS, metric_name, upgrade_metric_names
from datamodules.workflows import Workflow, WorkflowError
from tooling import report as rp
from tooling.published import (
    Figure,
    Panel,
    Point,
    Published,
    load_published,
    published_at,
    published_first,
    published_last,
)

RISING = 1.05
FLAT = 0.10
BOUNDED = 1.1 * math.pi**2 / 6
BETWEEN_SLACK = 0.02
DEFAULT_MAX_ROWS = 4
_GEN_DIR = re.compile(r"^gen_(\d{3,})$")
_BOUND_STYLE = (0, (8, 3))  # long dashes: the published curves are dashed in the workflows' colours
_WANDB_RUN = re.compile(r"^(offline-run|run)-.+")
# A recipe's config.yaml may be lost; its metrics then say which recipe wrote the run.
_SIGNATURES = {
    "linear_regression": {"test_mse"},
    "gaussian": {"mean_sq_error"},
    "mnist_vae": {"test_recon", "test_kl"},
    "tinystories": {"test_perplexity"},
    "geom_diffusion": {"test_bond_w1"},
}


class FigureError(UserError):
    """A figure id or option that cannot be used; the message is one line."""


# ---- shape verdicts ------------------------------------------------------------------------------


def relative_level(first: float | None, last: float | None) -> float | None:
    """``1 + (last - first) / |first|``: last / first for positive values, still ordered for negative ones."""
    if first is None or last is None or not (math.isfinite(first) and math.isfinite(last)) or first == 0:
        return None
    return 1.0 + (last - first) / abs(first)


def describe(r: float | None) -> str:
    """``rising (x1.48)``, ``flat (-2.3%)``, ``falling (x0.81)``."""
    if r is None:
        return "unknown"
    if abs(r - 1) <= FLAT:
        return f"flat ({(r - 1) * 100:+.1f}%)"
    return f"{'rising' if r > 1 else 'falling'} (x{r:.3g})"


@dataclass(frozen=True)
class Verdict:
    """Whether a curve has the expected shape: ``ok`` True/False, or None when it cannot be told."""

    ok: bool | None
    text: str

    @property
    def word(self) -> str:
        return {True: "as published", False: "differs", None: "cannot tell"}[self.ok]


@dataclass(frozen=True)
class Ratio:
    """A relative level over seeds: the mean of the per-seed values, the half-width of its 95% interval (nan
    with one seed) and the seeds behind it."""

    mean: float
    half: float
    n: int

    @property
    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` of the interval; the mean twice with one seed."""
        h = self.half if self.n > 1 and math.isfinite(self.half) else 0.0
        return self.mean - h, self.mean + h

    def text(self) -> str:
        """``95% interval 1.31–1.65 over 3 seeds`` or ``one seed``."""
        if self.n <= 1 or not math.isfinite(self.half):
            return "one seed"
        lo, hi = self.bounds
        return f"95% interval {lo:.3g}–{hi:.3g} over {self.n} seeds"


def _judge(lo: float, hi: float, holds: Callable[[float], bool]) -> bool | None:
    """True when the rule holds at both ends of an interval (the rules are intervals of r), False when it holds
    at neither and the interval does not straddle the region, else None."""
    a, b = holds(lo), holds(hi)
    if a and b:
        return True
    return None if a or b else False


def shape_verdict(
    expected: str | None,
    r: float | Ratio | None,
    replace_r: float | Ratio | None = None,
    accumulate_r: float | Ratio | None = None,
) -> Verdict:
    """Check a relative level ``r`` against an expected shape (see the module docstring for the rules).

    ``r`` is a single value (a published curve) or a :class:`Ratio` over seeds, judged on its 95% interval:
    the shape holds when the whole interval meets the rule, fails when no part of it does, and cannot be told
    when it straddles the limit. The text says which interval decided, or that one seed did.
    """
    if expected is None:
        return Verdict(None, "no published shape")
    if r is None:
        return Verdict(None, "needs finite values at two generations")
    ratio = r if isinstance(r, Ratio) else None
    mean = ratio.mean if ratio else float(r)
    lo, hi = ratio.bounds if ratio else (mean, mean)
    basis = f", {ratio.text()}" if ratio else ""
    if ratio is not None and ratio.n > 1 and math.isfinite(ratio.half):
        judged = "the 95% interval over seeds"
    elif ratio is not None:
        judged = "one seed"
    else:
        judged = ""

    def out(ok: bool | None, rule: str) -> Verdict:
        text = f"{describe(mean)}{basis}; {rule}"
        if ok is None:
            text += f"; {judged} straddles the limit"
        elif judged == "one seed":
            text += "; the verdict is from one seed"
        return Verdict(ok, text)

    if expected == "rising":
        return out(_judge(lo, hi, lambda x: x > RISING), f"rising needs last/first > {RISING:g}")
    if expected == "flat":
        return out(_judge(lo, hi, lambda x: abs(x - 1) <= FLAT), f"flat needs last/first within ±{FLAT:.0%}")
    if expected == "bounded":
        return out(_judge(lo, hi, lambda x: x <= BOUNDED), f"bounded needs last/first <= {BOUNDED:.3g} (1.1 pi^2/6)")
    if expected == "between":
        rep_m = replace_r.mean if isinstance(replace_r, Ratio) else replace_r
        acc_m = accumulate_r.mean if isinstance(accumulate_r, Ratio) else accumulate_r
        if rep_m is None or acc_m is None:
            return Verdict(None, f"{describe(mean)}{basis}; between needs replace and accumulate in the same setting")
        low, high = sorted((rep_m, acc_m))
        return out(
            _judge(lo, hi, lambda x: low - BETWEEN_SLACK <= x <= high + BETWEEN_SLACK),
            f"between needs last/first within accumulate's {acc_m:.3g} and replace's {rep_m:.3g}",
        )
    raise ValueError(f"unknown shape {expected!r}")


def curve_verdicts(expected: dict[str, str], ratios: dict[str, float | Ratio | None]) -> dict[str, Verdict]:
    """Verdicts of the curves of one setting: workflow label -> its relative level at the last generation
    (a value, or a :class:`Ratio` over seeds)."""
    by_name = {_name(wf): r for wf, r in ratios.items() if wf == _name(wf)}
    rep, acc = by_name.get("replace"), by_name.get("accumulate")
    return {wf: shape_verdict(expected.get(_name(wf)), r, rep, acc) for wf, r in ratios.items()}


def bound_check(curve: Curve) -> str:
    """An accumulate curve against pi^2/6 (Dey & Donoho), judged on the 95% intervals of the per-seed ratios to
    the first generation; ``—`` for the other workflows."""
    if _name(curve.workflow) != "accumulate" or curve.series is None:
        return "—"
    return rp.bound_verdict(rp.ratio_of_means(*curve.series))[1]


def _name(label: str) -> str:
    try:
        return Workflow.parse(label).name
    except WorkflowError:
        return label.split("(", 1)[0].strip()


# ---- reading run dirs, whatever state they are in -------------------------------------------------


class _Skip(Exception):
    """A run dir that cannot be used; the message is the one-line reason."""


@dataclass
class FigureRun:
    """A run dir of the figure's recipe, read; ``caveats`` say what was odd and how it was handled."""

    run: rp.Run
    source: str
    caveats: list[str] = field(default_factory=list)


def _dotted(config: dict[str, Any], key: str) -> tuple[bool, Any]:
    """``(found, value)`` of ``model.preset`` in a nested config (or a flat ``"model.preset"`` key)."""
    if key in config:
        return True, config[key]
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _wandb_dirs(path: Path) -> list[Path]:
    """W&B run folders of a run dir, newest first (their names start with the date)."""
    root = path / "wandb"
    try:
        found = [p for p in root.iterdir() if _WANDB_RUN.match(p.name) and p.is_dir()] if root.is_dir() else []
    except OSError:
        return []
    return sorted(found, key=lambda p: p.name.split("-", 2)[-1], reverse=True)


def _wandb_config(folder: Path) -> dict[str, Any] | None:
    """A W&B ``files/config.yaml`` (``key: {value: ...}``) as a plain config, or None."""
    try:
        data = yaml.safe_load((folder / "files" / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    return {
        str(k): (v["value"] if isinstance(v, dict) and "value" in v else v)
        for k, v in data.items()
        if not str(k).startswith("_") and k != "wandb_version"
    }


def expand_run_dirs(paths: Sequence[str | Path], skip: Sequence[Path] = ()) -> list[Path]:
    """The run dirs named, a folder of run dirs (e.g. a figure script's output) standing for its children."""
    out: list[Path] = []
    skip_resolved = {p.resolve() for p in skip}
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not _looks_like_run(path):
            try:
                children = sorted(c for c in path.iterdir() if c.is_dir() and _looks_like_run(c))
            except OSError:
                children = []
            children = [c for c in children if c.resolve() not in skip_resolved]
            if children:
                out += children
                continue
        out.append(path)
    return out


def _looks_like_run(path: Path) -> bool:
    try:
        return any(
            p.name in (METRICS, CONFIG, "cells", "wandb") or p.name.startswith(("gen_", ".gen_"))
            for p in path.iterdir()
        )
    except OSError:
        return False


def _is_wandb_run(path: Path) -> bool:
    """A W&B run folder itself (``<run dir>/wandb/offline-run-*``), named instead of its run dir."""
    return bool(_WANDB_RUN.match(path.name)) and (path / "files").is_dir()


def _read_config(path: Path, caveats: list[str]) -> dict[str, Any]:
    if _is_wandb_run(path) and (path.parent.parent / CONFIG).is_file():
        path = path.parent.parent  # the run dir the W&B folder belongs to
    config, notes = rp.read_run_config(path)
    if not (path / CONFIG).is_file():
        for folder in [path] if _is_wandb_run(path) else _wandb_dirs(path):
            wb = _wandb_config(folder)
            if wb:
                caveats.append(f"no {CONFIG}: the config of the W&B copy {folder.name} is used")
                return wb
    caveats += notes
    return config


def _lenient_metrics(
    path: Path, config: dict[str, Any], caveats: list[str]
) -> tuple[tuple[str, ...], dict[rp.SeriesKey, rp.Series], int]:
    """Read a metrics.csv the fast reader refused: an older layout without ``seed``/``workflow`` columns
    (filled from config.yaml) or a last line cut short (dropped). Anything else is a :class:`_Skip`."""
    try:
        raw = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise _Skip(f"cannot read {METRICS} ({exc})") from None
    lines = raw.splitlines()
    rows = list(csv.reader(lines))
    if not rows or not any(h.strip() for h in rows[0]):
        raise _Skip(f"{METRICS} is empty")
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ("generation", "metric", "value") if c not in header]
    if missing:
        raise _Skip(
            f"{METRICS} lacks column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(header: {','.join(header)[:120]}); not a metrics file of this project?"
        )
    body = [r for r in rows[1:] if r]
    if body and not raw.endswith(("\n", "\r")):  # the recipes end every line: this one was cut short
        caveats.append(
            f"{METRICS} ends in a line cut short ({','.join(body[-1])[:40]!r}); read the "
            f"{len(body) - 1} complete rows before it"
        )
        body = body[:-1]
    fill: dict[str, str] = {}
    if "workflow" not in header:
        wf = config.get("workflow")
        if not isinstance(wf, str) or not wf:
            raise _Skip(f"{METRICS} has no workflow column and {CONFIG} names no single workflow (older version?)")
        try:
            fill["workflow"] = Workflow.parse(wf).label
        except WorkflowError:
            fill["workflow"] = wf
        caveats.append(f"{METRICS} has no workflow column (older version): workflow {fill['workflow']} from {CONFIG}")
    if "seed" not in header:
        seed = config.get("seed")
        fill["seed"] = str(seed) if isinstance(seed, int) else "0"
        where = f"from {CONFIG}" if isinstance(seed, int) else f"assumed ({CONFIG} has none)"
        caveats.append(f"{METRICS} has no seed column (older version): seed {fill['seed']} {where}")
    grid = tuple(h for h in header if h not in rp.REQUIRED_COLUMNS)
    idx = {h: i for i, h in enumerate(header)}
    groups: dict[rp.SeriesKey, list[tuple[int, int, float]]] = {}
    for n, row in enumerate(body, start=1):
        if len(row) != len(header):
            raise _Skip(f"{METRICS} data row {n}: expected {len(header)} fields ({','.join(header)}), got {len(row)}")

        def col(name: str, row=row) -> str:
            return fill[name] if name in fill else row[idx[name]].strip()

        try:
            seed, gen = int(col("seed")), int(col("generation"))
            value = float(col("value")) if col("value") else math.nan
        except ValueError:
            raise _Skip(f"{METRICS} data row {n}: a seed, generation or value that is not a number") from None
        if gen < 0:
            raise _Skip(f"{METRICS} data row {n}: generation {gen} is negative")
        key = (col("metric"), col("workflow"), tuple(row[idx[g]] for g in grid))
        groups.setdefault(key, []).append((seed, gen, value))
    if not groups:
        raise _Skip(f"{METRICS} has a header but no complete rows (no finished generation yet?)")
    series = {
        k: (
            np.array([s for s, _, _ in v], np.int64),
            np.array([g for _, g, _ in v], np.int64),
            np.array([x for _, _, x in v], np.float64),
        )
        for k, v in groups.items()
    }
    return grid, series, sum(len(v) for v in groups.values())


def _from_generations(path: Path, config: dict[str, Any], caveats: list[str]):
    """Metrics of a Lightning run stopped before it wrote metrics.csv: its finished ``gen_XXX/metrics.json``."""
    gens = sorted(int(m.group(1)) for p in path.iterdir() if (m := _GEN_DIR.match(p.name)) and p.is_dir())
    wf = config.get("workflow")
    if not isinstance(wf, str) or not wf:
        raise _Skip(f"no {METRICS}, and {CONFIG} names no workflow for the generations' metrics.json")
    try:
        label = Workflow.parse(wf).label
    except WorkflowError:
        label = wf
    seed = config.get("seed") if isinstance(config.get("seed"), int) else 0
    rows: dict[rp.SeriesKey, list[tuple[int, float]]] = {}
    unreadable = []
    for g in gens:
        try:
            data = json.loads((path / f"gen_{g:03d}" / "metrics.json").read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a mapping")
            for name, value in upgrade_metric_names(data).items():  # an older run's test/loss is test_loss
                rows.setdefault((name, label, ()), []).append((g, float(value)))
        except (OSError, ValueError, TypeError) as exc:
            unreadable.append(f"gen_{g:03d} ({type(exc).__name__})")
    if not rows:
        raise _Skip(
            f"no {METRICS} and no readable gen_XXX/metrics.json" + (f": {', '.join(unreadable)}" if unreadable else "")
        )
    caveats.append(
        f"no {METRICS} (the run stopped before writing it): read from the metrics.json of its "
        f"{len(gens) - len(unreadable)} finished generation(s)"
        + (f"; unreadable: {', '.join(unreadable)}" if unreadable else "")
    )
    series = {
        k: (np.full(len(v), seed, np.int64), np.array([g for g, _ in v], np.int64), np.array([x for _, x in v]))
        for k, v in rows.items()
    }
    return (), series, sum(len(v) for v in rows.values())


def _from_cells(path: Path, cells: list[Path], caveats: list[str]):
    """Metrics of an analytic run stopped before it wrote metrics.csv: its finished ``cells/*.csv``."""
    grid: tuple[str, ...] = ()
    parts: dict[rp.SeriesKey, list[rp.Series]] = {}
    bad = []
    for cell in cells:
        problem = cell_problem(cell)
        if problem is not None:  # cut, edited or not finished: never half-read
            bad.append(f"{cell.name} ({problem})")
            continue
        try:
            g, series, _ = rp.read_metrics(cell)
        except rp.ReportError as exc:
            bad.append(f"{cell.name} ({exc})")
            continue
        if grid and g != grid:
            bad.append(f"{cell.name} (other columns)")
            continue
        grid = g
        for k, v in series.items():
            parts.setdefault(k, []).append(v)
    if not parts:
        raise _Skip(f"no {METRICS} and no readable finished grid cell in cells/" + (f": {bad[0]}" if bad else ""))
    caveats.append(
        f"no {METRICS} (the run stopped before writing it): read {len(cells) - len(bad)} finished "
        f"grid cell(s) from cells/" + (f"; unreadable: {'; '.join(bad)}" if bad else "")
    )
    series = {k: tuple(np.concatenate(a) for a in zip(*v)) for k, v in parts.items()}
    return grid, series, sum(len(v[0]) for v in series.values())


def _locate_metrics(path: Path, caveats: list[str]) -> tuple[Path | None, str]:
    """The metrics.csv to read (the run's own, else its W&B offline copy) and a word on where it is."""
    if (path / METRICS).is_file():
        return path / METRICS, METRICS
    links = []
    for folder in [path] if _is_wandb_run(path) else _wandb_dirs(path):
        copy = folder / "files" / METRICS
        if copy.is_file():
            caveats.append(f"no {METRICS} in the run dir: read the W&B copy wandb/{folder.name}/files/{METRICS}")
            return copy, f"W&B copy ({folder.name})"
        if copy.is_symlink():
            links.append(folder.name)
    if links:
        caveats.append(f"the W&B copy in wandb/{links[0]} is a link to the missing {METRICS}")
    return None, ""


def _ends_in_newline(path: Path) -> bool:
    """Whether a file ends with a line break (or is empty): the recipes end every line they write."""
    with open(path, "rb") as fh:
        fh.seek(0, 2)
        if fh.tell() == 0:
            return True
        fh.seek(-1, 2)
        return fh.read(1) in (b"\n", b"\r")


def _infer_recipe(series: dict[rp.SeriesKey, rp.Series]) -> str | None:
    metrics = {m for m, _, _ in series}
    found = [r for r, sig in _SIGNATURES.items() if sig <= metrics]
    if not found and "test_nll" in metrics and metrics <= {"test_nll"}:
        found = ["kde"]
    return found[0] if len(found) == 1 else None


def _check_select(figure: Figure, config: dict[str, Any]) -> str | None:
    """Why the run is not of this figure's setting (e.g. fine-tuned for a pretraining figure), else None."""
    for key, want in figure.select.items():
        found, value = _dotted(config, key)
        unset = not found or value in (None, "")
        if want is None and not unset:
            return f"{key} is {value!r}, this figure needs it unset"
        if want == "<set>" and unset:
            return f"{key} is unset ({'absent from' if not found else 'null in'} {CONFIG}), this figure needs it set"
        if want not in (None, "<set>") and (unset or not rp.same_value(str(value), str(want))):
            return f"{key} is {value!r}, this figure needs {want!r}"
    return None


def load_figure_run(path: str | Path, figure: Figure) -> FigureRun:
    """Read one run dir for a figure; raises :class:`_Skip` with a one-line reason when it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise _Skip("no such directory")
    if not path.is_dir():
        raise _Skip("not a directory")
    caveats: list[str] = []
    config = _read_config(path, caveats)
    named = config.get("recipe")
    if named and named != figure.recipe:  # decided before a large metrics file of another recipe is read
        raise _Skip(f"a {named} run; this figure uses {figure.recipe}")
    why = _check_select(figure, config)
    if why:
        raise _Skip(why)
    metrics_path, source = _locate_metrics(path, caveats)
    if metrics_path is not None:
        try:
            if not _ends_in_newline(metrics_path):
                raise rp.ReportError("the last line is cut short")
            grid, series, rows = rp.read_metrics(metrics_path)
        except rp.ReportError as exc:
            if "header but no rows" in str(exc):
                raise _Skip(f"{METRICS} has a header but no rows (no finished generation yet)") from None
            grid, series, rows = _lenient_metrics(metrics_path, config, caveats)
    else:
        try:
            entries = list(path.iterdir())
        except OSError as exc:
            raise _Skip(f"cannot list it ({exc.strerror or exc})") from None
        gens = [p for p in entries if _GEN_DIR.match(p.name) and p.is_dir()]
        cells = sorted((path / "cells").glob("*.csv")) if (path / "cells").is_dir() else []
        partial = sorted(p.name for p in entries if p.name.startswith(".gen_") and p.name.endswith(".partial"))
        if gens:
            grid, series, rows = _from_generations(path, config, caveats)
            source = "gen_XXX/metrics.json"
        elif cells:
            grid, series, rows = _from_cells(path, cells, caveats)
            source = "cells/*.csv"
        else:
            held = rp.describe_contents(path)
            doing = f"; {partial[0]} is still being made" if partial else ""
            raise _Skip(f"no finished generation yet (no {METRICS}, no gen_XXX, no cells/){doing}; {held}")
    recipe = config.get("recipe")
    if not recipe:
        recipe = _infer_recipe(series)
        if recipe is None:
            raise _Skip(f"{CONFIG} is missing or names no recipe, and its metrics match no single recipe")
        caveats.append(f"{CONFIG} is missing or names no recipe: taken as {recipe} from its metrics")
    if recipe != figure.recipe:
        raise _Skip(f"a {recipe} run; this figure uses {figure.recipe}")
    metrics = sorted({m for m, _, _ in series})
    if figure.metric not in metrics:
        alias = [m for m in metrics if metric_name(m).replace("-", "_") == figure.metric]
        if alias:
            series = {(figure.metric if m == alias[0] else m, w, c): v for (m, w, c), v in series.items()}
            caveats.append(f"metric {alias[0]!r} read as {figure.metric} (older spelling)")
        else:
            shown = ", ".join(metrics[:8]) + (f", … (+{len(metrics) - 8})" if len(metrics) > 8 else "")
            raise _Skip(f"no {figure.metric} among its metrics ({shown}); written by another version of the recipe?")
    run = rp.Run(path, str(recipe), config, grid, series, rows, [])
    return FigureRun(run, source, caveats)


# ---- our curves -----------------------------------------------------------------------------------


@dataclass
class Curve:
    """One workflow in one setting of our runs: statistics over seeds and the closed form where known."""

    workflow: str
    cell: tuple[str, ...]
    summary: rp.Summary
    theory: np.ndarray | None
    series: rp.Series | None = None
    """The per-seed values behind ``summary`` (seeds, generations, values)."""

    def level(self, generation: int | None = None) -> tuple[int, float] | None:
        """``(generation, mean)`` at ``generation`` (default: the last with a finite mean), or None."""
        s = self.summary
        ok = np.flatnonzero(np.isfinite(s.mean))
        if generation is not None:
            ok = ok[s.generations[ok] == generation]
        if not ok.size:
            return None
        i = int(ok[-1])
        return int(s.generations[i]), float(s.mean[i])

    def first(self) -> tuple[int, float] | None:
        s = self.summary
        ok = np.flatnonzero(np.isfinite(s.mean))
        return (int(s.generations[ok[0]]), float(s.mean[ok[0]])) if ok.size else None

    def ratio(self) -> float | None:
        a, b = self.first(), self.level()
        if a is None or b is None or a[0] == b[0]:
            return None
        return relative_level(a[1], b[1])

    def ratio_over_seeds(self) -> Ratio | None:
        """The relative level at the last generation (:meth:`ratio`) with its 95% interval over seeds: the ratio
        of the means of the seeds that have both generations, and the ratio estimator's interval
        (:func:`tooling.report.ratio_of_means`); one seed gives the value alone."""
        a, b = self.first(), self.level()
        if a is None or b is None or a[0] == b[0]:
            return None
        if self.series is None:
            r = self.ratio()
            return None if r is None else Ratio(r, math.nan, 1)
        seeds, gens, values = self.series
        both = (gens == a[0]) | (gens == b[0])
        s = rp.ratio_of_means(seeds[both], gens[both], values[both])
        i = int(np.flatnonzero(s.generations == b[0])[0])
        if not math.isfinite(float(s.mean[i])):
            return None
        # last / first for positive values; 1 + (last - first) / |first| = 2 - last / first below zero
        r = float(s.mean[i]) if a[1] > 0 else 2.0 - float(s.mean[i])
        return Ratio(r, float(s.half_width[i]), int(s.n[i]))


@dataclass
class Ours:
    """Our curves of a figure: setting keys, the cells in report order and each cell's curves."""

    keys: tuple[str, ...]
    cells: list[tuple[str, ...]]
    curves: dict[tuple[str, ...], list[Curve]]
    notes: list[str]


def _config_value(config: dict[str, Any], key: str) -> str:
    found, value = _dotted(config, key)
    return "" if not found or value is None else str(value)


def _setting_value(config: dict[str, Any], key: str) -> str:
    """A run's value of a setting key: the labelled protocol for the protocol key, else the config value."""
    if key == rp.PROTOCOL_COLUMN and not _dotted(config, key)[0]:
        return rp.protocol_label(config.get(rp.PROTOCOL_KEY))
    return _config_value(config, key)


def build_curves(runs: Sequence[FigureRun], figure: Figure) -> Ours:
    """Pool our runs' series of the figure's metric per (setting, workflow); seeds add up, repeats count once."""
    grid: list[str] = []
    for fr in runs:
        grid += [g for g in fr.run.grid if g not in grid]
    keys = list(grid)
    for panel in figure.panels:
        keys += [k for k in panel.setting if k not in keys]
    notes: list[str] = []
    # Config values in which runs differ (another experiment) split cells; a key that older config.yaml
    # files lack is no difference.
    flat = [_flatten(fr.run.config) for fr in runs]
    hidden = rp.HIDDEN_CONFIG_KEYS | rp.POOLED_CONFIG_KEYS
    lacking: set[str] = set()
    for key in dict.fromkeys(k for f in flat for k in f):
        if key.split(".", 1)[0] in hidden or key in keys or key in figure.select or key == rp.PROTOCOL_KEY:
            continue
        have = [f[key] for f in flat if key in f]
        if len(have) < len(flat):
            lacking.add(key)
        if any(v != have[0] for v in have):
            keys.append(key)
    # The protocol (epochs per generation or fixed compute) splits settings, labelled, once any run trained
    # at fixed compute; a run without the key (older versions) trained for its epochs.
    if rp.PROTOCOL_COLUMN not in keys and any(fr.run.config.get(rp.PROTOCOL_KEY) is not None for fr in runs):
        keys.append(rp.PROTOCOL_COLUMN)
    if lacking and len(runs) > 1:
        shown = sorted(lacking)
        notes.append(
            f"some config.yaml files (older versions) lack {', '.join(shown[:6])}"
            + (f" (+{len(shown) - 6})" if len(shown) > 6 else "")
            + "; taken as equal to the others"
        )
    pieces: dict[tuple[str, tuple[str, ...]], list[tuple[rp.Series, int]]] = {}
    streams: dict[tuple[str, str], int] = {}
    for fr in runs:
        run = fr.run
        stream = streams.setdefault((str(run.config.get("seed")), str(run.config.get("num_seeds"))), len(streams))
        pos = {g: i for i, g in enumerate(run.grid)}
        for (metric, wf, cell), arrays in run.series.items():
            if metric != figure.metric:
                continue
            full = tuple(cell[pos[k]] if k in pos else _setting_value(run.config, k) for k in keys)
            pieces.setdefault((wf, full), []).append((arrays, stream))
    curves: dict[tuple[str, ...], list[Curve]] = {}
    dropped = 0
    theory_keys = rp.THEORY_CONFIG_KEYS.get(figure.recipe, ())
    common = {k: rp.single_value(runs[0].run.config.get(k)) for k in theory_keys} if runs else {}
    for (wf, cell), tagged in pieces.items():
        seeds, gens, values, repeated = rp.merge_tagged(tagged)
        dropped += repeated
        summary = rp.summarize(seeds, gens, values)
        params = {k: v for k, v in common.items() if v is not None}
        params.update({k: rp.param_value(v) for k, v in zip(keys, cell) if v != ""})
        theory = rp.safe_theory_curve(figure.recipe, figure.metric, wf, params, summary.generations)
        curves.setdefault(cell, []).append(Curve(wf, cell, summary, theory, (seeds, gens, values)))
    for lines in curves.values():
        lines.sort(key=lambda c: rp.workflow_sort_key(c.workflow))
    if dropped:
        notes.append(
            f"{dropped} rows repeat a (setting, workflow, seed, generation) of a run with the same seed; "
            "only the first was kept"
        )
    cells = sorted(curves, key=lambda c: (_panel_rank(figure, keys, c), rp.cell_sort_key(c)))
    return Ours(tuple(keys), cells, curves, notes)


def matching_panels(figure: Figure, keys: Sequence[str], cell: Sequence[str]) -> list[Panel]:
    """The published panels whose setting this cell of our runs has."""
    values = dict(zip(keys, cell))
    return [
        p
        for p in figure.panels
        if all(k in values and values[k] != "" and rp.same_value(values[k], str(v)) for k, v in p.setting.items())
    ]


def _panel_rank(figure: Figure, keys: Sequence[str], cell: Sequence[str]) -> int:
    found = matching_panels(figure, keys, cell)
    return figure.panels.index(found[0]) if found else len(figure.panels)


def compared_panel(figure: Figure, keys: Sequence[str], cell: Sequence[str]) -> tuple[Panel | None, str]:
    """The panel a cell is compared with and why: its own setting, else (stand-ins) the headline panel."""
    if not figure.panels:
        return None, "the reference gives the shape only"
    found = matching_panels(figure, keys, cell)
    if found:
        chosen = next((p for p in found if p.label == figure.compare_panel), found[0])
        if chosen.setting:
            return chosen, "same setting"
        return chosen, "the published setting" if figure.levels_comparable else "compare the shape"
    if not figure.levels_comparable and figure.compare_panel:
        return figure.panel(figure.compare_panel), "another setting: compare the shape"
    return None, "no published value at this setting"


# ---- comparison rows -----------------------------------------------------------------------------


@dataclass
class Row:
    """Ours vs published for one workflow in one setting."""

    cell: tuple[str, ...]
    workflow: str
    curve: Curve | None
    panel: Panel | None
    why: str
    pub_first: Published | None = None
    pub_last: Published | None = None
    pub_at_last: Published | None = None
    verdict: Verdict = Verdict(None, "")
    pub_verdict: Verdict = Verdict(None, "")

    @property
    def pub_ratio(self) -> float | None:
        if self.pub_first is None or self.pub_last is None or self.pub_last.where == self.pub_first.where:
            return None
        return relative_level(self.pub_first.value, self.pub_last.value)


def _published_workflow(panel: Panel | None, label: str) -> str | None:
    if panel is None:
        return None
    names = panel.workflows()
    if label in names:
        return label
    return next((w for w in names if _name(w) == _name(label) == w), None)


def published_rows(figure: Figure) -> list[Row]:
    """Rows of the published values alone (no run of ours): first, last and verdict of every panel's curves."""
    rows = []
    for panel in figure.panels:
        firsts = {wf: published_first(figure, panel, wf) for wf in panel.workflows()}
        lasts = {wf: published_last(figure, panel, wf) for wf in panel.workflows()}
        panel_rows = [Row((), wf, None, panel, "published only", firsts[wf], lasts[wf]) for wf in panel.workflows()]
        verdicts = curve_verdicts(figure.expected_shape, {r.workflow: r.pub_ratio for r in panel_rows})
        for r in panel_rows:
            r.verdict = Verdict(None, "no run of ours")
            r.pub_verdict = verdicts[r.workflow]
        rows += sorted(panel_rows, key=lambda r: rp.workflow_sort_key(r.workflow))
    return rows


def comparison_rows(figure: Figure, ours: Ours, cells: Sequence[tuple[str, ...]]) -> list[Row]:
    """One row per (cell, workflow) of ours, plus the published workflows of the panel that we lack."""
    rows: list[Row] = []
    for cell in cells:
        panel, why = compared_panel(figure, ours.keys, cell)
        curves = ours.curves.get(cell, [])
        verdicts = curve_verdicts(figure.expected_shape, {c.workflow: c.ratio_over_seeds() for c in curves})
        pub_ratios: dict[str, float | None] = {}
        cell_rows = []
        for c in curves:
            row = Row(cell, c.workflow, c, panel, why, verdict=verdicts[c.workflow])
            pw = _published_workflow(panel, c.workflow)
            if pw is not None and panel is not None:
                row.pub_first = published_first(figure, panel, pw)
                row.pub_last = published_last(figure, panel, pw)
                last = c.level()
                if last is not None and figure.iteration_offset is not None:
                    row.pub_at_last = published_at(figure, panel, pw, last[0] + figure.iteration_offset)
                pub_ratios[c.workflow] = row.pub_ratio
            cell_rows.append(row)
        present = {c.workflow for c in curves}
        if panel is not None:
            for pw in panel.workflows():
                if pw not in present and not any(_published_workflow(panel, w) == pw for w in present):
                    row = Row(
                        cell,
                        pw,
                        None,
                        panel,
                        why,
                        published_first(figure, panel, pw),
                        published_last(figure, panel, pw),
                    )
                    pub_ratios[pw] = row.pub_ratio
                    cell_rows.append(row)
        pub_verdicts = curve_verdicts(figure.expected_shape, pub_ratios)
        for row in cell_rows:
            if row.workflow in pub_verdicts and row.pub_first is None and row.pub_last is not None:
                row.pub_verdict = Verdict(None, f"the reference gives no first value, only the {row.pub_last.where}")
            elif row.workflow in pub_verdicts:
                row.pub_verdict = pub_verdicts[row.workflow]
            elif row.panel is not None:
                row.pub_verdict = Verdict(None, "no published value")
            if row.curve is None:
                row.verdict = Verdict(None, "not in our runs")
        rows += sorted(cell_rows, key=lambda r: rp.workflow_sort_key(r.workflow))
    return rows


# ---- plotting ------------------------------------------------------------------------------------


def _draw_published(ax, figure: Figure, panel: Panel, colours: dict[str, str], relative: bool, x_end: float) -> bool:
    """Draw a panel's values on our generation axis (relative to each workflow's first value if asked).

    Returns whether anything was drawn."""
    drawn = False
    offset = figure.iteration_offset
    for wf in panel.workflows():
        colour = colours.get(wf, "0.3")
        scale = 1.0
        if relative:
            first = published_first(figure, panel, wf)
            if first is None or first.value == 0:
                continue
            scale = first.value

        def rel(v: float, scale=scale) -> float:
            return 1.0 + (v - scale) / abs(scale) if relative else v

        pts = panel.series.get(wf, ())
        xs = [0.0 if p.kind == "first" else figure.generation(p.start) for p in pts if p.kind in ("first", "iteration")]
        ys = [rel(p.value) for p in pts if p.kind in ("first", "iteration")]
        if (
            relative
            and pts
            and not any(p.kind == "first" or (p.kind == "iteration" and p.start == offset) for p in pts)
        ):
            xs, ys = [0.0, *xs], [1.0, *ys]  # the shared first iteration
        if xs:
            ax.plot(xs, ys, color=colour, lw=1.2, ls="--", marker="s", ms=4, mfc="white")
            drawn = True
        for p in pts:
            if p.kind == "span":
                x0, x1 = figure.generation(p.start), figure.generation(p.stop)
                ax.fill_between([x0, x1], [rel(p.low)] * 2, [rel(p.high)] * 2, color=colour, alpha=0.25, lw=0)
                ax.plot([x0, x1], [rel(p.value)] * 2, color=colour, lw=1.2, ls="--")
                drawn = True
            elif p.kind == "later":
                if p.is_range:
                    ax.axhspan(rel(p.low), rel(p.high), color=colour, alpha=0.15, lw=0)
                ax.axhline(rel(p.value), color=colour, lw=1.0, ls="--")
                ax.text(x_end, rel(p.value), "later", color=colour, fontsize=7, ha="right", va="bottom")
                drawn = True
        if wf in panel.limits:
            y = rel(panel.limits[wf])
            ax.axhline(y, color=colour, lw=1.0, ls="-.")
            ax.text(x_end, y, "limit", color=colour, fontsize=7, ha="right", va="bottom")
            drawn = True
    return drawn


def _finish_axis(ax, ylabel: str, xlabel: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3, lw=0.5)
    ax.set_ylabel(ylabel, fontsize=8)
    if xlabel:
        ax.set_xlabel("generation (ours; published: iteration - offset)", fontsize=8)


def _auto_log(ax) -> None:
    """Log y where everything drawn is positive and spans two orders of magnitude."""
    ys = []
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), dtype=float)
        ys.append(y[np.isfinite(y)])
    v = np.concatenate(ys) if ys else np.empty(0)
    if v.size and v.min() > 0 and v.max() / v.min() >= 100:
        ax.set_yscale("log")


def _x_end(figure: Figure, panel: Panel | None, curves: Sequence[Curve]) -> float:
    ends = [float(c.summary.generations[-1]) for c in curves]
    if panel is not None:
        for pts in panel.series.values():
            for p in pts:
                if p.kind in ("iteration", "span"):
                    ends.append(figure.generation(p.stop))
    return max(ends, default=1.0) or 1.0


def _draw_ours(a_ours, a_rel, curves: Sequence[Curve], colours: dict[str, str]) -> bool:
    """Our curves: mean, shaded interval and closed form on ``a_ours``, the same relative to generation 0 on
    ``a_rel``. Returns whether a closed form was drawn."""
    any_theory = False
    for c in curves:
        s, colour = c.summary, colours[c.workflow]
        ls = "-." if rp.is_real_only(c.workflow) else "-"
        a_ours.plot(
            s.generations, s.mean, color=colour, lw=1.4, ls=ls, marker="." if len(s.generations) <= 30 else None
        )
        a_ours.fill_between(s.generations, s.mean - s.half_width, s.mean + s.half_width, color=colour, alpha=0.18, lw=0)
        if c.theory is not None:
            any_theory = True
            a_ours.plot(s.generations, c.theory, color=colour, lw=1.1, ls=":")
        first = c.first()
        if first is not None and first[1] != 0:
            rel = 1.0 + (s.mean - first[1]) / abs(first[1])
            band = s.half_width / abs(first[1])
            a_rel.plot(s.generations, rel, color=colour, lw=1.4, ls=ls)
            a_rel.fill_between(s.generations, rel - band, rel + band, color=colour, alpha=0.15, lw=0)
    if not curves:
        a_ours.text(0.5, 0.5, "no usable run", ha="center", va="center", transform=a_ours.transAxes, fontsize=9)
    return any_theory


def _draw_published_column(
    a_pub,
    figure: Figure,
    panel: Panel | None,
    why: str,
    curves: Sequence[Curve],
    colours: dict[str, str],
    x_end: float,
) -> None:
    """The middle column: the published panel, our means under it where the levels compare, else why it is empty."""
    a_pub.set_title(f"published: {panel.label}" if panel else "published", fontsize=9)
    drawn = panel is not None and _draw_published(a_pub, figure, panel, colours, False, x_end)
    if drawn and figure.levels_comparable and why == "same setting":
        # The levels compare (same model, same setting): our means, thin, under the published values.
        for c in curves:
            if _published_workflow(panel, c.workflow) is not None:  # only what the panel can be read against
                a_pub.plot(c.summary.generations, c.summary.mean, color=colours[c.workflow], lw=0.9, alpha=0.45)
        a_pub.set_title(f"published: {panel.label} (thin: ours)", fontsize=9)
    if not drawn:
        text = why if panel is None else (figure.shape_notes or "no published values")
        a_pub.text(
            0.5,
            0.5,
            "\n".join(_wrap(text, 40)),
            ha="center",
            va="center",
            transform=a_pub.transAxes,
            fontsize=8,
            color="0.3",
        )


def _draw_figure_row(
    axes_row,
    figure: Figure,
    ours: Ours,
    cell: tuple[str, ...] | None,
    varying: Sequence[int],
    colours: dict[str, str],
    last_row: bool,
) -> bool:
    """One row of the comparison figure (ours, published, relative); returns whether a closed form was drawn.

    Without a cell (no usable run) the row shows the figure's headline panel.
    """
    a_ours, a_pub, a_rel = axes_row
    curves = ours.curves.get(cell, []) if cell is not None else []
    panel, why = (
        compared_panel(figure, ours.keys, cell) if cell is not None else (figure.panel(figure.compare_panel), "")
    )
    x_end = _x_end(figure, panel, curves)
    title = rp.cell_title(ours.keys, cell, varying) if cell is not None and varying else ""
    a_ours.set_title(("ours: " + title) if title else "ours", fontsize=9)
    any_theory = _draw_ours(a_ours, a_rel, curves, colours)
    _draw_published_column(a_pub, figure, panel, why, curves, colours, x_end)
    if panel is not None:
        _draw_published(a_rel, figure, panel, colours, True, x_end)
    a_rel.axhline(1.0, color="0.5", lw=0.8)
    if any(_name(c.workflow) == "accumulate" for c in curves):
        a_rel.axhline(math.pi**2 / 6, color="0.15", lw=0.9, ls=_BOUND_STYLE)  # Dey & Donoho's bound for accumulate
    a_rel.set_title("relative to generation 0", fontsize=9)
    for ax, label in (
        (a_ours, figure.metric),
        (a_pub, f"{figure.metric} (published)"),
        (a_rel, "1 + (v - v0)/|v0|"),
    ):
        _finish_axis(ax, label, last_row)
        _auto_log(ax)
        ax.set_xlim(-0.3, x_end + 0.3)
    return any_theory


def _legend_name(workflow: str) -> str:
    return f"{workflow}: real data only" if rp.is_real_only(workflow) else workflow


def _figure_legend(colours: dict[str, str], any_theory: bool) -> list:
    """Legend handles of the comparison figure: a line per workflow, then what ours, published and theory look like."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    labels = sorted(colours, key=rp.workflow_sort_key)
    handles = [
        Line2D([], [], color=colours[w], lw=1.6, ls="-." if rp.is_real_only(w) else "-", label=_legend_name(w))
        for w in labels
    ]
    handles.append(Patch(color="0.5", alpha=0.3, label="ours: mean, 95% CI"))
    if any(_name(w) == "accumulate" for w in labels):
        handles.append(Line2D([], [], color="0.15", lw=0.9, ls=_BOUND_STYLE, label="π²/6 (accumulate bound)"))
    handles.append(Line2D([], [], color="0.3", ls="--", marker="s", mfc="white", label="published"))
    if any_theory:
        handles.append(Line2D([], [], color="0.3", ls=":", label="closed form"))
    return handles


def plot_figure(
    path: Path, figure: Figure, ours: Ours, cells: Sequence[tuple[str, ...]], colours: dict[str, str]
) -> None:
    """The comparison figure: a row per cell; ours, the published panel, both relative to generation 0."""

    rows = max(1, len(cells))
    fig, axes = rp.axes_grid(rows, 3, (3.5, 2.7), (0.75, 1.0, 0.75, 0.2), wspace=0.32, hspace=0.55)
    width, height = fig.get_size_inches()
    varying = [i for i in range(len(ours.keys)) if len({c[i] for c in cells}) > 1]
    any_theory = False
    for r in range(rows):
        cell = cells[r] if cells else None
        any_theory |= _draw_figure_row(axes[r], figure, ours, cell, varying, colours, r == rows - 1)
    handles = _figure_legend(colours, any_theory)
    fig.legend(
        handles=handles,
        loc="lower center",
        ncols=min(len(handles), 5),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 0.05 / height),
    )
    fig.suptitle(f"{figure.id}: {figure.title}", fontsize=10, y=1 - 0.1 / height, va="top")
    fig.savefig(path, format="png")


def plot_published(path: Path, figure: Figure, colours: dict[str, str]) -> bool:
    """Every published panel of the figure, on our generation axis; False (nothing written) unless there are two
    or more panels with values (a single one is the middle column of the comparison figure)."""
    from matplotlib.lines import Line2D

    panels = [p for p in figure.panels if p.series or p.limits]
    if len(panels) < 2:
        return False
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = rp.axes_grid(rows, cols, (3.4, 2.6), (0.6, 0.95, 0.75, 0.2), wspace=0.35, hspace=0.55)
    width, height = fig.get_size_inches()
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_visible(False)
            continue
        panel = panels[i]
        x_end = _x_end(figure, panel, [])
        _draw_published(ax, figure, panel, colours, False, x_end)
        ax.set_xlim(-0.02 * x_end - 0.3, 1.02 * x_end + 0.3)
        ax.set_title(panel.label, fontsize=9)
        _finish_axis(ax, figure.metric, i // cols == rows - 1)
        _auto_log(ax)
    wfs = sorted({w for p in panels for w in p.workflows()}, key=rp.workflow_sort_key)
    handles = [Line2D([], [], color=colours.get(w, "0.3"), ls="--", marker="s", mfc="white", label=w) for w in wfs]
    fig.legend(handles=handles, loc="lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(f"{figure.id}: published values ({figure.source})"[:150], fontsize=10, y=1 - 0.1 / height, va="top")
    fig.savefig(path, format="png")
    return True


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


# ---- markdown and html ---------------------------------------------------------------------------


def _f(x: float | None) -> str:
    return "—" if x is None else rp.fmt(x)


def _ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.3g}"


def _pub(p: Published | None) -> str:
    if p is None:
        return "—"
    return f"{'≈' if p.approx else ''}{rp.fmt(p.value)} ({p.where})"


def _table(head: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(rp.md_escape(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(rp.md_escape(v) for v in row) + " |" for row in body]
    return out


def _setting(keys: Sequence[str], cell: Sequence[str], shown: Sequence[int]) -> str:
    return ", ".join(f"{keys[i]}={cell[i] or '-'}" for i in shown) or "—"


def _comparison_table(figure: Figure, ours: Ours, rows: Sequence[Row], shown: Sequence[int]) -> list[str]:
    head = [
        "setting",
        "workflow",
        "ours first",
        "ours last",
        "ours last/first",
        "published panel",
        "published first",
        "published last",
        "published last/first",
        "published at our last gen",
        *(["ours / published (level)"] if figure.levels_comparable else []),
        "expected shape",
        "ours: verdict",
        "published: verdict",
        "accumulate bound (π²/6)",
    ]
    body = []
    for r in rows:
        first = r.curve.first() if r.curve else None
        last = r.curve.level() if r.curve else None
        s = r.curve.summary if r.curve else None

        def at(point, s=s):
            if point is None or s is None:
                return "—"
            i = int(np.flatnonzero(s.generations == point[0])[0])
            return f"{rp.format_value_cell(s, i)} @{point[0]}"

        body.append(
            [
                _setting(ours.keys, r.cell, shown),
                r.workflow,
                at(first),
                at(last if last != first else None),
                _ratio(r.curve.ratio() if r.curve else None),
                f"{r.panel.label} ({r.why})" if r.panel else r.why,
                _pub(r.pub_first),
                _pub(r.pub_last),
                _ratio(r.pub_ratio),
                _pub(r.pub_at_last),
                *([_level_ratio(r)] if figure.levels_comparable else []),
                figure.expected_shape.get(_name(r.workflow), "—"),
                f"{r.verdict.word}: {r.verdict.text}" if r.curve else "—",
                f"{r.pub_verdict.word}: {r.pub_verdict.text}" if r.panel else "—",
                bound_check(r.curve) if r.curve else "—",
            ]
        )
    return _table(head, body)


def _plain(value: Any) -> str:
    """A setting value as text: ``a, b`` for lists, ``k v, ...`` for mappings."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return (
        f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000 else str(value)
    )


def _level_ratio(r: Row) -> str:
    """Our last value over the published one at the same generation (or the published limit): levels, not shapes."""
    last = r.curve.level() if r.curve else None
    if last is None or r.why != "same setting":
        return "—"
    pub = r.pub_at_last or (r.pub_last if r.pub_last is not None and r.pub_last.where == "limit" else None)
    if pub is None or pub.value == 0:
        return "—"
    return f"{last[1] / pub.value:.3g} (vs {pub.where})"


def _published_table(figure: Figure) -> list[str]:
    body = []
    for panel in figure.panels:
        for wf in panel.workflows():
            pts = "; ".join(f"{_where(p)}: {_value(p)}" for p in panel.series.get(wf, ()))
            limit = rp.fmt(panel.limits[wf]) if wf in panel.limits else ""
            setting = ", ".join(f"{k}={v}" for k, v in panel.setting.items()) or "—"
            notes = "; ".join([panel.notes, *(f"unconfirmed: {u}" for u in panel.unconfirmed)]).strip("; ")
            body.append([panel.label, setting, wf, pts or "—", limit or "—", notes])
    if not body:
        return [f"The reference gives no values for this figure, only the shape: {figure.shape_notes or '—'}"]
    return _table(["panel", "setting", "workflow", "iteration: value", "limit", "notes"], body)


def _where(p: Point) -> str:
    return {"iteration": str(p.start), "span": f"{p.start}-{p.stop}"}.get(p.kind, p.kind)


def _value(p: Point) -> str:
    return f"{p.low:g}-{p.high:g}" if p.is_range else f"{p.value:g}"


SAMPLE_TEXTS = "samples.txt"
"""A few synthetic samples as text (the TinyStories recipe), one per block ending in an ``<|endoftext|>`` line."""
_TEXT_SEPARATOR = re.compile(r"^<\|endoftext\|>$", flags=re.MULTILINE)


def _first_text(path: Path, limit: int = 240) -> str | None:
    """The first sample of a generation's samples.txt, on one line and cut to ``limit`` characters."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    blocks = [" ".join(b.split()) for b in _TEXT_SEPARATOR.split(text)]
    first = next((b for b in blocks if b), None)
    if first is None:
        return None
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def _text_sample_lines(runs: Sequence[FigureRun]) -> list[str]:
    """ "Sample texts": per workflow (its run with the smallest seed), the first sample of the first and last
    finished generation. Empty when no run holds ``gen_XXX/samples.txt``."""
    best: dict[str, tuple[int, Path, list[int]]] = {}
    for fr in runs:
        run = fr.run
        gens = sorted(
            g
            for g, _ in rp.finished_generations(run.path).items()
            if (run.path / f"gen_{g:03d}" / SAMPLE_TEXTS).is_file()
        )
        if not gens:
            continue
        wf, seed = rp.run_workflow(run), rp.run_seed(run)
        seed = seed if seed is not None else 1 << 30
        if wf not in best or seed < best[wf][0]:
            best[wf] = (seed, run.path, gens)
    lines = []
    for wf in sorted(best, key=rp.workflow_sort_key):
        seed, path, gens = best[wf]
        for g in dict.fromkeys([gens[0], gens[-1]]):
            text = _first_text(path / f"gen_{g:03d}" / SAMPLE_TEXTS)
            if text:
                lines.append(f"- {wf} (seed {seed}), generation {g}: {text}")
    if not lines:
        return []
    return [
        "## Sample texts",
        "",
        "The first synthetic sample of the first and last generation of each workflow "
        "(its run with the smallest seed):",
        "",
        *lines,
        "",
    ]


def _cardinality_lines(figure: Figure, ours: Ours) -> list[str]:
    if not figure.cardinality:
        return []
    mine: dict[tuple[int, int], list[tuple[str, Curve]]] = {}
    for cell in ours.cells:
        for c in ours.curves[cell]:
            try:
                wf = Workflow.parse(c.workflow)
            except WorkflowError:
                continue
            if wf.fixed_counts is not None:
                mine.setdefault(wf.fixed_counts, []).append((_setting(ours.keys, cell, range(len(ours.keys))), c))
    base = {c.real: c.value for c in figure.cardinality if c.synthetic == 0}
    body = []
    pairs = sorted({(c.real, c.synthetic) for c in figure.cardinality} | set(mine))
    for real, synthetic in pairs:
        pub = next((c.value for c in figure.cardinality if (c.real, c.synthetic) == (real, synthetic)), None)
        change = relative_level(base.get(real), pub) if synthetic else None
        runs = mine.get((real, synthetic), [(None, None)])
        for setting, curve in runs:
            last = curve.level() if curve else None
            ours_base = next((c for s, c in mine.get((real, 0), []) if s == setting), None) if curve else None
            ours_change = (
                relative_level(ours_base.level()[1], last[1]) if ours_base and ours_base.level() and last else None
            )
            body.append(
                [
                    str(real),
                    str(synthetic),
                    f"{rp.fmt(last[1])} @{last[0]}" if last else "—",
                    _ratio(ours_change) if synthetic else "—",
                    _f(pub),
                    _ratio(change),
                ]
            )
    lines = ["## Real x synthetic examples", ""]
    lines += [
        "Our workflow `mix(real=R, synthetic=S)` at its last generation vs the published loss after training on "
        "R real and S synthetic examples; the change is relative to the same R with no synthetic examples.",
        "",
    ]
    lines += _table(
        ["real", "synthetic", "ours (last gen)", "ours vs synthetic=0", "published", "published vs synthetic=0"], body
    )
    return lines + [""]


_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*|!\[([^\]]*)\]\(([^)]+)\)|\[([^\]]+)\]\(([^)]+)\)")


def _inline(text: str) -> str:
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        if m.group(1) is not None:
            out.append(f"<code>{html.escape(m.group(1))}</code>")
        elif m.group(2) is not None:
            out.append(f"<strong>{html.escape(m.group(2))}</strong>")
        elif m.group(4) is not None:
            out.append(f'<img src="{html.escape(m.group(4))}" alt="{html.escape(m.group(3))}">')
        else:
            out.append(f'<a href="{html.escape(m.group(6))}">{html.escape(m.group(5))}</a>')
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def markdown_to_html(lines: Sequence[str], title: str) -> str:
    """The small markdown this module writes (headings, tables, lists, images, paragraphs) as one HTML page."""
    body: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"^(#{1,4}) (.*)$", line):
            level = len(m.group(1))
            body.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r.strip()[1:-1])] for r in block]
            head, rows = cells[0], [c for c in cells[1:] if not all(set(x) <= set("-: ") for x in c)]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in head) + "</tr></thead><tbody>")
            body += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows]
            body.append("</tbody></table>")
        elif line.startswith("- "):
            body.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                body.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#{1,4} |\||- )", lines[i]):
                para.append(lines[i])
                i += 1
            body.append(f"<p>{_inline(' '.join(para))}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;"
        "vertical-align:top}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{style}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


# ---- the command ---------------------------------------------------------------------------------


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")


def _produce_lines(figure: Figure) -> list[str]:
    out = []
    p = figure.produce
    if p.get("script"):
        out.append(f"- script: `bash {p['script']}`")
    if p.get("sweep"):
        out.append(f"- W&B sweep: `wandb sweep {p['sweep']}`")
    if p.get("command"):
        out.append(f"- one run: `{p['command']}`")
    return out


def _collect_runs(
    run_dirs: Sequence[str | Path], figure: Figure, out: Path, warn: Callable[[str], None]
) -> tuple[list[FigureRun], list[str], int]:
    """The figure's usable runs among ``run_dirs``, the skipped ones (a reason each) and how many distinct run
    dirs were looked at. ``warn`` gets a line per skipped run, then a line per caveat of a usable one."""
    used: list[FigureRun] = []
    skipped: list[str] = []
    seen: set[Path] = set()
    for path in expand_run_dirs(run_dirs, skip=[out]):
        key = path.resolve() if path.exists() else path
        if key in seen:
            continue
        seen.add(key)
        try:
            used.append(load_figure_run(path, figure))
        except _Skip as exc:
            skipped.append(f"{path}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one unreadable run dir must never stop the report
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            skipped.append(f"{path}: cannot be read ({type(exc).__name__}{': ' + text if text else ''})")
    for reason in skipped:
        warn(f"warning: skipped {reason}")
    for fr in used:
        for c in fr.caveats:
            warn(f"warning: {fr.run.path}: {c}")
    return used, skipped, len(seen)


def _shown_keys(figure: Figure, ours: Ours, chosen: Sequence[tuple[str, ...]]) -> list[int]:
    """The setting columns of the comparison table: keys that vary among the chosen cells or set a published panel."""
    if not chosen:
        return []
    varying = {i for i in range(len(ours.keys)) if len({c[i] for c in chosen}) > 1}
    panel_keys = {k for p in figure.panels for k in p.setting}
    return sorted(varying | {i for i, k in enumerate(ours.keys) if k in panel_keys})


def _intro_lines(figure: Figure) -> list[str]:
    """The report's title, the figure's source, index convention, comparability and setting, and how runs are made."""
    md = [f"# {figure.id}: {rp.md_escape(figure.title)}", ""]
    md += [
        f"- source: {figure.source}",
        f"- recipe: `recipes/{figure.recipe}.py`, metric `{figure.metric}`",
        f"- index: {figure.index_convention}",
        f"- comparability: {figure.comparability}",
    ]
    setting = "; ".join(f"{k}: {_plain(v)}" for k, v in figure.setting.items())
    md += [f"- published setting: {setting}"]
    md += [f"- unconfirmed: {u}" for u in figure.unconfirmed]
    md += ["", "Runs are made by:", ""] + _produce_lines(figure) + [""]
    return md


def _runs_lines(figure: Figure, used: Sequence[FigureRun], skipped: Sequence[str], ours: Ours) -> list[str]:
    """The "Runs" and "Skipped runs" sections, and "Runs used with caveats" where there are any."""
    md = ["## Runs", ""]
    if used:
        for fr in used:
            run = fr.run
            gens = sorted({int(g) for (m, _, _), (_, gs, _) in run.series.items() if m == figure.metric for g in gs})
            wfs = sorted({w for m, w, _ in run.series if m == figure.metric}, key=rp.workflow_sort_key)
            seeds = sorted({int(s) for (m, _, _), (ss, _, _) in run.series.items() if m == figure.metric for s in ss})
            seed_text = ", ".join(map(str, seeds[:6])) + (f", … ({len(seeds)} seeds)" if len(seeds) > 6 else "")
            md.append(
                f"- `{run.path}`: {', '.join(wfs)}; seed {seed_text}; generations {gens[0]}–{gens[-1]}; "
                f"from {fr.source}"
            )
    else:
        md.append(f"No usable {figure.recipe} run: the figure shows the published values only.")
    md.append("")
    md += ["## Skipped runs", ""]
    md += [f"- {s}" for s in skipped] if skipped else ["None."]
    md.append("")
    caveats = [f"`{fr.run.path}`: {c}" for fr in used for c in fr.caveats] + ours.notes
    if caveats:
        md += ["## Runs used with caveats", ""] + [f"- {c}" for c in caveats] + [""]
    return md


def _figure_lines(figure: Figure, png: Path, shown: int, chosen: int) -> list[str]:
    """The "Figure" section: the comparison figure, what its columns show, and how many settings it leaves out."""
    md = ["## Figure", "", f"![{figure.id}]({png.name})", ""]
    md += [
        "Left: ours, mean over seeds with the 95% interval (closed form dotted where known). Middle: the "
        "published values on our generation axis (generation = iteration − "
        f"{figure.iteration_offset if figure.iteration_offset is not None else 'none: no index'}; dashed squares; "
        "bands are ranges, 'later' and 'limit' lines have no iteration). Right: both relative to generation 0, "
        "1 + (v − v0)/|v0|: the shapes side by side.",
        "",
    ]
    if chosen > shown:
        md += [
            f"The figure shows {shown} of {chosen} settings (--max_rows, --cells); the table lists all.",
            "",
        ]
    return md


def _comparison_lines(figure: Figure, ours: Ours, rows: Sequence[Row], shown_keys: Sequence[int]) -> list[str]:
    """The "Ours vs published" section: the table and how many of our curves have their expected shape."""
    md = ["## Ours vs published", ""]
    if not rows:
        return md + ["No published values and no curves of ours to compare.", ""]
    md += _comparison_table(figure, ours, rows, shown_keys) + [""]
    ours_rows = [r for r in rows if r.curve is not None and r.verdict.ok is not None]
    ok = sum(r.verdict.ok for r in ours_rows)
    straddling = sum(r.curve is not None and r.verdict.ok is None and "straddles" in r.verdict.text for r in rows)
    verdict = (
        f"Shape verdict: {ok} of {len(ours_rows)} of our curves with an expected shape have it"
        if ours_rows
        else "Shape verdict: no curve of ours with an expected shape and two finite generations"
    )
    if straddling:
        verdict += f"; {straddling} more cannot be told (the 95% interval straddles the limit)"
    md += [
        f"{verdict} (rules, on last/first: rising > {RISING:g}; flat within ±{FLAT:.0%}; "
        f"bounded <= {BOUNDED:.3g}; between: within accumulate's and replace's in the same setting). "
        + _basis_text(ours_rows),
        "",
        f"Accumulate bound: Dey & Donoho show accumulate's test risk stays within π²/6 ≈ {math.pi**2 / 6:.3f} of "
        "generation 0's; the last column checks every accumulate curve of ours, each generation's mean over its "
        "first generation's, judged on the 95% intervals (on the test loss where the floor is unknown, a weaker "
        "check than on excess risk).",
        "",
    ]
    return md


def _basis_text(rows: Sequence[Row]) -> str:
    """What our verdicts were judged on: intervals over seeds, or single values of one seed."""
    counts = {r.curve.summary.n_seeds for r in rows if r.curve is not None}
    if not counts:
        return ""
    if counts == {1}:
        return "The verdicts are from one seed: single values, no interval."
    return (
        "Our verdicts use the 95% interval over seeds of last/first (the ratio of the means): a shape holds when the "
        "whole interval meets its rule"
        + ("; curves with one seed are judged on their single value and say so." if 1 in counts else ".")
    )


def _sample_lines(used: Sequence[FigureRun], out: Path, taken: set[str], warn: Callable[[str], None]) -> list[str]:
    """The "Samples" sections (pictures written into ``out`` under names not in ``taken``) and "Sample texts"."""
    md = [
        line.replace("### Samples", "## Samples", 1)
        for d in rp.merge_runs([fr.run for fr in used])
        for line in rp.samples_section(d, out, taken, warn)
    ]
    return md + _text_sample_lines(used)


def make_figure(
    figure_id: str,
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    cells: Sequence[str] | str | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    published: str | Path | None = None,
    warn: Callable[[str], None] | None = _stderr,
) -> Path:
    """Write ``<out>/<figure>.png``, ``<figure>_published.png``, ``report.md`` and ``report.html``; returns report.md.

    Run dirs that cannot be used are explained (``warn`` and "Skipped runs"), never fatal; a report
    with no usable run shows the published values alone. :class:`FigureError` for an unknown figure id
    or bad options.
    """
    warn = warn or (lambda _m: None)
    figures = load_published(published)
    if figure_id not in figures:
        raise FigureError(f"unknown figure {figure_id!r}; figures: {', '.join(figures)}")
    figure = figures[figure_id]
    if max_rows < 1:
        raise FigureError(f"--max_rows must be >= 1, got {max_rows}")
    filters = rp.parse_cell_filters(cells)
    out = Path(out_dir)
    title = f"# {figure.id}: {rp.md_escape(figure.title)}"  # report.md's first line (_intro_lines)
    ours = rp.claim_out(out, title, also=("report.html",))  # a figure's earlier files may be replaced, no other

    used, skipped, looked_at = _collect_runs(run_dirs, figure, out, warn)
    curves = build_curves(used, figure) if used else Ours((), [], {}, [])
    chosen = [c for c in curves.cells if rp.cell_matches_filters(curves.keys, c, filters)]
    if filters and curves.cells and not chosen:
        raise FigureError(f"--cells matches no setting (they look like {rp.cell_title(curves.keys, curves.cells[0])})")
    if not used:
        warn(
            f"warning: no usable {figure.recipe} run among the {looked_at} run dir(s); "
            "the report shows the published values only"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FigureError(f"cannot create --out {out} ({exc.strerror or exc})") from None

    labels = {c.workflow for cs in curves.curves.values() for c in cs}
    labels |= {w for p in figure.panels for w in p.workflows()}
    colours = rp.workflow_colours(labels)
    shown_cells = chosen[:max_rows]
    rows = comparison_rows(figure, curves, chosen) or published_rows(figure)
    md = _intro_lines(figure) + _runs_lines(figure, used, skipped, curves)
    try:
        with rp.staged_out(out, ours) as stage:
            png = stage / f"{figure.id}.png"
            pub_png = stage / f"{figure.id}_published.png"
            plot_figure(png, figure, curves, shown_cells, colours)
            has_pub_png = plot_published(pub_png, figure, colours)
            md += _figure_lines(figure, png, len(shown_cells), len(chosen))
            md += _comparison_lines(figure, curves, rows, _shown_keys(figure, curves, chosen))
            md += ["## Published values", ""] + _published_table(figure) + [""]
            if has_pub_png:
                md += [f"![{figure.id} published]({pub_png.name})", ""]
            md += _cardinality_lines(figure, curves)
            if used:
                md += _sample_lines(used, stage, {png.stem, pub_png.stem}, warn)
            text = "\n".join(md).rstrip() + "\n"
            html = markdown_to_html(text.splitlines(), f"{figure.id}: {figure.title}")
            atomic_write_text(stage / "report.html", html)
            atomic_write_text(stage / "report.md", text)
    except OSError as exc:
        raise FigureError(f"cannot write the figure into {out} ({exc.strerror or exc})") from None
    return out / "report.md"


def list_figures(published: str | Path | None = None) -> str:
    """The ``--list`` text: every figure id, its recipe and metric, and the commands that make its runs."""
    lines = []
    for fid, f in load_published(published).items():
        lines.append(f"{fid}  [{f.recipe}: {f.metric}]  {f.title}")
        p = f.produce
        made = [f"bash {p['script']}" if p.get("script") else "", f"wandb sweep {p['sweep']}" if p.get("sweep") else ""]
        lines.append("    runs: " + (" | ".join(m for m in made if m) or "no script or sweep yet; see 'one run'"))
        if p.get("command"):
            lines.append(f"    one run: {p['command']}")
        lines.append(f"    then: python -m tooling.figures {fid} RUN_DIR... --out runs/figures/{fid}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m tooling.figures``."""
    p = _Parser(
        prog="python -m tooling.figures", description="A paper figure from finished runs, next to the published values."
    )
    p.add_argument("figure", nargs="?", help="Figure id (see --list).")
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="Run dirs, or folders of run dirs.")
    p.add_argument("--out", metavar="DIR", help="Folder for the PNGs, report.md and report.html.")
    p.add_argument("--list", action="store_true", help="List the figure ids, their recipes and how to make the runs.")
    p.add_argument("--cells", action="append", metavar="P=V[,P=V]", help="Only settings matching these values.")
    p.add_argument("--max_rows", type=int, default=DEFAULT_MAX_ROWS, help="At most this many settings in the figure.")
    p.add_argument("--published", metavar="FILE", help="Another published-results file (default: the shipped one).")
    return p


def cli(argv: Sequence[str] | None = None) -> None:
    """Console entry point: exit 2 with one ``error:`` line on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.list:
            print(list_figures(args.published))
            return
        if not args.figure or not args.run_dirs or not args.out:
            parser.error("give FIGURE_ID, at least one RUN_DIR and --out DIR (or --list)")
        report = make_figure(args.figure, args.run_dirs, args.out, args.cells, args.max_rows, args.published)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    print(f"figure -> {report} (and report.html)")


if __name__ == "__main__":
    cli()
