"""The analytic recipes against their closed forms, their workflows, resume, and bad input."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from collapse.tracking import WandbConfig
from datamodules.workflows import Workflow
from recipes import gaussian, kde, linear_regression
from tooling.theory import gaussian_cov_trace_ratio, gaussian_mean_sq_error, linear_regression_test_mse

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(wandb=WandbConfig(mode="disabled"), report=False, log_every=1000, workers=1)


def curves(metrics_csv: Path, metric: str, **where) -> dict[str, np.ndarray]:
    """Mean over seeds per workflow: {workflow: (G,)} for rows matching ``where``."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    with open(metrics_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["metric"] != metric or any(row[k] != str(v) for k, v in where.items()):
                continue
            acc[row["workflow"]][int(row["generation"])].append(float(row["value"]))
    return {wf: np.array([np.mean(v[g]) for g in sorted(v)]) for wf, v in acc.items()}


@pytest.mark.slow
def test_linear_regression_matches_closed_forms(tmp_path):
    # Parameters other than the published check values: d = 8, T = 30, sigma^2 = 2.
    cfg = linear_regression.LinearRegressionConfig(
        out_dir=str(tmp_path / "lr"),
        workflow=["replace", "accumulate"],
        dim=8,
        n_samples=30,
        noise_var=2.0,
        generations=12,
        num_seeds=4000,
        seed=3,
        **QUIET,
    )
    got = curves(linear_regression.main(cfg), "test_mse")
    g = np.arange(12)
    for name in ("replace", "accumulate"):
        expected = linear_regression_test_mse(Workflow.parse(name), 8, 30, 2.0, g)
        np.testing.assert_allclose(got[name], expected, rtol=0.05)
    assert got["replace"][-1] / got["replace"][0] > 10  # linear growth: 12x in expectation
    assert got["accumulate"][-1] < 1.7 * got["accumulate"][0]  # bounded by pi^2/6


@pytest.mark.slow
def test_gaussian_matches_closed_forms_and_subsample_lies_between(tmp_path):
    d, n, G = 3, 20, 15
    cfg = gaussian.GaussianConfig(
        out_dir=str(tmp_path / "g"),
        dim=d,
        n_samples=n,
        generations=G,
        num_seeds=3000,
        seed=1,
        **QUIET,
    )
    path = gaussian.main(cfg)
    mse = curves(path, "mean_sq_error")
    g = np.arange(G)
    for name in ("replace", "accumulate"):
        np.testing.assert_allclose(mse[name], gaussian_mean_sq_error(Workflow.parse(name), d, n, 1.0, g), rtol=0.06)
    tail = slice(G // 2, None)
    assert np.all(mse["accumulate"][tail] < mse["accumulate_subsample"][tail])
    assert np.all(mse["accumulate_subsample"][tail] < mse["replace"][tail])
    trace = curves(path, "cov_trace_ratio")
    np.testing.assert_allclose(
        trace["replace"], gaussian_cov_trace_ratio(Workflow.parse("replace"), d, n, g), rtol=0.05
    )


def test_gaussian_singular_covariance_gives_inf_nll_and_zero_det(tmp_path):
    cfg = gaussian.GaussianConfig(
        out_dir=str(tmp_path / "g"), workflow="replace", dim=5, n_samples=4, generations=3, num_seeds=7, **QUIET
    )
    path = gaussian.main(cfg)
    assert np.all(np.isinf(curves(path, "test_nll")["replace"]))
    assert np.all(curves(path, "cov_det_ratio")["replace"] == 0)
    assert np.all(np.isfinite(curves(path, "mean_sq_error")["replace"]))


@pytest.mark.slow
def test_kde_replace_collapses_and_accumulate_stays_flat(tmp_path):
    cfg = kde.KDEConfig(
        out_dir=str(tmp_path / "k"),
        workflow=["replace", "accumulate"],
        dataset="moons",
        bandwidth=0.1,
        n_samples=20,
        generations=20,
        num_seeds=40,
        **QUIET,
    )
    nll = curves(kde.main(cfg), "test_nll")
    assert nll["replace"][-1] > nll["replace"][0] + 1.0  # NLL rises steeply for small n
    # Accumulating never hurts here; with an undersmoothed kernel the extra points even help.
    assert nll["accumulate"][-1] < nll["accumulate"][0] + 0.1
    assert nll["accumulate"][-1] < nll["replace"][-1]


def test_kde_nll_agrees_with_a_direct_evaluation():
    rng = np.random.default_rng(0)
    prob = kde.KDEProblem("circles", 0.3, num_seeds=2, n_test=50, rng=rng)
    wf = Workflow.parse("accumulate")
    real = prob.real(30)
    ts = wf.training_set(0, 30)
    fit = prob.fit(ts, [real])
    got = prob.evaluate(fit)["test_nll"]
    h = 0.3
    sq = ((prob.test[:, :, None, :] - real[:, None, :, :]) ** 2).sum(-1)
    dens = np.exp(-sq / (2 * h * h)).mean(axis=2) / (2 * np.pi * h * h)
    np.testing.assert_allclose(got, -np.log(dens).mean(axis=1), rtol=1e-5)


def test_kde_bandwidth_rules():
    assert kde.bandwidth_for("scott", 64) == pytest.approx(64 ** (-1 / 6))
    assert kde.bandwidth_for("silverman", 64) == pytest.approx((64 * 4 / 4) ** (-1 / 6))
    assert kde.bandwidth_for(0.5, 10) == 0.5
    for name in kde.DATASETS:
        pts = kde.make_points(name, np.random.default_rng(1), 3, 200)
        assert pts.shape == (3, 200, 2) and np.isfinite(pts).all()


OTHER_WORKFLOWS = [
    "replace_multiple(multiplier=2)",
    "accumulate_subsample(size=10)",
    "mix(real=16, synthetic=32)",
    "mix(real=16, synthetic=0)",
    "fresh_real(per_generation=8)",
    "accumulate(multiplier=0.5)",
]


@pytest.mark.parametrize("recipe", ["linear_regression", "gaussian", "kde"])
def test_every_workflow_runs_in_every_recipe(tmp_path, recipe):
    common = dict(out_dir=str(tmp_path / recipe), workflow=OTHER_WORKFLOWS, generations=4, num_seeds=5, **QUIET)
    if recipe == "linear_regression":
        cfg = linear_regression.LinearRegressionConfig(dim=3, n_samples=16, noise_var=1.0, **common)
    elif recipe == "gaussian":
        cfg = gaussian.GaussianConfig(dim=2, n_samples=16, **common)
    else:
        cfg = kde.KDEConfig(dataset="blobs", bandwidth="scott", n_samples=16, **common)
    path = sys.modules[f"recipes.{recipe}"].main(cfg)
    rows = list(csv.DictReader(open(path, newline="")))
    labels = {Workflow.parse(w).label for w in OTHER_WORKFLOWS}
    assert {r["workflow"] for r in rows} == labels
    assert all(np.isfinite(float(r["value"])) for r in rows if r["metric"] != "test_nll" or recipe != "gaussian")
    assert {int(r["generation"]) for r in rows} == {0, 1, 2, 3}
    assert {int(r["seed"]) for r in rows} == set(range(5))


def _run_gaussian(out: Path, seed: int = 0) -> Path:
    cfg = gaussian.GaussianConfig(
        out_dir=str(out), dim=[2, 4], n_samples=[8, 30], generations=6, num_seeds=9, seed=seed, **QUIET
    )
    return gaussian.main(cfg)


def test_seeded_runs_are_reproducible_and_seeds_matter(tmp_path):
    a = _run_gaussian(tmp_path / "a").read_bytes()
    b = _run_gaussian(tmp_path / "b").read_bytes()
    c = _run_gaussian(tmp_path / "c", seed=1).read_bytes()
    assert a == b
    assert a != c


def test_rerun_resumes_without_recomputing_finished_cells(tmp_path, capsys):
    out = tmp_path / "run"
    first = _run_gaussian(out).read_bytes()
    cells = sorted((out / "cells").glob("*.csv"))
    mtimes = {p: p.stat().st_mtime_ns for p in cells}
    cells[3].unlink()  # as if the run had been killed before that cell finished
    cells[3].with_suffix(".json").unlink()
    capsys.readouterr()
    again = _run_gaussian(out).read_bytes()
    assert again == first
    assert capsys.readouterr().out.count("finished earlier, kept") == len(cells) - 1
    for p in cells[:3] + cells[4:]:
        assert p.stat().st_mtime_ns == mtimes[p]


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_unbroken_result(tmp_path):
    args = ["--dim", "[2, 6]", "--n_samples", "[10, 300]", "--generations", "40", "--num_seeds", "200",
            "--wandb.mode", "disabled", "--report", "false"]  # fmt: skip
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "recipes/gaussian.py", "--out_dir", str(ref), *args], cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "recipes/gaussian.py", "--out_dir", str(out), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 60
    # Two cells with their records (written last): the workers die with the run, so a cell whose record is
    # not written yet when the run is killed is recomputed, and would not count as finished earlier.
    while time.time() < deadline and len(list((out / "cells").glob("*.json"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.csv").exists()
    assert not list((out / "cells").glob(".*tmp*")) or True  # a torn temp file may remain; it is never read
    done = subprocess.run([sys.executable, "recipes/gaussian.py", "--out_dir", str(out), *args], cwd=ROOT,
                          check=True, capture_output=True, text=True)  # fmt: skip
    assert "finished earlier, kept" in done.stdout
    assert (out / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()


def test_analytic_recipes_do_not_import_torch_or_lightning(tmp_path):
    code = (
        "import sys\n"
        "from recipes import gaussian, kde, linear_regression\n"
        "from tooling.report import make_report\n"
        f"gaussian.run(gaussian.main, gaussian.GaussianConfig, ['--out_dir', r'{tmp_path}', '--dim', '2',"
        " '--n_samples', '8', '--generations', '3', '--num_seeds', '2', '--wandb.mode', 'disabled'])\n"
        "bad = [m for m in ('torch', 'lightning', 'pytorch_lightning') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    assert (tmp_path / "report" / "report.md").is_file()


BAD = [
    (["--workflow", "acumulate"], "unknown workflow 'acumulate'; valid workflows: replace, replace_multiple"),
    (["--n_samples", "-5"], "--n_samples must be positive integers, got -5"),
    (["--dim", "0"], "--dim must be positive integers, got 0"),
    (["--generations", "0"], "--generations must be positive integers, got 0"),
    (["--workflow", "accumulate_subsample(size=50)", "--n_samples", "20"], "larger than its pool"),
    (["--workflow", "mix(real=5)"], "needs both counts"),
    (["--dim", "[2, 2]"], "--dim lists 2 twice"),
    (["--wandb.mode", "bogus"], "--wandb.mode must be one of offline, online, disabled"),
    (["--sigma2", "1e308"], "--sigma2 must be between 1e-100 and 1e+100"),
    (["--log_every", "0"], "--log_every must be an integer >= 1"),
    (["--log_every", "-1"], "--log_every must be an integer >= 1"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    res = subprocess.run(
        [sys.executable, "recipes/gaussian.py", "--out_dir", str(tmp_path / "x"), "--wandb.mode", "disabled", *args],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ")
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()  # refused before anything was written


KDE_BAD = [
    (["--dataset", "[]"], "--dataset is empty"),
    (["--bandwidth", "[]"], "--bandwidth is empty"),
    (["--bandwidth", "1e-300"], "--bandwidth must be between 1e-12 and 1e+12"),
    (["--bandwidth", "[0.1, 1e300]"], "--bandwidth must be between 1e-12 and 1e+12"),
]


@pytest.mark.parametrize("args,message", KDE_BAD)
def test_bad_kde_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    res = subprocess.run(
        [sys.executable, "recipes/kde.py", "--out_dir", str(tmp_path / "x"), "--wandb.mode", "disabled", *args],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "x").exists()  # so the corrected command is not refused as a different config


@pytest.mark.parametrize("flags", ["seed: null\n", "workers: null\n", "log_every: null\n", "out_dir: null\n"])
def test_a_null_in_a_config_file_for_a_flag_that_needs_a_value_is_one_line(tmp_path, flags):
    config = tmp_path / "flags.yaml"
    config.write_text(flags)
    res = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "gaussian.py"), "--out_dir", str(tmp_path / "x"), "--wandb.mode",
         "disabled", "--config", str(config)],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    expected = f"error: --{flags.split(':')[0]} cannot be empty (null); give it a value or leave it out for its default"
    assert res.returncode == 2 and res.stderr == expected + "\n"
    assert list(tmp_path.iterdir()) == [config]  # nothing written, not even a folder named after the null


def test_a_cell_beyond_the_machine_s_memory_is_one_line(tmp_path):
    # 1.46 TiB of kernel centres, in a process whose address space is capped at 16 GiB: refused at once by the
    # allocator whatever the machine's overcommit policy (nothing is touched).
    resource = pytest.importorskip("resource")  # POSIX

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

    args = ["--dataset", "moons", "--bandwidth", "0.5", "--n_samples", "100000000000", "--generations", "2",
            "--num_seeds", "2", "--wandb.mode", "disabled", "--out_dir", str(tmp_path / "x")]  # fmt: skip
    res = subprocess.run(
        [sys.executable, "recipes/kde.py", *args], cwd=ROOT, capture_output=True, text=True, preexec_fn=cap
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: cell replace dataset=moons"), res.stderr
    assert "does not fit in memory" in res.stderr and "Traceback" not in res.stderr


def test_out_dir_with_a_different_config_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    _run_gaussian(out)
    base = ["--out_dir", str(out), "--dim", "[2, 4]", "--n_samples", "[8, 30]", "--num_seeds", "9",
            "--wandb.mode", "disabled", "--report", "false"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        gaussian.run(gaussian.main, gaussian.GaussianConfig, base + ["--generations", "7"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "different config (generations: 6 -> 7)" in err and "--overwrite true" in err
    gaussian.run(gaussian.main, gaussian.GaussianConfig, base + ["--generations", "7", "--overwrite", "true"])
    assert max(int(r["generation"]) for r in csv.DictReader(open(out / "metrics.csv"))) == 6


def _cut_one_metric(lines: list[str]) -> list[str]:
    last_metric = lines[-1].split(",")[-2]
    return [line for line in lines if line.split(",")[-2] != last_metric]  # a cut at a block boundary


DAMAGE = {
    "cut at the end": lambda lines: lines[:-5],
    "one metric cut off": _cut_one_metric,
    "a value edited": lambda lines: [*lines[:-1], lines[-1].rsplit(",", 1)[0] + ",0.5"],
}


@pytest.mark.parametrize("damage", [*DAMAGE, "binary", "no record"])
def test_damaged_cell_files_are_named_and_recomputed_never_half_read(tmp_path, capsys, damage):
    out = tmp_path / "run"
    first = _run_gaussian(out).read_bytes()
    victim = sorted((out / "cells").glob("*.csv"))[0]
    if damage == "binary":
        victim.write_bytes(bytes(range(256)) * 4)
    elif damage == "no record":
        victim.with_suffix(".json").unlink()
    else:
        victim.write_text("\n".join(DAMAGE[damage](victim.read_text().splitlines())) + "\n")
    capsys.readouterr()
    assert _run_gaussian(out).read_bytes() == first
    printed = capsys.readouterr().out
    assert f"{victim}" in printed and "recomputing" in printed
    assert printed.count("finished earlier, kept") == len(list((out / "cells").glob("*.csv"))) - 1


def test_help_and_print_config_document_the_flags(tmp_path):
    for script in ("linear_regression", "gaussian", "kde"):
        res = subprocess.run([sys.executable, f"recipes/{script}.py", "--help"], cwd=ROOT, capture_output=True,
                             text=True, check=True)  # fmt: skip
        for flag in ("--out_dir", "--workflow", "--generations", "--seed", "--num_seeds", "--n_samples"):
            assert flag in res.stdout, (script, flag)
        printed = subprocess.run([sys.executable, f"recipes/{script}.py", "--print_config"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
        cfg_file = tmp_path / f"{script}.yaml"
        cfg_file.write_text(printed.replace("generations: ", "generations: 2 #"))
        again = subprocess.run([sys.executable, f"recipes/{script}.py", "--config", str(cfg_file), "--print_config"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "generations: 2" in again


def test_a_pool_over_the_memory_budget_is_memory_mapped_with_identical_results(tmp_path):
    from engine.analytic import simulate

    wf = Workflow.parse("accumulate_subsample")
    results = []
    for budget, scratch in ((2 << 30, None), (1, tmp_path / "scratch")):
        problem = gaussian.GaussianProblem(3, 20, 1.0, 10, np.random.default_rng(0))
        results.append(simulate(problem, wf, 15, 8, 20, seed=0, stream=5, scratch=scratch, memory_budget=budget))
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir())[:2] == ["set_000.npy", "set_001.npy"]
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = gaussian.GaussianConfig(
        out_dir=str(out), workflow="accumulate", dim=2, n_samples=8, generations=3, num_seeds=4,
        wandb=WandbConfig(mode="offline"), report=False,
    )  # fmt: skip
    gaussian.main(cfg)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    saved = runs[0] / "files" / "metrics.csv"
    assert saved.read_text() == (out / "metrics.csv").read_text()
    assert list(runs[0].glob("*.wandb")), "the offline run log (history) is missing"


@pytest.mark.slow
def test_wandb_offline_grid_has_one_run_per_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    _tracked_gaussian(out, workflow=["replace", "accumulate"], n_samples=8)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(list(run.glob("*.wandb")) for run in runs)
    held = sorted(p.name for run in runs for p in (run / "files").glob("*.csv"))
    assert held == sorted(p.name for p in (out / "cells").glob("*.csv"))  # each run holds its own cell's rows


def _tracked_gaussian(out: Path, **overrides) -> Path:
    settings = dict(out_dir=str(out), dim=2, generations=3, num_seeds=4, report=False, log_every=1000, workers=1)
    return gaussian.main(gaussian.GaussianConfig(**{**settings, **overrides}, wandb=WandbConfig(mode="offline")))


def test_a_one_cell_run_logs_plain_metric_names_with_the_cell_in_its_wandb_config(tmp_path, fake_wandb):
    metrics = _tracked_gaussian(tmp_path / "run", workflow="replace", n_samples=8)  # a sweep run: one cell
    (run,) = fake_wandb
    assert [row["generation"] for row in run.rows] == [0, 1, 2]
    assert all(row.keys() == {"generation", *gaussian.GaussianProblem.metrics} for row in run.rows)
    for name in gaussian.GaussianProblem.metrics:  # each generation's mean over seeds, as metrics.csv holds them
        assert [row[name] for row in run.rows] == pytest.approx(curves(metrics, name)["replace"], rel=1e-12)
    config = run.kwargs["config"]
    assert (config["workflow"], config["dim"], config["n_samples"], config["num_seeds"]) == ("replace", 2, 8, 4)
    assert (run.kwargs["group"], run.kwargs["name"], run.kwargs["job_type"]) == ("gaussian", "run", "replace")
    assert run.files == ["metrics.csv"] and run.finished


def test_a_grid_logs_each_cell_to_a_wandb_run_of_its_own(tmp_path, fake_wandb):
    out = tmp_path / "grid"
    metrics = _tracked_gaussian(out, workflow=["replace", "accumulate"], n_samples=[8, 12])
    cells = {f"{wf} dim=2 n_samples={n}": (wf, n) for wf in ("replace", "accumulate") for n in (8, 12)}
    assert sorted(run.kwargs["name"] for run in fake_wandb) == sorted(cells)
    assert len({run.kwargs["id"] for run in fake_wandb}) == len(cells)
    for run in fake_wandb:
        wf, n = cells[run.kwargs["name"]]
        assert run.kwargs["group"] == "grid" and run.kwargs["job_type"] == wf and f"workflow={wf}" in run.kwargs["tags"]
        assert (run.kwargs["config"]["workflow"], run.kwargs["config"]["n_samples"]) == (wf, n)
        assert [row["generation"] for row in run.rows] == [0, 1, 2]
        expected = curves(metrics, "mean_sq_error", n_samples=n)[wf]
        assert [row["mean_sq_error"] for row in run.rows] == pytest.approx(expected, rel=1e-12)
        assert run.finished and len(run.files) == 1 and (out / "cells" / run.files[0]).is_file()
    _tracked_gaussian(out, workflow=["replace", "accumulate"], n_samples=[8, 12])  # resumed: nothing new to log
    assert len(fake_wandb) == len(cells)


def test_worker_processes_give_the_same_numbers(tmp_path):
    one = _run_gaussian(tmp_path / "one")
    cfg = gaussian.GaussianConfig(
        out_dir=str(tmp_path / "two"),
        dim=[2, 4],
        n_samples=[8, 30],
        generations=6,
        num_seeds=9,
        **{**QUIET, "workers": 2},
    )
    two = gaussian.main(cfg)
    rows_one = list(csv.reader(open(one, newline="")))
    rows_two = list(csv.reader(open(two, newline="")))
    assert [r[:-1] for r in rows_one] == [r[:-1] for r in rows_two]
    # BLAS may sum in another order with one thread per worker: equal up to rounding.
    np.testing.assert_allclose([float(r[-1]) for r in rows_one[1:]], [float(r[-1]) for r in rows_two[1:]], rtol=1e-9)


def test_summarised_synthetic_sets_match_drawn_points_in_distribution():
    # Replace through drawn sufficient statistics vs through drawn points: same law for the fit.
    class PointsOnly(gaussian.GaussianProblem):
        sample_summary = None

    from engine.analytic import simulate

    wf = Workflow.parse("replace")
    runs = [
        simulate(cls(4, 4000, 1.0, 10, np.random.default_rng(7)), wf, 12, 6, 4000, seed=7)
        for cls in (gaussian.GaussianProblem, PointsOnly)
    ]
    for metric in ("mean_sq_error", "cov_trace_ratio"):
        a, b = runs[0][metric][-1], runs[1][metric][-1]
        se = np.sqrt(a.var() / a.size + b.var() / b.size)
        assert abs(a.mean() - b.mean()) < 4 * se, metric


def test_one_degenerate_seed_does_not_make_the_others_singular():
    problem = gaussian.GaussianProblem(2, 2, 1.0, 50, np.random.default_rng(0))
    points = np.random.default_rng(1).standard_normal((2, 10, 2))
    points[1, :, 1] = 2 * points[1, :, 0]  # seed 1's points lie on a line: singular covariance
    ts = Workflow.parse("accumulate").training_set(0, 10)
    both = problem.evaluate(problem.fit(ts, [points]))
    alone = gaussian.GaussianProblem(2, 1, 1.0, 50, np.random.default_rng(0))
    alone.test_mean, alone.test_cov = problem.test_mean[:1], problem.test_cov[:1]
    first = alone.evaluate(alone.fit(ts, [points[:1]]))
    for name in first:
        np.testing.assert_allclose(both[name][0], first[name][0], rtol=1e-12)
    assert np.isinf(both["test_nll"][1]) and both["cov_det_ratio"][1] == 0.0
    assert np.isfinite(problem.sample(problem.fit(ts, [points]), np.random.default_rng(2), 5)).all()


@pytest.mark.parametrize(
    "workflow", ["mix(real=3, synthetic=9)", "replace(multiplier=0.1)", "accumulate_subsample(size=4)"]
)
def test_linear_regression_refuses_training_sets_smaller_than_dim(tmp_path, capsys, workflow):
    with pytest.raises(SystemExit):
        linear_regression.run(linear_regression.main, linear_regression.LinearRegressionConfig, [
            "--out_dir", str(tmp_path / "x"), "--dim", "5", "--n_samples", "10", "--workflow", f"[{workflow!r}]",
            "--wandb.mode", "disabled"])  # fmt: skip
    assert "smaller than --dim 5" in capsys.readouterr().err


def test_linear_regression_survives_a_rank_deficient_subsample(tmp_path):
    # T = 7 design rows, d = 5: a subsample of 7 pool examples can repeat design rows and span < d.
    cfg = linear_regression.LinearRegressionConfig(
        out_dir=str(tmp_path / "lr"), workflow="accumulate_subsample", dim=5, n_samples=7, generations=20,
        num_seeds=50, **QUIET,
    )  # fmt: skip
    rows = list(csv.DictReader(open(linear_regression.main(cfg), newline="")))
    assert len(rows) == 20 * 50 and all(np.isfinite(float(r["value"])) for r in rows)
