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

A model may name ragged arrays (``ragged_samples``, see :class:`collapse.contract.SamplingModule`): each row
of such an array holds only its first ``lengths[i]`` entries, the rest padding. Those are kept without the
padding, in the chunk files as in the store: the rows back to back, one ``.npy`` of ``sum(lengths)``
entries (a published-size story set: under 1 GB instead of 8.7 GB of rows padded to 2,048 tokens).

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
UNPADDED_KEY = "_unpadded"
"""The entry of a chunk file that names the ragged arrays it holds without their padding."""


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
        self.ragged: dict[str, str] = {}
        """The sampled model's ragged arrays (:func:`ragged_arrays`), read when the draw starts."""

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
            # sampling.json is written, or rank 0's error is raised on every rank; the other ranks take the names
            # from rank 0 rather than read the file just written (a shared file system may not show it yet)
            return dist.on_zero(lambda: (self._record(), self.recorded_arrays())[1])
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
        ragged = {name: by for name, by in self.ragged.items() if name in names}  # none when no row was drawn
        record = {**self.settings, "sample_arrays": names, "ragged_arrays": ragged}
        self.store.save_json(self.generation, SAMPLING_FILE, record)
        self.drop_chunks()

    def drop_chunks(self) -> None:
        """Remove the staged chunks (once ``sampling.json`` is written, the arrays hold them all)."""
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

    def recorded_ragged(self) -> dict[str, str]:
        """The ragged arrays recorded in the staged ``sampling.json``: array name -> its lengths array."""
        path = self.store.staged(self.generation, SAMPLING_FILE)
        if path is None:
            raise FileNotFoundError(f"{self.store.staging(self.generation) / SAMPLING_FILE}: not written yet")
        return dict(json.loads(path.read_text()).get("ragged_arrays", {}))

    def _draw(self, model: Any, rank: int, world_size: int) -> None:
        self.ragged = ragged_arrays(model)
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
                generator = self.chunk_generator(chunk, device)
                # Examples start.. of the set (a conditional model draws for conditions start..); a model without
                # sample_chunk (no SamplingModule) draws n examples that do not depend on their place.
                drawn = (
                    model.sample_chunk(start, size, generator)
                    if hasattr(model, "sample_chunk")
                    else model.sample(size, generator)
                )
            if not drawn:
                raise ValueError(f"{type(model).__name__}.sample() returned no arrays in chunk {chunk}")
            rows: dict[str, np.ndarray] = {}
            for name, value in drawn.items():
                arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                if arr.shape[:1] != (stop - start,):
                    raise ValueError(f"sample() returned {arr.shape[:1]} rows of {name!r}, expected {stop - start}")
                rows[name] = arr
            for name, lengths in self.ragged.items():
                rows[name] = _unpadded(rows, name, lengths, chunk)
            if self.ragged:  # says which arrays the file holds unpadded (a chunk file may predate ragged arrays)
                rows[UNPADDED_KEY] = np.array(sorted(self.ragged))
            with atomic_open(path, "wb") as fh:
                np.savez(fh, **rows)
            progress.update(done=before + size)

    def _assemble(self) -> list[str]:
        """Copy the chunk files, in order, into one memory-mapped ``.npy`` per array (a ragged array: its chunks'
        entries back to back)."""
        chunks = chunk_ranges(self.num_samples, self.batch_size)
        for chunk, _, _ in chunks:
            if not self._chunk_path(chunk).is_file():
                raise FileNotFoundError(f"{self._chunk_path(chunk)}: chunk {chunk} of the synthetic set was not drawn")
        entries = dict.fromkeys(self.ragged, 0)  # a ragged array's entries: its lengths summed over the chunks
        if entries:
            for chunk, _, _ in chunks:
                with np.load(self._chunk_path(chunk), allow_pickle=False) as npz:
                    for name, lengths in self.ragged.items():
                        entries[name] += int(np.asarray(npz[lengths], dtype=np.int64).sum())
        outputs: dict[str, np.memmap] = {}  # name -> (num_samples, ...) filled chunk by chunk
        at = dict.fromkeys(self.ragged, 0)  # where a ragged array's next chunk goes
        for chunk, start, stop in chunks:
            path = self._chunk_path(chunk)
            with np.load(path, allow_pickle=False) as npz:
                names = [name for name in npz.files if name != UNPADDED_KEY]
                if outputs and set(names) != set(outputs):
                    raise ValueError(
                        f"sample() returned arrays {sorted(names)} in chunk {chunk} but {sorted(outputs)} before; "
                        f"every chunk must return the same non-empty set of arrays"
                    )
                unpadded = set(npz[UNPADDED_KEY].tolist()) if UNPADDED_KEY in npz.files else set()
                for name in names:
                    rows = npz[name]
                    if name in self.ragged and name not in unpadded:  # a chunk drawn before arrays were ragged
                        by = self.ragged[name]
                        rows = _unpadded({name: rows, by: npz[by]}, name, by, chunk)
                    if name not in outputs:
                        shape = (entries.get(name, self.num_samples), *rows.shape[1:])
                        outputs[name] = self.store.open_array(self.generation, name, shape, rows.dtype)
                    elif rows.shape[1:] != outputs[name].shape[1:] or rows.dtype != outputs[name].dtype:
                        raise ValueError(
                            f"sample() returned {name!r} as {rows.dtype} {rows.shape[1:]} in chunk {chunk}, "
                            f"but {outputs[name].dtype} {outputs[name].shape[1:]} before"
                        )
                    if name in at:
                        outputs[name][at[name] : at[name] + len(rows)] = rows
                        at[name] += len(rows)
                    else:
                        outputs[name][start:stop] = rows
        for name, end in at.items():
            if end != entries[name]:  # the lengths and the ragged rows of some chunk disagree
                raise ValueError(f"ragged {name!r}: {end} entries in the chunks, their lengths sum to {entries[name]}")
        names = list(outputs)
        for name in names:
            self.store.close_array(self.generation, name, outputs.pop(name))
        return names


def ragged_arrays(model: Any) -> dict[str, str]:
    """The model's ``ragged_samples`` (array name -> the name of its lengths array), checked; {} when it has none."""
    declared = getattr(model, "ragged_samples", None) or {}
    if not isinstance(declared, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and k != v for k, v in declared.items()
    ):
        raise TypeError(
            f"{type(model).__name__}.ragged_samples must map array names to other array names, got {declared!r}"
        )
    return dict(declared)


def _unpadded(rows: Mapping[str, np.ndarray], name: str, lengths_name: str, chunk: int) -> np.ndarray:
    """Ragged array ``name`` of a chunk without its padding: row i's first ``lengths[i]`` entries, rows back to back."""
    if name not in rows or lengths_name not in rows:
        raise ValueError(
            f"sample() declares {name!r} ragged by {lengths_name!r} but returned {sorted(rows)} in chunk {chunk}"
        )
    padded, lengths = rows[name], rows[lengths_name]
    if padded.ndim < 2 or lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise ValueError(
            f"sample() returned ragged {name!r} as {padded.shape} with {lengths_name!r} {lengths.dtype} "
            f"{lengths.shape} in chunk {chunk}; expected rows (n, L, ...) and integer lengths (n,)"
        )
    if len(lengths) and (int(lengths.min()) < 0 or int(lengths.max()) > padded.shape[1]):
        raise ValueError(
            f"sample() returned {lengths_name!r} outside 0..{padded.shape[1]} (the width of {name!r}) in chunk {chunk}"
        )
    return padded[np.arange(padded.shape[1]) < lengths[:, None]]


__all__ = ["CHUNK_DIR", "SAMPLING_FILE", "SyntheticDataCallback", "chunk_ranges", "on_device", "ragged_arrays"]
