"""The generation store: one folder per finished generation, written atomically, verified on read.

Layout of a run directory::

    <out_dir>/
        gen_000/                 what generation 0 produced, complete
            manifest.json        num_samples, sampling settings, sha256 + size of every file
            samples.npy          synthetic set 0 (any number of named .npy arrays; a ragged one holds its
                                 rows back to back, unpadded, with a lengths array beside it)
            ...                  metrics.json, model checkpoint, pictures, ...
        .gen_001.partial/        generation 1 while it is being made (never read as finished)

A generation is *made* in its hidden ``.gen_XXX.partial`` folder: each file there is itself written
atomically, so a killed run resumes at the last finished step (a fitted checkpoint is not refitted).
:meth:`GenerationStore.commit` checksums every file, writes ``manifest.json`` and renames the folder
to ``gen_XXX``: a generation either exists whole, with its manifest, or does not exist.

Arrays are stored as ``.npy`` and opened memory-mapped, so a 20-generation pool of a million
examples each is never loaded into memory as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from collapse.atomic import atomic_write_json, fsync_dir, tmp_name
from collapse.errors import UserError

FORMAT = "collapse-store/1"
MANIFEST = "manifest.json"
_GEN_RE = re.compile(r"^gen_(\d{3,})$")
_CHUNK = 8 << 20


class StoreError(UserError, RuntimeError):
    """A store file that is missing, truncated, corrupt or inconsistent; the message names it."""


@dataclass(frozen=True)
class Generation:
    """A finished generation read back from the store."""

    index: int
    path: Path
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _well_formed_files(manifest: dict[str, Any]) -> bool:
    """Whether a manifest's ``files`` maps names to ``{"bytes": int, "sha256": str}``, as :meth:`GenerationStore.commit`
    writes it (an edited or foreign one would otherwise fail with a KeyError deep in a check)."""
    files = manifest.get("files")
    return isinstance(files, dict) and all(
        isinstance(name, str)
        and isinstance(info, dict)
        and isinstance(info.get("bytes"), int)
        and not isinstance(info.get("bytes"), bool)
        and isinstance(info.get("sha256"), str)
        for name, info in files.items()
    )


class GenerationStore:
    """Reads and writes the ``gen_XXX`` folders of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._verified: set[tuple[str, int, int]] = set()

    # ---- paths ---------------------------------------------------------------------------------
    def path(self, generation: int) -> Path:
        return self.root / f"gen_{generation:03d}"

    def staging(self, generation: int) -> Path:
        return self.root / f".gen_{generation:03d}.partial"

    def is_complete(self, generation: int) -> bool:
        return (self.path(generation) / MANIFEST).is_file()

    def completed(self) -> list[int]:
        """Indices of the generations that were committed (have a manifest)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _GEN_RE.match(p.name)
            if m and (p / MANIFEST).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    # ---- writing -------------------------------------------------------------------------------
    def begin(self, generation: int) -> Path:
        """Create (or reopen, after a crash) the staging folder of ``generation``."""
        if self.is_complete(generation):
            raise StoreError(f"{self.path(generation)} is already complete; a finished generation is never rewritten")
        if self.path(generation).exists():
            # A commit renames a folder that holds its manifest: a gen_XXX without one was not made by a commit
            # (damaged or put there by hand). Say so now, before the generation's work is done again for nothing.
            raise StoreError(
                f"{self.path(generation)} has no {MANIFEST}, so it is not a finished generation; "
                "move it out of the run directory to make this generation again"
            )
        stage = self.staging(generation)
        stage.mkdir(parents=True, exist_ok=True)
        return stage

    def staged(self, generation: int, name: str) -> Path | None:
        """Path of a finished file in the staging folder, or None if that step has not finished."""
        p = self.staging(generation) / name
        return p if p.is_file() else None

    def save_array(self, generation: int, name: str, array: np.ndarray) -> Path:
        """Write ``array`` as ``<name>.npy`` into the staging folder, atomically."""
        target = self.begin(generation) / f"{name}.npy"
        tmp = tmp_name(target)
        with open(tmp, "wb") as fh:
            np.lib.format.write_array(fh, np.asarray(array), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return target

    def open_array(self, generation: int, name: str, shape: tuple[int, ...], dtype: Any) -> np.memmap:
        """A writable memory-mapped ``<name>.npy`` to fill in chunks; call :meth:`close_array` after."""
        target = self.begin(generation) / f"{name}.npy"
        return np.lib.format.open_memmap(tmp_name(target), mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))

    def close_array(self, generation: int, name: str, array: np.memmap) -> Path:
        """Flush an array from :meth:`open_array` and move it into place."""
        array.flush()
        target = self.staging(generation) / f"{name}.npy"
        tmp = tmp_name(target)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        del array
        os.replace(tmp, target)
        return target

    def save_json(self, generation: int, name: str, obj: Any) -> Path:
        """Write a JSON file into the staging folder, atomically."""
        target = self.begin(generation) / name
        atomic_write_json(target, obj)
        return target

    def commit(
        self,
        generation: int,
        num_samples: int,
        sampling: dict[str, Any],
        sample_arrays: list[str] | None = None,
        ragged_arrays: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Checksum the staging folder, write its manifest and publish it as ``gen_XXX``.

        ``sample_arrays`` names the arrays that hold the synthetic set (default: every ``.npy``
        file); each must have ``num_samples`` rows, except the ragged ones: ``ragged_arrays`` maps such an
        array to its lengths array (``num_samples`` integers), and it holds the rows back to back, ``sum(lengths)``
        entries (row i is entries ``sum(lengths[:i])`` on, ``lengths[i]`` of them).
        """
        stage = self.staging(generation)
        ragged = dict(ragged_arrays or {})
        reserved = {
            "format", "generation", "num_samples", "sampling", "sample_arrays", "ragged_arrays", "arrays", "files",
            "created",
        }  # fmt: skip
        if reserved & extra.keys():
            raise ValueError(f"commit: {sorted(reserved & extra.keys())} are manifest fields, not extras")
        if not stage.is_dir():
            raise StoreError(f"{stage}: nothing staged for generation {generation}")
        for leftover in stage.glob(".*.tmp-*"):  # torn writes of a killed process: never published
            leftover.unlink()
        files: dict[str, Any] = {}
        arrays: dict[str, Any] = {}
        for p in sorted(stage.iterdir()):
            if p.name.startswith(".") or p.name == MANIFEST or not p.is_file():
                continue
            files[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            if p.suffix == ".npy":
                shape, dtype = _npy_header(p)
                arrays[p.stem] = {"file": p.name, "shape": list(shape), "dtype": dtype.str}
        names = list(arrays) if sample_arrays is None else sample_arrays
        for name in [*names, *ragged.values()]:
            if name not in arrays:
                raise StoreError(f"{stage / (name + '.npy')}: sample array missing from generation {generation}")
            if name not in ragged and arrays[name]["shape"][:1] != [num_samples]:
                raise StoreError(
                    f"{stage / arrays[name]['file']}: has {arrays[name]['shape'][:1]} rows, expected {num_samples}"
                )
        for name, by in ragged.items():
            lengths = np.load(stage / arrays[by]["file"], mmap_mode="r", allow_pickle=False)
            if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
                raise StoreError(f"{stage / arrays[by]['file']}: the lengths of {name!r} must be integers (n,)")
            total = int(np.asarray(lengths, dtype=np.int64).sum())
            if arrays[name]["shape"][:1] != [total]:
                raise StoreError(
                    f"{stage / arrays[name]['file']}: has {arrays[name]['shape'][:1]} entries, but its lengths "
                    f"({arrays[by]['file']}) sum to {total}"
                )
        manifest = {
            "format": FORMAT,
            "generation": generation,
            "num_samples": int(num_samples),
            "sampling": sampling,
            "sample_arrays": names,
            "ragged_arrays": ragged,
            "arrays": arrays,
            "files": files,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        atomic_write_json(stage / MANIFEST, manifest)
        final = self.path(generation)
        if final.exists():
            # Only an earlier crash between rename and nothing else could leave this; never merge.
            raise StoreError(f"{final} already exists; refusing to overwrite a finished generation")
        os.replace(stage, final)
        fsync_dir(self.root)
        return manifest

    def discard(self, generation: int) -> None:
        """Remove the staging folder of ``generation`` (not a finished one)."""
        shutil.rmtree(self.staging(generation), ignore_errors=True)

    # ---- reading -------------------------------------------------------------------------------
    def manifest(self, generation: int) -> dict[str, Any]:
        path = self.path(generation) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise StoreError(f"{path}: missing; generation {generation} was never finished") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}: not valid JSON ({exc})") from None
        except OSError as exc:
            raise StoreError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not _well_formed_files(manifest):
            raise StoreError(f"{path}: not a {FORMAT} manifest")
        if isinstance(manifest.get("num_samples"), bool) or not isinstance(manifest.get("num_samples", 0), int):
            raise StoreError(f"{path}: not a {FORMAT} manifest (num_samples {manifest.get('num_samples')!r})")
        return manifest

    def verify(self, generation: int, checksums: bool = True, hashed: Iterable[str] | None = None) -> dict[str, Any]:
        """Check every file of a generation against its manifest (size, and sha256 with ``checksums``: of every file,
        or of those named in ``hashed``); raise :class:`StoreError` naming the first bad one."""
        manifest = self.manifest(generation)
        gdir = self.path(generation)
        only = None if hashed is None else set(hashed)
        for name, info in manifest["files"].items():
            p = gdir / name
            if not p.is_file():
                raise StoreError(f"{p}: missing (listed in {gdir / MANIFEST})")
            st = p.stat()
            if st.st_size != info["bytes"]:
                raise StoreError(f"{p}: {st.st_size} bytes, manifest says {info['bytes']} (truncated or rewritten)")
            key = (str(p), st.st_size, st.st_mtime_ns)
            if checksums and (only is None or name in only) and key not in self._verified:
                try:
                    digest = sha256_file(p)
                except OSError as exc:
                    raise StoreError(f"{p}: cannot be read ({exc.strerror or exc})") from None
                if digest != info["sha256"]:
                    raise StoreError(f"{p}: sha256 mismatch; the file is corrupt")
                self._verified.add(key)
        return manifest

    def load(self, generation: int, verify: bool = True) -> Generation:
        """Open a finished generation; its arrays are read-only memory maps.

        Every file's size is checked; with ``verify``, the arrays' files are also checked against their sha256
        (what is read is checked). The other files (the model, the texts of a story set: gigabytes a training
        set never reads) are hashed by :meth:`verify`, which the loop runs on each finished generation when
        it resumes, and where they are read (the previous model, for a warm start).
        """
        manifest = self.manifest(generation)
        files = [info["file"] for info in manifest.get("arrays", {}).values()]
        manifest = self.verify(generation, checksums=verify, hashed=files)
        gdir = self.path(generation)
        arrays = {}
        for name, info in manifest.get("arrays", {}).items():
            p = gdir / info["file"]
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise StoreError(f"{p}: cannot be read as .npy ({exc})") from None
            if list(arr.shape) != info["shape"] or arr.dtype.str != info["dtype"]:
                raise StoreError(f"{p}: shape {arr.shape} {arr.dtype} does not match the manifest")
            arrays[name] = arr
        return Generation(generation, gdir, manifest, arrays)

    def samples(self, generation: int, name: str = "samples") -> np.ndarray:
        """The synthetic array ``name`` of a finished generation (memory-mapped)."""
        gen = self.load(generation)
        if name not in gen.arrays:
            raise StoreError(f"{gen.path / (name + '.npy')}: no such array in generation {generation}")
        return gen.arrays[name]


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
    except (ValueError, OSError) as exc:
        raise StoreError(f"{path}: not a valid .npy file ({exc})") from None
    return tuple(shape), dtype
