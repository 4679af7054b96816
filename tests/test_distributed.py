"""The loop's collectives (collapse.distributed) in two real CPU processes: an error on any rank stops every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

import collapse.distributed as distributed
from callbacks.synthetic_data import SAMPLING_FILE, SyntheticDataCallback
from collapse.distributed import WAIT_TIMEOUT, Dist
from collapse.errors import UserError
from collapse.store import GenerationStore


class FailingOnRank1:
    """A sampling model whose draws fail on rank 1 (as an out-of-memory error on one GPU would)."""

    def sample(self, n, generator):
        if torch_dist.get_rank() == 1:
            raise MemoryError("no room for the KV cache on rank 1")
        return {"x": np.zeros((n, 2), dtype=np.float32)}


class Drawing:
    def sample(self, n, generator):
        return {"x": torch.rand(n, 2, generator=generator).numpy()}


def outcome(fn) -> list[str]:
    try:
        return ["ok", repr(fn())]
    except BaseException as exc:  # noqa: BLE001 - recorded for the parent
        return [type(exc).__name__, str(exc)]


def worker(rank: int, folder: str) -> None:
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    dist = Dist()
    got = {
        "group": [torch_dist.get_backend(dist.group), dist.group is Dist().group],
        "on_zero": outcome(lambda: dist.on_zero(lambda: 7 * (rank + 1))),
        "all_ok": outcome(lambda: dist.all_ok(lambda: rank if rank == 0 else 1 / 0)),
        "all_ok_user": outcome(lambda: dist.all_ok(lambda: (_ for _ in ()).throw(UserError("bad flag")))),
        "both_ok": outcome(lambda: dist.all_ok(lambda: rank + 10)),
    }
    store = GenerationStore(Path(folder) / "run")
    failing = SyntheticDataCallback(store, 0, num_samples=8, batch_size=2, seed=0)
    got["draw_fails_on_1"] = outcome(lambda: failing.sample_into_store(FailingOnRank1(), rank, 2, dist.barrier))
    drawing = SyntheticDataCallback(store, 1, num_samples=8, batch_size=2, seed=0)
    got["draw"] = outcome(lambda: drawing.sample_into_store(Drawing(), rank, 2, dist.barrier))
    got["recorded"] = store.staged(1, SAMPLING_FILE) is not None
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(got))
    torch_dist.destroy_process_group()


def test_an_error_on_any_rank_stops_every_rank_with_its_message(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(rank, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not alive, "a rank hung"
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # The loop's collectives run on a gloo group of their own (long timeout), made once.
    assert zero["group"] == one["group"] == ["gloo", True]
    assert zero["on_zero"] == one["on_zero"] == ["ok", "7"]  # rank 0's result on both
    # Rank 1 failed: it raises its own error, rank 0 the same one by name instead of waiting for rank 1.
    assert one["all_ok"] == ["ZeroDivisionError", "division by zero"]
    assert zero["all_ok"] == ["RuntimeError", "rank 1 failed: ZeroDivisionError: division by zero"]
    assert zero["all_ok_user"] == one["all_ok_user"] == ["UserError", "bad flag"]  # a user error stays one
    assert zero["both_ok"] == ["ok", "10"] and one["both_ok"] == ["ok", "11"]
    # A draw that fails on rank 1 stops rank 0 too (it used to wait at the barrier), and nothing is recorded.
    assert one["draw_fails_on_1"][0] == "MemoryError"
    assert zero["draw_fails_on_1"] == ["RuntimeError", "rank 1 failed: MemoryError: no room for the KV cache on rank 1"]
    assert zero["draw"] == one["draw"] == ["ok", "['x']"] and zero["recorded"] and one["recorded"]


def test_the_wait_timeout_outlasts_rank_0_alone_preparing_a_corpus():
    assert WAIT_TIMEOUT >= timedelta(hours=12)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_2"])
def test_sharded_strategies_are_refused_for_several_processes(monkeypatch, strategy):
    monkeypatch.setattr(distributed, "wants_processes", lambda kwargs: 2)
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    with pytest.raises(UserError, match=f"--trainer.strategy {strategy} shards the model across processes"):
        distributed.launch({"strategy": strategy, "devices": 2})


def test_a_strategy_object_s_timeout_and_backend_reach_the_launch():
    from lightning.fabric.strategies import DDPStrategy as FabricDDP
    from lightning.pytorch.strategies import DDPStrategy

    assert distributed.launch_strategy("ddp") == "ddp"
    made = distributed.launch_strategy(DDPStrategy(timeout=timedelta(hours=3), process_group_backend="gloo"))
    assert isinstance(made, FabricDDP)
    assert made._timeout == timedelta(hours=3) and made._process_group_backend == "gloo"
    default = distributed.launch_strategy(DDPStrategy())
    assert default._timeout == DDPStrategy()._timeout and default._process_group_backend is None


@pytest.mark.slow
def test_two_launched_processes_make_their_group_with_the_strategy_s_timeout(tmp_path):
    """launch() starts the second process and the default group with the strategy object's timeout (the
    Trainer's strategy finds the group made and would never apply its own)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"launched{r}.json").read_text()) for r in range(2)]
    assert ranks == [{"world": 2, "rank": r, "timeout_s": 4321.0, "backend": "gloo"} for r in range(2)]


def _launched(folder: Path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    strategy = DDPStrategy(timeout=timedelta(seconds=4321), process_group_backend="gloo")
    dist = distributed.launch({"accelerator": "cpu", "devices": 2, "strategy": strategy})
    world = torch_dist.group.WORLD
    timeout = world._get_backend(torch.device("cpu")).options._timeout
    got = {"world": dist.world_size, "rank": dist.rank, "timeout_s": timeout.total_seconds()}
    got["backend"] = torch_dist.get_backend(world)
    (folder / f"launched{dist.rank}.json").write_text(json.dumps(got))
    dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":  # the run of test_two_launched_processes_make_their_group_with_the_strategy_s_timeout
    _launched(Path(sys.argv[1]))


def test_a_forwarded_signal_reaches_the_started_ranks_and_ends_lightning_s_watch_of_them(monkeypatch):
    """SIGTERM to the process that started the other ranks reaches them too; then Lightning's observer thread, which
    SIGKILLs that process within seconds of a child exiting non-zero (as they do, stopped), must stop watching."""
    import signal
    import subprocess
    import sys

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    started = list(children)
    try:
        monkeypatch.setattr(distributed, "_CHILDREN", children)  # the launcher's own list, as launch() keeps it
        killed: list[int] = []
        observer = _ChildProcessObserver(main_pid=-1, child_processes=children)
        monkeypatch.setattr(observer, "_terminate_all", lambda: killed.append(1))
        distributed.forward_signal(signal.SIGTERM)
        assert [child.wait(timeout=10) for child in started] == [-signal.SIGTERM] * 2
        assert children == [] and observer._run() and killed == []  # nothing left to watch: this process spared
    finally:
        for child in started:
            child.kill()
            child.wait()


@pytest.fixture
def python_s_ctrl_c():
    """Python's own Ctrl-C handler for the test, whatever the test process started with (a background job of a
    shell without job control starts with Ctrl-C ignored, as CI may run the suite), and the handler it found
    afterwards."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_stop_while_the_group_forms_is_held_only_where_this_process_starts_the_others(python_s_ctrl_c):
    """Rank 0 starting the other ranks on its node holds a Ctrl-C until the group is made, then delivers it; the
    ranks it starts inherit the hold and release it at the same point. A rank of several nodes, or of torchrun or
    SLURM, holds nothing: its group may wait for a missing process until torch's time-out, and Ctrl-C must end it."""
    import signal
    import threading

    stops = {signal.SIGINT, signal.SIGTERM}
    main = threading.main_thread().ident  # a signal to this thread alone: no other thread takes it
    handlers = [signal.getsignal(signum) for signum in stops]
    went_on = []
    with pytest.raises(KeyboardInterrupt):
        with distributed._stops_held(starts_others=False):
            signal.pthread_kill(main, signal.SIGINT)
            went_on.append(True)
    assert went_on == []  # stopped at once
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            with distributed._stops_held(starts_others=True):
                signal.pthread_kill(main, signal.SIGINT)  # pending here, not lost
                assert stops <= signal.pthread_sigmask(signal.SIG_BLOCK, [])  # what a started rank inherits
                went_on.append(True)
        assert not stops & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # released
        assert [signal.getsignal(signum) for signum in stops] == handlers  # put back, though a signal came
    assert went_on == [True] * 3
    went_on.clear()
    # A started rank: it came with the signals blocked, so it holds them until its group is made, then releases.
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        with pytest.raises(KeyboardInterrupt):
            with distributed._stops_held(starts_others=False):
                signal.pthread_kill(main, signal.SIGINT)
                went_on.append(True)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    assert went_on == [True] and [signal.getsignal(signum) for signum in stops] == handlers


def test_a_held_stop_gives_the_start_up_at_a_second_signal_or_when_the_group_takes_too_long(
    monkeypatch, python_s_ctrl_c
):
    """A rank that hangs before it joins would keep a held Ctrl-C waiting until torch's time-out (30 minutes): a
    second stop signal, or the patience after the first, ends the start instead. A group made in time delivers the
    held signal as before and gives nothing up."""
    import signal
    import time

    given_up = []
    monkeypatch.setattr(distributed, "_give_up_the_start", lambda signum, why: given_up.append((signum, why)))

    def until(condition, within=10.0):
        deadline = time.monotonic() + within
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)

    monkeypatch.setattr(distributed, "HELD_STOP_PATIENCE", 30.0)
    with pytest.raises(KeyboardInterrupt):
        with distributed._stops_held(starts_others=True):
            os.kill(os.getpid(), signal.SIGINT)  # to the process: the watching thread takes it
            time.sleep(0.3)
    assert given_up == []  # the group formed within the patience: the stop was delivered as held
    monkeypatch.setattr(distributed, "HELD_STOP_PATIENCE", 0.3)
    with pytest.raises(KeyboardInterrupt):
        with distributed._stops_held(starts_others=True):
            os.kill(os.getpid(), signal.SIGINT)
            until(lambda: given_up)
    late = "SIGINT while the run's processes started, and their group had not formed 0.3 s later"
    assert given_up == [(signal.SIGINT, f"{late} (a rank that never joined?)")]
    given_up.clear()
    monkeypatch.setattr(distributed, "HELD_STOP_PATIENCE", 30.0)
    with pytest.raises(KeyboardInterrupt):
        with distributed._stops_held(starts_others=True):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
            until(lambda: given_up)
    assert given_up == [(signal.SIGINT, "a second stop (SIGINT) while the run's processes started")]
    given_up.clear()
    with pytest.raises(KeyboardInterrupt):  # a started rank (not starts_others) has no watch: rank 0 ends it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            with distributed._stops_held(starts_others=False):
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.3)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    assert given_up == []
    assert signal.set_wakeup_fd(-1) == -1  # the watch's wake-up descriptor is put back


def test_an_ignored_ctrl_c_stays_ignored_through_the_hold_and_in_the_ranks_started_in_it():
    """A shell script's background job runs with Ctrl-C ignored; the ranks it starts must ignore it too, not obey
    it through a handler that holds it (they inherit the handler's default) while rank 0 ignores it."""
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with distributed._stops_held(starts_others=True):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # still held
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_second_ctrl_c_on_rank_0_cuts_the_clean_up_of_a_stopped_run_short_and_a_second_sigterm_does_not(
    python_s_ctrl_c,
):
    import signal
    import threading
    import time

    from collapse.errors import Terminated
    from engine.loop import _signals_stop_the_run

    main = threading.main_thread().ident
    cut = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_stop_the_run():
            try:
                signal.pthread_kill(main, signal.SIGINT)
            except KeyboardInterrupt:
                signal.pthread_kill(main, signal.SIGTERM)  # a second stop of the other kind: ignored
                try:
                    signal.pthread_kill(main, signal.SIGINT)
                    time.sleep(1)
                except KeyboardInterrupt:
                    cut.append(True)  # the clean-up was cut short
                raise
    assert cut == [True]
    with pytest.raises(Terminated):
        with _signals_stop_the_run():
            try:
                signal.pthread_kill(main, signal.SIGTERM)
            except Terminated:
                signal.pthread_kill(main, signal.SIGTERM)  # ignored: the clean-up goes on
                cut.append(True)
                raise
    assert cut == [True, True]


@pytest.mark.parametrize("name", ["Terminated", "KeyboardInterrupt"])
def test_a_rank_stopped_on_request_stops_the_others_the_same_way_not_with_an_error(name):
    from collapse.errors import Terminated

    outcome = ("error", (name, "terminated (SIGTERM)", False))  # what _run reports of rank 0's step
    with pytest.raises({"Terminated": Terminated, "KeyboardInterrupt": KeyboardInterrupt}[name]):
        distributed._raise_failure(outcome, 0)
    with pytest.raises(RuntimeError, match="rank 0 failed: ValueError: bad"):
        distributed._raise_failure(("error", ("ValueError", "bad", False)), 0)
