"""The GEOM conformer-diffusion recipe end to end on tiny data: workflows, quality metrics, resume, bad input."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks.conformer_quality import ConformerQuality
from collapse.cli import parse_config
from datamodules.geom import GeomDataConfig, GeomDataModule
from datamodules.mol_graph import collate_molecules
from evaluation.conformers import evaluate_conformers
from lit_modules.conformer_diffusion import ConformerDiffusionModule
from recipes.geom_diffusion import GeomDiffusionConfig, main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "geom_diffusion.py"
REAL = 16  # real training molecules of the tiny runs

TINY = [
    "--data.num_real", str(REAL),
    "--data.num_test", "4",
    "--model.hidden", "16",
    "--model.num_layers", "2",
    "--model.num_steps", "10",
    "--model.warmup_steps", "1",
    "--trainer.accelerator", "cpu",
    "--trainer.max_epochs", "1",
    "--batch_size", "8",
    "--quality.num_molecules", "2",
    "--quality.shown_molecules", "2",
    "--wandb.mode", "disabled",
]  # fmt: skip


def tiny(out_dir: Path, workflow: str, *extra: str, generations: int = 2) -> GeomDiffusionConfig:
    args = ["--out_dir", str(out_dir), "--workflow", workflow, "--generations", str(generations), *TINY, *extra]
    return parse_config(GeomDiffusionConfig, args)


def read_csv(path: Path) -> dict[tuple[int, str], float]:
    with open(path) as fh:
        return {(int(r["generation"]), r["metric"]): float(r["value"]) for r in csv.DictReader(fh)}


# workflow -> (train_real, train_synthetic) at generation 1 for n = REAL real molecules
SIZES = {"replace": (0, REAL), "accumulate": (REAL, REAL), "accumulate_subsample": (None, None)}


@pytest.mark.slow
@pytest.mark.parametrize("workflow", list(SIZES))
def test_two_generations_per_workflow(tmp_path, workflow):
    out = tmp_path / "run"
    result = main(tiny(out, workflow))
    assert result.committed == [0, 1]
    m0, m1 = result.metrics[0], result.metrics[1]
    assert (m0["train_real"], m0["train_synthetic"]) == (REAL, 0)
    real, synthetic = SIZES[workflow]
    if real is None:  # accumulate_subsample: n examples drawn from the pool of 2n
        assert m1["train_size"] == REAL and m1["train_real"] + m1["train_synthetic"] == REAL
    else:
        assert (m1["train_real"], m1["train_synthetic"]) == (real, synthetic)
    metrics = read_csv(out / "metrics.csv")
    for g in (0, 1):
        assert np.isfinite(metrics[(g, "test_loss")])
        for name in ("test_cov_r", "test_mat_r", "test_bond_w1", "test_broken_fraction"):
            assert (g, name) in metrics
        assert 0.0 <= metrics[(g, "test_cov_r")] <= 1.0
    # generation 0 drew the synthetic set of generation 1: one conformer per real training graph
    gen0 = out / "gen_000"
    mol_id = np.load(gen0 / "mol_id.npy")
    assert sorted(mol_id.tolist()) == list(range(REAL))
    pos, num_atoms = np.load(gen0 / "pos.npy"), np.load(gen0 / "num_atoms.npy")
    # The molecules back to back, without the padding of the rows they were drawn in.
    assert num_atoms.shape == (REAL,) and pos.shape == (int(num_atoms.sum()), 3) and np.isfinite(pos).all()
    assert json.loads((gen0 / "manifest.json").read_text())["ragged_arrays"] == {"pos": "num_atoms"}
    assert (gen0 / "samples.png").stat().st_size > 0
    assert (0, "sample_bond_w1") in metrics
    assert (out / "data.json").exists()


@pytest.mark.slow
def test_rerun_resumes_without_redoing_finished_generations(tmp_path):
    out = tmp_path / "run"
    first = main(tiny(out, "accumulate", generations=1))
    assert first.committed == [0]
    before = (out / "gen_000" / "model.pt").stat().st_mtime_ns
    again = main(tiny(out, "accumulate", generations=1))
    assert again.committed == [] and again.fitted == []
    assert (out / "gen_000" / "model.pt").stat().st_mtime_ns == before
    assert again.metrics[0]["test_loss"] == first.metrics[0]["test_loss"]


def test_seeded_test_loss_is_reproducible(tmp_path):
    a = main(tiny(tmp_path / "a", "replace", generations=1))
    b = main(tiny(tmp_path / "b", "replace", generations=1))
    assert a.metrics[0]["test_loss"] == b.metrics[0]["test_loss"]
    assert a.metrics[0]["test_mat_r"] == b.metrics[0]["test_mat_r"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch_size", "64"], "fewer than one batch"),
        (["--data.source", "sdf"], "--data.path"),
        (["--data.source", "sdf", "--data.path", "/nonexistent/x.sdf"], "x.sdf"),
        (["--quality.gen_per_ref", "0"], "--quality.gen_per_ref"),
        (["--model.on_broken", "ignore"], "on_broken"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, extra, message):
    args = [sys.executable, str(RECIPE), "--out_dir", str(tmp_path / "run"), "--generations", "1", *TINY, *extra]
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], run.stderr[-2000:]
    assert not (tmp_path / "run" / "gen_000").exists()


class _System:
    """Runs ``os.system(command)`` when unpickled: a hostile GEOM pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_hostile_pickle_is_one_error_line_and_never_runs(tmp_path):
    folder, marker = tmp_path / "rdkit_folder", tmp_path / "marker"
    (folder / "drugs").mkdir(parents=True)
    with open(folder / "drugs" / "0.pickle", "wb") as fh:
        pickle.dump({"conformers": [{"rd_mol": _System(f"touch {marker}"), "boltzmannweight": 1.0}]}, fh)
    (folder / "summary_drugs.json").write_text(json.dumps({"CCO": {"pickle_path": "drugs/0.pickle"}}))
    source = ["--data.source", "rdkit_folder", "--data.path", str(folder)]
    args = [sys.executable, str(RECIPE), "--out_dir", str(tmp_path / "run"), "--generations", "1", *TINY, *source]
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, run.stderr[-2000:]
    assert "0.pickle" in lines[0] and f"refusing to unpickle {os.system.__module__}.system" in lines[0], lines[0]
    assert not marker.exists()
    assert not (tmp_path / "run" / "gen_000").exists()


@pytest.mark.slow
def test_trained_model_beats_untrained_on_cov_mat():
    """A tiny model fitted to a handful of molecules generates conformers closer to them than an untrained one."""
    data = GeomDataModule(GeomDataConfig(num_real=4, num_test=1), batch_size=4)
    data.prepare_data()
    data.setup("fit")
    graphs = data.train_graphs()
    molecules = [(data.rdkit_molecule("train", k), [graphs[k]]) for k in range(len(graphs))]
    quality = ConformerQuality(molecules, threshold=0.5, gen_per_ref=2)

    def score(module: ConformerDiffusionModule) -> dict[str, float]:
        generated, _ = quality.generated(module)
        items = [(mol, gen, [g.pos.numpy() for g in refs]) for (mol, refs), gen in zip(molecules, generated)]
        return evaluate_conformers(items, threshold=0.5)

    torch.manual_seed(0)
    module = ConformerDiffusionModule(hidden=32, num_layers=3, num_steps=50, warmup_steps=10, lr=3e-3)
    untrained = score(module)
    batch = collate_molecules(graphs)
    optimiser = torch.optim.AdamW(module.parameters(), lr=3e-3)
    module.train()
    for _ in range(400):
        t = torch.randint(1, module.config.num_steps + 1, (batch.num_graphs,))
        loss = module.denoising_loss(batch, t, module.zero_com_noise(batch)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    trained = score(module)
    assert trained["mat_r_median"] < untrained["mat_r_median"]
    assert trained["cov_r_mean"] >= untrained["cov_r_mean"]
