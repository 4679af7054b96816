"""No process outlives its run, and Ctrl-C says how to resume.

A recipe killed with SIGKILL cannot stop its worker processes itself: they must end on their own
(parent-death signal). A Ctrl-C, in any phase, must end the run with one line on how to resume and
exit status 130, and leave no worker behind; a SIGTERM during a fit, with such a line and status 143.
Processes are read from /proc, so these tests need Linux.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESUME = "interrupted: finished work is kept; run the same command again to resume"
TERMINATED = "terminated: finished work is kept; run the same command again to resume"

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")

# An analytic grid of 8 cells of about a second each on two workers: still running when the test strikes.
GAUSSIAN = ["recipes/gaussian.py", "--workflow", "[replace, accumulate]", "--dim", "[2, 6]", "--n_samples", "[10, 100]",
            "--generations", "30", "--num_seeds", "1000", "--workers", "2", "--log_every", "1",
            "--wandb.mode", "disabled", "--report", "false"]  # fmt: skip
# A Lightning fit of 200 short epochs (32 batches each), one checkpoint per epoch: far from done when interrupted.
TOY = ["recipes/toy_gaussian.py", "--generations", "3", "--data.num_train", "1024", "--trainer.max_epochs", "200",
       "--batch_size", "32", "--wandb.mode", "disabled"]  # fmt: skip


# ---- processes, from /proc ----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: {pid: start time} (the start time tells a reused pid apart)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
            starts[int(entry.name)] = stat[2]
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = starts[child]
                todo.append(child)
    return found


def alive(pid: int, start: int) -> bool:
    """Whether that process still runs: a zombie has ended, only its exit status waits to be read."""
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[0] not in ("Z", "X")


def still_alive(procs: dict[int, int], within: float = 10.0) -> list[int]:
    """The processes of ``procs`` that are still alive after ``within`` seconds (as soon as none is: [])."""
    deadline = time.monotonic() + within
    while True:
        left = [pid for pid, start in procs.items() if alive(pid, start)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _default_sigint() -> None:
    # A shell runs background jobs with SIGINT ignored, and children inherit that; a recipe must see the Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    """Start a command (``python <args>`` from the repository root, output to files).

    ``start.family(proc)`` lists the process's descendants and keeps them: whatever of them a failed
    test leaves alive is killed at the end, so that a failure leaks nothing either.
    """
    started: list[tuple[subprocess.Popen, dict[int, int]]] = []

    def _start(args: list[str], name: str, new_session: bool = False) -> subprocess.Popen:
        out = open(tmp_path / f"{name}.out", "w")
        err = open(tmp_path / f"{name}.err", "w")
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            preexec_fn=_default_sigint, start_new_session=new_session,
        )  # fmt: skip
        out.close()
        err.close()
        proc.out_path, proc.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"  # type: ignore[attr-defined]
        started.append((proc, {}))
        return proc

    def family(proc: subprocess.Popen) -> dict[int, int]:
        found = descendants(proc.pid)
        next(known for p, known in started if p is proc).update(found)
        return found

    _start.family = family  # type: ignore[attr-defined]
    yield _start
    for proc, known in started:
        if proc.poll() is None:
            known.update(descendants(proc.pid))
            proc.kill()
        proc.wait()
        for pid, begun in known.items():
            if alive(pid, begun):
                with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile
                    os.kill(pid, signal.SIGKILL)


def wait_for(condition, what: str, proc: subprocess.Popen, within: float = 90.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert proc.poll() is None, f"ended (exit {proc.returncode}) before {what}: {proc.err_path.read_text()}"
        assert time.monotonic() < deadline, f"no {what} within {within:.0f}s"
        time.sleep(0.02)


def workers_running(proc: subprocess.Popen, count: int):
    """A condition: ``count`` worker processes of ``proc`` have begun computing cells."""

    def check() -> bool:
        workers = [p for p in descendants(proc.pid) if b"spawn_main" in _cmdline(p)]
        return len(workers) >= count and proc.out_path.read_text().count(" gen ") >= count

    return check


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# ---- the parent-death signal itself -------------------------------------------------------------------

# A middle process starts a sleeping child that asked to die with it (or watches it), prints its pid, and sleeps.
MIDDLE = textwrap.dedent(
    """
    import subprocess, sys
    child = sys.argv[1]
    code = {
        "signal": "import os, time; from collapse.cli import die_with_parent; die_with_parent(os.getppid())",
        "watch": "import os, time; from collapse.cli import watch_parent; watch_parent(os.getppid(), 0.05)",
        "hook": "import time",
    }[child] + "; print('ready', flush=True); time.sleep(60)"
    hook = None
    if child == "hook":
        from collapse.cli import die_with_parent_hook
        hook = die_with_parent_hook()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, preexec_fn=hook)
    assert proc.stdout.readline() == "ready\\n"
    print(proc.pid, flush=True)
    proc.wait()
    """
)


@pytest.mark.parametrize("how", ["signal", "watch", "hook"])
def test_a_child_dies_with_its_parent_killed_by_sigkill(how):
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, how], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    begun: dict[int, int] = {}
    try:
        child = int(middle.stdout.readline())
        begun = descendants(middle.pid)
        assert child in begun
        middle.kill()
        middle.wait()
        assert still_alive(begun, within=5) == []
    finally:
        middle.kill()
        middle.wait()
        middle.stdout.close()
        for pid, begun_at in begun.items():
            if alive(pid, begun_at):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# ---- analytic recipes -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_of_an_analytic_recipe_leaves_no_process_behind(tmp_path, start):
    proc = start([*GAUSSIAN, "--out_dir", str(tmp_path / "run")], "gaussian")
    wait_for(workers_running(proc, 2), "two workers computing cells", proc)
    begun = start.family(proc)  # the workers and multiprocessing's resource tracker
    assert len(begun) >= 3, begun
    proc.kill()
    proc.wait()
    assert still_alive(begun) == [], "processes of a run killed with SIGKILL are still alive"


@pytest.mark.slow
def test_ctrl_c_of_an_analytic_recipe_stops_its_workers_exits_130_and_resumes(tmp_path, start):
    out = tmp_path / "run"
    # Its own session and a signal to the whole group, as a terminal's Ctrl-C: the workers get it too.
    proc = start([*GAUSSIAN, "--out_dir", str(out)], "gaussian", new_session=True)
    wait_for(workers_running(proc, 2), "two workers computing cells", proc)
    # Three cell files from two workers: one worker has gone on from a cell it wrote completely (files and all).
    wait_for(lambda: len(list((out / "cells").glob("*.csv"))) >= 3, "finished cells", proc)
    begun = start.family(proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    err = proc.err_path.read_text()
    assert err.count(RESUME) == 1 and "Traceback" not in err, err
    assert still_alive(begun) == [], "worker processes outlived a Ctrl-C"
    assert not (out / "metrics.csv").exists()

    again = start([*GAUSSIAN, "--out_dir", str(out)], "again")
    assert again.wait(timeout=120) == 0, again.err_path.read_text()
    assert "finished earlier, kept" in again.out_path.read_text()
    assert (out / "metrics.csv").is_file()


# ---- Lightning recipes ----------------------------------------------------------------------------------


def _checkpoint_epoch(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "status", "line"), [(signal.SIGINT, 130, RESUME), (signal.SIGTERM, 143, TERMINATED)])
def test_ctrl_c_or_sigterm_during_a_lightning_fit_exits_once_and_the_same_command_resumes(
    tmp_path, start, stop, status, line
):
    # SIGTERM: Lightning's own handling would have ended the run with status 0, as if it had finished.
    out = tmp_path / "toy"
    ckpt = out / ".gen_000.partial" / "checkpoints" / "last.ckpt"
    proc = start([*TOY, "--out_dir", str(out)], "toy")
    wait_for(ckpt.is_file, "a checkpoint of the fit", proc)
    first = ckpt.stat().st_mtime_ns
    # A second epoch done: a fresh start could not have got past the epoch the run stopped in.
    wait_for(lambda: ckpt.stat().st_mtime_ns != first, "a second checkpoint", proc)
    proc.send_signal(stop)
    assert proc.wait(timeout=60) == status, proc.err_path.read_text()
    err = proc.err_path.read_text()
    assert err.count(line) == 1 and "Traceback" not in err, err
    stopped = _checkpoint_epoch(ckpt)
    assert stopped >= 1 and not (out / "gen_000").exists()

    again = start([*TOY, "--out_dir", str(out)], "again")
    before = ckpt.stat().st_mtime_ns
    wait_for(lambda: ckpt.stat().st_mtime_ns != before, "a checkpoint of the resumed fit", again)
    again.send_signal(stop)
    assert again.wait(timeout=60) == status, again.err_path.read_text()
    assert again.err_path.read_text().count(line) == 1
    # The resumed fit went on from the checkpoint: its first new epoch follows the one the first run stopped after.
    assert stopped < _checkpoint_epoch(ckpt) <= stopped + 2


def _tiny_module():
    """A one-layer LightningModule that trains on batches of 2-vectors."""
    import lightning.pytorch as pl
    import torch

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def test_the_loop_s_trainers_neither_handle_sigterm_nor_broadcast_its_flag_every_step(tmp_path, monkeypatch):
    import lightning.pytorch as pl
    import torch

    from engine.loop import _without_lightning_s_sigterm

    def fit(loop_s: bool) -> list[str]:
        calls: list[str] = []
        trainer = pl.Trainer(
            max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path),
        )  # fmt: skip
        if loop_s:
            _without_lightning_s_sigterm(trainer)
        handler = signal.getsignal(signal.SIGTERM)
        # As in a fit of two processes: Lightning broadcasts its SIGTERM flag before each of the 3 batches.
        with monkeypatch.context() as m:
            m.setattr(torch.distributed, "is_initialized", lambda: True)
            m.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)  # asked by the data loader
            m.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
            m.setattr(pl.Trainer, "world_size", property(lambda self: 2))
            m.setattr(torch.distributed, "broadcast", lambda *a, **k: calls.append("broadcast"))

            class Watch(pl.Callback):
                def on_train_batch_start(self, *args):
                    calls.append("own handler" if signal.getsignal(signal.SIGTERM) is not handler else "")

            trainer.callbacks.append(Watch())
            data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(6, 2)), batch_size=2)
            trainer.fit(_tiny_module(), train_dataloaders=data)
        return [c for c in calls if c]

    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    per_step = hasattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor")  # Lightning from 2.5.2; not 2.4
    assert fit(loop_s=False).count("broadcast") == (3 if per_step else 0)  # what the override is for
    assert fit(loop_s=False).count("own handler") == 3
    assert fit(loop_s=True) == []


def test_sigterm_to_the_loader_workers_and_the_run_alike_is_a_termination_not_a_loader_error(tmp_path):
    """A scheduler's time limit signals the whole process group: the data-loader workers die of it (torch's handler
    in a worker ends quietly only for a signal from its parent) and their loader raises about it while the run
    stops; the run still ends as terminated."""
    import lightning.pytorch as pl
    from loop_script import TinyModality, tiny_config

    from collapse.errors import Terminated
    from engine.loop import run_generations

    before = set(descendants(os.getpid()))  # this test process's own helpers (a W&B service of an earlier test)

    class GroupSigterm(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            workers = sorted(set(descendants(os.getpid())) - before)  # the fit's loader workers
            assert workers, "no loader worker running"
            subprocess.run(["kill", "-TERM", *map(str, workers), str(os.getpid())], check=True)
            time.sleep(5)  # the signal is handled at once; this is not reached

        def on_exception(self, trainer, pl_module, exception):
            until = time.monotonic() + 1.0  # clean-up work while the run stops, as long as the workers take to die
            while time.monotonic() < until:
                pass

    with pytest.raises(Terminated):
        run_generations(
            TinyModality(), tiny_config(tmp_path / "run", "replace", num_workers=1), recipe="toy",
            callbacks=[GroupSigterm()],
        )  # fmt: skip
    assert not [t.name for t in threading.enumerate() if t.name.startswith("progress:")]  # no heartbeat left


@pytest.mark.slow
def test_sigterm_to_rank_0_of_two_processes_stops_both_with_143_and_no_hang(tmp_path, start):
    out = tmp_path / "toy"
    ckpt = out / ".gen_000.partial" / "checkpoints" / "last.ckpt"
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = start([*TOY, *ddp, "--out_dir", str(out)], "ddp")
    wait_for(ckpt.is_file, "a checkpoint of the fit", proc)
    first = ckpt.stat().st_mtime_ns
    wait_for(lambda: ckpt.stat().st_mtime_ns != first, "a second checkpoint", proc)
    family = start.family(proc)
    assert len(family) >= 1  # rank 1, started by rank 0
    # Rank 0 alone (kill <pid>): Lightning's handler broadcast from inside it and hung both ranks in their collectives.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.err_path.read_text()
    err = proc.err_path.read_text()
    assert err.count(TERMINATED) == 1, err
    assert still_alive(family) == []


# The toy recipe whose rank 0 takes 10 s to clean up after a stop (as a W&B upload may): longer than Lightning's
# observer of the other ranks waits (5 s) before it SIGKILLs rank 0 once one of them has exited non-zero.
SLOW_CLEAN_UP = """
import sys, time
sys.path[:0] = [{root!r}, {recipes!r}]
import engine.loop
from collapse.cli import run, secondary_process
release = engine.loop.release_run_dir
def slow_release(out):
    if not secondary_process():
        time.sleep(10)
    release(out)
engine.loop.release_run_dir = slow_release
from toy_gaussian import ToyGaussianConfig, main
run(main, ToyGaussianConfig)
"""
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


@pytest.mark.slow
@pytest.mark.parametrize("to", ["process group", "rank 0"])
def test_ctrl_c_of_two_processes_ends_both_with_130_after_rank_0_s_whole_clean_up(tmp_path, start, to):
    # To the group (a terminal): rank 1 stopped at once and Lightning's observer SIGKILLed rank 0 mid-clean-up (137).
    # To rank 0 alone: rank 1 was left in a collective and failed on the lost connection with a traceback.
    script = tmp_path / "slow_toy.py"
    script.write_text(SLOW_CLEAN_UP.format(root=str(ROOT), recipes=str(ROOT / "recipes")))
    out = tmp_path / "toy"
    args = [str(script), *TOY[1:], *DDP, "--generations", "20", "--trainer.max_epochs", "2", "--out_dir", str(out)]
    proc = start(args, "ddp", new_session=True)
    wait_for((out / "gen_000").is_dir, "a finished generation", proc)
    family = start.family(proc)
    assert len(family) >= 1  # rank 1, started by rank 0
    if to == "rank 0":
        proc.send_signal(signal.SIGINT)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=90) == 130, proc.err_path.read_text()
    err = proc.err_path.read_text()
    assert err.count(RESUME) == 1 and "Traceback" not in err and "Forcefully terminating" not in err, err
    assert still_alive(family) == []
    from collapse.store import GenerationStore

    assert GenerationStore(out).verify(0)  # the finished generation is kept whole


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "to", "status", "line"),
    [(signal.SIGINT, "process group", 130, RESUME), (signal.SIGTERM, "process group", 143, TERMINATED),
     (signal.SIGTERM, "rank 0", 143, TERMINATED)],
)  # fmt: skip
def test_a_stop_while_two_processes_start_ends_both_quietly(tmp_path, start, stop, to, status, line):
    # Rank 1 just started (importing, then making the process group with rank 0, which waits for it inside torch).
    # Before: a Ctrl-C gave rank 1 a KeyboardInterrupt traceback and a SIGTERM ended it silently, and rank 0, still
    # waiting, was SIGKILLed by Lightning's observer (-9, no resume line); a SIGTERM to rank 0 alone did not reach
    # rank 1, which failed on the lost rank 0 with a traceback (and a C++ stack trace).
    proc = start([*TOY, *DDP, "--out_dir", str(tmp_path / "toy")], "ddp", new_session=True)
    wait_for(lambda: start.family(proc), "rank 1", proc)
    family = start.family(proc)
    if to == "rank 0":
        proc.send_signal(stop)
    else:
        os.killpg(proc.pid, stop)
    assert proc.wait(timeout=90) == status, proc.err_path.read_text()
    err = proc.err_path.read_text()
    assert err.count(line) == 1, err
    assert "Traceback" not in err and "Exception raised from" not in err and "Forcefully" not in err, err
    assert still_alive(family) == []


@pytest.mark.slow
def test_a_second_ctrl_c_ends_a_start_whose_rank_1_never_joins(tmp_path, start, monkeypatch):
    # Rank 1 hangs before it joins (here: in its interpreter's start-up), so rank 0 waits inside torch to make the
    # group. Before: the held Ctrl-C waited there until torch's time-out (30 minutes), and so did a second one.
    hook = tmp_path / "hook"
    hook.mkdir()
    hang = "import os, time\nif os.environ.get('LOCAL_RANK') == '1':\n    time.sleep(600)\n"
    (hook / "sitecustomize.py").write_text(hang)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), str(ROOT)]))
    proc = start([*TOY, *DDP, "--out_dir", str(tmp_path / "toy")], "ddp", new_session=True)
    wait_for(lambda: start.family(proc), "rank 1", proc)
    family = start.family(proc)
    time.sleep(1.0)  # rank 0 on its way into the group
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # the first Ctrl-C is held: a rank that is only slow still joins
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 130, proc.err_path.read_text()
    err = proc.err_path.read_text()
    assert "a second stop (SIGINT) while the run's processes started: ended every rank" in err, err
    assert "Traceback" not in err, err
    assert still_alive(family) == []


def test_lightning_s_exits_on_ctrl_c_and_sigterm_reach_the_loop_as_interrupt_and_termination(tmp_path):
    import lightning.pytorch as pl
    import torch

    from collapse.errors import Terminated
    from engine.loop import _interrupt_passes_through

    class Stop(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            raise KeyboardInterrupt

    class Term(pl.Callback):  # what Lightning's SIGTERM handler does: the flag, read at the batch's end
        def on_train_batch_end(self, trainer, *args):
            trainer._signal_connector.received_sigterm = True

    def trainer(stop: pl.Callback) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=1, callbacks=[stop], logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path),
        )  # fmt: skip

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
    handler = signal.getsignal(signal.SIGINT)
    stopped = trainer(Stop())
    with pytest.raises(KeyboardInterrupt):
        with _interrupt_passes_through():
            stopped.fit(_tiny_module(), train_dataloaders=data)
    assert stopped.interrupted
    assert signal.getsignal(signal.SIGINT) is handler  # Lightning ignored further Ctrl-Cs; not any more
    # Lightning's SIGTERMException is a SystemExit without a status (exit 0, as if the run had finished).
    terminated = trainer(Term())
    with pytest.raises(Terminated):
        with _interrupt_passes_through():
            terminated.fit(_tiny_module(), train_dataloaders=data)
    assert terminated.interrupted and terminated.global_step == 1
    with pytest.raises(SystemExit):  # any other exit is left alone
        with _interrupt_passes_through():
            sys.exit(3)


# ---- the grid launcher ----------------------------------------------------------------------------------

CELL = textwrap.dedent(
    """
    import os, sys, time
    dest = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--dest="))
    x = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--x="))
    with open(os.path.join(dest, x + ".pid"), "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(60)
    """
)


@pytest.mark.slow
def test_sigkill_of_the_grid_launcher_ends_its_cells(tmp_path, start):
    program = tmp_path / "cell.py"
    program.write_text(CELL)
    seen = tmp_path / "seen"
    seen.mkdir()
    sweep = {
        "program": str(program),
        "method": "grid",
        "metric": {"name": "generation", "goal": "maximize"},
        "parameters": {"x": {"values": [0, 1]}, "dest": {"value": str(seen)}},
        "command": ["${env}", "python", "${program}", "${args}"],
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    proc = start(["-m", "tooling.grid", str(tmp_path / "sweep.yaml"), "--jobs", "2", "--out_root",
                  str(tmp_path / "out")], "grid")  # fmt: skip
    wait_for(lambda: len(list(seen.glob("*.pid"))) == 2, "two running cells", proc)
    begun = start.family(proc)
    cells = {int(p.read_text()) for p in seen.glob("*.pid")}
    assert cells <= set(begun)
    proc.kill()
    proc.wait()
    assert still_alive(begun) == [], "cells outlived a grid launcher killed with SIGKILL"


# The toy recipe on a disk that is full for generation 1's mid-fit checkpoint, which rank 0 alone writes while the
# other ranks wait for it at a barrier (collapse.atomic opens every file the loop writes).
FULL_DISK = """
import builtins, errno, os, sys
sys.path[:0] = [{root!r}, {recipes!r}]
import collapse.atomic

def full_open(path, mode="r", *args, **kwargs):
    if os.environ.get("DISK_FULL") and ".gen_001.partial/checkpoints" in str(path) and "w" in mode:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return builtins.open(path, mode, *args, **kwargs)

collapse.atomic.open = full_open
from collapse.cli import run
from toy_gaussian import ToyGaussianConfig, main
run(main, ToyGaussianConfig)
"""


@pytest.mark.slow
def test_a_full_disk_on_rank_0_ends_both_processes_with_its_one_line_and_the_same_command_resumes(tmp_path):
    # Rank 1 waited at the checkpoint's barrier, learnt of rank 0's end as a lost connection and printed that as a
    # traceback (often seen through a pipe, as here, which it writes to after rank 0 has gone).
    script = tmp_path / "full_disk_toy.py"
    script.write_text(FULL_DISK.format(root=str(ROOT), recipes=str(ROOT / "recipes")))
    out = tmp_path / "toy"
    args = [sys.executable, str(script), *TOY[1:], *DDP, "--trainer.max_epochs", "2", "--out_dir", str(out)]
    env = {**os.environ, "DISK_FULL": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        said, err = proc.communicate(timeout=120)  # until every process writing to the pipes has ended
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("error: no space left on the device (writing "), err
    assert ".gen_001.partial/checkpoints/last.ckpt" in err and "run the same command again to resume" in err
    assert "gen 0/2" in said and "gen 1/2" not in said
    from collapse.store import GenerationStore

    assert GenerationStore(out).verify(0)
    again = subprocess.run(args, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert "finished earlier" in again.stdout and "gen 2/2" in again.stdout
