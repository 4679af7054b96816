"""Workflows as data: which examples make up generation t's training set.

This module is the single definition every recipe uses. It depends on NumPy only, so the vectorised
analytic recipes can use it without importing torch or Lightning.

Vocabulary
----------
* The **real set** holds ``real_size`` examples at generation 0 (``n`` in the papers).
* **Synthetic set g** is drawn from model g (the model fitted at generation g); it feeds generation
  g + 1 onward. Generation 0 always trains on real data only.
* A training set is described by a :class:`TrainingSet`: an ordered list of *sources* (contiguous
  ranges of the real set or of a synthetic set) whose concatenation is the *pool*, plus an optional
  *subset* of pool indices. Nothing is materialised: a recipe gathers only the rows it needs.

Workflows (``name(key=value, ...)`` on the command line)
----------------------------------------------------------
``replace``                 generation t > 0 trains on synthetic set t-1 only.
``replace_multiple``        ``replace`` with synthetic sets ``multiplier`` times the real size (default 2).
``accumulate``              real set + synthetic sets 0 .. t-1.
``accumulate_subsample``    a fresh uniformly random subset (without replacement) of the accumulate
                            pool, of ``size`` examples (default: the real size), drawn anew each generation.
``mix``                     ``real`` real examples (the first ones, the same every generation) plus the
                            ``synthetic`` examples of synthetic set t-1 (the real x synthetic cardinality grid).
``fresh_real``              accumulate, with ``per_generation`` new real examples arriving every
                            generation (default: the real size): generation t sees real[: n + t * per_generation].

Every workflow also takes ``multiplier`` (synthetic-set size relative to the real size, default 1).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from collapse.errors import UserError

REAL = -1
"""Source id of the real set; synthetic set g has source id g."""


class WorkflowError(UserError, ValueError):
    """A workflow specification that cannot be used; the message says what to fix."""


class _Real(Enum):
    """Which real examples generation t > 0 trains on."""

    NONE = "none: only generation 0 trains on real data"
    KEPT = "the real examples of generation 0, every generation"
    GROWING = "those of generation 0 plus per_generation new ones each generation"


class _Synthetic(Enum):
    """Which synthetic sets generation t > 0 trains on."""

    NEWEST = "synthetic set t-1 only"
    ALL = "synthetic sets 0 .. t-1"


@dataclass(frozen=True)
class _Definition:
    """What one workflow is made of: its training sets and every answer :class:`Workflow` gives derive from it.

    Generation 0 trains on the ``real`` parameter's count of real examples when the workflow has one, else on
    ``real_size``; each synthetic set holds the ``synthetic`` parameter's count when the workflow has one, else
    ``multiplier`` times ``real_size``.
    """

    defaults: dict[str, float | int | None]
    """The workflow's parameters and their defaults (``None``: derived from the real size, or required)."""
    real: _Real
    synthetic: _Synthetic
    subsample: bool = False
    """Train on a fresh uniform random subset of ``size`` examples of the pool rather than the whole pool."""


_DEFINITIONS: dict[str, _Definition] = {
    "replace": _Definition({"multiplier": 1.0}, _Real.NONE, _Synthetic.NEWEST),
    "replace_multiple": _Definition({"multiplier": 2.0}, _Real.NONE, _Synthetic.NEWEST),
    "accumulate": _Definition({"multiplier": 1.0}, _Real.KEPT, _Synthetic.ALL),
    "accumulate_subsample": _Definition({"multiplier": 1.0, "size": None}, _Real.KEPT, _Synthetic.ALL, subsample=True),
    "mix": _Definition({"real": None, "synthetic": None}, _Real.KEPT, _Synthetic.NEWEST),
    "fresh_real": _Definition({"multiplier": 1.0, "per_generation": None}, _Real.GROWING, _Synthetic.ALL),
}
WORKFLOW_NAMES: tuple[str, ...] = tuple(_DEFINITIONS)
_INT_KEYS = {"size", "real", "synthetic", "per_generation"}
_SPEC_RE = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$")


def _valid_names() -> str:
    return ", ".join(WORKFLOW_NAMES)


@dataclass(frozen=True)
class TrainingSet:
    """The examples of one generation's training set, described without materialising them.

    ``sources`` is a tuple of ``(source, start, stop)``: ``source`` is :data:`REAL` or a synthetic-set
    index, and ``[start, stop)`` a contiguous range inside it. Their concatenation, in order, is the
    *pool*. ``subset`` is ``None`` (train on the whole pool) or sorted pool indices of shape ``(m,)``
    or, for recipes vectorised over seeds, ``(num_seeds, m)`` with an independent draw per seed.
    """

    generation: int
    sources: tuple[tuple[int, int, int], ...]
    subset: np.ndarray | None = None

    @property
    def pool_size(self) -> int:
        return sum(stop - start for _, start, stop in self.sources)

    @property
    def size(self) -> int:
        """Number of training examples (per seed)."""
        return self.pool_size if self.subset is None else int(self.subset.shape[-1])

    @property
    def offsets(self) -> np.ndarray:
        """Start of each source inside the pool, plus the pool size: shape ``(len(sources) + 1,)``."""
        return np.concatenate([[0], np.cumsum([stop - start for _, start, stop in self.sources])]).astype(np.int64)

    def locate(self, pool_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map pool indices to ``(source position in self.sources, row inside that source)``."""
        offsets = self.offsets
        pos = np.searchsorted(offsets, pool_index, side="right") - 1
        starts = np.array([start for _, start, _ in self.sources], dtype=np.int64)
        return pos, pool_index - offsets[pos] + starts[pos]

    def counts(self) -> dict[int, int]:
        """Examples taken from each source (for a per-seed subset: averaged over seeds, rounded)."""
        out: dict[int, int] = {}
        if self.subset is None:
            for source, start, stop in self.sources:
                out[source] = out.get(source, 0) + stop - start
            return out
        pos, _ = self.locate(self.subset)
        per_pos = np.stack([(pos == i).sum(axis=-1) for i in range(len(self.sources))], axis=-1)
        mean = per_pos.reshape(-1, len(self.sources)).mean(axis=0)
        for (source, _, _), c in zip(self.sources, mean):
            out[source] = out.get(source, 0) + int(round(float(c)))
        return out


@dataclass(frozen=True)
class Workflow:
    """A data workflow: how real and synthetic data mix at each generation. See the module docstring."""

    name: str
    params: dict[str, float | int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in _DEFINITIONS:
            raise WorkflowError(f"unknown workflow {self.name!r}; valid workflows: {_valid_names()}")
        unknown = set(self.params) - set(_DEFINITIONS[self.name].defaults)
        if unknown:
            raise WorkflowError(f"workflow {self.name!r} has no parameter {sorted(unknown)[0]!r}")
        # Fill in defaults so Workflow("accumulate") and Workflow.parse("accumulate") are the same.
        object.__setattr__(self, "params", {**_DEFINITIONS[self.name].defaults, **self.params})
        self._validate()

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str | Workflow) -> Workflow:
        """Parse ``"name"`` or ``"name(key=value, ...)"``; raise :class:`WorkflowError` on bad input."""
        if isinstance(spec, Workflow):
            return spec
        if not isinstance(spec, str):
            raise WorkflowError(f"workflow must be a string like 'accumulate', got {spec!r}")
        m = _SPEC_RE.match(spec)
        if not m:
            raise WorkflowError(f"cannot parse workflow {spec!r}: write name or name(key=value, ...)")
        name, args = m.group(1), m.group(2)
        if name not in _DEFINITIONS:
            raise WorkflowError(f"unknown workflow {name!r}; valid workflows: {_valid_names()}")
        params = dict(_DEFINITIONS[name].defaults)
        given: set[str] = set()
        if args and args.strip():
            for item in args.split(","):
                key, sep, raw = item.partition("=")
                key = key.strip()
                if not sep or not key:
                    raise WorkflowError(f"workflow {spec!r}: expected key=value, got {item.strip()!r}")
                if key not in params:
                    allowed = ", ".join(params) or "none"
                    raise WorkflowError(f"workflow {name!r} has no parameter {key!r}; its parameters: {allowed}")
                if key in given:
                    raise WorkflowError(f"workflow {spec!r} sets {key!r} twice")
                given.add(key)
                params[key] = _number(name, key, raw.strip())
        return cls(name, params)

    def _validate(self) -> None:
        p = self.params
        mult = p.get("multiplier")
        if mult is not None and not (mult > 0):
            raise WorkflowError(f"workflow {self.name!r}: multiplier must be > 0, got {mult}")
        for key in _INT_KEYS & p.keys():
            value = p[key]
            if value is not None and (value < 0 or (value == 0 and key != "synthetic")):
                least = "a non-negative" if key == "synthetic" else "a positive"
                raise WorkflowError(f"workflow {self.name!r}: {key} must be {least} integer, got {value}")
        if self.name == "mix" and (p["real"] is None or p["synthetic"] is None):
            raise WorkflowError("workflow 'mix' needs both counts, e.g. mix(real=256, synthetic=1024)")

    @property
    def label(self) -> str:
        """Canonical text form, used as the ``workflow`` column of metrics.csv."""
        defaults = self._definition.defaults
        changed = [f"{k}={_fmt(v)}" for k, v in self.params.items() if v != defaults[k]]
        return f"{self.name}({', '.join(changed)})" if changed else self.name

    def __str__(self) -> str:
        return self.label

    @property
    def _definition(self) -> _Definition:
        return _DEFINITIONS[self.name]

    # ---- questions about the workflow ----------------------------------------------------------
    @property
    def keeps_earlier_sets(self) -> bool:
        """Whether generation t trains on synthetic sets older than t-1 too, so a run must keep every set it draws.

        When false, a set is of no use once the next one is drawn.
        """
        return self._definition.synthetic is _Synthetic.ALL

    @property
    def fixed_counts(self) -> tuple[int, int] | None:
        """``(real, synthetic)`` examples per training set when the workflow fixes both counts (a real x synthetic
        cardinality cell, e.g. ``mix(real=256, synthetic=1024)``), else None (counts follow the real size)."""
        real, synthetic = self.params.get("real"), self.params.get("synthetic")
        return None if real is None or synthetic is None else (int(real), int(synthetic))

    @property
    def trains_on_whole_sets(self) -> bool:
        """Whether every training set takes whole sources rather than a random subsample of their rows.

        When true, a synthetic set may be summarised by its sufficient statistics instead of its rows.
        """
        return not self._definition.subsample

    @property
    def adds_real_data(self) -> bool:
        """Whether later generations train on real examples generation 0 does not use.

        Such a workflow needs more real examples than generation 0 trains on (see :meth:`real_needed`).
        """
        return self._definition.real is _Real.GROWING

    def smallest_training_set(self, real_size: int) -> tuple[str, int] | None:
        """The training sets that may be smaller than the ``real_size`` real examples: ``(what, size)``, or ``None``.

        ``what`` names what they consist of: ``"subsample"`` (every generation trains on that many drawn
        examples), ``"synthetic sets"`` (generations t > 0 train on one synthetic set alone) or ``"real set"``
        (generation 0 trains on a fixed count of real examples alone, later ones add synthetic examples).
        ``None`` means every generation trains on all ``real_size`` real examples, and perhaps more.
        """
        _check_size("real_size", real_size)
        if self._definition.subsample:
            return "subsample", self._subsample_size(real_size)
        if self._definition.real is _Real.NONE:
            return "synthetic sets", self.synthetic_size(real_size)
        if "real" in self.params:
            return "real set", self._real_rows(0, real_size)
        return None

    # ---- sizes ---------------------------------------------------------------------------------
    def synthetic_size(self, real_size: int) -> int:
        """Number of examples to sample from each trained model (size of every synthetic set)."""
        _check_size("real_size", real_size)
        if "synthetic" in self.params:
            return int(self.params["synthetic"])
        return max(1, int(round(float(self.params["multiplier"]) * real_size)))

    def real_needed(self, real_size: int, generations: int) -> int:
        """Real examples the run needs in total (more than generation 0 trains on only when :attr:`adds_real_data`)."""
        _check_size("real_size", real_size)
        needed = self._real_rows(0, real_size)
        if self.adds_real_data:  # the last generation sees the most
            needed += (generations - 1) * self._per_generation(real_size)
        return needed

    def check(self, real_size: int, generations: int, real_available: int | None = None) -> None:
        """Raise :class:`WorkflowError` when this workflow cannot run with these sizes."""
        _check_size("real_size", real_size)
        _check_size("generations", generations)
        synthetic = self.synthetic_size(real_size)
        if synthetic > MAX_COUNT:
            raise WorkflowError(
                f"workflow {self.label}: synthetic sets of {synthetic:.3g} examples ({real_size} real examples x "
                f"multiplier) are too large (at most 2**63 - 1); lower the multiplier"
            )
        if self._definition.subsample:
            size, pool = self._subsample_size(real_size), self._real_rows(0, real_size)
            if size > pool:
                raise WorkflowError(
                    f"{self.name} size={size} is larger than its pool at generation 0 "
                    f"({pool} real examples); use size <= {pool}"
                )
        needed = self.real_needed(real_size, generations)
        if real_available is not None and needed > real_available:
            raise WorkflowError(
                f"workflow {self.label} over {generations} generations needs {needed} real examples, "
                f"but only {real_available} are available"
            )

    def _real_rows(self, generation: int, real_size: int) -> int:
        """Length of the prefix of the real set that ``generation`` trains on (0: none)."""
        real = self._definition.real
        if real is _Real.NONE and generation > 0:
            return 0
        first = int(self.params["real"]) if "real" in self.params else real_size
        return first + generation * self._per_generation(real_size) if real is _Real.GROWING else first

    def _per_generation(self, real_size: int) -> int:
        value = self.params.get("per_generation")
        return real_size if value is None else int(value)

    def _subsample_size(self, real_size: int) -> int:
        value = self.params.get("size")
        return real_size if value is None else int(value)

    # ---- the definition ------------------------------------------------------------------------
    def training_set(
        self,
        generation: int,
        real_size: int,
        seed: int = 0,
        num_seeds: int | None = None,
    ) -> TrainingSet:
        """The training set of ``generation`` (0-based).

        ``real_size`` is the size of the real set at generation 0. Randomness (only
        ``accumulate_subsample`` draws) comes from ``(seed, generation)`` alone, so a resumed run
        draws exactly what an unbroken one would. With ``num_seeds`` the subset has shape
        ``(num_seeds, m)``, an independent draw per seed.
        """
        if generation < 0:
            raise WorkflowError(f"generation must be >= 0, got {generation}")
        self.check(real_size, generation + 1)
        syn = self.synthetic_size(real_size)
        t = generation
        real_stop = self._real_rows(t, real_size)
        first_set = 0 if self.keeps_earlier_sets else max(t - 1, 0)
        sources = ((REAL, 0, real_stop),) if real_stop else ()
        if syn > 0:  # mix(synthetic=0) trains on its real examples alone
            sources += tuple((k, 0, syn) for k in range(first_set, t))
        ts = TrainingSet(t, sources)
        if self.trains_on_whole_sets:
            return ts
        size = self._subsample_size(real_size)
        if size == ts.pool_size:
            return ts
        rng = np.random.default_rng([seed, generation, 0x5AB5])
        return TrainingSet(t, sources, _subsample(rng, ts.pool_size, size, num_seeds))


def parse_workflows(specs: str | Workflow | list | tuple) -> list[Workflow]:
    """Parse one workflow spec or a list of them (the ``--workflow`` flag)."""
    if isinstance(specs, (str, Workflow)):
        specs = [specs]
    if not specs:
        raise WorkflowError(f"--workflow is empty; valid workflows: {_valid_names()}")
    out = [Workflow.parse(s) for s in specs]
    labels = [w.label for w in out]
    dup = {label for label in labels if labels.count(label) > 1}
    if dup:
        raise WorkflowError(f"--workflow lists {sorted(dup)[0]!r} twice")
    return out


def _subsample(rng: np.random.Generator, pool: int, size: int, num_seeds: int | None) -> np.ndarray:
    """Sorted uniform draws of ``size`` distinct indices out of ``range(pool)``."""
    if num_seeds is None:
        return np.sort(rng.choice(pool, size=size, replace=False)).astype(np.int64)
    if size > 4096:
        # The `size` smallest of `pool` uniform keys form a uniform subset: O(num_seeds * pool).
        keys = rng.random((num_seeds, pool), dtype=np.float32)
        return np.sort(np.argpartition(keys, size - 1, axis=1)[:, :size], axis=1).astype(np.int64)
    # Floyd's algorithm, one independent draw per seed at once: O(size) vectorised steps. Step j
    # picks r uniform in [0, j]; if r is taken it takes j instead, which keeps every subset equally likely.
    taken = np.zeros((num_seeds, pool), dtype=bool)
    out = np.empty((num_seeds, size), dtype=np.int64)
    seeds = np.arange(num_seeds)
    for k, j in enumerate(range(pool - size, pool)):
        r = rng.integers(0, j + 1, size=num_seeds)
        pick = np.where(taken[seeds, r], j, r)
        taken[seeds, pick] = True
        out[:, k] = pick
    return np.sort(out, axis=1)


MAX_COUNT = 2**63 - 1
"""The largest example count a workflow may name or imply: the largest 64-bit integer (beyond it counts overflow
the arrays that hold them, and a count of hundreds of digits would name a cell file longer than a file name)."""


def _number(name: str, key: str, raw: str) -> float | int:
    try:
        value = float(raw)
    except ValueError:
        raise WorkflowError(f"workflow {name!r}: {key}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise WorkflowError(f"workflow {name!r}: {key}={raw!r} is not a finite number")
    if key in _INT_KEYS:
        if value != int(value):
            raise WorkflowError(f"workflow {name!r}: {key} must be an integer, got {raw}")
        if value > MAX_COUNT:
            raise WorkflowError(f"workflow {name!r}: {key}={raw} is too large (at most 2**63 - 1 examples)")
        return int(value)
    return value


def _fmt(v: float | int | None) -> str:
    if not isinstance(v, float):
        return str(v)
    short = f"{v:g}"  # "2" rather than "2.0", but never at the cost of a digit
    return short if float(short) == v else repr(v)


def _check_size(what: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise WorkflowError(f"{what} must be a positive integer, got {value!r}")


__all__ = ["REAL", "WORKFLOW_NAMES", "TrainingSet", "Workflow", "WorkflowError", "parse_workflows"]
