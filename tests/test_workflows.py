"""Cardinalities and invariants of every workflow in ``datamodules.workflows``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collapse.errors import UserError
from datamodules.workflows import REAL, WORKFLOW_NAMES, TrainingSet, Workflow, WorkflowError, parse_workflows

PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

real_sizes = st.integers(min_value=1, max_value=400)
generations = st.integers(min_value=0, max_value=8)
multipliers = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0]) | st.floats(min_value=0.01, max_value=4.0)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def synthetic(multiplier: float, real_size: int) -> int:
    """Reference synthetic-set size: ``multiplier`` times the real size, rounded, at least one example."""
    return max(1, int(round(multiplier * real_size)))


@st.composite
def workflow_cases(draw) -> tuple[Workflow, int]:
    """A workflow of any kind with random parameters, and a real size it can run with."""
    n = draw(real_sizes)
    name = draw(st.sampled_from(WORKFLOW_NAMES))
    params: dict[str, object] = {}
    if name != "mix" and draw(st.booleans()):
        params["multiplier"] = draw(multipliers)
    if name == "accumulate_subsample" and draw(st.booleans()):
        params["size"] = draw(st.integers(min_value=1, max_value=n))
    if name == "mix":
        params["real"] = draw(st.integers(min_value=1, max_value=500))
        params["synthetic"] = draw(st.integers(min_value=0, max_value=500))
    if name == "fresh_real" and draw(st.booleans()):
        params["per_generation"] = draw(st.integers(min_value=1, max_value=300))
    spec = f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})" if params else name
    return Workflow.parse(spec), n


def assert_valid_subset(ts: TrainingSet, size: int) -> None:
    """Sorted, distinct pool indices, ``size`` per row."""
    subset = np.atleast_2d(ts.subset)
    assert subset.shape[-1] == size == ts.size
    assert subset.dtype == np.int64
    assert subset.min() >= 0 and subset.max() < ts.pool_size
    assert np.all(np.diff(subset, axis=-1) > 0), "indices must be sorted and unique"


# ---- every workflow ----------------------------------------------------------------------------


@PROPERTY
@given(workflow_cases(), seeds)
def test_generation_zero_is_real_only(case, seed):
    wf, n = case
    ts = wf.training_set(0, n, seed=seed)
    assert ts.generation == 0
    assert all(source == REAL for source, _, _ in ts.sources)
    real = int(wf.params["real"]) if wf.name == "mix" else n
    assert ts.sources == ((REAL, 0, real),)
    assert ts.pool_size == real
    expected = wf.params.get("size") or real
    assert ts.size == expected
    assert ts.counts() == {REAL: expected}


@PROPERTY
@given(workflow_cases(), generations, seeds)
def test_sources_are_valid_ranges(case, t, seed):
    wf, n = case
    ts = wf.training_set(t, n, seed=seed)
    m = wf.synthetic_size(n)
    for source, start, stop in ts.sources:
        assert 0 <= start < stop
        assert source == REAL or 0 <= source < t, "generation t may only use synthetic sets 0 .. t-1"
        if source != REAL:
            assert stop <= m
    assert ts.pool_size == sum(stop - start for _, start, stop in ts.sources)
    assert ts.size <= ts.pool_size


@PROPERTY
@given(workflow_cases(), st.integers(min_value=1, max_value=8), seeds)
def test_real_needed_is_the_largest_real_index_used(case, num_generations, seed):
    wf, n = case
    largest = 0
    for t in range(num_generations):
        for source, _, stop in wf.training_set(t, n, seed=seed).sources:
            if source == REAL:
                largest = max(largest, stop)
    assert wf.real_needed(n, num_generations) == largest
    wf.check(n, num_generations, real_available=largest)
    with pytest.raises(WorkflowError, match=f"needs {largest} real examples"):
        wf.check(n, num_generations, real_available=largest - 1)


@PROPERTY
@given(workflow_cases(), generations, seeds, st.data())
def test_locate_agrees_with_offsets(case, t, seed, data):
    wf, n = case
    ts = wf.training_set(t, n, seed=seed)
    offsets = ts.offsets
    assert offsets[0] == 0 and offsets[-1] == ts.pool_size and len(offsets) == len(ts.sources) + 1
    assert np.all(np.diff(offsets) == [stop - start for _, start, stop in ts.sources])

    # The whole pool, in order, is the concatenation of the source ranges.
    pos, row = ts.locate(np.arange(ts.pool_size))
    expected_pos = np.concatenate([np.full(stop - start, i) for i, (_, start, stop) in enumerate(ts.sources)])
    expected_row = np.concatenate([np.arange(start, stop) for _, start, stop in ts.sources])
    np.testing.assert_array_equal(pos, expected_pos)
    np.testing.assert_array_equal(row, expected_row)

    # Any pool index maps back to itself through the offsets.
    idx = np.array(data.draw(st.lists(st.integers(0, ts.pool_size - 1), min_size=1, max_size=50)))
    pos, row = ts.locate(idx)
    starts = np.array([start for _, start, _ in ts.sources])
    np.testing.assert_array_equal(offsets[pos] + row - starts[pos], idx)
    assert np.all(idx >= offsets[pos]) and np.all(idx < offsets[pos + 1])

    counts = ts.counts()
    if ts.subset is None:
        assert sum(counts.values()) == ts.size


@PROPERTY
@given(workflow_cases())
def test_label_round_trips(case):
    wf, _ = case
    again = Workflow.parse(wf.label)
    assert again == wf
    assert again.label == wf.label == str(wf)
    assert Workflow.parse(wf) is wf


@PROPERTY
@given(st.sampled_from(["replace", "accumulate", "fresh_real"]), st.floats(min_value=1e-6, max_value=1e6))
def test_label_keeps_every_digit_of_a_multiplier(name, multiplier):
    wf = Workflow.parse(f"{name}(multiplier={multiplier!r})")
    assert Workflow.parse(wf.label).params["multiplier"] == multiplier


def test_nearby_multipliers_get_distinct_labels():
    a, b = parse_workflows(["accumulate(multiplier=1.0000001)", "accumulate(multiplier=1.0000002)"])
    assert a.label != b.label
    assert a.label != "accumulate" and Workflow.parse(a.label) == a


def test_label_is_canonical():
    assert Workflow.parse("accumulate(multiplier=1)").label == "accumulate"
    assert Workflow.parse("replace_multiple(multiplier=2)").label == "replace_multiple"
    assert Workflow.parse("replace_multiple(multiplier=3.0)").label == "replace_multiple(multiplier=3)"
    assert Workflow.parse(" mix ( real = 1e3 , synthetic=0 ) ").label == "mix(real=1000, synthetic=0)"
    assert Workflow.parse("accumulate_subsample(size=50, multiplier=0.5)").label == (
        "accumulate_subsample(multiplier=0.5, size=50)"
    )


# ---- what a workflow says about itself ---------------------------------------------------------

# name -> (a spec of it, keeps_earlier_sets, trains_on_whole_sets, adds_real_data, smallest_training_set(10),
# fixed_counts). Every workflow must appear here, so a new one has to state each answer.
ANSWERS: dict[str, tuple[str, bool, bool, bool, tuple[str, int] | None, tuple[int, int] | None]] = {
    "replace": ("replace(multiplier=0.5)", False, True, False, ("synthetic sets", 5), None),
    "replace_multiple": ("replace_multiple", False, True, False, ("synthetic sets", 20), None),
    "accumulate": ("accumulate(multiplier=0.3)", True, True, False, None, None),
    "accumulate_subsample": ("accumulate_subsample(size=4)", True, False, False, ("subsample", 4), None),
    "mix": ("mix(real=6, synthetic=3)", False, True, False, ("real set", 6), (6, 3)),
    "fresh_real": ("fresh_real(per_generation=2)", True, True, True, None, None),
}


def test_every_workflow_states_its_answers():
    assert set(ANSWERS) == set(WORKFLOW_NAMES)


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_answers_of_each_workflow(name):
    spec, keeps_earlier_sets, trains_on_whole_sets, adds_real_data, smallest, fixed_counts = ANSWERS[name]
    wf = Workflow.parse(spec)
    assert wf.name == name
    assert wf.keeps_earlier_sets is keeps_earlier_sets
    assert wf.trains_on_whole_sets is trains_on_whole_sets
    assert wf.adds_real_data is adds_real_data
    assert wf.smallest_training_set(10) == smallest
    assert wf.fixed_counts == fixed_counts


def test_smallest_training_set_defaults_follow_the_real_size():
    assert Workflow.parse("replace").smallest_training_set(7) == ("synthetic sets", 7)
    assert Workflow.parse("accumulate_subsample").smallest_training_set(7) == ("subsample", 7)
    assert Workflow.parse("mix(real=3, synthetic=0)").smallest_training_set(7) == ("real set", 3)
    assert Workflow.parse("fresh_real").smallest_training_set(7) is None
    with pytest.raises(WorkflowError, match="real_size must be a positive integer"):
        Workflow.parse("replace").smallest_training_set(0)


@PROPERTY
@given(workflow_cases(), st.integers(min_value=3, max_value=8), seeds)
def test_answers_agree_with_the_training_sets(case, num_generations, seed):
    wf, n = case
    sets = [wf.training_set(t, n, seed=seed) for t in range(num_generations)]
    older = any(src != REAL and src < ts.generation - 1 for ts in sets for src, _, _ in ts.sources)
    assert wf.keeps_earlier_sets == older  # generation 2 on would train on synthetic set 0
    if wf.trains_on_whole_sets:
        assert all(ts.subset is None for ts in sets)
    else:  # generation 1's pool holds the real set and synthetic set 0, more than any subsample
        assert sets[1].subset is not None
    first_real = sets[0].pool_size
    assert wf.adds_real_data == (wf.real_needed(n, num_generations) > first_real)

    smallest = wf.smallest_training_set(n)
    if smallest is None:
        assert all(ts.sources[0][0] == REAL and ts.sources[0][2] >= n for ts in sets), "all hold the whole real set"
        return
    what, size = smallest
    if what == "real set":
        assert sets[0].size == size == min(ts.size for ts in sets)
    else:  # synthetic sets or subsample: every later generation trains on exactly that many examples
        assert {ts.size for ts in sets[1:]} == {size}


# ---- one workflow at a time --------------------------------------------------------------------


@PROPERTY
@given(real_sizes, st.integers(min_value=1, max_value=8), multipliers)
def test_replace_uses_exactly_the_previous_synthetic_set(n, t, multiplier):
    wf = Workflow.parse(f"replace(multiplier={multiplier!r})")
    m = wf.synthetic_size(n)
    assert m == synthetic(multiplier, n)
    ts = wf.training_set(t, n)
    assert ts.sources == ((t - 1, 0, m),)
    assert ts.subset is None and ts.size == m
    assert ts.counts() == {t - 1: m}


@PROPERTY
@given(real_sizes, st.integers(min_value=1, max_value=8), st.integers(min_value=1, max_value=5))
def test_replace_multiple_sizes_are_multiplier_times_real(n, t, k):
    assert Workflow.parse("replace_multiple").synthetic_size(n) == 2 * n
    wf = Workflow.parse(f"replace_multiple(multiplier={k})")
    assert wf.synthetic_size(n) == k * n
    assert wf.training_set(t, n).sources == ((t - 1, 0, k * n),)
    assert wf.training_set(t, n).size == k * n


@PROPERTY
@given(real_sizes, generations, multipliers)
def test_accumulate_is_real_plus_every_synthetic_set(n, t, multiplier):
    wf = Workflow.parse(f"accumulate(multiplier={multiplier!r})")
    m = synthetic(multiplier, n)
    ts = wf.training_set(t, n)
    assert ts.sources == ((REAL, 0, n),) + tuple((k, 0, m) for k in range(t))
    assert ts.subset is None
    assert ts.size == ts.pool_size == n + t * m
    assert ts.counts() == {REAL: n, **{k: m for k in range(t)}}


@st.composite
def subsample_cases(draw):
    """(workflow, real size, subsample size) with a subsample of at least 10 out of at least 30 examples."""
    n = draw(st.integers(min_value=30, max_value=300))
    size = draw(st.none() | st.integers(min_value=10, max_value=n))
    multiplier = draw(multipliers)
    spec = f"accumulate_subsample(multiplier={multiplier!r}" + ("" if size is None else f", size={size}") + ")"
    return Workflow.parse(spec), n, n if size is None else size


@PROPERTY
@given(subsample_cases(), generations, seeds)
def test_accumulate_subsample_draws_from_the_accumulate_pool(case, t, seed):
    wf, n, size = case
    ts = wf.training_set(t, n, seed=seed)
    pool = Workflow.parse(f"accumulate(multiplier={wf.params['multiplier']!r})").training_set(t, n)
    assert ts.sources == pool.sources
    assert ts.size == size
    if size == ts.pool_size:  # generation 0 with the default size: the whole real set
        assert t == 0 and ts.subset is None
    else:
        assert ts.subset.shape == (size,)
        assert_valid_subset(ts, size)
        assert sum(ts.counts().values()) == size


@PROPERTY
@given(subsample_cases(), generations, seeds)
def test_accumulate_subsample_is_deterministic_and_fresh_each_generation(case, t, seed):
    wf, n, size = case
    t = t + 1  # pools of at least 2n: a repeated draw is astronomically unlikely
    ts = wf.training_set(t, n, seed=seed)
    np.testing.assert_array_equal(ts.subset, wf.training_set(t, n, seed=seed).subset)
    assert not np.array_equal(ts.subset, wf.training_set(t + 1, n, seed=seed).subset)
    assert not np.array_equal(ts.subset, wf.training_set(t - 1, n, seed=seed).subset)
    assert not np.array_equal(ts.subset, wf.training_set(t, n, seed=seed + 1).subset)


@PROPERTY
@given(subsample_cases(), st.integers(min_value=1, max_value=6), st.integers(min_value=2, max_value=12), seeds)
def test_accumulate_subsample_per_seed_draws(case, t, num_seeds, seed):
    wf, n, size = case
    ts = wf.training_set(t, n, seed=seed, num_seeds=num_seeds)
    assert ts.subset.shape == (num_seeds, size)
    assert ts.size == size
    assert_valid_subset(ts, size)
    np.testing.assert_array_equal(ts.subset, wf.training_set(t, n, seed=seed, num_seeds=num_seeds).subset)
    # Independent draws differ unless the pool has few subsets of this size (30 of 31: two of 5 seeds may match).
    if math.comb(ts.pool_size, size) >= 10**12:
        assert len({tuple(row) for row in ts.subset}) == num_seeds, "each seed draws its own subset"
        assert not np.array_equal(ts.subset, wf.training_set(t, n, seed=seed + 1, num_seeds=num_seeds).subset)


@pytest.mark.parametrize("per_seed", [False, True])
def test_accumulate_subsample_share_is_proportional_to_source_sizes(per_seed):
    n, t, size = 100, 3, 50
    wf = Workflow.parse(f"accumulate_subsample(multiplier=0.5, size={size})")  # sources of 100, 50, 50, 50
    expected = np.array([100, 50, 50, 50]) / 250
    if per_seed:
        ts = wf.training_set(t, n, seed=7, num_seeds=4000)
        pos, _ = ts.locate(ts.subset)
        assert ts.counts() == {REAL: 20, 0: 10, 1: 10, 2: 10}  # per-seed means, rounded
    else:
        draws = [wf.training_set(t, n, seed=s) for s in range(400)]
        pos = np.concatenate([ts.locate(ts.subset)[0] for ts in draws])
    share = np.bincount(pos.ravel(), minlength=4) / pos.size
    np.testing.assert_allclose(share, expected, atol=0.02)


def test_accumulate_subsample_default_size_is_the_real_size():
    wf = Workflow.parse("accumulate_subsample")
    assert wf.training_set(0, 64).subset is None
    for t in range(1, 5):
        ts = wf.training_set(t, 64)
        assert ts.size == 64 and ts.pool_size == 64 * (t + 1)


@PROPERTY
@given(
    st.integers(min_value=1, max_value=500),
    st.integers(min_value=0, max_value=500),
    real_sizes,
    st.integers(min_value=1, max_value=8),
)
def test_mix_takes_fixed_real_and_previous_synthetic(real, syn, n, t):
    wf = Workflow.parse(f"mix(real={real}, synthetic={syn})")
    assert wf.synthetic_size(n) == syn
    assert wf.real_needed(n, t + 1) == real
    first = wf.training_set(0, n)
    assert first.sources == ((REAL, 0, real),)
    ts = wf.training_set(t, n)
    assert ts.sources[0] == (REAL, 0, real), "the same real examples every generation"
    if syn == 0:
        assert ts.sources == ((REAL, 0, real),)
    else:
        assert ts.sources[1:] == ((t - 1, 0, syn),)
    assert ts.size == real + syn
    assert ts.counts() == ({REAL: real} if syn == 0 else {REAL: real, t - 1: syn})


@PROPERTY
@given(real_sizes, generations, st.none() | st.integers(min_value=1, max_value=300), multipliers)
def test_fresh_real_grows_the_real_range(n, t, per_generation, multiplier):
    spec = f"fresh_real(multiplier={multiplier!r}" + (
        "" if per_generation is None else f", per_generation={per_generation}"
    )
    wf = Workflow.parse(spec + ")")
    p = n if per_generation is None else per_generation
    m = synthetic(multiplier, n)
    ts = wf.training_set(t, n)
    assert ts.sources == ((REAL, 0, n + t * p),) + tuple((k, 0, m) for k in range(t))
    assert ts.size == n + t * p + t * m
    assert wf.real_needed(n, t + 1) == n + t * p
    if t > 0:
        prev = wf.training_set(t - 1, n)
        assert ts.sources[0][2] - prev.sources[0][2] == p


def test_training_set_draws_depend_only_on_seed_and_generation():
    wf = Workflow.parse("accumulate_subsample(size=20)")
    late = wf.training_set(5, 40, seed=3).subset
    for t in range(5):
        wf.training_set(t, 40, seed=3)
    np.testing.assert_array_equal(wf.training_set(5, 40, seed=3).subset, late)


# ---- bad input ---------------------------------------------------------------------------------


def test_errors_are_user_errors():
    assert issubclass(WorkflowError, UserError) and issubclass(WorkflowError, ValueError)


@pytest.mark.parametrize("spec", ["acumulate", "replace-multiple", "Accumulate", "mix_real(real=1)"])
def test_unknown_name_lists_the_valid_ones(spec):
    with pytest.raises(WorkflowError, match="unknown workflow") as err:
        Workflow.parse(spec)
    for name in WORKFLOW_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("accumulate(size=3)", "has no parameter 'size'; its parameters: multiplier"),
        ("replace(per_generation=3)", "has no parameter 'per_generation'"),
        ("mix(real=3, synthetic=4, multiplier=2)", "has no parameter 'multiplier'; its parameters: real, synthetic"),
        ("accumulate(multiplier)", "expected key=value"),
        ("accumulate(=2)", "expected key=value"),
        ("accumulate(multiplier=2,)", "expected key=value"),
        ("accumulate(", "cannot parse"),
        ("accumulate multiplier=2", "cannot parse"),
        ("", "cannot parse"),
        ("accumulate(multiplier=two)", "is not a number"),
        ("accumulate(multiplier=)", "is not a number"),
        ("accumulate_subsample(size=10k)", "is not a number"),
        ("accumulate(multiplier=inf)", "not a finite number"),
        ("accumulate(multiplier=nan)", "not a finite number"),
        ("accumulate_subsample(size=inf)", "not a finite number"),
        ("accumulate_subsample(size=nan)", "not a finite number"),
        ("mix(real=1e400, synthetic=1)", "not a finite number"),
        ("accumulate(multiplier=0)", "multiplier must be > 0"),
        ("replace(multiplier=-1)", "multiplier must be > 0"),
        ("accumulate_subsample(size=0)", "size must be a positive integer"),
        ("accumulate_subsample(size=-5)", "size must be a positive integer"),
        ("fresh_real(per_generation=0)", "per_generation must be a positive integer"),
        ("mix(real=0, synthetic=5)", "real must be a positive integer"),
        ("mix(real=5, synthetic=-1)", "synthetic must be a non-negative integer"),
        ("accumulate_subsample(size=2.5)", "size must be an integer"),
        ("mix(real=10.5, synthetic=1)", "real must be an integer"),
        ("mix", "needs both counts"),
        ("mix(real=5)", "needs both counts"),
        ("mix(synthetic=5)", "needs both counts"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(WorkflowError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Workflow.parse(spec)


@pytest.mark.parametrize("spec", [None, 3, ["accumulate"]])
def test_non_string_specs_are_refused(spec):
    with pytest.raises(WorkflowError, match="must be a string"):
        Workflow.parse(spec)


def test_subsample_larger_than_the_real_set_is_refused():
    wf = Workflow.parse("accumulate_subsample(size=11)")
    with pytest.raises(WorkflowError, match=r"size=11 is larger than .*10 real examples.*size <= 10"):
        wf.check(10, 3)
    with pytest.raises(WorkflowError, match="larger than"):
        wf.training_set(2, 10)
    wf.check(11, 3)


@pytest.mark.parametrize("real_size", [0, -3, 2.5, "10", None])
def test_bad_real_sizes_are_refused(real_size):
    wf = Workflow.parse("accumulate")
    with pytest.raises(WorkflowError, match="real_size must be a positive integer"):
        wf.synthetic_size(real_size)
    with pytest.raises(WorkflowError, match="real_size must be a positive integer"):
        wf.training_set(1, real_size)


def test_bad_generations_are_refused():
    wf = Workflow.parse("accumulate")
    with pytest.raises(WorkflowError, match="generation must be >= 0"):
        wf.training_set(-1, 10)
    with pytest.raises(WorkflowError, match="generations must be a positive integer"):
        wf.check(10, 0)


def test_numpy_integer_sizes_are_accepted():
    ts = Workflow.parse("accumulate").training_set(2, np.int64(10))
    assert ts.size == 30


@pytest.mark.parametrize(
    "specs",
    [
        ["accumulate", "accumulate"],
        ["replace_multiple", "replace_multiple(multiplier=2)"],
        ["mix(real=1, synthetic=2)", "replace", "mix(synthetic=2, real=1)"],
        ["accumulate_subsample(size=5)", " accumulate_subsample( size = 5.0 )"],
    ],
)
def test_duplicate_workflows_are_refused(specs):
    with pytest.raises(WorkflowError, match="twice"):
        parse_workflows(specs)


def test_parse_workflows():
    assert parse_workflows("replace") == [Workflow.parse("replace")]
    wfs = parse_workflows(["replace", Workflow.parse("accumulate"), "mix(real=2, synthetic=0)"])
    assert [w.label for w in wfs] == ["replace", "accumulate", "mix(real=2, synthetic=0)"]
    assert parse_workflows(tuple(wfs)) == wfs
    with pytest.raises(WorkflowError, match="empty; valid workflows: replace"):
        parse_workflows([])
