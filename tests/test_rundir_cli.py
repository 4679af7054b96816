"""Run directories (config guard, metrics.csv) and the typed command line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from collapse.cli import as_list, parse_config, positive_floats, positive_ints, run
from collapse.errors import UserError
from collapse.rundir import (
    CONFIG,
    METRICS,
    TAIL_COLUMNS,
    RunDirError,
    concat_csv,
    config_dict,
    prepare_run_dir,
    read_metrics,
    release_run_dir,
    write_metrics,
)
from datamodules.workflows import parse_workflows


@dataclass
class TrackingConfig:
    """Experiment tracking."""

    mode: str = "disabled"
    """W&B mode: disabled, offline or online."""


@dataclass
class TinyConfig:
    """A small recipe config."""

    dim: int | list[int] = 10
    """Dimension, or a list of them."""
    lr: float = 0.1
    """Learning rate."""
    workflow: str | list[str] = "accumulate"
    """Workflow spec, or a list of them."""
    out_dir: str = "runs/tiny"
    """Output folder."""
    overwrite: bool = False
    """Replace a different run in out_dir."""
    wandb: TrackingConfig = field(default_factory=TrackingConfig)
    """Tracking settings."""


BASE = {"dim": [1, 10], "lr": 0.001, "workflow": ["replace", "mix(real=1, synthetic=2)"], "seeds": 3}


# ---- prepare_run_dir --------------------------------------------------------------------------------


def test_fresh_dir_gets_a_config(tmp_path):
    out = prepare_run_dir(tmp_path / "a" / "b", "gaussian", BASE)
    assert out == tmp_path / "a" / "b" and out.is_dir()
    assert yaml.safe_load((out / CONFIG).read_text()) == {"recipe": "gaussian", **BASE}
    assert list((out / CONFIG).read_text().splitlines())[0] == "recipe: gaussian"


def test_same_config_resumes(tmp_path):
    out = prepare_run_dir(tmp_path / "run", "gaussian", BASE)
    (out / "gen_000").mkdir()
    (out / METRICS).write_text("kept\n")
    assert prepare_run_dir(out, "gaussian", dict(BASE)) == out
    assert (out / METRICS).read_text() == "kept\n" and (out / "gen_000").is_dir()


def test_config_dataclass_survives_the_yaml_round_trip(tmp_path):
    cfg = TinyConfig(dim=[3, 4], workflow="accumulate_subsample(size=5)")
    out = prepare_run_dir(tmp_path / "run", "tiny", config_dict(cfg))
    assert yaml.safe_load((out / CONFIG).read_text())["wandb"] == {"mode": "disabled"}
    (out / METRICS).write_text("kept\n")
    prepare_run_dir(out, "tiny", config_dict(TinyConfig(dim=[3, 4], workflow="accumulate_subsample(size=5)")))
    assert (out / METRICS).read_text() == "kept\n"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"dim": [1, 20]}, "dim: [1, 10] -> [1, 20]"),
        ({"lr": 0.01}, "lr: 0.001 -> 0.01"),
        ({"workflow": ["replace"]}, "workflow: "),
        ({"extra": 1}, "extra: None -> 1"),
    ],
)
def test_different_config_is_refused(tmp_path, change, key):
    out = prepare_run_dir(tmp_path / "run", "gaussian", BASE)
    (out / METRICS).write_text("kept\n")
    with pytest.raises(RunDirError) as err:
        prepare_run_dir(out, "gaussian", {**BASE, **change})
    message = str(err.value)
    assert key in message
    assert "different config" in message and "--overwrite" in message
    assert "\n" not in message
    assert (out / METRICS).read_text() == "kept\n"
    assert yaml.safe_load((out / CONFIG).read_text()) == {"recipe": "gaussian", **BASE}


def test_a_removed_key_or_another_recipe_is_refused(tmp_path):
    out = prepare_run_dir(tmp_path / "run", "gaussian", BASE)
    with pytest.raises(RunDirError, match=r"seeds: 3 -> None"):
        prepare_run_dir(out, "gaussian", {k: v for k, v in BASE.items() if k != "seeds"})
    with pytest.raises(RunDirError, match=r"recipe: 'gaussian' -> 'linear_regression'"):
        prepare_run_dir(out, "linear_regression", BASE)


def test_overwrite_replaces_the_old_run(tmp_path):
    out = prepare_run_dir(tmp_path / "run", "gaussian", BASE)
    (out / METRICS).write_text("old\n")
    (out / "gen_000").mkdir()
    new = {**BASE, "dim": [2]}
    prepare_run_dir(out, "gaussian", new, overwrite=True)
    release_run_dir(out)  # removes the lock file
    assert sorted(p.name for p in out.iterdir()) == [CONFIG]
    assert yaml.safe_load((out / CONFIG).read_text())["dim"] == [2]


def test_overwrite_keeps_a_matching_run(tmp_path):
    out = prepare_run_dir(tmp_path / "run", "gaussian", BASE)
    (out / METRICS).write_text("kept\n")
    prepare_run_dir(out, "gaussian", BASE, overwrite=True)
    assert (out / METRICS).read_text() == "kept\n"


def test_execution_keys_may_differ(tmp_path):
    first = {**BASE, "wandb": {"mode": "disabled"}, "overwrite": False, "num_workers": 0, "out_dir": "x"}
    out = prepare_run_dir(tmp_path / "run", "gaussian", first)
    (out / METRICS).write_text("kept\n")
    second = {**BASE, "wandb": {"mode": "online", "project": "p"}, "overwrite": True, "num_workers": 4, "out_dir": "y"}
    prepare_run_dir(out, "gaussian", second, overwrite=second["overwrite"])
    assert (out / METRICS).read_text() == "kept\n"
    assert yaml.safe_load((out / CONFIG).read_text())["wandb"] == {"mode": "online", "project": "p"}


@pytest.mark.parametrize("output", [METRICS, "gen_000", ".gen_001.partial", "cells"])
def test_run_outputs_without_config_are_refused(tmp_path, output):
    out = tmp_path / "run"
    out.mkdir()
    if output.endswith(".csv"):
        (out / output).write_text("x\n")
    else:
        (out / output).mkdir()
    with pytest.raises(RunDirError, match=f"holds run outputs but no {CONFIG}.*--overwrite"):
        prepare_run_dir(out, "gaussian", BASE)
    assert not (out / CONFIG).exists()
    prepare_run_dir(out, "gaussian", BASE, overwrite=True)
    release_run_dir(out)  # removes the lock file
    assert sorted(p.name for p in out.iterdir()) == [CONFIG]


def test_unrelated_files_do_not_make_a_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    prepare_run_dir(out, "gaussian", BASE)
    assert (out / "notes.txt").read_text() == "mine\n" and (out / CONFIG).is_file()


@pytest.mark.parametrize("text", ["a: [unclosed\n", "- just\n- a list\n"])
def test_unreadable_config_is_refused(tmp_path, text):
    out = tmp_path / "run"
    out.mkdir()
    (out / CONFIG).write_text(text)
    with pytest.raises(RunDirError, match=f"{CONFIG} is unreadable"):
        prepare_run_dir(out, "gaussian", BASE)


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        prepare_run_dir(path, "gaussian", BASE, overwrite=True)


# ---- metrics.csv --------------------------------------------------------------------------------------

LABELS = ["mix(real=256, synthetic=1024)", "accumulate_subsample(multiplier=0.5, size=50)", 'odd "quoted", label']
COLUMNS = ["workflow", "dim", *TAIL_COLUMNS]


def _rows(label: str, part: int) -> list[list[object]]:
    return [[label, 10 * part, seed, g, "mse", 0.25 * g + seed] for seed in range(2) for g in range(3)]


def test_write_metrics_round_trips_labels_with_commas(tmp_path):
    path = tmp_path / METRICS
    rows = [row for label in LABELS for row in _rows(label, 1)]
    write_metrics(path, COLUMNS, rows)
    back = read_metrics(path)
    assert [r["workflow"] for r in back] == [r[0] for r in rows]
    assert list(back[0]) == COLUMNS
    last = {"workflow": LABELS[-1], "dim": "10", "seed": "1", "generation": "2", "metric": "mse", "value": "1.5"}
    assert back[-1] == last
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


def test_concat_csv_keeps_one_header(tmp_path):
    parts = []
    for i, label in enumerate(LABELS):
        parts.append(tmp_path / f"part{i}.csv")
        write_metrics(parts[-1], COLUMNS, _rows(label, i))
    target = tmp_path / "out" / METRICS
    assert concat_csv(target, parts) == 6 * len(LABELS)
    assert target.read_text().count("workflow,dim,seed") == 1
    back = read_metrics(target)
    expected = [(label, str(10 * i)) for i, label in enumerate(LABELS) for _ in range(6)]
    assert [(r["workflow"], r["dim"]) for r in back] == expected
    assert concat_csv(tmp_path / "empty.csv", []) == 0


def test_concat_csv_refuses_a_different_header_and_keeps_the_old_target(tmp_path):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    write_metrics(good, COLUMNS, _rows("replace", 0))
    write_metrics(bad, ["workflow", "n", *TAIL_COLUMNS], _rows("replace", 1))
    target = tmp_path / METRICS
    target.write_text("previous\n")
    with pytest.raises(RunDirError, match=f"{bad.name}: header differs"):
        concat_csv(target, [good, bad])
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "good.csv", METRICS]


# ---- the command line ---------------------------------------------------------------------------------


def test_defaults_and_single_values():
    cfg = parse_config(TinyConfig, [])
    assert cfg == TinyConfig()
    cfg = parse_config(TinyConfig, ["--dim", "5", "--lr", "0.5", "--wandb.mode", "offline", "--overwrite", "true"])
    assert cfg.dim == 5 and cfg.lr == 0.5 and cfg.overwrite is True
    assert cfg.wandb == TrackingConfig(mode="offline")
    assert as_list(cfg.dim) == [5]


def test_list_flags():
    cfg = parse_config(TinyConfig, ["--dim", "[1, 10]", "--workflow", '["replace", "mix(real=1, synthetic=2)"]'])
    assert cfg.dim == [1, 10]
    assert positive_ints("dim", cfg.dim) == [1, 10]
    assert [w.label for w in parse_workflows(cfg.workflow)] == ["replace", "mix(real=1, synthetic=2)"]


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("dim: [2, 3]\nlr: 0.25\nwandb:\n  mode: offline\n")
    cfg = parse_config(TinyConfig, ["--config", str(path)])
    assert cfg == TinyConfig(dim=[2, 3], lr=0.25, wandb=TrackingConfig("offline"))
    cfg = parse_config(TinyConfig, ["--config", str(path), "--lr", "0.5"])
    assert cfg.lr == 0.5 and cfg.dim == [2, 3]


def test_print_config_reparses(tmp_path, capsys):
    argv = ["--dim", "[1, 10]", "--workflow", "mix(real=1, synthetic=2)", "--wandb.mode", "offline"]
    expected = parse_config(TinyConfig, argv)
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TinyConfig, [*argv, "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert yaml.safe_load(printed)["dim"] == [1, 10]
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    assert parse_config(TinyConfig, ["--config", str(path)]) == expected


def _main_ok(cfg: TinyConfig) -> list[int]:
    return positive_ints("dim", cfg.dim)


def _main_user_error(cfg: TinyConfig) -> None:
    raise UserError("bad input\n  - fix this flag\n")


def test_run_returns_what_main_returns():
    assert run(_main_ok, TinyConfig, ["--dim", "[3, 4]"]) == [3, 4]


def _exit(capsys, main, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run(main, TinyConfig, argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    return exit_info.value.code, captured.err


def test_run_turns_a_user_error_into_one_line(capsys):
    code, err = _exit(capsys, _main_user_error, [])
    assert code == 2
    assert err == "error: bad input; fix this flag\n"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--dim", "[1, -3]"], ["dim must be positive integers", "-3"]),
        (["--dim", "[]"], ["dim is empty"]),
        (["--workflow", "acumulate"], ["unknown workflow", "accumulate_subsample"]),
    ],
)
def test_run_reports_bad_values_from_main(capsys, argv, words):
    def main(cfg: TinyConfig) -> None:
        positive_ints("dim", cfg.dim)
        parse_workflows(cfg.workflow)

    code, err = _exit(capsys, main, argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    for word in words:
        assert word in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--lr", "abc"], "lr"),
        (["--dim", "abc"], "--dim"),
        (["--overwrite", "maybe"], "overwrite"),
        (["--dim", "[1, x]"], "--dim"),
        (["--no_such_flag", "1"], "--no_such_flag"),
        (["--config", "/no/such/file.yaml"], "config"),
    ],
)
def test_bad_flags_give_one_line(capsys, argv, flag):
    code, err = _exit(capsys, _main_ok, argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert flag in err
    assert "Traceback" not in err


def test_a_message_that_starts_with_a_flag_keeps_its_dashes(capsys):
    code, err = _exit(capsys, _main_ok, ["--dim", "0"])
    assert code == 2
    assert err == "error: --dim must be positive integers, got 0\n"


def test_interrupt_exits_130(capsys):
    def main(cfg: TinyConfig) -> None:
        raise KeyboardInterrupt

    code, err = _exit(capsys, main, [])
    assert code == 130 and "run the same command again to resume" in err


def test_termination_exits_143_not_0(capsys):
    from collapse.errors import Terminated

    def main(cfg: TinyConfig) -> None:
        raise Terminated("terminated (SIGTERM)")

    code, err = _exit(capsys, main, [])
    assert code == 143 and err == "terminated: finished work is kept; run the same command again to resume\n"


def test_a_recipe_process_prints_one_error_line(tmp_path):
    script = tmp_path / "recipe.py"
    script.write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass

            from collapse.cli import positive_ints, run


            @dataclass
            class Config:
                \"\"\"A recipe.\"\"\"

                dim: int = 1
                \"\"\"Dimension.\"\"\"


            def main(cfg):
                positive_ints("dim", cfg.dim)
                print("ran", cfg.dim)


            if __name__ == "__main__":
                run(main, Config)
            """
        )
    )
    root = Path(__file__).resolve().parents[1]

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, cwd=root, timeout=120
        )

    ok = call("--dim", "3")
    assert ok.returncode == 0 and ok.stdout == "ran 3\n"
    bad = call("--dim", "0")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.endswith("dim must be positive integers, got 0\n")
    typo = call("--dim", "three")
    assert typo.returncode == 2 and typo.stderr.count("\n") == 1 and "dim" in typo.stderr


# ---- value checks ---------------------------------------------------------------------------------


def test_as_list():
    assert as_list(3) == [3] and as_list([1, 2]) == [1, 2] and as_list((1, 2)) == [1, 2] and as_list("ab") == ["ab"]


def test_positive_ints_and_floats():
    assert positive_ints("n", 4) == [4]
    assert positive_floats("lr", [1, 0.5]) == [1.0, 0.5]
    assert all(isinstance(v, float) for v in positive_floats("lr", [1, 2]))


@pytest.mark.parametrize("value", [[], 0, -1, [1, 0], 1.5, True, "3", None])
def test_positive_ints_refuses(value):
    with pytest.raises(UserError, match="^--n "):
        positive_ints("n", value)


@pytest.mark.parametrize("value", [[], 0.0, -1e-3, float("nan"), False, "0.1", None])
def test_positive_floats_refuses(value):
    with pytest.raises(UserError, match="^--lr "):
        positive_floats("lr", value)


def test_a_tilde_in_out_dir_is_the_home_folder_not_a_folder_named_tilde(tmp_path, monkeypatch):
    from recipes import gaussian

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    argv = ["--out_dir=~/runs/g", "--dim", "2", "--n_samples", "8", "--generations", "2", "--num_seeds", "2",
            "--workers", "1", "--wandb.mode", "disabled", "--report", "false"]  # fmt: skip
    gaussian.run(gaussian.main, gaussian.GaussianConfig, argv)
    assert (home / "runs" / "g" / "metrics.csv").is_file()
    assert list(work.iterdir()) == []  # no folder literally named "~"
