"""Crash-safe file writes: write to a temporary name in the same folder, fsync, rename over the target.

A reader therefore sees either the old file or the whole new one, never a torn write, even if the
process is killed (SIGKILL, OOM, pre-emption) half-way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from collapse.errors import DISK_FULL, UserError

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
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL and exc.filename in (None, str(tmp)):
            exc.filename = str(path)  # a write names no file, an open the temporary one: say which file it was
        raise
    fsync_dir(path.parent)


class _WriteRecorder:
    """A binary file's ``write``/``flush`` that remembers the OSError a write raised (see :func:`atomic_torch_save`)."""

    def __init__(self, fh: IO[bytes]):
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (:func:`atomic_open`).

    A write that fails (a full disk, a quota) comes out as its ``OSError``, naming ``path``: torch itself reports it
    as an unexplained ``RuntimeError`` ("unexpected pos ...").
    """
    import torch  # lazily: this module is imported by processes that never load torch

    with atomic_open(path, "wb") as fh:
        writer = _WriteRecorder(fh)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None


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


NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
"""``flock`` errors that mean "this file system cannot lock" (NFS without a lock daemon, some FUSE mounts)."""
STALE_AFTER_S = 600.0
"""A temporary file untouched this long, of a process that is not running here, is left by a killed writer."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's process counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _remove_unfinished(folder: Path) -> None:
    """Delete the temporary files (:func:`tmp_name`) that writers killed mid-write left anywhere in ``folder``:
    those of a process not running on this machine and untouched for :data:`STALE_AFTER_S` (a writer on another
    machine of a shared cache, which this machine's lock may not see, keeps touching its file)."""
    if not folder.is_dir():
        return
    now, removed, size = time.time(), 0, 0
    for path in folder.rglob(".*.tmp-*"):
        pid = path.name.rpartition(".tmp-")[2]
        with contextlib.suppress(OSError):
            info = path.stat()
            if path.is_file() and pid.isdigit() and now - info.st_mtime > STALE_AFTER_S and not pid_alive(int(pid)):
                path.unlink()
                removed, size = removed + 1, size + info.st_size
    if removed:
        log.info("%s: removed %d unfinished files of a killed run (%.1f MB)", folder, removed, size / 1e6)


@contextmanager
def entry_lock(entry: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the cache entry ``entry`` while it is built, so that side-by-side runs on one
    machine (a grid of sweep agents, several runs on one cold cache) build it once: the others wait, then find
    it finished. The lock is the file ``.<entry name>.lock`` beside the entry (``flock``: released when this
    process ends, even when killed). Once it holds the lock, the process deletes the temporary files that a
    builder killed mid-write left in the entry. ``what`` names the entry in the one log line a waiting process
    writes. Nothing is locked on a system without ``fcntl``, on a file system that cannot lock (one log line),
    or where the lock file cannot be created (a read-only cache): each process then builds for itself, and
    atomic writes keep the entry whole."""
    entry = Path(entry)
    if sys.platform == "win32":
        yield
        return
    import fcntl

    make_folder(entry.parent, "the cache folder")
    path = entry.parent / f".{entry.name}.lock"
    try:  # read-only is enough for flock, and opens a lock file another user of a shared cache created
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except OSError:
        fd = None  # a read-only cache (prepared elsewhere): nothing to build, or the build says why it cannot
    locked = False
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                log.warning("%s: another process is preparing %s; waiting for it to finish", entry, what)
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError as exc:
                if exc.errno not in NO_FLOCK:
                    raise
                log.info("%s: this file system cannot lock files; %s is not locked while it is built", entry, what)
        if locked:
            _remove_unfinished(entry)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
