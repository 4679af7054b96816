"""Plots and tables of one or many recipe runs: ``<run_dir>/config.yaml`` + ``<run_dir>/metrics.csv``.

    python -m tooling.report RUN_DIR [RUN_DIR ...] --out REPORT_DIR [--metrics m1,m2] [--log_y auto|true|false]
        [--cells 'dim=10,n_samples=100'] [--max_panels 25]

Runs of the same recipe are merged (more seeds, more cells, more workflows); different recipes get
separate sections. For every recipe and metric the report holds

* ``<out>/<recipe>_<metric>.png``: one panel per grid cell, x = generation, one line per workflow
  (the mean over seeds, shaded 95% confidence interval), the closed-form expectation of
  :func:`tooling.theory.theory_curve` dashed in the same colour where one is known;
* a table in ``<out>/report.md``: one row per (cell, workflow), the value at generation 0 and at the
  last generation (and the theory there) as mean ± half-width of the 95% confidence interval.

Training protocol: a run's ``config.yaml`` key ``steps_per_generation`` says how long each generation
trained. Absent or null (older runs too): a fixed number of epochs, so a growing (accumulate) training set
also gets more optimizer steps ("epochs per generation"); ``first``: every generation took generation 0's
optimizer steps ("fixed compute (steps of gen 0)"). Once any run of a recipe trained at fixed compute, the
recipe's cells get a ``protocol`` column, so the protocols are drawn in panels side by side. A run that trains
on real data alone (``mix(real=N, synthetic=0)``) is the real-only reference: its training set never grows,
so it is drawn (dash-dotted) in every protocol's panel of its setting, and listed once in the table.

The accumulate bound: Dey & Donoho show that under accumulate the test risk stays within pi^2/6 (about
1.645) of generation 0's. For the recipe's risk metric (:func:`tooling.theory.risk_metric`: the excess risk
of the analytic recipes, the test loss of the others) every accumulate curve gets
``<out>/<recipe>_<metric>_ratio.png``, the ratio of each generation's mean to generation 0's (over the
seeds that have both, with the ratio estimator's 95% interval) with the bound as a horizontal line, and a
table that says whether the curve stays within it, judged on the intervals (on single values, said so, with
one seed). Where the
runs record ``train_steps``, ``<out>/<recipe>_<metric>_vs_steps.png`` draws the metric against the
cumulative optimizer steps, the protocols in line styles, so compute is on an axis.

Recipes whose finished generations hold a picture of their synthetic samples (``gen_XXX/samples.png``,
the image recipes) also get ``<out>/samples_<recipe>.png``: one row per workflow (its run with the
smallest seed), one column per generation (at most 8, evenly spaced), and a "Samples" subsection
linking it. A picture that is absent or cannot be read is a "missing" panel, not an error.

Confidence intervals use the Student t quantile with n - 1 degrees of freedom (n = finite values at
that generation). Non-finite values (``inf``, ``nan``; e.g. the NLL of a singular Gaussian) are left
out of the means and counted in the table.

A run dir that cannot be read (missing, no metrics.csv yet, malformed CSV) is skipped with a one-line
warning; with no usable run dir at all the command prints one ``error:`` line and exits with status 2.

``--out`` is a new or empty folder, or one that holds an earlier report (rerunning into it is normal): the
report lists its files in ``<out>/.report.json``, replaces those, deletes the ones it no longer writes and
leaves every other file alone. A folder of other files, a file of the user's with a name the report writes,
and an empty ``--out`` are refused in one line; the report is written into a hidden folder inside ``--out``
first, so a refused report changes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import math
import os
import re
import shutil
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from numpy.lib.stride_tricks import sliding_window_view

from collapse.atomic import atomic_write_json, atomic_write_text, pid_alive
from collapse.errors import UserError, path_name_error
from collapse.rundir import CONFIG, EXECUTION_KEYS, METRICS, TAIL_COLUMNS, listed_names
from datamodules.workflows import WORKFLOW_NAMES, Workflow, WorkflowError
from tooling.theory import ACCUMULATE_BOUND, risk_metric, theory_curve

__all__ = [
    "axes_grid",
    "bound_verdict",
    "claim_out",
    "CONFIDENCE",
    "EPOCHS_PROTOCOL",
    "FIXED_PROTOCOL",
    "is_real_only",
    "PROTOCOL_COLUMN",
    "PROTOCOL_KEY",
    "protocol_label",
    "ratio_of_means",
    "DEFAULT_MAX_PANELS",
    "HIDDEN_CONFIG_KEYS",
    "POOLED_CONFIG_KEYS",
    "REPORT_RECORD",
    "REQUIRED_COLUMNS",
    "SAMPLES_PICTURE",
    "THEORY_CONFIG_KEYS",
    "RecipeData",
    "ReportError",
    "Run",
    "Series",
    "SeriesKey",
    "Summary",
    "build_parser",
    "cell_matches_filters",
    "cell_sort_key",
    "cell_title",
    "cli",
    "describe_contents",
    "finished_generations",
    "fmt",
    "format_value_cell",
    "load_run",
    "make_report",
    "md_escape",
    "merge_runs",
    "merge_tagged",
    "param_value",
    "parse_cell_filters",
    "read_metrics",
    "read_run_config",
    "run_seed",
    "run_workflow",
    "safe_theory_curve",
    "same_value",
    "samples_section",
    "single_value",
    "staged_out",
    "summarize",
    "t_quantile",
    "workflow_colours",
    "workflow_sort_key",
]

CONFIDENCE = 0.95
DEFAULT_MAX_PANELS = 25
REQUIRED_COLUMNS = ("workflow", *TAIL_COLUMNS)

# Config keys that the closed forms need but that are not grid columns of metrics.csv.
THEORY_CONFIG_KEYS: dict[str, tuple[str, ...]] = {"gaussian": ("sigma2",)}
HIDDEN_CONFIG_KEYS = EXECUTION_KEYS | {"recipe", "out_dir", "report"}
"""Config keys that say where and how a run was executed: left out of its summary, never a grid column."""
POOLED_CONFIG_KEYS = frozenset({"seed", "num_seeds", "workflow", "generations"})
"""Config keys in which runs of one experiment may differ and still be pooled (more seeds, more workflows)."""

PROTOCOL_KEY = "steps_per_generation"
"""The config.yaml key that says how long each generation trained (None or absent: its trainer's epochs)."""
PROTOCOL_COLUMN = "protocol"
"""The grid column that holds each run's protocol once any run of a recipe trained at fixed compute."""
EPOCHS_PROTOCOL = "epochs per generation"
FIXED_PROTOCOL = "fixed compute (steps of gen 0)"

REPORT_FILE = "report.md"
REPORT_RECORD = ".report.json"
"""Written beside ``report.md``: the files of the report in that folder. A later report may replace those (and
delete the ones it no longer writes); every other file in the folder is the user's and is never touched."""
_REPORT_TITLE = "# Model-collapse report"
_WRITER = "tooling.report"
_STAGE = re.compile(r"^\.report\.tmp-(\d+)$")  # a report being written, inside its --out
_LINKED_PNG = re.compile(r"\]\(([A-Za-z0-9_.=-]+\.png)\)")  # a picture report.md shows (names are _safe_name's)

_CHUNK_ROWS = 200_000
SAMPLES_PICTURE = "samples.png"
"""The picture of a generation's synthetic samples that image recipes write into each ``gen_XXX`` folder."""
_GEN_DIR = re.compile(r"^gen_(\d{3,})$")  # finished generations only: ``.gen_XXX.partial`` never matches
_SAMPLE_COLUMNS = 8  # generations per samples figure; more are thinned to evenly spaced ones
_LOG_SPAN = 100.0  # auto log-y when one panel's values span at least this factor
_FAMILY_COLOURS = {
    "replace": ("#d62728", "#f08080", "#8b0000", "#e9967a"),
    "accumulate": ("#1f77b4", "#6baed6", "#08306b", "#9ecae1"),
    "accumulate_subsample": ("#2ca02c", "#74c476", "#00441b", "#a1d99b"),
}
_REAL_ONLY_COLOUR = "#252525"
_PALETTE = (
    "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
    "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
)  # fmt: skip


class ReportError(UserError):
    """A run dir or report option that cannot be used; the message is one line."""


# ---- Student t quantile ------------------------------------------------------------------------


def _t_coverage(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (closed-form finite series, Abramowitz & Stegun 26.7)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2.0 / math.pi * (theta + s * total)
    term = total = 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def _bisect(f: Callable[[float], float], target: float) -> float:
    """The x >= 0 where the increasing function f reaches target."""
    lo, hi = 0.0, 1.0
    while f(hi) < target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


@cache
def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student t critical value: P(|T_df| <= t) = ``confidence`` (2.776 for df = 4 at 95%)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    df = int(df)
    if df <= 2000:
        return _bisect(lambda t: _t_coverage(t, df), confidence)
    # The series grows with df; beyond this the Cornish-Fisher expansion around the normal quantile
    # is exact to far more digits than a report shows.
    z = _bisect(lambda x: math.erf(x / math.sqrt(2.0)), confidence)
    z3, z5, z7, z9 = z**3, z**5, z**7, z**9
    return (
        z
        + (z3 + z) / (4 * df)
        + (5 * z5 + 16 * z3 + 3 * z) / (96 * df**2)
        + (3 * z7 + 19 * z5 + 17 * z3 - 15 * z) / (384 * df**3)
        + (79 * z9 + 776 * z7 + 1482 * z5 - 1920 * z3 - 945 * z) / (92160 * df**4)
    )


# ---- statistics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    """Per-generation statistics over seeds of one (metric, workflow, cell) series."""

    generations: np.ndarray
    """Generations present, sorted."""
    mean: np.ndarray
    """Mean of the finite values (nan where there are none)."""
    half_width: np.ndarray
    """Half-width of the confidence interval of the mean (nan where fewer than 2 finite values)."""
    n: np.ndarray
    """Finite values per generation."""
    nonfinite: np.ndarray
    """Values left out per generation because they are inf or nan."""
    n_seeds: int
    """Distinct seeds in the series."""


def summarize(
    seeds: np.ndarray, generations: np.ndarray, values: np.ndarray, confidence: float = CONFIDENCE
) -> Summary:
    """Mean and Student-t confidence half-width per generation; non-finite values are counted, not averaged."""
    gens, inv = np.unique(np.asarray(generations), return_inverse=True)
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    k = len(gens)
    n = np.bincount(inv, weights=finite, minlength=k).astype(np.int64)
    total = np.bincount(inv, minlength=k)
    with np.errstate(all="ignore"):  # empty generations and overflowing values give nan/inf, shown as such
        mean = np.bincount(inv, weights=np.where(finite, values, 0.0), minlength=k) / n
        dev = np.where(finite, values - mean[inv], 0.0)
        var = np.bincount(inv, weights=dev * dev, minlength=k) / (n - 1)
        tq = np.array([t_quantile(int(m) - 1, confidence) if m >= 2 else np.nan for m in n])
        half = tq * np.sqrt(var) / np.sqrt(n)
    mean = np.where(n > 0, mean, np.nan)
    half = np.where(n > 1, half, np.nan)
    return Summary(gens, mean, half, n, total - n, int(np.unique(seeds).size))


# ---- reading run dirs --------------------------------------------------------------------------

SeriesKey = tuple[str, str, tuple[str, ...]]  # (metric, workflow, grid cell values)
Series = tuple[np.ndarray, np.ndarray, np.ndarray]  # (seeds, generations, values)


@dataclass
class Run:
    """One readable run dir."""

    path: Path
    recipe: str
    config: dict[str, Any]
    grid: tuple[str, ...]
    series: dict[SeriesKey, Series]
    rows: int
    notes: list[str] = field(default_factory=list)


def describe_contents(path: Path, limit: int = 8) -> str:
    """A folder's entries for an error message: ``"it is empty"`` or ``"it holds a, b/, ... (+n more)"``.

    Shows at most ``limit`` names, hidden ones last, folders with a trailing ``/``; raises ``OSError`` when
    the folder cannot be listed.
    """
    entries = sorted(path.iterdir(), key=lambda p: (p.name.startswith("."), p.name))
    if not entries:
        return "it is empty"
    names = [p.name + ("/" if p.is_dir() else "") for p in entries[:limit]]
    more = f" (+{len(entries) - limit} more)" if len(entries) > limit else ""
    return "it holds " + ", ".join(names) + more


def read_run_config(path: Path) -> tuple[dict[str, Any], list[str]]:
    """A run dir's ``config.yaml`` as ``(mapping, notes)``; never raises.

    A missing, unreadable or non-mapping file gives ``{}`` and a note saying why the recipe is unknown;
    a mapping without a ``recipe`` key is returned with a note saying so.
    """
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        return {}, [f"no {CONFIG}, so the recipe is unknown"]
    try:
        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {}, [f"{CONFIG} is unreadable ({first}), so the recipe is unknown"]
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return {}, [f"{CONFIG} is not a mapping, so the recipe is unknown"]
    if not data.get("recipe"):
        return data, [f"{CONFIG} names no recipe"]
    return data, []


class _Codes(dict):
    """Dense integer ids for group keys, assigned in order of first appearance."""

    def __missing__(self, key):
        value = self[key] = len(self)
        return value


def _numbers(texts: Sequence[str], kind: str, column: str, first_row: int) -> np.ndarray:
    """Parse a column in one go; on failure name the first bad row (rows count from 1 after the header)."""
    dtype = np.int64 if kind == "int" else np.float64
    try:
        return np.array(texts, dtype=dtype)
    except (ValueError, OverflowError, TypeError):
        pass
    out = np.empty(len(texts), dtype=dtype)
    for i, text in enumerate(texts):
        try:
            if kind == "int":
                out[i] = int(text)
            elif text.strip():
                out[i] = float(text)
            else:
                out[i] = np.nan  # an empty value is a missing one: counted as non-finite, not fatal
        except (ValueError, OverflowError):
            what = "an integer" if kind == "int" else "a number"
            if kind == "int" and text.strip().lstrip("-").isdigit():
                what = "an integer in the 64-bit range"
            shown = text if len(text) <= 40 else text[:37] + "..."
            raise ReportError(f"{METRICS} data row {first_row + i}: {column} {shown!r} is not {what}") from None
    return out


def _header(path: Path) -> list[str]:
    """The validated header of a metrics.csv (raises :class:`ReportError` naming what is missing)."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh), None)
    if not header or not any(h.strip() for h in header):
        raise ReportError(f"{METRICS} is empty")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ReportError(
            f"{METRICS} lacks column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(header: {','.join(header)[:200]})"
        )
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise ReportError(f"{METRICS} repeats column {', '.join(dup)} in its header")
    return header


# A parsed file: the key (workflow, grid cell, metric) of each group code, and per-row arrays
# (group code, seed, generation, value).
_Parsed = tuple[list[tuple[str, tuple[str, ...], str]], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _read_rows(path: Path, header: list[str]) -> _Parsed:
    """The general reader: the csv module, streamed in chunks of rows turned into arrays."""
    grid = [h for h in header if h not in REQUIRED_COLUMNS]
    key_idx = [header.index("workflow"), *(header.index(g) for g in grid), header.index("metric")]
    seed_i, gen_i, value_i = (header.index(c) for c in ("seed", "generation", "value"))
    width = len(header)
    codes = _Codes()
    parts: list[tuple[np.ndarray, ...]] = []
    rows = 0
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        while True:
            chunk = list(islice(reader, _CHUNK_ROWS))
            if not chunk:
                break
            lengths = set(map(len, chunk))
            if 0 in lengths:  # blank lines carry no data
                chunk = [r for r in chunk if r]
                lengths.discard(0)
                if not chunk:
                    continue
            if lengths != {width}:
                i = next(i for i, r in enumerate(chunk) if len(r) != width)
                raise ReportError(
                    f"{METRICS} data row {rows + i + 1}: expected {width} fields ({','.join(header)}), "
                    f"got {len(chunk[i])}"
                )
            cols = list(zip(*chunk))
            keys = zip(*(cols[i] for i in key_idx))
            code = np.fromiter(map(codes.__getitem__, keys), dtype=np.int64, count=len(chunk))
            seeds = _numbers(cols[seed_i], "int", "seed", rows + 1)
            gens = _numbers(cols[gen_i], "int", "generation", rows + 1)
            if gens.size and gens.min() < 0:
                i = int(np.argmax(gens < 0))
                raise ReportError(f"{METRICS} data row {rows + i + 1}: generation {gens[i]} is negative")
            values = _numbers(cols[value_i], "float", "value", rows + 1)
            parts.append((code, seeds, gens, values))
            rows += len(chunk)
    keys = [(k[0], tuple(k[1:-1]), k[-1]) for k in codes]
    if not parts:
        return keys, *(np.empty(0, dtype=t) for t in (np.int64, np.int64, np.int64, np.float64))
    return keys, *(np.concatenate(c) for c in zip(*parts))


# ---- the fast reader: whole blocks of bytes parsed with NumPy ---------------------------------
#
# The recipes write the tail columns (seed, generation, metric, value) last and quote only labels
# in the leading columns, so each line splits at its last four commas. Everything is done on byte
# arrays; a file that does not fit these assumptions (blank lines, empty or unparsable numbers, a
# quote in the tail, a multi-line field) makes _read_blocks return None and the general reader,
# which also words the errors, reads it instead.

_BLOCK_BYTES = 1 << 22
_MAX_FIELD = 504  # longer labels or numbers go to the general reader
_HASH_WEIGHTS = np.random.default_rng(0x5EED).integers(1, 2**63, size=_MAX_FIELD // 8, dtype=np.uint64) | np.uint64(1)


def _field_matrix(buf: np.ndarray, lo: np.ndarray, length: np.ndarray, width: int, fill: int) -> np.ndarray:
    """Row i holds bytes [lo[i], lo[i] + length[i]) of ``buf`` padded with ``fill`` to ``width`` bytes.

    ``buf`` must extend at least ``width`` bytes past the last field (the caller pads it).
    """
    mat = sliding_window_view(buf, width)[lo]  # a contiguous copy, one row per line
    mat[np.arange(width) >= length[:, None]] = fill
    return mat


def _parse_numbers(buf: np.ndarray, lo: np.ndarray, hi: np.ndarray, dtype) -> np.ndarray | None:
    """The number in bytes [lo[i], hi[i]) of every line, or None if any field is empty or not a number."""
    length = hi - lo
    if (length <= 0).any() or length.max() >= _MAX_FIELD:
        return None
    if dtype == np.int64 and length.max() > 18:
        return None  # may not fit int64: np.fromstring would saturate it silently; the row reader names it
    if dtype == np.int64:
        # Non-negative integers (seeds, generations): decimal digits summed column by column.
        digits = _field_matrix(buf, lo, length, int(length.max()), 48).astype(np.int64) - 48
        if digits.min() >= 0 and digits.max() <= 9:
            out = np.zeros(len(lo), dtype=np.int64)
            for j in range(digits.shape[1]):
                out = np.where(j < length, out * 10 + digits[:, j], out)
            return out
    # Space-padded fixed-width rows: np.fromstring then reads whitespace-separated numbers in C.
    text = _field_matrix(buf, lo, length, int(length.max()) + 1, 32).tobytes().decode("ascii", errors="replace")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # older NumPy only warns on unparsed text
            out = np.fromstring(text, dtype=dtype, sep=" ")
    except (ValueError, DeprecationWarning):
        return None
    return out if out.size == len(lo) else None


def _segment_codes(buf: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, list[bytes]] | None:
    """Group lines by their bytes [lo[i], hi[i]): (group of each line, bytes of each group), or None."""
    length = hi - lo
    if (length <= 0).any() or length.max() > _MAX_FIELD:
        return None
    width = -(-int(length.max()) // 8) * 8
    mat = _field_matrix(buf, lo, length, width, 0)
    words = mat.view(np.uint64)
    h = (words * _HASH_WEIGHTS[: width // 8]).sum(axis=1, dtype=np.uint64)  # wraps mod 2**64
    h ^= length.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    inv, first = _first_seen(h)
    rep = first[inv]
    # A hash only proposes the groups; every line is compared byte for byte with its group's first line.
    if (length != length[rep]).any() or (mat != mat[rep]).any():
        return None
    return inv, [buf[lo[i] : hi[i]].tobytes() for i in first]


def _first_seen(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like np.unique(x, return_inverse=True), but groups numbered in order of first appearance.

    Returns ``(group of each element, index of each group's first element)``.
    """
    _, first, inv = np.unique(x, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[inv.reshape(-1)], first[order]


def _read_blocks(path: Path, header: list[str]) -> _Parsed | None:
    """The fast reader for files whose last columns are seed, generation, metric, value (see above)."""
    if tuple(header[-4:]) != TAIL_COLUMNS:
        return None
    width = len(header)
    wf_i = header.index("workflow")
    grid_idx = [i for i, h in enumerate(header[:-4]) if h != "workflow"]
    prefixes: dict[bytes, int] = {}
    prefix_keys: list[tuple[str, tuple[str, ...]]] = []
    metrics: dict[bytes, int] = {}
    combos: dict[tuple[int, int], int] = {}
    parts: list[tuple[np.ndarray, ...]] = []
    with open(path, "rb") as fh:
        if b'"' in fh.readline():
            return None
        carry = b""
        while True:
            block = fh.read(_BLOCK_BYTES)
            data = carry + block
            if block:
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
                if not data:
                    continue
            elif not data:
                break
            elif not data.endswith(b"\n"):
                data += b"\n"
            buf = np.frombuffer(data + bytes(_MAX_FIELD + 8), dtype=np.uint8)  # padded for _field_matrix
            ends = np.flatnonzero(buf[: len(data)] == 10)
            starts = np.concatenate([[0], ends[:-1] + 1])
            if (ends == starts).any():
                return None
            stop = ends - (buf[ends - 1] == 13)
            commas = np.flatnonzero(buf[: len(data)] == 44)
            last = np.searchsorted(commas, stop)
            count = last - np.searchsorted(commas, starts)
            if (count < width - 1).any():
                return None
            c1, c2, c3, c4 = (commas[last - k] for k in (1, 2, 3, 4))
            quotes = np.flatnonzero(buf[: len(data)] == 34)
            if quotes.size:
                if (quotes >= c4[np.searchsorted(ends, quotes)]).any():
                    return None
            elif (count != width - 1).any():
                return None
            seeds = _parse_numbers(buf, c4 + 1, c3, np.int64)
            gens = _parse_numbers(buf, c3 + 1, c2, np.int64)
            values = _parse_numbers(buf, c1 + 1, stop, np.float64)
            if seeds is None or gens is None or values is None or (gens < 0).any():
                return None
            pre = _segment_codes(buf, starts, c4)
            met = _segment_codes(buf, c2 + 1, c1)
            if pre is None or met is None:
                return None
            pid = np.empty(len(pre[1]), dtype=np.int64)
            for j, raw in enumerate(pre[1]):
                if raw not in prefixes:
                    try:
                        fields = next(csv.reader([raw.decode("utf-8")]))
                    except (UnicodeDecodeError, csv.Error, StopIteration):
                        return None
                    if len(fields) != width - 4:
                        return None
                    prefixes[raw] = len(prefix_keys)
                    prefix_keys.append((fields[wf_i], tuple(fields[i] for i in grid_idx)))
                pid[j] = prefixes[raw]
            mid = np.empty(len(met[1]), dtype=np.int64)
            for j, raw in enumerate(met[1]):
                if raw not in metrics:
                    if b'"' in raw:
                        return None
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError:
                        return None
                    metrics[raw] = len(metrics)
                mid[j] = metrics[raw]
            pair_p, pair_m = pid[pre[0]], mid[met[0]]
            inv, first = _first_seen(pair_p * (1 << 31) + pair_m)
            lut = np.array([combos.setdefault((int(pair_p[i]), int(pair_m[i])), len(combos)) for i in first])
            parts.append((lut[inv], seeds, gens, values))
            if not block:
                break
    names = {v: k.decode("utf-8") for k, v in metrics.items()}
    keys = [(*prefix_keys[p], names[m]) for (p, m) in combos]
    if not parts:
        return keys, *(np.empty(0, dtype=t) for t in (np.int64, np.int64, np.int64, np.float64))
    return keys, *(np.concatenate(c) for c in zip(*parts))


def read_metrics(path: str | Path) -> tuple[tuple[str, ...], dict[SeriesKey, Series], int]:
    """Read a tidy metrics.csv into per-(metric, workflow, cell) arrays.

    Returns ``(grid column names, series, data rows)``. The file is read in blocks turned into
    arrays, so memory holds numbers, not rows. Raises :class:`ReportError` (one line) on a
    malformed file.
    """
    path = Path(path)
    gc_was_on = gc.isenabled()
    gc.disable()  # millions of short-lived row objects would trigger collections that find nothing
    try:
        header = _header(path)
        parsed = _read_blocks(path, header) or _read_rows(path, header)
    except UnicodeDecodeError:
        raise ReportError(f"{METRICS} is not UTF-8 text") from None
    except csv.Error as exc:
        raise ReportError(f"{METRICS} is not valid CSV ({exc})") from None
    except OSError as exc:
        raise ReportError(f"cannot read {METRICS} ({exc.strerror or exc})") from None
    finally:
        if gc_was_on:
            gc.enable()
    keys, code, seeds, gens, values = parsed
    if not code.size:
        raise ReportError(f"{METRICS} has a header but no rows (unfinished run?)")
    order = np.argsort(code, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(code, minlength=len(keys)))])
    series: dict[SeriesKey, Series] = {}
    for i, (workflow, cell, metric) in enumerate(keys):
        sel = order[bounds[i] : bounds[i + 1]]
        series[(metric, workflow, cell)] = (seeds[sel], gens[sel], values[sel])
    grid = tuple(h for h in header if h not in REQUIRED_COLUMNS)
    return grid, series, int(code.size)


def load_run(run_dir: str | Path) -> Run:
    """Read one run dir; raise :class:`ReportError` with a one-line reason when it cannot be used."""
    path = Path(run_dir)
    if not path.exists():
        raise ReportError(f"{path}: no such directory")
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    if not (path / METRICS).is_file():
        try:
            held = describe_contents(path)
        except OSError as exc:
            held = f"its contents cannot be listed ({exc.strerror or exc})"
        raise ReportError(f"{path}: no {METRICS} (unfinished run?); {held}")
    config, notes = read_run_config(path)
    try:
        grid, series, rows = read_metrics(path / METRICS)
    except ReportError as exc:
        raise ReportError(f"{path}: {exc}") from None
    return Run(path, str(config.get("recipe") or "unknown"), config, grid, series, rows, notes)


# ---- training protocol and the real-only reference ----------------------------------------------


def protocol_label(value: Any) -> str:
    """The protocol a ``steps_per_generation`` value names: None (or absent) the epochs, ``first`` generation 0's
    step count, an integer S that many steps every generation."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return EPOCHS_PROTOCOL
    if isinstance(value, str) and value.strip().lower() == "first":
        return FIXED_PROTOCOL
    if isinstance(value, bool):
        return f"{PROTOCOL_KEY}={value}"
    try:
        return f"fixed compute ({int(value)} steps)"
    except (TypeError, ValueError):
        return f"{PROTOCOL_KEY}={value}"


def is_real_only(label: str) -> bool:
    """Whether a workflow label trains on real data alone every generation (``mix(real=N, synthetic=0)``)."""
    try:
        wf = Workflow.parse(label)
    except WorkflowError:
        return False
    return wf.name == "mix" and wf.params.get("synthetic") == 0


def _config_text(config: dict[str, Any], key: str) -> str:
    """A config value as a grid value: the protocol label for the protocol column, else the value as text."""
    if key == PROTOCOL_COLUMN and PROTOCOL_COLUMN not in config:
        return protocol_label(config.get(PROTOCOL_KEY))
    value = config.get(key)
    return "" if value is None else str(value)


# ---- merging runs of one recipe ----------------------------------------------------------------


@dataclass
class RecipeData:
    """All usable runs of one recipe, merged: the union of their cells, workflows and seeds."""

    recipe: str
    runs: list[Run]
    grid: tuple[str, ...]
    common: dict[str, Any]
    """Config values the closed forms need, equal in every run (e.g. the Gaussian's sigma2)."""
    series: dict[SeriesKey, Series]
    notes: list[str] = field(default_factory=list)


def single_value(value: Any) -> Any:
    """A config value as one value: a one-item list or tuple gives its item, a longer (or empty) one None."""
    if isinstance(value, (list, tuple)):
        return value[0] if len(value) == 1 else None
    return value


def merge_tagged(
    tagged: Sequence[tuple[tuple[np.ndarray, np.ndarray, np.ndarray], Any]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Concatenate ``((seeds, gens, values), code)`` pieces of one series, keeping one row per (code, seed, gen).

    ``code`` tags the runs whose rows may repeat (same seed settings); the first occurrence of a row is
    kept. Returns the merged ``seeds, gens, values`` and how many repeated rows were dropped.
    """
    arrs = [a for a, _ in tagged]
    seeds, gens, values = (np.concatenate(a) for a in zip(*arrs)) if len(arrs) > 1 else arrs[0]
    code = np.concatenate([np.full(len(a[0]), c) for a, c in tagged])
    order = np.lexsort((gens, seeds, code))  # stable: the first occurrence of a row comes first
    s, g, c = seeds[order], gens[order], code[order]
    dup = np.zeros(len(order), dtype=bool)
    dup[1:] = (s[1:] == s[:-1]) & (g[1:] == g[:-1]) & (c[1:] == c[:-1])
    if not dup.any():
        return seeds, gens, values, 0
    keep = np.sort(order[~dup])
    return seeds[keep], gens[keep], values[keep], int(dup.sum())


def merge_runs(runs: Sequence[Run]) -> list[RecipeData]:
    """Group runs by recipe (in order of first appearance) and merge each group's series.

    Runs that differ only in seeds, workflows, generations or grid values are one experiment and
    are pooled. A config value that differs otherwise (e.g. ``n_test``) becomes an extra grid column,
    so that different experiments never share a cell. A (workflow, cell, seed, generation, metric)
    seen twice (the same seeds run twice) is kept once, from the first run that has it, so that
    repeated runs do not shrink the confidence intervals.
    """
    by_recipe: dict[str, list[Run]] = {}
    for run in runs:
        by_recipe.setdefault(run.recipe, []).append(run)
    out = []
    for recipe, group in by_recipe.items():
        grid: list[str] = []
        for run in group:
            grid += [g for g in run.grid if g not in grid]
        common: dict[str, Any] = {}
        extra: list[dict[str, str]] = [{} for _ in group]
        split: list[str] = []
        keys = list(dict.fromkeys(k for run in group for k in run.config))
        for key in keys:
            if key in HIDDEN_CONFIG_KEYS or key in POOLED_CONFIG_KEYS or key in grid or key == PROTOCOL_KEY:
                continue
            vals = [run.config.get(key) for run in group]
            if all(v == vals[0] for v in vals):
                if key in THEORY_CONFIG_KEYS.get(recipe, ()) and single_value(vals[0]) is not None:
                    common[key] = single_value(vals[0])  # the closed forms need it, e.g. the Gaussian's sigma2
                continue
            grid.append(key)
            split.append(key)
            for e, v in zip(extra, vals):
                e[key] = "" if v is None else str(v)
        # The protocol is a column of its own, labelled, once any run trained at fixed compute; older runs
        # (no key) and runs without the flag trained for their epochs.
        if PROTOCOL_COLUMN not in grid and any(run.config.get(PROTOCOL_KEY) is not None for run in group):
            grid.append(PROTOCOL_COLUMN)
            split.append(PROTOCOL_COLUMN)
            for run, e in zip(group, extra):
                e[PROTOCOL_COLUMN] = protocol_label(run.config.get(PROTOCOL_KEY))
        # A seed label names a replicate only within one random stream: the analytic recipes draw all
        # seeds of a run from one stream set by (--seed, --num_seeds). Rows repeat only if that matches.
        streams: dict[tuple[str, str], int] = {}
        pieces: dict[SeriesKey, list[tuple[Series, int]]] = {}
        for run, ext in zip(group, extra):
            stream = streams.setdefault((str(run.config.get("seed")), str(run.config.get("num_seeds"))), len(streams))
            pos = {g: i for i, g in enumerate(run.grid)}
            for (metric, workflow, cell), arrays in run.series.items():
                full = tuple(cell[pos[g]] if g in pos else ext.get(g, "") for g in grid)
                pieces.setdefault((metric, workflow, full), []).append((arrays, stream))
        series: dict[SeriesKey, Series] = {}
        dropped = 0
        for key, tagged in pieces.items():
            seeds, gens, values, repeated = merge_tagged(tagged)
            dropped += repeated
            series[key] = (seeds, gens, values)
        notes = []
        if split:
            notes.append(f"the runs differ in {', '.join(split)}; each value gets its own cells")
        if dropped:
            notes.append(
                f"{dropped} rows repeat a (workflow, cell, seed, generation, metric) of a run with the same "
                "--seed and --num_seeds; only the first was kept"
            )
        out.append(RecipeData(recipe, list(group), tuple(grid), common, series, notes))
    return out


# ---- ordering, labels, formatting --------------------------------------------------------------


def _sort_value(text: str) -> tuple:
    if text == "":
        return (2, 0.0, "")
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def cell_sort_key(cell: tuple[str, ...]) -> tuple:
    """Sort key of a grid cell: numbers by value before text, empty values last, column by column."""
    return tuple(_sort_value(v) for v in cell)


def _natural(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def _workflow_name(label: str) -> str:
    return label.split("(", 1)[0].strip()


def workflow_sort_key(label: str) -> tuple:
    """Sort key of a workflow label: the order of ``WORKFLOW_NAMES``, then the plain name before its
    parametrised labels, which sort with their numbers by value (``mix(real=2)`` before ``mix(real=10)``)."""
    name = _workflow_name(label)
    rank = WORKFLOW_NAMES.index(name) if name in WORKFLOW_NAMES else len(WORKFLOW_NAMES)
    return (rank, name, label != name, _natural(label))


def workflow_colours(labels: Iterable[str]) -> dict[str, str]:
    """One colour per workflow label: replace reds, accumulate blues, accumulate_subsample greens, real data alone
    (``mix(real=N, synthetic=0)``) near-black, others a palette."""
    colours: dict[str, str] = {}
    used = {name: 0 for name in _FAMILY_COLOURS}
    rest = 0
    for label in sorted(set(labels), key=workflow_sort_key):
        if is_real_only(label):
            colours[label] = _REAL_ONLY_COLOUR
            continue
        name = _workflow_name(label)
        family = _FAMILY_COLOURS.get(name, ())
        if used.get(name, len(family)) < len(family):
            colours[label] = family[used[name]]
            used[name] += 1
        else:
            colours[label] = _PALETTE[rest % len(_PALETTE)]
            rest += 1
    return colours


def param_value(text: str) -> int | float | str:
    """A grid value from the CSV as a number where it is one (``"10"`` -> 10, ``"1.0"`` -> 1.0)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def fmt(x: float, digits: int = 4) -> str:
    """Compact number with ``digits`` significant digits: plain from 1e-3 to 1e6, else ``1.23e-5``."""
    if x is None or not math.isfinite(x):
        return "nan" if x is None or math.isnan(x) else ("inf" if x > 0 else "-inf")
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if -3 <= mag < 6:
        decimals = digits - 1 - mag
        text = f"{round(x, decimals):.{max(0, decimals)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    mant, exp = f"{x:.{digits - 1}e}".split("e")
    mant = mant.rstrip("0").rstrip(".") if "." in mant else mant
    return f"{mant}e{int(exp)}"


def cell_title(grid: Sequence[str], cell: Sequence[str], only: Sequence[int] | None = None) -> str:
    """``"dim=10, n_samples=100"`` for a cell of ``grid`` (``-`` for an empty value); ``only`` picks the columns."""
    idx = range(len(grid)) if only is None else only
    return ", ".join(f"{grid[i]}={cell[i] or '-'}" for i in idx)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "metric"


def md_escape(text: str) -> str:
    """``text`` (any value, as ``str``) safe inside a markdown table cell: ``|`` escaped."""
    return str(text).replace("|", "\\|")


def _unique_name(name: str, used: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``, ... when taken; the result is added to ``used``."""
    base, k = name, 2
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name


# ---- filters -----------------------------------------------------------------------------------


def parse_cell_filters(specs: Sequence[str] | str | None) -> list[dict[str, str]]:
    """``["dim=10,n_samples=100", "dim=1"]`` -> a list of {param: value}; a cell is kept if it matches any."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    filters = []
    for spec in specs:
        f: dict[str, str] = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise ReportError(f"--cells {spec!r}: write param=value[,param=value...], e.g. 'dim=10,n_samples=100'")
            f[key.strip()] = value.strip()
        filters.append(f)
    return filters


def same_value(a: str, b: str) -> bool:
    """Whether two grid values are equal as text or as numbers (``"10"`` and ``"10.0"`` are the same)."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def cell_matches_filters(grid: Sequence[str], cell: Sequence[str], filters: list[dict[str, str]]) -> bool:
    """Whether a cell of ``grid`` matches any of ``filters`` (from :func:`parse_cell_filters`); True without filters.

    A filter matches when the cell has every parameter it names with the same value (see :func:`same_value`).
    """
    if not filters:
        return True
    values = dict(zip(grid, cell))
    return any(all(k in values and same_value(values[k], v) for k, v in f.items()) for f in filters)


def _metric_list(metrics: Sequence[str] | str | None) -> list[str] | None:
    if metrics is None:
        return None
    items = [metrics] if isinstance(metrics, str) else list(metrics)
    out = [m.strip() for item in items for m in item.split(",") if m.strip()]
    return out or None


def _log_y_mode(log_y: str | bool) -> str:
    if isinstance(log_y, bool):
        return "true" if log_y else "false"
    mode = str(log_y).strip().lower()
    if mode not in ("auto", "true", "false"):
        raise ReportError(f"--log_y must be auto, true or false, got {log_y!r}")
    return mode


# ---- one recipe section ------------------------------------------------------------------------


@dataclass
class _Line:
    workflow: str
    summary: Summary
    theory: np.ndarray | None
    reference: bool = False
    """A real-only run drawn in another protocol's panel of its setting; left out of that panel's table rows."""
    series: Series | None = None
    """The per-seed values behind ``summary``."""


def _line_style(workflow: str) -> str:
    return "-." if is_real_only(workflow) else "-"


def _legend_label(workflow: str) -> str:
    return f"{workflow}: real data only" if is_real_only(workflow) else workflow


def safe_theory_curve(
    recipe: str, metric: str, workflow: str, params: dict[str, Any], gens: np.ndarray
) -> np.ndarray | None:
    """The closed form of :func:`tooling.theory.theory_curve` at generations ``gens``, as floats of ``gens``' shape.

    None where there is none: no closed form for the (recipe, metric, workflow), parameters the cell
    lacks, or no finite value at all.
    """
    try:
        curve = theory_curve(recipe, metric, workflow, params, gens)
    except (UserError, KeyError, ValueError, TypeError, ZeroDivisionError, OverflowError):
        return None  # an unknown workflow or a cell without the needed parameters has no closed form
    if curve is None:
        return None
    with np.errstate(all="ignore"):
        curve = np.broadcast_to(np.asarray(curve, dtype=np.float64), gens.shape).copy()
    return curve if np.isfinite(curve).any() else None


def _layout(grid: Sequence[str], cells: Sequence[tuple[str, ...]]) -> tuple[int, int, list[tuple[int, int]], list[int]]:
    """Panel positions: rows by the first varying parameter, columns by the others, else wrapped in reading order.

    Returns ``(rows, cols, position of each cell, indices of the varying parameters)``.
    """
    varying = [i for i in range(len(grid)) if len({c[i] for c in cells}) > 1]
    n = len(cells)
    if len(varying) >= 2:
        r, rest = varying[0], varying[1:]
        row_vals = sorted({c[r] for c in cells}, key=_sort_value)
        col_vals = sorted({tuple(c[i] for i in rest) for c in cells}, key=cell_sort_key)
        if len(row_vals) <= 8 and len(col_vals) <= 8 and len(row_vals) * len(col_vals) <= 2 * n:
            pos = [(row_vals.index(c[r]), col_vals.index(tuple(c[i] for i in rest))) for c in cells]
            return len(row_vals), len(col_vals), pos, varying
    cols = min(n, max(1, math.ceil(math.sqrt(n * 1.5))))
    rows = math.ceil(n / cols)
    return rows, cols, [(i // cols, i % cols) for i in range(n)], varying


def _want_log(panels: Sequence[Sequence[_Line]]) -> bool:
    span = 1.0
    for lines in panels:
        vals = [ln.summary.mean for ln in lines] + [ln.theory for ln in lines if ln.theory is not None]
        v = np.concatenate(vals) if vals else np.empty(0)
        v = v[np.isfinite(v)]
        if v.size == 0:
            continue
        if v.min() <= 0:
            return False
        span = max(span, float(v.max() / v.min()))
    return span >= _LOG_SPAN


def axes_grid(
    rows: int,
    cols: int,
    panel: tuple[float, float],
    margins: tuple[float, float, float, float],
    wspace: float,
    hspace: float,
) -> tuple[Any, Any]:
    """A ``rows`` x ``cols`` grid of axes of ``panel`` (width, height) inches, ``margins`` (top, bottom, left,
    right) in inches; returns ``(figure, axes)`` with ``axes`` shaped ``(rows, cols)``.

    A bare Figure on the Agg canvas: no pyplot, so no global backend is switched and nothing is shown. The
    margins are laid out by hand: a layout engine measures every tick label and costs seconds on a large grid.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top, bottom, left, right = margins
    width, height = left + right + panel[0] * cols, top + bottom + panel[1] * rows
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=wspace,
        hspace=hspace,
    )
    return fig, axes


def _plot(
    path: Path,
    recipe: str,
    metric: str,
    grid: Sequence[str],
    cells: Sequence[tuple[str, ...]],
    panels: Sequence[Sequence[_Line]],
    colours: dict[str, str],
    log_y: str,
    note: str,
) -> None:
    """One figure: a panel per cell, a line per workflow, the CI shaded, theory dashed."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    rows, cols, pos, varying = _layout(grid, cells)
    use_log = log_y == "true" or (log_y == "auto" and _want_log(panels))
    workflows = sorted({ln.workflow for lines in panels for ln in lines}, key=workflow_sort_key)
    any_theory = any(ln.theory is not None for lines in panels for ln in lines)
    handles = [
        Line2D([], [], color=colours[wf], lw=1.6, ls=_line_style(wf), label=_legend_label(wf)) for wf in workflows
    ]
    handles.append(Patch(color="0.5", alpha=0.3, label=f"{CONFIDENCE:.0%} CI"))
    if any_theory:
        handles.append(Line2D([], [], color="0.3", lw=1.2, ls="--", label="theory"))
    legend_cols = max(1, min(len(handles), 2 * cols, 4))
    legend_rows = math.ceil(len(handles) / legend_cols)

    # Margins in inches, laid out by hand: a layout engine measures every tick label and costs
    # seconds on a 25-panel figure.
    top, bottom, left, right = 0.55 + (0.22 if note else 0.0), 0.5 + 0.22 * legend_rows, 0.8, 0.15
    fig, axes = axes_grid(rows, cols, (3.0, 2.35), (top, bottom, left, right), wspace=0.38, hspace=0.5)
    width, height = fig.get_size_inches()
    used = set(pos)
    for r in range(rows):
        for c in range(cols):
            if (r, c) not in used:
                axes[r][c].set_visible(False)
    g_min = min(int(ln.summary.generations[0]) for lines in panels for ln in lines)
    g_max = max(int(ln.summary.generations[-1]) for lines in panels for ln in lines)
    for cell, (r, c), lines in zip(cells, pos, panels):
        ax = axes[r][c]
        for line in lines:
            colour = colours[line.workflow]
            s = line.summary
            marker = "." if len(s.generations) <= 30 else None
            ax.plot(s.generations, s.mean, color=colour, lw=1.4, ls=_line_style(line.workflow), marker=marker, ms=4)
            ax.fill_between(s.generations, s.mean - s.half_width, s.mean + s.half_width, color=colour, alpha=0.18, lw=0)
            if line.theory is not None:
                ax.plot(s.generations, line.theory, color=colour, lw=1.2, ls="--")
        finite = [ln.summary.mean[np.isfinite(ln.summary.mean)] for ln in lines]
        if not any(v.size for v in finite):
            # Every value non-finite (e.g. the NLL of a singular Gaussian): say so, keep a linear axis.
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes, fontsize=8)
        elif use_log:
            ax.set_yscale("log")
        ax.set_xlim(g_min - 0.02 * max(1, g_max - g_min), g_max + 0.02 * max(1, g_max - g_min))
        # An explicit y skips the per-draw search for a title position clear of the tick labels.
        ax.set_title(cell_title(grid, cell, varying) if varying else "", fontsize=9, y=1.0, pad=4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, lw=0.5)
        if r == rows - 1 or (r + 1, c) not in used:
            ax.set_xlabel("generation", fontsize=9)
        if c == 0 or (r, c - 1) not in used:
            ax.set_ylabel(metric, fontsize=9)
    constant = [i for i in range(len(grid)) if i not in varying]
    heading = f"{recipe}: {metric}"
    if constant and cells:
        heading += f" ({cell_title(grid, cells[0], constant)})"
    if use_log:
        heading += ", log scale"
    if note:
        heading += f"\n{note}"
    fig.suptitle(heading, fontsize=11, y=1 - 0.08 / height, va="top")
    fig.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.02 / height),
        ncols=legend_cols,
        fontsize=8,
        frameon=False,
    )
    fig.savefig(path, format="png")


def _config_summary(config: dict[str, Any], limit: int = 6) -> str:
    parts = []
    for key, value in config.items():
        if key in HIDDEN_CONFIG_KEYS or isinstance(value, dict):
            continue
        if isinstance(value, (list, tuple)):
            shown = ", ".join(str(v) for v in value[:limit])
            more = f", … (+{len(value) - limit})" if len(value) > limit else ""
            text = f"[{shown}{more}]"
        else:
            text = str(value)
        parts.append(f"{key}={text if len(text) <= 160 else text[:159] + '…'}")
    return "; ".join(parts) or "no config"


def format_value_cell(s: Summary, i: int) -> str:
    """``mean ± half-width`` at generation index i, noting values left out and a seed count below the row's."""
    n, bad = int(s.n[i]), int(s.nonfinite[i])
    if n == 0:
        return f"— (all {bad} non-finite)" if bad else "—"
    if n == 1 or not math.isfinite(float(s.half_width[i])):
        text = fmt(float(s.mean[i]))
    else:
        text = f"{fmt(float(s.mean[i]))} ± {fmt(float(s.half_width[i]), 2)}"
    if bad:
        return f"{text} (n={n}, {bad} non-finite excluded)"
    return f"{text} (n={n})" if n != s.n_seeds else text


def _table(grid: Sequence[str], rows: Sequence[tuple[tuple[str, ...], _Line]]) -> list[str]:
    """A markdown table: one row per (cell, workflow), first and last generation, theory, seeds."""
    firsts = {int(line.summary.generations[0]) for _, line in rows}
    lasts = {int(line.summary.generations[-1]) for _, line in rows}
    # Merged runs may stop at different generations; then each value says which generation it is.
    first_label = f"gen {min(firsts)}" if len(firsts) == 1 else "first gen"
    last_label = f"gen {max(lasts)}" if len(lasts) == 1 else "last gen"
    one_gen = all(len(line.summary.generations) == 1 for _, line in rows)
    has_theory = any(line.theory is not None and math.isfinite(line.theory[-1]) for _, line in rows)
    head = [*grid, "workflow", first_label]
    if not one_gen:
        head.append(last_label)
    if has_theory:
        head.append(f"theory ({last_label})")
    head.append("seeds")
    align = ["---"] * (len(grid) + 1) + ["---:"] * (len(head) - len(grid) - 1)
    out = ["| " + " | ".join(md_escape(h) for h in head) + " |", "|" + "|".join(align) + "|"]
    for cell, line in rows:
        s = line.summary
        vals = [*(v or "-" for v in cell), line.workflow]
        vals.append(format_value_cell(s, 0) + (f" @{int(s.generations[0])}" if len(firsts) > 1 else ""))
        if not one_gen:
            vals.append(
                format_value_cell(s, len(s.generations) - 1) + (f" @{int(s.generations[-1])}" if len(lasts) > 1 else "")
            )
        if has_theory:
            t = float(line.theory[-1]) if line.theory is not None else math.nan
            vals.append(fmt(t) if math.isfinite(t) else "")
        vals.append(str(s.n_seeds))
        out.append("| " + " | ".join(md_escape(v) for v in vals) + " |")
    return out


def _section(
    data: RecipeData,
    out_dir: Path,
    metrics: list[str] | None,
    filters: list[dict[str, str]],
    log_y: str,
    max_panels: int,
    used_names: set[str],
    samples: Sequence[str] = (),
) -> list[str]:
    """Markdown lines of one recipe's section; writes its figures into ``out_dir``.

    ``samples`` are the lines of the recipe's "Samples" subsection (see :func:`samples_section`),
    placed before the metrics.
    """
    lines = [f"## {md_escape(data.recipe)}", "", "Run dirs:", ""]
    for run in data.runs:
        lines.append(f"- `{run.path}` ({run.rows:,} rows): {md_escape(_config_summary(run.config))}")
    notes = [f"`{run.path}`: {n}" for run in data.runs for n in run.notes] + data.notes
    if data.common:
        notes.append("theory uses " + ", ".join(f"{k}={v}" for k, v in data.common.items()) + " from config.yaml")
    lines.append("")
    lines += [f"Note: {md_escape(n)}" for n in notes] + ([""] if notes else [])
    lines += samples

    present = list(dict.fromkeys(m for m, _, _ in data.series))
    if metrics is None:
        chosen = present
    else:
        chosen = [m for m in metrics if m in present]
        absent = [m for m in metrics if m not in present]
        if absent:
            lines += [f"Not in these runs: {', '.join(absent)} (available: {', '.join(present)}).", ""]
    grid = data.grid
    all_cells = sorted({c for _, _, c in data.series}, key=cell_sort_key)
    cells = [c for c in all_cells if cell_matches_filters(grid, c, filters)]
    if not cells:
        lines += [f"No cell matches --cells (cells look like: {cell_title(grid, all_cells[0])}).", ""]
        return lines
    colours = workflow_colours(w for _, w, _ in data.series)
    index: dict[tuple[str, tuple[str, ...]], list[tuple[str, Series]]] = {}
    for (m, wf, c), arrays in data.series.items():
        index.setdefault((m, c), []).append((wf, arrays))
    for metric in chosen:
        per_cell: list[list[_Line]] = []
        for cell in cells:
            # Theory parameters: the cell's grid values as numbers plus the recipe's common config values.
            params = dict(data.common)
            params.update({g: param_value(v) for g, v in zip(grid, cell) if v != ""})
            row = []
            for wf, (seeds, gens, values) in index.get((metric, cell), []):
                s = summarize(seeds, gens, values)
                theory = safe_theory_curve(data.recipe, metric, wf, params, s.generations)
                row.append(_Line(wf, s, theory, series=(seeds, gens, values)))
            per_cell.append(row)
        _add_references(grid, cells, per_cell)
        per_cell = [sorted(row, key=lambda ln: workflow_sort_key(ln.workflow)) for row in per_cell]
        kept = [(c, p) for c, p in zip(cells, per_cell) if any(not ln.reference for ln in p)]
        if not kept:
            continue
        shown = kept[:max_panels]
        note = ""
        if len(kept) > len(shown):
            note = f"showing {len(shown)} of {len(kept)} cells; choose others with --cells"
        png = out_dir / f"{_unique_name(_safe_name(f'{data.recipe}_{metric}'), used_names)}.png"
        _plot(png, data.recipe, metric, grid, [c for c, _ in shown], [p for _, p in shown], colours, log_y, note)
        lines += [f"### {md_escape(metric)}", "", f"![{md_escape(data.recipe)} {md_escape(metric)}]({png.name})", ""]
        if note:
            lines += [f"The figure is {note}; the table lists every cell.", ""]
        lines += _table(grid, [(c, ln) for c, p in kept for ln in p if not ln.reference]) + [""]
        if metric == risk_metric(data.recipe)[0]:
            lines += _bound_section(data, out_dir, metric, grid, kept, colours, used_names)
            lines += _steps_section(data, out_dir, metric, grid, kept, index, colours, used_names)
    return lines


def _add_references(grid: Sequence[str], cells: Sequence[tuple[str, ...]], per_cell: list[list[_Line]]) -> None:
    """Draw each real-only run in every protocol's panel of its setting: its training set never grows, so
    the protocols train it alike. Adds ``reference`` lines to ``per_cell`` in place."""
    if PROTOCOL_COLUMN not in grid:
        return
    i = list(grid).index(PROTOCOL_COLUMN)
    refs: dict[tuple[str, ...], list[_Line]] = {}
    for cell, row in zip(cells, per_cell):
        for line in row:
            if is_real_only(line.workflow) and not line.reference:
                refs.setdefault(cell[:i] + cell[i + 1 :], []).append(line)
    for cell, row in zip(cells, per_cell):
        have = {line.workflow for line in row}
        for line in refs.get(cell[:i] + cell[i + 1 :], []):
            if line.workflow not in have:
                row.append(_Line(line.workflow, line.summary, None, reference=True, series=line.series))
                have.add(line.workflow)


# ---- the accumulate bound (Dey & Donoho) ---------------------------------------------------------


def ratio_of_means(
    seeds: np.ndarray,
    generations: np.ndarray,
    values: np.ndarray,
    floor: float | None = None,
    confidence: float = CONFIDENCE,
) -> Summary:
    """Each generation's mean ``value - floor`` over the mean at the first generation, over the seeds that have
    finite values at both, with the ratio estimator's Student-t interval.

    The ratio of the means, not the mean of per-seed ratios: the bound is on expected risks, and a seed whose
    generation-0 risk happens to be small would inflate a per-seed ratio (E[X/Y] > E[X]/E[Y]). With R = sum
    x_g / sum x_0 over the n paired seeds, Var(R) ~ Var(x_g - R x_0) / (n mean(x_0)^2) (the delta method).
    The first generation is the series' smallest; ``floor`` None is 0 (the ratio of the values themselves).
    """
    seeds, gens = np.asarray(seeds), np.asarray(generations)
    values = np.asarray(values, dtype=np.float64) - (0.0 if floor is None else float(floor))
    if not gens.size:
        empty = np.empty(0)
        return Summary(gens, empty, empty, empty.astype(np.int64), empty.astype(np.int64), 0)
    first = gens == gens.min()
    base = {int(sd): float(v) for sd, v in zip(seeds[first], values[first]) if math.isfinite(v)}
    out_gens = np.unique(gens)
    mean, half = np.full(len(out_gens), np.nan), np.full(len(out_gens), np.nan)
    n, bad = np.zeros(len(out_gens), dtype=np.int64), np.zeros(len(out_gens), dtype=np.int64)
    for k, g in enumerate(out_gens):
        at = gens == g
        pairs = [(v, base[int(sd)]) for sd, v in zip(seeds[at], values[at]) if int(sd) in base]
        x = np.array([p[0] for p in pairs], dtype=np.float64)
        x0 = np.array([p[1] for p in pairs], dtype=np.float64)
        ok = np.isfinite(x)
        bad[k] = int(at.sum() - ok.sum())
        x, x0 = x[ok], x0[ok]
        n[k] = x.size
        if not x.size or x0.mean() == 0:
            continue
        r = x.mean() / x0.mean()
        mean[k] = r
        if x.size >= 2:
            resid = x - r * x0
            half[k] = t_quantile(x.size - 1, confidence) * math.sqrt(resid.var(ddof=1) / x.size) / abs(x0.mean())
    return Summary(out_gens, mean, half, n, bad, int(np.unique(seeds).size))


def bound_verdict(s: Summary, bound: float = ACCUMULATE_BOUND) -> tuple[bool | None, str]:
    """Whether a ratio curve (:func:`ratio_of_means`) stays within ``bound`` after its first generation.

    Judged on the 95% intervals: ``True`` when every generation's interval lies at or below the bound, ``False``
    when some generation's lies wholly above it, None when an interval straddles it or nothing can be told. A
    generation with one value is judged on that value, and the text says the verdict is from one seed.
    """
    later = [i for i in range(1, len(s.generations)) if s.n[i] > 0 and math.isfinite(float(s.mean[i]))]
    if not later:
        return None, "cannot tell: no finite value after the first generation"
    half = np.where(np.isfinite(s.half_width), s.half_width, 0.0)
    lo, hi = s.mean - half, s.mean + half
    single = all(int(s.n[i]) == 1 for i in later)
    basis = "from one seed, no interval" if single else f"{CONFIDENCE:.0%} intervals over {s.n_seeds} seeds"
    above = [i for i in later if lo[i] > bound]
    if above:
        g = int(s.generations[above[0]])
        return False, f"exceeds π²/6 from generation {g} ({basis})"
    straddle = [i for i in later if hi[i] > bound]
    if straddle:
        g = int(s.generations[straddle[0]])
        return None, f"cannot tell: the interval at generation {g} straddles π²/6 ({basis})"
    worst = max(later, key=lambda i: hi[i])
    return True, f"within π²/6: at most {fmt(float(hi[worst]), 3)} (generation {int(s.generations[worst])}; {basis})"


def _bound_section(
    data: RecipeData,
    out_dir: Path,
    metric: str,
    grid: Sequence[str],
    kept: Sequence[tuple[tuple[str, ...], Sequence[_Line]]],
    colours: dict[str, str],
    used_names: set[str],
) -> list[str]:
    """The "Accumulate bound" subsection of a recipe's risk metric: a ratio figure and a table; empty without an
    accumulate curve."""
    floor = risk_metric(data.recipe)[1]
    cells, panels = [], []
    for cell, lines in kept:
        ratios = []
        for line in lines:
            if line.reference or _workflow_name(line.workflow) != "accumulate" or line.series is None:
                continue
            ratios.append(_Line(line.workflow, ratio_of_means(*line.series, floor), None))
        if ratios:
            cells.append(cell)
            panels.append(ratios)
    if not cells:
        return []
    what = "excess risk" if floor is not None else f"{metric} (no known floor: a weaker check than on excess risk)"
    png = out_dir / f"{_unique_name(_safe_name(f'{data.recipe}_{metric}_ratio'), used_names)}.png"
    _plot_ratio(png, data.recipe, metric, grid, cells, panels, colours)
    lines = [
        f"### Accumulate bound ({md_escape(metric)})",
        "",
        f"![{md_escape(data.recipe)} {md_escape(metric)} ratio to generation 0]({png.name})",
        "",
        f"Dey & Donoho: under accumulate the test risk stays within π²/6 ≈ {ACCUMULATE_BOUND:.3f} of generation "
        f"0's. Ratio of each generation's mean {what} to generation 0's over the seeds that have both, ± the "
        f"half-width of its {CONFIDENCE:.0%} interval (the ratio estimator's, by the delta method); a curve is "
        "within the bound when every interval lies at or below it.",
        "",
    ]
    head = [*grid, "workflow", "ratio (last gen)", "largest ratio", "bound", "within π²/6?"]
    align = ["---"] * (len(grid) + 1) + ["---:"] * 3 + ["---"]
    lines += ["| " + " | ".join(md_escape(h) for h in head) + " |", "|" + "|".join(align) + "|"]
    for cell, ratios in zip(cells, panels):
        for line in ratios:
            s = line.summary
            if not len(s.generations):
                continue
            last = len(s.generations) - 1
            ok = np.flatnonzero(np.isfinite(s.mean))
            ok = ok[ok > 0] if (ok > 0).any() else ok  # the largest ratio after generation 0 (which is 1)
            worst = int(ok[np.argmax(s.mean[ok])]) if ok.size else last
            _, text = bound_verdict(s)
            vals = [
                *(v or "-" for v in cell),
                line.workflow,
                f"{format_value_cell(s, last)} @{int(s.generations[last])}",
                f"{format_value_cell(s, worst)} @{int(s.generations[worst])}",
                fmt(ACCUMULATE_BOUND),
                text,
            ]
            lines.append("| " + " | ".join(md_escape(v) for v in vals) + " |")
    return lines + [""]


def _plot_ratio(
    path: Path,
    recipe: str,
    metric: str,
    grid: Sequence[str],
    cells: Sequence[tuple[str, ...]],
    panels: Sequence[Sequence[_Line]],
    colours: dict[str, str],
) -> None:
    """A panel per cell: each accumulate curve's ratio to generation 0 with its interval, the bound pi^2/6 dashed."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    rows, cols, pos, varying = _layout(grid, cells)
    fig, axes = axes_grid(rows, cols, (3.2, 2.35), (0.6, 0.95, 0.8, 0.15), wspace=0.38, hspace=0.5)
    used = set(pos)
    for r in range(rows):
        for c in range(cols):
            if (r, c) not in used:
                axes[r][c].set_visible(False)
    workflows = sorted({ln.workflow for lines in panels for ln in lines}, key=workflow_sort_key)
    for cell, (r, c), lines in zip(cells, pos, panels):
        ax = axes[r][c]
        for line in lines:
            s = line.summary
            ax.plot(s.generations, s.mean, color=colours[line.workflow], lw=1.4, marker=".", ms=4)
            ax.fill_between(
                s.generations, s.mean - s.half_width, s.mean + s.half_width, color=colours[line.workflow], alpha=0.18
            )
        ax.axhline(ACCUMULATE_BOUND, color="#d62728", lw=1.2, ls="--")
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        top = max([ACCUMULATE_BOUND * 1.08] + [float(np.nanmax(ln.summary.mean + np.nan_to_num(ln.summary.half_width)))
                                                for ln in lines if np.isfinite(ln.summary.mean).any()])  # fmt: skip
        ax.set_ylim(0.0, top * 1.05)
        ax.set_title(cell_title(grid, cell, varying) if varying else "", fontsize=9, y=1.0, pad=4)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, lw=0.5)
        ax.set_xlabel("generation", fontsize=9)
        ax.set_ylabel(f"{metric} / gen 0", fontsize=9)
    handles = [Line2D([], [], color=colours[wf], lw=1.6, label=wf) for wf in workflows]
    handles += [
        Patch(color="0.5", alpha=0.3, label=f"{CONFIDENCE:.0%} CI"),
        Line2D([], [], color="#d62728", lw=1.2, ls="--", label=f"π²/6 ≈ {ACCUMULATE_BOUND:.3f} (Dey & Donoho)"),
    ]
    height = fig.get_size_inches()[1]
    fig.suptitle(
        f"{recipe}: accumulate's {metric} relative to generation 0", fontsize=11, y=1 - 0.08 / height, va="top"
    )
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.02 / height), ncols=2, fontsize=8,
               frameon=False)  # fmt: skip
    fig.savefig(path, format="png")


# ---- the metric against cumulative optimizer steps ----------------------------------------------


def _steps_section(
    data: RecipeData,
    out_dir: Path,
    metric: str,
    grid: Sequence[str],
    kept: Sequence[tuple[tuple[str, ...], Sequence[_Line]]],
    index: dict[tuple[str, tuple[str, ...]], list[tuple[str, Series]]],
    colours: dict[str, str],
    used_names: set[str],
) -> list[str]:
    """``metric`` against the cumulative optimizer steps (the sum of ``train_steps`` up to each generation):
    a panel per setting, the protocols in line styles. Empty where no run records ``train_steps``."""
    from matplotlib.lines import Line2D

    pcol = list(grid).index(PROTOCOL_COLUMN) if PROTOCOL_COLUMN in grid else None
    settings: dict[tuple[str, ...], list[tuple[str, _Line, np.ndarray]]] = {}
    for cell, lines in kept:
        steps = dict(index.get(("train_steps", cell), []))
        protocol = cell[pcol] if pcol is not None else EPOCHS_PROTOCOL
        other = cell[:pcol] + cell[pcol + 1 :] if pcol is not None else cell
        for line in lines:
            if line.reference or line.workflow not in steps:
                continue
            st = summarize(*steps[line.workflow])
            by_gen = dict(zip(st.generations.tolist(), st.mean.tolist()))
            per_gen = np.array([by_gen.get(int(g), math.nan) for g in line.summary.generations])
            settings.setdefault(other, []).append((protocol, line, np.cumsum(per_gen)))
    if not settings:
        return []
    other_grid = [g for i, g in enumerate(grid) if i != pcol]
    cells = sorted(settings, key=cell_sort_key)
    rows, cols, pos, varying = _layout(other_grid, cells)
    protocols = sorted({p for v in settings.values() for p, _, _ in v}, key=lambda p: (p != EPOCHS_PROTOCOL, p))
    styles = dict(zip(protocols, ("-", "--", ":", (0, (5, 1, 1, 1)))))
    workflows = sorted({line.workflow for v in settings.values() for _, line, _ in v}, key=workflow_sort_key)
    handles = [
        Line2D([], [], color=colours[wf], lw=1.6, ls=_line_style(wf), label=_legend_label(wf)) for wf in workflows
    ]
    handles += [Line2D([], [], color="0.3", lw=1.4, ls=styles[p], label=p) for p in protocols]
    legend_cols = 1 if cols == 1 else 2  # a label runs to 45 characters: about 3 inches at 8 pt
    bottom = 0.55 + 0.17 * math.ceil(len(handles) / legend_cols)
    fig, axes = axes_grid(rows, cols, (4.2, 2.6), (0.6, bottom, 0.8, 0.2), wspace=0.38, hspace=0.55)
    used = set(pos)
    for r in range(rows):
        for c in range(cols):
            if (r, c) not in used:
                axes[r][c].set_visible(False)
    for cell, (r, c) in zip(cells, pos):
        ax = axes[r][c]
        for protocol, line, x in settings[cell]:
            ls = "-." if is_real_only(line.workflow) else styles.get(protocol, "-")
            ax.plot(x, line.summary.mean, color=colours[line.workflow], ls=ls, lw=1.4, marker=".", ms=4)
        ax.set_title(cell_title(other_grid, cell, varying) if varying else "", fontsize=9, y=1.0, pad=4)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, lw=0.5)
        ax.set_xlabel("cumulative optimizer steps", fontsize=9)
        ax.set_ylabel(metric, fontsize=9)
    height = fig.get_size_inches()[1]
    fig.suptitle(f"{data.recipe}: {metric} against compute", fontsize=11, y=1 - 0.08 / height, va="top")
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.02 / height), ncols=legend_cols,
               fontsize=8, frameon=False)  # fmt: skip
    png = out_dir / f"{_unique_name(_safe_name(f'{data.recipe}_{metric}_vs_steps'), used_names)}.png"
    fig.savefig(png, format="png")
    return [
        f"![{md_escape(data.recipe)} {md_escape(metric)} against cumulative optimizer steps]({png.name})",
        "",
        f"{md_escape(metric)} (mean over seeds) against the cumulative optimizer steps up to each generation (the "
        "sum of `train_steps`); line styles: "
        + "; ".join(f"{p}: {_style_name(styles[p])}" for p in protocols)
        + "; the real-only reference dash-dotted.",
        "",
    ]


def _style_name(style: Any) -> str:
    return (
        {"-": "solid", "--": "dashed", ":": "dotted"}.get(style, "dash-dot-dot")
        if isinstance(style, str)
        else "dash-dot-dot"
    )


# ---- sample pictures ---------------------------------------------------------------------------


@dataclass
class _SampleRow:
    """One row of a samples figure: a workflow's run with the smallest seed and its finished generations."""

    workflow: str
    setting: tuple[tuple[str, str], ...]
    """The config values in which this recipe's runs differ (merge_runs' extra grid columns), else empty."""
    seed: int | None
    run: Path
    pictures: dict[int, Path | None]
    """Finished generation -> its ``samples.png`` (None where the generation's folder holds none)."""

    @property
    def title(self) -> str:
        """The workflow and the setting, e.g. ``replace`` or ``replace, latent_dim=16``."""
        return ", ".join([self.workflow, *(f"{k}={v or '-'}" for k, v in self.setting)])


def finished_generations(path: Path) -> dict[int, Path | None]:
    """The finished generations of a run dir (``gen_XXX`` folders, sorted), each with its ``samples.png``.

    The picture is None where the generation's folder holds none; a run dir that cannot be listed has no
    finished generations.
    """
    found: dict[int, Path | None] = {}
    try:
        entries = list(path.iterdir())
    except OSError:
        return found  # the run was readable a moment ago; a listing that now fails just means no pictures
    for entry in entries:
        m = _GEN_DIR.match(entry.name)
        if not m:
            continue
        try:
            if not entry.is_dir():
                continue
            picture = entry / SAMPLES_PICTURE
            found[int(m.group(1))] = picture if picture.is_file() else None
        except OSError:  # a folder we may not look into: its picture is missing, the generation still counts
            found[int(m.group(1))] = None
    return dict(sorted(found.items()))


def run_workflow(run: Run) -> str:
    """The workflow label of a one-workflow run, as the metrics (and so the plots) spell it."""
    labels = sorted({wf for _, wf, _ in run.series}, key=workflow_sort_key)
    if len(labels) == 1:
        return labels[0]
    configured = run.config.get("workflow")
    if isinstance(configured, str) and configured:
        return configured
    return ", ".join(labels) or "unknown"


def run_seed(run: Run) -> int | None:
    """The seed of a one-seed run: the metrics' seed column, else config.yaml's ``seed``."""
    seeds = np.unique(np.concatenate([s for s, _, _ in run.series.values()])) if run.series else np.empty(0)
    if seeds.size == 1:
        return int(seeds[0])
    try:
        return int(run.config["seed"])
    except (KeyError, TypeError, ValueError):
        return int(seeds.min()) if seeds.size else None


def _sample_rows(data: RecipeData) -> list[_SampleRow]:
    """One row per workflow (and setting) with finished generations, in report order; empty without pictures.

    Each row shows the run with the smallest seed among the workflow's runs that have pictures (or,
    if none has, among all its runs); equal seeds go to the run listed first. Runs that differ in a
    config value (another experiment, e.g. another ``latent_dim``) get rows of their own, as they get
    cells of their own in the metric figures.
    """
    found = [(run, finished_generations(run.path)) for run in data.runs]
    if not any(p is not None for _, pictures in found for p in pictures.values()):
        return []
    # merge_runs adds a grid column per config key in which the runs differ; metrics.csv columns stay.
    split = [g for g in data.grid if not any(g in run.grid for run in data.runs)]
    by_key: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[Run, dict[int, Path | None]]]] = {}
    for run, pictures in found:
        if pictures and not is_real_only(run_workflow(run)):  # real data alone draws no synthetic samples
            setting = tuple((k, _config_text(run.config, k)) for k in split)
            by_key.setdefault((run_workflow(run), setting), []).append((run, pictures))
    rows = []
    order = sorted(by_key, key=lambda k: (workflow_sort_key(k[0]), cell_sort_key(tuple(v for _, v in k[1]))))
    for workflow, setting in order:
        candidates = by_key[(workflow, setting)]
        candidates = [c for c in candidates if any(p is not None for p in c[1].values())] or candidates
        seeded = [(run_seed(run), i, run, pictures) for i, (run, pictures) in enumerate(candidates)]
        seed, _, run, pictures = min(seeded, key=lambda t: (t[0] is None, t[0] or 0, t[1]))
        rows.append(_SampleRow(workflow, setting, seed, run.path, pictures))
    return rows


def _spread(values: Sequence[int], k: int = _SAMPLE_COLUMNS) -> list[int]:
    """At most ``k`` evenly spaced items of ``values``, the first and the last among them."""
    if len(values) <= k:
        return list(values)
    picks = np.unique(np.round(np.linspace(0, len(values) - 1, k)).astype(int))
    return [values[i] for i in picks]


def _read_picture(path: Path) -> tuple[np.ndarray | None, str]:
    """A picture as an RGB float array in [0, 1], or ``(None, one-line reason)`` when it cannot be read."""
    import matplotlib.image as mimage

    try:
        img = np.asarray(mimage.imread(path))
    except Exception as exc:  # decoders raise SyntaxError, OSError, ValueError, ... on damaged files
        text = str(exc).strip()
        return None, (text.splitlines()[0] if text else type(exc).__name__)
    if img.dtype.kind in "ui":  # non-PNG data (a JPEG under the PNG name) comes back as integers
        img = img / np.iinfo(img.dtype).max
    img = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float32)), 0.0, 1.0)
    if img.ndim == 3 and img.shape[2] == 4:  # drop transparency onto white, as a viewer shows it
        img = img[..., :3] * img[..., 3:] + (1.0 - img[..., 3:])
    elif img.ndim == 3 and img.shape[2] != 3:
        img = img[..., 0]  # grey + alpha and other odd layouts: the first channel is the picture
    if img.ndim == 2:
        # Grey as RGB: shown exactly, with no colormap normalising a uniform picture to black.
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or not img.size:
        return None, f"not a 2-D picture (array of shape {img.shape})"
    step = max(1, -(-max(img.shape[:2]) // 1024))  # a panel is a few hundred pixels: skip rows of huge pictures
    return img[::step, ::step], ""


def _plot_samples(
    path: Path,
    recipe: str,
    rows: Sequence[_SampleRow],
    gens: Sequence[int],
    panels: Sequence[Sequence[np.ndarray | str | None]],
    colours: dict[str, str],
) -> None:
    """A grid of pictures: a row per workflow, a column per generation; ``str`` panels say why they are empty."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    sides = [max(p.shape[:2]) for row in panels for p in row if isinstance(p, np.ndarray)]
    # Near the pictures' own size (a 240 px grid of digits at 1:1), within sensible bounds.
    panel = min(2.4, max(1.2, max(sides, default=240) / dpi))
    gap = 0.1
    labels = []
    for row in rows:
        # "replace (seed 0)"; a long mix(...) label wraps, the seed on its last line if it fits.
        wrapped = textwrap.wrap(row.title, 22) or [row.title]
        seed = f"(seed {row.seed})" if row.seed is not None else "(seed unknown)"
        if len(wrapped[-1]) + 1 + len(seed) <= 22:
            wrapped[-1] += f" {seed}"
        else:
            wrapped.append(seed)
        labels.append("\n".join(wrapped))
    longest = max(len(line) for text in labels for line in text.splitlines())
    # Margins in inches, laid out by hand like the metric figures.
    top, bottom, left, right = 0.85, 0.15, max(0.9, 0.095 * longest + 0.3), 0.15  # bold 9 pt: ~0.09 in a character
    cols = len(gens)
    width = left + right + cols * panel + (cols - 1) * gap
    height = top + bottom + len(rows) * panel + (len(rows) - 1) * gap
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    for r, (row, label, cells) in enumerate(zip(rows, labels, panels)):
        y0 = height - top - (r + 1) * panel - r * gap
        fig.text(
            (left - 0.12) / width,
            (y0 + panel / 2) / height,
            label,
            ha="right",
            va="center",
            fontsize=9,
            color=colours.get(row.workflow, "0.1"),
            fontweight="bold",
        )
        for c, (g, cell) in enumerate(zip(gens, cells)):
            x0 = left + c * (panel + gap)
            ax = fig.add_axes((x0 / width, y0 / height, panel / width, panel / height))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("0.75")
            if isinstance(cell, np.ndarray):
                ax.imshow(cell, interpolation="antialiased")
            elif cell is None:
                ax.axis("off")  # the run stopped before this generation: nothing to show, nothing wrong
            else:
                ax.set_facecolor("0.93")
                ax.text(0.5, 0.5, cell, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.35")
            if r == 0:
                ax.set_title(f"gen {g}", fontsize=9, y=1.0, pad=4)
    fig.suptitle(f"{recipe}: synthetic samples per generation", fontsize=11, y=1 - 0.12 / height, va="top")
    fig.savefig(path, format="png")


def samples_section(data: RecipeData, out_dir: Path, used_names: set[str], warn: Callable[[str], None]) -> list[str]:
    """Lines of a recipe's "Samples" subsection; writes ``samples_<recipe>.png``. Empty without pictures."""
    rows = _sample_rows(data)
    if not rows:
        return []
    finished = sorted({g for row in rows for g in row.pictures})
    gens = _spread(finished)
    panels: list[list[np.ndarray | str | None]] = []
    missing: list[str] = []
    for row in rows:
        cells: list[np.ndarray | str | None] = []
        for g in gens:
            if g not in row.pictures:
                cells.append(None)
                continue
            picture = row.pictures[g]
            if picture is None:
                missing.append(f"{row.title} gen {g} (no {SAMPLES_PICTURE})")
                cells.append("missing")
                continue
            img, why = _read_picture(picture)
            if img is None:
                warn(f"warning: {picture}: cannot read the samples picture ({why}); shown as missing")
                missing.append(f"{row.title} gen {g} (unreadable {SAMPLES_PICTURE})")
                cells.append("missing")
            else:
                cells.append(img)
        panels.append(cells)
    png = out_dir / f"{_unique_name(_safe_name(f'samples_{data.recipe}'), used_names)}.png"
    # The same labels as the metric plots, so a workflow has the same colour in every figure.
    colours = workflow_colours({wf for _, wf, _ in data.series} | {row.workflow for row in rows})
    _plot_samples(png, data.recipe, rows, gens, panels, colours)

    seeds = "; ".join(f"{row.title}: seed {row.seed if row.seed is not None else 'unknown'}" for row in rows)
    shown = ", ".join(str(g) for g in gens)
    if len(gens) < len(finished):
        which = f"generations {shown} (evenly spaced over the {len(finished)} finished, {finished[0]}–{finished[-1]})"
    else:
        which = f"generation{'s' if len(gens) != 1 else ''} {shown}"
    lines = ["### Samples", "", f"![{md_escape(data.recipe)} samples]({png.name})", ""]
    lines += [f"Synthetic samples of each workflow's run with the smallest seed ({md_escape(seeds)}) at {which}.", ""]
    if missing:
        lines += [f"Shown as missing: {md_escape('; '.join(missing))}.", ""]
    return lines


# ---- the report --------------------------------------------------------------------------------


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")


def make_report(
    run_dirs: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    metrics: Sequence[str] | str | None = None,
    log_y: str | bool = "auto",
    cells: Sequence[str] | str | None = None,
    max_panels: int = DEFAULT_MAX_PANELS,
    warn: Callable[[str], None] | None = _stderr,
) -> Path:
    """Write ``<out_dir>/report.md``, one PNG per (recipe, metric) and one of sample pictures per image recipe.

    Returns the path of report.md.

    ``metrics`` (names or comma-separated names) restricts the metrics; ``cells`` (e.g.
    ``["dim=10,n_samples=100"]``) restricts the grid cells, a cell being kept if it matches any
    filter; ``log_y`` is ``"auto"`` (log where one panel's values span two orders of magnitude),
    ``"true"`` or ``"false"``; ``max_panels`` caps the panels per figure. Unusable run dirs are
    skipped with a one-line ``warn`` each, and so is a sample picture that cannot be read;
    :class:`ReportError` when no run dir is usable.
    """
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    mode = _log_y_mode(log_y)
    wanted = _metric_list(metrics)
    filters = parse_cell_filters(cells)
    if max_panels < 1:
        raise ReportError(f"--max_panels must be >= 1, got {max_panels}")
    if isinstance(out_dir, str) and not out_dir.strip():  # Path("") would be the current folder
        raise ReportError("--out is empty; give the folder for report.md and the PNGs, e.g. --out runs/report")
    warn = warn or (lambda _msg: None)
    if not run_dirs:
        raise ReportError("no run dir given")

    runs, skipped, seen = [], [], set()
    for rd in run_dirs:
        try:
            resolved = Path(rd).resolve()
        except OSError:
            resolved = Path(rd)
        if resolved in seen:
            continue  # the same run listed twice is read once
        seen.add(resolved)
        try:
            runs.append(load_run(rd))
        except ReportError as exc:
            skipped.append(str(exc))
    if not runs:
        raise ReportError("no usable run dir: " + "; ".join(skipped))
    for reason in skipped:
        warn(f"warning: skipped {reason}")

    groups = merge_runs(runs)
    if wanted is not None:
        present = {m for g in groups for m, _, _ in g.series}
        if not present & set(wanted):
            raise ReportError(
                f"none of --metrics {','.join(wanted)} is in the runs; available: {', '.join(sorted(present))}"
            )
    if filters and not any(cell_matches_filters(g.grid, c, filters) for g in groups for _, _, c in g.series):
        examples = "; ".join(f"{g.recipe}: {cell_title(g.grid, next(iter(g.series))[2]) or 'no grid'}" for g in groups)
        raise ReportError(f"--cells matches no cell (cells look like {examples})")

    out = Path(out_dir)
    ours = claim_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create --out {out} ({exc.strerror or exc})") from None

    md = [_REPORT_TITLE, ""]
    md += [
        f"{len(runs)} run dir{'s' if len(runs) != 1 else ''}, {len(groups)} recipe{'s' if len(groups) != 1 else ''}. "
        f"Values are means over seeds ± the half-width of the {CONFIDENCE:.0%} confidence interval of the mean "
        "(Student t, n − 1 degrees of freedom); generation 0 is fitted on real data. Non-finite values "
        "(inf, nan) are left out of the means and counted. Dashed lines and the theory column are closed-form "
        "expectations.",
        "",
    ]
    if skipped:
        md += ["Skipped run dirs:", ""] + [f"- {md_escape(s)}" for s in skipped] + [""]
    used: set[str] = set()
    try:
        with staged_out(out, ours) as stage:
            for data in groups:
                samples = samples_section(data, stage, used, warn)
                md += _section(data, stage, wanted, filters, mode, max_panels, used, samples)
            atomic_write_text(stage / REPORT_FILE, "\n".join(md).rstrip() + "\n")
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out} ({exc.strerror or exc})") from None
    return out / REPORT_FILE


def _report_files(out: Path, title: str, also: Sequence[str] = ()) -> set[str] | None:
    """The files of the report in the folder ``out`` (its record among them), or None when ``out`` holds none.

    Read from :data:`REPORT_RECORD`; for a report written before there was one, ``report.md`` (whose first line is
    ``title``), the pictures it links and the files ``also`` that such a report wrote beside it.
    """
    record = out / REPORT_RECORD
    if record.is_symlink() or record.exists():
        try:
            record = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # not ours: a file of that name that is no record
            return None
        files = record.get("files") if isinstance(record, dict) and record.get("written_by") == _WRITER else None
        if not isinstance(files, list) or not all(isinstance(f, str) and "/" not in f for f in files):
            return None
        return {REPORT_RECORD, *files}
    try:
        text = (out / REPORT_FILE).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    if not text.startswith(title + "\n"):
        return None
    return {REPORT_FILE, *also, *_LINKED_PNG.findall(text)}


def claim_out(out: Path, title: str = _REPORT_TITLE, also: Sequence[str] = ()) -> set[str]:
    """Refuse an --out that is a file or a folder of other files; return the earlier report's files in it.

    A report (this module's, or a figure of :mod:`tooling.figures`) is written into a new or empty folder, or into
    one that holds a report (:func:`_report_files`; ``title``: the first line of a report.md written before reports
    kept a record of their files, ``also``: the other files such a report wrote), beside whatever else the user
    keeps there. Write it with :func:`staged_out`.
    """
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        return set()
    try:
        entries = sorted(out.iterdir(), key=lambda p: (p.name.startswith("."), p.name))
        for stale in entries:  # left by a killed report
            m = _STAGE.match(stale.name)
            if m and not pid_alive(int(m.group(1))):
                shutil.rmtree(stale, ignore_errors=True)
        entries = [p for p in entries if not _STAGE.match(p.name)]
        ours = _report_files(out, title, also) if entries else set()
    except OSError as exc:
        raise ReportError(f"--out {out} cannot be read ({exc.strerror or exc})") from None
    if ours is None:
        raise ReportError(
            f"--out {out} holds files ({listed_names(entries)}) and no report of this tool, so nothing is written "
            "there (its files are left alone); choose a new or empty folder"
        )
    return ours


@contextlib.contextmanager
def staged_out(out: Path, ours: set[str]) -> Iterator[Path]:
    """A hidden folder inside the existing folder ``out`` to write a report into whole, then moved into ``out``
    (:func:`_publish`), so that no file is replaced before every name is known to be free or the earlier report's
    own (``ours``: :func:`claim_out`). Removed in the end, also after an error (OSError: the caller's to word)."""
    stage = out / f".report.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        yield stage
        _publish(stage, out, ours)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _publish(stage: Path, out: Path, ours: set[str]) -> None:
    """Move the report written in ``stage`` into ``out``, replacing the earlier report's files ``ours``.

    A file of the user's with a name the report writes is refused (nothing moved); the earlier report's files that
    this one no longer writes are deleted; the user's other files are left alone.
    """
    written = sorted(p.name for p in stage.iterdir() if p.name != REPORT_FILE) + [REPORT_FILE]  # report.md last
    clash = [
        n
        for n in written
        if os.path.lexists(out / n) and (n not in ours or (out / n).is_symlink() or not (out / n).is_file())
    ]
    if clash:
        raise ReportError(
            f"--out {out} holds files of the user's with names the report writes ({listed_names(clash)}), so nothing "
            "is written there (they are left alone); move them away or choose another folder"
        )
    earlier = ours - {REPORT_RECORD}
    # Recorded first: a report killed while it moves its files still owns them next time.
    atomic_write_json(out / REPORT_RECORD, {"files": sorted(earlier | set(written)), "written_by": _WRITER})
    for name in written:
        os.replace(stage / name, out / name)
    for name in sorted(earlier - set(written)):  # the earlier report's, that this one does not write
        path = out / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
    atomic_write_json(out / REPORT_RECORD, {"files": written, "written_by": _WRITER})


# ---- command line ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like the recipes' own command lines
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m tooling.report``."""
    p = _Parser(
        prog="python -m tooling.report",
        description="Plots and tables (report.md) of one or many recipe run dirs.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run dirs holding config.yaml and metrics.csv.")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="Folder for report.md and the PNGs.")
    p.add_argument(
        "--metrics", action="append", metavar="M1,M2", help="Only these metrics (comma-separated; repeatable)."
    )
    p.add_argument(
        "--log_y",
        default="auto",
        type=str.lower,
        choices=("auto", "true", "false"),
        help="Log y axis: auto (where values span two orders of magnitude), true or false.",
    )
    p.add_argument(
        "--cells",
        action="append",
        metavar="P=V[,P=V]",
        help="Only grid cells matching these values, e.g. 'dim=10,n_samples=100'; repeat for more (any may match).",
    )
    p.add_argument("--max_panels", type=int, default=DEFAULT_MAX_PANELS, help="At most this many panels per figure.")
    return p


def cli(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``collapse-report``): parse flags, write the report, exit 2 with one line on bad input.

    Returns None: the console-script wrapper passes the return value to ``sys.exit``.
    """
    args = build_parser().parse_args(argv)
    try:
        report = make_report(
            args.run_dirs,
            args.out,
            metrics=args.metrics,
            log_y=args.log_y,
            cells=args.cells,
            max_panels=args.max_panels,
        )
    except (UserError, OSError) as exc:
        if isinstance(exc, OSError) and (exc := path_name_error(exc)) is None:
            raise
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the report may be incomplete; run the same command again\n")
        sys.exit(130)
    print(f"report -> {report}")


if __name__ == "__main__":
    cli()
