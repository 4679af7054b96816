"""Run the grid of a W&B sweep file locally, without W&B: one process per cell, resumable.

    python -m tooling.grid sweeps/mnist_vae.yaml [--jobs N] [--gpus 0,1 | --gpus auto] [--dry_run]
        [--only 'workflow=replace,seed=0'] [--set generations=2 ...] [--out_root runs/grid]
        [--wandb offline|disabled|online] [--log_dir DIR]

The file is read as ``wandb agent`` reads it: every cell of a ``method: grid`` sweep (the cartesian
product of the parameters' ``values``, first parameter outermost) becomes the command of the file's
``command:`` list, with ``${env}`` dropped, ``python`` (or ``${interpreter}``) replaced by this
interpreter, ``${program}`` by the program and ``${args}`` by one ``--name=value`` per parameter,
formatted as the agent formats it. Cells run in the current folder, as under an agent, so run it
from the repository root. ``--wandb.mode=online`` in a file becomes ``offline`` (``--wandb`` to choose).

Each cell keeps the file's ``--out_dir=.../{hash}``: the recipe fills ``{hash}`` from its config,
so every cell gets its own run folder; ``--out_root R`` makes that ``R/<sweep>/{hash}``. A cell's
output goes to ``<log_dir>/<cell>.log`` (default log_dir ``<out_root or runs/grid>/<sweep>/logs``);
after it exits with status 0 the launcher writes ``<log_dir>/<cell>.done`` (atomically) holding the
command. Running the same command again skips the cells whose marker holds the same command; any
other cell is run again, and the recipe itself resumes its unfinished generations or grid cells,
since it is given the same out_dir.

Exit status: 0 when every cell finished, 1 when some failed (their logs are listed), 2 on bad input
(one ``error:`` line), 130 when interrupted (Ctrl-C or SIGTERM stop the running cells; finished ones
are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import yaml

from collapse.atomic import atomic_write_json
from collapse.cli import die_with_parent_hook
from collapse.errors import UserError

DEFAULT_ROOT = "runs/grid"
DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")  # wandb agent's, when a file has none
WANDB_MODES = ("offline", "disabled", "online")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
STOP_GRACE_S = 10.0
"""Seconds a cell gets to exit after its SIGINT when the launcher is interrupted, before it is killed."""
_INTERPRETERS = ("python", "python3", "${interpreter}")
_ENVVAR = re.compile(r"\$\{envvar:([^}]*)\}")
_KEY = re.compile(r"^[A-Za-z_][\w.-]*$")


class GridError(UserError):
    """A sweep file or launcher option that cannot be used; the message is one line."""


# ---- the sweep file ---------------------------------------------------------------------------------


@dataclass
class Sweep:
    """A grid sweep file: its program, command template and the values of every parameter."""

    path: Path
    name: str
    """The file's stem: names the log and output folders."""
    program: str
    command: list[str]
    parameters: dict[str, list[Any]]
    """Flag name -> its values, in the file's order (a ``value:`` is a one-element list)."""


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep file; refuse what a local grid cannot enumerate (random/bayes, continuous distributions)."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GridError(f"cannot read sweep file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise GridError(f"{path} is not a text file (byte {exc.start} is not UTF-8); a sweep file is YAML") from None
    except yaml.YAMLError as exc:
        raise GridError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(spec, dict):
        raise GridError(f"{path}: expected a mapping with program, method, parameters, command")
    method = spec.get("method")
    if method != "grid":
        raise GridError(
            f"{path}: method {method!r} cannot be run as a local grid (only method: grid); "
            "run it with wandb agent, or write it as a grid"
        )
    program = spec.get("program")
    if not isinstance(program, str) or not program:
        raise GridError(f"{path}: no program")
    params = spec.get("parameters") or {}
    if not isinstance(params, dict) or not params:
        raise GridError(f"{path}: no parameters to make a grid of")
    command = spec.get("command", list(DEFAULT_COMMAND))
    if not isinstance(command, list) or not command:
        raise GridError(f"{path}: command must be a list")
    return Sweep(
        path, path.stem, program, [str(c) for c in command], {k: _values(path, k, v) for k, v in params.items()}
    )


def _values(path: Path, name: str, spec: Any) -> list[Any]:
    """The values of one parameter; anything but value / values (categorical, constant) is refused."""
    where = f"{path}: parameter {name}"
    if not isinstance(spec, dict):
        raise GridError(f"{where}: expected value: or values:, got {spec!r}")
    if "parameters" in spec:
        raise GridError(f"{where}: nested parameters are not supported; write dotted names such as data.source")
    dist = spec.get("distribution", "categorical" if "values" in spec else "constant")
    if dist not in ("categorical", "constant") or not ({"value", "values"} & spec.keys()):
        raise GridError(f"{where}: distribution {dist!r} cannot be enumerated for a grid; give values: [...]")
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise GridError(f"{where}: values must be a non-empty list")
        return list(values)
    return [spec["value"]]


def apply_sets(sweep: Sweep, sets: Sequence[str]) -> Sweep:
    """``--set key=value``: give ``key`` this one value in every cell (a new parameter if the file has none)."""
    params = dict(sweep.parameters)
    for item in sets:
        key, _, value = item.partition("=")
        key = key.strip().removeprefix("--")
        if not _ or not _KEY.match(key):
            raise GridError(f"--set {item!r}: write key=value, e.g. --set generations=2")
        if key == "out_dir":
            raise GridError("--set out_dir: use --out_root (each cell keeps its own {hash} folder)")
        if key == "wandb.mode":
            raise GridError("--set wandb.mode: use --wandb offline|disabled|online")
        params[key] = [value]  # the text as given: the agent would pass it on verbatim too
    return Sweep(sweep.path, sweep.name, sweep.program, sweep.command, params)


# ---- cells ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    index: int
    """1-based position in the full grid."""
    params: dict[str, Any]
    """Flag name -> value, in the file's order."""
    axes: tuple[str, ...]
    """The parameters that vary over the grid (they name the cell)."""

    def describe(self) -> str:
        """``workflow=replace seed=0``: the values of the varying parameters."""
        return " ".join(f"{k}={self.params[k]}" for k in self.axes) or "(the only cell)"

    @property
    def name(self) -> str:
        """File-safe, unique name: the varying values plus a checksum of every value (log and marker names)."""
        text = "__".join(f"{k}={self.params[k]}" for k in self.axes) or "cell"
        safe = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text)[:100]
        crc = zlib.crc32(json.dumps([[k, str(v)] for k, v in self.params.items()]).encode())
        return f"{safe}-{crc:08x}"


def expand(sweep: Sweep) -> list[Cell]:
    """Every cell of the grid: the cartesian product of the parameters, first parameter outermost."""
    names = list(sweep.parameters)
    axes = tuple(k for k, v in sweep.parameters.items() if len(v) > 1)
    return [
        Cell(i, dict(zip(names, combo)), axes)
        for i, combo in enumerate(itertools.product(*sweep.parameters.values()), 1)
    ]


def select(cells: list[Cell], only: Sequence[str], names: Sequence[str]) -> list[Cell]:
    """Cells matching any ``--only`` (each ``k=v,k=v``, all of which must match); all cells without ``--only``."""
    if not only:
        return cells
    # Values may hold commas (mix(real=1, synthetic=2)): split only before "<known parameter>=".
    known = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    filters = []
    for item in only:
        parts = re.split(rf",\s*(?=(?:{known})=)", item.strip())
        conds: dict[str, list[str]] = {}
        for part in parts:
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or key not in names:
                raise GridError(f"--only {item!r}: {key!r} is not a parameter of the sweep ({', '.join(names)})")
            conds.setdefault(key, []).append(value.strip())
        filters.append(conds)
    kept = [c for c in cells if any(_matches(c, f) for f in filters)]
    if not kept:
        raise GridError(f"--only {' / '.join(only)}: no cell matches")
    return kept


def _matches(cell: Cell, conds: dict[str, list[str]]) -> bool:
    """Every parameter of ``conds`` has one of its listed values in ``cell``."""
    return all(any(_same(cell.params[k], v) for v in values) for k, values in conds.items())


def _same(value: Any, text: str) -> bool:
    """Whether a parameter value is the one written on the command line (``0.3`` matches 0.3 and '0.3')."""
    if str(value) == text:
        return True
    try:
        return yaml.safe_load(text) == value
    except yaml.YAMLError:
        return False


# ---- commands ---------------------------------------------------------------------------------------


def out_dir_template(sweep: Sweep, out_root: str | None, cells: int) -> str | None:
    """The --out_dir every cell gets (None: the file's own, kept as is); refuse one folder for many cells."""
    fixed = _flag_value(sweep.command, "out_dir")
    if out_root is not None:
        if "out_dir" in sweep.parameters:
            raise GridError("--out_root: out_dir is a parameter of this sweep; drop --out_root or the parameter")
        return f"{out_root.rstrip('/')}/{sweep.name}/{{hash}}"
    if "out_dir" in sweep.parameters or cells <= 1:
        return None
    if fixed is None:
        raise GridError(
            f"{sweep.path}: no --out_dir in its command, so every cell would use the recipe's default folder; "
            "give --out_root or add --out_dir=runs/.../{hash}"
        )
    if "{hash}" not in fixed:
        raise GridError(
            f"{sweep.path}: --out_dir={fixed} has no {{hash}}, so every cell would write that one folder; "
            "add /{hash} or give --out_root"
        )
    return None


def render(
    sweep: Sweep,
    cell: Cell,
    *,
    wandb_mode: str = "offline",
    wandb_explicit: bool = False,
    out_dir: str | None = None,
    interpreter: str | None = None,
) -> list[str]:
    """The command ``wandb agent`` would run for ``cell``, made local (interpreter, W&B mode, out_dir)."""
    flags = [f"--{k}={v}" for k, v in cell.params.items()]  # exactly the agent's f"{param}={value}"
    fixed: list[str] = []
    for token in sweep.command:
        fixed.append(_ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), token))
    fixed = _set_flag(fixed, "out_dir", out_dir) if out_dir is not None else fixed
    has_mode = _flag_value(fixed, "wandb.mode") is not None or "wandb.mode" in cell.params
    if has_mode or wandb_explicit:
        flags = _set_flag(flags, "wandb.mode", wandb_mode, append=False)
        fixed = _set_flag(fixed, "wandb.mode", wandb_mode, append=not has_mode)
    argv: list[str] = []
    for token in fixed:
        if token == "${env}":
            continue  # /usr/bin/env under the agent: the launcher passes the environment itself
        if token in _INTERPRETERS:
            argv.append(interpreter or sys.executable)
        elif token == "${program}":
            argv.append(sweep.program)
        elif token == "${args}":
            argv.extend(flags)
        elif token == "${args_no_hyphens}":
            argv.extend(f.removeprefix("--") for f in flags)
        elif token.startswith("${") and token.endswith("}"):
            raise GridError(f"{sweep.path}: command macro {token} is not supported locally; use ${{args}}")
        else:
            argv.append(token)
    return argv


def _flag_value(tokens: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag=v`` or ``--flag v`` in a token list (the last one wins, as in the parser)."""
    found = None
    for i, token in enumerate(tokens):
        if token.startswith(f"--{flag}="):
            found = token.split("=", 1)[1]
        elif token == f"--{flag}" and i + 1 < len(tokens):
            found = tokens[i + 1]
    return found


def _set_flag(tokens: list[str], flag: str, value: str, append: bool = True) -> list[str]:
    """Replace every ``--flag=...`` / ``--flag ...`` by ``--flag=value``; add it before ``${args}`` if absent."""
    out: list[str] = []
    skip = False
    found = False
    for i, token in enumerate(tokens):
        if skip:
            skip = False
            continue
        if token.startswith(f"--{flag}=") or token == f"--{flag}":
            skip = token == f"--{flag}" and i + 1 < len(tokens)
            out.append(f"--{flag}={value}")
            found = True
        else:
            out.append(token)
    if not found and append:
        at = out.index("${args}") if "${args}" in out else len(out)
        out.insert(at, f"--{flag}={value}")
    return out


# ---- running ----------------------------------------------------------------------------------------


@dataclass
class Job:
    """A cell to run: its command, where its log and marker go."""

    cell: Cell
    label: str
    """``3/12 workflow=replace seed=0``: its place among the selected cells and its values."""
    argv: list[str]
    key: list[str]
    """The command with the interpreter written as ``python``: what a marker must hold to count as this cell."""
    log: Path
    marker: Path


def finished_earlier(job: Job) -> bool:
    """Whether the cell's marker says it exited 0 with the same command (an unreadable marker means no)."""
    try:
        done = json.loads(job.marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(done, dict) and done.get("exit_code") == 0 and done.get("args") == job.key


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def detect_gpus() -> list[str]:
    """GPU ids for ``--gpus auto``: CUDA_VISIBLE_DEVICES if set, else every GPU ``nvidia-smi`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m {s:02d}s" if m < 60 else f"{m // 60}h {m % 60:02d}m"


def _say(text: str) -> None:
    print(f"[grid] {text}", flush=True)


class _StopRequests:
    """Counts the stop signals (Ctrl-C, SIGTERM, SIGHUP) the launcher received while cells run."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.count += 1


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopRequests]:
    """While cells run, SIGINT, SIGTERM and SIGHUP only count a request that the loop checks.

    Raising KeyboardInterrupt from the handler instead could land inside ``subprocess`` bookkeeping
    (between taking and releasing a child's wait lock), after which waiting for that child blocks
    for ever; a flag is checked only where the loop is ready to stop the cells.
    """
    stop = _StopRequests()
    saved = {}
    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
        if sig is not None:
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                saved[sig] = signal.signal(sig, stop)
    try:
        yield stop
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    slot: str | None
    log: IO[str]
    t0: float


def run_jobs(jobs: Sequence[Job], *, slots: Sequence[str | None], env: dict[str, str]) -> tuple[list[Job], list]:
    """Run ``jobs``, as many at once as there are ``slots`` (a GPU id each, or None on CPU).

    Returns (cells done, [(failed cell, exit code)]). Each child runs in its own process group, so
    that a Ctrl-C reaches the launcher alone, which then stops every running cell (its worker or
    DDP processes included) with one SIGINT, and a SIGKILL after ``STOP_GRACE_S``.
    """
    pending = deque(jobs)
    free = deque(slots)
    running: list[_Running] = []
    done: list[Job] = []
    failed: list[tuple[Job, int]] = []
    with _stop_signals() as stop:
        while (pending or running) and not stop.count:
            while pending and free:
                job, slot = pending.popleft(), free.popleft()
                try:
                    running.append(_start(job, slot, env))
                except OSError as exc:  # the command cannot be started at all (not executable, ...)
                    free.append(slot)
                    failed.append((job, 127))
                    _say(f"FAILED {job.label}: cannot start {job.argv[0]}: {exc.strerror or exc}")
                    continue
                _say(f"start {job.label}" + (f" on GPU {slot}" if slot is not None else ""))
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                free.append(r.slot)
                code, seconds = r.proc.returncode, time.perf_counter() - r.t0
                r.log.write(f"# exit {code} after {_duration(seconds)}\n")
                r.log.close()
                if code == 0:
                    atomic_write_json(r.job.marker, _marker(r.job, seconds))
                    done.append(r.job)
                    _say(f"done {r.job.label}: exit 0 in {_duration(seconds)}")
                else:
                    failed.append((r.job, code))
                    _say(f"FAILED {r.job.label}: exit {code} in {_duration(seconds)}; log {r.job.log}")
            if running:
                time.sleep(0.05)
        if stop.count:
            _stop(running, stop)
            raise _Interrupted(len(done), len(running))
    return done, failed


class _Interrupted(Exception):
    def __init__(self, done: int, stopped: int):
        super().__init__(f"{done} done, {stopped} stopped")
        self.done, self.stopped = done, stopped


def _start(job: Job, slot: str | None, env: dict[str, str]) -> _Running:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    job.marker.unlink(missing_ok=True)  # a marker is only ever of the last finished run of this cell
    log = open(job.log, "a", encoding="utf-8")  # appended: the logs of earlier attempts are kept
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    log.write(f"# {stamp} {shlex.join(job.argv)}\n")
    log.flush()
    child_env = dict(env)
    if slot is not None:
        child_env["CUDA_VISIBLE_DEVICES"] = slot
    try:
        # In its own session a cell is out of reach of the terminal, so it also dies with the launcher (Linux):
        # a launcher killed with SIGKILL cannot stop it, and it would run on unwatched.
        proc = subprocess.Popen(
            job.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env,
            start_new_session=os.name == "posix", preexec_fn=die_with_parent_hook(),
        )  # fmt: skip
    except OSError as exc:
        log.write(f"# cannot start: {exc}\n")
        log.close()
        raise
    return _Running(job, proc, slot, log, time.perf_counter())


def _marker(job: Job, seconds: float) -> dict[str, Any]:
    return {
        "exit_code": 0,
        "args": job.key,
        "command": job.argv,
        "params": {k: str(v) for k, v in job.cell.params.items()},
        "seconds": round(seconds, 3),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.name == "posix":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def _stop(running: list[_Running], stop: _StopRequests) -> None:
    """SIGINT every running cell's process group (a recipe then exits 130, keeping its work), then SIGKILL
    what is still running after ``STOP_GRACE_S`` (at once after a second stop signal)."""
    for r in running:
        _signal_group(r.proc, signal.SIGINT)
    first = stop.count
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and stop.count == first and any(r.proc.poll() is None for r in running):
        time.sleep(0.05)
    kill = getattr(signal, "SIGKILL", signal.SIGTERM)
    for r in running:
        if r.proc.poll() is None:
            _signal_group(r.proc, kill)
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(STOP_GRACE_S)
        r.log.write(f"# interrupted (exit {r.proc.returncode})\n")
        r.log.close()


# ---- command line -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like the recipes' own command lines
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m tooling.grid``."""
    p = _Parser(prog="python -m tooling.grid", description="Run a W&B grid sweep file locally, one process per cell.")
    p.add_argument("sweep", metavar="SWEEP_YAML", help="A sweep file, e.g. sweeps/mnist_vae.yaml (method: grid).")
    p.add_argument("--jobs", type=int, default=None, help="Cells at once (default 1; at most the CPU cores).")
    p.add_argument(
        "--gpus",
        metavar="IDS|auto",
        help="One cell per listed GPU at a time, via CUDA_VISIBLE_DEVICES (0,1; 0,0,1,1 = two per GPU; auto = all).",
    )
    p.add_argument("--dry_run", action="store_true", help="Print every cell's command; run nothing, write nothing.")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="K=V[,K=V]",
        help="Only cells with these values, e.g. 'workflow=replace,seed=0'; repeat for more (any may match).",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="K=V",
        help="Give parameter K the one value V in every cell (new or replacing its values), e.g. generations=2.",
    )
    p.add_argument("--out_root", help="Run folders go to OUT_ROOT/<sweep>/{hash} instead of the file's --out_dir.")
    p.add_argument("--log_dir", help="Logs and .done markers (default <out_root or runs/grid>/<sweep>/logs).")
    p.add_argument(
        "--wandb",
        choices=WANDB_MODES,
        default=None,
        help="W&B mode of every cell (default offline, whatever the file says).",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run (or print) the cells; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except UserError as exc:
        sys.stderr.write(f"error: {' '.join(str(exc).split())}\n")
        return 2
    except _Interrupted as stop:
        sys.stderr.write(
            f"interrupted: {stop.stopped} running cell(s) stopped; finished cells are kept ({stop.done} finished "
            "now); run the same command again to resume\n"
        )
        return 130
    except KeyboardInterrupt:  # before any cell started
        sys.stderr.write("interrupted: no cell was running\n")
        return 130


def _main(args: argparse.Namespace) -> int:
    sweep = apply_sets(load_sweep(args.sweep), args.set)
    cells = expand(sweep)
    chosen = select(cells, args.only, list(sweep.parameters))
    out_dir = out_dir_template(sweep, args.out_root, len(chosen))
    if not Path(sweep.program).is_file():
        raise GridError(
            f"program {sweep.program} not found from {Path.cwd()}; run from the folder wandb agent would run in "
            "(the repository root)"
        )
    for flag in ("out_root", "log_dir"):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise GridError(f"--{flag}: empty path; give a folder or leave the flag out")
    if args.out_root is not None:  # the cells' run folders go to OUT_ROOT/<sweep>/{hash}
        check_folder(f"--out_root {args.out_root}", Path(args.out_root) / sweep.name)
    log_dir = Path(args.log_dir or Path(args.out_root or DEFAULT_ROOT) / sweep.name / "logs")
    log_label = f"--log_dir {args.log_dir}" if args.log_dir else f"the logs folder {log_dir} (default of --log_dir)"
    check_folder(log_label, log_dir)
    mode = args.wandb or "offline"
    slots, threads = _slots(args, len(chosen))

    jobs = []
    for i, cell in enumerate(chosen, 1):
        kw = dict(wandb_mode=mode, wandb_explicit=args.wandb is not None, out_dir=out_dir)
        jobs.append(
            Job(
                cell,
                f"{i}/{len(chosen)} {cell.describe()}",
                render(sweep, cell, **kw),
                render(sweep, cell, interpreter="python", **kw),
                log_dir / f"{cell.name}.log",
                log_dir / f"{cell.name}.done",
            )
        )
    earlier = {id(j) for j in jobs if finished_earlier(j)}
    todo = [j for j in jobs if id(j) not in earlier]
    skipped = len(earlier)
    head = f"sweep {sweep.name}: {len(jobs)} of {len(cells)} cells, {skipped} finished earlier"
    # Every cell's flags through the recipe's own parser first: a misspelt parameter or a value out of range is
    # refused here, not once per cell after each has started.
    refused = dict(refused_cells(sweep, jobs if args.dry_run else todo))
    if args.dry_run:
        _say(f"{head}; dry run, logs would go to {log_dir}")
        for job in jobs:
            tag = " (finished earlier: skipped)" if id(job) in earlier else ""
            tag += f" (refused by {sweep.program}: {refused[id(job)]})" if id(job) in refused else ""
            print(f"# {job.label}{tag}\n{shlex.join(job.argv)}", flush=True)
    elif refused:
        for job in todo:
            if id(job) in refused:
                _say(f"refused {job.label}: {refused[id(job)]}")
    if refused:
        where = "the # lines above say why" if args.dry_run else "the lines above say why; no cell was started"
        raise GridError(
            f"{len(refused)} of {len(jobs)} cells have flags that {sweep.program} refuses ({where}), "
            f"e.g. {next(iter(refused.values()))}"
        )
    if args.dry_run:
        return 0
    try:  # made now, before any cell starts, so a folder that cannot be made is one error, not one per cell
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GridError(f"{log_label}: cannot create it: {exc.strerror or exc}") from None
    if todo:
        gpus = f" on GPUs {','.join(str(s) for s in slots)}" if slots[0] is not None else ""
        _say(f"{head}; running {len(todo)}, {min(len(slots), len(todo))} at a time{gpus}; logs in {log_dir}")
    else:
        _say(f"{head}; nothing left to run (logs in {log_dir})")
    for job in jobs:
        if id(job) in earlier:
            _say(f"skip {job.label}: finished earlier ({job.marker.name})")
    env = dict(os.environ, WANDB_MODE=mode, PYTHONUNBUFFERED="1")
    if threads is not None:
        for var in THREAD_VARS:  # a value the user exported wins
            env.setdefault(var, str(threads))
    t0 = time.perf_counter()
    done, failed = run_jobs(todo, slots=slots, env=env) if todo else ([], [])
    _say(
        f"sweep {sweep.name}: {len(jobs)} cells: {len(done)} done, {len(failed)} failed, {skipped} skipped "
        f"(finished earlier) in {_duration(time.perf_counter() - t0)}"
    )
    for job, code in failed:
        _say(f"failed: {job.cell.describe()} (exit {code}): log {job.log}")
    return 1 if failed else 0


def refused_cells(sweep: Sweep, jobs: Sequence[Job]) -> list[tuple[int, str]]:
    """``(id(job), reason)`` for each cell whose flags the recipe's own command line refuses (a misspelt
    parameter, a value out of range), parsed here without running anything; only for this project's recipes
    (a program in its ``recipes/`` folder), none for other programs."""
    import importlib
    import io

    from collapse.cli import parse_config, recipe_config_class

    program = Path(sweep.program).resolve()
    if program.parent != Path(__file__).resolve().parents[1] / "recipes" or program.suffix != ".py":
        return []
    config = recipe_config_class(importlib.import_module(f"recipes.{program.stem}"))
    if config is None:
        return []
    refused = []
    for job in jobs:
        flags = job.argv[job.argv.index(sweep.program) + 1 :] if sweep.program in job.argv else []
        said = io.StringIO()  # a parser writes its reason to stderr before it exits
        try:
            with contextlib.redirect_stderr(said):
                parse_config(config, flags)
        except SystemExit:
            lines = said.getvalue().strip().splitlines()
            refused.append((id(job), (lines[-1] if lines else "refused").removeprefix("error: ")))
        except UserError as exc:
            refused.append((id(job), " ".join(str(exc).split())))
    return refused


def _slots(args: argparse.Namespace, cells: int) -> tuple[list[str | None], int | None]:
    """The launch slots (a GPU id each, or None for CPU) and the threads per child (None: leave them)."""
    cores = available_cores()
    if args.jobs is not None and args.jobs < 1:
        raise GridError(f"--jobs must be >= 1, got {args.jobs}")
    if args.gpus is not None:
        gpus = gpu_ids(args.gpus)
        if args.jobs is not None and args.jobs != len(gpus):
            raise GridError(
                f"--jobs {args.jobs} with --gpus {args.gpus}: each listed GPU runs one cell at a time "
                f"({len(gpus)} at once); list an id twice for two cells on one GPU"
            )
        slots: list[str | None] = list(gpus)
    else:
        jobs = args.jobs or 1
        if jobs > cores:
            _say(f"--jobs {jobs} is more than the {cores} CPU cores; running {cores} at a time")
            jobs = cores
        slots = [None] * jobs
    # Children share the cores: cores // (cells at once) threads each, so the machine is not oversubscribed.
    at_once = min(len(slots), max(1, cells))
    return slots, (max(1, cores // at_once) if at_once > 1 else None)


_GPU_ID = re.compile(r"[0-9]+|(GPU-|MIG-|MIG-GPU-)[0-9a-fA-F]{8}[0-9A-Za-z/-]*")
"""A GPU as CUDA_VISIBLE_DEVICES names it: an index, or a GPU or MIG UUID (``MIG-GPU-<uuid>/<gi>/<ci>`` before
CUDA 11.4)."""


def gpu_ids(text: str) -> list[str]:
    """The GPU ids of ``--gpus``: ``auto`` (:func:`detect_gpus`) or comma-separated indices such as ``0,1`` (or the
    ``GPU-``/``MIG-`` UUIDs that CUDA_VISIBLE_DEVICES also takes).

    Anything else is refused: CUDA_VISIBLE_DEVICES set to an id that names no GPU hides every GPU, and a
    cell would then run on CPU (or fail) without a word. An index listed twice runs two cells on that GPU.
    """
    if text.strip() == "auto":
        found = detect_gpus()
        if not found:
            raise GridError("--gpus auto: no GPU found (CUDA_VISIBLE_DEVICES, nvidia-smi)")
        return found
    ids = [g.strip() for g in text.split(",")]
    if not all(ids):
        raise GridError(f"--gpus {text}: empty id; give GPU indices such as 0,1 (or auto)")
    bad = next((g for g in ids if not _GPU_ID.fullmatch(g)), None)
    if bad is not None:
        raise GridError(
            f"--gpus {text}: {bad!r} is not a GPU index or UUID; give non-negative integers such as 0,1, "
            "GPU-/MIG- UUIDs as nvidia-smi -L lists them, or auto"
        )
    return [str(int(g)) if g.isdigit() else g for g in ids]  # 01 is GPU 1


def check_folder(label: str, path: Path) -> None:
    """Refuse a folder that cannot be made or written (``label`` names it in the error): the path, or a folder
    above it, is a file, or the nearest existing folder is not writable. Creates nothing (a dry run writes nothing).
    """
    here = Path(os.path.abspath(path))
    try:
        for existing in (here, *here.parents):
            if existing.is_dir():
                break
            if existing.exists() or existing.is_symlink():
                what = "a broken link" if not existing.exists() else "a file"
                raise GridError(f"{label}: {existing} is {what}, not a folder")
    except OSError as exc:  # a folder above it that cannot be looked into
        raise GridError(f"{label}: cannot reach it: {exc.strerror or exc}") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GridError(f"{label}: cannot write in {existing} (permission denied)")


def cli() -> None:
    """Console entry point: exit with :func:`main`'s status."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
