"""Every sweep file launches its recipe with real flags and names a metric the recipe logs: render each command and
parse it."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from collapse.cli import parse_config
from datamodules.workflows import parse_workflows
from engine.analytic import AnalyticConfig
from tooling.published import recipe_metrics

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def config_class(program: str):
    module = importlib.import_module(program.removesuffix(".py").replace("/", "."))
    found = [
        c
        for n, c in inspect.getmembers(module, inspect.isclass)
        if n.endswith("Config")
        and c.__module__ == module.__name__
        and "out_dir" in getattr(c, "__dataclass_fields__", {})
    ]
    assert len(found) == 1, f"{program}: expected one recipe config dataclass (the one with out_dir), found {found}"
    return found[0]


def logged_metrics(program: str) -> set[str]:
    """The metric names a recipe logs to W&B: its problem's ``metrics`` (an analytic recipe logs exactly those), else
    the ``test_...``/``sample_...`` names its source documents (a Lightning recipe)."""
    module = importlib.import_module(program.removesuffix(".py").replace("/", "."))
    problems = [
        c.metrics
        for _, c in inspect.getmembers(module, inspect.isclass)
        if c.__module__ == module.__name__ and isinstance(getattr(c, "metrics", None), tuple)
    ]
    if problems:
        return set().union(*problems)
    return {m for m in recipe_metrics(Path(program).stem) if m.startswith(("test_", "val_", "sample_"))}


def test_there_are_sweeps():
    assert {p.stem for p in SWEEPS} >= {"gaussian", "linear_regression", "kde", "mnist_vae"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_renders_to_a_valid_command_for_every_value(path):
    check_sweep(path)


@pytest.mark.parametrize(
    ("parameters", "flag"),
    [
        ({"workflow": {"values": ["replace"]}, "no_such_flag": {"value": 3}}, "no_such_flag"),
        ({"workflow": {"values": ["replace"]}, "data.no_such_field": {"value": 1}}, "no_such_field"),
        ({"workflow": {"values": ["replace"]}, "batch_size": {"values": ["many"]}}, "batch_size"),
    ],
)
def test_a_sweep_naming_a_flag_the_recipe_lacks_is_caught(tmp_path, capsys, parameters, flag):
    with pytest.raises(SystemExit):
        check_sweep(_sweep(tmp_path, "recipes/mnist_vae.py", "test_loss", parameters))
    assert flag in capsys.readouterr().err


def _sweep(tmp_path: Path, program: str, metric: str, parameters: dict) -> Path:
    spec = {
        "program": program,
        "method": "grid",
        "metric": {"name": metric, "goal": "minimize"},
        "parameters": parameters,
        "command": ["${env}", "python", "${program}", "--out_dir=runs/x/{hash}", "${args}"],
    }
    path = tmp_path / "bad.yaml"
    path.write_text("# wandb sweep sweeps/bad.yaml && wandb agent <sweep_id>\n" + yaml.safe_dump(spec))
    return path


ONE_CELL = {"workflow": {"values": ["replace"]}, "dim": {"value": 1}, "n_samples": {"value": 10}}


@pytest.mark.parametrize(
    ("program", "metric"),
    [
        ("recipes/gaussian.py", "generation"),  # a step counter, not a metric
        ("recipes/gaussian.py", "replace dim=1 n_samples=10/mean_sq_error"),  # a grid cell's name in front
        ("recipes/gaussian.py", "test_mse"),  # another recipe's metric
        ("recipes/mnist_vae.py", "test/loss"),  # the spelling of older versions
    ],
)
def test_a_sweep_naming_a_metric_the_recipe_does_not_log_is_caught(tmp_path, program, metric):
    parameters = ONE_CELL if "gaussian" in program else {"workflow": {"values": ["replace"]}}
    with pytest.raises(AssertionError, match="logs no metric"):
        check_sweep(_sweep(tmp_path, program, metric, parameters))


def test_an_analytic_sweep_whose_runs_hold_several_grid_cells_is_caught(tmp_path):
    parameters = {k: v for k, v in ONE_CELL.items() if k != "n_samples"}  # n_samples keeps its list default
    with pytest.raises(AssertionError, match="n_samples"):
        check_sweep(_sweep(tmp_path, "recipes/gaussian.py", "mean_sq_error", parameters))


def check_sweep(path: Path) -> None:
    """Render every value of every parameter of a sweep file into its recipe's config; fail on any flag it lacks,
    on a metric the recipe does not log, and on an analytic sweep run that would hold several grid cells (its
    metrics would then go to one W&B run per cell, not to the sweep's run)."""
    text = path.read_text()
    assert text.startswith("# wandb sweep sweeps/"), "a sweep file opens with the command that launches it"
    spec = yaml.safe_load(text)
    assert {"program", "method", "metric", "parameters", "command"} <= spec.keys()
    assert "${args}" in spec["command"]
    metric, logged = spec["metric"], logged_metrics(spec["program"])
    assert metric.get("goal") in ("minimize", "maximize"), metric
    assert metric.get("name") in logged, f"{spec['program']} logs no metric {metric.get('name')!r}: {sorted(logged)}"
    cls = config_class(spec["program"])
    fixed = [c for c in spec["command"] if c.startswith("--")]
    params = spec["parameters"]
    names = list(params)
    choices = [p["values"] if "values" in p else [p["value"]] for p in params.values()]
    # Every value of every parameter appears at least once (a diagonal walk, not the full product).
    longest = max(len(c) for c in choices)
    for i in range(longest):
        combo = [c[i % len(c)] for c in choices]
        args = [f"--{k}={v}" for k, v in zip(names, combo)]
        cfg = parse_config(cls, fixed + args)
        for k, v in zip(names, combo):
            got = functools.reduce(getattr, k.split("."), cfg)  # dotted names are nested flags: data.source
            assert got == v or str(got) == str(v), (k, v, got)
        parse_workflows(cfg.workflow)
        if isinstance(cfg, AnalyticConfig):
            lists = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
            several = sorted(name for name, value in lists.items() if isinstance(value, list) and len(value) > 1)
            assert not several, f"a sweep run would hold several grid cells: give {', '.join(several)} one value"
