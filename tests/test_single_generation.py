"""Every recipe with ``--generations 1``: generation 0 alone, which draws no synthetic set, finishes and is scored.

The Lightning recipes run in-process through ``main`` at the tiny sizes of their own tests; the analytic
ones (one metrics.csv of cells, no gen_XXX folders) at a few seeds.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from collapse.cli import build_parser, parse_config
from collapse.tracking import WandbConfig
from recipes import gaussian, geom_diffusion, kde, linear_regression, mnist_vae, tinystories, toy_gaussian

# Per Lightning recipe: its module, config class and the tiny flags its own test file uses.
LIGHTNING = {
    "toy_gaussian": (
        toy_gaussian,
        toy_gaussian.ToyGaussianConfig,
        ["--data.num_train", "64", "--data.num_val", "16", "--data.num_test", "32", "--trainer.max_epochs", "2",
         "--batch_size", "32"],
    ),
    "mnist_vae": (
        mnist_vae,
        mnist_vae.MNISTVAEConfig,
        ["--data.num_real", "96", "--data.num_test", "64", "--model.channels", "[8, 16]", "--model.hidden", "32",
         "--model.latent_dim", "8", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2", "--batch_size",
         "32", "--sample_batch_size", "40", "--quality.classifier_epochs", "1"],
    ),
    "tinystories": (
        tinystories,
        tinystories.TinyStoriesConfig,
        ["--data.num_real", "48", "--data.num_test", "16", "--data.vocab_size", "320", "--data.max_seq_len", "96",
         "--model.vocab_size", "320", "--model.preset", "gpt2-tiny", "--model.warmup_steps", "2",
         "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--batch_size", "8",
         "--sample_batch_size", "20", "--sampling.batch_size", "8"],
    ),
    "geom_diffusion": (
        geom_diffusion,
        geom_diffusion.GeomDiffusionConfig,
        ["--data.num_real", "16", "--data.num_test", "4", "--model.hidden", "16", "--model.num_layers", "2",
         "--model.num_steps", "10", "--model.warmup_steps", "1", "--trainer.accelerator", "cpu",
         "--trainer.max_epochs", "1", "--batch_size", "8", "--quality.num_molecules", "2",
         "--quality.shown_molecules", "2"],
    ),
}  # fmt: skip


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


SLOW = {"tinystories", "geom_diffusion"}  # over 10 s each on 2 cores


@pytest.mark.parametrize(
    "recipe", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in LIGHTNING]
)
def test_lightning_recipe_runs_one_generation(tmp_path, recipe):
    module, config_cls, tiny = LIGHTNING[recipe]
    out = tmp_path / "run"
    args = ["--out_dir", str(out), "--workflow", "accumulate", "--generations", "1", "--wandb.mode", "disabled"]
    result = module.main(parse_config(config_cls, args + tiny))
    assert result.committed == [0] and result.fitted == [0]
    gen = out / "gen_000"
    metrics = json.loads((gen / "metrics.json").read_text())
    assert math.isfinite(metrics["test_loss"]) and metrics["train_synthetic"] == 0
    assert not any(name.startswith("sample/") for name in metrics)  # no synthetic set, nothing to score
    assert json.loads((gen / "manifest.json").read_text())["num_samples"] == 0
    rows = csv_rows(out / "metrics.csv")
    assert {r["generation"] for r in rows} == {"0"} and any(r["metric"] == "test_loss" for r in rows)


QUIET = dict(wandb=WandbConfig(mode="disabled"), report=False, log_every=1000, workers=1)


@pytest.mark.parametrize("recipe", ["gaussian", "kde", "linear_regression"])
def test_analytic_recipe_runs_one_generation(tmp_path, recipe):
    common = dict(out_dir=str(tmp_path / recipe), generations=1, num_seeds=3, **QUIET)
    if recipe == "gaussian":
        module, cfg = gaussian, gaussian.GaussianConfig(dim=2, n_samples=16, **common)
    elif recipe == "kde":
        module, cfg = kde, kde.KDEConfig(dataset="blobs", bandwidth="scott", n_samples=16, **common)
    else:
        module = linear_regression
        cfg = linear_regression.LinearRegressionConfig(dim=3, n_samples=16, noise_var=1.0, **common)
    rows = csv_rows(module.main(cfg))
    assert rows and {r["generation"] for r in rows} == {"0"}
    assert {r["seed"] for r in rows} == {"0", "1", "2"}
    assert all(math.isfinite(float(r["value"])) for r in rows if r["metric"] != "test_nll" or recipe != "gaussian")


@pytest.mark.parametrize("recipe", ["geom_diffusion", "mnist_vae"])
def test_help_quotes_the_default_epochs_the_recipe_uses(recipe):
    module, config_cls, _ = LIGHTNING[recipe]
    text = " ".join(build_parser(config_cls).format_help().split())  # one line: --help wraps where it likes
    assert "Default epochs per generation:" in text
    assert f"{module.CPU_EPOCHS} on CPU" in text and f"{module.GPU_EPOCHS} on a GPU" in text
