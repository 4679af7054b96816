"""Fixed compute (``--steps_per_generation``): every generation takes the same number of optimizer steps.

Tiny toy runs (tests/loop_script.py): 32 real points, batch 16, 3 epochs, so generation 0 takes
S = 2 batches x 3 epochs = 6 steps; under accumulate, generation g trains on 32 (g + 1) points.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml
from loop_script import MAX_EPOCHS, REAL_SIZE, TinyModality, tiny_config
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from collapse.cli import run as run_cli
from collapse.errors import ConfigError
from collapse.rundir import RunDirError
from collapse.store import GenerationStore
from datamodules.synthetic import SyntheticAccumulatingDataModule
from datamodules.toy import GaussianPointsDataModule
from datamodules.workflows import Workflow
from engine.loop import FIT_FILE, _optimizer_steps_per_epoch, run_generations
from recipes.toy_gaussian import ToyGaussianConfig
from recipes.toy_gaussian import main as toy_main

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
S0 = math.ceil(REAL_SIZE / BATCH) * MAX_EPOCHS  # generation 0's optimizer steps: 6


def run(out: Path, workflow: str, modality: TinyModality | None = None, **overrides):
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


class Boom(Exception):
    pass


class RaiseAt(pl.Callback):
    """Raises Boom in ``hook`` of ``generation`` (at training epoch ``epoch``): a run killed there."""

    def __init__(self, hook: str, generation: int, epoch: int | None = None):
        self.hook, self.generation, self.epoch = hook, generation, epoch
        self.current: int | None = None

    def setup(self, trainer, pl_module, stage):
        self.current = int(Path(trainer.default_root_dir).name[5:8])  # .gen_XXX.partial

    def _maybe(self, hook: str, trainer) -> None:
        if hook == self.hook and self.current == self.generation and self.epoch in (None, trainer.current_epoch):
            raise Boom(hook)

    def on_train_epoch_start(self, trainer, pl_module):
        self._maybe("on_train_epoch_start", trainer)

    def on_test_start(self, trainer, pl_module):
        self._maybe("on_test_start", trainer)


class Probe(pl.Callback):
    """Records, per generation, the trainer's max_epochs and the optimizer steps it tells schedules to expect."""

    def __init__(self):
        self.seen: dict[int, tuple[int, int]] = {}

    def on_fit_start(self, trainer, pl_module):
        g = int(Path(trainer.default_root_dir).name[5:8])
        self.seen[g] = (trainer.max_epochs, trainer.estimated_stepping_batches)


def steps(result) -> list[int]:
    return [int(result.metrics[g]["train_steps"]) for g in sorted(result.metrics)]


def epochs_per_generation(modality: TinyModality) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for g, epoch in modality.log.get("epochs", []):
        out.setdefault(g, []).append(epoch)
    return out


@pytest.fixture(scope="module")
def plain_accumulate(tmp_path_factory):
    """An accumulate run without the flag: the epochs decide the steps."""
    out = tmp_path_factory.mktemp("plain") / "run"
    return run(out, "accumulate")


@pytest.fixture(scope="module")
def first_accumulate(tmp_path_factory):
    """An unbroken accumulate run with --steps_per_generation first, and the epochs each generation trained."""
    out = tmp_path_factory.mktemp("first") / "run"
    modality = TinyModality()
    return run(out, "accumulate", modality, steps_per_generation="first"), modality


def test_without_the_flag_steps_grow_with_the_accumulated_set(plain_accumulate):
    assert S0 == 6
    assert steps(plain_accumulate) == [S0, 2 * S0, 3 * S0]  # a set of 32 (g + 1) points, 3 epochs each
    rows = {(r["generation"], r["metric"]): float(r["value"]) for r in metric_rows(plain_accumulate.out_dir)}
    assert [rows[(str(g), "train_steps")] for g in range(3)] == [6.0, 12.0, 18.0]
    config = yaml.safe_load((plain_accumulate.out_dir / "config.yaml").read_text())
    assert config["steps_per_generation"] is None


def test_first_gives_every_generation_generation_0s_steps(first_accumulate, plain_accumulate):
    result, modality = first_accumulate
    assert steps(result) == [S0, S0, S0]
    # The training sets are still the workflow's; only their use changes: 64 points = 4 steps a pass, so two passes
    # (the second cut short after 2 steps); 96 points = 6 steps, one pass.
    assert [result.metrics[g]["train_size"] for g in range(3)] == [32, 64, 96]
    assert epochs_per_generation(modality) == {0: [0, 1, 2], 1: [0, 1], 2: [0]}
    # Generation 0 is unaffected: the same weights, samples and metrics as without the flag.
    gen0 = {k: v for k, v in file_hashes(result.out_dir).items() if k.startswith("0/")}
    assert gen0 == {k: v for k, v in file_hashes(plain_accumulate.out_dir).items() if k.startswith("0/")}
    assert yaml.safe_load((result.out_dir / "config.yaml").read_text())["steps_per_generation"] == "first"
    assert not list(result.out_dir.glob(f"gen_*/{FIT_FILE}"))  # the step count is published in metrics.json only


@pytest.mark.parametrize(
    ("spec", "sizes", "s"),
    [
        ("accumulate_subsample(size=24)", [24, 24, 24], S0),  # 24 points = 2 steps a pass (16 + 8): 3 passes
        ("mix(real=16, synthetic=40)", [16, 56, 56], 3),  # S = 1 batch x 3 epochs; 56 points: a random 48 of them
    ],
)
def test_first_works_with_subsample_and_mix(tmp_path, spec, sizes, s):
    result = run(tmp_path / "run", spec, steps_per_generation="first")
    assert steps(result) == [s, s, s]
    assert [result.metrics[g]["train_size"] for g in range(3)] == sizes


def test_an_explicit_integer_fixes_every_generation_including_0(tmp_path):
    modality, probe = TinyModality(), Probe()
    cfg = tiny_config(tmp_path / "run", "accumulate", steps_per_generation=5)
    result = run_generations(modality, cfg, recipe="toy", callbacks=[probe])
    assert steps(result) == [5, 5, 5]
    # 2, 4 and 6 steps a pass: 3 passes (2 + 2 + 1), 2 passes (4 + 1), one pass cut short at 5.
    assert epochs_per_generation(modality) == {0: [0, 1, 2], 1: [0, 1], 2: [0]}
    # max_epochs spans the fit (the toy's cosine schedule), and step-based schedules (the LM's) are sized for S.
    assert probe.seen == {0: (3, 5), 1: (2, 5), 2: (1, 5)}


def test_replace_is_the_same_with_and_without_the_flag(tmp_path):
    plain = run(tmp_path / "plain", "replace")
    fixed = run(tmp_path / "fixed", "replace", steps_per_generation="first")
    assert steps(plain) == steps(fixed) == [S0, S0, S0]  # the set never grows: S steps are the 3 epochs
    assert (tmp_path / "plain" / "metrics.csv").read_text() == (tmp_path / "fixed" / "metrics.csv").read_text()
    assert file_hashes(tmp_path / "plain") == file_hashes(tmp_path / "fixed")


@pytest.mark.parametrize(
    ("hook", "generation", "epoch", "gen1_epochs"),
    [
        ("on_train_epoch_start", 1, 1, [1]),  # mid-fit: resumes from the checkpoint written after pass 0 (4 steps)
        ("on_test_start", 0, None, [0, 1]),  # generation 0 fitted, not tested: its step count comes from fit.json
    ],
)
def test_a_resumed_run_keeps_the_step_budget(tmp_path, first_accumulate, hook, generation, epoch, gen1_epochs):
    unbroken, _ = first_accumulate
    out = tmp_path / "run"
    with pytest.raises(Boom):
        run_generations(
            TinyModality(),
            tiny_config(out, "accumulate", steps_per_generation="first"),
            recipe="toy",
            callbacks=[RaiseAt(hook, generation, epoch)],
        )
    if generation == 0:
        assert (out / ".gen_000.partial" / FIT_FILE).is_file()
    else:
        assert (out / ".gen_001.partial" / "checkpoints" / "last.ckpt").is_file()
    # The resumed run's modality asks for 5 epochs: the budget still comes from generation 0 as it was fitted
    # (config.yaml holds only the loop settings here, so this change is not refused).
    modality = TinyModality(max_epochs=5)
    result = run(out, "accumulate", modality, steps_per_generation="first")
    assert steps(result) == [S0, S0, S0]
    assert epochs_per_generation(modality)[1] == gen1_epochs
    assert (out / "metrics.csv").read_text() == (unbroken.out_dir / "metrics.csv").read_text()
    assert file_hashes(out) == file_hashes(unbroken.out_dir)
    assert not list(out.glob(f"gen_*/{FIT_FILE}"))


def test_changing_the_flag_on_resume_is_refused(tmp_path):
    out = tmp_path / "run"
    run(out, "accumulate", generations=1)
    with pytest.raises(RunDirError, match=r"different config \(steps_per_generation: None -> 'first'\)"):
        run(out, "accumulate", generations=1, steps_per_generation="first")
    with pytest.raises(RunDirError, match="steps_per_generation"):
        run(out, "accumulate", generations=1, steps_per_generation=6)


@pytest.mark.parametrize("value", [0, -3, "firts", "6", True, 2.5])
def test_bad_values_are_one_line_config_errors(tmp_path, value):
    with pytest.raises(ConfigError, match=r"^--steps_per_generation must be a positive integer") as info:
        tiny_config(tmp_path / "run", "accumulate", steps_per_generation=value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_the_recipe_flag_parses_and_refuses_bad_values(tmp_path, capsys):
    base = ["--out_dir", str(tmp_path / "run"), "--generations", "1", "--wandb.mode", "disabled"]
    seen = []
    for value, expected in [("first", "first"), ("500", 500), ("null", None)]:
        run_cli(seen.append, ToyGaussianConfig, [*base, "--steps_per_generation", value])
        assert seen[-1].steps_per_generation == expected
    for value in ("0", "-2", "last"):
        with pytest.raises(SystemExit) as info:
            run_cli(toy_main, ToyGaussianConfig, [*base, "--steps_per_generation", value])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --steps_per_generation") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_steps_per_epoch_count_as_lightning_and_the_sampler_do(tmp_path):
    real = GaussianPointsDataModule(num_train=200, num_val=8, num_test=8, seed=0)
    real.setup("fit")
    for size in (1, 15, 16, 17, 33, 47):
        dm = SyntheticAccumulatingDataModule(
            real, Workflow.parse("accumulate"), GenerationStore(tmp_path), 0, real_size=size, batch_size=BATCH
        )
        for world in (1, 2, 3):
            loaders = [
                DataLoader(dm.train_dataset, batch_size=BATCH, sampler=DistributedSampler(dm.train_dataset, world, r))
                for r in range(world)
            ]
            assert {len(loader) for loader in loaders} == {dm.train_batches_per_epoch(world)}
    assert _optimizer_steps_per_epoch(7, 1, None) == 7
    assert _optimizer_steps_per_epoch(7, 2, None) == 4  # Lightning also steps on the last, partial accumulation
    assert _optimizer_steps_per_epoch(7, 1, 3) == 3 and _optimizer_steps_per_epoch(7, 1, 0.5) == 3


@pytest.mark.slow
def test_two_processes_count_steps_per_process(tmp_path):
    # Run as a script: Lightning's ddp relaunches the command line once per extra process.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = {g: json.loads((out / f"gen_{g:03d}" / "metrics.json").read_text()) for g in range(3)}
    # 16 of the 32 real points per process: 1 batch a pass, 3 epochs = 3 steps at generation 0, and 3 later on.
    assert [metrics[g]["train_steps"] for g in range(3)] == [3, 3, 3]
    assert [metrics[g]["train_size"] for g in range(3)] == [32, 64, 96]


class TwoProcesses(TinyModality):
    """The tiny toy modality on two CPU processes (ddp)."""

    def trainer_kwargs(self, generation: int) -> dict:
        return {**super().trainer_kwargs(generation), "devices": 2, "strategy": "ddp"}


if __name__ == "__main__":  # the two-process run of test_two_processes_count_steps_per_process
    run(Path(sys.argv[1]), "accumulate", TwoProcesses(), steps_per_generation="first")
