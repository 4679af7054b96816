"""Bad settings of the Lightning recipes stop with one ``error:`` line (exit 2) before anything is written.

Each case goes through the recipe's own command line (:func:`collapse.cli.run`), in process.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from collapse.cli import run
from recipes import geom_diffusion, mnist_vae, tinystories, toy_gaussian

RECIPES = {
    "toy_gaussian": (toy_gaussian.main, toy_gaussian.ToyGaussianConfig),
    "mnist_vae": (mnist_vae.main, mnist_vae.MNISTVAEConfig),
    "tinystories": (tinystories.main, tinystories.TinyStoriesConfig),
    "geom_diffusion": (geom_diffusion.main, geom_diffusion.GeomDiffusionConfig),
}

TRAINER_CASES = [
    (["--trainer.precision", "13-bit"], "--trainer.precision must be one of"),
    (["--trainer.accelerator", "gpux"], "--trainer.accelerator must be one of"),
    (["--trainer.strategy", "dpp"], "--trainer.strategy must be auto, ddp, fsdp"),
    (["--trainer.gradient_clip_val", "-1"], "--trainer.gradient_clip_val must be > 0"),
    (["--trainer.max_epochs", "0"], "--trainer.max_epochs must be an integer >= 1"),
    (["--trainer.num_nodes", "0"], "--trainer.num_nodes must be an integer >= 1"),
    (["--trainer.accumulate_grad_batches", "0"], "--trainer.accumulate_grad_batches must be an integer >= 1"),
    (["--trainer.num_nodes", "99999999999"], "--trainer.num_nodes must be at most 2147483647"),
    (["--trainer.val_check_interval", "0"], "--trainer.val_check_interval must be a number of batches >= 1"),
    (["--trainer.val_check_interval", "0.0"], "--trainer.val_check_interval must be a number of batches >= 1"),
    (["--trainer.overfit_batches", "-1"], "--trainer.overfit_batches must be an integer >= 0"),
    (["--trainer.barebones", "true"], "--trainer.barebones must stay false"),
    pytest.param(
        ["--trainer.precision", "transformer-engine"],
        "needs NVIDIA's transformer_engine package",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("transformer_engine") is not None, reason="transformer_engine is installed here"
        ),
    ),
]

TOY_CASES = [
    (["--data.num_train", "0"], "--data.num_train must be an integer >= 1"),
    (["--data.num_real", "-3"], "--data.num_real must be an integer >= 1"),
    (["--data.cov", "[[1, 2], [2, 1]]"], "--data.cov must be symmetric positive definite"),
    (["--data.cov", "[[1, 0, 0], [0, 1, 0], [0, 0, 1]]"], "--data.cov must be 2 x 2"),
    (["--data.seed", "-1"], "--data.seed must be an integer >= 0"),
    (["--data.num_train", "99999999999"], "does not fit in memory"),
    (["--model.lr", "-1"], "--model.lr must be a finite number > 0"),
    (["--model.lr", "0"], "--model.lr must be a finite number > 0"),
    (["--model.init_scale", "-1"], "--model.init_scale must be a number within 0 .. 1e6"),
    (["--model.init_scale", "1e308"], "--model.init_scale must be a number within 0 .. 1e6"),
    (["--data.mean", "[1e308, 1e308]"], "--data.mean entries must be finite, at most 1e+06 in size"),
    (["--data.cov", "[[1e-320, 0], [0, 1e-320]]"], "--data.cov variances (eigenvalues) must lie within 1e-12 .. 1e+12"),
    (["--data.cov", "[[1e13, 0], [0, 1]]"], "--data.cov variances (eigenvalues) must lie within"),
]


def refused(recipe: str, argv: list[str], tmp_path, capsys) -> str:
    """Run ``recipe`` with ``argv``; assert exit 2, one stderr line, no run directory; return that line."""
    main, config_cls = RECIPES[recipe]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run(main, config_cls, ["--out_dir", str(out), "--wandb.mode", "disabled", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("argv,message", TRAINER_CASES)
def test_bad_trainer_settings_are_one_line(recipe, argv, message, tmp_path, capsys):
    assert message in refused(recipe, argv, tmp_path, capsys)


@pytest.mark.parametrize("argv,message", TOY_CASES)
def test_bad_toy_data_is_one_line(argv, message, tmp_path, capsys):
    assert message in refused("toy_gaussian", argv, tmp_path, capsys)


def test_wandb_online_without_credentials_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    main, config_cls = RECIPES["toy_gaussian"]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run(main, config_cls, ["--out_dir", str(out), "--wandb.mode", "online"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "--wandb.mode online needs W&B credentials" in err and "wandb login" in err
    assert not out.exists()


def test_wandb_credentials_are_found_in_the_environment_or_netrc(tmp_path, monkeypatch):
    from collapse.tracking import has_credentials

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert not has_credentials()
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc_file.chmod(0o600)
    assert has_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    assert has_credentials()


@pytest.mark.parametrize("recipe", ["toy_gaussian", "gaussian"])
@pytest.mark.parametrize("where", ["empty", "a file", "below a file"])
def test_an_unusable_out_dir_is_one_line(recipe, where, tmp_path, capsys, monkeypatch):
    from recipes import gaussian

    monkeypatch.chdir(tmp_path)  # an empty --out_dir must not turn this folder into a run directory
    (tmp_path / "afile").write_text("mine\n")
    out = {"empty": "", "a file": str(tmp_path / "afile"), "below a file": str(tmp_path / "afile" / "sub")}[where]
    main, config_cls = (gaussian.main, gaussian.GaussianConfig) if recipe == "gaussian" else RECIPES[recipe]
    tiny = ["--dim", "1", "--n_samples", "10", "--num_seeds", "2", "--generations", "2"]
    small = tiny if recipe == "gaussian" else []
    with pytest.raises(SystemExit) as exc:
        run(main, config_cls, ["--out_dir", out, "--wandb.mode", "disabled", *small])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: --out_dir") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.parametrize(
    "kernel,message",
    [("flex_attention", "flex_attention trains only on a GPU"), ("flash_attention_2", "flash_attention_2 runs only")],
)
def test_an_attention_kernel_this_machine_cannot_train_with_is_one_line(kernel, message, tmp_path, capsys):
    argv = ["--model.attn_implementation", kernel, "--trainer.accelerator", "cpu"]
    assert message in refused("tinystories", argv, tmp_path, capsys)


@pytest.mark.parametrize("template", ["runs/{hash.x}", "runs/{hash[a]}", "runs/{hash!z}", "runs/{0}", "runs/{hash:zz}"])
def test_an_out_dir_placeholder_other_than_hash_is_one_line(template, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main, config_cls = RECIPES["toy_gaussian"]
    with pytest.raises(SystemExit) as exc:
        run(main, config_cls, ["--out_dir", template, "--wandb.mode", "disabled"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert "the only placeholder allowed is {hash}" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x00\xff\xfe not text", "not a text (YAML) file"),
        (b"data: 5\n", "--data is a group of flags"),
        (b"data: [1, 2]\n", "--data is a group of flags"),
        (b"trainer: 3\n", "--trainer is a group of flags"),
        (b"model: {lr: null}\n", "--model.lr cannot be empty (null)"),
        (b"data: {mean: null}\n", "--data.mean cannot be empty (null)"),
        (b"out_dir: null\n", "--out_dir cannot be empty (null)"),
    ],
)
def test_a_config_file_of_the_wrong_shape_is_one_line(content, message, tmp_path, capsys):
    path = tmp_path / "flags.yaml"
    path.write_bytes(content)
    assert message in refused("toy_gaussian", ["--config", str(path)], tmp_path, capsys)


def test_a_negative_mnist_split_seed_is_one_line(tmp_path, capsys):
    assert "--data.split_seed must be an integer >= 0" in refused(
        "mnist_vae", ["--data.split_seed", "-1"], tmp_path, capsys
    )


@pytest.mark.parametrize("recipe", ["tinystories", "geom_diffusion"])
@pytest.mark.parametrize("where", ["a file", "below a file", "uncreatable"])
def test_an_unusable_cache_dir_is_one_line(recipe, where, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine\n")
    cache = {
        "a file": tmp_path / "afile",
        "below a file": tmp_path / "afile" / "sub",
        "uncreatable": Path("/proc/no-such-cache"),  # Linux: nobody, root included, may create folders in /proc
    }[where]
    err = refused(recipe, ["--data.cache_dir", str(cache)], tmp_path, capsys)
    expected = "is a file, not a folder" if where != "uncreatable" else ("cannot be created", "no permission")
    assert any(e in err for e in ([expected] if isinstance(expected, str) else expected)), err
    assert (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.parametrize(("text", "message"), [("", "is empty"), ("hello\nnot a molecule\n", "holds no SDF record")])
def test_an_empty_or_recordless_sdf_file_is_one_line(tmp_path, capsys, text, message):
    sdf = tmp_path / "empty.sdf"
    sdf.write_text(text)
    err = refused("geom_diffusion", ["--data.source", "sdf", "--data.path", str(sdf)], tmp_path, capsys)
    assert f"{sdf} {message}" in err


TINY_STORIES = [
    "--data.num_real",
    "24",
    "--data.num_test",
    "8",
    "--data.vocab_size",
    "300",
    "--model.vocab_size",
    "300",
]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--workflow", "bogus"], "unknown workflow 'bogus'"),
        (["--generations", "0"], "--generations must be an integer >= 1"),
        (["--batch_size", "0"], "--batch_size must be an integer >= 1"),
        (["--sample_batch_size", "0"], "--sample_batch_size must be an integer >= 1"),
        (["--num_workers", "-1"], "--num_workers must be an integer >= 0"),
        (["--trainer.devices", "abc"], "are not usable here"),
        (["--real_size", "5000"], "needs 5000 real examples, but only 24 are available"),
    ],
)
def test_the_tinystories_dry_run_refuses_what_the_run_refuses(argv, message, tmp_path, capsys):
    main, config_cls = RECIPES["tinystories"]
    for extra in ([], ["--dry_run", "true"]):
        out = tmp_path / f"run{len(extra)}"
        with pytest.raises(SystemExit) as exc:
            run(main, config_cls, ["--out_dir", str(out), "--wandb.mode", "disabled", *TINY_STORIES, *argv, *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err.splitlines()[-1], (extra, err)
        assert not out.exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--trainer.limit_val_batches", "0.01"], "--trainer.limit_val_batches 0.01 of 1 val batches is no batch"),
        (["--trainer.limit_test_batches", "0.0001"], "--trainer.limit_test_batches 0.0001 of 1 test batches is no"),
        (["--trainer.val_check_interval", "1000"], "--trainer.val_check_interval (1000) must be less than"),
    ],
)
def test_trainer_settings_that_the_data_refuses_are_one_line(argv, message, tmp_path, capsys):
    # Only the number of batches shows these to be wrong: Lightning refuses them inside fit or test.
    main, config_cls = RECIPES["toy_gaussian"]
    small = ["--data.num_train", "64", "--data.num_val", "16", "--data.num_test", "32", "--batch_size", "32"]
    with pytest.raises(SystemExit) as exc:
        run(main, config_cls, ["--out_dir", str(tmp_path / "run"), "--wandb.mode", "disabled", *small, *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: the --trainer settings do not fit generation 0's data: "), err
    assert err.count("\n") == 1 and message in err, err
    assert not list((tmp_path / "run").rglob("model.pt"))  # refused before a model was trained and saved


def test_only_errors_that_name_a_trainer_argument_become_one_line():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from collapse.errors import UserError
    from engine.loop import _settings_fit_the_data

    with pytest.raises(UserError, match=r"generation 3's data: .*--trainer\.limit_val_batches 1\.0"):
        with _settings_fit_the_data(3):
            raise MisconfigurationException("Try at least `limit_val_batches=1.0`")
    with pytest.raises(ValueError, match="a bug"):  # not a setting: keeps its traceback
        with _settings_fit_the_data(0):
            raise ValueError("a bug in `some_function`")
    with pytest.raises(MisconfigurationException, match="No `training_step"):
        with _settings_fit_the_data(0):
            raise MisconfigurationException("No `training_step()` method defined.")
    with pytest.raises(RuntimeError, match="CUDA error"):  # a runtime failure, even one that names a setting
        with _settings_fit_the_data(0):
            raise RuntimeError("CUDA error: device-side assert with `precision`")


def test_a_callback_that_monitors_a_metric_nobody_logs_is_one_line(tmp_path, capsys):
    # (A ModelCheckpoint of one's own is refused before the run: the loop keeps its own checkpoints.)
    callback, message = "lightning.pytorch.callbacks.EarlyStopping", "conditioned on metric `no_such_metric`"
    config = tmp_path / "callbacks.yaml"
    config.write_text(
        f"trainer:\n  callbacks:\n    - class_path: {callback}\n      init_args:\n        monitor: no_such_metric\n"
    )
    main, config_cls = RECIPES["toy_gaussian"]
    small = ["--data.num_train", "64", "--data.num_val", "16", "--data.num_test", "32", "--batch_size", "32"]
    with pytest.raises(SystemExit) as exc:
        run(main, config_cls, ["--out_dir", str(tmp_path / "run"), "--wandb.mode", "disabled", *small,
                               "--trainer.max_epochs", "1", "--config", str(config)])  # fmt: skip
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: a --trainer.callbacks monitor names a metric that generation 0 does not log: "), err
    assert err.count("\n") == 1 and message in err, err
