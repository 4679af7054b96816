"""The generation store: atomic commits, manifests, verification and memory-mapped reads."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import collapse.store as store_module
from collapse.errors import UserError
from collapse.store import FORMAT, MANIFEST, GenerationStore, StoreError
from datamodules.workflows import REAL, Workflow

SAMPLING = {"temperature": 0.7, "top_p": 0.9, "seed": 3}


@pytest.fixture
def store(tmp_path: Path) -> GenerationStore:
    return GenerationStore(tmp_path / "run")


def stage(store: GenerationStore, generation: int, num_samples: int = 6) -> dict[str, np.ndarray]:
    """Write a small generation into its staging folder (samples, labels, a JSON file)."""
    rng = np.random.default_rng(generation)
    arrays = {
        "samples": rng.normal(size=(num_samples, 3)).astype(np.float32),
        "labels": rng.integers(0, 10, size=num_samples),
    }
    for name, array in arrays.items():
        store.save_array(generation, name, array)
    store.save_json(generation, "metrics.json", {"loss": 0.5 + generation})
    return arrays


def make(store: GenerationStore, generation: int, num_samples: int = 6) -> dict[str, np.ndarray]:
    arrays = stage(store, generation, num_samples)
    store.commit(generation, num_samples, dict(SAMPLING, generation=generation))
    return arrays


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_store_errors_are_user_errors():
    assert issubclass(StoreError, UserError)


# ---- writing and reading back -------------------------------------------------------------------


def test_commit_and_load_round_trip(store):
    arrays = stage(store, 0)
    manifest = store.commit(0, 6, SAMPLING, sample_arrays=["samples", "labels"], model="tiny")

    assert store.completed() == [0] and store.is_complete(0)
    assert not store.staging(0).exists()
    gdir = store.path(0)
    assert sorted(p.name for p in gdir.iterdir()) == ["labels.npy", MANIFEST, "metrics.json", "samples.npy"]

    on_disk = json.loads((gdir / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["format"] == FORMAT and manifest["generation"] == 0
    assert manifest["num_samples"] == 6
    assert manifest["sampling"] == SAMPLING
    assert manifest["sample_arrays"] == ["samples", "labels"]
    assert manifest["model"] == "tiny"
    assert set(manifest["files"]) == {"labels.npy", "metrics.json", "samples.npy"}
    for name, info in manifest["files"].items():
        data = (gdir / name).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["arrays"]["samples"] == {"file": "samples.npy", "shape": [6, 3], "dtype": "<f4"}

    gen = GenerationStore(store.root).load(0)
    assert gen.index == 0 and gen.path == gdir and gen.num_samples == 6
    assert set(gen.arrays) == set(arrays)
    for name, array in arrays.items():
        loaded = gen.arrays[name]
        assert isinstance(loaded, np.memmap)
        assert not loaded.flags.writeable
        assert loaded.dtype == array.dtype
        np.testing.assert_array_equal(loaded, array)
    with pytest.raises(ValueError):
        gen.arrays["samples"][0, 0] = 1.0
    np.testing.assert_array_equal(store.samples(0), arrays["samples"])
    assert json.loads((gdir / "metrics.json").read_text()) == {"loss": 0.5}


def test_default_sample_arrays_are_every_array(store):
    make(store, 0)
    assert sorted(store.manifest(0)["sample_arrays"]) == ["labels", "samples"]


def test_many_generations(store):
    made = {g: make(store, g, num_samples=4 + g) for g in range(4)}
    assert store.completed() == [0, 1, 2, 3]
    for g, arrays in made.items():
        gen = store.load(g)
        assert gen.num_samples == 4 + g
        assert gen.manifest["sampling"]["generation"] == g
        np.testing.assert_array_equal(gen.arrays["labels"], arrays["labels"])


def test_samples_names_a_missing_array(store):
    make(store, 0)
    with pytest.raises(StoreError, match="images.npy: no such array in generation 0"):
        store.samples(0, "images")


def test_open_array_writes_in_chunks(store):
    rows, chunk = 1000, 128
    out = store.open_array(2, "samples", (rows, 4), np.float32)
    assert store.staged(2, "samples.npy") is None, "a half-written array is not a finished step"
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        out[start:stop] = np.arange(start * 4, stop * 4, dtype=np.float32).reshape(-1, 4)
    path = store.close_array(2, "samples", out)
    assert path == store.staged(2, "samples.npy")
    store.commit(2, rows, SAMPLING)

    gdir = store.path(2)
    assert sorted(p.name for p in gdir.iterdir()) == [MANIFEST, "samples.npy"], "no temporary file left behind"
    loaded = store.samples(2)
    assert isinstance(loaded, np.memmap) and loaded.shape == (rows, 4) and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, np.arange(rows * 4, dtype=np.float32).reshape(rows, 4))


# ---- staging, crashes, and the one-commit rule --------------------------------------------------


def test_staged_generation_is_not_complete(store):
    make(store, 0)
    stage(store, 1)
    assert store.staging(1).is_dir()
    assert store.completed() == [0]
    assert not store.is_complete(1)
    with pytest.raises(StoreError, match="gen_001.*manifest.json: missing; generation 1 was never finished"):
        store.load(1)


def test_crash_before_commit_is_resumed(store):
    make(store, 0)
    arrays = stage(store, 1)
    # A write killed half-way leaves only its temporary file behind.
    (store.staging(1) / ".model.ckpt.tmp-12345").write_bytes(b"partial")

    restarted = GenerationStore(store.root)
    assert restarted.completed() == [0]
    assert restarted.begin(1) == store.staging(1)
    assert restarted.staged(1, "samples.npy") == store.staging(1) / "samples.npy"
    assert restarted.staged(1, "model.ckpt") is None
    np.testing.assert_array_equal(np.load(restarted.staged(1, "labels.npy")), arrays["labels"])

    manifest = restarted.commit(1, 6, SAMPLING)
    assert set(manifest["files"]) == {"labels.npy", "metrics.json", "samples.npy"}
    assert restarted.completed() == [0, 1]
    np.testing.assert_array_equal(restarted.load(1).arrays["samples"], arrays["samples"])


def test_crash_inside_commit_leaves_no_generation(store, monkeypatch):
    arrays = stage(store, 0)
    real_replace = os.replace

    def killed_at_publish(src, dst):
        if Path(src) == store.staging(0):
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_publish)
    with pytest.raises(OSError, match="killed"):
        store.commit(0, 6, SAMPLING)
    monkeypatch.undo()

    assert (store.staging(0) / MANIFEST).is_file(), "the manifest was written inside the staging folder"
    assert store.completed() == [] and not store.is_complete(0)
    store.commit(0, 6, SAMPLING)
    assert store.completed() == [0]
    np.testing.assert_array_equal(store.load(0).arrays["samples"], arrays["samples"])


def test_discard_drops_the_staging_folder(store):
    stage(store, 0)
    store.discard(0)
    assert not store.staging(0).exists() and store.completed() == []
    with pytest.raises(StoreError, match="nothing staged for generation 0"):
        store.commit(0, 6, SAMPLING)


def test_a_generation_is_committed_once(store):
    make(store, 0)
    before = {p.name: p.read_bytes() for p in store.path(0).iterdir()}
    with pytest.raises(StoreError, match="nothing staged for generation 0"):
        store.commit(0, 6, SAMPLING)
    with pytest.raises(StoreError, match="gen_000 is already complete"):
        store.begin(0)
    with pytest.raises(StoreError, match="already complete"):
        store.save_array(0, "samples", np.zeros((6, 3)))
    with pytest.raises(StoreError, match="already complete"):
        store.save_json(0, "metrics.json", {})
    # Even a staging folder made behind the store's back never overwrites the finished generation.
    store.staging(0).mkdir()
    np.save(store.staging(0) / "samples.npy", np.zeros((6, 3)))
    with pytest.raises(StoreError, match="gen_000 already exists; refusing to overwrite"):
        store.commit(0, 6, SAMPLING)
    assert {p.name: p.read_bytes() for p in store.path(0).iterdir()} == before
    store.load(0)


def test_sample_arrays_with_the_wrong_number_of_rows_are_refused(store):
    store.save_array(0, "samples", np.zeros((6, 3)))
    store.save_array(0, "labels", np.zeros(5))
    with pytest.raises(StoreError, match=r"labels\.npy: has \[5\] rows, expected 6"):
        store.commit(0, 6, SAMPLING)
    assert store.completed() == [] and store.staging(0).is_dir()
    with pytest.raises(StoreError, match=r"samples\.npy: has \[6\] rows, expected 5"):
        store.commit(0, 5, SAMPLING, sample_arrays=["samples"])
    # Arrays that are not samples may have any shape.
    store.commit(0, 6, SAMPLING, sample_arrays=["samples"])
    assert store.load(0).arrays["labels"].shape == (5,)


def test_missing_sample_arrays_are_refused(store):
    store.save_array(0, "samples", np.zeros((6, 3)))
    with pytest.raises(StoreError, match=r"images\.npy: sample array missing from generation 0"):
        store.commit(0, 6, SAMPLING, sample_arrays=["samples", "images"])


def test_a_zero_dimensional_array_keeps_its_shape(store):
    store.save_array(0, "scale", np.float64(2.0))
    store.commit(0, 1, SAMPLING, sample_arrays=[])
    assert store.load(0).arrays["scale"].shape == ()


def test_a_broken_npy_is_refused_at_commit(store):
    store.begin(0)
    (store.staging(0) / "samples.npy").write_bytes(b"not an array")
    with pytest.raises(StoreError, match=r"samples\.npy: not a valid \.npy file"):
        store.commit(0, 6, SAMPLING)


# ---- damaged generations are named ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["samples.npy", "labels.npy", "metrics.json"])
@pytest.mark.parametrize("offset", [-1, 10])
def test_a_corrupt_file_is_named(store, name, offset):
    make(store, 0)
    path = store.path(0) / name
    flip_byte(path, offset)
    if name.endswith(".npy"):  # load() hashes the arrays it opens
        with pytest.raises(StoreError, match=re.escape(str(path)) + ": sha256 mismatch"):
            GenerationStore(store.root).load(0)
    else:  # and only checks the size of the other files, which verify() hashes too
        assert GenerationStore(store.root).load(0).arrays
    with pytest.raises(StoreError, match=re.escape(str(path)) + ": sha256 mismatch"):
        GenerationStore(store.root).verify(0)


def test_load_hashes_only_the_arrays_it_opens_and_checks_every_size(store, monkeypatch):
    make(store, 0)
    hashed = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    GenerationStore(store.root).load(0)
    assert sorted(hashed) == ["labels.npy", "samples.npy"]
    with open(store.path(0) / "metrics.json", "a") as fh:
        fh.write(" ")  # another size: named without hashing
    with pytest.raises(StoreError, match=r"metrics\.json: \d+ bytes, manifest says"):
        GenerationStore(store.root).load(0)


def test_a_file_rewritten_after_verification_is_checked_again(store):
    make(store, 0)
    store.load(0)
    path = store.path(0) / "samples.npy"
    mtime = path.stat().st_mtime_ns
    flip_byte(path)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.load(0)


def test_a_corrupt_header_is_named_even_without_checksums(store):
    make(store, 0)
    path = store.path(0) / "samples.npy"
    data = bytearray(path.read_bytes())
    data[:6] = b"NOTNPY"
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=re.escape(str(path)) + ": cannot be read as .npy"):
        GenerationStore(store.root).load(0, verify=False)


@pytest.mark.parametrize("verify", [True, False])
def test_a_truncated_file_is_named(store, verify):
    make(store, 0)
    path = store.path(0) / "samples.npy"
    size = path.stat().st_size
    with open(path, "rb+") as fh:
        fh.truncate(size - 8)
    with pytest.raises(
        StoreError, match=re.escape(str(path)) + f": {size - 8} bytes, manifest says {size} \\(truncated"
    ):
        GenerationStore(store.root).load(0, verify=verify)


def test_a_missing_file_is_named(store):
    make(store, 0)
    path = store.path(0) / "labels.npy"
    path.unlink()
    with pytest.raises(StoreError, match=re.escape(str(path)) + f": missing \\(listed in .*{MANIFEST}\\)"):
        store.load(0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", f"not a {FORMAT} manifest"),
        ('{"format": "something-else/9", "files": {}}', f"not a {FORMAT} manifest"),
        ('{"format": "collapse-store/1"}', f"not a {FORMAT} manifest"),
    ],
)
def test_a_malformed_manifest_is_named(store, text, message):
    make(store, 0)
    path = store.path(0) / MANIFEST
    path.write_text(text)
    with pytest.raises(StoreError, match=re.escape(str(path)) + f": {message}"):
        store.load(0)


def test_binary_garbage_manifest_is_named(store):
    make(store, 0)
    path = store.path(0) / MANIFEST
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(StoreError, match=re.escape(str(path)) + ": not valid JSON"):
        store.manifest(0)


# ---- lazy reading ---------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def test_many_generations_load_as_memory_maps(store):
    generations, rows, dim = 20, 200_000, 4  # 3.2 MB a generation, 64 MB in all
    chunk = 50_000
    for g in range(generations):
        out = store.open_array(g, "samples", (rows, dim), np.float32)
        for start in range(0, rows, chunk):
            out[start : start + chunk] = g  # every row of generation g holds g
        store.close_array(g, "samples", out)
        store.commit(g, rows, SAMPLING)
    total = generations * rows * dim * 4

    reader = GenerationStore(store.root)
    before = _rss_bytes()
    loaded = [reader.load(g).arrays["samples"] for g in range(generations)]
    after = _rss_bytes()
    assert all(isinstance(a, np.memmap) and a.shape == (rows, dim) for a in loaded)
    if before is not None and after is not None:
        assert after - before < total // 4, f"loading grew resident memory by {(after - before) >> 20} MiB"

    # Gather a few rows of the accumulate pool across all generations without touching the rest.
    ts = Workflow.parse("accumulate_subsample(size=1000)").training_set(generations, rows, seed=0)
    pos, row = ts.locate(ts.subset)
    source = np.array([s for s, _, _ in ts.sources])[pos]
    assert source.min() == REAL and source.max() == generations - 1
    synthetic = source != REAL
    gathered = np.stack([loaded[s][r] for s, r in zip(source[synthetic], row[synthetic])])
    np.testing.assert_array_equal(gathered[:, 0], source[synthetic])


def test_a_generation_folder_without_a_manifest_is_named_before_any_work(tmp_path):
    store = GenerationStore(tmp_path)
    (tmp_path / "gen_000").mkdir()  # not made by a commit (which renames a folder holding its manifest)
    (tmp_path / "gen_000" / "model.pt").write_bytes(b"?")
    assert store.completed() == []
    with pytest.raises(StoreError, match=r"gen_000 has no manifest.json, so it is not a finished generation"):
        store.begin(0)
    assert not store.staging(0).exists()
