"""A tiny in-memory modality: points from a fixed 2-D Gaussian.

It is the smallest real data module that follows the contract of :mod:`collapse.contract`
and the reference for the larger modalities: a seeded real set with train/val/test splits, a
``num_real`` cap, and :meth:`GaussianPointsDataModule.synthetic_dataset` turning stored samples
(``{"samples": (n, 2) float32}``) into items shaped like real ones (float32 tensors of shape ``(2,)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from collapse.errors import ConfigError
from datamodules.base import RealDataModuleBase

TRUE_MEAN = (1.0, -2.0)
"""Mean of the real distribution."""
TRUE_COV = ((2.0, 0.6), (0.6, 0.5))
"""Covariance of the real distribution (positive definite)."""


TOY_SCALE_LIMIT = 1e6
"""The largest size of a mean entry and standard deviation of the real distribution (and the smallest standard
deviation's inverse): the points and the model are float32."""


@dataclass
class GaussianPointsConfig:
    """The real points of the toy modality (``--data.*``)."""

    num_train: int = 1024
    """Real training points available (the workflow uses the first ones); enough for a 2-D Gaussian's five
    parameters, and small enough that a generation fits in seconds on a CPU."""
    num_real: int | None = None
    """Cap on the real training set."""
    num_val: int = 256
    """Real validation points."""
    num_test: int = 1024
    """Real test points."""
    seed: int = 0
    """Seed of the real data (fixed across run seeds, so every run sees the same real set)."""
    mean: tuple[float, ...] = TRUE_MEAN
    """Mean of the real distribution."""
    cov: tuple[tuple[float, ...], ...] = TRUE_COV
    """Covariance of the real distribution (symmetric positive definite, D x D for a mean of length D)."""

    def __post_init__(self) -> None:
        for flag in ("num_train", "num_val", "num_test") + (("num_real",) if self.num_real is not None else ()):
            value = getattr(self, flag)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--data.{flag} must be an integer >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--data.seed must be an integer >= 0, got {self.seed!r}")
        dim = len(self.mean)
        cov = np.asarray(self.cov, dtype=np.float64)
        if dim < 1 or cov.shape != (dim, dim):
            raise ConfigError(f"--data.cov must be {dim} x {dim} for a mean of length {dim}, got shape {cov.shape}")
        variances = np.linalg.eigvalsh(cov) if np.isfinite(cov).all() else np.array([np.nan])
        if not np.allclose(cov, cov.T) or not variances.min() > 0:
            raise ConfigError(f"--data.cov must be symmetric positive definite, got {self.cov!r}")
        # The points and the model are float32, whose squares of distances overflow past about 1e19 and whose
        # variances lose every digit below about 1e-38: a scale far from 1 would train to inf or nan and exit 0.
        mean = np.asarray(self.mean, dtype=np.float64)
        if not (np.isfinite(mean).all() and np.abs(mean).max() <= TOY_SCALE_LIMIT):
            raise ConfigError(
                f"--data.mean entries must be finite, at most {TOY_SCALE_LIMIT:g} in size, got {self.mean!r}"
            )
        if variances.min() < 1 / TOY_SCALE_LIMIT**2 or variances.max() > TOY_SCALE_LIMIT**2:
            raise ConfigError(
                f"--data.cov variances (eigenvalues) must lie within {1 / TOY_SCALE_LIMIT**2:g} .. "
                f"{TOY_SCALE_LIMIT**2:g} (float32 points and model), got {variances.min():g} .. {variances.max():g}"
            )


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


class GaussianPointsDataModule(RealDataModuleBase[PointsDataset]):
    """Real points from N(``mean``, ``cov``), split into independent seeded train/val/test sets.

    Each split has its own random stream spawned from ``seed``, so changing one split's size leaves
    the others unchanged. ``num_real`` caps the training set to its first ``num_real`` points. The
    loaders and the ``*_dataset`` properties come from :class:`~datamodules.base.RealDataModuleBase`.
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
        num_workers: int = 0,
    ):
        super().__init__(batch_size, num_workers)
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_real is not None and num_real <= 0:
            raise ValueError(f"num_real must be positive, got {num_real}")
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.num_real = num_real
        self.seed = seed
        self.mean = tuple(float(m) for m in mean)
        self.cov = tuple(tuple(float(c) for c in row) for row in cov)
        self.dim = len(self.mean)

    def _load_datasets(self) -> dict[str, PointsDataset]:
        """Draw the three splits, each from its own stream of ``seed``."""
        train_ss, val_ss, test_ss = np.random.SeedSequence(self.seed).spawn(3)
        train = gaussian_points(self.num_train, np.random.default_rng(train_ss), self.mean, self.cov)
        if self.num_real is not None:
            train = train[: self.num_real]
        return {
            "train": PointsDataset(train),
            "val": PointsDataset(gaussian_points(self.num_val, np.random.default_rng(val_ss), self.mean, self.cov)),
            "test": PointsDataset(gaussian_points(self.num_test, np.random.default_rng(test_ss), self.mean, self.cov)),
        }

    def synthetic_dataset(self, arrays: Mapping[str, np.ndarray]) -> PointsDataset:
        """A stored synthetic set (``{"samples": (n, D)}``, memory-mapped) as a dataset of real-like items."""
        if "samples" not in arrays:
            raise ValueError(f"a synthetic set of points needs a 'samples' array, got {sorted(arrays)}")
        samples = arrays["samples"]
        if samples.ndim != 2 or samples.shape[1] != self.dim:
            raise ValueError(f"synthetic samples must have shape (n, {self.dim}), got {samples.shape}")
        return PointsDataset(samples)


__all__ = [
    "TRUE_COV",
    "TRUE_MEAN",
    "GaussianPointsConfig",
    "GaussianPointsDataModule",
    "PointsDataset",
    "gaussian_points",
]
