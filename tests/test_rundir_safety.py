"""Run directories under misuse: --overwrite beside the user's files, two runs in one folder, extending a run."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from collapse.cli import run
from collapse.rundir import (
    CONFIG,
    LOCK,
    METRICS,
    RUN_FILES,
    RunDirError,
    is_run_file,
    lock_run_dir,
    prepare_run_dir,
    release_run_dir,
)
from collapse.tracking import WandbConfig
from recipes import gaussian, toy_gaussian

ROOT = Path(__file__).resolve().parents[1]
BASE = {"dim": [1, 10], "lr": 0.001, "generations": 3}
TINY = ["--data.num_train", "64", "--data.num_val", "16", "--data.num_test", "32",
        "--trainer.max_epochs", "2", "--batch_size", "32", "--wandb.mode", "disabled"]  # fmt: skip
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}


def _old_run(out: Path) -> None:
    """A run directory with one of each kind of output, as the recipes leave them."""
    prepare_run_dir(out, "gaussian", BASE)
    release_run_dir(out)
    (out / METRICS).write_text("old\n")
    for folder in ("gen_000", ".gen_001.partial", "cells", "report", "wandb", ".scratch"):
        (out / folder).mkdir()
        (out / folder / "f").write_text("old\n")
    for name in ("tokenizer.json", "data.json", "metrics.json", ".metrics.csv.tmp-123"):
        (out / name).write_text("{}\n")


def _user_files(out: Path) -> dict[str, str]:
    (out / "src").mkdir(parents=True, exist_ok=True)
    files = {"notes.txt": "mine\n", "src/main.py": "print(1)\n", "gen_notes.txt": "mine too\n", "reports.md": "x\n"}
    for name, text in files.items():
        (out / name).write_text(text)
    return files


# ---- --overwrite deletes only what runs write -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        (CONFIG, True), (METRICS, True), ("gen_000", True), ("gen_1234", True), (".gen_002.partial", True),
        ("cells", True), ("report", True), ("wandb", True), ("tokenizer.json", True), ("data.json", True),
        (".scratch", True), (LOCK, True), (".config.yaml.tmp-77", True), ("metrics.json", True),
        ("notes.txt", False), ("src", False), ("gen_notes.txt", False), ("gen_01", False), ("cells.bak", False),
        (".gen_001", False), (".notes.txt.tmp-1", False), ("my_config.yaml", False), ("reports", False),
    ],
)  # fmt: skip
def test_run_files_are_named_exactly(name, ours):
    assert is_run_file(name) is ours
    assert len(RUN_FILES) == len(set(RUN_FILES))


def test_overwrite_keeps_the_users_files_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    _old_run(out)
    mine = _user_files(out)
    new = {**BASE, "dim": [2]}

    with pytest.raises(RunDirError) as err:
        prepare_run_dir(out, "gaussian", new)
    message = str(err.value)
    assert "\n" not in message and "different config (dim: [1, 10] -> [2])" in message
    assert "--overwrite true to delete that run's outputs" in message and "other files are kept" in message
    assert "gen_000" in message and "notes.txt" not in message
    assert (out / METRICS).read_text() == "old\n"

    prepare_run_dir(out, "gaussian", new, overwrite=True)
    release_run_dir(out)
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "kept its other files" in said
    assert "notes.txt" in said and "src/" in said
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([CONFIG, "gen_notes.txt", "notes.txt", "reports.md", "src"])
    assert yaml.safe_load((out / CONFIG).read_text()) == {"recipe": "gaussian", **new}
    for name, text in mine.items():
        assert (out / name).read_text() == text


def test_overwrite_removes_a_link_not_what_it_points_to(tmp_path):
    out = tmp_path / "run"
    _old_run(out)
    elsewhere = tmp_path / "my_wandb"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine\n")
    (out / "wandb" / "f").unlink()
    (out / "wandb").rmdir()
    (out / "wandb").symlink_to(elsewhere)
    prepare_run_dir(out, "gaussian", {**BASE, "lr": 1.0}, overwrite=True)
    assert not (out / "wandb").exists() and (elsewhere / "keep.txt").read_text() == "mine\n"


def test_outputs_without_a_config_beside_other_files_are_never_deleted(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "report").mkdir()
    (out / "report" / "draft.md").write_text("mine\n")
    (out / METRICS).write_text("mine\n")
    _user_files(out)
    for overwrite in (False, True):
        with pytest.raises(RunDirError) as err:
            prepare_run_dir(out, "gaussian", BASE, overwrite=overwrite)
        message = str(err.value)
        assert "\n" not in message and "may be no run folder" in message and "notes.txt" in message
        assert "pass --overwrite" not in message
    assert (out / "report" / "draft.md").read_text() == "mine\n" and (out / METRICS).read_text() == "mine\n"
    assert not (out / LOCK).exists()  # a refused run leaves no lock file behind


def test_a_config_yaml_that_is_no_runs_is_never_deleted(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / CONFIG).write_text("model: big\n")
    (out / METRICS).write_text("mine\n")
    with pytest.raises(RunDirError, match=f"{CONFIG} is no run's config.*even by --overwrite"):
        prepare_run_dir(out, "gaussian", BASE, overwrite=True)
    assert (out / CONFIG).read_text() == "model: big\n" and (out / METRICS).read_text() == "mine\n"


# ---- the run lock ------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from collapse.rundir import prepare_run_dir
    prepare_run_dir(sys.argv[1], "toy_gaussian", {"held": True})
    print("locked", flush=True)
    time.sleep(300)
    """
)


def _hold(out: Path) -> subprocess.Popen:
    argv = [sys.executable, "-c", HOLDER, str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    return proc


def test_a_held_run_dir_is_refused_in_one_line_until_its_holder_is_killed(tmp_path):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        before = (out / CONFIG).read_text()
        held = json.loads((out / LOCK).read_text())
        assert held["pid"] == holder.pid and held["host"] == socket.gethostname() and held["since"]

        # Another process, with another config and --overwrite: refused before it writes or deletes anything.
        args = ["--workflow", "replace", "--generations", "2", "--out_dir", str(out), "--overwrite", "true", *TINY]
        res = subprocess.run(
            [sys.executable, "recipes/toy_gaussian.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True
        )
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
        assert f"is in use by another run (pid {holder.pid} on {socket.gethostname()}, since {held['since']})" in (
            res.stderr
        )
        assert (out / CONFIG).read_text() == before and not list(out.glob("gen_*"))

        # In this process too (nothing held here), whatever the config.
        with pytest.raises(RunDirError, match=f"in use by another run \\(pid {holder.pid} "):
            prepare_run_dir(out, "toy_gaussian", {"held": True})
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert (out / LOCK).is_file()  # a killed holder leaves its file, but not its lock
    prepare_run_dir(out, "toy_gaussian", {"held": True})
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    release_run_dir(out)
    assert not (out / LOCK).exists()


def test_the_same_process_may_take_its_lock_again(tmp_path):
    out = prepare_run_dir(tmp_path / "run", "gaussian", BASE)
    assert lock_run_dir(out) is False  # held already
    assert prepare_run_dir(out, "gaussian", BASE) == out
    release_run_dir(out)
    release_run_dir(out)  # a no-op once released
    assert lock_run_dir(out) is True
    release_run_dir(out)


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (NFS without a lock daemon): the lock file itself is the lock."""
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_flock_a_dead_holder_of_this_host_is_stale(tmp_path, no_flock):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    assert lock_run_dir(out) is True
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    assert lock_run_dir(out) is False
    release_run_dir(out)
    assert not (out / LOCK).exists()


@pytest.mark.parametrize("host", ["this", "elsewhere"])
def test_without_flock_a_live_or_foreign_holder_is_refused(tmp_path, no_flock, host):
    out = tmp_path / "run"
    out.mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname() if host == "this" else "elsewhere", "since": "noon"}
    (out / LOCK).write_text(json.dumps(holder))
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(out, "gaussian", BASE)
    message = str(err.value)
    assert "\n" not in message
    assert f"in use by another run (pid {holder['pid']} on {holder['host']}, since noon)" in message
    assert ("delete" in message) is (host == "elsewhere")  # only a holder on another host cannot be checked
    assert json.loads((out / LOCK).read_text()) == holder and not (out / CONFIG).exists()


# ---- extending a run -----------------------------------------------------------------------------------


def run_toy(capsys, out: Path, generations: int) -> tuple[toy_gaussian.LoopResult | int, str, str]:
    """The toy recipe, replace, on tiny settings, in this process: (its result or exit status, stdout, stderr)."""
    argv = ["--workflow", "replace", "--generations", str(generations), "--out_dir", str(out), *TINY]
    try:
        result = run(toy_gaussian.main, toy_gaussian.ToyGaussianConfig, argv)
    except SystemExit as exc:
        result = exc.code
    captured = capsys.readouterr()
    return result, captured.out, captured.err


def test_a_larger_generations_continues_a_finished_run(tmp_path, capsys):
    out = tmp_path / "run"
    first, _, _ = run_toy(capsys, out, 2)
    assert first.committed == [0, 1]
    manifest = (out / "gen_000" / "manifest.json").read_bytes()

    more, said, _ = run_toy(capsys, out, 3)
    assert more.committed == more.fitted == [2]
    finished = [line for line in said.splitlines() if "finished earlier" in line]
    assert len(finished) == 2 and "gen 0/2" in finished[0] and "gen 1/2" in finished[1]
    assert (out / "gen_000" / "manifest.json").read_bytes() == manifest  # generation 0 was not made again
    assert yaml.safe_load((out / CONFIG).read_text())["generations"] == 3
    assert sorted(more.metrics) == [0, 1, 2]
    assert {line.split(",")[2] for line in (out / METRICS).read_text().splitlines()[1:]} == {"0", "1", "2"}
    assert all(is_run_file(p.name) for p in out.iterdir())  # RUN_FILES names all the loop writes

    code, _, err = run_toy(capsys, out, 2)  # fewer than are finished: refused, nothing lost
    assert code == 2 and err.count("\n") == 1
    assert "3 finished generations (the last gen_002), more than --generations 2" in err and "cut short" in err
    assert yaml.safe_load((out / CONFIG).read_text())["generations"] == 3 and (out / "gen_002").is_dir()


def test_fewer_generations_are_accepted_while_none_past_them_is_finished(tmp_path):
    out = prepare_run_dir(tmp_path / "run", "toy", BASE, extendable=True)
    (out / ".gen_000.partial").mkdir()
    prepare_run_dir(out, "toy", {**BASE, "generations": 1}, extendable=True)
    assert yaml.safe_load((out / CONFIG).read_text())["generations"] == 1
    with pytest.raises(RunDirError, match=r"different config \(lr: 0.001 -> 0.1\)"):
        prepare_run_dir(out, "toy", {**BASE, "generations": 5, "lr": 0.1}, extendable=True)


def test_a_one_generation_run_cannot_be_extended(tmp_path, capsys):
    out = tmp_path / "run"
    run_toy(capsys, out, 1)
    code, _, err = run_toy(capsys, out, 2)
    assert code == 2 and err.count("\n") == 1 and "drew no synthetic set" in err
    assert yaml.safe_load((out / CONFIG).read_text())["generations"] == 1


def test_an_analytic_run_is_not_extended_and_names_all_it_writes(tmp_path, capsys):
    out = tmp_path / "g"

    def grid(generations: int, **kw):
        cfg = gaussian.GaussianConfig(
            out_dir=str(out), dim=2, n_samples=8, generations=generations, num_seeds=3, log_every=1000, workers=1, **kw
        )
        return gaussian.main(cfg)

    grid(3, wandb=WandbConfig(mode="offline"), report=True)
    assert {"cells", "report", "wandb", METRICS, CONFIG} <= {p.name for p in out.iterdir()}
    assert all(is_run_file(p.name) for p in out.iterdir())
    with pytest.raises(RunDirError) as err:
        grid(4, wandb=WandbConfig(mode="disabled"), report=False)
    assert "different config (generations: 3 -> 4), and this recipe's runs are never extended" in str(err.value)
    capsys.readouterr()


def test_torn_temporary_files_of_a_killed_run_are_removed_on_start(tmp_path):
    from collapse.rundir import prepare_run_dir, release_run_dir

    out, config = tmp_path / "run", {"recipe": "toy_gaussian", "seed": 0}
    prepare_run_dir(out, "toy_gaussian", config)
    release_run_dir(out)  # as if the run had been killed: then it left these half-written files
    (out / "cells").mkdir()
    torn = [out / ".metrics.csv.tmp-4242", out / "cells" / ".a.csv.tmp-4242"]
    for path in torn:
        path.write_text("half")
    (out / "notes.tmp-1").write_text("the user's")  # not a temporary name of ours: kept
    prepare_run_dir(out, "toy_gaussian", config)
    release_run_dir(out)
    assert not any(p.exists() for p in torn)
    assert (out / "notes.tmp-1").read_text() == "the user's"


def test_options_added_after_a_run_was_made_do_not_stop_its_resume(tmp_path):
    old = {**BASE, "trainer": {"max_epochs": 3, "precision": "32-true"}}
    out = prepare_run_dir(tmp_path / "run", "toy", old)
    release_run_dir(out)
    defaults = {"trainer": {"max_epochs": 1, "accumulate_grad_batches": 1}}
    newer = {**BASE, "trainer": {"max_epochs": 3, "precision": "32-true", "accumulate_grad_batches": 1}}
    prepare_run_dir(out, "toy", newer, defaults=defaults)  # the new key holds its default: resumes
    release_run_dir(out)
    assert yaml.safe_load((out / CONFIG).read_text())["trainer"]["accumulate_grad_batches"] == 1
    changed = {**BASE, "trainer": {"max_epochs": 4, "precision": "32-true", "accumulate_grad_batches": 1}}
    with pytest.raises(RunDirError, match=r"different config \(trainer\.max_epochs: 3 -> 4\)"):
        prepare_run_dir(out, "toy", changed, defaults=defaults)
    fresh = prepare_run_dir(tmp_path / "other", "toy", old)
    release_run_dir(fresh)
    away = {**BASE, "trainer": {"max_epochs": 3, "precision": "32-true", "accumulate_grad_batches": 4}}
    with pytest.raises(RunDirError, match=r"trainer\.accumulate_grad_batches: None -> 4"):
        prepare_run_dir(fresh, "toy", away, defaults=defaults)  # a new option set away from its default


def test_a_run_that_recorded_auto_devices_resumes_with_their_resolved_number(tmp_path):
    """Earlier versions recorded ``--trainer.devices auto``; it is now recorded as a number, and the old run goes on."""
    old = {**BASE, "trainer": {"max_epochs": 3, "devices": "auto"}}
    out = prepare_run_dir(tmp_path / "run", "toy", old)
    release_run_dir(out)
    prepare_run_dir(out, "toy", {**BASE, "trainer": {"max_epochs": 3, "devices": 1}})
    release_run_dir(out)
    two = prepare_run_dir(tmp_path / "two", "toy", {**BASE, "trainer": {"max_epochs": 3, "devices": 2}})
    release_run_dir(two)
    with pytest.raises(RunDirError, match=r"trainer\.devices: 2 -> 1"):  # a recorded number is kept to
        prepare_run_dir(two, "toy", {**BASE, "trainer": {"max_epochs": 3, "devices": 1}})
