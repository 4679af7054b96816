"""Exporting a generation (recipes.export): each modality's files open in the usual tools and hold the run's samples.

One tiny run per modality (the recipes' own tiny test settings, one generation, a few samples), made once.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
import yaml

from collapse.cli import parse_config
from collapse.store import GenerationStore
from recipes.export import ExportError, build_parser, cli, export

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 12  # synthetic samples of every tiny run (one generation draws them only when asked: --num_synthetic)
COMMON = ["--generations", "1", "--num_synthetic", str(SAMPLES), "--wandb.mode", "disabled"]

TOY = ["--data.num_train", "64", "--data.num_val", "16", "--data.num_test", "32", "--trainer.max_epochs", "2",
       "--batch_size", "32"]  # fmt: skip
VAE = ["--data.num_real", "96", "--data.num_test", "64", "--model.channels", "[8, 16]", "--model.hidden", "32",
       "--model.latent_dim", "8", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--batch_size", "32",
       "--sample_batch_size", "40", "--quality.enabled", "false"]  # fmt: skip
LM = ["--data.num_real", "48", "--data.num_test", "16", "--data.vocab_size", "320", "--data.max_seq_len", "96",
      "--model.vocab_size", "320", "--model.preset", "gpt2-tiny", "--model.warmup_steps", "2",
      "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--batch_size", "8", "--sample_batch_size", "20",
      "--sampling.batch_size", "8"]  # fmt: skip
GEOM = ["--data.num_real", "16", "--data.num_test", "4", "--model.hidden", "16", "--model.num_layers", "2",
        "--model.num_steps", "10", "--model.warmup_steps", "1", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1", "--batch_size", "8", "--quality.num_molecules", "0",
        "--quality.shown_molecules", "0"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    # Token caches, featurised molecules: a per-session temporary folder, also while exporting.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODEL_COLLAPSE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


def make_run(tmp_path_factory, recipe: str, config: str, flags: list[str]) -> Path:
    import importlib

    module = importlib.import_module(f"recipes.{recipe}")
    config_cls = getattr(module, config)
    out = tmp_path_factory.mktemp(recipe) / "run"
    result = module.main(parse_config(config_cls, ["--out_dir", str(out), *COMMON, *flags]))
    assert result.committed == [0]
    return out


@pytest.fixture(scope="module")
def toy_run(cache, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory, "toy_gaussian", "ToyGaussianConfig", TOY)


@pytest.fixture(scope="module")
def vae_run(cache, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory, "mnist_vae", "MNISTVAEConfig", VAE)


@pytest.fixture(scope="module")
def lm_run(cache, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory, "tinystories", "TinyStoriesConfig", LM)


@pytest.fixture(scope="module")
def geom_run(cache, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory, "geom_diffusion", "GeomDiffusionConfig", GEOM)


def arrays(run: Path, generation: int = 0) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in GenerationStore(run).load(generation).arrays.items()}


def run_config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


# ---- TinyStories ---------------------------------------------------------------------------------------------------


@pytest.mark.slow  # one tiny TinyStories run first (about 20 s on 2 cores)
def test_stories_load_as_a_dataset_and_as_jsonl_one_per_sample(lm_run, tmp_path):
    from datasets import load_from_disk
    from tokenizers import Tokenizer

    from datamodules.tokenizer import decode

    out = tmp_path / "lm"
    summary = export(lm_run, out, 0)
    a = arrays(lm_run)
    tokenizer = Tokenizer.from_file(str(lm_run / "tokenizer.json"))
    starts = np.cumsum(a["lengths"]) - a["lengths"]  # the stories are stored back to back
    expected = [decode(tokenizer, a["tokens"][s : s + n]).strip() for s, n in zip(starts, a["lengths"])]
    assert summary["num_samples"] == SAMPLES and len(expected) == SAMPLES
    assert load_from_disk(str(out / "stories"))["text"] == expected
    lines = (out / "stories.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"text": t} for t in expected]
    assert_own_names(out, "tinystories")


def lightning_lm(run: Path):
    from datamodules.tokenizer import EOT_ID, PAD_ID
    from lit_modules.causal_lm import CausalLMConfig, CausalLMModule

    module = CausalLMModule(
        CausalLMConfig(**run_config(run)["model"]), bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID
    )
    module.load_state_dict(torch.load(run / "gen_000" / "model.pt", weights_only=True))
    return module.eval()


@pytest.mark.slow  # one tiny TinyStories run first (about 20 s on 2 cores)
def test_lm_folder_loads_with_transformers_and_gives_the_modules_logits(lm_run, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "lm"
    export(lm_run, out, 0)
    model = AutoModelForCausalLM.from_pretrained(out / "model", local_files_only=True).eval()
    batch = torch.as_tensor(arrays(lm_run)["tokens"][:160].reshape(4, 40).astype(np.int64))  # (4, 40) sampled ids
    with torch.no_grad():
        ours = lightning_lm(lm_run)(batch)  # (4, 40, V)
        theirs = model(input_ids=batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert float(ours.std()) > 0

    hf_tokenizer = AutoTokenizer.from_pretrained(out / "model", local_files_only=True)
    run_tokenizer = Tokenizer.from_file(str(lm_run / "tokenizer.json"))
    text = "Once upon a time, a little owl found a red ball in the park."
    assert hf_tokenizer(text)["input_ids"] == run_tokenizer.encode(text, add_special_tokens=False).ids
    assert (hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (0, 1)
    assert hf_tokenizer.model_max_length == 96


@pytest.mark.slow  # one tiny TinyStories run first (about 20 s on 2 cores)
def test_lm_folder_is_a_model_init_from_for_the_recipe(lm_run, tmp_path):
    from datamodules.tokenizer import EOT_ID, PAD_ID
    from lit_modules.causal_lm import CausalLMModule
    from recipes.tinystories import TinyStoriesConfig, resolve

    out = tmp_path / "lm"
    export(lm_run, out, 0)
    cfg = resolve(
        parse_config(
            TinyStoriesConfig, ["--out_dir", str(tmp_path / "next"), *LM, "--model.init_from", str(out / "model")]
        )
    )
    module = CausalLMModule(cfg.model, bos_token_id=EOT_ID, eos_token_id=EOT_ID, pad_token_id=PAD_ID).eval()
    batch = torch.as_tensor(arrays(lm_run)["tokens"][:48].reshape(2, 24).astype(np.int64))
    with torch.no_grad():
        torch.testing.assert_close(module(batch), lightning_lm(lm_run)(batch), rtol=1e-5, atol=1e-5)


# ---- conformers ----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # one tiny conformer-diffusion run first (about 10 s on 2 cores)
def test_sdf_holds_each_samples_real_graph_at_its_generated_coordinates(geom_run, tmp_path):
    from rdkit import Chem

    from datamodules.geom import GeomDataConfig, GeomDataModule
    from datamodules.mol_graph import BOND_CODES

    out = tmp_path / "geom"
    export(geom_run, out, 0)
    mols = list(Chem.SDMolSupplier(str(out / "molecules.sdf"), removeHs=False))
    a = arrays(geom_run)
    assert len(mols) == SAMPLES and all(m is not None for m in mols)
    real = GeomDataModule(GeomDataConfig(**run_config(geom_run)["data"]))
    real.prepare_data()
    hydrogens = 0
    for i, mol in enumerate(mols):
        graph = real.train_dataset[int(a["mol_id"][i])]
        n = int(a["num_atoms"][i])
        assert mol.GetNumAtoms() == graph.num_atoms == n
        z = [atom.GetAtomicNum() for atom in mol.GetAtoms()]
        assert z == graph.z.tolist()
        hydrogens += z.count(1)
        bonds = {
            (
                min(b.GetBeginAtomIdx(), b.GetEndAtomIdx()),
                max(b.GetBeginAtomIdx(), b.GetEndAtomIdx()),
                BOND_CODES[str(b.GetBondType())],
            )
            for b in mol.GetBonds()
        }
        edges = graph.edge_index.T.tolist()
        real_bonds = {(s, d, int(t)) for (s, d), t in zip(edges, graph.bond_type.tolist()) if s < d}
        assert bonds == real_bonds
        start = int(a["num_atoms"][:i].sum())  # the molecules' coordinates are stored back to back
        np.testing.assert_allclose(mol.GetConformer().GetPositions(), a["pos"][start : start + n], atol=1e-4)
        assert mol.GetIntProp("mol_id") == int(a["mol_id"][i]) and mol.GetProp("smiles") == graph.smiles
    assert hydrogens > 0
    assert_own_names(out, "geom_diffusion")


# ---- digits and points ---------------------------------------------------------------------------------------------


def test_digits_are_one_png_each_and_one_npz(vae_run, tmp_path):
    from PIL import Image

    out = tmp_path / "vae"
    export(vae_run, out, 0)
    images = arrays(vae_run)["images"]
    pngs = sorted((out / "digits").glob("*.png"))
    assert len(pngs) == len(images) == SAMPLES
    for png, image in zip(pngs, images):
        with Image.open(png) as im:
            assert im.mode == "L" and im.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(im), image)
    with np.load(out / "digits.npz") as npz:
        np.testing.assert_array_equal(npz["images"], images)
    assert (out / "model.pt").read_bytes() == (vae_run / "gen_000" / "model.pt").read_bytes()
    assert_own_names(out, "mnist_vae")


def assert_own_names(out: Path, recipe: str) -> None:
    """The export holds exactly the names --overwrite may delete (export_names), and its record lists them all."""
    from recipes.export import export_names

    names = export_names(recipe)
    assert {p.name: p.is_dir() for p in out.iterdir()} == names
    assert sorted(json.loads((out / "export.json").read_text())["files"]) == sorted(names)


def test_points_as_npy_and_csv_with_the_run_recorded(toy_run, tmp_path):
    out = tmp_path / "toy"
    export(toy_run, out, 0)
    points = arrays(toy_run)["samples"]
    np.testing.assert_array_equal(np.load(out / "samples.npy"), points)
    csv = np.loadtxt(out / "samples.csv", delimiter=",", skiprows=1, dtype=np.float64)
    np.testing.assert_array_equal(csv.astype(np.float32), points)  # 9 significant digits: exact for float32
    assert (out / "samples.csv").read_text().splitlines()[0] == "x0,x1"
    info = json.loads((out / "export.json").read_text())
    assert (info["recipe"], info["generation"], info["num_samples"]) == ("toy_gaussian", 0, SAMPLES)
    assert info["run_dir"] == str(toy_run.resolve()) and info["sampling"]["num_samples"] == SAMPLES
    assert (out / "config.yaml").read_text() == (toy_run / "config.yaml").read_text()
    assert_own_names(out, "toy_gaussian")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]  # no staging folder left beside it


# ---- the command line and bad input --------------------------------------------------------------------------------


def fail(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def test_missing_unfinished_corrupt_and_unknown_runs_are_one_line(toy_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "no such run folder" in fail(capsys, [str(tmp_path / "nowhere"), "--out", out])
    assert "has no generation 7 (finished: 0)" in fail(capsys, [str(toy_run), "--generation", "7", "--out", out])
    assert "generation number" in fail(capsys, [str(toy_run), "--generation", "-1", "--out", out])

    analytic = tmp_path / "analytic"
    analytic.mkdir()
    (analytic / "config.yaml").write_text("recipe: gaussian\nout_dir: x\n")
    assert "recipe 'gaussian'" in fail(capsys, [str(analytic), "--out", out])
    (analytic / "config.yaml").write_text("out_dir: x\n")
    assert "no recipe key" in fail(capsys, [str(analytic), "--out", out])

    copy = tmp_path / "copy"
    shutil.copytree(toy_run, copy)
    (copy / ".gen_001.partial").mkdir()
    assert "generation 1 of" in fail(capsys, [str(copy), "--generation", "1", "--out", out])
    samples = copy / "gen_000" / "samples.npy"
    data = bytearray(samples.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    samples.write_bytes(bytes(data))
    assert "sha256 mismatch" in fail(capsys, [str(copy), "--generation", "0", "--out", out])
    assert not Path(out).exists() and not list(tmp_path.glob(".out.*"))
    for where in (toy_run, toy_run.parent):
        assert "is or contains the run folder" in fail(capsys, [str(toy_run), "--out", str(where)])
    inside = toy_run / "gen_000" / "export"
    assert "is inside the run folder" in fail(capsys, [str(toy_run), "--out", str(inside)])
    assert not inside.exists()
    (tmp_path / "afile").write_text("mine\n")
    under_a_file = tmp_path / "afile" / "sub"
    assert f"--out {under_a_file}: {tmp_path / 'afile'} is a file, not a folder" in fail(
        capsys, [str(toy_run), "--out", str(under_a_file)]
    )


def test_the_command_shows_progress_while_it_writes_samples(vae_run, tmp_path, caplog, monkeypatch):
    import functools

    import recipes.export as export_module
    from collapse import progress

    monkeypatch.setattr(export_module, "console", functools.partial(progress.console, interval=0))  # every update
    cli([str(vae_run), "--out", str(tmp_path / "vae")])  # pytest's handler takes the lines (no console handler)
    assert f"writing digits: 1/{SAMPLES} images" in caplog.text
    assert f"writing digits: done, {SAMPLES} images in " in caplog.text


def test_only_an_earlier_export_is_replaced_and_only_with_overwrite(toy_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for flags in ([], ["--overwrite"]):
        assert "no export.json" in fail(capsys, [str(toy_run), "--out", str(mine), *flags])
    assert (mine / "notes.txt").read_text() == "keep me"
    assert "run folder" in fail(capsys, [str(toy_run), "--out", str(toy_run.parent), "--overwrite"])
    assert (toy_run / "gen_000" / "manifest.json").is_file()

    out = tmp_path / "out"
    cli([str(toy_run), "--out", str(out)])  # the last finished generation: 0
    assert "toy_gaussian generation 0: 12 samples" in capsys.readouterr().out
    assert "--overwrite" in fail(capsys, [str(toy_run), "--out", str(out)])
    (out / "samples.csv").write_text("edited")
    cli([str(toy_run), "--out", str(out), "--overwrite"])
    expected = ["config.yaml", "export.json", "model.pt", "samples.csv", "samples.npy"]
    assert sorted(p.name for p in out.iterdir()) == expected
    assert (out / "samples.csv").read_text().startswith("x0,x1\n")  # the new export's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]  # no staging or old folder left


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("record", ["junk\n", "{}", '{"recipe": "toy_gaussian", "files": ["export.json"]}'])
def test_overwrite_never_deletes_a_folder_whose_export_json_is_no_export_record(toy_run, tmp_path, capsys, record):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "export.json").write_text(record)
    before = tree(mine)
    for flags in ([], ["--overwrite"]):
        err = fail(capsys, [str(toy_run), "--out", str(mine), *flags])
        assert "notes.txt" in err or "export.json" in err, err
    assert tree(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging or old folder left


def test_overwrite_keeps_an_earlier_export_that_the_user_added_files_to(toy_run, tmp_path, capsys):
    out = tmp_path / "out"
    export(toy_run, out, 0)
    (out / "analysis.ipynb").write_text("{}")
    (out / "figs").mkdir()
    (out / "figs" / "plot.png").write_bytes(b"png")
    before = tree(out)
    for flags in ([], ["--overwrite"]):
        err = fail(capsys, [str(toy_run), "--out", str(out), *flags])
        assert "analysis.ipynb" in err and "figs/" in err, err
    assert tree(out) == before
    (out / "analysis.ipynb").unlink()
    shutil.rmtree(out / "figs")
    cli([str(toy_run), "--out", str(out), "--overwrite"])  # the export's own files alone: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_forged_record_cannot_claim_the_users_files(toy_run, tmp_path, capsys):
    out = tmp_path / "out"
    export(toy_run, out, 0)
    record = json.loads((out / "export.json").read_text())
    record["files"] += ["notes.txt", "figs"]  # names no toy_gaussian export writes
    (out / "export.json").write_text(json.dumps(record))
    (out / "notes.txt").write_text("mine")
    (out / "figs").mkdir()
    before = tree(out)
    assert "notes.txt" in fail(capsys, [str(toy_run), "--out", str(out), "--overwrite"])
    assert tree(out) == before


def test_a_file_added_while_exporting_is_kept_and_the_old_export_stays_whole(toy_run, tmp_path, capsys, monkeypatch):
    import recipes.export as export_module

    out = tmp_path / "out"
    export(toy_run, out, 0)
    real = export_module.EXPORTERS["toy_gaussian"]

    def slow_user(source, dest):  # the user saves a notebook into --out while the export is written
        (out / "analysis.ipynb").write_text("{}")
        return real(source, dest)

    monkeypatch.setitem(export_module.EXPORTERS, "toy_gaussian", slow_user)
    before = tree(out)
    assert "analysis.ipynb" in fail(capsys, [str(toy_run), "--out", str(out), "--overwrite"])
    assert tree(out) == {**before, "analysis.ipynb": b"{}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the new export's staging folder is gone


def test_python_m_and_the_console_script(toy_run, tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["collapse-export"] == "recipes.export:cli"
    ok = subprocess.run(
        [sys.executable, "-m", "recipes.export", str(toy_run), "--generation", "0", "--out", str(tmp_path / "e")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "e" / "samples.npy").is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "recipes.export", str(toy_run), "--generation", "3", "--out", str(tmp_path / "f")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr


def test_a_generation_without_samples_exports_an_empty_set(tmp_path_factory, tmp_path):
    run = make_run(tmp_path_factory, "toy_gaussian", "ToyGaussianConfig", [*TOY, "--num_synthetic", "0"])
    export(run, tmp_path / "toy", 0)
    assert np.load(tmp_path / "toy" / "samples.npy").shape == (0, 2)
    assert (tmp_path / "toy" / "samples.csv").read_text() == "x0,x1\n"


def test_the_readme_command_is_one_the_parser_takes():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Export", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    tokens = shlex.split(block, comments=True)
    assert tokens[:3] == ["python", "-m", "recipes.export"]
    args = build_parser().parse_args(tokens[3:])
    assert (args.run_dir, args.generation, args.out, args.overwrite) == ("runs/lm_replace", 2, "exports/lm_gen2", False)


class _PieceTokenizer:
    """Decodes each id to a fixed piece of text: stories with the characters that JSON and Arrow treat specially."""

    PIECES = ["a", " ", "\n", "\u2028", '"', "\\", "é", "\U0001f600", "\x00", "\t", "}{", "<|endoftext|>"]

    def decode_batch(self, rows, skip_special_tokens=True):
        return ["".join(self.PIECES[i] for i in row) for row in rows]


class _ArraysOnly:
    def __init__(self, arrays):
        self.arrays = arrays

    def array(self, name):
        return self.arrays.get(name)


def test_story_files_are_written_a_chunk_at_a_time_and_match_text_for_text(tmp_path, caplog, monkeypatch):
    from datasets import load_from_disk

    from datamodules.story_corpus import STORIES_PER_CHUNK
    from recipes.export import iter_story_texts, write_story_files

    rng = np.random.default_rng(0)
    n = 2 * STORIES_PER_CHUNK + 5  # three chunks, the last one short
    lengths = rng.integers(1, 12, n)  # stored stories hold at least their leading token
    tokens = rng.integers(0, len(_PieceTokenizer.PIECES), int(lengths.sum())).astype(np.uint16)
    source = _ArraysOnly({"tokens": tokens, "lengths": lengths})
    chunks = list(iter_story_texts(source, _PieceTokenizer()))
    assert [len(c) for c in chunks] == [STORIES_PER_CHUNK, STORIES_PER_CHUNK, 5]
    expected = [text for chunk in chunks for text in chunk]
    assert "" in expected and any("\u2028" in t for t in expected) and any("\x00" in t for t in expected)

    from collapse import progress

    monkeypatch.setattr(progress, "_interval", 0.0)  # as --progress_every 0: a line per chunk
    caplog.set_level(logging.INFO)
    assert write_story_files(source, _PieceTokenizer(), tmp_path) == n
    # One pass: a progress line per chunk, counting every story, and the library had nothing to warn about.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoding stories: ")]
    assert [line.split(" stories (")[0] for line in lines[:3]] == [
        f"decoding stories: {k}/{n}" for k in (STORIES_PER_CHUNK, 2 * STORIES_PER_CHUNK, n)
    ], caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert load_from_disk(str(tmp_path / "stories"))["text"] == expected
    with open(tmp_path / "stories.jsonl", encoding="utf-8", newline="\n") as fh:
        assert [json.loads(line)["text"] for line in fh] == expected  # one line per story, U+2028 kept inside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stories", "stories.jsonl"]  # no scratch cache left


@pytest.mark.parametrize("error", [ExportError("tokens.npy: not a story set"), OSError(28, "No space left on device")])
def test_an_error_while_the_stories_are_decoded_comes_out_as_itself(tmp_path, error):
    # The datasets library wraps what its generator raises; the export's own errors (one `error:` line) and the
    # disk's (turned into "--out cannot be written") must not become a library traceback.
    from recipes.export import write_story_files

    class Failing(_PieceTokenizer):
        def decode_batch(self, rows, skip_special_tokens=True):
            raise error

    source = _ArraysOnly({"tokens": np.ones(12, np.uint16), "lengths": np.array([4, 4, 4])})
    with pytest.raises(type(error)) as caught:
        write_story_files(source, Failing(), tmp_path)
    assert caught.value is error
    assert not (tmp_path / ".stories-cache").exists() and not (tmp_path / "stories").exists()


def test_story_files_of_no_stories_are_an_empty_typed_set(tmp_path):
    from datasets import load_from_disk

    from recipes.export import write_story_files

    source = _ArraysOnly({})  # a generation that drew no synthetic set
    assert write_story_files(source, _PieceTokenizer(), tmp_path) == 0
    stories = load_from_disk(str(tmp_path / "stories"))
    assert len(stories) == 0 and stories.features["text"].dtype == "string"
    assert (tmp_path / "stories.jsonl").read_text() == ""
