"""Paper figures from finished runs: the published values as data, the figure command, verdicts, bad run dirs."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tooling.figures import (
    BOUNDED,
    _Skip,
    cli,
    comparison_rows,
    curve_verdicts,
    load_figure_run,
    make_figure,
    markdown_to_html,
    relative_level,
    shape_verdict,
)
from tooling.published import (
    PublishedError,
    load_published,
    published_first,
    published_last,
    recipe_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
FIGURE_IDS = (
    "gerstgrasser_linear_regression",
    "kazdan_gaussian",
    "kazdan_kde",
    "gerstgrasser_tinystories",
    "gerstgrasser_vae",
    "gerstgrasser_geodiff",
    "kazdan_lm_finetuning",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# test_loss per generation of a stand-in TinyStories run: replace climbs, accumulate stays, subsample between.
LM_CURVES = {
    "replace": (3.70, 4.90, 5.45, 5.90),
    "accumulate": (3.70, 3.56, 3.50, 3.49),
    "accumulate_subsample": (3.70, 4.25, 5.10, 5.30),
}


def write_lm_run(path, workflow, seed, curve=None, *, pictures=False, header=None, rows=None, metric="test_loss",
                 **config):  # fmt: skip
    """A tinystories run dir: config.yaml (nested like the recipe's) and metrics.csv (test_loss, test_perplexity)."""
    curve = LM_CURVES[workflow] if curve is None else curve
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"recipe": "tinystories", "out_dir": str(path), "workflow": workflow, "generations": len(curve),
           "seed": seed, "model": {"preset": "gpt2-2m", "init_from": None}, "data": {"source": "stand_in"}}  # fmt: skip
    for key, value in config.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if rows is None:
        rows = []
        for g, v in enumerate(curve):
            v += 0.01 * seed  # a small seed effect, so the interval is not zero
            rows += [(workflow, seed, g, metric, repr(v)), (workflow, seed, g, "test_perplexity", repr(math.exp(v)))]
    with open(path / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header or ["workflow", "seed", "generation", "metric", "value"])
        w.writerows(rows)
    for g in range(len(curve)):
        folder = path / f"gen_{g:03d}"
        folder.mkdir(exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({"test_loss": curve[g], "test_perplexity": math.exp(curve[g])}))
        if pictures:
            from PIL import Image

            story = f"Tom had a red {workflow} ball in generation {g}.\nIt | was `fun`."
            (folder / "samples.txt").write_text(f"{story}\n<|endoftext|>\nAnother story.\n<|endoftext|>\n")

            Image.fromarray(np.full((48, 48), 40 * g + 10 * seed, np.uint8)).save(folder / "samples.png")
    return path


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes().startswith(PNG_MAGIC)


def table_row(md: str, *prefix: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[: len(prefix)] == list(prefix):
            return cells
    raise AssertionError(f"no table row starting with {prefix}:\n{md}")


def section(md: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", md, flags=re.S | re.M)
    assert m, f"no section {title!r}"
    return m.group(1)


# ---- the published values ------------------------------------------------------------------------


def test_published_file_loads_and_every_entry_names_a_real_recipe_metric_and_command():
    figures = load_published()
    assert tuple(figures) == FIGURE_IDS
    for fid, f in figures.items():
        assert (ROOT / "recipes" / f"{f.recipe}.py").is_file(), fid
        assert f.metric in recipe_metrics(f.recipe), (fid, f.metric)
        assert f.source and f.index_convention and f.comparability, fid
        for key in ("script", "sweep"):
            if f.produce.get(key):
                assert (ROOT / f.produce[key]).is_file(), (fid, f.produce[key])
        assert f.produce.get("command", "").startswith(f"python recipes/{f.recipe}.py"), fid
        for panel in f.panels:
            for wf in panel.workflows():
                assert wf in f.expected_shape, (fid, panel.label, wf)  # every published curve has a shape to check
    # Spot checks against the reference notes (iterations are the paper's; offsets map them to generations).
    ts = figures["gerstgrasser_tinystories"]
    assert ts.iteration_offset == 1 and ts.unconfirmed
    gpt2 = ts.panel("gpt2-9m")
    assert [(p.start, p.value) for p in gpt2.series["replace"]] == [
        (1, 1.82),
        (2, 2.11),
        (3, 2.27),
        (4, 2.39),
        (5, 2.5),
    ]
    assert [(p.start, p.value) for p in ts.panel("llama2-42m").series["accumulate"]] == [(1, 1.90), (5, 1.75)]
    assert {p.label for p in ts.panels} >= {"gpt2-9m", "llama2-12m", "llama2-42m", "llama2-126m"}
    assert figures["gerstgrasser_vae"].iteration_offset == 0 and figures["gerstgrasser_vae"].unconfirmed
    lr = figures["gerstgrasser_linear_regression"]
    assert lr.panel("T = 100").limits == {"accumulate": 78.6}
    card = {(c.real, c.synthetic): c.value for c in figures["kazdan_lm_finetuning"].cardinality}
    assert card == {(256, 0): 1.39, (256, 1024): 1.26, (1000, 0): 1.30, (1000, 1024): 1.19, (1000, 40000): 1.28}
    geo = figures["gerstgrasser_geodiff"].panels[0]
    last = published_last(figures["gerstgrasser_geodiff"], geo, "replace")
    assert last.value == pytest.approx(387.5) and "2-5" in last.where


def test_published_series_have_their_own_expected_shapes():
    """The verdict rules, applied to the published numbers themselves, never contradict the published shapes."""
    checked = 0
    for f in load_published().values():
        for panel in f.panels:
            ratios = {}
            for wf in panel.workflows():
                first, last = published_first(f, panel, wf), published_last(f, panel, wf)
                ratios[wf] = relative_level(first.value, last.value) if first and last else None
            for wf, verdict in curve_verdicts(f.expected_shape, ratios).items():
                assert verdict.ok is not False, (f.id, panel.label, wf, verdict.text)
                checked += verdict.ok is True
    assert checked >= 15


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f["panels"][0]["series"]["replace"].append(["soon", 2.0]), "series.replace[5]: iteration 'soon'"),
        (lambda f: f["panels"][0]["series"].update({"replace_all": [[1, 1.0]]}), "unknown workflow 'replace_all'"),
        (lambda f: f.update(recipe="tiny_stories"), "no recipe recipes/tiny_stories.py"),
        (lambda f: f.update(expected_shape={"replace": "up"}), "'up' is not one of rising, flat, bounded, between"),
        (lambda f: f["panels"][0]["series"]["replace"].reverse(), "not in iteration order"),
        (lambda f: f.update(compare_panel="gpt3"), "'gpt3' is not a panel label"),
        (lambda f: f.pop("metric"), "missing metric"),
    ],
)
def test_a_malformed_published_file_names_the_figure_and_field(tmp_path, edit, message):
    data = yaml.safe_load((ROOT / "tooling" / "published_results.yaml").read_text())
    edit(data["figures"]["gerstgrasser_tinystories"])
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PublishedError, match=re.escape(message)) as exc:
        load_published(path)
    assert "figures.gerstgrasser_tinystories" in str(exc.value) and "\n" not in str(exc.value)


# ---- verdicts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "curve", "ok"),
    [
        ("rising", [1.0, 1.2, 1.5], True),
        ("rising", [1.0, 1.02, 1.04], False),  # +4% is not a rise
        ("flat", [2.0, 1.9, 1.85], True),  # -7.5%
        ("flat", [2.0, 2.5], False),
        ("flat", [-1.0, -1.05], True),  # negative values (an NLL): the change relative to |first|
        ("bounded", [1.0, 1.4, 1.6], True),
        ("bounded", [1.0, 2.0], False),
        ("rising", [1.0], None),  # one generation: cannot tell
        ("rising", [0.0, 1.0], None),  # no relative change from zero
    ],
)
def test_shape_verdicts_on_hand_made_curves(shape, curve, ok):
    r = relative_level(curve[0], curve[-1]) if len(curve) > 1 else None
    assert shape_verdict(shape, r).ok is ok


def test_between_needs_replace_and_accumulate_of_the_same_setting():
    v = curve_verdicts({"replace": "rising", "accumulate": "flat", "accumulate_subsample": "between"},
                       {"replace": 1.6, "accumulate": 0.96, "accumulate_subsample": 1.3})  # fmt: skip
    assert [v[w].ok for w in ("replace", "accumulate", "accumulate_subsample")] == [True, True, True]
    assert curve_verdicts({"accumulate_subsample": "between"}, {"accumulate_subsample": 1.7, "replace": 1.6,
                          "accumulate": 1.0})["accumulate_subsample"].ok is False  # fmt: skip
    assert shape_verdict("between", 1.2).ok is None
    assert shape_verdict(None, 1.2).ok is None
    assert shape_verdict("bounded", BOUNDED - 1e-9).ok and not shape_verdict("bounded", BOUNDED + 1e-6).ok


# ---- the figure command --------------------------------------------------------------------------


def test_tinystories_figure_from_stand_in_runs_writes_png_markdown_html(tmp_path, capsys):
    runs = [write_lm_run(tmp_path / f"{wf}_s{s}", wf, s, pictures=True) for wf in LM_CURVES for s in (0, 1)]
    finetuned = write_lm_run(tmp_path / "ft", "replace", 0, model__init_from="ckpt/base")
    other = tmp_path / "gauss"
    other.mkdir()
    (other / "config.yaml").write_text("recipe: gaussian\n")
    (other / "metrics.csv").write_text("workflow,dim,seed,generation,metric,value\nreplace,1,0,0,mean_sq_error,1\n")
    out = tmp_path / "fig"
    assert cli(["gerstgrasser_tinystories", *map(str, runs), str(finetuned), str(other), "--out", str(out)]) is None
    for name in ("gerstgrasser_tinystories.png", "gerstgrasser_tinystories_published.png", "samples_tinystories.png"):
        assert is_png(out / name), name
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()

    # ours vs published, compared as shapes with the headline panel (our gpt2-2m is not a published model)
    row = table_row(md, "model.preset=gpt2-2m", "replace")
    assert row[2].startswith("3.705 ± ") and row[3].startswith("5.905 ± ") and row[3].endswith("@3")
    assert float(row[4]) == pytest.approx(5.905 / 3.705, rel=5e-3)
    assert row[5] == "gpt2-9m (another setting: compare the shape)"
    assert row[6] == "1.82 (iteration 1)" and row[7] == "2.5 (iteration 5)"
    assert float(row[8]) == pytest.approx(2.5 / 1.82, rel=5e-3)
    assert row[9] == "2.39 (iteration 4)"  # our last generation 3 is the paper's iteration 4
    assert row[10] == "rising" and row[11].startswith("as published: rising") and row[12].startswith("as published")
    acc = table_row(md, "model.preset=gpt2-2m", "accumulate")
    assert acc[10] == "flat" and acc[11].startswith("as published: flat")
    sub = table_row(md, "model.preset=gpt2-2m", "accumulate_subsample")
    assert sub[10] == "between" and sub[11].startswith("as published") and sub[6] == "—"  # no such panel curve
    assert "Shape verdict: 3 of 3" in md

    skipped = section(md, "Skipped runs")
    assert "ft: model.init_from is 'ckpt/base', this figure needs it unset" in skipped
    assert "gauss: a gaussian run; this figure uses tinystories" in skipped
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("warning: skipped ") for line in err) == 2
    assert "| llama2-126m | model.preset=llama2-126m | accumulate | 1: 1.71; 5: 1.57 |" in md
    assert "![gerstgrasser_tinystories](gerstgrasser_tinystories.png)" in md and "## Samples" in md
    texts = section(md, "Sample texts")
    assert "- replace (seed 0), generation 3: Tom had a red replace ball in generation 3. It | was `fun`." in texts
    assert "Another story" not in texts and "accumulate_subsample (seed 0), generation 0:" in texts

    assert html.startswith("<!DOCTYPE html>") and "<table>" in html and "as published: rising" in html
    for img in ("gerstgrasser_tinystories.png", "gerstgrasser_tinystories_published.png", "samples_tinystories.png"):
        assert f'<img src="{img}"' in html
    assert "<h2>Skipped runs</h2>" in html
    assert "It | was <code>fun</code>." in html


def test_linear_regression_figure_compares_levels_at_the_published_setting(tmp_path):
    path = tmp_path / "lr"
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump({"recipe": "linear_regression", "noise_var": 100.0, "dim": 32}))
    unit = 100.0 * 32 / (100 - 32 - 1)  # sigma^2 d / (T - d - 1): 47.76
    rows = []
    for s in range(4):
        for g in range(3):
            jitter = 1 + 0.01 * (s - 1.5)
            rows.append(("replace", 32, 100, 100.0, s, g, "test_mse", unit * (g + 1) * jitter))
            rows.append(
                ("accumulate", 32, 100, 100.0, s, g, "test_mse", unit * sum(1 / i**2 for i in range(1, g + 2)) * jitter)
            )
    with open(path / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["workflow", "dim", "n_samples", "noise_var", "seed", "generation", "metric", "value"])
        w.writerows(rows)
    md = make_figure("gerstgrasser_linear_regression", [path], tmp_path / "out", warn=None).read_text()
    row = table_row(md, "dim=32, n_samples=100, noise_var=100.0", "replace")
    assert row[5] == "T = 100 (same setting)" and row[6] == "47.8 (iteration 1)"
    assert row[10].startswith("—")  # no published point at iteration 3
    acc = table_row(md, "dim=32, n_samples=100, noise_var=100.0", "accumulate")
    assert acc[7] == "78.6 (limit)" and acc[10].startswith("0.") and "(vs limit)" in acc[10]
    assert acc[12].startswith("as published: rising") and "bounded" in acc[12]


def test_lm_finetuning_figure_has_the_real_x_synthetic_table(tmp_path):
    runs = [
        write_lm_run(tmp_path / name, wf, 0, curve, model__init_from="ckpt")
        for name, wf, curve in [
            ("mix0", "mix(real=256, synthetic=0)", (1.5, 1.40)),
            ("mix1k", "mix(real=256, synthetic=1024)", (1.5, 1.30)),
            ("rep", "replace", (1.5, 2.0, 2.6)),
        ]
    ]
    md = make_figure("kazdan_lm_finetuning", runs, tmp_path / "out", warn=None).read_text()
    card = section(md, "Real x synthetic examples")
    row = table_row(card, "256", "1024")
    assert row[2] == "1.3 @1" and float(row[3]) == pytest.approx(1.30 / 1.40, rel=5e-3)
    assert row[4] == "1.26" and float(row[5]) == pytest.approx(1.26 / 1.39, rel=5e-3)
    assert table_row(card, "1000", "40000")[2:5] == ["—", "—", "1.28"]


def test_list_and_bad_figure_ids(capsys):
    assert cli(["--list"]) is None
    out = capsys.readouterr().out
    for fid in FIGURE_IDS:
        assert fid in out
    assert "bash scripts/tinystories_figure.sh" in out and "wandb sweep sweeps/gaussian.yaml" in out
    with pytest.raises(SystemExit) as exc:
        cli(["gerstgrasser_tinystory", "x", "--out", "y"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "unknown figure 'gerstgrasser_tinystory'" in err


# ---- bad run dirs --------------------------------------------------------------------------------


def _no_metrics_no_gens(p):
    write_lm_run(p, "replace", 0)
    (p / "metrics.csv").unlink()
    for g in p.glob("gen_*"):
        for f in g.iterdir():
            f.unlink()
        g.rmdir()
    (p / ".gen_000.partial").mkdir()


def _truncated(p):
    write_lm_run(p, "replace", 0)
    text = (p / "metrics.csv").read_text()
    (p / "metrics.csv").write_text(text[: text.rindex("\n") - 5])  # the last row cut mid-value, no newline


def _older_columns(p):
    # An older layout without the seed column: the seed comes from config.yaml.
    write_lm_run(p, "replace", 3, header=["workflow", "generation", "metric", "value"],
                 rows=[("replace", g, "test_loss", v) for g, v in enumerate(LM_CURVES["replace"])])  # fmt: skip


def _old_config(p):
    write_lm_run(p, "replace", 0)
    (p / "config.yaml").write_text(yaml.safe_dump({"recipe": "tinystories", "workflow": "replace", "seed": 0}))


def _gens_only(p):
    write_lm_run(p, "replace", 0)
    (p / "metrics.csv").unlink()


def _gens_only_older_names(p):
    """Finished generations written before metric names were spelt one way everywhere (``test/loss``)."""
    _gens_only(p)
    for path in p.glob("gen_*/metrics.json"):
        path.write_text(json.dumps({k.replace("test_", "test/"): v for k, v in json.loads(path.read_text()).items()}))


def _wandb_copy(p):
    write_lm_run(p, "replace", 0)
    files = p / "wandb" / "offline-run-20260101_000000-abc" / "files"
    files.mkdir(parents=True)
    (p / "metrics.csv").rename(files / "metrics.csv")
    for g in p.glob("gen_*/metrics.json"):
        g.unlink()


def _wandb_dangling(p):
    write_lm_run(p, "replace", 0)
    files = p / "wandb" / "offline-run-20260101_000000-abc" / "files"
    files.mkdir(parents=True)
    (files / "metrics.csv").symlink_to(p / "metrics.csv")  # W&B offline links the run's file; then it goes
    (p / "metrics.csv").unlink()
    for g in p.glob("gen_*"):
        for f in g.iterdir():
            f.unlink()
        g.rmdir()


def _no_config(p):
    write_lm_run(p, "replace", 0)
    (p / "config.yaml").unlink()


@pytest.mark.parametrize(
    ("make", "skip", "caveat"),
    [
        (lambda p: None, "no such directory", None),
        (
            _no_metrics_no_gens,
            "no finished generation yet (no metrics.csv, no gen_XXX, no cells/); .gen_000.partial is still being made",
            None,
        ),
        (lambda p: write_lm_run(p, "replace", 0, rows=[]), "metrics.csv has a header but no rows", None),
        (lambda p: write_lm_run(p, "replace", 0, rows=[("replace", 0, 0, "test_loss", "x")]), "no seed", None),
        (
            lambda p: write_lm_run(p, "replace", 0, metric="loss"),
            "no test_loss among its metrics (loss, test_perplexity); written by another version",
            None,
        ),
        (
            lambda p: write_lm_run(p, "replace", 0, header=["run", "step", "name", "value", "x"]),
            "metrics.csv lacks columns generation, metric",
            None,
        ),
        (_wandb_dangling, "no finished generation yet", None),
        (_truncated, None, "metrics.csv ends in a line cut short"),
        (_older_columns, None, "no seed column (older version): seed 3 from config.yaml"),
        (lambda p: write_lm_run(p, "replace", 0, metric="test/loss"), None, "metric 'test/loss' read as test_loss"),
        (_old_config, None, ""),
        (_gens_only, None, "no metrics.csv (the run stopped before writing it): read from the metrics.json of its 4"),
        (_gens_only_older_names, None, "no metrics.csv (the run stopped before writing it): read from the metrics"),
        (_wandb_copy, None, "read the W&B copy wandb/offline-run-20260101_000000-abc/files/metrics.csv"),
        (_no_config, None, "taken as tinystories from its metrics"),
    ],
)
def test_each_bad_run_dir_is_explained_in_one_line(tmp_path, make, skip, caveat):
    figure = load_published()["gerstgrasser_tinystories"]
    run = tmp_path / "run"
    make(run)
    if skip is not None:
        with pytest.raises(_Skip) as exc:
            load_figure_run(run, figure)
        text = str(exc.value)
        assert skip.replace("no seed", "") in text and "\n" not in text
        if skip == "no seed":  # a value that is not a number
            assert "data row 1" in text
        return
    fr = load_figure_run(run, figure)
    assert {m for m, _, _ in fr.run.series} >= {"test_loss"}
    assert all("\n" not in c for c in fr.caveats)
    if caveat:
        assert any(caveat in c for c in fr.caveats), fr.caveats
    else:
        assert fr.caveats == []


def test_a_report_with_bad_run_dirs_lists_them_and_never_crashes(tmp_path, capsys):
    good = [write_lm_run(tmp_path / f"{wf}", wf, 0) for wf in ("replace", "accumulate")]
    empty = tmp_path / "empty"
    empty.mkdir()
    truncated = tmp_path / "truncated"
    _truncated(truncated)
    unknown = write_lm_run(tmp_path / "unknown", "replace", 0, metric="nll")
    md = make_figure("gerstgrasser_tinystories", [*good, empty, truncated, unknown, tmp_path / "gone"],
                     tmp_path / "out").read_text()  # fmt: skip
    skipped = section(md, "Skipped runs")
    assert len([ln for ln in skipped.splitlines() if ln.startswith("- ")]) == 3
    assert "empty: no finished generation yet" in skipped and "gone: no such directory" in skipped
    assert "unknown: no test_loss among its metrics" in skipped
    assert "cut short" in section(md, "Runs used with caveats")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all(line.startswith("warning: ") for line in err)

    # Nothing usable at all: the published values alone, still a report.
    md = make_figure("gerstgrasser_tinystories", [empty], tmp_path / "out2", warn=None).read_text()
    assert "No usable tinystories run" in md and "| gpt2-9m | model.preset=gpt2-9m | replace |" in md
    assert (tmp_path / "out2" / "report.html").is_file()


def test_a_folder_of_run_dirs_stands_for_its_runs_and_rows_repeat_once(tmp_path):
    parent = tmp_path / "figure_runs"
    for wf in ("replace", "accumulate"):
        write_lm_run(parent / f"{wf}_s0", wf, 0)
    (parent / "report").mkdir()  # an earlier report folder is not a run
    copy = write_lm_run(tmp_path / "copy_of_replace_s0", "replace", 0)
    figure = load_published()["gerstgrasser_tinystories"]
    md = make_figure(figure.id, [parent, copy], tmp_path / "out", warn=None).read_text()
    assert "Skipped runs\n\nNone." in md
    assert "only the first was kept" in md  # the copy repeats seed 0 of replace
    row = table_row(md, "model.preset=gpt2-2m", "replace")
    assert "±" not in row[2]  # one seed: no interval


def test_markdown_to_html_escapes_and_keeps_tables():
    page = markdown_to_html(["# A <b>", "", "| a | b \\| c |", "|---|---|", "| 1 | `x<y` |", "", "- item"], "t")
    assert "<h1>A &lt;b&gt;</h1>" in page and "<td><code>x&lt;y</code></td>" in page
    assert "<th>b | c</th>" in page and "<li>item</li>" in page


def test_rows_pair_each_of_our_workflows_with_the_panel_workflow(tmp_path):
    figure = load_published()["gerstgrasser_tinystories"]
    runs = [load_figure_run(write_lm_run(tmp_path / wf, wf, 0, model__preset="llama2-42m"), figure)
            for wf in ("replace", "accumulate")]  # fmt: skip
    from tooling.figures import build_curves

    ours = build_curves(runs, figure)
    rows = comparison_rows(figure, ours, ours.cells)
    by_wf = {r.workflow: r for r in rows}
    assert by_wf["replace"].panel.label == "llama2-42m" and by_wf["replace"].why == "same setting"
    assert by_wf["replace"].pub_last.value == 2.65 and by_wf["accumulate"].pub_last.value == 1.75
    assert "accumulate_subsample" not in by_wf  # the llama2-42m panel has none


def test_a_wandb_offline_folder_named_directly_is_read_with_its_run_dirs_config(tmp_path):
    run = tmp_path / "run"
    _wandb_copy(run)
    folder = next((run / "wandb").iterdir())
    fr = load_figure_run(folder, load_published()["gerstgrasser_tinystories"])
    assert fr.run.recipe == "tinystories" and fr.source.startswith("W&B copy")
    seeds, gens, values = fr.run.series[("test_loss", "replace", ())]
    assert list(gens) == [0, 1, 2, 3] and values[0] == pytest.approx(3.70)


def test_figures_uses_only_the_public_names_of_the_report_module():
    import ast

    from tooling import figures, report

    tree = ast.parse(Path(figures.__file__).read_text())
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "rp"
    }
    assert used and used <= set(report.__all__), sorted(used - set(report.__all__))


# ---- verdicts over seeds, protocols and the accumulate bound ---------------------------------------


def test_verdicts_use_the_interval_over_seeds_and_say_when_one_seed_decides():
    from tooling.figures import Ratio

    assert shape_verdict("rising", Ratio(1.3, 0.1, 3)).ok is True
    straddles = shape_verdict("rising", Ratio(1.2, 0.3, 3))
    assert straddles.ok is None and "straddles" in straddles.text and "over 3 seeds" in straddles.text
    assert shape_verdict("rising", Ratio(1.0, 0.02, 3)).ok is False
    assert shape_verdict("flat", Ratio(1.02, 0.05, 5)).ok is True
    assert shape_verdict("flat", Ratio(1.02, 0.12, 5)).ok is None  # the interval reaches past +10%
    assert shape_verdict("bounded", Ratio(1.9, 0.05, 3)).ok is False
    one = shape_verdict("rising", Ratio(1.3, math.nan, 1))
    assert one.ok is True and "the verdict is from one seed" in one.text
    # A single published value is judged as before, without a word about seeds.
    assert "seed" not in shape_verdict("rising", 1.3).text


def test_protocols_get_rows_of_their_own_and_accumulate_is_checked_against_pi2_over_6(tmp_path):
    rising = (3.70, 3.80, 3.90, 4.00)
    real = (3.70, 3.69, 3.70, 3.71)
    runs = [write_lm_run(tmp_path / f"acc_s{s}", "accumulate", s) for s in (0, 1, 2)]
    runs += [write_lm_run(tmp_path / f"rep_s{s}", "replace", s, steps_per_generation=None) for s in (0, 1, 2)]
    runs += [write_lm_run(tmp_path / f"fix_s{s}", "accumulate", s, rising, steps_per_generation="first")
             for s in (0, 1, 2)]  # fmt: skip
    runs += [write_lm_run(tmp_path / f"real_s{s}", "mix(real=100, synthetic=0)", s, real,
                          steps_per_generation="first") for s in (0, 1, 2)]  # fmt: skip
    md = make_figure("gerstgrasser_tinystories", runs, tmp_path / "out", warn=None).read_text()
    rows = {
        (r[0], r[1]): r
        for r in (
            [c.strip() for c in line.strip().strip("|").split(" | ")]
            for line in section(md, "Ours vs published").splitlines()
            if line.startswith("|") and not line.startswith("|--")
        )
    }
    epochs = next(r for (s, w), r in rows.items() if "protocol=epochs per generation" in s and w == "accumulate")
    fixed = next(
        r for (s, w), r in rows.items() if "protocol=fixed compute (steps of gen 0)" in s and w == "accumulate"
    )
    assert epochs[11].startswith("as published: flat (-5.7%), 95% interval 0.943–0.944 over 3 seeds")
    assert fixed[11].startswith("as published: flat")  # +8.1% is still within the flat band
    assert fixed[-1].startswith("within π²/6") and "over 3 seeds" in fixed[-1]
    real_row = next(r for (s, w), r in rows.items() if w == "mix(real=100, synthetic=0)")
    assert "fixed compute" in real_row[0] and real_row[-1] == "—"  # not an accumulate curve
    assert "Our verdicts use the 95% interval over seeds" in md and "Accumulate bound" in md
    assert "Shape verdict: 3 of 3 of our curves" in md and "cannot be told" not in md
    assert is_png(tmp_path / "out" / "gerstgrasser_tinystories.png")
