"""The dataset and loader side of a real data module, written once for every data source.

:class:`RealDataModuleBase` implements :class:`collapse.contract.RealDataModule` apart from the data itself:
the loader settings, the cached train/val/test datasets and the three dataloaders. A data source subclasses
it and says how its splits are built and how a stored synthetic set becomes a dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from collapse.errors import ConfigError, UserError, first_line

SPLITS = ("train", "val", "test")
"""The keys of the dict :meth:`RealDataModuleBase._load_datasets` returns."""

D = TypeVar("D", bound=Dataset)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class RealDataModuleBase(pl.LightningDataModule, Generic[D]):
    """The loader plumbing of a real data module; a subclass provides the data (see :mod:`collapse.contract`).

    A subclass provides:

    ``_load_datasets()``
        Builds the splits and returns ``{"train": dataset, "val": dataset or None, "test": dataset}`` (None:
        no validation set). :meth:`setup` calls it once and keeps the result; later calls, for any stage, do
        nothing. It may set other attributes on the way (the raw arrays, counts for the recipe).
    ``synthetic_dataset(arrays)``
        A stored synthetic set as a dataset of items like the real ones (see the contract).
    ``prepare_data()``
        Only when there is something to download or cache on one process first (Lightning's default does nothing).
    ``collate_fn``
        A class attribute: the collate function of every loader, e.g. ``staticmethod(collate_molecules)``;
        None (the default) is PyTorch's default collate.

    This class gives :meth:`setup`, the :attr:`train_dataset` / :attr:`val_dataset` / :attr:`test_dataset`
    properties (each sets the module up on first access) and the train / val / test dataloaders, so a
    subclass with :meth:`synthetic_dataset` is a :class:`collapse.contract.RealDataModule`.

    Args:
        batch_size: batch size of this module's own loaders (standalone use; the generation loop has its own).
        num_workers: worker processes of this module's own loaders.
    """

    collate_fn: Callable[[list[Any]], Any] | None = None
    """The collate function of this module's loaders; None: PyTorch's default collate."""

    def __init__(self, batch_size: int, num_workers: int = 0):
        super().__init__()
        if not (_is_int(batch_size) and batch_size > 0):
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        if not (_is_int(num_workers) and num_workers >= 0):
            raise ConfigError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._datasets: dict[str, D | None] | None = None

    def _load_datasets(self) -> Mapping[str, D | None]:
        """The splits, ``{"train": ..., "val": ... or None, "test": ...}``; a subclass implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement _load_datasets()")

    def setup(self, stage: str | None = None) -> None:
        """Build the splits with :meth:`_load_datasets` (once; later calls, for any stage, do nothing)."""
        if self._datasets is None:
            try:
                datasets = dict(self._load_datasets())
            except MemoryError as exc:  # sizes that cannot fit: a setting to change, not a crash to debug
                raise UserError(
                    f"the real data of these --data sizes does not fit in memory ({exc or 'MemoryError'}); lower them"
                ) from None
            if sorted(datasets) != sorted(SPLITS):
                raise ValueError(f"_load_datasets must return the splits {SPLITS}, got {sorted(datasets)}")
            self._datasets = datasets

    def _dataset(self, split: str) -> D | None:
        """The dataset of ``split`` (train / val / test), setting the module up first if needed."""
        self.setup()
        assert self._datasets is not None
        return self._datasets[split]

    def _required(self, split: str) -> D:
        dataset = self._dataset(split)
        if dataset is None:
            raise ValueError(f"{type(self).__name__} has no {split} set")
        return dataset

    @property
    def train_dataset(self) -> D:
        """The real training examples, in the module's seeded order (the workflow uses a prefix of them)."""
        return self._required("train")

    @property
    def val_dataset(self) -> D | None:
        """The real validation examples, or None without a validation set."""
        return self._dataset("val")

    @property
    def test_dataset(self) -> D:
        """The real test examples."""
        return self._required("test")

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the real training set (standalone use; the generation loop has its own)."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in order, or ``[]`` without a validation set (Lightning then skips validation)."""
        dataset = self.val_dataset
        return [] if dataset is None else self._loader(dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in order."""
        return self._loader(self.test_dataset, shuffle=False)


__all__ = ["SPLITS", "RealDataModuleBase", "first_line"]
