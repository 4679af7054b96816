"""Progress you can watch: the progress-line utility, the Lightning callback, the bar on a terminal, --log_level."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from loop_script import gaussian_modality
from torch.utils.data import DataLoader

from callbacks.progress import LineProgress, RateMeter, progress_bar_wanted
from collapse.cli import parse_config, run
from collapse.errors import ConfigError
from collapse.progress import Progress, console, format_duration, global_rank, progress_interval
from collapse.rundir import config_dict, config_hash
from collapse.tracking import WandbConfig
from engine.analytic import AnalyticConfig
from engine.loop import LoopConfig, run_generations
from lit_modules.toy import GaussianDensity
from recipes.toy_gaussian import ToyGaussianConfig

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """A fake monotonic clock: tests move it by hand instead of sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Lines(logging.Handler):
    """Collects the messages of a private logger."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def lines():
    logger = logging.getLogger("test_progress.lines")
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, handler.lines
    logger.removeHandler(handler)


# ---- the utility ---------------------------------------------------------------------------------------------------


def test_a_line_when_the_interval_has_passed_and_not_more_often(lines):
    logger, out = lines
    clock = Clock()
    p = Progress(100, "sampling gen 0", "samples", interval=30, clock=clock, rank=0, logger=logger)
    for t, n in ((10, 10), (29.9, 10)):
        clock.t = 1000 + t
        assert not p.update(n)
    assert out == []
    clock.t = 1030
    assert p.update(10)
    assert out == ["sampling gen 0: 30/100 samples (30%), 1 samples/s, ETA 1m10s"]
    clock.t = 1045  # 15 s after the last line: not yet
    assert not p.update(10)
    clock.t = 1060
    assert p.update(10)
    assert out[-1] == "sampling gen 0: 50/100 samples (50%), 0.833 samples/s, ETA 1m00s"
    clock.t = 1080
    p.update(50)
    p.close()
    p.close()  # once only
    assert len(out) == 3
    assert out[-1] == "sampling gen 0: done, 100 samples in 1m20s (1.25 samples/s)"


def test_rate_counts_only_new_work_and_extra_is_read_only_when_printing(lines):
    logger, out = lines
    clock = Clock()
    reads = []

    def loss() -> str:
        reads.append(1)
        return "loss 0.5"

    p = Progress(1000, "training gen 2", "steps", interval=60, done=400, clock=clock, rank=0, logger=logger)
    for step in range(401, 1001):
        clock.t += 0.25
        p.update(done=step, extra=loss)
    # 600 steps in 150 s: 4 steps/s; lines at 60 s and 120 s only, the loss read for those two alone.
    assert out == [
        "training gen 2: 640/1000 steps (64%), 4 steps/s, ETA 1m30s, loss 0.5",
        "training gen 2: 880/1000 steps (88%), 4 steps/s, ETA 30s, loss 0.5",
    ]
    assert len(reads) == 2


def test_a_short_phase_is_silent_and_an_unknown_total_has_no_eta(lines):
    logger, out = lines
    clock = Clock()
    with Progress(10, "decoding gen 0", "stories", interval=30, clock=clock, rank=0, logger=logger) as p:
        clock.t += 29
        p.update(10)
    assert out == []
    with Progress(None, "reading", "stories", interval=0, clock=clock, rank=0, logger=logger) as p:
        clock.t += 2
        p.update(5)
    assert out == ["reading: 5 stories, 2.5 stories/s", "reading: done, 5 stories in 2s (2.5 stories/s)"]
    with Progress(0, "sampling gen 0", "samples", interval=0, clock=clock, rank=0, logger=logger):
        clock.t += 2  # nothing to draw: no line at all
    assert len(out) == 2


def test_other_ranks_print_nothing(lines, monkeypatch):
    logger, out = lines
    clock = Clock()
    with Progress(10, "x", interval=0, clock=clock, rank=1, logger=logger) as p:
        clock.t += 1
        p.update(5)
    assert out == [] and p.done == 5
    monkeypatch.setenv("RANK", "3")
    assert global_rank() == 3
    with Progress(10, "x", interval=0, clock=clock, logger=logger) as p:
        clock.t += 1
        p.update(5)
    assert out == []
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert global_rank() == 0


def _wait_for(predicate, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_a_heartbeat_line_while_one_unit_takes_longer_than_the_interval(lines):
    logger, out = lines
    p = Progress(4, "training gen 0", "steps", interval=0.05, logger=logger, heartbeat=True)
    assert _wait_for(lambda: len(out) >= 2)  # nothing updated: the heartbeat writes on its own
    assert re.fullmatch(r"training gen 0: 0/4 steps \(0%\), 0 steps/s, no new steps for \d+s", out[0])
    p.update(1)
    p.close()
    n = len(out)
    assert out[-1].startswith("training gen 0: done, 1 steps in ")
    assert not any(t.name.startswith("progress: training gen 0") for t in threading.enumerate())
    time.sleep(0.2)
    assert len(out) == n  # closed: the heartbeat has stopped


def test_no_heartbeat_on_other_ranks_with_interval_0_or_after_a_failure(lines):
    logger, out = lines
    beats = lambda: [t for t in threading.enumerate() if t.name == "progress: quiet"]  # noqa: E731
    for kwargs in ({"rank": 1, "interval": 0.01}, {"rank": 0, "interval": 0}):
        p = Progress(3, "quiet", logger=logger, heartbeat=True, **kwargs)
        assert beats() == []
        p.close()
    with pytest.raises(RuntimeError), Progress(3, "quiet", interval=0.05, logger=logger, heartbeat=True):
        assert len(beats()) == 1
        raise RuntimeError("the phase failed")
    assert beats() == []
    n = len(out)
    time.sleep(0.2)
    assert len(out) == n and not any("done" in line for line in out)


def test_a_heartbeat_left_running_by_a_phase_cut_short_ends_with_its_run(lines):
    logger, out = lines
    names = lambda: {t.name for t in threading.enumerate()}  # noqa: E731
    outer = Progress(3, "outer", interval=0.05, logger=logger, heartbeat=True)  # not the run's: left alone
    with console("INFO", "toy"):
        Progress(3, "orphan", interval=0.05, logger=logger, heartbeat=True)  # never closed (a hook skipped)
        assert "progress: orphan" in names()
    assert "progress: orphan" not in names() and "progress: outer" in names()
    outer.stop()
    assert "progress: outer" not in names()


def test_durations_read_naturally():
    assert [format_duration(s) for s in (0, 42.4, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_console_writes_project_records_to_stderr_for_the_run_only(monkeypatch, capsys):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as on the command line: nothing set up logging before
    before = logging.getLogger("datamodules").level
    with console("INFO", "toy", interval=5):
        assert progress_interval() == 5
        logging.getLogger("datamodules.tinystories").info("stories: %d", 3)
        logging.getLogger("datamodules.tinystories").debug("not shown")
        logging.getLogger("some_library").info("not shown either")
        logging.getLogger("some_library").warning("careful")
    assert capsys.readouterr().err == "[toy] stories: 3\n[toy] warning: careful\n"
    with console("WARNING", "toy"):
        logging.getLogger("collapse.progress").info("a progress line")
    assert capsys.readouterr().err == ""
    assert root.handlers == [] and logging.getLogger("datamodules").level == before
    assert progress_interval() == 30
    with pytest.raises(ConfigError, match="--log_level must be one of DEBUG, INFO, WARNING, ERROR"):
        with console("LOUD"):
            pass
    monkeypatch.setenv("LOCAL_RANK", "1")  # another process of a multi-process run: warnings only
    with console("DEBUG", "toy"):
        logging.getLogger("engine.loop").info("said by rank 0 already")
        logging.getLogger("engine.loop").warning("rank 1 is out of memory")
    assert capsys.readouterr().err == "[toy] warning: rank 1 is out of memory\n"


# ---- the Lightning callback and the progress bar ------------------------------------------------------------------


def test_callback_writes_training_and_test_lines_in_a_tiny_fit(caplog):
    torch.manual_seed(0)
    points = torch.randn(64, 2)
    model = GaussianDensity(dim=2, lr=0.05, init_scale=1.0)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[LineProgress("gen 0", interval=0)],
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="collapse.progress"):
        trainer.fit(model, DataLoader(points, batch_size=16))
        trainer.test(model, DataLoader(points[:32], batch_size=16), verbose=False)
    got = [r.getMessage() for r in caplog.records if r.name == "collapse.progress"]
    training = [line for line in got if line.startswith("training gen 0: ") and "done" not in line]
    assert len(training) == 8  # 4 steps per epoch, 2 epochs, interval 0: every step
    assert re.fullmatch(r"training gen 0: 1/8 steps \(12%\), [\d.]+ steps/s, ETA \d+s, loss -?[\d.]+", training[0])
    assert training[-1].startswith("training gen 0: 8/8 steps (100%)")
    assert any(line.startswith("training gen 0: done, 8 steps in ") for line in got)
    assert [line.split(",")[0] for line in got if line.startswith("test gen 0")] == [
        "test gen 0: 1/2 batches (50%)",
        "test gen 0: 2/2 batches (100%)",
        "test gen 0: done",
    ]


class _SlowFirstStep(GaussianDensity):
    """A first training step that takes long (as a compiling one does)."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 0:
            time.sleep(0.4)
        return super().training_step(batch, batch_idx)


def test_the_callback_writes_a_line_during_a_long_first_step_and_stops_when_the_fit_fails(caplog):
    torch.manual_seed(0)
    points = torch.randn(32, 2)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[LineProgress("gen 0", interval=0.1)],
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="collapse.progress"):
        trainer.fit(_SlowFirstStep(dim=2, lr=0.05, init_scale=1.0), DataLoader(points, batch_size=16))
    got = [r.getMessage() for r in caplog.records if r.name == "collapse.progress"]
    assert any(re.match(r"training gen 0: 0/2 steps \(0%\), .*no new steps for \d+s$", line) for line in got), got

    class Fails(GaussianDensity):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("out of memory")

    callback = LineProgress("gen 1", interval=0.05)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[callback],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.fit(Fails(dim=2, lr=0.05, init_scale=1.0), DataLoader(points, batch_size=16))
    assert callback._train is None
    assert not any(t.name.startswith("progress: training gen 1") for t in threading.enumerate())


def test_progress_bar_only_on_a_terminal(monkeypatch, tmp_path):
    seen = {}

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            seen["bar"] = trainer.progress_bar_callback is not None
            seen["lines"] = any(isinstance(c, LineProgress) for c in trainer.callbacks)

    for tty in (True, False):
        monkeypatch.setattr(sys.stdout, "isatty", lambda tty=tty: tty)
        assert progress_bar_wanted() is tty
        cfg = LoopConfig(out_dir=str(tmp_path / f"tty_{tty}"), generations=1, wandb=WandbConfig(mode="disabled"))
        run_generations(gaussian_modality(1, num_train=64, num_val=16, num_test=32), cfg, callbacks=[Probe()])
        assert seen == {"bar": tty, "lines": not tty}


# ---- the flags ------------------------------------------------------------------------------------------------------


def test_log_level_and_progress_every_flags_parse_and_are_checked():
    cfg = parse_config(ToyGaussianConfig, ["--log_level", "debug", "--progress_every", "0"])
    assert cfg.log_level == "DEBUG" and cfg.progress_every == 0
    assert AnalyticConfig(log_level="warning").log_level == "WARNING"
    with pytest.raises(ConfigError, match="--progress_every must be a number of seconds >= 0"):
        AnalyticConfig(progress_every=-1)
    # Console settings only: a run resumes under other values, and a {hash} folder stays the same.
    louder = dataclasses.replace(cfg, log_level="ERROR", progress_every=30)
    assert config_hash(config_dict(cfg)) == config_hash(config_dict(louder))


def test_a_bad_log_level_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(lambda cfg: None, ToyGaussianConfig, ["--log_level", "LOUD"])  # a Lightning recipe's command line
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --log_level must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'\n"
    res = subprocess.run(
        [sys.executable, "recipes/gaussian.py", "--out_dir", str(tmp_path / "x"), "--log_level", "LOUD"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr == "error: --log_level must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'\n"
    assert not (tmp_path / "x").exists()


# ---- whole recipe runs ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_toy_recipe_shows_progress_lines_on_a_non_terminal(tmp_path):
    args = ["--generations", "2", "--data.num_train", "64", "--data.num_val", "16", "--data.num_test", "32",
            "--trainer.max_epochs", "2", "--batch_size", "32", "--wandb.mode", "disabled", "--progress_every", "0",
            "--out_dir", str(tmp_path / "run")]  # fmt: skip
    res = subprocess.run([sys.executable, "recipes/toy_gaussian.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("[toy]") == 2  # the summary lines stay on stdout, one per generation
    err = res.stderr.splitlines()
    for g, steps in ((0, 4), (1, 8)):  # 2 epochs of 64, then of 128 points (accumulate), 32 a batch
        assert any(line.startswith(f"[toy_gaussian] training gen {g}: 1/{steps} steps (") for line in err)
        assert any(line.startswith(f"[toy_gaussian] training gen {g}: done, {steps} steps in ") for line in err)
        assert any(line.startswith(f"[toy_gaussian] test gen {g}: done, 1 batches in ") for line in err)
        # Each generation draws the 64 samples the next one trains on (accumulate: 64 real + 64 synthetic).
        sampled = rf"\[toy_gaussian\] sampling gen {g}: 64/64 samples \(100%\), [\d.]+ samples/s"
        assert any(re.match(sampled, line) for line in err)
    quiet = subprocess.run(
        [sys.executable, "recipes/toy_gaussian.py", *args, "--log_level", "WARNING", "--generations", "3"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert quiet.returncode == 0 and "[toy_gaussian]" not in quiet.stderr  # a resumed run under another level


def test_a_tinystories_dry_run_shows_progress_while_it_prepares_the_data(tmp_path):
    args = ["--data.num_real", "200", "--data.num_test", "20", "--data.vocab_size", "300", "--model.vocab_size",
            "300", "--dry_run", "true", "--progress_every", "0", "--out_dir", str(tmp_path / "run")]  # fmt: skip
    env = {**os.environ, "MODEL_COLLAPSE_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [sys.executable, "recipes/tinystories.py", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr
    err = res.stderr.splitlines()
    assert any(line.startswith("[tinystories] reading the train split: 1/200 stories (") for line in err), res.stderr
    assert any(line.startswith("[tinystories] tokenising train split: done, 200 stories in ") for line in err)
    assert not (tmp_path / "run").exists()


def test_analytic_grid_shows_cells_done(tmp_path):
    res = subprocess.run(
        [sys.executable, "recipes/gaussian.py", "--out_dir", str(tmp_path / "g"), "--dim", "2", "--n_samples",
         "[10, 20]", "--workflow", "replace", "--generations", "3", "--num_seeds", "2", "--workers", "1",
         "--report", "false", "--wandb.mode", "disabled", "--progress_every", "0"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert re.search(r"^\[gaussian\] grid: 1/2 cells \(50%\), [\d.]+ cells/s, ETA \d+s$", res.stderr, re.M)
    assert re.search(r"^\[gaussian\] grid: done, 2 cells in \d+s", res.stderr, re.M)
    # --log_every 10 alone would print generations 0 and 2 of each cell; interval 0 prints every one.
    assert res.stdout.count("cell 1/2 replace dim=2 n_samples=10 gen ") == 3


class CountingDensity(GaussianDensity):
    """The toy model, counting 10 "tokens" per point it trains on (a host count, as a language model's)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = 0

    def training_step(self, batch, batch_idx):
        self.seen += 10 * len(batch)
        return super().training_step(batch, batch_idx)

    def throughput_counts(self):
        return {"tokens": self.seen}


def test_a_model_that_counts_its_tokens_gets_a_tokens_per_second_rate_in_the_training_lines(caplog):
    torch.manual_seed(0)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[LineProgress("gen 0", interval=0)],
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="collapse.progress"):
        trainer.fit(CountingDensity(dim=2, lr=0.05, init_scale=1.0), DataLoader(torch.randn(64, 2), batch_size=16))
    got = [r.getMessage() for r in caplog.records if r.name == "collapse.progress"]
    assert all(re.search(r", loss -?[\d.]+, [\d.]+ tokens/s$", line) for line in got if line.startswith("training"))
    assert len(got) == 5  # 4 steps and the closing line


def test_the_rate_meter_counts_from_when_it_started():
    clock = Clock()
    model = CountingDensity(dim=2)
    model.seen = 500  # before the meter: not counted
    meter = RateMeter(model, clock=clock)
    assert meter.rates() == {} and meter.text() == ""  # no time has passed
    model.seen, clock.t = 1300, clock.t + 4.0
    assert meter.rates() == {"tokens": 200.0} and meter.text() == "200 tokens/s"
    assert RateMeter(GaussianDensity(dim=2), clock=clock).text() == ""  # a model that counts nothing
