"""The contract a modality implements: its real data, its model, and what the generation loop asks of them.

A modality is one kind of data and one model of it (2-D points and a Gaussian, MNIST digits and a VAE,
stories and a causal transformer, molecules and a conformer diffusion model). The generation loop
(:func:`engine.loop.run_generations`) knows a modality only through the three types on this page:

:class:`RealDataModule`
    The real data: training examples (the workflow uses a seeded prefix of them), held-out validation
    and test data (every generation is scored on *real* data), and :meth:`~RealDataModule.synthetic_dataset`,
    which turns a stored synthetic set into examples shaped like the real ones.
    :class:`datamodules.base.RealDataModuleBase` implements the loader plumbing; a data source
    subclasses it and provides the datasets.
:class:`SamplingModule`
    The model: a LightningModule (``training_step``, ``test_step`` logging ``test_...`` metrics,
    ``configure_optimizers``) that can also draw ``n`` synthetic examples, all of their randomness from
    a generator it is given (:meth:`SamplingModule.sample`). What ``sample`` returns is stored as the
    generation's synthetic set and handed back to :meth:`RealDataModule.synthetic_dataset`.
:class:`Modality`
    Ties the two together for the loop: builds the real data module once and a fresh model per
    generation, gives the Trainer settings, and optionally checks the real data, freezes run-level
    files, derives metrics and scores each synthetic set.

The worked example is the MNIST VAE (``recipes/mnist_vae.py``): :class:`datamodules.mnist.MNISTDataModule`
(a real data module whose items are ``(1, 28, 28)`` float images and whose ``synthetic_dataset`` wraps a
stored ``{"images": uint8 (n, 28, 28)}`` set), :class:`lit_modules.vae.VAEModule` (a sampling module whose
``sample`` returns ``{"images": ...}``) and ``VAEModality`` in the recipe, which scores each synthetic set
with the MNIST sample quality of :mod:`evaluation.digits`. ``docs/modality.md`` walks through it.

This module is part of the ground floor: it imports nothing of the project.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch
from torchmetrics import Metric


@runtime_checkable
class RealDataModule(Protocol):
    """A modality's real data, as the loop and :class:`datamodules.synthetic.SyntheticAccumulatingDataModule` use it.

    ``prepare_data()`` / ``setup(stage)``
        As in Lightning. ``setup`` must be idempotent: it is called once per generation and stage.
        ``prepare_data`` runs on one process only, before any ``setup``.
    ``train_dataset``
        The real training examples, a map-style dataset (``len`` and integer indexing), available after
        ``setup("fit")``. The workflow uses its *first* ``real_needed`` examples, so any shuffling of the
        raw data and any cap on the real-set size is the module's job and must be seeded: the same
        configuration gives the same real set in every generation and every resumed run.
    ``val_dataset`` / ``test_dataset``
        Held-out real data, map-style datasets. The loop wraps them in its own loaders (its batch size and
        workers; with several processes each rank scores a disjoint part). None (no such set): the
        module's own ``val_dataloader()`` / ``test_dataloader()`` is used as it is (``[]`` skips validation).
    ``synthetic_dataset(arrays)``
        Turns a stored synthetic set (``dict`` name -> ``np.ndarray``, read-only memory maps, one row per
        sample: whatever the model's ``sample`` returned) into a map-style dataset whose items look
        exactly like real training items, so one collate function and one ``training_step`` handle both.
        It must index the arrays lazily (row by row or batch by batch), never load them whole.
    ``collate_fn``
        The collate function of the training and evaluation loaders; None: PyTorch's default collate.

    Datasets may implement ``__getitems__(indices) -> list of items`` to read a batch of rows at once
    (one fancy-indexed read from a memory map instead of ``batch_size`` small ones); the training set
    forwards each batch to its sources this way when they support it.

    Loader workers (``num_workers > 0``) started by ``fork`` (the Linux default) share the memory maps.
    Under ``spawn`` or ``forkserver`` the datasets are pickled, and pickling an ``np.memmap`` copies its
    data: a modality that needs those start methods should keep file paths and reopen them lazily.
    """

    collate_fn: Callable[[list[Any]], Any] | None

    def prepare_data(self) -> None: ...

    def setup(self, stage: str) -> None: ...

    @property
    def train_dataset(self) -> Any: ...

    @property
    def val_dataset(self) -> Any | None: ...

    @property
    def test_dataset(self) -> Any | None: ...

    def val_dataloader(self) -> Any: ...

    def test_dataloader(self) -> Any: ...

    def synthetic_dataset(self, arrays: Mapping[str, np.ndarray]) -> Any: ...


@runtime_checkable
class SamplingModel(Protocol):
    """Anything that can draw synthetic data (what :class:`callbacks.synthetic_data.SyntheticDataCallback` calls).

    ``sample(n, generator)`` returns ``n`` samples as a dict name -> array with ``n`` rows (NumPy
    arrays or tensors), drawing all its randomness from ``generator`` (on the model's device).
    """

    def sample(self, n: int, generator: torch.Generator) -> Mapping[str, Any]: ...


EXACT_MEANS = "exact_means"
"""The child module of a :class:`SamplingModule` holding its exact evaluation means
(:meth:`~SamplingModule.log_mean`), made by the first evaluation: sums, no weights."""


class _WeightedMean(Metric):
    """sum(value x weight) / sum(weight), summed across processes (:meth:`SamplingModule.log_mean`): in float64, or
    float32 on a device without float64 (Apple's MPS)."""

    full_state_update = False

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.sum_dtype = dtype
        self.add_state("total", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float | torch.Tensor) -> None:
        if self.total.dtype != self.sum_dtype:  # a Trainer moved the module to bf16 or fp16 (bf16-true ...)
            self.total, self.weight = self.total.to(self.sum_dtype), self.weight.to(self.sum_dtype)
        if isinstance(weight, torch.Tensor):
            weight = weight.to(device=self.total.device, dtype=self.sum_dtype)
        else:
            weight = float(weight)  # a host number: no copy to the device, so no wait for it
        self.total += value.to(self.sum_dtype) * weight
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


class SamplingModule(pl.LightningModule, abc.ABC):
    """A LightningModule that can draw synthetic data: the model of a modality.

    Implement Lightning's ``training_step``, ``test_step`` (log the real-data test metrics as ``test_<name>``,
    e.g. ``test_loss``: the name metrics.json, metrics.csv and W&B use; log them with :meth:`log_mean`, exact
    with several processes, where each rank tests a disjoint part of the test set) and ``configure_optimizers``,
    and :meth:`sample`.
    """

    ragged_samples: Mapping[str, str] = {}
    """Optional: sample arrays whose rows are padded, each mapped to the name of its lengths array (integers
    ``(n,)``, also returned by :meth:`sample`): row i of such an array holds ``lengths[i]`` entries, then padding.
    The store keeps it without the padding, the rows back to back (``sum(lengths)`` entries), and
    :meth:`RealDataModule.synthetic_dataset` receives it so. Example: ``{"tokens": "lengths"}`` for stories."""

    @abc.abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Mapping[str, Any]:
        """``n`` synthetic examples as a dict name -> array with ``n`` rows, every random draw from ``generator``.

        Called in eval mode under ``torch.no_grad()``, in chunks; the arrays are stored as the generation's
        synthetic set (``gen_XXX/<name>.npy``) and given back to :meth:`RealDataModule.synthetic_dataset`.
        """

    def sample_chunk(self, start: int, n: int, generator: torch.Generator) -> Mapping[str, Any]:
        """Examples ``start .. start + n - 1`` of a synthetic set drawn chunk by chunk: what the loop calls.

        Default: :meth:`sample` (``n`` examples, ``start`` unused), right for a model whose examples do not
        depend on their place in the set. A model that draws example i for a condition of its own (the conformer
        model: a conformation of training graph i mod N) overrides it, so that the chunks together cover every
        condition instead of each chunk starting again at the first.
        """
        return self.sample(n, generator)

    def end_sampling(self) -> None:
        """Optional: called once a sampling phase has drawn its last chunk; free what :meth:`sample` kept
        between calls (caches on the device, say). Default: nothing to free."""

    def log_mean(self, name: str, value: torch.Tensor, weight: float | torch.Tensor) -> None:
        """Log ``name`` as the exact weighted mean of the stage (an epoch of validation or test) over every process:
        sum(value x weight) / sum(weight), ``value`` the batch's mean and ``weight`` its examples (or tokens).

        Use it for the validation and test metrics. Each process tests a disjoint share of the set, and shares
        may differ by one batch; Lightning 2.6's ``self.log(..., batch_size=n, sync_dist=True)`` averages the
        per-process weights as integers, rounding them down, which inflates the mean whenever the shares differ
        (5 test points on 2 processes: 1.25x). The sums are kept in float64 torchmetrics states (float32 on
        MPS), summed across processes when the epoch ends, and reset for the next one; a NaN value makes the
        mean NaN. The weight stays a host number: adding it waits for no device.
        """
        means = self._modules.get(EXACT_MEANS)
        if means is None:
            means = self.exact_means = torch.nn.ModuleDict()  # a child module: it follows the model's device
        if name not in means:
            dtype = torch.float32 if value.device.type == "mps" else torch.float64  # MPS has no float64
            means[name] = _WeightedMean(dtype).to(value.device)
        metric = means[name]
        metric.update(value.detach(), weight)
        self.log(name, metric, on_step=False, on_epoch=True, metric_attribute=f"{EXACT_MEANS}.{name}")

    def loader_batch_fn(self) -> Callable[[Any], Any] | None:
        """Optional: a function the generation loop's data loaders apply to each collated batch (training, validation
        and test), in their worker processes when ``--num_workers`` > 0: host-side work a step would otherwise
        do in the main process while the device waits (packing, counting). It must be picklable, run on the
        CPU, and be a pure function of the batch. Asked for when the loaders are made, after the module is on
        its device. Default: None (batches reach the module as collated)."""
        return None

    def throughput_counts(self) -> Mapping[str, int]:
        """What this process has trained on so far in the current fit, by unit: ``{"tokens": 123456}``.

        Optional (default: nothing beyond the optimizer steps the loop counts itself). Progress lines show
        each as a rate (``tokens/s``) and the W&B training rows as ``trainer/<unit>_per_s``. The counts must
        be kept on the host: reading them may not wait for the device.
        """
        return {}


class Modality(abc.ABC):
    """One kind of data and model: what :func:`run_generations` needs to know about it.

    Subclass it (a dataclass works well) and implement :meth:`real_datamodule` and
    :meth:`build_model`; override the other methods where the defaults do not fit.
    """

    name: str = "model"
    """Short label of the modality in progress lines, e.g. ``toy``, ``vae``, ``lm``."""

    @abc.abstractmethod
    def real_datamodule(self) -> RealDataModule:
        """The real data module (a :class:`RealDataModule`); called once per run."""

    @abc.abstractmethod
    def build_model(self, generation: int) -> SamplingModule:
        """A freshly initialised :class:`SamplingModule` for ``generation``.

        Called after the global RNGs are seeded from ``(seed, generation)``, so random initialisation
        is reproducible.
        """

    def trainer_kwargs(self, generation: int) -> dict[str, Any]:
        """Keyword arguments for ``lightning.Trainer`` (``max_epochs``, ``accelerator``, ``callbacks``, ...).

        They override the loop's quiet defaults (no logger, progress bar or model summary;
        ``default_root_dir`` is the generation's staging folder). ``accelerator``, ``devices``,
        ``num_nodes`` and ``strategy`` must be the same for every generation: the loop starts the
        run's processes once, from generation 0's settings (:mod:`collapse.distributed`). With several
        processes, log test metrics with :meth:`SamplingModule.log_mean`: each rank tests a disjoint part of
        the real test set.
        """
        return {}

    def checkpoint_kwargs(self, generation: int) -> dict[str, Any] | None:
        """How often to write the mid-fit checkpoint (``ModelCheckpoint`` arguments); None: never."""
        return {"every_n_epochs": 1}

    def sampling_settings(self) -> dict[str, Any]:
        """Settings of ``sample`` worth recording in each manifest (temperature, steps, ...)."""
        return {}

    def check_real_data(self, real: RealDataModule, real_size: int, cfg: Any) -> None:
        """Refuse real data this modality cannot train on (raise a :class:`UserError`), before anything is written.

        Called on every process after the real data module is set up for ``fit``, with the number of
        real examples generation 0 uses and the run's config (an :class:`engine.loop.LoopConfig`). Default: accept.
        """
        return None

    def start_run(self, out_dir: Path) -> None:
        """Called once per run on global rank 0, right after the run directory is ready (config.yaml written).

        The place to freeze run-level files, such as the TinyStories tokenizer, before generation 0.
        Default: nothing.
        """
        return None

    def derived_metrics(self, tested: Mapping[str, float]) -> dict[str, float]:
        """Metrics computed from a generation's test metrics (e.g. perplexity from a mean cross-entropy).

        Called on global rank 0 with the logged test metrics; the result joins them in metrics.json.
        Default: nothing.
        """
        return {}

    def evaluate_samples(self, stage: Path, arrays: Mapping[str, np.ndarray], generation: int) -> dict[str, float]:
        """Quality metrics of a generation's synthetic set, and pictures of it.

        Called on global rank 0 after the test, with the staged sample arrays (read-only memory
        maps). Files written into ``stage`` (the generation's staging folder, e.g. ``samples.png``)
        are published with the generation; the returned metrics (name them ``sample_<name>``) join its
        test metrics in metrics.json and metrics.csv. Default: nothing.
        """
        return {}


__all__ = ["EXACT_MEANS", "Modality", "RealDataModule", "SamplingModel", "SamplingModule"]
