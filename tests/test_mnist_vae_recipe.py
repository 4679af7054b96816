"""The MNIST VAE recipe end to end on tiny settings: workflows, files, resume after SIGKILL, 2-process DDP."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kill_at_step import recipe_runner

from callbacks.synthetic_data import SyntheticDataCallback
from collapse.cli import parse_config
from collapse.store import GenerationStore
from recipes.mnist_vae import MNISTVAEConfig, main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mnist_vae.py"
REAL = 96  # real training digits of the tiny runs

TINY = [
    "--data.num_real", str(REAL),
    "--data.num_test", "64",
    "--model.channels", "[8, 16]",
    "--model.hidden", "32",
    "--model.latent_dim", "8",
    "--trainer.accelerator", "cpu",
    "--trainer.max_epochs", "2",
    "--batch_size", "32",
    "--sample_batch_size", "40",
    "--wandb.mode", "disabled",
]  # fmt: skip


def tiny(out_dir: Path, workflow: str, *extra: str, generations: int = 2) -> MNISTVAEConfig:
    args = ["--out_dir", str(out_dir), "--workflow", workflow, "--generations", str(generations), *TINY, *extra]
    return parse_config(MNISTVAEConfig, args)


def read_csv(path: Path) -> dict[tuple[int, str], float]:
    with open(path) as fh:
        return {(int(r["generation"]), r["metric"]): float(r["value"]) for r in csv.DictReader(fh)}


# workflow, expected (train_real, train_synthetic) at generation 1 for n = REAL real digits
SIZES = {
    "replace": (0, REAL),
    "accumulate": (REAL, REAL),
    "accumulate_subsample": (None, None),  # REAL in all, drawn from the pool of 2 REAL
    "mix(real=48, synthetic=64)": (48, 64),
}


@pytest.mark.slow
@pytest.mark.parametrize("workflow", list(SIZES))
def test_two_generations_train_on_what_the_workflow_promises(tmp_path, workflow, capsys):
    out = tmp_path / "run"
    result = main(tiny(out, workflow, "--quality.classifier_epochs", "1"))
    assert result.committed == [0, 1]
    store = GenerationStore(out)
    assert store.completed() == [0, 1]
    m0, m1 = result.metrics[0], result.metrics[1]
    assert (m0["train_real"], m0["train_synthetic"]) == (min(REAL, 48) if "mix" in workflow else REAL, 0)
    real, synthetic = SIZES[workflow]
    if real is None:
        assert m1["train_size"] == REAL and 0 < m1["train_real"] < REAL
        assert m1["train_real"] + m1["train_synthetic"] == REAL
    else:
        assert (m1["train_real"], m1["train_synthetic"]) == (real, synthetic)
    for g in (0, 1):
        gen = store.load(g)
        images = gen.arrays["images"]
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28)
        assert images.shape[0] == gen.manifest["num_samples"] > 0
        assert (out / f"gen_{g:03d}" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        hist = json.loads((out / f"gen_{g:03d}" / "class_histogram.json").read_text())["counts"]
        assert len(hist) == 10 and sum(hist) == images.shape[0]
        metrics = result.metrics[g]
        assert metrics["test_loss"] == pytest.approx(metrics["test_recon"] + metrics["test_kl"], rel=1e-5)
        assert metrics["sample_fid"] > 0 and 0 <= metrics["sample_class_entropy"] <= np.log(10) + 1e-6
    rows = read_csv(out / "metrics.csv")
    assert rows[(1, "test_loss")] == pytest.approx(m1["test_loss"])
    assert "[vae]" in capsys.readouterr().out


def test_defaults_and_bad_input(tmp_path):
    cfg = parse_config(MNISTVAEConfig, ["--out_dir", str(tmp_path / "r")])
    assert cfg.generations == 4 and cfg.data.source == "embedded" and cfg.model.latent_dim == 20
    assert cfg.model.sample_mode == "mean"
    with pytest.raises(SystemExit):
        parse_config(MNISTVAEConfig, ["--trainer.no_such_flag", "1"])


def run_recipe(out: Path, workflow: str, *extra: str, timeout: float = 300, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(RECIPE), "--out_dir", str(out), "--workflow", workflow, "--generations", "3", *TINY]
    return subprocess.Popen([*cmd, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


@pytest.mark.slow
@pytest.mark.parametrize("when", ["mid_fit", "after_commit"])
def test_sigkill_at_any_moment_resumes_to_the_unbroken_metrics(tmp_path, when):
    extra = ("--quality.enabled", "false", "--trainer.max_epochs", "3")
    unbroken = tmp_path / "unbroken"
    finish(run_recipe(unbroken, "accumulate", *extra))

    out = tmp_path / "run"
    proc = run_recipe(out, "accumulate", *extra)
    # Kill as soon as the chosen moment is reached: a mid-fit checkpoint of generation 1, or gen_001 committed.
    target = out / (".gen_001.partial/checkpoints/last.ckpt" if when == "mid_fit" else "gen_001/manifest.json")
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    done_before = GenerationStore(out).completed()
    assert done_before != [0, 1, 2], "the run finished before it could be killed"

    stdout = finish(run_recipe(out, "accumulate", *extra))
    assert stdout.count("finished earlier") == len(done_before)  # finished generations are not redone
    assert GenerationStore(out).completed() == [0, 1, 2]
    assert (out / "metrics.csv").read_text() == (unbroken / "metrics.csv").read_text()
    for g in range(3):
        images = GenerationStore(out).samples(g, "images")
        np.testing.assert_array_equal(images, GenerationStore(unbroken).samples(g, "images"))
    assert not list(out.glob(".gen_*"))


@pytest.mark.slow
def test_two_process_ddp_writes_each_generation_once_and_exactly(tmp_path):
    from lit_modules.vae import VAEModule

    out = tmp_path / "ddp"
    extra = ("--trainer.devices", "2", "--trainer.strategy", "ddp", "--quality.enabled", "false", "--generations", "2")
    stdout = finish(run_recipe(out, "accumulate", *extra), timeout=400)
    assert stdout.count("[vae]") == 2  # one progress line per generation: rank 0 only
    store = GenerationStore(out)
    assert store.completed() == [0, 1]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == len({(r["generation"], r["metric"]) for r in rows})  # metrics written once

    cfg = tiny(out, "accumulate", "--generations", "2")
    for g in (0, 1):
        gen = store.load(g)
        assert gen.manifest["num_samples"] == REAL and gen.arrays["images"].shape == (REAL, 28, 28)
        assert not (out / f"gen_{g:03d}" / "sample_chunks").exists()
        # The model both ranks trained, scored and sampled on one process, must give the stored numbers.
        model = VAEModule(cfg.model)
        model.load_state_dict(torch.load(out / f"gen_{g:03d}" / "model.pt", weights_only=True))
        model.eval()
        again = GenerationStore(tmp_path / f"again{g}")
        SyntheticDataCallback(again, g, REAL, 40, seed=gen.manifest["sampling"]["seed"]).sample_into_store(model)
        redrawn = np.load(again.staging(g) / "images.npy")
        np.testing.assert_array_equal(redrawn, gen.arrays["images"])  # chunk seeds do not depend on the ranks
    metrics = json.loads((out / "gen_000" / "metrics.json").read_text())
    single = _test_loss_one_process(out, cfg)
    assert metrics["test_loss"] == pytest.approx(single, rel=1e-5)  # disjoint shards: every test digit once

    # An error on rank 0 (here: the run dir holds another config) stops every rank: one line, no hang.
    proc = run_recipe(out, "accumulate", *extra, "--model.lr", "0.002")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert stderr.strip().count("error:") == 1 and "different config" in stderr, stderr[-2000:]


def _test_loss_one_process(out: Path, cfg: MNISTVAEConfig) -> float:
    """Generation 0's test loss recomputed in this process, one batch at a time, from its saved weights."""
    from datamodules.mnist import MNISTDataModule
    from lit_modules.vae import VAEModule

    data = MNISTDataModule(cfg.data)
    data.prepare_data()
    data.setup("test")
    model = VAEModule(cfg.model)
    model.load_state_dict(torch.load(out / "gen_000" / "model.pt", weights_only=True))
    model.eval()
    loader = torch.utils.data.DataLoader(data.test_dataset, batch_size=cfg.batch_size)
    total, count = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(loader):
            loss = model.negative_elbo(batch, batch_idx=i)
            total += float(loss.sum())
            count += batch.shape[0]
    return total / count


def _bad_idx(root: Path) -> Path:
    """A folder with the four official IDX file names, the training images truncated."""
    import struct

    root.mkdir()
    images = struct.pack(">IIII", 0x00000803, 10, 28, 28) + bytes(28 * 28 * 3)  # header says 10, holds 3
    labels = struct.pack(">II", 0x00000801, 10) + bytes(10)
    (root / "train-images-idx3-ubyte").write_bytes(images)
    (root / "train-labels-idx1-ubyte").write_bytes(labels)
    (root / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x00000803, 1, 28, 28) + bytes(784))
    (root / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x00000801, 1) + bytes(1))
    return root


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--data.source", "idx", "--data.path", "{tmp}/missing"], "missing"),
        (["--data.source", "idx", "--data.path", "{bad_idx}"], "train-images-idx3-ubyte"),
        (["--data.num_real", "100000"], "4000"),
        (["--data.source", "parquet"], "embedded"),
        (["--model.sample_mode", "median"], "sample_mode"),
        (["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"], "ddp_spawn"),
        pytest.param(
            ["--trainer.accelerator", "gpu"],
            "no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU"),
        ),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, flags, needle):
    bad_idx = _bad_idx(tmp_path / "bad_idx")
    flags = [f.format(tmp=tmp_path, bad_idx=bad_idx) for f in flags]
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(RECIPE), "--out_dir", str(out), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not out.exists()


def test_wandb_gets_metrics_and_sample_grids_of_every_generation(tmp_path, monkeypatch):
    import engine.loop as loop

    calls = []

    class FakeTracker:
        def __init__(self, cfg, recipe, out_dir, config):
            calls.append(("init", cfg.mode, recipe, config["workflow"], config["seed"]))

        def log(self, metrics, generation):
            calls.append(("log", generation, sorted(metrics)))

        def log_image(self, key, path, generation=None):
            assert Path(path).read_bytes()[:4] == b"\x89PNG"
            calls.append(("image", generation, key))

        def save_file(self, path):
            calls.append(("file", Path(path).name))

        def finish(self, failed=False):
            calls.append(("finish", failed) if failed else ("finish",))

    monkeypatch.setattr(loop, "Tracker", FakeTracker)
    main(tiny(tmp_path / "run", "replace", "--wandb.mode", "offline", "--quality.enabled", "false", "--seed", "3"))
    assert calls[0] == ("init", "offline", "mnist_vae", "replace", 3)
    assert [c[1:] for c in calls if c[0] == "image"] == [(0, "samples/samples"), (1, "samples/samples")]
    logs = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logs] == [0, 1] and {"test_loss", "test_recon", "test_kl"} <= set(logs[0][2])
    assert calls[-2:] == [("file", "metrics.csv"), ("finish",)]


def test_tracker_groups_runs_by_recipe_with_workflow_and_seed(tmp_path, monkeypatch):
    import wandb

    from collapse.tracking import Tracker, WandbConfig

    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or _NoRun())
    Tracker(WandbConfig(mode="offline"), "mnist_vae", tmp_path, {"workflow": "accumulate", "seed": 2}).finish()
    assert seen["group"] == "mnist_vae" and seen["job_type"] == "accumulate" and seen["mode"] == "offline"
    assert {"workflow=accumulate", "seed=2"} <= set(seen["tags"])


class _NoRun:
    def define_metric(self, *args, **kwargs):
        pass

    def finish(self, exit_code=None):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_fit_killed_mid_epoch_resumes_from_its_mid_epoch_checkpoint_to_the_unbroken_result(tmp_path, processes):
    # Generation 1 trains on 192 digits, 6 batches of 32 an epoch (3 per rank of 2), for 6 (12) epochs; the mid-epoch
    # checkpoint of step 16 is from the middle of an epoch, and the kill comes at the next step. Before: the
    # resumed fit started that epoch's batches from the first again (Lightning counts on from where it stopped),
    # and its new loader's seed shifted the VAE's noise: every later number differed.
    # The mid-epoch checkpoints are due at every look at the clock (--checkpoint_minutes 1e-9), one every
    # TimedCheckpoint.CHECK_EVERY = 16 optimizer steps.
    epochs = "6" if processes == 1 else "12"
    extra = ["--quality.enabled", "false", "--trainer.max_epochs", epochs, "--checkpoint_minutes", "1e-9"]
    if processes == 2:
        extra += ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    flags = ["--workflow", "accumulate", "--generations", "3", *TINY, *extra]
    recipe = recipe_runner(tmp_path, "mnist_vae", "VAEModality", "MNISTVAEConfig", flags)
    unbroken = tmp_path / "unbroken"
    assert recipe(unbroken).returncode == 0
    out = tmp_path / "run"
    killed = recipe(out, KILL="17")
    assert killed.returncode == -9, killed.stderr[-2000:]
    checkpoint = torch.load(out / ".gen_001.partial" / "checkpoints" / "last.ckpt", weights_only=False)
    per_epoch = 6 // processes
    assert checkpoint["global_step"] == 16 and 16 % per_epoch  # from the middle of an epoch
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 16 // per_epoch, "batches": 16 % per_epoch}
    ]
    resumed = recipe(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "finished earlier" in resumed.stdout
    assert (out / "metrics.csv").read_text() == (unbroken / "metrics.csv").read_text()
    for g in range(3):
        images = GenerationStore(out).samples(g, "images")
        np.testing.assert_array_equal(images, GenerationStore(unbroken).samples(g, "images"))
