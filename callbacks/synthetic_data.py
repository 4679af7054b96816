"""Draw a generation's synthetic set from its trained model into the generation store.

The set is drawn in chunks of ``batch_size`` rows. Chunk ``c`` (rows ``[c * batch_size, ...)``) uses
its own ``torch.Generator`` seeded from ``(seed, c)``, so the samples depend on the model, the seed
and the chunk size only: not on how many processes draw them, nor on which process draws which
chunk. Today global rank zero draws every chunk into a memory-mapped ``.npy`` in the generation's
staging folder; a multi-GPU version assigns chunks to ranks (:func:`chunk_ranges`) and gathers the
rows without changing a single sample.

When every array is written, ``sampling.json`` is written last: it marks the step as finished (a
resumed run skips it) and lists the sample arrays for :meth:`GenerationStore.commit`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch

from datamodules.store import GenerationStore
from datamodules.synthetic import derive_seed

SAMPLING_FILE = "sampling.json"
"""The staging file that marks a generation's synthetic set as written."""


@runtime_checkable
class SamplingModel(Protocol):
    """A model that can draw synthetic data.

    ``sample(n, generator)`` returns ``n`` samples as a dict name -> array with ``n`` rows (NumPy
    arrays or tensors), drawing all its randomness from ``generator`` (on the model's device).
    """

    def sample(self, n: int, generator: torch.Generator) -> Mapping[str, Any]: ...


def chunk_ranges(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int, int]]:
    """``(chunk index, start, stop)`` of the chunks that ``rank`` draws: chunks ``rank, rank + world_size, ...``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunks = range(0, -(-num_samples // batch_size))
    return [(c, c * batch_size, min(num_samples, (c + 1) * batch_size)) for c in chunks[rank::world_size]]


class SyntheticDataCallback(pl.Callback):
    """After fit, sample ``num_samples`` rows from the model into ``store``'s staging folder of ``generation``.

    Args:
        store: the run's generation store.
        generation: the generation whose model is sampled (synthetic set ``generation``).
        num_samples: rows to draw.
        batch_size: rows per ``model.sample`` call (the chunk size; part of the seeding, see module docs).
        seed: base seed of the chunk generators.
        sampling_settings: extra settings recorded with the samples (temperature, sampler steps, ...).
    """

    def __init__(
        self,
        store: GenerationStore,
        generation: int,
        num_samples: int,
        batch_size: int,
        seed: int,
        sampling_settings: Mapping[str, Any] | None = None,
    ):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.store = store
        self.generation = generation
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.sampling_settings = dict(sampling_settings or {})

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that determines the samples besides the model: stored in the manifest."""
        return {
            **self.sampling_settings,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def is_done(self) -> bool:
        """Whether the synthetic set of this generation is already staged."""
        return self.store.staged(self.generation, SAMPLING_FILE) is not None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.sample_into_store(pl_module)

    def chunk_generator(self, chunk: int, device: torch.device) -> torch.Generator:
        """The generator of chunk ``chunk``."""
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(self.seed, chunk, "sample-chunk"))
        return gen

    @torch.no_grad()
    def sample_into_store(self, model: Any) -> list[str]:
        """Draw the synthetic set and write it into staging; return the sample array names.

        Does nothing (and returns the recorded names) when ``sampling.json`` is already staged.
        """
        if self.is_done():
            recorded = json.loads(self.store.staged(self.generation, SAMPLING_FILE).read_text())
            return list(recorded["sample_arrays"])
        if not isinstance(model, SamplingModel):
            raise TypeError(f"{type(model).__name__} has no sample(n, generator) method; it cannot make synthetic data")
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            names = self._draw(model)
        finally:
            if was_training:
                model.train()
        self.store.save_json(self.generation, SAMPLING_FILE, {**self.settings, "sample_arrays": names})
        return names

    def _draw(self, model: Any) -> list[str]:
        device = getattr(model, "device", torch.device("cpu"))
        outputs: dict[str, np.memmap] = {}  # name -> (num_samples, ...) memory map filled chunk by chunk
        for chunk, start, stop in chunk_ranges(self.num_samples, self.batch_size):
            drawn = model.sample(stop - start, self.chunk_generator(chunk, device))
            if not drawn or (outputs and set(drawn) != set(outputs)):
                raise ValueError(
                    f"{type(model).__name__}.sample() returned arrays {sorted(drawn)} in chunk {chunk}; "
                    f"every chunk must return the same non-empty set of arrays"
                )
            for name, value in drawn.items():
                rows = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                if rows.shape[:1] != (stop - start,):
                    raise ValueError(f"sample() returned {rows.shape[:1]} rows of {name!r}, expected {stop - start}")
                if name not in outputs:
                    shape = (self.num_samples, *rows.shape[1:])
                    outputs[name] = self.store.open_array(self.generation, name, shape, rows.dtype)
                outputs[name][start:stop] = rows
        names = list(outputs)
        for name in names:
            self.store.close_array(self.generation, name, outputs.pop(name))
        return names


__all__ = ["SAMPLING_FILE", "SamplingModel", "SyntheticDataCallback", "chunk_ranges"]
