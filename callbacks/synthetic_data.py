"""Draw a generation's synthetic set from its trained model into the generation store.

The set is drawn in chunks of ``batch_size`` rows. Chunk ``c`` (rows ``[c * batch_size, ...)``) uses
its own ``torch.Generator`` seeded from ``(seed, c)``, so the samples depend on the model, the seed
and the chunk size only: not on how many processes draw them, nor on which process draws which
chunk. With several processes, rank ``r`` of ``W`` draws chunks ``r, r + W, ...``
(:func:`chunk_ranges`).

Each drawn chunk is written at once, atomically, as ``sample_chunks/chunk_XXXXXX.npz`` in the
generation's staging folder, so a run killed while sampling keeps the chunks it finished. When every
rank is done, global rank zero copies the chunks in order into one memory-mapped ``.npy`` per array,
writes ``sampling.json`` last (it marks the step as finished, so a resumed run skips it, and lists
the sample arrays for :meth:`GenerationStore.commit`) and removes the chunk files.

The callback samples at the end of the fit, on the fit's device(s): Lightning's teardown has moved the
module to the CPU by then, so the callback moves it to the strategy's device for the draw and back after
it. If the fit was finished by an earlier run, it samples at the start of the test instead (the module is
on its device there).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from collapse.atomic import atomic_open
from collapse.contract import SamplingModel
from collapse.distributed import Dist
from collapse.progress import Progress, progress_within
from collapse.seeding import derive_seed
from collapse.store import GenerationStore

SAMPLING_FILE = "sampling.json"
"""The staging file that marks a generation's synthetic set as written."""
CHUNK_DIR = "sample_chunks"
"""Staging subfolder of the finished chunks while the set is being drawn."""


def chunk_ranges(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int, int]]:
    """``(chunk index, start, stop)`` of the chunks that ``rank`` draws: chunks ``rank, rank + world_size, ...``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunks = range(0, -(-num_samples // batch_size))
    return [(c, c * batch_size, min(num_samples, (c + 1) * batch_size)) for c in chunks[rank::world_size]]


@contextlib.contextmanager
def on_device(module: Any, device: torch.device) -> Iterator[None]:
    """Run the block with ``module`` on ``device``, then put it back where it was (a no-op if it is there).

    Lightning's teardown moves a module to the CPU when a fit or a test ends; a draw after that must move it
    back to the run's device itself, or it runs on the CPU.
    """
    was = getattr(module, "device", device)
    if was != device:
        module.to(device)
    try:
        yield
    finally:
        if was != device:
            module.to(was)


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
        self._sample_in(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sample_in(trainer, pl_module)  # the fit was finished by an earlier run

    def _sample_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every rank acts on rank 0's view of the staging folder, so all of them draw or none does.
        if trainer.strategy.broadcast(self.is_done(), src=0):
            return
        # At on_fit_end the module is on the CPU (the fit's teardown moved it there): draw on the fit's device.
        with on_device(pl_module, trainer.strategy.root_device):
            self.sample_into_store(pl_module, trainer.global_rank, trainer.world_size, trainer.strategy.barrier)

    def chunk_generator(self, chunk: int, device: torch.device) -> torch.Generator:
        """The generator of chunk ``chunk``."""
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(self.seed, chunk, "sample-chunk"))
        return gen

    @torch.no_grad()
    def sample_into_store(
        self,
        model: Any,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], Any] | None = None,
    ) -> list[str]:
        """Draw the synthetic set (this rank's chunks) and write it into staging; return the sample array names.

        Every rank of a multi-process run calls it (``barrier`` synchronises them); rank 0 assembles
        the arrays. Does nothing (and returns the recorded names) when ``sampling.json`` is staged.
        """
        if self.is_done():
            return self.recorded_arrays()
        if not isinstance(model, SamplingModel):
            raise TypeError(f"{type(model).__name__} has no sample(n, generator) method; it cannot make synthetic data")
        dist = Dist()
        if dist.active:  # a rank that fails (out of memory, a full disk) stops the others instead of hanging them
            dist.all_ok(lambda: self._draw_in_eval(model, rank, world_size))  # every rank's chunks are on disk
            dist.on_zero(self._record)  # sampling.json is written, or rank 0's error is raised on every rank
            return self.recorded_arrays()
        self._draw_in_eval(model, rank, world_size)
        if barrier is not None:
            barrier()  # every rank's chunks are on disk
        if rank == 0:
            self._record()
        if barrier is not None:
            barrier()  # sampling.json is written
        return self.recorded_arrays()

    def _draw_in_eval(self, model: Any, rank: int, world_size: int) -> None:
        """This rank's chunks, drawn with the model in evaluation mode (its mode restored after)."""
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            self._draw(model, rank, world_size)
        finally:
            end = getattr(model, "end_sampling", None)
            if callable(end):
                end()  # free what sample() kept between chunks before the next fit needs the memory
            if was_training:
                model.train()

    def _record(self) -> None:
        """Rank 0, once every chunk is drawn: assemble the arrays, write ``sampling.json``, drop the chunks."""
        names = self._assemble()
        self.store.save_json(self.generation, SAMPLING_FILE, {**self.settings, "sample_arrays": names})
        shutil.rmtree(self._chunk_dir(), ignore_errors=True)

    def recorded_arrays(self) -> list[str]:
        """The sample array names recorded in the staged ``sampling.json``."""
        path = self.store.staged(self.generation, SAMPLING_FILE)
        if path is None:
            raise FileNotFoundError(f"{self.store.staging(self.generation) / SAMPLING_FILE}: not written yet")
        return list(json.loads(path.read_text())["sample_arrays"])

    def _chunk_dir(self):
        return self.store.staging(self.generation) / CHUNK_DIR

    def _chunk_path(self, chunk: int):
        return self._chunk_dir() / f"chunk_{chunk:06d}.npz"

    def _draw(self, model: Any, rank: int, world_size: int) -> None:
        device = getattr(model, "device", torch.device("cpu"))
        self._chunk_dir().mkdir(parents=True, exist_ok=True)
        chunks = chunk_ranges(self.num_samples, self.batch_size, rank, world_size)
        # Rank 0 reports its own share (every rank draws about as many rows); chunks of a killed run count as done.
        kept = sum(stop - start for chunk, start, stop in chunks if self._chunk_path(chunk).is_file())
        share = f" (rank 0's share of {world_size})" if world_size > 1 else ""
        where = "" if torch.device(device).type == "cpu" else f" on {device}"  # a GPU draw says so
        progress = Progress(
            sum(stop - start for _, start, stop in chunks), f"sampling gen {self.generation}{where}{share}", "samples",
            done=kept, rank=rank, heartbeat=True,
        )  # fmt: skip
        try:
            self._draw_chunks(model, chunks, device, progress)
        except BaseException:
            progress.stop()
            raise
        progress.close()

    def _draw_chunks(
        self, model: Any, chunks: list[tuple[int, int, int]], device: torch.device, progress: Progress
    ) -> None:
        for chunk, start, stop in chunks:
            path = self._chunk_path(chunk)
            if path.is_file():  # drawn before a crash, by the same model (the fit resumes exactly)
                continue
            before, size = progress.done, stop - start
            # A model that reports its finished samples inside a chunk (the story sampler does) moves the line on.
            with progress_within(lambda k, at=before, size=size: progress.update(done=at + min(k, size))):
                drawn = model.sample(size, self.chunk_generator(chunk, device))
            if not drawn:
                raise ValueError(f"{type(model).__name__}.sample() returned no arrays in chunk {chunk}")
            rows: dict[str, np.ndarray] = {}
            for name, value in drawn.items():
                arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                if arr.shape[:1] != (stop - start,):
                    raise ValueError(f"sample() returned {arr.shape[:1]} rows of {name!r}, expected {stop - start}")
                rows[name] = arr
            with atomic_open(path, "wb") as fh:
                np.savez(fh, **rows)
            progress.update(done=before + size)

    def _assemble(self) -> list[str]:
        """Copy the chunk files, in order, into one memory-mapped ``.npy`` per array."""
        outputs: dict[str, np.memmap] = {}  # name -> (num_samples, ...) filled chunk by chunk
        for chunk, start, stop in chunk_ranges(self.num_samples, self.batch_size):
            path = self._chunk_path(chunk)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: chunk {chunk} of the synthetic set was not drawn")
            with np.load(path, allow_pickle=False) as npz:
                if outputs and set(npz.files) != set(outputs):
                    raise ValueError(
                        f"sample() returned arrays {sorted(npz.files)} in chunk {chunk} but {sorted(outputs)} before; "
                        f"every chunk must return the same non-empty set of arrays"
                    )
                for name in npz.files:
                    rows = npz[name]
                    if name not in outputs:
                        shape = (self.num_samples, *rows.shape[1:])
                        outputs[name] = self.store.open_array(self.generation, name, shape, rows.dtype)
                    elif rows.shape[1:] != outputs[name].shape[1:] or rows.dtype != outputs[name].dtype:
                        raise ValueError(
                            f"sample() returned {name!r} as {rows.dtype} {rows.shape[1:]} in chunk {chunk}, "
                            f"but {outputs[name].dtype} {outputs[name].shape[1:]} before"
                        )
                    outputs[name][start:stop] = rows
        names = list(outputs)
        for name in names:
            self.store.close_array(self.generation, name, outputs.pop(name))
        return names


__all__ = ["CHUNK_DIR", "SAMPLING_FILE", "SyntheticDataCallback", "chunk_ranges", "on_device"]
