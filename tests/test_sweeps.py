"""Every sweep file launches its recipe with real flags: render each command and parse it."""

from __future__ import annotations

import functools
import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from collapse.cli import parse_config
from datamodules.workflows import parse_workflows

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
    bad = tmp_path / "bad.yaml"
    spec = {
        "program": "recipes/mnist_vae.py",
        "method": "grid",
        "metric": {"name": "test/loss", "goal": "minimize"},
        "parameters": parameters,
        "command": ["${env}", "python", "${program}", "--out_dir=runs/x/{hash}", "${args}"],
    }
    bad.write_text("# wandb sweep sweeps/bad.yaml && wandb agent <sweep_id>\n" + yaml.safe_dump(spec))
    with pytest.raises(SystemExit):
        check_sweep(bad)
    assert flag in capsys.readouterr().err


def check_sweep(path: Path) -> None:
    """Render every value of every parameter of a sweep file into its recipe's config; fail on any flag it lacks."""
    text = path.read_text()
    assert text.startswith("# wandb sweep sweeps/"), "a sweep file opens with the command that launches it"
    spec = yaml.safe_load(text)
    assert {"program", "method", "metric", "parameters", "command"} <= spec.keys()
    assert "${args}" in spec["command"]
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
