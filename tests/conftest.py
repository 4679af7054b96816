"""Shared test setup: keep every library offline and headless, caches in a per-session temporary folder; a
stand-in W&B (``fake_wandb``)."""

import os
import signal
import sys
import threading
import types
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

# As the recipes do (collapse.cli.run): reuse freed training buffers instead of re-zeroing fresh pages.
from collapse.hardware import retain_freed_memory  # noqa: E402

retain_freed_memory()


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Token caches, featurised molecules and the digit classifier of every test go to one per-session folder,
    never the user's cache (``MODEL_COLLAPSE_CACHE``); a test that needs a cold cache sets its own."""
    monkeypatch.setenv("MODEL_COLLAPSE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


class FakeRun:
    """Records what the Tracker sends to W&B."""

    def __init__(self, kwargs):
        self.kwargs, self.rows, self.metrics, self.id = kwargs, [], {}, "fake"
        self.files: list[str] = []
        self.finished = False

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, row):
        self.rows.append(dict(row))

    def save(self, path, base_path=None, policy=None):
        self.files.append(Path(path).name)

    def finish(self, exit_code=None):
        self.finished = True
        self.exit_code = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module: the list of the :class:`FakeRun` s opened, in order."""
    runs: list[FakeRun] = []
    module = types.ModuleType("wandb")

    def init(**kwargs):
        runs.append(FakeRun(kwargs))
        return runs[-1]

    module.init = init
    module.Image = lambda path: ("image", path)
    module.Table = lambda columns, data: ("table", columns, data)
    monkeypatch.setitem(sys.modules, "wandb", module)
    for key in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_RUN_GROUP", "WANDB_GROUP", "WANDB_TAGS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return runs


_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


@pytest.fixture(autouse=True)
def _signal_handlers_put_back():
    """Each test starts with the Ctrl-C and SIGTERM handlers (and, on POSIX, the blocked-signal set) that the test
    process had before it: code under test that ignores Ctrl-C on its way out (a stopped secondary rank does, and so
    does Lightning's handling of an interrupted fit) would otherwise change what every later test sees."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, ()) if hasattr(signal, "pthread_sigmask") else None
    yield
    for signum, handler in handlers.items():
        if handler is not None and signal.getsignal(signum) != handler:
            signal.signal(signum, handler)
    if blocked is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
