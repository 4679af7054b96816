"""The report command: plots and tables from hand-made run dirs with known numbers."""

from __future__ import annotations

import csv
import math
import re
import struct

import numpy as np
import pytest
import yaml

from datamodules.workflows import Workflow
from tooling import report
from tooling.report import cli, fmt, make_report, read_metrics, t_quantile, workflow_colours

T975_4DOF = 2.776445  # two-sided 95% Student t quantile, 4 degrees of freedom (5 seeds)
MIX = "mix(real=256, synthetic=1024)"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(path, recipe, grid, rows, **config):
    """A run dir with config.yaml and metrics.csv; rows: (workflow, *grid values, seed, generation, metric, value)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"recipe": recipe, "out_dir": str(path), **config}))
    with open(path / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["workflow", *grid, "seed", "generation", "metric", "value"])
        w.writerows(rows)
    return path


def lr_values(seeds=5, generations=4):
    """Known test_mse values per workflow: (seeds, generations) arrays."""
    rng = np.random.default_rng(7)
    return {wf: 0.1 * (1 + np.arange(generations)) * rng.uniform(0.5, 1.5, (seeds, 1)) for wf in ("replace", MIX)}


def lr_rows(values, cell=("2", "20", "1.0")):
    return [
        (wf, *cell, s, g, "test_mse", repr(float(arr[s, g])))
        for wf, arr in values.items()
        for s in range(arr.shape[0])
        for g in range(arr.shape[1])
    ]


def table_row(md: str, *prefix: str) -> list[str]:
    """The cells of the first table row that starts with ``prefix``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[: len(prefix)] == list(prefix):
            return cells
    raise AssertionError(f"no table row starting with {prefix}:\n{md}")


def mean_ci(cell: str) -> tuple[float, float]:
    m = re.match(r"^(\S+) ± (\S+)", cell)
    assert m, cell
    return float(m.group(1)), float(m.group(2))


def expected(arr: np.ndarray) -> tuple[float, float]:
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()), float(T975_4DOF * arr.std(ddof=1) / math.sqrt(arr.size))


def is_png(path) -> bool:
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC) or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width > 100 and height > 100


def test_t_quantile_matches_tables():
    table = {1: 12.7062, 2: 4.3027, 4: 2.7764, 10: 2.2281, 30: 2.0423, 100: 1.9840, 5000: 1.9604, 10**6: 1.9600}
    for df, value in table.items():
        assert t_quantile(df) == pytest.approx(value, abs=1e-4)
    assert t_quantile(4, 0.99) == pytest.approx(4.6041, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile(0)


def test_linear_regression_report_means_ci_and_theory(tmp_path):
    values = lr_values()
    run = write_run(tmp_path / "lr", "linear_regression", ["dim", "n_samples", "noise_var"], lr_rows(values))
    report = make_report([run], tmp_path / "out", warn=None)
    assert report == tmp_path / "out" / "report.md"
    png = tmp_path / "out" / "linear_regression_test_mse.png"
    assert is_png(png)
    md = report.read_text()
    assert "![linear_regression test_mse](linear_regression_test_mse.png)" in md
    header = table_row(md, "dim")
    assert header == ["dim", "n_samples", "noise_var", "workflow", "gen 0", "gen 3", "theory (gen 3)", "seeds"]

    row = table_row(md, "2", "20", "1.0", "replace")
    for col, g in ((4, 0), (5, 3)):
        mean, half = mean_ci(row[col])
        exp_mean, exp_half = expected(values["replace"][:, g])
        assert mean == pytest.approx(exp_mean, rel=1e-3)
        assert half == pytest.approx(exp_half, rel=0.05)  # half-widths are printed to 2 significant digits
    # replace: sigma^2 d / (T - d - 1) * (g + 1) at g = 3
    assert float(row[6]) == pytest.approx(1.0 * 2 / (20 - 2 - 1) * 4, rel=1e-3)
    assert row[7] == "5"

    # A label with commas is quoted in the CSV and comes back whole; it has no closed form here.
    mix = table_row(md, "2", "20", "1.0", MIX)
    assert Workflow.parse(mix[3]).label == MIX
    assert mix[6] == ""
    assert mean_ci(mix[5])[0] == pytest.approx(expected(values[MIX][:, 3])[0], rel=1e-3)


def test_non_finite_values_are_excluded_and_counted(tmp_path):
    nll = np.array([[1.0, 2.0], [1.5, np.inf], [2.0, 4.0], [2.5, np.nan], [3.0, -np.inf]])  # (seeds, generations)
    rows = [("replace", "3", "2", s, g, "test_nll", repr(float(nll[s, g]))) for s in range(5) for g in range(2)]
    rows += [("accumulate", "3", "2", s, g, "test_nll", "inf") for s in range(5) for g in range(2)]
    run = write_run(tmp_path / "g", "gaussian", ["dim", "n_samples"], rows, sigma2=1.0)
    md = make_report(run, tmp_path / "out", warn=None).read_text()
    row = table_row(md, "3", "2", "replace")
    mean, half = mean_ci(row[3])
    assert mean == pytest.approx(expected(nll[:, 0])[0], rel=1e-3)
    assert half == pytest.approx(expected(nll[:, 0])[1], rel=0.05)
    # Generation 1: two finite values (2, 4) -> 1 degree of freedom.
    assert row[4].startswith("3 ± ")
    assert "n=2, 3 non-finite excluded" in row[4]
    assert mean_ci(row[4])[1] == pytest.approx(12.7062 * math.sqrt(2.0) / math.sqrt(2), rel=0.05)
    only_inf = table_row(md, "3", "2", "accumulate")
    assert only_inf[3] == "— (all 5 non-finite)"
    assert is_png(tmp_path / "out" / "gaussian_test_nll.png")


def test_runs_of_one_recipe_merge_and_recipes_get_sections(tmp_path):
    values = lr_values()
    rows = lr_rows(values)
    a = write_run(tmp_path / "a", "linear_regression", ["dim", "n_samples", "noise_var"], [r for r in rows if r[4] < 3])
    # The second run repeats seed 2 (kept once) and adds seeds 3 and 4.
    b = write_run(
        tmp_path / "b", "linear_regression", ["dim", "n_samples", "noise_var"], [r for r in rows if r[4] >= 2]
    )
    lit = write_run(
        tmp_path / "lit",
        "vae_mnist",
        [],
        [("accumulate", s, g, "val_loss", str(1.0 + s + g)) for s in range(3) for g in range(3)],
    )
    md = make_report([a, b, lit], tmp_path / "out", metrics="test_mse,val_loss", warn=None).read_text()
    assert "## linear_regression" in md and "## vae_mnist" in md
    row = table_row(md, "2", "20", "1.0", "replace")
    assert row[-1] == "5"
    assert mean_ci(row[5]) == pytest.approx(expected(values["replace"][:, 3]), rel=0.05)
    assert "only the first was kept" in md
    assert table_row(md, "accumulate")[1:] == ["2 ± 2.5", "4 ± 2.5", "3"]
    assert is_png(tmp_path / "out" / "vae_mnist_val_loss.png")


def test_unusable_run_dirs_are_skipped_with_one_line(tmp_path, capsys):
    good = write_run(tmp_path / "good", "linear_regression", ["dim", "n_samples", "noise_var"], lr_rows(lr_values()))
    unfinished = tmp_path / "unfinished"
    (unfinished / "cells").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("recipe: gaussian\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.csv").write_text("workflow,dim,generation,metric\nreplace,1,0,x\n")
    assert (
        cli([str(good), str(unfinished), str(bad), str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) is None
    )
    report = tmp_path / "out" / "report.md"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("warning: skipped ") for line in err)
    assert any("unfinished: no metrics.csv (unfinished run?); it holds cells/, config.yaml" in e for e in err)
    assert any("lacks columns seed, value" in e for e in err)
    assert any("missing: no such directory" in e for e in err)
    assert "Skipped run dirs" in report.read_text()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such directory"),
        (lambda p: (p.mkdir(), (p / "config.yaml").write_text("recipe: kde\n")), "no metrics.csv (unfinished run?)"),
        (lambda p: (p.mkdir(), (p / "metrics.csv").write_text("")), "metrics.csv is empty"),
        (
            lambda p: (
                p.mkdir(),
                (p / "metrics.csv").write_text("workflow,seed,generation,metric,value\nreplace,0,0\n"),
            ),
            "data row 1: expected 5 fields",
        ),
        (
            lambda p: (
                p.mkdir(),
                (p / "metrics.csv").write_text("workflow,seed,generation,metric,value\nreplace,0,0,m,x\n"),
            ),
            "value 'x' is not a number",
        ),
    ],
)
def test_no_usable_run_dir_exits_2_with_one_error_line(tmp_path, capsys, make, message):
    run = tmp_path / "run"
    make(run)
    with pytest.raises(SystemExit) as exc:
        cli([str(run), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_cell_filter_panel_cap_and_metric_filter(tmp_path):
    rows = []
    for dim in ("1", "2", "3"):
        values = lr_values(seeds=2, generations=2)
        rows += lr_rows({"accumulate": values["replace"]}, cell=(dim, "50", "1.0"))
        rows += [("accumulate", dim, "50", "1.0", s, g, "other", "1") for s in range(2) for g in range(2)]
    run = write_run(tmp_path / "lr", "linear_regression", ["dim", "n_samples", "noise_var"], rows)
    md = make_report(run, tmp_path / "o1", metrics=["test_mse"], cells=["dim=2", "dim=3.0"], max_panels=1, warn=None)
    text = md.read_text()
    assert "### other" not in text and not (tmp_path / "o1" / "linear_regression_other.png").exists()
    assert "showing 1 of 2 cells" in text
    table_row(text, "2", "50", "1.0", "accumulate")
    table_row(text, "3", "50", "1.0", "accumulate")
    assert "| 1 | 50 |" not in text
    with pytest.raises(SystemExit):
        cli([str(run), "--out", str(tmp_path / "o2"), "--metrics", "nope"])


def test_read_metrics_streams_quoted_labels(tmp_path):
    run = write_run(
        tmp_path / "r", "gaussian", ["dim"], [(MIX, "1", 0, 0, "m", "nan"), ("replace", "1", 0, 0, "m", "")]
    )
    grid, series, rows = read_metrics(run / "metrics.csv")
    assert grid == ("dim",) and rows == 2
    assert set(series) == {("m", MIX, ("1",)), ("m", "replace", ("1",))}
    assert all(np.isnan(v[2]).all() for v in series.values())


def test_formatting_and_colours():
    assert [fmt(x) for x in (0.0, 1234.5678, 1.23456e-5, 2.5e7, float("inf"), float("nan"))] == [
        "0",
        "1235",
        "1.235e-5",
        "2.5e7",
        "inf",
        "nan",
    ]
    assert [fmt(x, 2) for x in (150.0, 1234.5, 0.0512, 0.99999)] == ["150", "1200", "0.051", "1"]
    colours = workflow_colours(["accumulate", "replace", "accumulate_subsample", MIX, "replace(multiplier=2)"])
    assert colours["replace"] == "#d62728" and colours["accumulate"] == "#1f77b4"
    assert colours["accumulate_subsample"] == "#2ca02c"
    assert len(set(colours.values())) == 5


def test_gaussian_theory_uses_sigma2_from_config(tmp_path):
    d, n, sigma2, last = 2, 10, 2.0, 3
    rows = [("replace", str(d), str(n), s, g, "mean_sq_error", "0.5") for s in range(3) for g in range(last + 1)]
    run = write_run(tmp_path / "g", "gaussian", ["dim", "n_samples"], rows, sigma2=sigma2)
    md = make_report(run, tmp_path / "out", warn=None).read_text()
    row = table_row(md, str(d), str(n), "replace")
    # replace with synthetic sets of n samples: d sigma^2 (1 - ((n - 1) / n)^(g + 1))
    assert float(row[5]) == pytest.approx(d * sigma2 * (1 - ((n - 1) / n) ** (last + 1)), rel=1e-3)
    assert row[3] == "0.5 ± 0"  # identical values: a zero-width interval

    # A second run with another sigma2 is another experiment: its own cells, its own theory.
    other = write_run(tmp_path / "g1", "gaussian", ["dim", "n_samples"], rows, sigma2=1.0)
    md = make_report([run, other], tmp_path / "out2", warn=None).read_text()
    assert table_row(md, "dim")[:4] == ["dim", "n_samples", "sigma2", "workflow"]
    for s2 in (1.0, sigma2):
        row = table_row(md, str(d), str(n), str(s2), "replace")
        assert float(row[6]) == pytest.approx(d * s2 * (1 - ((n - 1) / n) ** (last + 1)), rel=1e-3)
        assert row[-1] == "3"
    assert "the runs differ in sigma2" in md and "only the first was kept" not in md


@pytest.mark.parametrize(
    ("text", "fast_path"),
    [
        ("replace,1,0,0,m,1.5\n", True),  # the recipes' own format
        ('"mix(real=2, synthetic=3)",1,0,0,m,1.5\r\nreplace,1,1,0,m,inf\r\n', True),  # quoted label, CRLF
        ("replace,1,0,0,m,1.5\nreplace,1,1,0,m,nan", True),  # no final newline
        ("replace,1,0,0,m,1.5\n\nreplace,1,1,0,m,nan\n", False),  # blank line
        ("replace,1,0,0,m,\nreplace,1,1,0,m,-inf\n", False),  # empty value: missing
        ('replace,1,0,0,"m",2\n', False),  # quoted metric
    ],
)
def test_fast_and_general_readers_agree(tmp_path, text, fast_path):
    from tooling.report import _header, _read_blocks, _read_rows

    path = tmp_path / "metrics.csv"
    path.write_bytes(("workflow,dim,seed,generation,metric,value\n" + text).encode())
    header = _header(path)
    general = _read_rows(path, header)
    fast = _read_blocks(path, header)
    assert (fast is not None) == fast_path
    if fast is not None:
        assert fast[0] == general[0]
        for a, b in zip(fast[1:], general[1:]):
            assert np.array_equal(a, b, equal_nan=True)
    grid, series, rows = read_metrics(path)
    assert rows == len(general[1]) and grid == ("dim",)


def test_fast_reader_handles_the_recipes_format(tmp_path):
    from tooling.report import _header, _read_blocks

    run = write_run(tmp_path / "r", "linear_regression", ["dim", "n_samples", "noise_var"], lr_rows(lr_values()))
    path = run / "metrics.csv"
    parsed = _read_blocks(path, _header(path))
    assert parsed is not None
    assert {k[0] for k in parsed[0]} == {"replace", MIX}


def test_bad_flags_give_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "r", "linear_regression", ["dim", "n_samples", "noise_var"], lr_rows(lr_values()))
    out = ["--out", str(tmp_path / "out")]
    for argv in ([*out, "--log_y", "maybe"], [*out, "--cells", "dim"], [*out, "--cells", "dim=7"], []):
        with pytest.raises(SystemExit) as exc:
            cli([str(run), *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_a_panel_with_only_infinite_values_does_not_break_a_log_axis(tmp_path):
    run = tmp_path / "g"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: gaussian\nsigma2: 1.0\n")
    lines = ["workflow,dim,n_samples,seed,generation,metric,value"]
    for seed in range(3):
        for g in range(4):
            lines.append(f"replace,10,10,{seed},{g},test_nll,inf")
            lines.append(f"replace,10,1000,{seed},{g},test_nll,{10.0 ** (g + seed / 10)}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    report = make_report([run], tmp_path / "out", log_y="auto")
    assert (tmp_path / "out" / "gaussian_test_nll.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "non-finite" in report.read_text()


def test_runs_with_different_seeds_keep_rows_whose_seed_labels_overlap(tmp_path):
    runs = []
    for base, offset in ((0, 0.0), (1, 10.0)):
        run = tmp_path / f"s{base}"
        run.mkdir()
        (run / "config.yaml").write_text(f"recipe: gaussian\nseed: {base}\nnum_seeds: 2\n")
        rows = ["workflow,dim,n_samples,seed,generation,metric,value"]
        rows += [f"replace,2,4,{base + s},0,mean_sq_error,{offset + s}" for s in range(2)]
        (run / "metrics.csv").write_text("\n".join(rows) + "\n")
        runs.append(run)
    text = make_report(runs, tmp_path / "out").read_text()
    assert "only the first was kept" not in text
    assert "| 5.5 ± 9.2 (n=4) |" in text  # mean of 0, 1, 10, 11: all four rows kept


# ---- sample pictures -----------------------------------------------------------------------------

IMAGE_WORKFLOWS = ("accumulate", "replace", "accumulate_subsample")  # listed out of report order on purpose


def grey_level(workflow: str, seed: int, generation: int) -> int:
    """A distinct solid grey per (workflow, seed, generation), so the composed figure can be read back."""
    assert generation < 12 and seed in (0, 1, 3)  # keeps the levels distinct and within 0..255
    return 20 + 75 * IMAGE_WORKFLOWS.index(workflow) + 5 * generation + 2 * seed


def write_image_run(path, workflow, seed, generations=3, skip=(), corrupt=(), recipe="vae_mnist", **config):
    """A run dir of an image recipe: metrics plus gen_XXX/{manifest.json, samples.png} (a solid grey picture)."""
    from PIL import Image

    rows = [(workflow, seed, g, "val_loss", str(1.0 + g)) for g in range(generations)]
    write_run(path, recipe, [], rows, workflow=workflow, seed=seed, **config)
    for g in range(generations):
        folder = path / f"gen_{g:03d}"
        folder.mkdir()
        (folder / "manifest.json").write_text("{}")
        if g in skip:
            continue
        if g in corrupt:
            (folder / "samples.png").write_bytes(b"\x00garbage, not a picture\xff" * 8)
        else:
            Image.fromarray(np.full((240, 240), grey_level(workflow, seed, g), np.uint8)).save(folder / "samples.png")
    return path


def grey_pixels(png, level: int) -> np.ndarray:
    """(row, col) of the figure's pixels whose colour is exactly the grey ``level``."""
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return np.argwhere((rgb == level).all(axis=2))


def test_samples_figure_shows_the_smallest_seed_per_workflow_in_report_order(tmp_path, capsys):
    runs = []
    for wf in IMAGE_WORKFLOWS:
        for seed in (1, 0):  # the larger seed first: the choice must not depend on the order given
            skip = (1,) if (wf, seed) == ("accumulate", 0) else ()
            runs.append(write_image_run(tmp_path / f"{wf}_{seed}", wf, seed, skip=skip))
    # An unfinished generation's picture is never shown, even with its own grey level.
    partial = tmp_path / "replace_0" / ".gen_005.partial"
    partial.mkdir()
    from PIL import Image

    Image.fromarray(np.full((240, 240), 250, np.uint8)).save(partial / "samples.png")

    md = make_report(runs, tmp_path / "out").read_text()
    png = tmp_path / "out" / "samples_vae_mnist.png"
    assert is_png(png)
    assert capsys.readouterr().err == ""
    assert "### Samples" in md and "![vae_mnist samples](samples_vae_mnist.png)" in md
    assert "replace: seed 0; accumulate: seed 0; accumulate_subsample: seed 0" in md
    assert "at generations 0, 1, 2." in md and "gen 5" not in md
    assert "Shown as missing: accumulate gen 1 (no samples.png)." in md
    # Pictures before metrics within the recipe's section.
    assert md.index("## vae_mnist") < md.index("### Samples") < md.index("### val_loss")

    centres = {}
    for wf in IMAGE_WORKFLOWS:
        for g in range(3):
            shown = grey_pixels(png, grey_level(wf, 0, g))
            if (wf, g) == ("accumulate", 1):
                assert len(shown) < 500  # its picture is missing: the panel says so instead
                continue
            assert len(shown) > 200 * 200, (wf, g)  # a whole panel of it
            centres[wf, g] = shown.mean(axis=0)
            assert len(grey_pixels(png, grey_level(wf, 1, g))) < 500  # seed 1 is not shown
    assert len(grey_pixels(png, 250)) < 500
    # Rows in report order (replace, accumulate, accumulate_subsample), columns by generation.
    rows = [centres[wf, 0][0] for wf in ("replace", "accumulate", "accumulate_subsample")]
    assert rows == sorted(rows) and rows[0] + 150 < rows[1] < rows[2] - 150
    cols = [centres["replace", g][1] for g in range(3)]
    assert cols == sorted(cols) and cols[0] + 150 < cols[1] < cols[2] - 150
    assert abs(centres["replace", 2][1] - centres["accumulate", 2][1]) < 2  # one column per generation


def test_a_corrupt_samples_picture_is_explained_and_shown_as_missing(tmp_path, capsys):
    good = write_image_run(tmp_path / "a", "accumulate", 0)
    bad = write_image_run(tmp_path / "r", "replace", 0, corrupt=(1,))
    assert cli([str(good), str(bad), "--out", str(tmp_path / "out")]) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("warning: ") and str(bad / "gen_001" / "samples.png") in err[0]
    assert "shown as missing" in err[0]
    assert is_png(tmp_path / "out" / "samples_vae_mnist.png")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Shown as missing: replace gen 1 (unreadable samples.png)." in md
    assert len(grey_pixels(tmp_path / "out" / "samples_vae_mnist.png", grey_level("replace", 0, 2))) > 200 * 200


def test_many_generations_are_thinned_and_shorter_runs_leave_blank_panels(tmp_path):
    long = write_image_run(tmp_path / "a", "accumulate", 3, generations=12)
    short = write_image_run(tmp_path / "r", "replace", 0, generations=2)
    md = make_report([long, short], tmp_path / "out", warn=None).read_text()
    assert "replace: seed 0; accumulate: seed 3" in md
    assert "at generations 0, 2, 3, 5, 6, 8, 9, 11 (evenly spaced over the 12 finished, 0–11)." in md
    assert "Shown as missing" not in md  # generations a run never reached are not missing pictures
    png = tmp_path / "out" / "samples_vae_mnist.png"
    assert len(grey_pixels(png, grey_level("accumulate", 3, 11))) > 200 * 200
    assert len(grey_pixels(png, grey_level("accumulate", 3, 1))) < 500  # not among the chosen columns


def test_runs_of_one_recipe_that_differ_in_config_get_rows_of_their_own(tmp_path):
    small = write_image_run(tmp_path / "s", "replace", 1, latent_dim=2)
    big = write_image_run(tmp_path / "b", "replace", 0, latent_dim=16)
    md = make_report([small, big], tmp_path / "out", warn=None).read_text()
    assert "replace, latent_dim=2: seed 1; replace, latent_dim=16: seed 0" in md
    png = tmp_path / "out" / "samples_vae_mnist.png"
    assert len(grey_pixels(png, grey_level("replace", 1, 0))) > 200 * 200
    assert len(grey_pixels(png, grey_level("replace", 0, 0))) > 200 * 200


def test_runs_without_pictures_get_no_samples_figure(tmp_path, capsys):
    lr = write_run(tmp_path / "lr", "linear_regression", ["dim", "n_samples", "noise_var"], lr_rows(lr_values()))
    # Finished generations without pictures, and a picture only in an unfinished generation.
    vae = write_image_run(tmp_path / "v", "replace", 0, skip=(0, 1, 2))
    (vae / ".gen_003.partial").mkdir()
    (vae / ".gen_003.partial" / "samples.png").write_bytes(b"not looked at")
    md = make_report([lr, vae], tmp_path / "out").read_text()
    assert capsys.readouterr().err == ""
    assert "Samples" not in md
    assert not list((tmp_path / "out").glob("samples*"))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        report.REPORT_RECORD,
        "report.md",
        "linear_regression_test_mse.png",
        "vae_mnist_val_loss.png",
    }


def test_the_public_helpers_exist_are_documented_and_behave_as_documented(tmp_path):
    for name in report.__all__:
        obj = getattr(report, name)
        if callable(obj) and getattr(obj, "__module__", None) == report.__name__:
            assert obj.__doc__, name
    assert report.same_value("10", "10.0") and not report.same_value("10", "ten")
    grid, cell = ("dim", "n_samples"), ("10", "")
    assert report.cell_title(grid, cell) == "dim=10, n_samples=-" and report.cell_title(grid, cell, [0]) == "dim=10"
    assert report.cell_matches_filters(grid, cell, []) and report.cell_matches_filters(grid, cell, [{"dim": "10.0"}])
    assert not report.cell_matches_filters(grid, cell, [{"dim": "1"}, {"width": "10"}])
    assert sorted([("b",), ("",), ("10",), ("9",)], key=report.cell_sort_key) == [("9",), ("10",), ("b",), ("",)]
    labels = ["mix(real=10, synthetic=0)", "accumulate", "mix(real=2, synthetic=0)", "replace", "other"]
    ordered = sorted(labels, key=report.workflow_sort_key)
    assert ordered.index("replace") < ordered.index("accumulate") < ordered.index("other")
    assert ordered.index("mix(real=2, synthetic=0)") < ordered.index("mix(real=10, synthetic=0)")
    assert report.md_escape("a|b") == "a\\|b" and report.md_escape(3) == "3"
    assert report.single_value([4]) == 4 and report.single_value([1, 2]) is None and report.single_value(5) == 5
    assert report.describe_contents(tmp_path) == "it is empty"
    (tmp_path / "gen_000").mkdir()
    (tmp_path / "gen_000" / report.SAMPLES_PICTURE).write_bytes(b"")
    (tmp_path / "gen_001").mkdir()
    assert report.describe_contents(tmp_path) == "it holds gen_000/, gen_001/"
    assert report.finished_generations(tmp_path) == {0: tmp_path / "gen_000" / report.SAMPLES_PICTURE, 1: None}
    assert report.read_run_config(tmp_path) == ({}, ["no config.yaml, so the recipe is unknown"])
    gens = np.arange(3)
    assert report.safe_theory_curve("no_such_recipe", "test_mse", "replace", {}, gens) is None


# ---- protocols, the real-only reference and the accumulate bound -----------------------------------


REAL_ONLY = "mix(real=100, synthetic=0)"


def vae_protocol_runs(tmp_path, seeds=3):
    """Runs of one deep recipe: replace and accumulate for their epochs, accumulate and real data alone at
    generation 0's step count. Losses (seed s, generation g): accumulate falls for its epochs and rises at fixed
    compute; steps: accumulate's grow with its set for its epochs, stay at 10 otherwise."""
    curves = {
        ("replace", None): lambda s, g: 100 + 20 * g + s,
        ("accumulate", None): lambda s, g: 100 - 5 * g + s,
        ("accumulate", "first"): lambda s, g: 100 + 8 * g + s,
        (REAL_ONLY, "first"): lambda s, g: 90 + s,
    }
    runs = []
    for (wf, spg), loss in curves.items():
        for s in range(seeds):
            rows = []
            for g in range(3):
                rows.append((wf, s, g, "test_loss", repr(float(loss(s, g)))))
                steps = 10 * (g + 1) if wf == "accumulate" and spg is None else 10
                rows.append((wf, s, g, "train_steps", str(steps)))
            name = f"{Workflow.parse(wf).name}_{spg or 'epochs'}_s{s}"
            config = {"workflow": wf, "seed": s, "generations": 3, "real_size": 100}
            if spg is not None or s % 2:  # older runs have no key; newer ones record null
                config["steps_per_generation"] = spg
            runs.append(write_run(tmp_path / name, "mnist_vae", [], rows, **config))
    return runs


def test_protocols_get_labelled_cells_and_the_real_only_run_is_a_reference_in_each(tmp_path):
    md = make_report(vae_protocol_runs(tmp_path), tmp_path / "out", warn=None).read_text()
    assert table_row(md, "protocol", "workflow")  # the protocol is a column of its own
    epochs = table_row(md, report.EPOCHS_PROTOCOL, "accumulate")
    fixed = table_row(md, report.FIXED_PROTOCOL, "accumulate")
    assert mean_ci(epochs[3])[0] == pytest.approx(91.0) and mean_ci(fixed[3])[0] == pytest.approx(117.0)
    assert table_row(md, report.EPOCHS_PROTOCOL, "replace")[-1] == "3"
    # The real-only run is listed once, under its own protocol, and drawn in both panels.
    assert table_row(md, report.FIXED_PROTOCOL, REAL_ONLY)
    with pytest.raises(AssertionError):
        table_row(md, report.EPOCHS_PROTOCOL, REAL_ONLY)
    assert is_png(tmp_path / "out" / "mnist_vae_test_loss.png")
    assert is_png(tmp_path / "out" / "mnist_vae_test_loss_vs_steps.png")
    assert "cumulative optimizer steps" in md and "epochs per generation: solid" in md


def test_accumulate_curves_are_checked_against_pi2_over_6_on_intervals(tmp_path):
    md = make_report(vae_protocol_runs(tmp_path), tmp_path / "out", warn=None).read_text()
    assert "### Accumulate bound (test_loss)" in md and "(mnist_vae_test_loss_ratio.png)" in md
    assert is_png(tmp_path / "out" / "mnist_vae_test_loss_ratio.png")
    bound = md.split("### Accumulate bound")[1]
    fixed = table_row(bound, report.FIXED_PROTOCOL, "accumulate")
    assert table_row(bound, report.EPOCHS_PROTOCOL, "accumulate")[5].startswith("within")
    # Generation 2 over generation 0: (116 + 117 + 118) / (100 + 101 + 102), far below pi^2/6.
    assert mean_ci(fixed[2])[0] == pytest.approx(351 / 303, rel=1e-3)
    assert fixed[4] == fmt(math.pi**2 / 6)
    assert fixed[5].startswith("within π²/6") and "95% intervals over 3 seeds" in fixed[5]
    assert fixed[3].endswith("@2")  # the largest ratio after generation 0
    # Replace and the real-only run are not accumulate curves.
    for workflow in ("replace", REAL_ONLY):
        assert f"| {workflow} |" not in bound.split("###")[0]


def test_bound_verdict_uses_intervals_and_says_when_it_has_one_seed():
    gens = np.repeat(np.arange(3), 4)
    seeds = np.tile(np.arange(4), 3)
    spread = np.tile([-0.01, 0.01, -0.02, 0.02], 3)
    below = report.summarize(seeds, gens, np.array([1.0] * 4 + [1.3] * 4 + [1.5] * 4) + spread)
    assert report.bound_verdict(below)[0] is True
    above = report.summarize(seeds, gens, np.array([1.0] * 4 + [1.3] * 4 + [1.9] * 4) + spread)
    ok, text = report.bound_verdict(above)
    assert ok is False and "generation 2" in text
    wide = report.summarize(seeds, gens, np.array([1.0] * 4 + [1.3] * 4 + [1.6] * 4) + 10 * spread)
    ok, text = report.bound_verdict(wide)
    assert ok is None and "straddles" in text
    one = report.summarize(np.zeros(3), np.arange(3), np.array([1.0, 1.2, 1.4]))
    ok, text = report.bound_verdict(one)
    assert ok is True and "from one seed" in text
    # The ratio of the means (5/6), not the mean of per-seed ratios (1.5 and 0.5), with the delta-method interval.
    r = report.ratio_of_means(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), np.array([2.0, 3.0, 4.0, 2.0]))
    assert r.mean.tolist() == pytest.approx([1.0, 5 / 6]) and r.n.tolist() == [2, 2]
    resid = np.array([3.0, 2.0]) - 5 / 6 * np.array([2.0, 4.0])
    assert r.half_width[1] == pytest.approx(report.t_quantile(1) * math.sqrt(resid.var(ddof=1) / 2) / 3.0)
    assert r.half_width[0] == pytest.approx(0.0, abs=1e-12)


def test_protocol_labels_and_real_only_workflows():
    assert report.protocol_label(None) == report.EPOCHS_PROTOCOL == "epochs per generation"
    assert report.protocol_label("first") == report.FIXED_PROTOCOL == "fixed compute (steps of gen 0)"
    assert report.protocol_label(500) == "fixed compute (500 steps)"
    assert report.is_real_only(REAL_ONLY) and not report.is_real_only(MIX) and not report.is_real_only("accumulate")
    assert not report.is_real_only("not a workflow(")
    colours = workflow_colours(["accumulate", REAL_ONLY])
    assert colours[REAL_ONLY] != colours["accumulate"]
    from tooling.theory import ACCUMULATE_BOUND, risk_metric

    assert ACCUMULATE_BOUND == pytest.approx(1.644934)
    assert risk_metric("linear_regression") == ("test_mse", 0.0) and risk_metric("mnist_vae") == ("test_loss", None)


# ---- the output folder: the user's files are never overwritten ------------------------------------


def tree(folder) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def fail(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err  # one line
    return err


def two_metric_run(tmp_path):
    rows = lr_rows(lr_values())
    rows += [(wf, *cell, s, g, "other", "1") for wf, *cell, s, g, _, _ in rows]
    return write_run(tmp_path / "lr", "linear_regression", ["dim", "n_samples", "noise_var"], rows)


def test_an_empty_out_is_refused_and_nothing_is_written_into_the_current_folder(tmp_path, capsys, monkeypatch):
    run = two_metric_run(tmp_path)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in ("", " "):
        assert "--out is empty" in fail(capsys, [str(run), "--out", out])
    with pytest.raises(report.ReportError, match="--out is empty"):
        make_report([run], "", warn=None)
    assert list(here.iterdir()) == []


def test_a_folder_of_the_users_own_files_is_refused_and_left_alone(tmp_path, capsys):
    run = two_metric_run(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("# My notes\n")
    (mine / "linear_regression_test_mse.png").write_bytes(b"my picture")
    before = tree(mine)
    err = fail(capsys, [str(run), "--out", str(mine)])
    assert "linear_regression_test_mse.png" in err and "report.md" in err
    assert tree(mine) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "notes.txt" in fail(capsys, [str(run), "--out", str(other)])
    assert tree(other) == {"notes.txt": b"mine"}


def test_a_report_folder_is_rewritten_keeping_the_users_files_beside_it(tmp_path, capsys):
    run = two_metric_run(tmp_path)
    out = tmp_path / "out"
    cli([str(run), "--out", str(out)])
    assert (out / "linear_regression_other.png").is_file()
    (out / "notes.txt").write_text("mine")
    (out / "figs").mkdir()
    (out / "figs" / "linear_regression_test_mse.png").write_bytes(b"my copy")
    cli([str(run), "--out", str(out), "--metrics", "test_mse"])  # rerun into the same folder, as scripts/main.sh does
    md = (out / "report.md").read_text()
    assert "### test_mse" in md and "### other" not in md
    assert not (out / "linear_regression_other.png").exists()  # the earlier report's picture that this one lacks
    assert (out / "notes.txt").read_text() == "mine" and (out / "figs" / "linear_regression_test_mse.png").read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".report.tmp")]  # no staging folder left

    # A picture of the user's with a name the report writes (the earlier report did not): refused, left alone.
    (out / "linear_regression_other.png").write_bytes(b"my picture")
    before = tree(out)
    assert "linear_regression_other.png" in fail(capsys, [str(run), "--out", str(out)])
    assert tree(out) == before
    (out / "linear_regression_other.png").unlink()
    cli([str(run), "--out", str(out)])
    assert is_png(out / "linear_regression_other.png") and (out / "notes.txt").read_text() == "mine"


def test_a_report_folder_from_before_the_record_is_rewritten_too(tmp_path, capsys):
    run = two_metric_run(tmp_path)
    out = tmp_path / "out"
    make_report([run], out, warn=None)
    (out / report.REPORT_RECORD).unlink()  # as an earlier version wrote it: report.md and the PNGs it links
    (out / "samples_linear_regression.png").write_bytes(b"my picture")  # linked by no report.md: the user's
    make_report([run], out, metrics="test_mse", warn=None)
    assert not (out / "linear_regression_other.png").exists()
    assert (out / "samples_linear_regression.png").read_bytes() == b"my picture"
    assert is_png(out / "linear_regression_test_mse.png")
