"""The training data of one generation: the workflow's mix of real and synthetic examples.

:class:`SyntheticAccumulatingDataModule` wraps a modality's *real* data module. Its training set is
the :class:`~datamodules.workflows.TrainingSet` of the workflow at that generation: ranges of the
real training set and of the synthetic sets that earlier generations wrote to the
:class:`~collapse.store.GenerationStore`, optionally subsampled. Nothing is concatenated or
copied: synthetic rows are read lazily from the store's memory-mapped ``.npy`` files, one batch at a
time. Validation and test data are the real module's held-out *real* data only, so every
generation is scored against the true distribution.

The real module implements :class:`collapse.contract.RealDataModule` (the modality contract, one page:
``collapse/contract.py``).
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.data.distributed import DistributedSampler

from collapse.contract import RealDataModule
from collapse.seeding import derive_seed
from collapse.store import GenerationStore
from datamodules.workflows import REAL, TrainingSet, Workflow, WorkflowError


class ThenApply:
    """A loader's ``collate_fn``: ``collate`` the items, then apply ``after`` to the batch (picklable when both are,
    for worker processes started by ``spawn``)."""

    def __init__(self, collate: Callable[[list[Any]], Any], after: Callable[[Any], Any]):
        self.collate, self.after = collate, after

    def __call__(self, items: list[Any]) -> Any:
        return self.after(self.collate(items))


class WorkflowDataset(Dataset):
    """The training set of one generation as a map-style dataset over its sources.

    Item ``i`` is pool row ``subset[i]`` (or ``i`` without a subset); :meth:`TrainingSet.locate` turns
    a pool row into ``(source position, row inside that source)``, and that source's dataset is
    indexed there. ``datasets[k]`` is the dataset of ``training_set.sources[k]``.
    """

    def __init__(self, training_set: TrainingSet, datasets: Sequence[Any]):
        if len(datasets) != len(training_set.sources):
            raise ValueError(f"{len(training_set.sources)} sources but {len(datasets)} datasets")
        for (source, _, stop), ds in zip(training_set.sources, datasets):
            if len(ds) < stop:
                what = "the real training set" if source == REAL else f"synthetic set {source}"
                raise WorkflowError(f"the training set needs {stop} rows of {what}, which has only {len(ds)}")
        if training_set.subset is not None and training_set.subset.ndim != 1:
            raise ValueError("a data module trains one seed: the subset must have shape (m,)")
        self.training_set = training_set
        self.datasets = list(datasets)
        self._offsets = [int(o) for o in training_set.offsets]  # (S + 1,) start of each source in the pool
        self._starts = [start for _, start, _ in training_set.sources]
        self._subset = training_set.subset

    def __len__(self) -> int:
        return self.training_set.size

    def _pool_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a training set of {n} examples")
        index %= n
        return index if self._subset is None else int(self._subset[index])

    def locate(self, index: int) -> tuple[int, int]:
        """``(source position, row inside that source's dataset)`` of training example ``index``."""
        pool = self._pool_index(index)
        pos = bisect.bisect_right(self._offsets, pool) - 1
        return pos, pool - self._offsets[pos] + self._starts[pos]

    def __getitem__(self, index: int) -> Any:
        pos, row = self.locate(index)
        return self.datasets[pos][row]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        # Group the batch by source so that each source reads its rows in one call.
        located = [self.locate(int(i)) for i in indices]
        out: list[Any] = [None] * len(located)
        by_pos: dict[int, list[int]] = {}
        for k, (pos, _) in enumerate(located):
            by_pos.setdefault(pos, []).append(k)
        for pos, ks in by_pos.items():
            ds = self.datasets[pos]
            rows = [located[k][1] for k in ks]
            items = ds.__getitems__(rows) if hasattr(ds, "__getitems__") else [ds[r] for r in rows]
            for k, item in zip(ks, items):
                out[k] = item
        return out


class DisjointSampler(DistributedSampler):
    """Rank ``r`` of ``W`` gets examples ``r, r + W, ...`` of an evaluation set: every example once, in order.

    A ``DistributedSampler`` subclass, so Lightning keeps it instead of installing its own (which pads
    the ranks to equal length by repeating examples).
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class ShuffledShardSampler(DistributedSampler):
    """``DistributedSampler`` with the same order, rank by rank and epoch by epoch, held as a tensor, not a list.

    torch's sampler turns the whole permutation into a Python list of ints each epoch (about 0.5 GB at the
    10.6M stories of a published-size accumulate run's last generation, on every rank) and keeps the rank's
    share as ints for the epoch. Here the permutation stays an int64 tensor (8 bytes an index), the rank's
    share is a strided copy of it, and indices are handed out as Python ints a block at a time.
    """

    BLOCK = 1 << 16
    """Indices turned into Python ints at a time."""

    _resume_at: tuple[int, int] | None = None

    def resume(self, epoch: int, skip: int) -> None:
        """Make the next pass the rest of epoch ``epoch``: its order from index ``skip`` of this rank's share on (a
        fit resumed from a mid-epoch checkpoint, see :class:`ResumableLoader`). Later passes are whole."""
        self.set_epoch(epoch)
        self._resume_at = (epoch, skip)

    def _shard(self) -> torch.Tensor:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)  # as DistributedSampler: same permutation
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        while not self.drop_last and 0 < len(order) < self.total_size:  # pad with the order from its start
            order = torch.cat([order, order[: self.total_size - len(order)]])
        order = order[: self.total_size]
        if len(order) != self.total_size:
            raise AssertionError(f"{len(order)} indices, expected {self.total_size}")
        return order[self.rank : self.total_size : self.num_replicas].clone()

    def __iter__(self) -> Iterator[int]:
        shard = self._shard()
        if len(shard) != self.num_samples:
            raise AssertionError(f"{len(shard)} indices for rank {self.rank}, expected {self.num_samples}")
        resume, self._resume_at = self._resume_at, None
        first = resume[1] if resume is not None and resume[0] == self.epoch else 0
        for start in range(first, len(shard), self.BLOCK):
            yield from shard[start : start + self.BLOCK].tolist()


def batches_trained(trainer: Any) -> int:
    """Batches of the current epoch that ``trainer``'s fit has trained on (Lightning's own count, which its loader
    runs a batch ahead of; 0 outside a fit)."""
    loop = getattr(trainer, "fit_loop", None)
    return int(loop.epoch_loop.batch_progress.current.processed) if loop is not None else 0


class ResumableLoader(DataLoader):
    """The training loader, resumable mid-epoch through Lightning's stateful-loader protocol.

    A mid-epoch checkpoint (the loop writes one every ``--checkpoint_minutes``) records, with
    :meth:`state_dict`, the epoch and the batches the fit has trained on in it (``batches_done()``: Lightning's
    count, not the loader's, which runs a batch ahead); the resumed fit's loader, given that state by Lightning,
    starts at the next batch of the same order, so it trains on exactly the batches the interrupted fit had yet
    to. Without it Lightning would start the epoch's batches from the first again, and count on from where it
    stopped. The sampler must be a :class:`ShuffledShardSampler`.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume(int(state["epoch"]), int(state["batches"]) * int(self.batch_size))


class SyntheticAccumulatingDataModule(pl.LightningDataModule):
    """Generation ``generation``'s data: the workflow's real + synthetic training mix, real val/test.

    Args:
        real: the modality's real data module (see the module docstring for its contract).
        workflow: a :class:`Workflow` or its text form, e.g. ``"accumulate_subsample(size=50)"``.
        store: the run's generation store; synthetic set ``g`` is read from its finished ``gen_g``.
        generation: the generation being trained (0 trains on real data only).
        real_size: size of the real set at generation 0 (``n``); default: all of ``real.train_dataset``.
        seed: the run seed; the subsample draw and the shuffling come from ``(seed, generation)``.
        batch_size: training batch size, also used for datasets-based val/test loaders.
        num_workers: loader worker processes.
        eval_batch_size: val/test batch size; default: ``batch_size``.
        shuffle: reshuffle the training set every epoch (seeded by ``(seed, generation, epoch)``).
    """

    def __init__(
        self,
        real: RealDataModule,
        workflow: Workflow | str,
        store: GenerationStore,
        generation: int,
        real_size: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
    ):
        super().__init__()
        if generation < 0:
            raise WorkflowError(f"generation must be >= 0, got {generation}")
        if batch_size <= 0 or (eval_batch_size is not None and eval_batch_size <= 0):
            raise WorkflowError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        self.real = real
        self.workflow = Workflow.parse(workflow)
        self.store = store
        self.generation = generation
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.eval_batch_size = eval_batch_size or batch_size
        self.shuffle = shuffle
        self._real_size = real_size
        self._real_ready = False
        self._training_set: TrainingSet | None = None
        self._train_dataset: WorkflowDataset | None = None

    # ---- what the generation trains on -----------------------------------------------------------
    def _ensure_real(self) -> None:
        if not self._real_ready:
            self.real.prepare_data()
            self.real.setup("fit")
            self._real_ready = True

    @property
    def real_size(self) -> int:
        """Size of the real set at generation 0."""
        if self._real_size is None:
            self._ensure_real()
            self._real_size = len(self.real.train_dataset)
        return self._real_size

    @property
    def training_set(self) -> TrainingSet:
        """The workflow's :class:`TrainingSet` at this generation."""
        if self._training_set is None:
            self._training_set = self.workflow.training_set(self.generation, self.real_size, seed=self.seed)
        return self._training_set

    def train_composition(self) -> dict[str, int]:
        """``train_size``, ``train_real`` and ``train_synthetic``: the example counts of the training set."""
        counts = self.training_set.counts()
        real = counts.get(REAL, 0)
        size = self.training_set.size
        return {"train_size": size, "train_real": real, "train_synthetic": size - real}

    def train_batches_per_epoch(self, world_size: int = 1) -> int:
        """Training batches each of ``world_size`` processes loads per epoch: ceil(ceil(N / W) / batch_size).

        The sampler pads every rank to ceil(N / W) examples (``drop_last=False``) and the loader keeps
        the last, partial batch; the loop turns this into optimizer steps per epoch.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        per_rank = -(-self.training_set.size // world_size)
        return -(-per_rank // self.batch_size)

    # ---- Lightning hooks ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Prepare the real data (downloads, caches): delegated to the real module."""
        self.real.prepare_data()

    def setup(self, stage: str) -> None:
        """Set up the real module for ``stage``; for ``fit`` also open the training set's sources."""
        self.real.setup(stage)
        if stage == "fit":
            self._real_ready = True
        if stage == "fit" and self._train_dataset is None:
            self._train_dataset = self._build_train_dataset()

    @property
    def train_dataset(self) -> WorkflowDataset:
        """The training set (built on first use)."""
        if self._train_dataset is None:
            self._ensure_real()
            self._train_dataset = self._build_train_dataset()
        return self._train_dataset

    def _build_train_dataset(self) -> WorkflowDataset:
        ts = self.training_set
        real_train = self.real.train_dataset
        needed = max((stop for source, _, stop in ts.sources if source == REAL), default=0)
        if needed > len(real_train):
            raise WorkflowError(
                f"workflow {self.workflow.label} needs {needed} real examples at generation {self.generation}, "
                f"but the real training set has only {len(real_train)}"
            )
        synthetic: dict[int, Any] = {}
        datasets = []
        for source, _, _ in ts.sources:
            if source == REAL:
                datasets.append(real_train)
                continue
            if source not in synthetic:
                # load() verifies the generation's checksums: a corrupt file raises StoreError naming it.
                synthetic[source] = self.real.synthetic_dataset(self.store.load(source).arrays)
            datasets.append(synthetic[source])
        return WorkflowDataset(ts, datasets)

    def _sampler(self, dataset: WorkflowDataset) -> ShuffledShardSampler:
        # A DistributedSampler (torch's order, held compactly) even on one process: its permutation depends
        # only on (seed, epoch), which Lightning sets each epoch, so a fit resumed from a checkpoint sees the
        # same batches as an unbroken one; with several processes it also gives each rank its shard.
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return ShuffledShardSampler(
            dataset,
            num_replicas=replicas,
            rank=rank,
            shuffle=self.shuffle,
            seed=derive_seed(self.seed, self.generation, "shuffle"),
            drop_last=False,
        )

    def _loader(self, dataset: Any, batch_size: int, sampler: Any = None, resumable: bool = False) -> DataLoader:
        collate: Callable | None = getattr(self.real, "collate_fn", None)
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        after = module.loader_batch_fn() if hasattr(module, "loader_batch_fn") else None
        if after is not None:  # the module's host-side batch work, in the loader's workers when there are some
            collate = ThenApply(collate or default_collate, after)
        kind: Callable[..., DataLoader] = DataLoader
        if resumable:
            kind = functools.partial(ResumableLoader, batches_done=self._batches_done)
        return kind(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._to_cuda(),
        )

    def _to_cuda(self) -> bool:
        """Whether the batches go to a CUDA device: then they are collated into page-locked memory, which
        Lightning copies to the GPU asynchronously (``non_blocking``), overlapping the copy with the step."""
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        return getattr(device, "type", None) == "cuda"

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        return self._loader(dataset, self.batch_size, sampler=self._sampler(dataset), resumable=True)

    def _batches_done(self) -> int:
        return batches_trained(self.trainer)

    def _eval_loader(self, split: str) -> Any:
        self._ensure_real()
        self.real.setup({"val": "validate"}.get(split, split))  # idempotent by contract
        dataset = getattr(self.real, f"{split}_dataset", None)
        if dataset is not None:
            trainer = self.trainer
            if trainer is not None and trainer.world_size > 1:
                # Each rank scores a disjoint part, no example twice (Lightning's default sampler would
                # pad the last part with repeats and bias the mean); SamplingModule.log_mean then sums exactly.
                sampler = DisjointSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank)
                return self._loader(dataset, self.eval_batch_size, sampler=sampler)
            return self._loader(dataset, self.eval_batch_size)
        return getattr(self.real, f"{split}_dataloader")()

    def val_dataloader(self) -> Any:
        return self._eval_loader("val")

    def test_dataloader(self) -> Any:
        return self._eval_loader("test")


__all__ = [
    "DisjointSampler",
    "ResumableLoader",
    "ShuffledShardSampler",
    "SyntheticAccumulatingDataModule",
    "ThenApply",
    "WorkflowDataset",
    "batches_trained",
]
