"""The published values the recipes reproduce, as data: ``tooling/published_results.yaml``, loaded and validated.

    from tooling.published import load_published
    figures = load_published()            # {figure id: Figure}
    fig = figures["gerstgrasser_tinystories"]
    fig.panels[0].series["replace"]       # (Point(iteration 1: 1.82), ...)

A series point sits at a paper *iteration*; our generation g is the paper's iteration
``g + figure.iteration_offset`` (``None`` where the published values carry no index, e.g. plateaus).
A point's iteration is an integer, ``"first"`` (the first iteration, its number not stated), ``"A-B"``
(somewhere in that span) or ``"later"`` (after the listed points, not stated); its value a number or a
``[low, high]`` range (then :attr:`Point.value` is the midpoint). A malformed file raises
:class:`PublishedError` naming the figure and the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from collapse.errors import UserError
from collapse.rundir import metric_name
from datamodules.workflows import WORKFLOW_NAMES, Workflow, WorkflowError

PUBLISHED_PATH = Path(__file__).with_name("published_results.yaml")
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SHAPES = ("rising", "flat", "bounded", "between")
"""Expected shapes of a workflow's curve; the rules that check them are in :mod:`tooling.figures`."""
_SPAN = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_FIGURE_KEYS = {
    "title", "source", "recipe", "metric", "iteration_offset", "index_convention", "setting", "select",
    "levels_comparable", "expected_shape", "compare_panel", "panels", "unconfirmed", "comparability", "produce",
    "cardinality", "shape_notes",
}  # fmt: skip
_REQUIRED = ("title", "source", "recipe", "metric", "iteration_offset", "index_convention", "setting", "panels")


class PublishedError(UserError):
    """A malformed published-results file; the message names the figure and the field."""


@dataclass(frozen=True)
class Point:
    """One published value: where (a paper iteration, a span, "first" or "later") and what (a value or a range)."""

    kind: str
    """``iteration``, ``span``, ``first`` or ``later``."""
    start: int | None
    """The paper iteration (``iteration``), or the span's first one (``span``); else None."""
    stop: int | None
    """The span's last iteration (``span``); for ``iteration`` the same as start; else None."""
    low: float
    high: float

    @property
    def value(self) -> float:
        """The value, or the midpoint of a range."""
        return 0.5 * (self.low + self.high)

    @property
    def is_range(self) -> bool:
        return self.low != self.high

    @property
    def where(self) -> str:
        """``iteration 5``, ``iterations 2-5``, ``first iteration`` or ``later iterations``."""
        if self.kind == "iteration":
            return f"iteration {self.start}"
        if self.kind == "span":
            return f"iterations {self.start}-{self.stop}"
        return f"{self.kind} iteration" + ("s" if self.kind == "later" else "")

    def order(self, offset: int | None) -> float:
        """Sort key along the iteration axis: ``first`` before every number, ``later`` after."""
        if self.kind == "first":
            return -math.inf if offset is None else float(offset)
        if self.kind == "later":
            return math.inf
        return float(self.stop if self.kind == "span" else self.start)

    def covers(self, iteration: int) -> bool:
        """Whether the point is at this paper iteration (or its span holds it)."""
        return self.start is not None and self.stop is not None and self.start <= iteration <= self.stop


@dataclass(frozen=True)
class Panel:
    """One published curve set (a model, a sample size, ...) of a figure."""

    label: str
    setting: dict[str, Any]
    """Values our runs must have to be this panel's setting: grid columns of metrics.csv or dotted config keys."""
    series: dict[str, tuple[Point, ...]]
    """Workflow -> its points, in iteration order."""
    limits: dict[str, float] = field(default_factory=dict)
    """Workflow -> the value it tends to as iterations grow (a plateau)."""
    notes: str = ""
    unconfirmed: tuple[str, ...] = ()

    def workflows(self) -> list[str]:
        return list(dict.fromkeys([*self.series, *self.limits]))


@dataclass(frozen=True)
class CardinalityPoint:
    """Test loss after training on ``real`` real and ``synthetic`` synthetic examples (Kazdan et al.'s grid)."""

    real: int
    synthetic: int
    value: float


@dataclass(frozen=True)
class Figure:
    """One published figure and how our runs reproduce it."""

    id: str
    title: str
    source: str
    recipe: str
    metric: str
    iteration_offset: int | None
    """The paper's iteration = our generation + this (None: the published values carry no iteration)."""
    index_convention: str
    setting: dict[str, Any]
    select: dict[str, Any]
    levels_comparable: bool
    expected_shape: dict[str, str]
    panels: tuple[Panel, ...]
    compare_panel: str | None
    unconfirmed: tuple[str, ...]
    comparability: str
    produce: dict[str, str | None]
    cardinality: tuple[CardinalityPoint, ...] = ()
    shape_notes: str = ""

    def panel(self, label: str | None) -> Panel | None:
        return next((p for p in self.panels if p.label == label), None)

    def generation(self, iteration: float) -> float:
        """Our generation index of a paper iteration."""
        return iteration - (self.iteration_offset or 0)


# ---- first, last, value at an iteration ----------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """A published value picked for a comparison, with a one-line description of where it comes from."""

    value: float
    where: str
    approx: bool = False


def published_first(figure: Figure, panel: Panel, workflow: str) -> Published | None:
    """The workflow's value at the first iteration; else the panel's shared one (every workflow's first
    model is fitted on real data only, so the first iteration is common to all)."""

    def first_of(points: tuple[Point, ...]) -> Point | None:
        for p in points:
            if p.kind == "first" or (
                p.kind == "iteration" and figure.iteration_offset is not None and p.start == figure.iteration_offset
            ):
                return p
        return None

    own = first_of(panel.series.get(workflow, ()))
    if own is not None:
        return Published(own.value, own.where, own.is_range)
    for other, points in panel.series.items():
        shared = first_of(points)
        if shared is not None:
            return Published(shared.value, f"{shared.where}, shared with {other}: fitted on real data", True)
    return None


def published_last(figure: Figure, panel: Panel, workflow: str) -> Published | None:
    """The workflow's last published value: its limit if one is given, else its latest point."""
    if workflow in panel.limits:
        return Published(panel.limits[workflow], "limit")
    points = panel.series.get(workflow, ())
    if not points:
        return None
    last = max(points, key=lambda p: p.order(figure.iteration_offset))
    text = last.where + (f", midpoint of {_num(last.low)}-{_num(last.high)}" if last.is_range else "")
    return Published(last.value, text, last.is_range or last.kind == "later")


def published_at(figure: Figure, panel: Panel, workflow: str, iteration: int) -> Published | None:
    """The workflow's published value at this paper iteration (a span holding it gives its midpoint)."""
    for p in panel.series.get(workflow, ()):
        if p.kind == "iteration" and p.start == iteration:
            return Published(p.value, p.where, p.is_range)
    for p in panel.series.get(workflow, ()):
        if p.kind == "span" and p.covers(iteration):
            return Published(p.value, p.where, True)
    if figure.iteration_offset is not None and iteration == figure.iteration_offset:
        return published_first(figure, panel, workflow)
    return None


def _num(x: float) -> str:
    return f"{x:g}"


# ---- loading and validation ----------------------------------------------------------------------


def _fail(where: str, message: str) -> PublishedError:
    return PublishedError(f"{where}: {message}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise _fail(where, f"expected a finite number, got {value!r}")
    return float(value)


def _text(value: Any, where: str, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, f"expected a mapping, got {type(value).__name__}")
    return {str(k): v for k, v in value.items()}


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _fail(where, "expected a list of strings")
    return tuple(_text(v, f"{where}[{i}]") for i, v in enumerate(value))


def _workflow(name: str, where: str) -> str:
    try:
        wf = Workflow.parse(name)
    except WorkflowError as exc:
        raise _fail(where, f"unknown workflow {name!r} ({exc})") from None
    if wf.name not in WORKFLOW_NAMES:
        raise _fail(where, f"unknown workflow {name!r}; known: {', '.join(WORKFLOW_NAMES)}")
    return wf.label


def _point(raw: Any, where: str) -> Point:
    if not isinstance(raw, list) or len(raw) != 2:
        raise _fail(where, f"expected [iteration, value], got {raw!r}")
    at, value = raw
    if isinstance(value, list):
        if len(value) != 2:
            raise _fail(where, f"a range is [low, high], got {value!r}")
        low, high = _number(value[0], where), _number(value[1], where)
        if low > high:
            raise _fail(where, f"range low {low:g} is above high {high:g}")
    else:
        low = high = _number(value, where)
    if isinstance(at, bool):
        raise _fail(where, f"iteration {at!r} is not an integer")
    if isinstance(at, int):
        if at < 0:
            raise _fail(where, f"iteration {at} is negative")
        return Point("iteration", at, at, low, high)
    if at in ("first", "later"):
        return Point(at, None, None, low, high)
    m = _SPAN.match(str(at))
    if m and int(m.group(1)) <= int(m.group(2)):
        return Point("span", int(m.group(1)), int(m.group(2)), low, high)
    raise _fail(where, f"iteration {at!r}: write an integer, 'first', 'later' or a span 'A-B' with A <= B")


def _panel(raw: Any, where: str, offset: int | None) -> Panel:
    data = _mapping(raw, where)
    unknown = set(data) - {"label", "setting", "series", "limits", "notes", "unconfirmed"}
    if unknown:
        raise _fail(where, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(sorted(unknown))}")
    label = _text(data.get("label"), f"{where}.label")
    series: dict[str, tuple[Point, ...]] = {}
    for wf, points in _mapping(data.get("series"), f"{where}.series").items():
        w = f"{where}.series.{wf}"
        label_wf = _workflow(wf, w)
        if not isinstance(points, list) or not points:
            raise _fail(w, "expected a non-empty list of [iteration, value]")
        parsed = tuple(_point(p, f"{w}[{i}]") for i, p in enumerate(points))
        if offset is None and any(p.kind in ("iteration", "span") for p in parsed):
            raise _fail(w, "numbered iterations need an iteration_offset (it is null)")
        if offset is not None and any(p.kind == "iteration" and p.start < offset for p in parsed):
            raise _fail(w, f"an iteration before the first one ({offset}, iteration_offset)")
        order = [p.order(offset) for p in parsed]
        if order != sorted(order):
            raise _fail(w, "points are not in iteration order")
        series[label_wf] = parsed
    limits = {
        _workflow(wf, f"{where}.limits.{wf}"): _number(v, f"{where}.limits.{wf}")
        for wf, v in _mapping(data.get("limits"), f"{where}.limits").items()
    }
    return Panel(
        label=label,
        setting=_mapping(data.get("setting"), f"{where}.setting"),
        series=series,
        limits=limits,
        notes=_text(data.get("notes"), f"{where}.notes", optional=True),
        unconfirmed=_strings(data.get("unconfirmed"), f"{where}.unconfirmed"),
    )


def _figure(fid: str, raw: Any, where: str) -> Figure:
    data = _mapping(raw, where)
    unknown = set(data) - _FIGURE_KEYS
    if unknown:
        raise _fail(where, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(sorted(unknown))}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise _fail(where, f"missing {', '.join(missing)}")
    recipe = _text(data["recipe"], f"{where}.recipe")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", recipe) or not (RECIPES_DIR / f"{recipe}.py").is_file():
        raise _fail(f"{where}.recipe", f"no recipe recipes/{recipe}.py")
    offset = data["iteration_offset"]
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int) or offset < 0):
        raise _fail(f"{where}.iteration_offset", f"expected a non-negative integer or null, got {offset!r}")
    panels_raw = data["panels"]
    if not isinstance(panels_raw, list):
        raise _fail(f"{where}.panels", "expected a list (empty where the reference gives the shape only)")
    panels = tuple(_panel(p, f"{where}.panels[{i}]", offset) for i, p in enumerate(panels_raw))
    labels = [p.label for p in panels]
    if len(set(labels)) != len(labels):
        raise _fail(f"{where}.panels", "panel labels repeat")
    compare = data.get("compare_panel")
    if compare is not None and compare not in labels:
        raise _fail(f"{where}.compare_panel", f"{compare!r} is not a panel label ({', '.join(labels) or 'no panels'})")
    if compare is None and panels:
        compare = labels[0]
    shapes = {}
    for wf, shape in _mapping(data.get("expected_shape"), f"{where}.expected_shape").items():
        if shape not in SHAPES:
            raise _fail(f"{where}.expected_shape.{wf}", f"{shape!r} is not one of {', '.join(SHAPES)}")
        shapes[_workflow(wf, f"{where}.expected_shape.{wf}")] = shape
    cardinality = []
    raw_card = data.get("cardinality") or []
    if not isinstance(raw_card, list):
        raise _fail(f"{where}.cardinality", "expected a list of {real, synthetic, value}")
    for i, c in enumerate(raw_card):
        w = f"{where}.cardinality[{i}]"
        c = _mapping(c, w)
        real, synthetic = c.get("real"), c.get("synthetic")
        if not isinstance(real, int) or isinstance(real, bool) or real < 1:
            raise _fail(w, f"real must be a positive integer, got {real!r}")
        if not isinstance(synthetic, int) or isinstance(synthetic, bool) or synthetic < 0:
            raise _fail(w, f"synthetic must be a non-negative integer, got {synthetic!r}")
        cardinality.append(CardinalityPoint(real, synthetic, _number(c.get("value"), w)))
    produce = _mapping(data.get("produce"), f"{where}.produce")
    for key, value in produce.items():
        if value is not None and not isinstance(value, str):
            raise _fail(f"{where}.produce.{key}", f"expected a string or null, got {value!r}")
    comparable = data.get("levels_comparable", False)
    if not isinstance(comparable, bool):
        raise _fail(f"{where}.levels_comparable", f"expected true or false, got {comparable!r}")
    return Figure(
        id=fid,
        title=_text(data["title"], f"{where}.title"),
        source=_text(data["source"], f"{where}.source"),
        recipe=recipe,
        metric=_text(data["metric"], f"{where}.metric"),
        iteration_offset=offset,
        index_convention=_text(data["index_convention"], f"{where}.index_convention"),
        setting=_mapping(data["setting"], f"{where}.setting"),
        select=_mapping(data.get("select"), f"{where}.select"),
        levels_comparable=comparable,
        expected_shape=shapes,
        panels=panels,
        compare_panel=compare,
        unconfirmed=_strings(data.get("unconfirmed"), f"{where}.unconfirmed"),
        comparability=_text(data.get("comparability"), f"{where}.comparability", optional=True),
        produce={k: v for k, v in produce.items()},
        cardinality=tuple(cardinality),
        shape_notes=_text(data.get("shape_notes"), f"{where}.shape_notes", optional=True),
    )


def load_published(path: str | Path | None = None) -> dict[str, Figure]:
    """Read and validate the published-results file (default: ``tooling/published_results.yaml``)."""
    path = Path(path) if path is not None else PUBLISHED_PATH
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PublishedError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PublishedError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict) or not isinstance(data.get("figures"), dict) or not data["figures"]:
        raise PublishedError(f"{path}: expected a mapping with a non-empty 'figures' mapping")
    if data.get("schema_version") != 1:
        raise PublishedError(f"{path}: schema_version {data.get('schema_version')!r}, this code reads 1")
    figures = {}
    for fid, raw in data["figures"].items():
        if not isinstance(fid, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", fid):
            raise PublishedError(f"{path}: figure id {fid!r} is not lowercase letters, digits and underscores")
        figures[fid] = _figure(fid, raw, f"{path.name}: figures.{fid}")
    return figures


def recipe_metrics(recipe: str) -> set[str]:
    """Metric names a recipe documents or logs: ``name`` spans and string literals of its source (an older
    ``a/b`` as ``a_b``, see :func:`collapse.rundir.metric_name`). Used by the tests to check that every figure's
    and every sweep's metric is real."""
    text = (RECIPES_DIR / f"{recipe}.py").read_text(encoding="utf-8")
    names = re.findall(r"``([a-z][a-z0-9_/]*)``", text) + re.findall(r"[\"']([a-z][a-z0-9_/]*)[\"']", text)
    return {metric_name(n) for n in names}
