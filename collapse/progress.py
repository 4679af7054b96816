"""Progress lines for long phases, and the console logging of a recipe run.

A recipe run has phases that take minutes (training, testing, sampling, scoring, tokenising) and, on a
non-terminal (CI logs, ``nohup``, W&B agents), nothing to show while they run. :class:`Progress`
counts a phase's work and writes one plain line whenever ``interval`` seconds (default 30) have passed
since its last line, and a closing line::

    [toy_gaussian] sampling gen 0: 4096/16384 samples (25%), 1370 samples/s, ETA 9s
    [toy_gaussian] sampling gen 0: done, 16384 samples in 12s (1370 samples/s)

A phase that ends before its first line is due (or has nothing to do) stays silent, so short runs print
no more than before.
The lines go through :mod:`logging` (logger ``collapse.progress``, level INFO): ``--log_level WARNING``
silences them, and only global rank 0 of a multi-process run writes them.

:func:`console` is what the generation loops enter once per recipe run: it sends the project's log
records (``--log_level`` and above) to stderr as ``[recipe] message`` and sets the progress interval
(``--progress_every``), and puts both back when the run ends. Importing a project module never
configures logging.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator

from collapse.errors import ConfigError

DEFAULT_INTERVAL = 30.0
"""Seconds between two progress lines of a phase unless ``--progress_every`` says otherwise."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
"""The values of ``--log_level``."""
PROJECT_LOGGERS = (
    "collapse", "datamodules", "samplers", "evaluation", "lit_modules", "callbacks", "tooling", "engine", "recipes",
    "__main__",
)  # fmt: skip
"""The loggers ``--log_level`` sets: the project's packages (other libraries keep their own level, WARNING)."""

log = logging.getLogger(__name__)

_interval = DEFAULT_INTERVAL


def progress_interval() -> float:
    """The interval a :class:`Progress` made without one uses (``--progress_every`` of the running recipe)."""
    return _interval


def check_log_level(value: object, flag: str = "log_level") -> str:
    """``value`` as one of :data:`LOG_LEVELS` (any case), else a one-line :class:`ConfigError` naming ``--flag``."""
    level = value.upper() if isinstance(value, str) else value
    if level not in LOG_LEVELS:
        raise ConfigError(f"--{flag} must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


def check_interval(value: object, flag: str = "progress_every") -> float:
    """``value`` as seconds >= 0, else a one-line :class:`ConfigError` naming ``--flag``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise ConfigError(f"--{flag} must be a number of seconds >= 0 (0: a line for every step), got {value!r}")
    return float(value)


def global_rank() -> int:
    """This process's global rank: from an initialised process group, else from the launcher's environment."""
    dist = sys.modules.get("torch.distributed")  # never imports torch: a NumPy-only recipe has no process group
    if dist is not None:
        with contextlib.suppress(Exception):
            if dist.is_available() and dist.is_initialized():
                return int(dist.get_rank())
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    # Lightning's ddp launcher sets these before the group exists; any non-zero one means "not global rank 0".
    values = [os.environ.get(k, "") for k in ("LOCAL_RANK", "NODE_RANK")]
    return max((int(v) for v in values if v.isdigit()), default=0)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def number_text(x: float) -> str:
    """A rate as people read it: ``1370``, ``12.5``, ``0.0417``."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


_BEATING: weakref.WeakSet[Progress] = weakref.WeakSet()
"""The :class:`Progress` lines whose heartbeat runs (stopped by :func:`console` at the end of a run)."""


class Progress:
    """Counts the work of one phase and writes a progress line at most every ``interval`` seconds.

    Use as a context manager (the closing line is written when the block ends without an error) or
    call :meth:`close`. Reading the clock is the only cost of an :meth:`update` that writes nothing.

    Args:
        total: units of work of the phase, or None when unknown (no percentage, no ETA).
        what: the phase, as the line starts: ``"sampling gen 3"``.
        unit: the plural name of a unit of work: ``"samples"``, ``"steps"``.
        interval: seconds between lines; default: :func:`progress_interval` (``--progress_every``, 30 s).
        done: units already done when the phase starts (a resumed fit); the rate counts only the new ones.
        rank: this process's global rank (only rank 0 writes); default: :func:`global_rank`.
        clock: seconds, monotonic (tests pass a fake one).
        logger: where the lines go (level INFO); default: ``collapse.progress``.
        heartbeat: also write a line from a background thread when ``interval`` seconds pass without one, i.e.
            while a single unit takes long (a first training step that compiles, a sampling chunk): the count
            so far and ``no new <unit> for <time>``. It reads only the host clock and the count, never the
            device, and stops at :meth:`close` or :meth:`stop`. Off when ``interval`` is 0.
    """

    def __init__(
        self,
        total: int | None,
        what: str,
        unit: str = "items",
        *,
        interval: float | None = None,
        done: int = 0,
        rank: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
        heartbeat: bool = False,
    ):
        self.total = None if total is None else int(total)
        self.what, self.unit = what, unit
        self.interval = progress_interval() if interval is None else check_interval(interval, "interval")
        self.done = self._start = int(done)
        self.active = (global_rank() if rank is None else rank) == 0
        self.lines = 0
        """Lines written so far."""
        self._clock = clock
        self._log = logger or log
        self._t0 = self._last = self._moved = clock()
        self._closed = False
        self._lock = threading.Lock()  # one line at a time from the caller and the heartbeat
        self._stopped = threading.Event()
        self._beat: threading.Thread | None = None
        if heartbeat and self.active and self.interval > 0:
            self._beat = threading.Thread(target=self._heartbeat, name=f"progress: {what}", daemon=True)
            _BEATING.add(self)
            self._beat.start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.stop()

    def stop(self) -> None:
        """Stop the heartbeat without a closing line (the phase failed or was interrupted)."""
        self._stopped.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join(timeout=5)
        self._beat = None
        _BEATING.discard(self)

    def _heartbeat(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                wait = self._last + self.interval - now
                if wait <= 0:
                    text = self._line(now, None)
                    if now - self._moved >= self.interval:
                        text += f", no new {self.unit} for {format_duration(now - self._moved)}"
                    self._write(text)
                    self._last, wait = now, self.interval
            if self._stopped.wait(wait):
                return

    def update(self, n: int = 1, *, done: int | None = None, extra: str | Callable[[], str] | None = None) -> bool:
        """Count ``n`` more units (or set the count to ``done``); write a line if one is due. Returns whether it wrote.

        ``extra`` is appended to the line (``"loss 1.23"``); a callable is called only when a line is written,
        so a value that costs something to read (a GPU loss) is read only then.
        """
        before = self.done
        self.done = int(done) if done is not None else self.done + n
        if not self.active:
            return False
        now = self._clock()
        if self.done != before:
            self._moved = now
        if now - self._last < self.interval:
            return False
        with self._lock:
            self._write(self._line(now, extra))
            self._last = now
        return True

    def close(self, extra: str | Callable[[], str] | None = None) -> None:
        """Write the closing line (count, time, rate), unless the phase ended before any line was due or did nothing."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if not self.active:
            return
        now = self._clock()
        elapsed = now - self._t0
        if self.lines == 0 and (elapsed < self.interval or self.done == self._start):
            return
        rate = self._rate(now)
        text = f"{self.what}: done, {self.done} {self.unit} in {format_duration(elapsed)}"
        if rate is not None:
            text += f" ({number_text(rate)} {self.unit}/s)"
        self._write(text + self._extra(extra))

    def _rate(self, now: float) -> float | None:
        elapsed = now - self._t0
        return (self.done - self._start) / elapsed if elapsed > 0 else None

    def _line(self, now: float, extra: str | Callable[[], str] | None) -> str:
        if self.total is not None:
            pct = f" ({100 * self.done / self.total:.0f}%)" if self.total > 0 else ""
            text = f"{self.what}: {self.done}/{self.total} {self.unit}{pct}"
        else:
            text = f"{self.what}: {self.done} {self.unit}"
        rate = self._rate(now)
        if rate is None:
            text += f", {format_duration(now - self._t0)}"
        else:
            text += f", {number_text(rate)} {self.unit}/s"
            if self.total is not None and rate > 0:
                text += f", ETA {format_duration(max(0, self.total - self.done) / rate)}"
        return text + self._extra(extra)

    @staticmethod
    def _extra(extra: str | Callable[[], str] | None) -> str:
        value = extra() if callable(extra) else extra
        return f", {value}" if value else ""

    def _write(self, text: str) -> None:
        self.lines += 1
        self._log.info(text)


_within: list[Callable[[int], None]] = []  # innermost reporter last; one stack per process (one drawing thread)


@contextlib.contextmanager
def progress_within(report: Callable[[int], None]) -> Iterator[None]:
    """While the block runs, :func:`report_within` calls ``report(done)``: how far a long call inside it is.

    For a unit of work that takes long and is done by another layer (a sampling chunk drawn by the model's
    ``sample``): the caller counts the units it hands out, and the callee, which knows nothing of the caller's
    :class:`Progress`, reports the units it has finished inside the current one.
    """
    _within.append(report)
    try:
        yield
    finally:
        _within.pop()


def report_within(done: int) -> None:
    """Report ``done`` units finished inside the current :func:`progress_within` block; nothing outside one."""
    if _within:
        _within[-1](int(done))


class _Console(logging.Handler):
    """Writes records to the stderr of the moment (a test's capture, a redirected stream) as ``[name] message``."""

    def __init__(self, name: str):
        super().__init__()
        self.setFormatter(_Format(name))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never end a run
            self.handleError(record)


class _Format(logging.Formatter):
    def __init__(self, name: str):
        super().__init__()
        self.prefix = f"[{name}] " if name else ""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return self.prefix + text


@contextlib.contextmanager
def console(level: str = "INFO", name: str = "", interval: float = DEFAULT_INTERVAL) -> Iterator[None]:
    """For the length of a recipe run: the project's log records of ``level`` and above on stderr, as
    ``[name] message``, and progress lines every ``interval`` seconds.

    The handler goes on the root logger, so other libraries' warnings show in the same format; it is left
    out when the root logger already has handlers (a program or test harness that set up logging itself),
    which then get the records. Processes other than global rank 0 show warnings and errors only.
    Everything is put back on exit.
    """
    global _interval
    level = check_log_level(level)
    interval = check_interval(interval)
    root = logging.getLogger()
    handler = None if root.handlers else _Console(name)
    if global_rank() != 0 and logging.getLevelName(level) < logging.WARNING:
        level = "WARNING"  # the other processes of a multi-process run: their info would repeat rank 0's
    loggers = [logging.getLogger(n) for n in PROJECT_LOGGERS]
    saved = [lg.level for lg in loggers]
    saved_interval = _interval
    for lg in loggers:
        lg.setLevel(level)
    if handler is not None:
        root.addHandler(handler)
    _interval = interval
    beating = set(_BEATING)
    try:
        yield
    finally:
        # A phase whose close or stop an error skipped on its way out (a hook cut short) beats no longer than its run.
        for progress in set(_BEATING) - beating:
            progress.stop()
        _interval = saved_interval
        if handler is not None:
            root.removeHandler(handler)
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)


__all__ = [
    "DEFAULT_INTERVAL",
    "LOG_LEVELS",
    "Progress",
    "check_interval",
    "check_log_level",
    "console",
    "format_duration",
    "number_text",
    "global_rank",
    "progress_interval",
]
