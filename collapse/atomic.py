"""Crash-safe file writes: write to a temporary name in the same folder, fsync, rename over the target.

A reader therefore sees either the old file or the whole new one, never a torn write, even if the
process is killed (SIGKILL, OOM, pre-emption) half-way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from collapse.errors import UserError

log = logging.getLogger(__name__)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename or a new file) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_name(path: Path) -> Path:
    """The temporary sibling used while ``path`` is being written (unique per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` only when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    kwargs = {} if "b" in mode else {"encoding": encoding}
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_writable_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is, or can be made, a folder this process may write in; else a UserError naming ``what``.

    Nothing is created: the nearest existing ancestor decides (a file in the way, or no write permission).
    """
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: no permission to write in {probe}")
    return path


def make_folder(path: str | os.PathLike, what: str) -> Path:
    """``mkdir -p path``, with a UserError naming ``what`` where the system refuses it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot be created ({exc.strerror or exc})") from None
    return path


def _remove_unfinished(folder: Path) -> None:
    """Delete the temporary files (:func:`tmp_name`) that writers killed mid-write left anywhere in ``folder``."""
    if not folder.is_dir():
        return
    stale = [p for p in folder.rglob(".*.tmp-*") if p.is_file() and p.name.rpartition(".tmp-")[2].isdigit()]
    size = 0
    for path in stale:
        with contextlib.suppress(OSError):
            size += path.stat().st_size
            path.unlink()
    if stale:
        log.info("%s: removed %d unfinished files of a killed run (%.1f MB)", folder, len(stale), size / 1e6)


@contextmanager
def entry_lock(entry: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the cache entry ``entry`` while it is built, so that side-by-side runs on one
    machine (a grid of sweep agents, several runs on one cold cache) build it once: the others wait, then find
    it finished. The lock is the file ``.<entry name>.lock`` beside the entry (``flock``: released when this
    process ends, even when killed); on a system without ``fcntl`` nothing is locked. Once it holds the lock, the
    process deletes the temporary files that a builder killed mid-write left in the entry. ``what`` names the
    entry in the one log line a waiting process writes. Where the lock file cannot be created (a read-only
    cache), nothing is locked either."""
    entry = Path(entry)
    if sys.platform == "win32":  # no fcntl: each process builds; atomic writes still keep the entry whole
        yield
        return
    import fcntl

    make_folder(entry.parent, "the cache folder")
    path = entry.parent / f".{entry.name}.lock"
    try:
        fh = open(path, "a")
    except OSError:  # a read-only cache (prepared elsewhere): nothing to build, or the build says why it cannot
        yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: another process is preparing %s; waiting for it to finish", entry, what)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            _remove_unfinished(entry)  # the lock's holder is the entry's only writer: every temporary file is stale
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
