"""The Lightning generation loop on the toy modality: sizes, files, resume, corruption, warm start."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from loop_script import GENERATIONS, MAX_EPOCHS, REAL_SIZE, TinyModality, gaussian_modality, tiny_config

import engine.loop as loop
from callbacks.synthetic_data import SAMPLING_FILE, SyntheticDataCallback, chunk_ranges
from collapse.errors import Terminated, UserError
from collapse.rundir import RunDirError
from collapse.store import GenerationStore, StoreError, sha256_file
from collapse.tracking import WandbConfig
from datamodules.workflows import REAL, Workflow, WorkflowError
from engine.loop import LoopConfig, run_generations, write_metrics_csv
from lit_modules.toy import GaussianDensity

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("loop_script.py")
WORKFLOWS = [
    "replace",
    "accumulate",
    "accumulate_subsample(size=24)",
    "replace_multiple(multiplier=2)",
    "mix(real=16, synthetic=40)",
    "fresh_real",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}.items():
        monkeypatch.setenv(key, value)


def run(out: Path, workflow: str = "accumulate", modality: TinyModality | None = None, **overrides):
    return run_generations(modality or TinyModality(), tiny_config(out, workflow, **overrides), recipe="toy")


def metric_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def file_hashes(out: Path) -> dict[str, str]:
    """sha256 of every committed file, from the manifests."""
    store = GenerationStore(out)
    return {
        f"{g}/{name}": info["sha256"] for g in store.completed() for name, info in store.manifest(g)["files"].items()
    }


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory) -> Path:
    """A complete, never interrupted accumulate run to compare resumed runs against."""
    out = tmp_path_factory.mktemp("unbroken") / "run"
    run(out, "accumulate")
    return out


@pytest.mark.parametrize("spec", WORKFLOWS)
def test_end_to_end_sizes_and_files(tmp_path, spec, capsys):
    out = tmp_path / "run"
    modality = TinyModality()
    result = run(out, spec, modality)
    wf = Workflow.parse(spec)

    assert result.fitted == result.committed == [0, 1, 2]
    assert modality.log["fits"] == [0, 1, 2]
    for g in range(GENERATIONS):
        ts = wf.training_set(g, REAL_SIZE, seed=0)
        m = result.metrics[g]
        assert m["train_size"] == ts.size
        assert m["train_real"] == ts.counts().get(REAL, 0)
        assert m["train_synthetic"] == ts.size - m["train_real"]
        assert np.isfinite(m["test_loss"]) and 2.0 < m["test_loss"] < 10.0
        assert json.loads((out / f"gen_{g:03d}" / "metrics.json").read_text()) == m  # the names as logged

        manifest = json.loads((out / f"gen_{g:03d}" / "manifest.json").read_text())
        assert manifest["generation"] == g
        assert manifest["num_samples"] == wf.synthetic_size(REAL_SIZE)
        assert manifest["sample_arrays"] == ["samples"]
        assert manifest["arrays"]["samples"] == {
            "file": "samples.npy",
            "shape": [wf.synthetic_size(REAL_SIZE), 2],
            "dtype": "<f4",
        }
        assert manifest["sampling"] == {"num_samples": wf.synthetic_size(REAL_SIZE), "batch_size": 24, "seed": ANY_INT}
        assert manifest["workflow"] == wf.label and manifest["seed"] == 0
        assert set(manifest["files"]) == {"metrics.json", "model.pt", "samples.npy", "sampling.json"}
        assert not (out / f"gen_{g:03d}" / "checkpoints").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "gen_000", "gen_001", "gen_002", "metrics.csv"]

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["recipe"] == "toy" and config["workflow"] == spec and config["generations"] == GENERATIONS

    rows = metric_rows(out)
    assert list(rows[0]) == ["workflow", "seed", "generation", "metric", "value"]
    names = {"test_loss", "train_size", "train_real", "train_synthetic", "train_steps"}
    assert {(r["generation"], r["metric"]) for r in rows} == {(str(g), n) for g in range(GENERATIONS) for n in names}
    assert {r["workflow"] for r in rows} == {wf.label} and {r["seed"] for r in rows} == {"0"}
    for r in rows:
        assert float(r["value"]) == result.metrics[int(r["generation"])][r["metric"]]

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[toy]")]
    assert len(lines) == GENERATIONS
    assert re.fullmatch(
        rf"\[toy\] {re.escape(wf.label)} seed=0 gen 2/2 test_loss=\S+ train=\d+ \(real \d+, synthetic \d+\) [\d.]+s",
        lines[-1],
    )


class _AnyInt:
    def __eq__(self, other):
        return isinstance(other, int) and not isinstance(other, bool)


ANY_INT = _AnyInt()


def test_synthetic_sets_come_from_the_models_and_feed_later_generations(tmp_path):
    out = tmp_path / "run"
    run(out, "replace")
    store = GenerationStore(out)
    for g in range(GENERATIONS):
        model = GaussianDensity()
        model.load_state_dict(torch.load(out / f"gen_{g:03d}" / "model.pt", weights_only=True))
        samples = store.samples(g)
        assert isinstance(samples, np.memmap) and samples.shape == (REAL_SIZE, 2)
        # The stored set is what the fitted model draws with the recorded seed and chunking.
        settings = store.manifest(g)["sampling"]
        again = SyntheticDataCallback(store, 99, settings["num_samples"], settings["batch_size"], settings["seed"])
        again.sample_into_store(model)
        np.testing.assert_array_equal(np.load(store.staging(99) / "samples.npy"), samples)
        shutil.rmtree(store.staging(99))
    assert not np.array_equal(store.samples(0), store.samples(1))


def test_rerun_does_not_refit_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, "accumulate")
    # config.yaml and metrics.csv are rewritten (same content); every generation's file stays untouched.
    before = {p: p.stat().st_mtime_ns for p in out.glob("gen_*/*")}
    csv_before = (out / "metrics.csv").read_text()
    config_before = (out / "config.yaml").read_text()
    capsys.readouterr()
    modality = TinyModality()
    result = run(out, "accumulate", modality)
    assert result.fitted == [] and result.committed == [] and "fits" not in modality.log
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert (out / "metrics.csv").read_text() == csv_before
    assert (out / "config.yaml").read_text() == config_before
    assert sorted(result.metrics) == [0, 1, 2]
    assert capsys.readouterr().out.count("finished earlier") == GENERATIONS


def _spell_metrics_as_older_versions_did(out: Path) -> None:
    """Rename ``test_loss`` to ``test/loss`` in every finished generation's metrics.json (manifest updated to match),
    as the loop wrote them before metric names were spelt one way everywhere."""
    store = GenerationStore(out)
    for g in store.completed():
        folder = store.path(g)
        path = folder / "metrics.json"
        metrics = json.loads(path.read_text())
        path.write_text(json.dumps({k.replace("test_", "test/", 1): v for k, v in metrics.items()}, indent=2))
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["metrics.json"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_run_with_the_older_metric_names_resumes_to_the_same_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    first = run(out, "accumulate")
    expected = (out / "metrics.csv").read_text()
    _spell_metrics_as_older_versions_did(out)
    assert '"test/loss"' in (out / "gen_001" / "metrics.json").read_text()
    shutil.rmtree(out / "gen_002")  # the older run stopped after generation 1
    (out / "metrics.csv").unlink()
    capsys.readouterr()
    result = run(out, "accumulate")
    assert result.committed == [2]
    assert (out / "metrics.csv").read_text() == expected  # underscore names, as metrics.csv always had
    assert result.metrics == first.metrics  # read with today's names
    resumed = [line for line in capsys.readouterr().out.splitlines() if "finished earlier" in line]
    assert len(resumed) == 2 and all(f"test_loss={first.metrics[g]['test_loss']:.4g}" in resumed[g] for g in (0, 1))
    write_metrics_csv(GenerationStore(out), "accumulate", 0)  # the old files are read, never rewritten
    assert (out / "metrics.csv").read_text() == expected
    assert '"test/loss"' in (out / "gen_000" / "metrics.json").read_text()


def test_different_config_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    run(out, "replace", generations=1)
    with pytest.raises(RunDirError, match="different config"):
        run(out, "accumulate", generations=1)
    result = run(out, "accumulate", generations=1, overwrite=True)
    assert result.committed == [0]


class Boom(Exception):
    pass


def _raise_at(hook: str, generation: int, epoch: int | None = None):
    """A callback that raises Boom in ``hook`` of ``generation`` (at training epoch ``epoch``)."""
    import lightning.pytorch as pl

    class Raise(pl.Callback):
        def __init__(self):
            self.generation = None

        def setup(self, trainer, pl_module, stage):
            self.generation = int(Path(trainer.default_root_dir).name[5:8])

        def _maybe(self, trainer):
            if self.generation == generation and (epoch is None or trainer.current_epoch == epoch):
                raise Boom(hook)

    setattr(Raise, hook, lambda self, trainer, pl_module: self._maybe(trainer))
    return Raise()


@pytest.mark.parametrize(
    ("hook", "epoch", "refits_gen1"),
    [
        ("on_train_epoch_start", 2, True),  # mid-fit: resumes from checkpoints/last.ckpt
        ("on_test_start", None, False),  # fitted, not tested: model.pt is reused
    ],
)
def test_crash_mid_generation_resumes_to_the_unbroken_result(tmp_path, unbroken, hook, epoch, refits_gen1):
    out = tmp_path / "run"
    with pytest.raises(Boom):
        run_generations(
            TinyModality(), tiny_config(out, "accumulate"), recipe="toy", callbacks=[_raise_at(hook, 1, epoch)]
        )
    stage = out / ".gen_001.partial"
    assert (out / "gen_000").is_dir() and stage.is_dir()
    if refits_gen1:
        assert (stage / "checkpoints" / "last.ckpt").is_file() and not (stage / "model.pt").exists()
    else:
        assert (stage / "model.pt").is_file() and not (stage / "metrics.json").exists()

    (stage / ".samples.npy.tmp-99999").write_bytes(b"half-written by a killed run")
    modality = TinyModality()
    result = run(out, "accumulate", modality)
    assert result.committed == [1, 2]
    assert not list(out.glob("gen_*/.*"))  # stale temporary files are not published
    if refits_gen1:
        # Resumed from the checkpoint written after epoch 1: only the last epoch is trained again.
        assert [e for g, e in modality.log["epochs"] if g == 1] == list(range(epoch, MAX_EPOCHS))
        assert result.fitted == [1, 2]
    else:
        assert result.fitted == [2]
    assert (out / "metrics.csv").read_text() == (unbroken / "metrics.csv").read_text()
    assert file_hashes(out) == file_hashes(unbroken)


def test_a_run_killed_before_dropping_its_checkpoints_or_chunks_publishes_neither(tmp_path, unbroken):
    out = tmp_path / "run"
    with pytest.raises(Boom):
        run_generations(
            TinyModality(), tiny_config(out, "accumulate"), recipe="toy", callbacks=[_raise_at("on_test_start", 1)]
        )
    stage = out / ".gen_001.partial"
    assert (stage / "model.pt").is_file() and (stage / "sampling.json").is_file()
    # What a SIGKILL leaves between saving the fit (model.pt) and removing the mid-fit checkpoints, and between
    # recording the set (sampling.json) and removing its chunks: the resume skips both steps.
    (stage / "checkpoints").mkdir()
    (stage / "checkpoints" / "last.ckpt").write_bytes(b"weights and optimizer state")
    (stage / "sample_chunks").mkdir()
    (stage / "sample_chunks" / "chunk_000000.npz").write_bytes(b"a chunk already in the arrays")
    result = run(out, "accumulate")
    assert result.fitted == [2]
    assert [p for p in out.glob("gen_*/*") if not p.is_file()] == []
    assert file_hashes(out) == file_hashes(unbroken)


def _sigterm_at(hook: str, generation: int):
    """A callback that sends this process SIGTERM in ``hook`` of ``generation``, as ``kill`` or a scheduler would."""
    import lightning.pytorch as pl

    class Term(pl.Callback):
        def __init__(self):
            self.generation = None

        def setup(self, trainer, pl_module, stage):
            self.generation = int(Path(trainer.default_root_dir).name[5:8])

    def send(self, trainer, *args):
        if self.generation == generation:
            os.kill(os.getpid(), signal.SIGTERM)

    setattr(Term, hook, send)
    return Term()


# A test's end (Lightning let a SIGTERM there pass: the run went on and exited 0), the end of a fit (where the
# synthetic set is drawn), and mid-fit.
@pytest.mark.parametrize("hook", ["on_test_epoch_end", "on_fit_end", "on_train_epoch_end"])
def test_sigterm_anywhere_in_a_generation_stops_the_run_and_it_resumes_to_the_unbroken_result(tmp_path, unbroken, hook):
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        run_generations(TinyModality(), tiny_config(out, "accumulate"), recipe="toy", callbacks=[_sigterm_at(hook, 1)])
    assert signal.getsignal(signal.SIGTERM) is before  # the run's handler is gone with it
    assert (out / "gen_000").is_dir() and not (out / "gen_001").exists()
    run(out, "accumulate")
    assert (out / "metrics.csv").read_text() == (unbroken / "metrics.csv").read_text()
    assert file_hashes(out) == file_hashes(unbroken)


class NoisyDensity(GaussianDensity):
    """Trains on jittered points: every step draws from the global torch RNG."""

    def training_step(self, batch, batch_idx):
        return self.model_step(batch + 0.1 * torch.randn_like(batch), "train")


class NoisyModality(TinyModality):
    def build_model(self, generation: int) -> NoisyDensity:
        model = self.cfg.model
        return NoisyDensity(dim=len(self.cfg.data.mean), lr=model.lr, init_scale=model.init_scale)


def test_mid_fit_resume_continues_the_global_random_streams(tmp_path):
    run(tmp_path / "unbroken", "replace", NoisyModality())
    out = tmp_path / "run"
    with pytest.raises(Boom):
        run_generations(
            NoisyModality(),
            tiny_config(out, "replace"),
            recipe="toy",
            callbacks=[_raise_at("on_train_epoch_start", 1, 2)],
        )
    run(out, "replace", NoisyModality())
    assert (out / "metrics.csv").read_text() == (tmp_path / "unbroken" / "metrics.csv").read_text()
    assert file_hashes(out) == file_hashes(tmp_path / "unbroken")


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["1:2", "2:fit"])
def test_resume_after_sigkill_matches_an_unbroken_run(tmp_path, unbroken, kill):
    out = tmp_path / "run"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "accumulate", "--kill", kill],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    gen = int(kill[0])
    assert (out / f".gen_{gen:03d}.partial").is_dir()
    assert GenerationStore(out).completed() == list(range(gen))
    if kill == "1:2":
        assert (out / ".gen_001.partial" / "checkpoints" / "last.ckpt").is_file()
    assert proc.stdout.count("[toy]") == gen
    assert list(cwd.iterdir()) == []  # nothing written outside the run directory

    result = run(out, "accumulate")
    assert result.committed == list(range(gen, GENERATIONS))
    assert (out / "metrics.csv").read_text() == (unbroken / "metrics.csv").read_text()
    assert file_hashes(out) == file_hashes(unbroken)
    assert not list(out.glob(".gen_*"))


def test_corrupt_store_file_is_named(tmp_path):
    out = tmp_path / "run"
    run(out, "accumulate", generations=2)
    path = out / "gen_000" / "samples.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"gen_000/samples\.npy: sha256 mismatch"):
        run(out, "accumulate", generations=2)


def test_corrupt_store_file_is_caught_when_a_later_generation_reads_it(tmp_path, monkeypatch):
    out = tmp_path / "run"
    write_csv = loop.write_metrics_csv

    def corrupt_after_gen0(store, workflow, seed):
        # Runs right after generation 0 is committed: flip a byte (same size) in its synthetic set.
        if store.completed() == [0]:
            path = out / "gen_000" / "samples.npy"
            data = bytearray(path.read_bytes())
            data[-5] ^= 0x01
            path.write_bytes(bytes(data))
        return write_csv(store, workflow, seed)

    monkeypatch.setattr(loop, "write_metrics_csv", corrupt_after_gen0)
    with pytest.raises(StoreError, match=r"gen_000/samples\.npy: sha256 mismatch; the file is corrupt"):
        run(out, "accumulate")
    assert GenerationStore(out).completed() == [0]


def test_warm_start_starts_from_the_previous_weights(tmp_path):
    cold, warm = TinyModality(), TinyModality()
    run(tmp_path / "cold", "replace", cold, generations=2)
    run(tmp_path / "warm", "replace", warm, generations=2, warm_start=True)
    prev_warm = torch.load(tmp_path / "warm" / "gen_000" / "model.pt", weights_only=True)
    prev_cold = torch.load(tmp_path / "cold" / "gen_000" / "model.pt", weights_only=True)
    for key, value in prev_warm.items():
        assert torch.equal(warm.log["initial_state"][1][key], value)
    assert not torch.equal(cold.log["initial_state"][1]["mean"], prev_cold["mean"])
    # Generation 0 is the same either way; the manifest records the choice.
    assert torch.equal(cold.log["initial_state"][0]["mean"], warm.log["initial_state"][0]["mean"])
    assert GenerationStore(tmp_path / "warm").manifest(1)["warm_start"] is True


def test_fresh_initialisation_differs_between_generations_and_seeds(tmp_path):
    a, b = TinyModality(), TinyModality()
    run(tmp_path / "a", "replace", a, generations=2)
    run(tmp_path / "b", "replace", b, generations=2, seed=1)
    assert not torch.equal(a.log["initial_state"][0]["mean"], a.log["initial_state"][1]["mean"])
    assert not torch.equal(a.log["initial_state"][0]["mean"], b.log["initial_state"][0]["mean"])


def test_num_synthetic_override(tmp_path):
    result = run(tmp_path / "more", "replace", generations=2, num_synthetic=50)
    assert GenerationStore(tmp_path / "more").manifest(0)["num_samples"] == 50
    assert result.metrics[1]["train_size"] == REAL_SIZE  # the workflow still trains on what it promises
    with pytest.raises(UserError, match="num_synthetic 10 is less than the 32 samples"):
        run(tmp_path / "less", "replace", generations=2, num_synthetic=10)
    assert not (tmp_path / "less").exists()


def test_bad_settings_fail_before_anything_is_written(tmp_path):
    with pytest.raises(WorkflowError, match="needs 288 real examples, but only 96 are available.*set --real_size"):
        run_generations(
            TinyModality(num_train=96),
            tiny_config(tmp_path / "f", "fresh_real", real_size=None),
            recipe="toy",
        )
    with pytest.raises(WorkflowError, match="unknown workflow"):
        run(tmp_path / "u", "recycle")
    with pytest.raises(UserError, match="--generations must be an integer >= 1"):
        run(tmp_path / "g", generations=0)
    assert list(tmp_path.iterdir()) == []


def test_nothing_is_written_outside_the_run_directory(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run(tmp_path / "run", "replace", generations=1)
    assert list(cwd.iterdir()) == []


def test_metrics_are_logged_to_the_tracker(tmp_path, monkeypatch):
    logged = []

    class FakeTracker:
        def __init__(self, cfg, recipe, out_dir, config):
            assert cfg.mode == "disabled" and recipe == "toy" and Path(out_dir) == tmp_path / "run"
            self.finished = False

        def log(self, metrics, generation):
            logged.append((generation, dict(metrics)))

        def save_file(self, path):
            logged.append(("file", Path(path).read_text()))

        def finish(self, failed=False):
            logged.append("failed" if failed else "finished")

    monkeypatch.setattr(loop, "Tracker", FakeTracker)
    run(tmp_path / "run", "accumulate", generations=2)
    assert [entry[0] for entry in logged[:-2]] == [0, 1] and logged[-1] == "finished"
    assert logged[-2] == ("file", (tmp_path / "run" / "metrics.csv").read_text())
    assert {"test_loss", "train_size", "train_real", "train_synthetic", "generation_seconds"} <= set(logged[1][1])

    class Refusing(FakeTracker):  # a run that fails (here in W&B's own logging) is finished as failed
        def log(self, metrics, generation):
            raise OSError(errno.ENOSPC, "No space left on device")

    logged.clear()
    monkeypatch.setattr(loop, "Tracker", Refusing)
    with pytest.raises(OSError, match="No space left"):
        run(tmp_path / "run", "accumulate", generations=3)
    assert logged == ["failed"]


def test_toy_model_fits_the_maximum_likelihood_gaussian(tmp_path):
    modality = gaussian_modality(25, num_train=512, num_val=32, num_test=64)
    result = run_generations(
        modality, tiny_config(tmp_path / "run", "replace", generations=1, batch_size=128, real_size=None)
    )
    model = GaussianDensity()
    model.load_state_dict(torch.load(tmp_path / "run" / "gen_000" / "model.pt", weights_only=True))
    points = torch.from_numpy(modality.real_datamodule().train_dataset.points)  # (512, 2)
    mle_mean, mle_cov = points.mean(0), torch.cov(points.T, correction=0)
    torch.testing.assert_close(model.mean.detach(), mle_mean, atol=0.02, rtol=0)
    torch.testing.assert_close(model.covariance.detach(), mle_cov, atol=0.05, rtol=0)
    entropy = 0.5 * torch.logdet(2 * torch.pi * torch.e * torch.tensor([[2.0, 0.6], [0.6, 0.5]]))  # true H(p)
    assert abs(result.metrics[0]["test_loss"] - float(entropy)) < 0.25


def test_default_config_runs_the_toy_modality_quietly(tmp_path, capsys):
    cfg = LoopConfig(out_dir=str(tmp_path / "run"), generations=1, wandb=WandbConfig(mode="disabled"))
    result = run_generations(gaussian_modality(2, num_train=64, num_val=32, num_test=64), cfg)
    assert result.metrics[0]["train_size"] == 64
    captured = capsys.readouterr()
    assert captured.out.startswith("[toy] accumulate seed=0 gen 0/0 test_loss=")
    assert "GPU available" not in captured.out + captured.err


# ---- the sampling callback ---------------------------------------------------------------------


class CountingModel(torch.nn.Module):
    """A stand-in model: samples are generator draws, the calls are counted."""

    def __init__(self, as_tensor: bool = False):
        super().__init__()
        self.calls = 0
        self.as_tensor = as_tensor
        self.kept, self.ended = False, 0

    def end_sampling(self):
        self.kept, self.ended = False, self.ended + 1

    def sample(self, n, generator):
        self.calls += 1
        self.kept = True  # as a model that keeps a decoder between chunks
        x = torch.randn(n, 3, generator=generator)
        labels = torch.randint(0, 10, (n,), generator=generator)
        if self.as_tensor:
            return {"x": x, "label": labels}
        return {"x": x.numpy(), "label": labels.numpy()}


def test_chunk_ranges_cover_all_rows_and_split_across_ranks():
    assert chunk_ranges(10, 4) == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert chunk_ranges(0, 4) == []
    ranks = [chunk_ranges(10, 3, rank=r, world_size=2) for r in range(2)]
    assert sorted(c for rank in ranks for c, _, _ in rank) == [0, 1, 2, 3]


def test_sampling_callback_writes_staging_and_skips_when_done(tmp_path):
    store = GenerationStore(tmp_path)
    cb = SyntheticDataCallback(store, 0, num_samples=10, batch_size=4, seed=5, sampling_settings={"temperature": 1.0})
    model = CountingModel()
    assert cb.sample_into_store(model) == ["x", "label"]
    assert model.calls == 3
    assert model.ended == 1 and not model.kept  # what sample() kept is freed once, after the last chunk
    x = np.load(store.staged(0, "x.npy"))
    assert x.shape == (10, 3) and x.dtype == np.float32
    # Each chunk has its own generator: chunk 1 is reproducible on its own.
    chunk1 = torch.randn(4, 3, generator=cb.chunk_generator(1, torch.device("cpu")))
    np.testing.assert_array_equal(x[4:8], chunk1.numpy())
    recorded = json.loads(store.staged(0, SAMPLING_FILE).read_text())
    assert recorded == {
        "num_samples": 10,
        "batch_size": 4,
        "seed": 5,
        "temperature": 1.0,
        "sample_arrays": ["x", "label"],
        "ragged_arrays": {},
    }

    assert cb.sample_into_store(model) == ["x", "label"] and model.calls == 3  # skipped
    manifest = store.commit(0, 10, cb.settings, sample_arrays=["x", "label"])
    assert manifest["arrays"]["label"]["shape"] == [10]

    tensors = SyntheticDataCallback(GenerationStore(tmp_path / "t"), 0, 10, 4, seed=5)
    tensors.sample_into_store(CountingModel(as_tensor=True))
    np.testing.assert_array_equal(np.load(tensors.store.staged(0, "x.npy")), x)


@pytest.mark.filterwarnings("ignore:.*validation_step.*:UserWarning", "ignore:.*LeafSpec.*")
def test_sampling_callback_runs_after_fit_and_refuses_models_without_sample(tmp_path):
    import lightning.pytorch as pl

    store = GenerationStore(tmp_path)
    cb = SyntheticDataCallback(store, 0, num_samples=8, batch_size=8, seed=0)
    model = GaussianDensity()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[cb],
    )
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=8))
    assert cb.is_done() and np.load(store.staged(0, "samples.npy")).shape == (8, 2)
    assert model.training  # the model's mode is restored after sampling

    with pytest.raises(TypeError, match="no sample"):
        SyntheticDataCallback(GenerationStore(tmp_path / "x"), 0, 4, 4, seed=0).sample_into_store(torch.nn.Linear(2, 2))


class FailingAt(CountingModel):
    """A sampling model that raises in chunk ``fail_at`` (by call count)."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at = fail_at

    def sample(self, n, generator):
        if self.calls == self.fail_at:
            raise Boom("killed while sampling")
        return super().sample(n, generator)


def test_sampling_killed_half_way_keeps_its_finished_chunks(tmp_path):
    unbroken = GenerationStore(tmp_path / "unbroken")
    SyntheticDataCallback(unbroken, 0, num_samples=10, batch_size=3, seed=1).sample_into_store(CountingModel())

    store = GenerationStore(tmp_path / "run")
    cb = SyntheticDataCallback(store, 0, num_samples=10, batch_size=3, seed=1)
    with pytest.raises(Boom):
        cb.sample_into_store(FailingAt(2))
    assert not cb.is_done()
    assert sorted(p.name for p in (store.staging(0) / "sample_chunks").iterdir()) == [
        "chunk_000000.npz",
        "chunk_000001.npz",
    ]
    resumed = CountingModel()
    assert cb.sample_into_store(resumed) == ["x", "label"]
    assert resumed.calls == 2  # chunks 2 and 3 only
    assert not (store.staging(0) / "sample_chunks").exists()
    for name in ("x", "label"):
        np.testing.assert_array_equal(
            np.load(store.staged(0, f"{name}.npy")), np.load(unbroken.staged(0, f"{name}.npy"))
        )


class RaggedModel(CountingModel):
    """Rows of tokens padded to 6 with -1 after ``lengths`` (0..6) entries, declared ragged."""

    ragged_samples = {"tokens": "lengths"}

    def __init__(self, declare: bool = True, fail_at: int | None = None):
        super().__init__()
        if not declare:
            self.ragged_samples = {}
        self.fail_at = fail_at

    def sample(self, n, generator):
        if self.calls == self.fail_at:
            raise Boom("killed while sampling")
        self.calls += 1
        lengths = torch.randint(0, 7, (n,), generator=generator)
        tokens = torch.randint(0, 100, (n, 6), generator=generator)
        tokens[torch.arange(6) >= lengths[:, None]] = -1
        return {"tokens": tokens.numpy(), "lengths": lengths.numpy()}


def _unpad(tokens, lengths):
    return np.concatenate([row[:n] for row, n in zip(tokens, lengths)])


def test_ragged_arrays_are_stored_without_padding(tmp_path):
    padded = GenerationStore(tmp_path / "padded")
    SyntheticDataCallback(padded, 0, num_samples=11, batch_size=4, seed=2).sample_into_store(RaggedModel(False))
    tokens, lengths = np.load(padded.staged(0, "tokens.npy")), np.load(padded.staged(0, "lengths.npy"))
    assert tokens.shape == (11, 6) and (tokens == -1).any()

    store = GenerationStore(tmp_path / "run")
    cb = SyntheticDataCallback(store, 0, num_samples=11, batch_size=4, seed=2)
    with pytest.raises(Boom):  # killed after chunk 0: the resumed draw assembles old and new chunks alike
        cb.sample_into_store(RaggedModel(fail_at=1))
    assert cb.sample_into_store(RaggedModel()) == ["tokens", "lengths"]
    assert cb.recorded_ragged() == {"tokens": "lengths"}
    np.testing.assert_array_equal(np.load(store.staged(0, "tokens.npy")), _unpad(tokens, lengths))
    np.testing.assert_array_equal(np.load(store.staged(0, "lengths.npy")), lengths)
    manifest = store.commit(0, 11, cb.settings, sample_arrays=cb.recorded_arrays(), ragged_arrays=cb.recorded_ragged())
    assert manifest["ragged_arrays"] == {"tokens": "lengths"}
    assert manifest["arrays"]["tokens"]["shape"] == [int(lengths.sum())]
    assert store.load(0).arrays["tokens"].shape == (int(lengths.sum()),)


def test_chunks_drawn_padded_before_a_resume_are_unpadded_when_assembled(tmp_path):
    store = GenerationStore(tmp_path / "run")
    old = SyntheticDataCallback(store, 0, num_samples=11, batch_size=4, seed=2)
    with pytest.raises(Boom):  # chunk 0 written padded, by a model that did not declare its arrays ragged
        old.sample_into_store(RaggedModel(declare=False, fail_at=1))
    cb = SyntheticDataCallback(store, 0, num_samples=11, batch_size=4, seed=2)
    cb.sample_into_store(RaggedModel())
    reference = GenerationStore(tmp_path / "ref")
    ref = SyntheticDataCallback(reference, 0, num_samples=11, batch_size=4, seed=2)
    ref.sample_into_store(RaggedModel())
    for name in ("tokens", "lengths"):
        np.testing.assert_array_equal(
            np.load(store.staged(0, f"{name}.npy")), np.load(reference.staged(0, f"{name}.npy"))
        )


def test_ragged_arrays_are_checked_when_drawn_and_when_committed(tmp_path):
    class Mislabelled(RaggedModel):
        ragged_samples = {"tokens": "sizes"}

    class TooLong(RaggedModel):
        def sample(self, n, generator):
            out = super().sample(n, generator)
            return {**out, "lengths": out["lengths"] + 7}

    for model, message in ((Mislabelled(), "declares 'tokens' ragged by 'sizes'"), (TooLong(), "outside 0..6")):
        with pytest.raises(ValueError, match=message):
            SyntheticDataCallback(GenerationStore(tmp_path / type(model).__name__), 0, 5, 4, seed=0).sample_into_store(
                model
            )
    store = GenerationStore(tmp_path / "commit")
    cb = SyntheticDataCallback(store, 0, num_samples=5, batch_size=4, seed=0)
    cb.sample_into_store(RaggedModel())
    lengths = np.load(store.staged(0, "lengths.npy"))
    np.save(store.staged(0, "lengths.npy"), lengths + 1)  # no longer what the tokens hold
    with pytest.raises(StoreError, match="lengths.npy\\) sum to"):
        store.commit(0, 5, cb.settings, sample_arrays=cb.recorded_arrays(), ragged_arrays=cb.recorded_ragged())


class SlowFirstChunk(CountingModel):
    """A first chunk that takes longer than the progress interval (as a sampler that compiles does)."""

    def sample(self, n, generator):
        if self.calls == 0:
            time.sleep(0.5)
        return super().sample(n, generator)


class ReportingModel(CountingModel):
    """Reports each sample it finishes inside a chunk, as the story sampler does at its syncs."""

    def sample(self, n, generator):
        from collapse.progress import report_within

        for k in range(1, n + 1):
            time.sleep(0.02)
            report_within(k + 100 * (k == n))  # an over-report is capped at the chunk's size
        return super().sample(n, generator)


def test_samples_finished_inside_a_chunk_move_the_progress_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("collapse.progress._interval", 0.05)
    cb = SyntheticDataCallback(GenerationStore(tmp_path / "a"), 0, num_samples=20, batch_size=10, seed=0)
    with caplog.at_level(logging.INFO, logger="collapse.progress"):
        cb.sample_into_store(ReportingModel())
    got = [r.getMessage() for r in caplog.records if r.name == "collapse.progress"]
    counts = [int(m.group(1)) for t in got if (m := re.match(r"sampling gen 0: (\d+)/20 samples", t))]
    assert any(0 < c < 10 for c in counts) and any(10 < c < 20 for c in counts), got  # inside each chunk
    assert counts == sorted(counts) and max(counts) <= 20, got
    assert got[-1].startswith("sampling gen 0: done, 20 samples in ")


def test_a_slow_sampling_chunk_still_gets_progress_lines_and_a_failure_stops_them(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("collapse.progress._interval", 0.1)
    cb = SyntheticDataCallback(GenerationStore(tmp_path / "a"), 0, num_samples=10, batch_size=5, seed=0)
    with caplog.at_level(logging.INFO, logger="collapse.progress"):
        cb.sample_into_store(SlowFirstChunk())
    got = [r.getMessage() for r in caplog.records if r.name == "collapse.progress"]
    assert any(re.match(r"sampling gen 0: 0/10 samples \(0%\), .*no new samples for \d+s$", t) for t in got), got
    assert got[-1].startswith("sampling gen 0: done, 10 samples in ")

    with pytest.raises(Boom):
        SyntheticDataCallback(GenerationStore(tmp_path / "b"), 0, 10, 3, seed=1).sample_into_store(FailingAt(2))
    assert not any(t.name.startswith("progress: sampling gen 0") for t in threading.enumerate())


def test_ranks_draw_disjoint_chunks_that_assemble_to_the_one_process_set(tmp_path):
    one = GenerationStore(tmp_path / "one")
    SyntheticDataCallback(one, 0, num_samples=11, batch_size=3, seed=4).sample_into_store(CountingModel())
    two = GenerationStore(tmp_path / "two")
    models = [CountingModel(), CountingModel()]
    cb = SyntheticDataCallback(two, 0, num_samples=11, batch_size=3, seed=4)
    cb._draw(models[1], rank=1, world_size=2)  # rank 1 first: the order of the ranks does not matter
    cb.sample_into_store(models[0], rank=0, world_size=2)
    assert [m.calls for m in models] == [2, 2]
    np.testing.assert_array_equal(np.load(two.staged(0, "x.npy")), np.load(one.staged(0, "x.npy")))


def test_lightning_moves_the_module_to_the_cpu_before_on_fit_end():
    # Why the callback moves the module at on_fit_end: the fit's teardown has put it on the CPU by then (on a
    # GPU machine the draw would otherwise run on the CPU).
    import lightning.pytorch as pl

    events = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def cpu(self):
            events.append("module.cpu()")
            return super().cpu()

    class Watch(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            events.append("on_train_end")

        def on_fit_end(self, trainer, pl_module):
            events.append("on_fit_end")

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Watch()],
    )  # fmt: skip
    trainer.fit(Module(), data)
    assert events.index("on_train_end") < events.index("module.cpu()") < events.index("on_fit_end")


def test_the_set_is_drawn_on_the_fits_device_and_the_module_left_where_lightning_put_it(tmp_path):
    class Strategy:
        root_device = torch.device("cpu")  # the fit's device (a GPU in a GPU run)

        def broadcast(self, obj, src=0):
            return obj

        def barrier(self, *args):
            pass

    class Trainer:
        global_rank, world_size, strategy = 0, 1, Strategy()

    class Model(CountingModel):
        """Reports a device other than the fit's (the CPU of a GPU run, after Lightning's teardown)."""

        def __init__(self):
            super().__init__()
            self.device, self.moves, self.drawn_on = torch.device("meta"), [], set()

        def to(self, device):
            self.moves.append(torch.device(device))
            self.device = torch.device(device)
            return self

        def sample(self, n, generator):
            self.drawn_on.add((self.device, generator.device))
            return super().sample(n, generator)

    cb = SyntheticDataCallback(GenerationStore(tmp_path), 0, num_samples=6, batch_size=3, seed=0)
    model = Model()
    cb.on_fit_end(Trainer(), model)
    assert model.drawn_on == {(torch.device("cpu"), torch.device("cpu"))}  # every chunk, model and generator
    assert model.moves == [torch.device("cpu"), torch.device("meta")]  # there and back
    assert cb.is_done() and model.calls == 2


def test_every_rank_follows_rank_0_on_whether_the_set_is_drawn(tmp_path):
    # A rank that looked at the staging folder itself could find it already committed (moved) by rank 0,
    # start drawing alone and wait at the barrier forever; it must act on rank 0's answer instead.
    class Strategy:
        root_device = torch.device("cpu")

        def __init__(self, rank_0_says: bool):
            self.rank_0_says, self.barriers = rank_0_says, 0

        def broadcast(self, obj, src=0):
            assert src == 0
            return self.rank_0_says

        def barrier(self, *args):
            self.barriers += 1

    class Trainer:
        global_rank, world_size = 1, 2

        def __init__(self, strategy):
            self.strategy = strategy

    cb = SyntheticDataCallback(GenerationStore(tmp_path), 0, num_samples=6, batch_size=3, seed=0)
    model = CountingModel()
    done_on_zero = Trainer(Strategy(rank_0_says=True))
    cb.on_test_start(done_on_zero, model)  # this rank sees no sampling.json, rank 0 has committed it
    assert model.calls == 0 and done_on_zero.strategy.barriers == 0
    to_draw = Trainer(Strategy(rank_0_says=False))
    with pytest.raises(FileNotFoundError):  # rank 1 draws its chunk, then reads the sampling.json rank 0 writes
        cb.on_fit_end(to_draw, model)
    assert model.calls == 1 and to_draw.strategy.barriers == 2


def test_evaluation_settings_that_leave_a_process_without_batches_are_refused_before_training():
    # Each of W processes scores every W-th example; a rank left without a batch skips the evaluation that the
    # other ranks wait in (a hang), so the smallest share must hold a batch, after any limit_*_batches fraction.
    import lightning.pytorch as pl

    def loader(n: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(n, 1)), batch_size=64)

    class Data:
        def __init__(self, test: int, val: int | None = None):
            self.test, self.val = test, val

        def test_dataloader(self):
            return loader(self.test)

        def val_dataloader(self):
            return [] if self.val is None else loader(self.val)

    class Trainer:
        def __init__(self, world_size: int = 1, limit_test_batches=1.0, limit_val_batches=1.0):
            self.world_size, self.limit_test_batches, self.limit_val_batches = (
                world_size, limit_test_batches, limit_val_batches,
            )  # fmt: skip

    class Validating(pl.LightningModule):
        def validation_step(self, batch, batch_idx):
            return None

    check = loop._test_batches_exist
    check(Trainer(1, 0.4), Data(1025), 0)  # 17 batches, 6 of them scored
    with pytest.raises(UserError, match=r"limit_test_batches 0.4 of 2 test batches \(the smallest process's share\)"):
        check(Trainer(8, 0.4), Data(1025), 3)  # rank 7: 128 examples, 2 batches, none kept
    check(Trainer(8, 0.5), Data(1025), 3)  # one batch each
    with pytest.raises(UserError, match="the test set of generation 2 has 3 examples, fewer than the 4 processes"):
        check(Trainer(4), Data(3), 2)
    check(Trainer(2), Data(3, val=1), 0)  # the model does not validate: its validation set is not looked at
    with pytest.raises(UserError, match="the val set of generation 0 has 1 examples, fewer than the 2 processes"):
        check(Trainer(2), Data(3, val=1), 0, Validating())
    check(Trainer(2, limit_val_batches=0), Data(3, val=1), 0, Validating())  # validation switched off


def test_slurm_requeue_is_switched_off_and_its_checkpoints_never_loaded_or_committed(tmp_path, monkeypatch):
    """Lightning's SLURM auto-requeue saves a mid-epoch hpc_ckpt_N.ckpt into the staging folder, which any later
    fit or test without an explicit checkpoint would load (the test would score stale weights)."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    monkeypatch.setattr(SLURMEnvironment, "_validate_srun_used", staticmethod(lambda: None))
    monkeypatch.setattr(SLURMEnvironment, "_validate_srun_variables", staticmethod(lambda: None))
    slurm = SLURMEnvironment()  # auto_requeue=True, Lightning's default on SLURM
    loop._without_slurm_requeue(SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=slurm)))
    assert not slurm.auto_requeue
    other = LightningEnvironment()  # torchrun, the default: nothing to switch off, nothing replaced
    loop._without_slurm_requeue(SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=other)))
    trainer = loop.pl.Trainer(accelerator="cpu", plugins=[SLURMEnvironment()], logger=False)
    loop._without_slurm_requeue(trainer)  # the attribute Lightning's signal connector reads
    assert trainer._accelerator_connector.cluster_environment.auto_requeue is False

    out = tmp_path / "run"
    run(out, generations=2)
    shutil.rmtree(out / "gen_001")  # as if the job had been requeued before generation 1 was committed
    stage = GenerationStore(out).begin(1)
    torch.save({"stale": torch.zeros(1)}, stage / "hpc_ckpt_1.ckpt")  # left by a requeued job
    run(out, generations=2)
    assert (out / "gen_001").is_dir() and not list(out.glob("*/hpc_ckpt_*")) and not list(out.glob(".*/hpc_ckpt_*"))
