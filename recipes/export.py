"""Export one finished generation of a run in the formats other tools open.

A run keeps each generation as arrays and a LightningModule ``state_dict`` (``gen_XXX/``, see
:mod:`collapse.store`). This command writes generation G's synthetic set and model in the usual format
of the run's modality, read from ``RUN_DIR/config.yaml`` (its ``recipe`` key):

* ``tinystories``: ``stories/`` (a ``datasets`` folder, ``datasets.load_from_disk``), ``stories.jsonl``
  (one ``{"text": ...}`` per line; one story per sample, in sample order, decoded with the run's frozen
  tokenizer) and ``model/`` (``save_pretrained``: ``AutoModelForCausalLM.from_pretrained`` and
  ``AutoTokenizer.from_pretrained`` open it, and the recipe takes it as ``--model.init_from``);
* ``geom_diffusion``: ``molecules.sdf``, one molecule per sample with hydrogens: the real training graph
  the sample was drawn for (its atoms in the graph's order, its bonds) with the generated 3-D coordinates;
* ``mnist_vae``: ``digits/`` (one 28x28 8-bit grey PNG per sample) and ``digits.npz`` (``images``);
* ``toy_gaussian``: ``samples.npy`` and ``samples.csv``.

The other modalities' models stay a ``state_dict`` (``model.pt``, with the run's ``config.yaml`` beside
it). Every export also writes ``export.json``: where it came from and the generation's sampling settings.

The generation is read only after its files match the sha256 sums of its manifest. Everything is
written into a hidden folder beside ``--out`` and renamed to ``--out`` at the end, so ``--out`` holds a
whole export or nothing new. A non-empty ``--out`` is refused; ``--overwrite`` replaces an earlier export (a folder
whose ``export.json`` is an export's record and that holds nothing but the files that export wrote), never a folder
with other files: it is refused in one line naming them, and nothing in it is deleted.

    python -m recipes.export runs/lm_replace --generation 2 --out exports/lm_gen2   # or: collapse-export ...
"""

from __future__ import annotations

if __spec__ is None:  # run as `python recipes/x.py`: check this python has the project before importing it
    import _env_check  # noqa: F401  (next to this file; exits with one error line if the project is missing)

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from collapse.atomic import atomic_write_json, fsync_dir, pid_alive
from collapse.errors import UserError, path_name_error
from collapse.progress import Progress, console
from collapse.rundir import CONFIG, listed_names
from collapse.store import Generation, GenerationStore

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
"""A generation's fitted weights (the generation loop's name for them)."""
EXPORT_FILE = "export.json"
"""What an export holds and where it came from."""


class ExportError(UserError):
    """A run, generation or output folder that cannot be exported as asked; the message says why."""


@dataclass(frozen=True)
class Source:
    """One finished, verified generation of a run: what an exporter reads."""

    run_dir: Path
    recipe: str
    config: dict[str, Any]
    """The run's config.yaml (the recipe's full config, without the ``recipe`` key)."""
    generation: Generation

    def array(self, name: str) -> np.ndarray | None:
        """A sample array of the generation, or None when it drew no synthetic set."""
        arrays = self.generation.arrays
        if name in arrays:
            return arrays[name]
        if self.generation.num_samples == 0:
            return None
        raise ExportError(f"{self.generation.path / (name + '.npy')}: missing; not a {self.recipe} generation")

    def section(self, key: str) -> dict[str, Any]:
        """A nested part of the run's config (``data``, ``model``), as a dict."""
        value = self.config.get(key)
        if not isinstance(value, dict):
            raise ExportError(f"{self.run_dir / CONFIG}: no {key!r} settings; not a {self.recipe} run")
        return value


def settings(cls: type, source: Source, key: str) -> Any:
    """The config dataclass ``cls`` built from the run's ``key`` settings (its checks run again)."""
    path = source.run_dir / CONFIG
    try:
        return cls(**source.section(key))
    except TypeError as exc:
        raise ExportError(f"{path}: {key} settings this version cannot read ({exc})") from None
    except UserError as exc:  # a setting that no longer holds, e.g. an init_from folder that is gone
        raise ExportError(f"{path}: {exc}") from None


# ---- the modalities ----------------------------------------------------------------------------------------------


def iter_story_texts(source: Source, tokenizer: Any) -> Iterator[list[str]]:
    """Every sampled story as text, in sample order, a chunk of stories at a time (see :func:`story_texts`)."""
    from datamodules.story_corpus import STORIES_PER_CHUNK
    from datamodules.tinystories import StoredStories
    from datamodules.tokenizer import decode_rows

    tokens, lengths = source.array("tokens"), source.array("lengths")
    if tokens is None or lengths is None:
        return
    stories = StoredStories(tokens, lengths)  # padded rows, or back to back as the store keeps them
    for start in range(0, len(stories), STORIES_PER_CHUNK):
        rows = stories.rows(start, min(start + STORIES_PER_CHUNK, len(stories)))
        yield [text.strip() for text in decode_rows(tokenizer, rows)]


def story_texts(source: Source, tokenizer: Any) -> list[str]:
    """Every sampled story as text, in sample order: its ``lengths[i]`` tokens decoded, specials skipped, stripped.

    The texts of the run's ``stories.txt``, except that a story that decodes to nothing stays (as ``""``), so
    there is one text per sample, and so does one that spells out ``<|endoftext|>`` (which ``stories.txt``
    cannot hold). The export itself never holds them all: it writes each chunk of :func:`iter_story_texts`.
    """
    return [text for chunk in iter_story_texts(source, tokenizer) for text in chunk]


def write_story_files(source: Source, tokenizer: Any, dest: Path) -> int:
    """Write ``dest/stories.jsonl`` and the ``datasets`` folder ``dest/stories``; return the number of stories.

    One pass over the stories: each decoded chunk goes to the jsonl and to the library's Arrow writer (its
    cache in a scratch folder inside ``dest``, removed at the end), with a progress line at least every
    30 s; the set is then saved in shards. Host memory stays bounded by one chunk of stories: a
    published-size set (millions of stories) is never held. An error while the stories are read or written
    comes out as itself (the library wraps what its generator raises).
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    features = datasets.Features({"text": datasets.Value("string")})  # typed even when there are no stories
    jsonl, folder, scratch = dest / "stories.jsonl", dest / "stories", dest / ".stories-cache"
    lengths = source.array("lengths")
    written = [0]

    def rows() -> Iterator[dict[str, str]]:
        with (
            open(jsonl, "w", encoding="utf-8") as fh,
            Progress(len(lengths), "decoding stories", "stories") as progress,
        ):
            for chunk in iter_story_texts(source, tokenizer):
                fh.writelines(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in chunk)
                yield from ({"text": text} for text in chunk)
                written[0] += len(chunk)
                progress.update(len(chunk))

    if lengths is None or len(lengths) == 0 or source.array("tokens") is None:  # no synthetic set: no stories
        jsonl.write_text("", encoding="utf-8")
        # One empty shard: a set saved with none cannot be opened again by load_from_disk.
        datasets.Dataset.from_dict({"text": []}, features=features).save_to_disk(folder, num_shards=1)
        return 0
    try:
        stories = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(scratch))
        if len(stories) != written[0]:  # never publish a set that differs from the jsonl
            raise ExportError(f"{jsonl}: {written[0]} stories written, {len(stories)} in the datasets folder")
        log.info("saving the datasets folder of %d stories", len(stories))  # a copy of Arrow files: seconds
        stories.save_to_disk(folder)
        del stories
    except DatasetGenerationError as exc:
        cause = exc.__cause__
        if isinstance(cause, (UserError, OSError)):  # ours, or the disk's: handled as when raised directly
            raise cause from None
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return written[0]


def run_tokenizer(source: Source) -> Any:
    """The run's frozen tokenizer (``RUN_DIR/tokenizer.json``)."""
    from tokenizers import Tokenizer

    from datamodules.tokenizer import TOKENIZER_FILE

    path = source.run_dir / TOKENIZER_FILE
    if not path.is_file():
        raise ExportError(f"{path}: missing; the stories cannot be decoded without the run's tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: cannot be read as a tokenizer ({first})") from None


def load_module(source: Source, module: Any) -> Any:
    """``module`` with the generation's fitted weights (``model.pt``, the LightningModule's ``state_dict``)."""
    import torch

    path = source.generation.path / MODEL_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    except Exception as exc:  # a foreign file or other weights: torch raises several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path}: not the weights of this run's model ({first})") from None
    return module.eval()


def lm_module(source: Source) -> Any:
    """The run's causal LM module (built as the recipe builds it) with generation G's fitted weights."""
    from datamodules.tokenizer import EOT_ID, PAD_ID
    from lit_modules.causal_lm import CausalLMConfig, CausalLMModule

    cfg = settings(CausalLMConfig, source, "model")
    module = CausalLMModule(cfg, bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID)
    return load_module(source, module)


def export_tinystories(source: Source, dest: Path) -> list[str]:
    """Stories as a ``datasets`` folder and as jsonl; the model and its tokenizer as a ``save_pretrained`` folder."""
    import datasets
    import transformers

    from datamodules.tokenizer import to_transformers

    datasets.disable_progress_bars()  # a few hundred stories take a moment; the bars would be noise
    transformers.utils.logging.disable_progress_bar()

    tokenizer = run_tokenizer(source)
    module = lm_module(source)
    vocab = module.model.config.vocab_size
    if tokenizer.get_vocab_size() != vocab:
        raise ExportError(
            f"{source.run_dir / 'tokenizer.json'}: {tokenizer.get_vocab_size()} tokens, but the model has {vocab}"
        )
    write_story_files(source, tokenizer, dest)
    wrapped = to_transformers(tokenizer)
    wrapped.model_max_length = module.max_seq_len  # the context the run trained and sampled with
    module.model.save_pretrained(dest / "model")
    wrapped.save_pretrained(dest / "model")
    return ["stories", "stories.jsonl", "model"]


def export_geom_diffusion(source: Source, dest: Path) -> list[str]:
    """The generated conformers as one SDF: each sample's real training graph, with Hs, at its generated coordinates."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    from datamodules.geom import GeomDataConfig, GeomDataModule
    from datamodules.mol_graph import conformer_rows

    mol_id, num_atoms, pos = source.array("mol_id"), source.array("num_atoms"), source.array("pos")
    row = None if pos is None or num_atoms is None else conformer_rows(pos, num_atoms)  # padded or back to back
    real = GeomDataModule(settings(GeomDataConfig, source, "data"))
    real.prepare_data()  # the run's real data, from the cache (or parsed again, the same seeded split)
    train = real.train_dataset
    extra = {name: source.array(name) for name in ("resampled", "replaced_by_real") if name in source.generation.arrays}
    writer = Chem.SDWriter(str(dest / "molecules.sdf"))
    total = 0 if mol_id is None else len(mol_id)
    try:
        progress = Progress(total, "writing molecules", "molecules")
        for i in range(total):
            index, count = int(mol_id[i]), int(num_atoms[i])
            if not 0 <= index < len(train):
                raise ExportError(f"sample {i}: mol_id {index} is not a training molecule of this run's data")
            # Built per sample, not kept: sample i is graph i mod N, so a cache would hold every training
            # molecule (gigabytes at published size) and rarely be hit.
            mol = real.rdkit_molecule("train", index)
            if mol.GetNumAtoms() != count:
                raise ExportError(
                    f"sample {i}: {count} atoms, but training molecule {index} has {mol.GetNumAtoms()}; "
                    "the run's real data is not what it was (data.* settings or data files changed)"
                )
            conformer = mol.GetConformer()
            for atom, (x, y, z) in enumerate(np.asarray(row(i), dtype=np.float64)):
                conformer.SetAtomPosition(atom, Point3D(x, y, z))
            mol.SetProp("_Name", f"gen_{source.generation.index:03d} sample {i}")
            mol.SetProp("smiles", train.molecule_smiles[int(train.molecule[index])])
            mol.SetIntProp("sample", i)
            mol.SetIntProp("mol_id", index)
            mol.SetProp("source_id", str(train.source_ids[index]))
            for name, values in extra.items():
                mol.SetIntProp(name, int(values[i]))
            writer.write(mol)
            progress.update()
        progress.close()
    finally:
        writer.close()
    return ["molecules.sdf"]


def export_mnist_vae(source: Source, dest: Path) -> list[str]:
    """One 8-bit grey PNG per digit, and all of them in one ``.npz`` (``images``; ``labels`` where the set has some)."""
    from PIL import Image

    images = source.array("images")
    images = np.zeros((0, 28, 28), dtype=np.uint8) if images is None else images
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ExportError(f"{source.generation.path / 'images.npy'}: {images.dtype} {images.shape}, not uint8 images")
    folder = dest / "digits"
    folder.mkdir()
    width = max(5, len(str(max(len(images) - 1, 0))))
    with Progress(len(images), "writing digits", "images") as progress:
        for i in range(len(images)):
            Image.fromarray(np.ascontiguousarray(images[i])).save(folder / f"{i:0{width}d}.png")
            progress.update()
    arrays = {"images": np.asarray(images)}
    if "labels" in source.generation.arrays:
        arrays["labels"] = np.asarray(source.generation.arrays["labels"])
    np.savez(dest / "digits.npz", **arrays)
    return ["digits", "digits.npz"]


def export_toy_gaussian(source: Source, dest: Path) -> list[str]:
    """The points as ``.npy`` (exact) and ``.csv`` (columns x0, x1, ...; 9 significant digits: exact for float32)."""
    points = source.array("samples")
    if points is None:  # no synthetic set: no rows, as many columns as the real points have
        points = np.zeros((0, len(source.section("data").get("mean") or [])), dtype=np.float32)
    points = np.asarray(points)
    if points.ndim != 2:
        raise ExportError(f"{source.generation.path / 'samples.npy'}: shape {points.shape}, not (n, dim) points")
    np.save(dest / "samples.npy", points, allow_pickle=False)
    header = ",".join(f"x{j}" for j in range(points.shape[1]))
    np.savetxt(dest / "samples.csv", points, fmt="%.9g", delimiter=",", header=header, comments="")
    return ["samples.npy", "samples.csv"]


EXPORTERS: dict[str, Callable[[Source, Path], list[str]]] = {
    "tinystories": export_tinystories,
    "geom_diffusion": export_geom_diffusion,
    "mnist_vae": export_mnist_vae,
    "toy_gaussian": export_toy_gaussian,
}
"""The exporter of each recipe that keeps generations (the analytic recipes keep metrics only)."""
SAVE_PRETRAINED = frozenset({"tinystories"})
"""Recipes whose exporter writes the model itself (the others get the generation's ``model.pt``)."""
OUTPUTS: dict[str, dict[str, bool]] = {
    "tinystories": {"stories": True, "stories.jsonl": False, "model": True},
    "geom_diffusion": {"molecules.sdf": False},
    "mnist_vae": {"digits": True, "digits.npz": False},
    "toy_gaussian": {"samples.npy": False, "samples.csv": False},
}
"""What each exporter writes at the top of an export: name -> whether it is a folder. ``--overwrite`` deletes
these (and ``model.pt``, ``config.yaml``, ``export.json``) and nothing else."""


def export_names(recipe: str) -> dict[str, bool]:
    """Every name at the top of an export of ``recipe`` (name -> whether it is a folder)."""
    names = dict(OUTPUTS[recipe])
    if recipe not in SAVE_PRETRAINED:
        names[MODEL_FILE] = False
    return {**names, CONFIG: False, EXPORT_FILE: False}


# ---- the run and the output folder -------------------------------------------------------------------------------


def open_generation(run_dir: str | os.PathLike, generation: int | None = None) -> Source:
    """Generation ``generation`` (default: the last finished one) of the run in ``run_dir``, checksums verified."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ExportError(f"{run}: no such run folder")
    path = run / CONFIG
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: missing; {run} is not a run folder") from None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(config, dict) or not isinstance(config.get("recipe"), str):
        raise ExportError(f"{path}: no recipe key; not a run's config")
    recipe = config.pop("recipe")
    if recipe not in EXPORTERS:
        raise ExportError(
            f"recipe {recipe!r} of {run} has no export (it keeps no generations to export); "
            f"export knows {', '.join(EXPORTERS)}"
        )
    store = GenerationStore(run)
    finished = store.completed()
    if generation is None:
        if not finished:
            raise ExportError(f"{run}: no finished generation yet")
        generation = finished[-1]
    if not store.is_complete(generation):
        have = f"finished: {', '.join(map(str, finished))}" if finished else "none is finished yet"
        if store.staging(generation).is_dir():
            raise ExportError(f"generation {generation} of {run} is not finished (it is still being made; {have})")
        raise ExportError(f"{run} has no generation {generation} ({have})")
    store.verify(generation)  # every file against its sha256: the export reads the model too, not only the arrays
    return Source(run, recipe, config, store.load(generation))


def _read_record(folder: Path) -> tuple[dict[str, bool], str]:
    """The names an earlier export in ``folder`` wrote, by its ``export.json``; or no names and why there are none.

    Only names that export's recipe writes count: a record cannot claim other files for ``--overwrite``.
    """
    path = folder / EXPORT_FILE
    if not path.is_file() or path.is_symlink():
        return {}, f"no {EXPORT_FILE}"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}, f"an {EXPORT_FILE} that is not JSON"
    files = record.get("files") if isinstance(record, dict) else None
    recipe = record.get("recipe") if isinstance(record, dict) else None
    if recipe not in EXPORTERS or not isinstance(files, list) or EXPORT_FILE not in files:
        return {}, f"an {EXPORT_FILE} that is no export's record"
    known = export_names(recipe)
    return {name: known[name] for name in files if isinstance(name, str) and name in known}, ""


def _split(folder: Path) -> tuple[list[Path], list[Path], str]:
    """The entries of ``folder``: an earlier export's own, everything else (hidden names last), and why the folder
    is no export (empty when it is one, or is empty)."""
    entries = sorted(folder.iterdir(), key=lambda p: (p.name.startswith("."), p.name))
    if not entries:
        return [], [], ""
    names, why = _read_record(folder)
    # A link is never an export's own (an export writes none), nor a file where the export wrote a folder.
    own = [p for p in entries if p.name in names and not p.is_symlink() and p.is_dir() == names[p.name]]
    return own, [p for p in entries if p not in own], why


def _refusal(out: Path, own: list[Path], other: list[Path], why: str, overwrite: bool) -> str | None:
    """Why ``out`` cannot take an export (``overwrite`` or not), or None when it can."""
    if why:
        return (
            f"--out {out} holds files ({listed_names(other)}) and {why}, so it is no export and even --overwrite "
            "deletes nothing there; choose another folder"
        )
    if other:
        return (
            f"--out {out} holds an earlier export and other files ({listed_names(other)}), so even --overwrite deletes "
            "nothing there; move them away or choose another folder"
        )
    if own and not overwrite:
        return f"--out {out} holds an earlier export; choose another folder, or pass --overwrite"
    return None


def _check_out(out: Path, run: Path, overwrite: bool) -> None:
    """Refuse an --out that is a file, is, contains or lies inside the run, or holds something other than an empty
    folder.

    ``overwrite`` lets an earlier export be replaced: a folder whose ``export.json`` is an export's record and that
    holds nothing but the files that export wrote. Any other folder is refused, with or without it.
    """
    target, source = out.resolve(), run.resolve()
    if target == source or target in source.parents:
        raise ExportError(f"--out {out} is or contains the run folder {run}; choose another folder")
    if source in target.parents:  # inside the run: its generations and --overwrite are the run's own business
        raise ExportError(f"--out {out} is inside the run folder {run}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    if not out.is_dir():
        above = next((p for p in out.parents if p.exists()), None)  # the folder it would be made in
        if above is not None and not above.is_dir():
            raise ExportError(f"--out {out}: {above} is a file, not a folder")
        return
    try:
        parts = _split(out)
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot be read ({exc.strerror or exc})") from None
    reason = _refusal(out, *parts, overwrite)
    if reason:
        raise ExportError(reason)


def export(
    run_dir: str | os.PathLike, out: str | os.PathLike, generation: int | None = None, *, overwrite: bool = False
):
    """Export generation ``generation`` (default: the last) of ``run_dir`` into the folder ``out``; return its summary.

    The summary is what ``export.json`` holds. Raises :class:`ExportError` (a :class:`UserError`) for a missing
    or unfinished generation, a corrupt store file, an unknown recipe or an --out that cannot be used.
    """
    run = Path(run_dir)
    source = open_generation(run, generation)
    _check_out(Path(out), run, overwrite)
    out = Path(out).resolve()  # a name to stage beside, also for "." or "exports/x/"
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{out.name}.export-*"):  # left by a killed export
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        stage = parent / f".{out.name}.export-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
    except OSError as exc:
        raise ExportError(f"--out {out}: cannot be written ({exc.strerror or exc})") from None
    gen = source.generation
    try:
        files = EXPORTERS[source.recipe](source, stage)
        if source.recipe not in SAVE_PRETRAINED:
            shutil.copyfile(gen.path / MODEL_FILE, stage / MODEL_FILE)
            files.append(MODEL_FILE)
        shutil.copyfile(source.run_dir / CONFIG, stage / CONFIG)
        summary = {
            "recipe": source.recipe,
            "run_dir": str(source.run_dir.resolve()),
            "generation": gen.index,
            "num_samples": gen.num_samples,
            "sampling": gen.manifest.get("sampling", {}),
            "workflow": gen.manifest.get("workflow"),
            "seed": gen.manifest.get("seed"),
            "generation_created": gen.manifest.get("created"),
            "files": [*files, CONFIG, EXPORT_FILE],
        }
        atomic_write_json(stage / EXPORT_FILE, summary)
        _publish(stage, out)
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise ExportError(f"--out {out}: cannot be written ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return summary


def _publish(stage: Path, out: Path) -> None:
    """Rename the finished ``stage`` folder to ``out``, replacing the earlier export ``out`` held, if any.

    ``out`` is checked again here (the export may have taken hours): a file that appeared in it since
    :func:`_check_out` stops the export with ``out`` untouched. Of the replaced folder only the earlier export's own
    files are deleted; anything else is left in a hidden folder beside ``out``, and named.
    """
    old = own = None
    if out.is_dir():
        reason = _refusal(out, *_split(out), overwrite=True)
        if reason:
            raise ExportError(reason)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)  # fails on a non-empty folder of that name: nothing of ours, so nothing is lost
        own, other, why = _split(old)
        reason = _refusal(out, own, other, why, overwrite=True)  # a file saved into it just before the rename
        if reason:
            os.replace(old, out)
            raise ExportError(reason)
    try:
        os.replace(stage, out)
    except OSError:
        if old is not None and not out.exists():
            os.replace(old, out)  # the earlier export back where it was
        raise
    fsync_dir(out.parent)
    if old is not None:
        for p in own:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        try:
            old.rmdir()
        except OSError:  # something saved into the earlier export while it was being replaced: kept
            left = sorted(old.iterdir(), key=lambda p: p.name)
            log.warning(
                "--overwrite: kept what appeared in --out while it was replaced (%s) in %s", listed_names(left), old
            )


# ---- command line ------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like the recipes' own command lines
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def _generation(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a generation number (0, 1, ...), got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a generation number (0, 1, ...), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m recipes.export`` (``collapse-export``)."""
    p = _Parser(
        prog="python -m recipes.export",
        description="Write one generation's synthetic set and model in the usual formats of the run's modality.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="A run folder of tinystories, geom_diffusion, mnist_vae or toy_gaussian."
    )
    p.add_argument(
        "--generation",
        type=_generation,
        default=None,
        metavar="G",
        help="Generation to export (default: the last finished).",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="Folder to write (created; must be empty or missing).")
    p.add_argument("--overwrite", action="store_true", help="Replace an earlier export in --out.")
    return p


def cli(argv: Sequence[str] | None = None) -> None:
    """Console entry point (``collapse-export``): export, or exit 2 with one ``error:`` line on bad input."""
    args = build_parser().parse_args(argv)
    try:
        with console(name="export"):  # a progress line every 30 s while a large set is written
            summary = export(args.run_dir, args.out, args.generation, overwrite=args.overwrite)
    except (UserError, OSError) as exc:
        if isinstance(exc, OSError) and (exc := path_name_error(exc)) is None:
            raise
        sys.stderr.write("error: " + "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) + "\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: nothing was exported; run the same command again\n")
        sys.exit(130)
    what = f"{summary['recipe']} generation {summary['generation']}: {summary['num_samples']} samples"
    print(f"[export] {what} -> {args.out}")


if __name__ == "__main__":
    cli()


__all__ = [
    "EXPORTERS",
    "ExportError",
    "Source",
    "cli",
    "export",
    "export_names",
    "iter_story_texts",
    "open_generation",
    "story_texts",
    "write_story_files",
]
