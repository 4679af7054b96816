"""The processes of a multi-device run of the generation loop, and how they agree.

A recipe launched with ``--trainer.devices 2 --trainer.strategy ddp`` (or by ``torchrun`` / SLURM,
which start the processes themselves) runs the whole generation loop in every process. Lightning
would only start the other processes at the first ``trainer.fit``, after the loop has already
looked at the run directory; :func:`launch` starts them (and the process group) up front instead,
so every decision the loop takes (which generation is next, which of its steps are already staged)
is taken by global rank 0 and broadcast, and every later ``Trainer`` finds the processes and the
group already there.

The rules the loop follows with it:

- only rank 0 writes to the run directory (config, store, metrics, W&B), except the chunk files of
  the synthetic set, which each rank writes for the chunks it draws;
- rank 0's steps run inside :meth:`Dist.on_zero`, which broadcasts their result or their error, so
  a failure on rank 0 stops every rank with the same message instead of leaving them waiting; steps that
  every rank runs and the others wait for (drawing its share of a synthetic set) run inside
  :meth:`Dist.all_ok`, which stops every rank when any one fails;
- these collectives go through a gloo group of their own whose timeout is :data:`WAIT_TIMEOUT`, not the
  default group's 30 minutes: rank 0 alone may prepare a corpus or score a synthetic set for longer;
- all processes see the run directory through one shared file system (a laptop, one node, or a
  cluster's shared storage).

Strategies that spawn processes from inside the script (``ddp_spawn``, ``ddp_notebook``) cannot
work this way and are refused; so are sharded ones (FSDP, DeepSpeed) over several processes: after a
fit, each rank samples and rank 0 saves the weights on its own, which needs every rank to hold the whole
model. ``ddp`` (the default for several devices) is the strategy of a multi-device run.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from collapse.errors import Terminated, UserError

T = TypeVar("T")

LAUNCH_KEYS = ("accelerator", "devices", "num_nodes", "strategy")
"""The Trainer settings that decide how many processes a run has."""
WAIT_TIMEOUT = timedelta(hours=24)
"""How long the ranks wait for each other in the loop's collectives (rank 0 preparing the data, scoring a
synthetic set, ...). A rank that fails says so through the collective and a killed one closes its connection,
so the others stop at once either way; the limit is for a rank that hangs."""

HELD_STOP_PATIENCE = 60.0
"""Seconds a Ctrl-C or SIGTERM held while the run's processes make their group (:func:`_stops_held`) waits for
the group; a rank that never joins (hung while it starts) would otherwise keep it waiting until torch's time-out.
Then, or at a second stop signal, the process that started the ranks ends them and itself."""

_WAIT_GROUP: list[Any] = [None, None]  # [the default process group, the gloo group made beside it]


class Dist:
    """Rank, world size and the few collectives the loop needs; trivial in a single process."""

    @property
    def active(self) -> bool:
        """Whether this is one of several processes in an initialised process group."""
        return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        return torch_dist.get_rank() if self.active else 0

    @property
    def world_size(self) -> int:
        return torch_dist.get_world_size() if self.active else 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    @property
    def group(self) -> Any:
        """The gloo group of the loop's collectives (timeout :data:`WAIT_TIMEOUT`), made at its first use: every
        rank makes the loop's collectives in the same order, so every rank makes it at the same point."""
        world = torch_dist.group.WORLD
        if _WAIT_GROUP[0] is not world:  # first use, or a new default group
            _WAIT_GROUP[:] = [world, torch_dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)]
        return _WAIT_GROUP[1]

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier(group=self.group)

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_zero else None]
        torch_dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_ok(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank, then wait for all; when any rank failed, every rank raises (its own error, or
        the first failed rank's), instead of the others waiting for it."""
        if not self.active:
            return fn()
        outcome, error = _run(fn)
        outcomes: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(outcomes, outcome, group=self.group)
        if error is not None:
            raise error
        for rank, theirs in enumerate(outcomes):
            _raise_failure(theirs, rank)
        return outcome[1]

    def on_zero(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its result on every rank; rank 0's error is raised on all."""
        if not self.active:
            return fn()
        outcome, error = _run(fn) if self.is_zero else (("ok", None), None)
        outcome = self.broadcast(outcome)
        if error is not None:
            raise error
        _raise_failure(outcome, 0)
        return outcome[1]


STOPS: dict[str, type[BaseException]] = {"KeyboardInterrupt": KeyboardInterrupt, "Terminated": Terminated}
"""A run stopped on request, by name: raised as such on the ranks that learn of it from another."""


def _run(fn: Callable[[], T]) -> tuple[tuple[str, Any], BaseException | None]:
    """``(("ok", result), None)``, or ``(("error", (type name, message, is a UserError)), the error)``: what the
    other ranks are told of ``fn``'s run on this one, and the error to re-raise here once they know."""
    try:
        return ("ok", fn()), None
    except BaseException as exc:  # noqa: BLE001 - re-raised by the caller, after the others know
        return ("error", (type(exc).__name__, str(exc), isinstance(exc, UserError))), exc


def _raise_failure(outcome: tuple[str, Any], rank: int) -> None:
    """Raise, on another rank, the failure that ``outcome`` (from :func:`_run` on ``rank``) reports, if any."""
    kind, value = outcome
    if kind == "error":
        name, message, user = value
        if name in STOPS:  # rank 0 was stopped (Ctrl-C, SIGTERM): the others stop the same way, not with an error
            raise STOPS[name](message)
        raise (UserError(message) if user else RuntimeError(f"rank {rank} failed: {name}: {message}"))


def wants_processes(trainer_kwargs: Mapping[str, Any]) -> int:
    """How many processes the Trainer settings ask for (devices x nodes), resolving ``auto`` and ``-1``."""
    import lightning.pytorch as pl

    kwargs = {k: trainer_kwargs[k] for k in LAUNCH_KEYS if k in trainer_kwargs}
    try:
        probe = pl.Trainer(**kwargs, logger=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as exc:  # noqa: BLE001 - Lightning's MisconfigurationException & co. name the bad setting
        raise UserError(f"--trainer settings {kwargs} are not usable here: {exc}".replace("\n", " ")) from None
    return int(probe.world_size)


def launch_strategy(strategy: Any) -> Any:
    """The Fabric strategy that starts a run's processes and its default process group, for the Trainer's
    ``strategy`` (a name or a strategy object).

    ``ddp``, with a strategy object's own process-group backend and timeout (a longer NCCL timeout for a
    cluster, gloo on GPUs): every later Trainer finds the group already made and keeps it, so they would be
    ignored otherwise.
    """
    if isinstance(strategy, str):
        return "ddp"
    from lightning.fabric.strategies import DDPStrategy

    settings: dict[str, Any] = {}
    timeout = getattr(strategy, "_timeout", None)  # Lightning's DDPStrategy keeps its arguments as these
    backend = getattr(strategy, "_process_group_backend", None)
    if timeout is not None:
        settings["timeout"] = timeout
    if backend is not None:
        settings["process_group_backend"] = backend
    return DDPStrategy(**settings)


_CHILDREN: list[Any] = []
"""The processes :func:`launch` started for the run's other ranks (``subprocess.Popen``), in the process that did:
the launcher's own list, which Lightning's observer thread watches."""


def forward_signal(signum: int) -> None:
    """Send ``signum`` to the processes this one started for the run's other ranks (none under torchrun or SLURM,
    whose launchers signal every rank themselves), and stop watching them: Lightning's observer thread SIGKILLs
    this process within seconds of a child's exit with a non-zero status, which would cut its own clean-up short
    (status 137, no resume line) once the children have stopped as asked."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
    _CHILDREN.clear()


def end_started_ranks() -> None:
    """SIGKILL the processes this one started for the run's other ranks (none under torchrun or SLURM), at once.

    For rank 0 ending the run with an error of its own, such as a full disk while it alone writes a checkpoint
    that the others wait for at a barrier: they would learn of it only as a lost connection, and print that as a
    traceback after rank 0's one line (or wait for torch's time-out). Nothing of theirs is lost: rank 0 writes
    everything the run keeps, atomically, and the same command resumes.
    """
    started = list(_CHILDREN)
    _CHILDREN.clear()  # Lightning's observer watches this list: it would SIGKILL this process on seeing them die
    for proc in started:
        with contextlib.suppress(OSError):
            proc.kill()
    for proc in started:
        with contextlib.suppress(Exception):
            proc.wait(timeout=10)


@contextlib.contextmanager
def _stops_held(starts_others: bool) -> Iterator[None]:
    """Hold a Ctrl-C or SIGTERM back until the run's processes have made their group, here and in the processes
    started here for the other ranks; then deliver it (to the run's handler, which stops every rank).

    While the group forms, rank 0 waits inside torch for the others. A rank that the signal ended before it joined
    (still importing, before the run's handler is set: a traceback, or nothing at all) would leave rank 0 waiting
    until Lightning's observer of the ranks SIGKILLs it (status 137, no resume line); one that left while the others
    still read the group's store from it would give them a C++ warning and stack trace. So here the signal only
    marks itself, and the started processes inherit the signals blocked (pending, not lost) until this same point of
    their own start.

    Only where this process starts the others on its own node (``starts_others``), or is one of those and came with
    the signals held: a group of several nodes, or one that torchrun or SLURM started (which signal every rank
    themselves), may wait for a missing process until torch's time-out, and a Ctrl-C must still end it. Where this
    process starts the others, a rank that never joins would do the same to a held stop: a second one, or
    :data:`HELD_STOP_PATIENCE` seconds, ends every rank then (:func:`_watch_held_stops`). (Where signals cannot be
    held, not the main thread, they are let through.)
    """
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # A signal this process ignores (a shell script's background job ignores Ctrl-C) stays ignored, here and in the
    # processes started here: they inherit that, not a handler that holds it.
    stops = tuple(
        signum for signum in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(signum) is not signal.SIG_IGN
    )
    if not stops or (not starts_others and not set(stops) & signal.pthread_sigmask(signal.SIG_BLOCK, [])):
        yield
        return
    held: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in stops}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        with _watch_held_stops(stops, HELD_STOP_PATIENCE) if starts_others else contextlib.nullcontext():
            yield
    finally:
        # Unblocked while the marks are still set: a pending signal is marked now. (A signal that reached another
        # thread, where it is not blocked, is marked too, unless Python runs its handler only after the handlers
        # are back: then it acts then, as if it had come just now.) Every handler is put back even so.
        with contextlib.ExitStack() as restore:
            for signum, handler in previous.items():
                restore.callback(signal.signal, signum, handler if handler is not None else signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


@contextlib.contextmanager
def _watch_held_stops(stops: tuple[int, ...], patience: float) -> Iterator[None]:
    """While the main thread holds ``stops`` (blocked there), watch for them from a thread of its own: a second
    one, or ``patience`` seconds after the first with the block still on, ends the ranks this process started and
    this process (status 128 + the first signal's number), with a line that says so.

    The main thread waits inside torch, where no Python handler runs; the signals reach this watching thread
    instead (it alone does not block them), whose arrival Python reports through its wake-up file descriptor.
    """
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    done = threading.Event()

    def watch() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # the thread started with the main thread's block
        first: tuple[int, float] | None = None
        while not done.is_set():
            wait = 0.1 if first is None else max(0.0, min(0.1, first[1] + patience - time.monotonic()))
            if select.select([reader], [], [], wait)[0]:
                for signum in reader.recv(64):
                    if signum not in stops or done.is_set():
                        continue
                    if first is not None:
                        name = signal.Signals(signum).name
                        _give_up_the_start(first[0], f"a second stop ({name}) while the run's processes started")
                        return
                    first = (signum, time.monotonic())
            elif first is not None and time.monotonic() >= first[1] + patience and not done.is_set():
                name = signal.Signals(first[0]).name
                _give_up_the_start(
                    first[0],
                    f"{name} while the run's processes started, and their group had not formed {patience:g} s later "
                    "(a rank that never joined?)",
                )
                return

    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, name="held-stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous_fd)
        watcher.join()
        reader.close()
        writer.close()


def _give_up_the_start(signum: int, what: str) -> None:
    """End the ranks this process started and this process now (status 128 + ``signum``), saying ``what`` happened,
    from the held-stop watch: the run's processes are still making their group (before the loop reads or writes the
    run folder), and the main thread waits inside torch."""
    end_started_ranks()
    sys.stderr.write(f"{what}: ended every rank; finished work is kept; run the same command again to resume\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def launch(trainer_kwargs: Mapping[str, Any]) -> Dist:
    """Start the run's processes and their process group now, if the Trainer settings ask for several.

    In the process the user started, this re-runs the same command once per extra device (the
    ``ddp`` launcher's way); in those processes, or under ``torchrun``/SLURM, it joins the group.
    """
    processes = wants_processes(trainer_kwargs)
    if processes <= 1 or (torch_dist.is_available() and torch_dist.is_initialized()):
        return Dist()
    strategy = trainer_kwargs.get("strategy", "auto")
    if isinstance(strategy, str) and ("spawn" in strategy or "notebook" in strategy or "fork" in strategy):
        raise UserError(
            f"--trainer.strategy {strategy} starts processes from inside the script; use ddp "
            f"(the recipe re-launches itself once per device) or launch with torchrun"
        )
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    if any(word in name.lower() for word in ("fsdp", "deepspeed")):
        raise UserError(
            f"--trainer.strategy {name} shards the model across processes, but after each fit every process samples "
            "its share of the synthetic set and rank 0 saves the weights, which needs the whole model on each; "
            "use ddp (these models fit on one GPU)"
        )
    from lightning.fabric import Fabric

    fabric = Fabric(
        accelerator=trainer_kwargs.get("accelerator", "auto"),
        devices=trainer_kwargs.get("devices", "auto"),
        num_nodes=trainer_kwargs.get("num_nodes", 1),
        strategy=launch_strategy(strategy),  # starts the processes and the group; the Trainer's strategy reuses them
    )
    global _CHILDREN
    # The launcher's list of the other ranks' processes, known before it fills it and makes the group: a stop while
    # the group forms must reach them too, or they fail on the lost rank 0 with a traceback of their own.
    procs = getattr(getattr(fabric.strategy, "launcher", None), "procs", None)
    if isinstance(procs, list):
        _CHILDREN = procs
    environment = getattr(fabric.strategy, "cluster_environment", None)
    one_node = getattr(fabric.strategy, "num_nodes", 1) == 1
    starts_others = one_node and not getattr(environment, "creates_processes_externally", True)
    try:
        with _stops_held(starts_others):
            fabric.launch()
            # Every rank done making the group before a held stop ends any: one that left first would take the
            # group's store with it while another still reads from it (a C++ warning and stack trace on that rank).
            Dist().barrier()
    except BaseException:
        # Rank 0 failed to make the group (a port in use, a GPU that fails to start): the ranks it started still
        # hold Ctrl-C and SIGTERM while they try to join, so they are ended here, not left behind.
        for proc in procs if isinstance(procs, list) else []:
            with contextlib.suppress(OSError):
                proc.kill()
        raise
    if torch.cuda.is_available() and fabric.device.type == "cuda":
        torch.cuda.set_device(fabric.device)
    return Dist()


__all__ = [
    "Dist",
    "LAUNCH_KEYS",
    "WAIT_TIMEOUT",
    "end_started_ranks",
    "forward_signal",
    "launch",
    "launch_strategy",
    "wants_processes",
]
