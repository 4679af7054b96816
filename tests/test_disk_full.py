"""A full disk (or a used-up quota) while a run writes: one line naming the file, finished work kept, the same
command resumes; checkpoints are replaced only by whole ones and never pass through the system's temporary folder.

The disk is filled by a stand-in for ``open`` in :mod:`collapse.atomic` (every file the loop writes goes through
``atomic_open``) whose files refuse writes with ``ENOSPC`` as a full file system does: mounting a small file system
needs privileges the tests cannot count on.
"""

from __future__ import annotations

import builtins
import errno
import logging
import tempfile
from pathlib import Path

import pytest
import torch

import collapse.atomic
from collapse.atomic import atomic_torch_save
from collapse.errors import disk_full_line
from collapse.tracking import Tracker, WandbConfig
from engine.trainer import AtomicCheckpointIO
from tests.test_rundir_safety import run_toy


class _FullFile:
    """A binary file that takes ``room`` bytes, then refuses every write as a full disk does."""

    def __init__(self, fh, room: int, code: int):
        self.fh, self.room, self.code = fh, room, code

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self.room:
            raise OSError(self.code, "No space left on device" if self.code == errno.ENOSPC else "Disk quota exceeded")
        self.room -= size
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def _fill_disk(monkeypatch, when=lambda path: True, room: int = 100, code: int = errno.ENOSPC) -> None:
    """Files that ``atomic_open`` writes at paths where ``when(path)`` take ``room`` bytes, then refuse the rest."""

    def full_open(path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)
        return _FullFile(fh, room, code) if "b" in mode and when(Path(path)) else fh

    monkeypatch.setattr(collapse.atomic, "open", full_open, raising=False)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_torch_file_that_finds_the_disk_full_raises_that_error_and_keeps_the_old_file(tmp_path, monkeypatch, code):
    path = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    _fill_disk(monkeypatch, code=code)
    with pytest.raises(OSError) as caught:  # torch alone says "RuntimeError: ... unexpected pos 704 vs 598"
        atomic_torch_save({"w": torch.zeros(10_000)}, path)
    assert caught.value.errno == code and caught.value.filename == str(path)
    assert path.read_bytes() == before  # the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left behind
    line = disk_full_line(caught.value)
    assert str(path) in line and "run the same command again to resume" in line


def test_a_file_that_cannot_even_be_created_is_named_as_the_target_not_its_temporary_name(tmp_path, monkeypatch):
    def no_room(path, mode="r", *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))  # as open() says it: the temporary name

    monkeypatch.setattr(collapse.atomic, "open", no_room, raising=False)
    with pytest.raises(OSError) as caught:
        collapse.atomic.atomic_write_text(tmp_path / "metrics.json", "{}")
    assert caught.value.filename == str(tmp_path / "metrics.json")


def test_other_errors_have_no_disk_full_line():
    assert disk_full_line(OSError(errno.EACCES, "Permission denied", "x")) is None
    assert disk_full_line(RuntimeError("unexpected pos 704 vs 598")) is None
    copy = OSError(errno.ENOSPC, "No space left on device", "/src/samples.png", None, "/run/wandb/samples.png")
    assert "(writing /run/wandb/samples.png)" in disk_full_line(copy)  # a copy fails writing its destination


def test_checkpoints_are_written_beside_their_target_not_in_the_temporary_folder(tmp_path, monkeypatch):
    # Lightning's own writer stages every checkpoint in tempfile's folder (often a small local /tmp) and then moves
    # it: across file systems a copy over the previous checkpoint, torn by a kill. This one never looks there.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    io.save_checkpoint({"step": 2, "w": torch.ones(3)}, path)
    assert io.load_checkpoint(path)["step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    _fill_disk(monkeypatch, when=lambda p: p.parent == path.parent)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 3, "w": torch.zeros(10_000)}, path)
    assert io.load_checkpoint(path)["step"] == 2  # the previous checkpoint is whole
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"step": 4}, path, storage_options={"anon": True})


def test_a_full_disk_mid_fit_is_one_line_and_the_same_command_resumes_to_the_unbroken_result(
    tmp_path, monkeypatch, capsys
):
    whole, _, _ = run_toy(capsys, tmp_path / "whole", 3)
    out = tmp_path / "run"
    # The disk fills while generation 1 writes its mid-fit checkpoint (its first epoch's has been written).
    seen: list[Path] = []

    def full(path: Path) -> bool:
        seen.append(path)
        return ".gen_001.partial" in str(path) and sum(".gen_001.partial" in str(p) for p in seen) > 1

    _fill_disk(monkeypatch, when=full)
    code, said, err = run_toy(capsys, out, 3)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: no space left on the device (writing ")
    assert f"{out}/.gen_001.partial/checkpoints/last.ckpt)" in err and "run the same command again to resume" in err
    assert "gen 0/2" in said and "gen 1/2" not in said
    assert (out / "gen_000" / "manifest.json").is_file()
    checkpoint = out / ".gen_001.partial" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["epoch"] == 0  # the first epoch's, whole
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

    monkeypatch.undo()  # space is freed
    resumed, said, err = run_toy(capsys, out, 3)
    assert err == "" and "finished earlier" in said
    assert resumed.fitted == [1, 2]
    assert resumed.metrics == whole.metrics


class _Run:
    def __init__(self, error: Exception | None = None):
        self.error, self.exit_codes = error, []

    def finish(self, exit_code: int | None = None) -> None:
        self.exit_codes.append(exit_code)
        logging.getLogger("wandb").error("a W&B handler writes to the standard error")
        if self.error is not None:
            raise self.error


def _tracker(run: _Run) -> Tracker:
    tracker = Tracker(WandbConfig(mode="disabled"), "toy", "unused", {})
    tracker.run = run
    return tracker


def test_a_failed_run_is_marked_failed_in_w_and_b_and_w_and_b_s_own_error_does_not_hide_it(monkeypatch):
    monkeypatch.setattr(logging, "raiseExceptions", True)
    run = _Run()
    _tracker(run).finish()
    assert run.exit_codes == [None]
    run = _Run()
    _tracker(run).finish(failed=True)
    assert run.exit_codes == [1] and logging.raiseExceptions  # put back once W&B has finished
    # The disk that refused the run's file refuses W&B's: its error is dropped (the run's own is on its way up),
    # and logging stops printing handler errors, each of which W&B's capture of the standard error would repeat.
    run = _Run(OSError(errno.ENOSPC, "No space left on device"))
    tracker = _tracker(run)
    tracker.finish(failed=True)
    assert run.exit_codes == [1] and not logging.raiseExceptions and tracker.run is None
    tracker.finish(failed=True)  # once only
    assert run.exit_codes == [1]
    with pytest.raises(OSError):  # a run that did not fail keeps W&B's error
        _tracker(_Run(OSError(errno.ENOSPC, "No space left on device"))).finish()
