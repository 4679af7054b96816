"""The lower bounds in pyproject.toml hold here, and the features they are there for exist."""

from __future__ import annotations

import inspect
import re
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")


def lower_bounds() -> dict[str, Version]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?>=([0-9.]+)", dep.replace(" ", ""))
        assert m, f"dependency {dep!r} should state a lower bound (name>=version)"
        bounds[m.group(1)] = Version(m.group(3))
    return bounds


@pytest.mark.parametrize("name", sorted(lower_bounds()))
def test_installed_versions_meet_the_lower_bounds(name):
    installed = Version(version(name).split("+")[0])
    assert installed >= lower_bounds()[name]


def test_wandb_bound_covers_the_reinit_value_used():
    import wandb

    from collapse import tracking

    assert 'reinit="finish_previous"' in inspect.getsource(tracking)
    assert "finish_previous" in str(inspect.signature(wandb.init).parameters["reinit"].annotation)
    assert lower_bounds()["wandb"] >= Version("0.19.10")  # the first release with string reinit values


def test_torch_bound_covers_grouped_query_attention():
    import torch
    import torch.nn.functional as F

    q = torch.randn(1, 4, 3, 8)  # (B, H, T, D), 4 query heads sharing 2 key/value heads
    kv = torch.randn(1, 2, 3, 8)
    assert F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True).shape == (1, 4, 3, 8)
    assert lower_bounds()["torch"] >= Version("2.5")  # enable_gqa arrived in torch 2.5
