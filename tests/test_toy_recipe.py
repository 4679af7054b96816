"""The Lightning reference recipe from its command line, through to the report."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tooling.report import make_report

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--generations", "2", "--data.num_train", "64", "--data.num_val", "16", "--data.num_test", "32",
        "--trainer.max_epochs", "2", "--batch_size", "32", "--wandb.mode", "disabled"]  # fmt: skip


def recipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "recipes/toy_gaussian.py", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_command_line_runs_resumes_and_reports(tmp_path):
    runs = []
    for workflow in ("replace", "accumulate"):
        out = tmp_path / workflow
        res = recipe("--workflow", workflow, "--out_dir", str(out), *TINY)
        assert res.returncode == 0, res.stderr
        assert res.stdout.count("[toy]") == 2  # one progress line per generation
        rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
        sizes = {(r["generation"], r["metric"]): float(r["value"]) for r in rows}
        assert sizes[("1", "train_size")] == (64 if workflow == "replace" else 128)
        assert (out / "gen_001" / "manifest.json").is_file()
        runs.append(out)
    again = recipe("--workflow", "accumulate", "--out_dir", str(runs[1]), *TINY)
    assert again.returncode == 0 and again.stdout.count("finished earlier") == 2
    report = make_report(runs, tmp_path / "report").read_text()
    assert "toy_gaussian" in report and "test_loss" in report
    assert (tmp_path / "report" / "toy_gaussian_test_loss.png").is_file()


@pytest.mark.slow
def test_two_processes_with_unequal_test_shares_log_the_exact_test_loss(tmp_path):
    """5 test points on 2 processes (3 and 2): the logged test and validation losses are the means over all
    points, as one process computes them from the saved model (Lightning's own weighted mean gave 1.25x)."""
    import json

    import torch
    import yaml

    from datamodules.toy import GaussianPointsDataModule
    from lit_modules.toy import GaussianDensity

    out = tmp_path / "ddp"
    flags = ["--data.num_test", "5", "--data.num_val", "3", "--data.num_train", "64", "--batch_size", "2"]
    res = recipe("--out_dir", str(out), "--generations", "1", "--trainer.max_epochs", "1", "--wandb.mode",
                 "disabled", "--trainer.devices", "2", "--trainer.strategy", "ddp", *flags)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    data = GaussianPointsDataModule(**config["data"])
    data.prepare_data()
    data.setup("test")
    model = GaussianDensity(**config["model"])
    model.load_state_dict(torch.load(out / "gen_000" / "model.pt", weights_only=True))
    points = torch.stack([data.test_dataset[i] for i in range(len(data.test_dataset))])
    assert len(points) == 5
    with torch.no_grad():
        exact = float(model.nll(points).mean())
    logged = json.loads((out / "gen_000" / "metrics.json").read_text())["test_loss"]
    assert logged == pytest.approx(exact, rel=1e-6)


def test_the_exact_mean_is_weighted_float64_keeps_nan_and_survives_a_half_precision_move():
    import torch

    from collapse.contract import _WeightedMean

    mean = _WeightedMean()
    mean.update(torch.tensor(2.0), 3)  # a host weight
    mean.update(torch.tensor(1.0), torch.tensor(1))  # or a tensor one
    assert mean.compute().dtype == torch.float64 and float(mean.compute()) == 1.75  # not (2 + 1) / 2
    mean.reset()
    mean.to(torch.bfloat16)  # what a bf16-true Trainer does to the whole module
    mean.update(torch.tensor(2.0, dtype=torch.bfloat16), 3)
    mean.update(torch.tensor(1.0, dtype=torch.bfloat16), 1)
    assert mean.total.dtype == torch.float64 and float(mean.compute()) == 1.75
    mean.reset()
    mean.update(torch.tensor(float("nan")), 2)  # a diverged model's loss stays NaN, never dropped
    assert torch.isnan(mean.compute())
    assert _WeightedMean(torch.float32).total.dtype == torch.float32  # for MPS, which has no float64


def test_bad_workflow_is_one_line(tmp_path):
    res = recipe("--workflow", "replcae", "--out_dir", str(tmp_path / "x"), *TINY)
    assert res.returncode == 2
    assert res.stderr.startswith("error: unknown workflow 'replcae'") and res.stderr.count("\n") == 1


def test_the_gaussian_samples_float32_draws_of_its_distribution_in_any_training_precision():
    """A bf16-true fit leaves bf16 parameters; sampling still works (the solve has no bf16 kernel) in float32."""
    import torch

    from lit_modules.toy import GaussianDensity

    torch.manual_seed(0)
    model = GaussianDensity(dim=2)
    with torch.no_grad():
        model.mean.copy_(torch.tensor([1.0, -2.0]))
        model.raw_precision_tril.copy_(torch.tensor([[0.5, 0.0], [0.3, -0.2]]))
    half = GaussianDensity(dim=2)
    half.load_state_dict(model.state_dict())
    half = half.to(torch.bfloat16)
    draws = {}
    for name, m in (("fp32", model), ("bf16", half)):
        out = m.sample(20_000, torch.Generator().manual_seed(1))["samples"]
        assert out.dtype == np.float32 and out.shape == (20_000, 2)
        draws[name] = out
    cov = model.covariance.detach().double().numpy()
    for out in draws.values():
        assert np.allclose(out.mean(0), [1.0, -2.0], atol=0.05)
        assert np.allclose(np.cov(out.T), cov, rtol=0.1, atol=0.05)
