"""Inputs past what a run can hold (counts past 64 bits or past what a run can draw, seeds past 64 bits, names past
the file system's limit), damaged or unreadable store files, and output folders of the user's: each stops with one
``error:`` line (exit 2) or a named store error, never a traceback, a hang, silently wrong output or a file of the
user's overwritten."""

from __future__ import annotations

import json

import pytest

from collapse.cli import run
from collapse.store import GenerationStore, StoreError
from datamodules.workflows import Workflow, WorkflowError
from recipes import gaussian
from tests.test_bad_inputs import refused

TINY = ["--dim", "2", "--n_samples", "10", "--num_seeds", "2", "--generations", "2", "--wandb.mode", "disabled"]


def gaussian_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run(gaussian.main, gaussian.GaussianConfig, [*TINY, *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "spec", ["replace(multiplier=1e300)", "mix(real=10, synthetic=1e300)", "fresh_real(per_generation=1e300)"]
)
def test_a_huge_workflow_count_is_one_line(spec, tmp_path, capsys):
    err = gaussian_error(["--workflow", spec, "--out_dir", str(tmp_path / "run")], capsys)
    assert "too large" in err


def test_workflow_counts_are_bounded():
    with pytest.raises(WorkflowError, match="too large"):
        Workflow.parse("mix(real=10, synthetic=1e300)")
    with pytest.raises(WorkflowError, match="too large"):
        Workflow.parse("replace(multiplier=1e300)").check(10, 2)


def test_an_out_dir_name_over_the_file_system_limit_is_one_line(tmp_path, capsys):
    err = gaussian_error(["--out_dir", str(tmp_path / ("x" * 300))], capsys)
    assert "File name too long" in err


def test_a_seed_past_64_bits_is_one_line(tmp_path, capsys):
    err = gaussian_error(["--seed", str(2**63 - 1), "--out_dir", str(tmp_path / "run")], capsys)
    assert "--seed + --num_seeds - 1 must be at most" in err


@pytest.mark.parametrize("argv", [["--num_synthetic", "99999999999999"], ["--workflow", "replace(multiplier=1e9)"]])
def test_a_synthetic_set_too_large_to_draw_is_refused_before_training(argv, tmp_path, capsys):
    assert "a run can draw and store" in refused("toy_gaussian", ["--data.num_train", "64", *argv], tmp_path, capsys)


def test_a_quality_cache_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine\n")
    err = refused("mnist_vae", ["--quality.cache_dir", str(tmp_path / "afile")], tmp_path, capsys)
    assert "is a file, not a folder" in err


@pytest.mark.parametrize("files", [[1, 2], {"samples.npy": {}}, {"samples.npy": {"bytes": "12", "sha256": "x"}}])
def test_a_manifest_with_malformed_files_is_named(tmp_path, files):
    gdir = tmp_path / "gen_000"
    gdir.mkdir()
    (gdir / "manifest.json").write_text(json.dumps({"format": "collapse-store/1", "files": files}))
    with pytest.raises(StoreError, match="manifest.json: not a collapse-store/1 manifest"):
        GenerationStore(tmp_path).verify(0)


def test_an_unreadable_store_file_is_named(tmp_path, monkeypatch):
    import collapse.store as store_module

    gdir = tmp_path / "gen_000"
    gdir.mkdir()
    (gdir / "samples.npy").write_bytes(b"12345")
    manifest = {"format": "collapse-store/1", "files": {"samples.npy": {"bytes": 5, "sha256": "0" * 64}}}
    (gdir / "manifest.json").write_text(json.dumps(manifest))

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store_module, "sha256_file", denied)  # chmod 000 does not stop root
    with pytest.raises(StoreError, match=r"samples\.npy: cannot be read \(Permission denied\)"):
        GenerationStore(tmp_path).verify(0)


def test_the_report_never_saturates_a_seed_past_64_bits(tmp_path):
    from tooling.report import ReportError, read_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("workflow,seed,generation,metric,value\nreplace,99999999999999999999,0,m,1.0\n")
    with pytest.raises(ReportError, match="not an integer in the 64-bit range"):
        read_metrics(path)


def test_a_figure_never_overwrites_the_users_files(tmp_path, capsys):
    from tooling.figures import cli

    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    with pytest.raises(SystemExit) as exc:
        cli(["kazdan_gaussian", str(tmp_path / "no_runs"), "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "holds files (report.md) and no report of this tool" in err, err
    assert (out / "report.md").read_text() == "my notes\n"
    fresh = tmp_path / "fig"
    for _ in range(2):  # a figure's own folder is written again
        cli(["kazdan_gaussian", str(tmp_path / "no_runs"), "--out", str(fresh)])
    assert (fresh / "report.md").is_file() and (fresh / "report.html").is_file()
    # A figure written before figures kept a record of their files: known by its report.md, replaced whole.
    (fresh / ".report.json").unlink()
    (fresh / "notes.txt").write_text("mine\n")
    cli(["kazdan_gaussian", str(tmp_path / "no_runs"), "--out", str(fresh)])
    assert (fresh / "notes.txt").read_text() == "mine\n" and (fresh / ".report.json").is_file()


def test_a_model_too_large_for_the_memory_is_one_line_naming_the_way_on(tmp_path, capsys):
    from recipes import mnist_vae

    out = tmp_path / "run"
    argv = ["--model.hidden", "99999999999", "--out_dir", str(out), "--wandb.mode", "disabled"]
    with pytest.raises(SystemExit) as exc:
        run(mnist_vae.main, mnist_vae.MNISTVAEConfig, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: generation 0's model does not fit in this machine's memory (") and "GiB" in err
    assert "run again with --overwrite or another --out_dir" in err
    assert not list(out.glob("gen_*"))


@pytest.mark.parametrize("minutes", ["-1", "nan", "inf", "true"])
def test_checkpoint_minutes_that_are_no_time_span_are_one_line(minutes, tmp_path, capsys):
    err = refused("toy_gaussian", ["--data.num_train", "64", "--checkpoint_minutes", minutes], tmp_path, capsys)
    assert "--checkpoint_minutes" in err
