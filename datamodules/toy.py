"""A tiny in-memory modality: points from a fixed 2-D Gaussian.

It is the smallest real data module that follows the contract of :mod:`datamodules.synthetic`
and the reference for the larger modalities: a seeded real set with train/val/test splits, a
``num_real`` cap, and :meth:`GaussianPointsDataModule.synthetic_dataset` turning stored samples
(``{"samples": (n, 2) float32}``) into items shaped like real ones (float32 tensors of shape ``(2,)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

TRUE_MEAN = (1.0, -2.0)
"""Mean of the real distribution."""
TRUE_COV = ((2.0, 0.6), (0.6, 0.5))
"""Covariance of the real distribution (positive definite)."""


class PointsDataset(Dataset):
    """Rows of an ``(N, D)`` array as float32 tensors of shape ``(D,)``.

    The array may be a read-only memory map: rows are read on access, one or a batch at a time.
    """

    def __init__(self, points: np.ndarray):
        if points.ndim != 2:
            raise ValueError(f"points must have shape (N, D), got {points.shape}")
        self.points = points

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.points[index], dtype=np.float32))  # (D,), a copy

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        rows = np.asarray(self.points[np.asarray(indices, dtype=np.int64)], dtype=np.float32)  # (B, D)
        return list(torch.from_numpy(rows).unbind(0))


def gaussian_points(n: int, rng: np.random.Generator, mean=TRUE_MEAN, cov=TRUE_COV) -> np.ndarray:
    """``n`` draws from N(mean, cov) as float32 of shape ``(n, D)``: x = mean + L z, L L^T = cov."""
    mean = np.asarray(mean, dtype=np.float64)  # (D,)
    chol = np.linalg.cholesky(np.asarray(cov, dtype=np.float64))  # (D, D)
    z = rng.standard_normal((n, mean.shape[0]))  # (n, D)
    return (mean + z @ chol.T).astype(np.float32)


class GaussianPointsDataModule(pl.LightningDataModule):
    """Real points from N(``mean``, ``cov``), split into independent seeded train/val/test sets.

    Each split has its own random stream spawned from ``seed``, so changing one split's size leaves
    the others unchanged. ``num_real`` caps the training set to its first ``num_real`` points.
    """

    def __init__(
        self,
        num_train: int = 4096,
        num_val: int = 512,
        num_test: int = 1024,
        num_real: int | None = None,
        seed: int = 0,
        batch_size: int = 256,
        mean: Sequence[float] = TRUE_MEAN,
        cov: Sequence[Sequence[float]] = TRUE_COV,
    ):
        super().__init__()
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_real is not None and num_real <= 0:
            raise ValueError(f"num_real must be positive, got {num_real}")
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.num_real = num_real
        self.seed = seed
        self.batch_size = batch_size
        self.mean = tuple(float(m) for m in mean)
        self.cov = tuple(tuple(float(c) for c in row) for row in cov)
        self.dim = len(self.mean)
        self._splits: dict[str, PointsDataset] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Draw the three splits (once; later calls are no-ops)."""
        if self._splits is not None:
            return
        train_ss, val_ss, test_ss = np.random.SeedSequence(self.seed).spawn(3)
        train = gaussian_points(self.num_train, np.random.default_rng(train_ss), self.mean, self.cov)
        if self.num_real is not None:
            train = train[: self.num_real]
        self._splits = {
            "train": PointsDataset(train),
            "val": PointsDataset(gaussian_points(self.num_val, np.random.default_rng(val_ss), self.mean, self.cov)),
            "test": PointsDataset(gaussian_points(self.num_test, np.random.default_rng(test_ss), self.mean, self.cov)),
        }

    def _split(self, name: str) -> PointsDataset:
        self.setup()
        assert self._splits is not None
        return self._splits[name]

    @property
    def train_dataset(self) -> PointsDataset:
        """The real training points (at most ``num_real``)."""
        return self._split("train")

    @property
    def val_dataset(self) -> PointsDataset:
        """The real validation points."""
        return self._split("val")

    @property
    def test_dataset(self) -> PointsDataset:
        """The real test points."""
        return self._split("test")

    def synthetic_dataset(self, arrays: Mapping[str, np.ndarray]) -> PointsDataset:
        """A stored synthetic set (``{"samples": (n, D)}``, memory-mapped) as a dataset of real-like items."""
        if "samples" not in arrays:
            raise ValueError(f"a synthetic set of points needs a 'samples' array, got {sorted(arrays)}")
        samples = arrays["samples"]
        if samples.ndim != 2 or samples.shape[1] != self.dim:
            raise ValueError(f"synthetic samples must have shape (n, {self.dim}), got {samples.shape}")
        return PointsDataset(samples)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=self.batch_size)


__all__ = ["TRUE_COV", "TRUE_MEAN", "GaussianPointsDataModule", "PointsDataset", "gaussian_points"]
