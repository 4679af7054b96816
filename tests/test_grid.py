"""The local grid launcher (tooling/grid.py): expansion, commands, real runs, resume, failures, GPUs, Ctrl-C."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from collapse.cli import parse_config
from tooling import grid

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def write_sweep(path: Path, parameters: dict, program: str = "recipes/linear_regression.py", **extra) -> Path:
    spec = {
        "program": program,
        "method": "grid",
        "metric": {"name": "test_mse", "goal": "minimize"},
        "parameters": parameters,
        "command": ["${env}", "python", "${program}", "--wandb.mode=online", "--out_dir=runs/x/{hash}", "${args}"],
        **extra,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def launch(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the launcher as a user would, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "tooling.grid", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip


# A tiny analytic grid: 4 cells, each well under a second.
TINY = {
    "workflow": {"values": ["replace", "accumulate"]},
    "n_samples": {"values": [8, 10]},
    "dim": {"value": 2},
    "generations": {"value": 3},
    "num_seeds": {"value": 4},
    "workers": {"value": 1},
    "report": {"value": False},
}


# ---- expansion and commands ---------------------------------------------------------------------------


def test_expansion_is_the_cartesian_product_first_parameter_outermost(tmp_path):
    path = write_sweep(
        tmp_path / "g.yaml", {"a": {"values": [1, 2]}, "b": {"value": "x"}, "c": {"values": ["p", "q", "r"]}}
    )
    cells = grid.expand(grid.load_sweep(path))
    assert [(c.params["a"], c.params["c"]) for c in cells] == [(a, c) for a in (1, 2) for c in "pqr"]
    assert [c.index for c in cells] == list(range(1, 7))
    assert all(c.params["b"] == "x" for c in cells) and cells[0].axes == ("a", "c")
    assert len({c.name for c in cells}) == 6  # names of logs and markers never collide
    vae = grid.expand(grid.load_sweep(ROOT / "sweeps/mnist_vae.yaml"))
    assert len(vae) == 9 and vae[0].describe() == "workflow=replace seed=0" and vae[-1].params["seed"] == 2


def config_class(program: str):
    module = importlib.import_module(program.removesuffix(".py").replace("/", "."))
    (cls,) = [
        c
        for n, c in inspect.getmembers(module, inspect.isclass)
        if n.endswith("Config")
        and c.__module__ == module.__name__
        and "out_dir" in getattr(c, "__dataclass_fields__", {})
    ]
    return cls


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_rendered_commands_are_the_agents_and_parse(path):
    sweep = grid.load_sweep(path)
    cells = grid.expand(sweep)
    cls = config_class(sweep.program)
    step = max(1, len(cells) // 5)  # a spread of cells; tests/test_sweeps.py covers every value
    for cell in cells[::step] + [cells[-1]]:
        argv = grid.render(sweep, cell)
        assert argv[:2] == [sys.executable, sweep.program]
        flags = argv[2:]
        assert "--wandb.mode=offline" in flags and "--wandb.mode=online" not in flags  # never online by default
        assert any(f.startswith("--out_dir=") and f.endswith("/{hash}") for f in flags)
        assert flags[-len(cell.params) :] == [f"--{k}={v}" for k, v in cell.params.items()]
        cfg = parse_config(cls, flags)
        for k, v in cell.params.items():
            got = functools.reduce(getattr, k.split("."), cfg)
            assert got == v or str(got) == str(v), (k, v, got)
        assert cfg.wandb.mode == "offline"
    moved = grid.render(sweep, cells[0], wandb_mode="disabled", out_dir="elsewhere/x/{hash}")
    assert "--wandb.mode=disabled" in moved and "--out_dir=elsewhere/x/{hash}" in moved


def test_out_root_and_wandb_options_rewrite_the_fixed_flags(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", TINY)
    sweep = grid.load_sweep(path)
    assert grid.out_dir_template(sweep, str(tmp_path / "o"), 4) == f"{tmp_path}/o/s/{{hash}}"
    assert grid.out_dir_template(sweep, None, 4) is None  # the file's own --out_dir=runs/x/{hash}
    cell = grid.expand(sweep)[0]
    argv = grid.render(sweep, cell, wandb_mode="online", wandb_explicit=True, out_dir="r/{hash}", interpreter="python")
    assert argv[:6] == ["python", "recipes/linear_regression.py", "--wandb.mode=online", "--out_dir=r/{hash}"] + [
        "--workflow=replace",
        "--n_samples=8",
    ]
    # Without {hash} every cell would write one folder: refused unless --out_root gives each its own.
    spec = yaml.safe_load(path.read_text())
    spec["command"][4] = "--out_dir=runs/x"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(grid.GridError, match="no \\{hash\\}"):
        grid.out_dir_template(grid.load_sweep(path), None, 4)


def test_only_and_set_filter_and_override_cells(tmp_path, capsys):
    path = write_sweep(tmp_path / "s.yaml", {**TINY, "workflow": {"values": ["replace", "mix(real=8, synthetic=4)"]}})
    sets = ["--set", "generations=2", "--set", "noise_var=1.5"]
    args = [str(path), "--dry_run", "--out_root", str(tmp_path / "o"), *sets]
    assert grid.main([*args, "--only", "workflow=mix(real=8, synthetic=4),n_samples=10"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if not line.startswith(("#", "[grid]"))]
    assert len(commands) == 1
    assert "'--workflow=mix(real=8, synthetic=4)' --n_samples=10 --dim=2 --generations=2" in commands[0]
    assert commands[0].endswith("--noise_var=1.5")  # a new key extends every cell
    assert "1 of 4 cells" in out
    # Two --only filters: either may match; a float value matches as written or as a number.
    assert grid.main([*args, "--only", "n_samples=8", "--only", "workflow=replace,n_samples=10.0"]) == 0
    assert "3 of 4 cells" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    # --set on an axis shrinks the grid.
    assert grid.main([str(path), "--dry_run", "--set", "n_samples=12"]) == 0
    assert "2 of 2 cells" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": "random"}, "method 'random' cannot be run as a local grid"),
        ({"method": "bayes"}, "method 'bayes'"),
        ({"parameters": {"dim": {"distribution": "uniform", "min": 1, "max": 3}}}, "cannot be enumerated"),
        ({"parameters": {"dim": {"distribution": "int_uniform", "min": 1, "max": 3}}}, "cannot be enumerated"),
    ],
)
def test_what_cannot_be_enumerated_is_refused_with_one_line(tmp_path, capsys, change, message):
    path = write_sweep(tmp_path / "s.yaml", TINY)
    spec = {**yaml.safe_load(path.read_text()), **change}
    path.write_text(yaml.safe_dump(spec))
    assert grid.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "seed=0"], "'seed' is not a parameter"),
        (["--only", "workflow=nope"], "no cell matches"),
        (["--set", "generations"], "write key=value"),
        (["--set", "out_dir=x"], "use --out_root"),
        (["--gpus", "0,,1"], "empty id"),
        (["--gpus", "0,1", "--jobs", "3"], "one cell at a time"),
    ],
)
def test_bad_options_are_one_error_line(tmp_path, capsys, args, message):
    path = write_sweep(tmp_path / "s.yaml", TINY)
    assert grid.main([str(path), "--dry_run", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


# ---- real runs ------------------------------------------------------------------------------------------


def test_tiny_grid_runs_in_parallel_and_a_rerun_skips_finished_cells(tmp_path):
    path = write_sweep(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "out"
    first = launch(path, "--jobs", "2", "--out_root", out)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 done, 0 failed, 0 skipped" in first.stdout
    assert first.stdout.count("[grid] start ") == 4 and first.stdout.count("[grid] done ") == 4
    runs = sorted(p.parent for p in (out / "tiny").glob("*/metrics.csv"))
    assert len(runs) == 4  # one {hash} folder per cell
    configs = [yaml.safe_load((r / "config.yaml").read_text()) for r in runs]
    assert {(c["workflow"], c["n_samples"]) for c in configs} == {
        (w, n) for w in ("replace", "accumulate") for n in (8, 10)
    }
    assert all(c["wandb"]["mode"] == "offline" and c["generations"] == 3 for c in configs)
    logs = out / "tiny" / "logs"
    markers = sorted(logs.glob("*.done"))
    assert len(markers) == 4 and len(list(logs.glob("*.log"))) == 4
    done = json.loads(markers[0].read_text())
    assert done["exit_code"] == 0 and done["args"][0] == "python" and done["command"][0] == sys.executable
    stamps = {p: p.stat().st_mtime_ns for p in logs.iterdir()} | {p: p.stat().st_mtime_ns for p in runs}

    again = launch(path, "--jobs", "2", "--out_root", out)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 done, 0 failed, 4 skipped" in again.stdout and "[grid] start" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing re-ran, nothing was rewritten

    # A cell without its marker runs again; the recipe finds its finished work in the same folder.
    markers[0].unlink()
    third = launch(path, "--out_root", out)
    assert third.returncode == 0 and "1 done, 0 failed, 3 skipped" in third.stdout
    assert "finished earlier, kept" in markers[0].with_suffix(".log").read_text()


def test_a_failing_cell_makes_the_exit_status_nonzero_and_the_others_still_run(tmp_path):
    path = write_sweep(
        tmp_path / "bad.yaml",
        {**TINY, "n_samples": {"value": 8}, "dim": {"values": [-1, 2]}, "workflow": {"value": "replace"}},
    )  # -1: a value the recipe's parser takes and the run refuses (a flag it cannot parse stops the whole grid)
    result = launch(path, "--out_root", tmp_path / "out")
    assert result.returncode == 1
    assert "1 done, 1 failed, 0 skipped" in result.stdout
    logs = tmp_path / "out" / "bad" / "logs"
    (failed_log,) = [p for p in logs.glob("*.log") if "dim=-1" in p.name]
    assert f"failed: dim=-1 (exit 2): log {failed_log}" in result.stdout
    assert "error: --dim" in failed_log.read_text()
    assert [p.name for p in logs.glob("*.done")] == [p.name.replace(".log", ".done") for p in logs.glob("*dim=2*.log")]


FAKE = """\
import os, sys, time
dest = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--dest="))
x = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--x="))
start = time.time()
with open(os.path.join(dest, x + ".pid"), "w") as fh:
    fh.write(str(os.getpid()))
time.sleep(float(os.environ.get("FAKE_SLEEP", "0.4")))
with open(os.path.join(dest, x + ".json"), "w") as fh:
    fh.write('{"gpu": "%s", "omp": "%s", "start": %r, "end": %r, "pid": %d}' % (
        os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS"), start, time.time(), os.getpid()))
"""


def fake_sweep(tmp_path: Path, cells: int = 4) -> Path:
    program = tmp_path / "fake.py"
    program.write_text(FAKE)
    (tmp_path / "seen").mkdir()
    params = {"x": {"values": list(range(cells))}, "dest": {"value": str(tmp_path / "seen")}}
    return write_sweep(tmp_path / "fake.yaml", params, program=str(program))


def test_gpus_run_one_cell_per_listed_gpu_at_a_time(tmp_path):
    path = fake_sweep(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in grid.THREAD_VARS}
    result = launch(path, "--gpus", "3,5", "--out_root", tmp_path / "out", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = [json.loads(p.read_text()) for p in sorted((tmp_path / "seen").glob("*.json"))]
    assert {s["pid"] for s in seen} == {int(p.read_text()) for p in (tmp_path / "seen").glob("*.pid")}
    assert len(seen) == 4 and {s["gpu"] for s in seen} == {"3", "5"}
    for gpu in ("3", "5"):  # never two cells on one GPU at once
        spans = sorted((s["start"], s["end"]) for s in seen if s["gpu"] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert {s["omp"] for s in seen} == {str(max(1, grid.available_cores() // 2))}
    assert "on GPU 3" in result.stdout and "on GPU 5" in result.stdout


def test_ctrl_c_stops_the_running_cells_and_exits_130(tmp_path):
    path = fake_sweep(tmp_path, cells=2)
    env = dict(os.environ, FAKE_SLEEP="60")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tooling.grid", str(path), "--jobs", "2", "--out_root", str(tmp_path / "out")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    started = 0
    deadline = time.monotonic() + 30
    while started < 2 and time.monotonic() < deadline:
        started += proc.stdout.readline().startswith("[grid] start")
    time.sleep(0.5)  # let the children get going
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out + err
    assert "finished cells are kept" in err and "2 running cell(s) stopped" in err
    logs = tmp_path / "out" / "fake" / "logs"
    assert not list(logs.glob("*.done")) and not list((tmp_path / "seen").glob("*.json"))
    for pid_file in (tmp_path / "seen").glob("*.pid"):  # the cells are gone, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
    assert all("# interrupted" in p.read_text() for p in logs.glob("*.log"))


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"\x88\x00\xff binary", "is not a text file"), (b"a: [1, 2", "is not valid YAML"), (b"- 1\n- 2\n", "a mapping")],
)
def test_a_sweep_file_that_is_not_a_yaml_mapping_is_one_error(tmp_path, content, message):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(content)
    with pytest.raises(grid.GridError, match=message) as excinfo:
        grid.load_sweep(path)
    assert "\n" not in str(excinfo.value)


def test_a_dry_run_names_the_cells_whose_flags_the_recipe_refuses(tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "program": "recipes/gaussian.py",
                "method": "grid",
                "parameters": {"dimm": {"values": [2, 3]}, "n_samples": {"value": 10}},
                "command": ["${env}", "python", "${program}", "--out_dir=runs/x/{hash}", "${args}"],
            }
        )
    )
    assert grid.main([str(path), "--dry_run", "--out_root", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("(refused by recipes/gaussian.py: unrecognized arguments: --dimm=") == 2
    assert "error: 2 of 2 cells have flags that recipes/gaussian.py refuses" in captured.err
    assert not (tmp_path / "o").exists()
    good = ROOT / "sweeps" / "gaussian.yaml"
    assert grid.main([str(good), "--dry_run", "--out_root", str(tmp_path / "o")]) == 0
    assert "refused by" not in capsys.readouterr().out


def test_a_real_run_refuses_such_cells_before_any_starts(tmp_path, capsys):
    # Before: every cell started and failed on its own, one log each, and the grid exited 1.
    parameters = {"num_seeds": {"values": [2, "many"]}, "generations": {"value": 2}}
    command = ["${env}", "python", "${program}", "--out_dir=runs/x/{hash}", "${args}"]
    path = write_sweep(tmp_path / "typo.yaml", parameters, program="recipes/gaussian.py", command=command)
    assert grid.main([str(path), "--out_root", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert "error: 1 of 2 cells have flags that recipes/gaussian.py refuses" in err and "no cell was started" in err
    assert out.count("refused ") == 1 and "--num_seeds: invalid value 'many'" in out and "start " not in out, out
    assert not (tmp_path / "o").exists()  # neither a cell's run folder nor the logs'


# ---- folders and GPU ids refused before anything starts -----------------------------------------------


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry_run"])
@pytest.mark.parametrize(
    ("flag", "below"),
    [("--log_dir", ""), ("--out_root", ""), ("--log_dir", "logs"), ("--out_root", "deeper/out")],
    ids=["log_dir-file", "out_root-file", "log_dir-under-file", "out_root-under-file"],
)
def test_a_folder_flag_that_is_or_is_under_a_file_is_one_error_and_nothing_starts(
    tmp_path, capsys, flag, below, dry_run
):
    path = fake_sweep(tmp_path)
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder\n")
    given = blocker / below if below else blocker
    other = ["--out_root", str(tmp_path / "out")] if flag == "--log_dir" else []
    args = [str(path), flag, str(given), *other] + (["--dry_run"] if dry_run else [])
    assert grid.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {flag} {given}: {blocker} is a file, not a folder\n"
    assert "[grid] start" not in captured.out and not list((tmp_path / "seen").iterdir())
    assert not (tmp_path / "out").exists() and blocker.read_text() == "a file, not a folder\n"


def test_the_default_log_folder_under_a_file_is_one_error(tmp_path, capsys, monkeypatch):
    path = fake_sweep(tmp_path)  # its program is an absolute path, so it runs from any folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("")
    assert grid.main([str(path)]) == 2
    err = capsys.readouterr().err
    label = "the logs folder runs/grid/fake/logs (default of --log_dir)"
    assert err == f"error: {label}: {tmp_path / 'runs'} is a file, not a folder\n"
    assert not list((tmp_path / "seen").iterdir())


def test_a_folder_that_cannot_be_written_is_one_error(tmp_path, capsys, monkeypatch):
    path = fake_sweep(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # as root a chmod would not stop anything: report the folder as not writable instead
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    for flag in ("--log_dir", "--out_root"):
        assert grid.main([str(path), flag, str(locked / "new"), "--dry_run"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {flag} {locked / 'new'}: cannot write in {locked} (permission denied)\n"
    assert grid.main([str(path), "--log_dir", ""]) == 2
    assert capsys.readouterr().err.startswith("error: --log_dir: empty path")
    assert not list(locked.iterdir()) and not list((tmp_path / "seen").iterdir())


@pytest.mark.parametrize("gpus", ["abc", "0,x", "-1", "0,-1", "1.5", "GPU-0", "0 1", "cuda:0"])
def test_gpu_ids_other_than_indices_are_refused(tmp_path, capsys, gpus):
    path = write_sweep(tmp_path / "s.yaml", TINY)
    assert grid.main([str(path), "--dry_run", f"--gpus={gpus}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --gpus {gpus}: ") and "is not a GPU index" in err


def test_gpu_ids_are_indices_or_auto(monkeypatch):
    assert grid.gpu_ids("0,1") == ["0", "1"]
    assert grid.gpu_ids(" 0, 01 ,3,3") == ["0", "1", "3", "3"]  # listed twice: two cells on GPU 3 at once
    uuid = "GPU-5f3e2a1b-8c9d-4e0f-a1b2-c3d4e5f60718"  # as nvidia-smi -L lists it; CUDA_VISIBLE_DEVICES takes it
    assert grid.gpu_ids(f"{uuid},MIG-5f3e2a1b-8c9d-4e0f-a1b2-c3d4e5f60718") == [uuid, "MIG" + uuid[3:]]
    assert grid.gpu_ids(f"MIG-{uuid}/1/0") == [f"MIG-{uuid}/1/0"]  # the MIG form of drivers before CUDA 11.4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")  # auto: the GPUs this process may see
    assert grid.gpu_ids("auto") == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    with pytest.raises(grid.GridError, match="--gpus auto: no GPU found"):
        grid.gpu_ids("auto")
