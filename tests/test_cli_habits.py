"""The recipes' command line behaves like Lightning's and W&B's: the whole Trainer, W&B's environment, CLI habits."""

from __future__ import annotations

import inspect
import json
import os
import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor

from collapse import tracking
from collapse.cli import build_parser, parse_config, run
from collapse.errors import ConfigError, UserError
from collapse.rundir import config_dict
from collapse.tracking import WandbConfig, check_mode, resolve
from engine.trainer import TrainerConfig, check_loop_settings
from recipes.toy_gaussian import ToyGaussianConfig, main

TINY = ["--generations", "2", "--data.num_train", "64", "--data.num_val", "16", "--data.num_test", "32",
        "--trainer.max_epochs", "3", "--batch_size", "32"]  # fmt: skip
TRAINER_ARGS = [name for name in inspect.signature(pl.Trainer.__init__).parameters if name != "self"]


def _one_line_exit(capsys, argv, config_cls=ToyGaussianConfig) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(main, config_cls, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# ---- the whole Trainer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "config"),
    [
        ("recipes.toy_gaussian", "ToyGaussianConfig"),
        ("recipes.mnist_vae", "MNISTVAEConfig"),
        ("recipes.tinystories", "TinyStoriesConfig"),
        ("recipes.geom_diffusion", "GeomDiffusionConfig"),
    ],
)
def test_every_trainer_argument_is_a_flag_of_every_lightning_recipe(module, config):
    config_cls = getattr(__import__(module, fromlist=[config]), config)
    options = {option for action in build_parser(config_cls)._actions for option in action.option_strings}
    missing = [name for name in TRAINER_ARGS if f"--trainer.{name}" not in options]
    assert not missing
    cfg = parse_config(config_cls, ["--trainer.limit_val_batches", "0.5", "--trainer.detect_anomaly", "true"])
    kwargs = cfg.trainer.lightning_kwargs()
    assert kwargs["limit_val_batches"] == 0.5 and kwargs["detect_anomaly"] is True
    assert "fast_dev_run" not in kwargs  # unset: Lightning's own default


def test_trainer_flags_reach_the_trainer_and_the_curves_reach_the_same_wandb_run(tmp_path, fake_wandb):
    argv = [*TINY, "--out_dir", str(tmp_path / "run"), "--trainer.limit_train_batches", "1",
            "--trainer.log_every_n_steps", "1", "--trainer.callbacks+=LearningRateMonitor"]  # fmt: skip
    result = main(parse_config(ToyGaussianConfig, argv))
    assert [result.metrics[g]["train_steps"] for g in (0, 1)] == [3, 3]  # 1 batch per epoch, 3 epochs
    (wandb_run,) = fake_wandb  # one W&B run for the whole recipe run
    lr_rows = [row for row in wandb_run.rows if "lr-Adam" in row]
    # One learning-rate row per optimizer step (log_every_n_steps 1), from the user's monitor alone (no second one).
    assert [(row["generation"], row["trainer/global_step"]) for row in lr_rows] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)
    ]  # fmt: skip
    steps = [row["trainer/step"] for row in wandb_run.rows if "trainer/step" in row]
    assert steps == sorted(steps) and steps[-1] > 3  # generation 1's curves follow generation 0's
    assert any("train_loss" in row for row in wandb_run.rows)
    assert wandb_run.metrics["lr-Adam"] == wandb_run.metrics["train_loss"] == "trainer/step"
    assert wandb_run.metrics["*"] == "generation"
    per_generation = [row for row in wandb_run.rows if "test_loss" in row]
    assert [row["generation"] for row in per_generation] == [0, 1] and "trainer/step" not in per_generation[0]
    # One name per metric: metrics.json's (test_loss, train_size, ...) are the W&B keys, and no metric has a slash.
    for g, row in enumerate(per_generation):
        saved = json.loads((tmp_path / "run" / f"gen_{g:03d}" / "metrics.json").read_text())
        assert "test_loss" in saved and row.keys() == {*saved, "generation", "generation_seconds"}
        assert {k: row[k] for k in saved} == saved == result.metrics[g]
    logged = {key for row in wandb_run.rows for key in row}
    assert {"train_loss", "val_loss"} <= logged and not any(k.startswith(("test/", "train/", "val/")) for k in logged)
    axes = {"trainer/step", "trainer/global_step", "trainer/epoch", "trainer/steps_per_s"}  # the curves' bookkeeping
    assert {k for k in logged if "/" in k} <= axes


def test_trainer_objects_from_a_yaml_class_path_are_built_fresh_and_recorded(tmp_path):
    path = tmp_path / "trainer.yaml"
    path.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "  - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
        "    init_args: {monitor: val_loss, patience: 7}\n"
        "  profiler: simple\n"
    )
    cfg = parse_config(ToyGaussianConfig, ["--config", str(path)])
    first, second = cfg.trainer.lightning_kwargs(), cfg.trainer.lightning_kwargs()
    (stopper,) = first["callbacks"]
    assert isinstance(stopper, EarlyStopping) and stopper.monitor == "val_loss" and stopper.patience == 7
    assert second["callbacks"][0] is not stopper  # each generation's Trainer gets its own
    recorded = config_dict(cfg)["trainer"]
    assert recorded["callbacks"][0]["class_path"] == "lightning.pytorch.callbacks.EarlyStopping"
    assert recorded["profiler"] == "simple" and recorded["max_steps"] is None


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--trainer.default_root_dir", "elsewhere"], ["--trainer.default_root_dir", "staging folder"]),
        (["--trainer.enable_checkpointing", "false"], ["--trainer.enable_checkpointing", "resumes"]),
        (["--trainer.num_sanity_val_steps", "2"], ["--trainer.num_sanity_val_steps", "random"]),
        (["--trainer.callbacks+=ModelCheckpoint"], ["ModelCheckpoint", "staging folder"]),
        (
            ["--trainer.max_steps", "5", "--steps_per_generation", "3"],
            ["--trainer.max_steps", "--steps_per_generation"],
        ),
        (["--trainer.log_every_n_steps", "0"], ["--trainer.log_every_n_steps", ">= 1"]),
        (["--trainer.limit_train_batches", "1.5"], ["--trainer.limit_train_batches", "fraction"]),
        (["--trainer.profiler", "nope"], ["--trainer", "Lightning refuses", "profiler"]),
        (["--trainer.val_check_interval", "soon"], ["--trainer", "Lightning refuses", "val_check_interval"]),
    ],
)
def test_loop_owned_and_bad_trainer_arguments_are_one_line_before_anything_is_written(tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    err = _one_line_exit(capsys, [*TINY, "--out_dir", str(out), "--wandb.mode", "disabled", *argv])
    for word in words:
        assert word in err
    assert not out.exists()


def test_fixed_steps_refuses_only_the_step_limits():
    check_loop_settings({"max_steps": 5}, None)  # without --steps_per_generation: Lightning's max_steps
    check_loop_settings({"max_steps": -1, "max_epochs": 3}, 4)
    with pytest.raises(ConfigError, match="max_time"):
        check_loop_settings({"max_time": "00:00:01:00"}, "first")


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_keeps_the_loops_seeded_numbers(tmp_path, restore_determinism):
    base = [*TINY, "--wandb.mode", "disabled"]
    plain = main(parse_config(ToyGaussianConfig, [*base, "--out_dir", str(tmp_path / "a")]))
    strict = main(
        parse_config(ToyGaussianConfig, [*base, "--out_dir", str(tmp_path / "b"), "--trainer.deterministic", "true"])
    )
    assert torch.are_deterministic_algorithms_enabled()
    assert strict.metrics == plain.metrics


# ---- W&B as users expect ----------------------------------------------------------------------------------------


def test_wandb_environment_applies_where_no_flag_is_given():
    env = {"WANDB_MODE": "disabled", "WANDB_PROJECT": "p", "WANDB_ENTITY": "e", "WANDB_NAME": "n",
           "WANDB_RUN_GROUP": "g", "WANDB_TAGS": "a, b"}  # fmt: skip
    got = resolve(WandbConfig(), env)
    assert got == WandbConfig(mode="disabled", project="p", entity="e", group="g", name="n", tags=["a", "b"])
    flags = WandbConfig(mode="offline", project="flag", entity="team", group="grp", name="nm", tags=["t"])
    assert resolve(flags, env) == flags
    assert resolve(WandbConfig(), {}) == WandbConfig(mode="offline", project="model-collapse")
    assert resolve(WandbConfig(), {"WANDB_MODE": "dryrun", "WANDB_GROUP": "old"}).group == "old"


def test_wandb_environment_reaches_the_run_and_flags_override_it(tmp_path, fake_wandb, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    monkeypatch.setenv("WANDB_ENTITY", "env-team")
    monkeypatch.setenv("WANDB_TAGS", "sweep7")
    main(parse_config(ToyGaussianConfig, [*TINY, "--generations", "1", "--out_dir", str(tmp_path / "a")]))
    init = fake_wandb[-1].kwargs
    assert (init["project"], init["entity"], init["mode"]) == ("from-env", "env-team", "offline")
    assert "sweep7" in init["tags"] and "toy_gaussian" in init["tags"]
    flags = ["--wandb.project", "from-flag", "--wandb.tags", "[x]"]
    main(parse_config(ToyGaussianConfig, [*TINY, "--generations", "1", "--out_dir", str(tmp_path / "b"), *flags]))
    init = fake_wandb[-1].kwargs
    assert init["project"] == "from-flag" and init["entity"] == "env-team" and "sweep7" not in init["tags"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    count = len(fake_wandb)
    main(parse_config(ToyGaussianConfig, [*TINY, "--generations", "1", "--out_dir", str(tmp_path / "c")]))
    assert len(fake_wandb) == count  # WANDB_MODE=disabled: no W&B run
    main(
        parse_config(
            ToyGaussianConfig,
            [*TINY, "--generations", "1", "--out_dir", str(tmp_path / "d"), "--wandb.mode", "offline"],
        )
    )
    assert len(fake_wandb) == count + 1 and fake_wandb[-1].kwargs["mode"] == "offline"


def test_online_mode_from_the_environment_without_credentials_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tracking, "has_credentials", lambda: False)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(UserError, match="wandb login"):
        check_mode(WandbConfig())
    err = _one_line_exit(capsys, [*TINY, "--out_dir", str(tmp_path / "run")])
    assert "W&B credentials" in err and not (tmp_path / "run").exists()
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert "WANDB_MODE must be one of" in _one_line_exit(capsys, [*TINY, "--out_dir", str(tmp_path / "run")])
    monkeypatch.setenv("WANDB_MODE", "")  # W&B itself fails to start on it (a validation error deep inside)
    assert "WANDB_MODE is set but empty" in _one_line_exit(capsys, [*TINY, "--out_dir", str(tmp_path / "run")])
    check_mode(WandbConfig(mode="disabled"))  # no W&B run: nothing to refuse


def test_tags_w_and_b_would_refuse_are_one_line_and_empty_env_entries_are_dropped(tmp_path, capsys, monkeypatch):
    for argv, source in [
        (["--wandb.tags", '[""]'], "--wandb.tags"),
        (["--wandb.tags", f"[{'t' * 65}]"], "--wandb.tags"),
    ]:
        err = _one_line_exit(capsys, [*TINY, "--out_dir", str(tmp_path / "run"), *argv])
        assert err.startswith(f"error: {source}: a W&B tag must be 1 to 64 characters"), err
        assert not (tmp_path / "run").exists()
    disabled = parse_config(ToyGaussianConfig, [*TINY, "--wandb.mode", "disabled", "--wandb.tags", f"[{'t' * 65}]"])
    check_mode(disabled.wandb)  # no W&B run: a tag it would refuse stops nothing
    seen = {}

    def init(**kwargs):  # the real W&B reads WANDB_TAGS itself and refuses ",,,": it must not see it
        seen["env"], seen["tags"] = os.environ.get("WANDB_TAGS"), kwargs["tags"]
        raise RuntimeError("stop here")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_TAGS", ",a,,")
    with pytest.raises(UserError, match=r"^W&B could not start an offline run \(RuntimeError: stop here\); fix the"):
        tracking.Tracker(WandbConfig(mode="offline"), "toy_gaussian", tmp_path / "w", {"workflow": "x" * 80})
    assert seen["env"] is None and "a" in seen["tags"] and ("workflow=" + "x" * 80)[:64] in seen["tags"]
    assert os.environ["WANDB_TAGS"] == ",a,,"  # put back


# ---- command-line habits ------------------------------------------------------------------------------------------


def test_abbreviated_flags_are_refused(capsys):
    err = _one_line_exit(capsys, ["--generation", "2"])
    assert "--generation" in err


def test_boolean_flags_work_bare_and_with_a_value():
    cfg = parse_config(ToyGaussianConfig, ["--warm_start", "--overwrite", "--trainer.detect_anomaly"])
    assert cfg.warm_start is True and cfg.overwrite is True and cfg.trainer.detect_anomaly is True
    cfg = parse_config(ToyGaussianConfig, ["--overwrite", "false", "--warm_start=true", "--generations", "3"])
    assert cfg.overwrite is False and cfg.warm_start is True and cfg.generations == 3
    from recipes.tinystories import TinyStoriesConfig

    assert parse_config(TinyStoriesConfig, ["--dry_run"]).dry_run is True


def test_none_is_null_where_a_flag_may_be_empty(capsys):
    cfg = parse_config(
        ToyGaussianConfig,
        [
            "--real_size=None",
            "--num_synthetic",
            "none",
            "--trainer.gradient_clip_val=null",
            "--steps_per_generation=None",
        ],
    )
    assert cfg.real_size is None and cfg.num_synthetic is None and cfg.trainer.gradient_clip_val is None
    assert parse_config(ToyGaussianConfig, ["--real_size=None", "--real_size", "7"]).real_size == 7
    assert "generations" in _one_line_exit(capsys, ["--generations=None"])


def test_a_runs_config_yaml_resumes_it_or_starts_a_new_run(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY, "--out_dir", str(out), "--wandb.mode", "disabled", "--trainer.callbacks+=LearningRateMonitor"]
    first = main(parse_config(ToyGaussianConfig, argv))
    saved = out / "config.yaml"
    assert yaml.safe_load(saved.read_text())["recipe"] == "toy_gaussian"
    again = main(parse_config(ToyGaussianConfig, ["--config", str(saved)]))
    assert again.committed == [] and again.metrics == first.metrics  # same out_dir, same config: resumed
    other = tmp_path / "other"
    copy = main(parse_config(ToyGaussianConfig, ["--config", str(saved), "--out_dir", str(other)]))
    assert copy.committed == [0, 1] and copy.metrics == first.metrics
    assert (
        yaml.safe_load((other / "config.yaml").read_text())["trainer"] == yaml.safe_load(saved.read_text())["trainer"]
    )
    bigger = ["--config", str(saved), "--seed", "3"]  # a different config in the same folder is still refused
    assert "different config" in _one_line_exit(capsys, bigger)
    assert Path(saved).is_file()


def test_trainer_config_defaults_are_null_and_round_trip():
    recorded = config_dict(TrainerConfig())
    assert all(recorded[name] is None for name in ("callbacks", "logger", "profiler", "plugins", "max_time"))
    assert TrainerConfig(**recorded) == TrainerConfig()
    assert isinstance(LearningRateMonitor(), pl.Callback)


def test_only_a_runs_own_keys_are_read_past_in_a_config_file(tmp_path, capsys):
    good = tmp_path / "run.yaml"
    good.write_text("recipe: toy_gaussian\ngenerations: 4\n")
    assert parse_config(ToyGaussianConfig, [f"--config={good}"]).generations == 4
    typo = tmp_path / "typo.yaml"
    typo.write_text("recipe: toy_gaussian\ngeneration: 4\n")  # a misspelt key is still an error
    assert "generation" in _one_line_exit(capsys, ["--config", str(typo)])
    other = tmp_path / "other.yaml"
    other.write_text("recipe: mnist_vae\ngenerations: 4\n")  # another recipe's run: said so, not "not accepted"
    assert f"--config {other}: the config of a mnist_vae run, not of toy_gaussian" in _one_line_exit(
        capsys, ["--config", str(other)]
    )


@pytest.mark.parametrize(("text", "what"), [("", "empty"), ("- 1\n- 2\n", "a YAML list"), ("5\n", "a YAML int")])
def test_a_config_file_that_is_no_mapping_says_what_it_is(tmp_path, capsys, text, what):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _one_line_exit(capsys, ["--config", str(path), "--out_dir", str(tmp_path / "run")])
    assert err == f"error: --config {path}: {what}, not a mapping of flags (as --print_config writes)\n"
    assert not (tmp_path / "run").exists()


def test_training_rows_get_the_rate_of_each_count_the_model_keeps(monkeypatch):
    import types

    import engine.trainer as trainer_module
    from engine.trainer import TrackerLogger

    rows = []
    tracker = types.SimpleNamespace(log_training=lambda row, generation, step: rows.append((step, row)))
    logger = TrackerLogger(tracker, generation=2)
    clock = iter([10.0, 12.0, 12.0, 16.0])
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    counts = {"tokens": 100}
    logger.counts = lambda: dict(counts)
    logger.log_metrics({"train_loss": 1.0}, step=1)
    counts["tokens"] = 900
    logger.log_metrics({"train_loss": 0.9}, step=5)
    logger.log_metrics({"lr-AdamW": 0.1}, step=5)  # a second row for the same step: no rate from it
    counts["tokens"] = 1300
    logger.log_metrics({"train_loss": 0.8}, step=7)
    assert "trainer/tokens_per_s" not in rows[0][1]
    assert rows[1][1]["trainer/tokens_per_s"] == 400.0 and rows[1][1]["trainer/steps_per_s"] == 2.0
    assert "trainer/tokens_per_s" not in rows[2][1]
    assert rows[3][1]["trainer/tokens_per_s"] == 100.0  # 400 tokens in the 4 s since the row of step 5
