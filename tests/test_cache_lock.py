"""A cache entry is built once when several runs on one machine start on a cold cache (collapse.atomic.entry_lock)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from collapse.atomic import entry_lock

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock: Linux and macOS only")

HOLDER = """
import sys, time
from collapse.atomic import entry_lock
with entry_lock(sys.argv[1], "a test entry"):
    open(sys.argv[2], "a").write("holder in\\n")
    time.sleep(float(sys.argv[3]))
    open(sys.argv[2], "a").write("holder out\\n")
"""


def _wait_for(path: Path, text: str, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never said {text!r}")


def test_a_second_process_waits_for_the_first_and_says_so(tmp_path, caplog):
    entry, journal = tmp_path / "cache" / "entry-1", tmp_path / "journal.txt"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry), str(journal), "1.5"], cwd=ROOT)
    try:
        _wait_for(journal, "holder in")
        with caplog.at_level("WARNING", logger="collapse.atomic"), entry_lock(entry, "a test entry"):
            with open(journal, "a") as fh:
                fh.write("second in\n")
    finally:
        assert holder.wait(timeout=60) == 0
    assert journal.read_text().splitlines() == ["holder in", "holder out", "second in"]
    assert "another process is preparing a test entry" in caplog.text
    assert not entry.exists()  # the lock lives beside the entry, which stays the builder's to make


def test_a_lock_held_by_a_killed_process_is_released(tmp_path):
    entry, journal = tmp_path / "entry", tmp_path / "journal.txt"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(entry), str(journal), "600"], cwd=ROOT)
    _wait_for(journal, "holder in")
    holder.kill()
    holder.wait(timeout=30)
    start = time.monotonic()
    with entry_lock(entry, "a test entry"):
        assert time.monotonic() - start < 10


def test_a_read_only_cache_is_not_locked(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_lock_files(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_lock_files)
    with entry_lock(tmp_path / "entry", "a test entry"):
        ran = True
    assert ran


@pytest.mark.slow  # two processes tokenise the stand-in corpus (about 15 s on 2 cores)
def test_two_runs_on_a_cold_story_cache_build_it_once(tmp_path):
    script = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        from datamodules.tinystories import TinyStoriesDataConfig, TinyStoriesDataModule
        cfg = TinyStoriesDataConfig(cache_dir=sys.argv[1], vocab_size=300, num_real=400, num_test=40)
        dm = TinyStoriesDataModule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        print("train stories", len(dm.train_dataset), "tokenizer", dm.tokenizer_hash)
        """
    )
    from datamodules.tinystories import TinyStoriesDataConfig, TinyStoriesDataModule

    cache = tmp_path / "cache"
    entry = TinyStoriesDataModule(
        TinyStoriesDataConfig(cache_dir=str(cache), vocab_size=300, num_real=400, num_test=40)
    ).cache_entry
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    with entry_lock(entry, "the test's hold"):  # both start while the entry is taken: both must wait, one builds
        sinks = [open(log, "w") for log in logs]
        command = [sys.executable, "-c", script, str(cache)]
        runs = [subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT) for sink in sinks]
        for log in logs:
            _wait_for(log, "another process is preparing this data cache entry", seconds=120)
    assert [run.wait(timeout=600) for run in runs] == [0, 0]
    for sink in sinks:
        sink.close()
    outputs = [log.read_text() for log in logs]
    both = "\n".join(outputs)
    assert both.count("training a 300-token BPE") == 1, both  # one tokenizer, trained by one of them
    finals = [line for out in outputs for line in out.splitlines() if line.startswith("train stories")]
    assert len(finals) == 2 and finals[0] == finals[1] and finals[0].startswith("train stories 400 ")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # not reused this soon on Linux or macOS (pids are handed out in order)


def test_the_holder_removes_what_a_killed_builder_left_and_nothing_else(tmp_path, caplog):
    entry, dead, old = tmp_path / "entry", _dead_pid(), time.time() - 3600
    (entry / "texts" / "train").mkdir(parents=True)
    stale = [entry / "texts" / "train" / f".text.utf8.tmp-{dead}", entry / f".tokenizer.json.tmp-{dead}"]
    live = [
        entry / f".tokens.npy.tmp-{os.getpid()}",  # an old file of a process that runs: being written
        entry / f".offsets.npy.tmp-{dead}",  # touched a moment ago: a writer elsewhere (a shared cache)
    ]
    for path in [*stale, *live]:
        path.write_bytes(b"x" * 1000)
    for path in [*stale, live[0]]:
        os.utime(path, (old, old))
    kept = [entry / "texts" / "train" / "text.utf8", entry / ".hidden-but-finished", entry / "notes.tmp-1"]
    for path in kept:
        path.write_text("finished")
    with caplog.at_level("INFO", logger="collapse.atomic"), entry_lock(entry, "a test entry"):
        assert not any(path.exists() for path in stale)
    assert all(path.read_text() == "finished" for path in kept) and all(path.is_file() for path in live)
    assert "removed 2 unfinished files of a killed run" in caplog.text


def test_a_file_system_that_cannot_lock_builds_unlocked_with_one_line(tmp_path, caplog, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("INFO", logger="collapse.atomic"), entry_lock(tmp_path / "entry", "a test entry"):
        ran = True
    assert ran and "this file system cannot lock files; a test entry is not locked" in caplog.text
