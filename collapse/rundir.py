"""Run directories: the config guard, the run lock, ``config.yaml`` and the tidy ``metrics.csv``.

``metrics.csv`` is long format, one row per (workflow, grid cell, seed, generation, metric)::

    workflow,<grid parameters...>,seed,generation,metric,value

``generation`` is 0-based: generation 0 is the model fitted on real data.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import json
import os
import re
import shutil
import socket
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from collapse.atomic import NO_FLOCK, atomic_open, atomic_write_text
from collapse.errors import UserError
from collapse.store import GenerationStore

CONFIG = "config.yaml"
METRICS = "metrics.csv"
LOCK = ".collapse-run.lock"
"""The run directory's lock file (pid, host and start time of the run holding it)."""
TAIL_COLUMNS = ("seed", "generation", "metric", "value")
GENERATIONS = "generations"
"""The config key that may grow on resume where the caller allows it (see :func:`prepare_run_dir`)."""

# Flags that change how a run is executed or logged, not what it computes: they may differ on resume.
EXECUTION_KEYS = frozenset(
    {"overwrite", "wandb", "log_every", "report", "workers", "num_workers", "config", "print_config", "dry_run"}
    | {"log_level", "progress_every"}  # console output only
    | {"checkpoint_minutes"}  # when mid-epoch checkpoints are written; a fit resumed from one goes on exactly
)

RUN_FILES: tuple[str, ...] = (
    re.escape(CONFIG),
    re.escape(METRICS),
    r"metrics\.json",
    r"data\.json",  # what a recipe read from its real data source (tinystories, geom_diffusion)
    r"tokenizer\.json",  # tinystories: the run's frozen tokenizer
    r"cells",  # analytic recipes: one file per finished grid cell
    r"\.scratch",  # analytic recipes: memory-mapped pools of the cells being computed
    r"gen_\d{3,}",  # Lightning recipes: a finished generation
    r"\.gen_\d{3,}\.partial",  # Lightning recipes: a generation being made
    r"report",  # analytic recipes: plots and report.md
    r"wandb",  # the offline W&B run
    re.escape(LOCK),
)
"""What the recipes write at the top of a run directory (regular expressions of names). ``--overwrite``
deletes these, and the temporary names they are written under, and nothing else."""

_RUN_FILE = re.compile("|".join(f"(?:{p})" for p in RUN_FILES))
_TMP_FILE = re.compile(r"\.(.+)\.tmp-\d+")  # collapse.atomic's name for a file still being written


class RunDirError(UserError):
    """An --out_dir that cannot be used as asked."""


def config_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (nested dataclasses become dicts)."""
    raw = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return _plain(raw)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _identity(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in EXECUTION_KEYS and k != "out_dir"}


def config_hash(config: dict[str, Any]) -> str:
    """A short, stable hash of what a config computes (execution-only flags left out)."""
    import hashlib

    text = json.dumps(_identity(config), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def resolve_out_dir(template: str, config: dict[str, Any]) -> str:
    """Fill ``{hash}`` in an --out_dir (one folder per distinct config: W&B sweeps, grids of launches).

    An empty --out_dir is refused: it would make the current folder the run directory. A leading ``~`` is the
    home folder, as a shell would expand it (``--out_dir=~/x`` or a --config file reach here unexpanded; a folder
    literally named ``~`` in the current one invites ``rm -rf ~``).
    """
    if not str(template).strip():
        raise RunDirError("--out_dir is empty; give the folder the run writes to, e.g. --out_dir runs/my_run")
    template = os.path.expanduser(template)
    if "{" not in template:
        return template
    try:
        return template.format(hash=config_hash(config))
    except (KeyError, IndexError, ValueError, AttributeError, TypeError):
        raise RunDirError(f"--out_dir {template!r}: the only placeholder allowed is {{hash}}") from None


def is_run_file(name: str) -> bool:
    """Whether ``name``, at the top of a run directory, is something the recipes write (:data:`RUN_FILES`)."""
    tmp = _TMP_FILE.fullmatch(name)
    return bool(_RUN_FILE.fullmatch(tmp.group(1) if tmp else name))


def prepare_run_dir(
    out_dir: str | Path,
    recipe: str,
    config: dict[str, Any],
    overwrite: bool = False,
    extendable: bool = False,
    defaults: dict[str, Any] | None = None,
) -> Path:
    """Lock ``out_dir`` for this process, make it ready for this config and write its ``config.yaml``.

    The lock (:func:`lock_run_dir`) is taken before anything is written and kept until
    :func:`release_run_dir` or the end of the process; a folder another run holds is refused.

    Re-running the same config resumes. A folder that holds a run with a different config is
    refused unless ``overwrite`` is true; then the old run's outputs (:data:`RUN_FILES`) are deleted
    and every other file in the folder is kept, with one line naming what was kept. Deleting the
    outputs beside foreign files needs a readable ``config.yaml`` of a run: without one the folder
    may be no run folder at all, and even ``overwrite`` is refused. A ``config.yaml`` that is not a
    run's (unreadable, or no ``recipe`` key) is never deleted.

    ``extendable`` (the Lightning loop, one ``gen_XXX`` folder per generation): ``generations`` may
    differ from the run's. More continues the run (config.yaml records the new count); fewer is
    accepted only while no generation at or past the new count is finished, since a run is never cut
    short. A finished run whose last generation drew no synthetic set (a one-generation run draws
    none) cannot be extended. Without ``extendable`` (the analytic recipes, whose grid cells are
    computed for one count of generations) another count is a different config.

    ``defaults`` (:func:`config_defaults` of the recipe's config class): a key the run's config.yaml
    lacks, an option added since the run was made, is no difference while it holds its default.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out_dir {out} is a file, not a folder")
    new = {"recipe": recipe, **config}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--out_dir {out} cannot be created: {exc.strerror or exc}") from None
    taken = lock_run_dir(out)
    try:
        _make_room(out, new, overwrite, extendable, defaults)
        _remove_torn_files(out)
        atomic_write_text(out / CONFIG, yaml.safe_dump(new, sort_keys=False))
    except BaseException:
        if taken:  # a refused run leaves the folder as it found it
            release_run_dir(out)
        raise
    return out


def _remove_torn_files(out: Path) -> None:
    """Delete the temporary files a killed run left mid-write (this run holds the lock: nobody else writes here).

    They are never read (a file is published by renaming its temporary into place); the generation store
    cleans its staging folders itself.
    """
    for folder in (out, out / "cells"):
        if folder.is_dir():
            for path in folder.iterdir():
                if _TMP_FILE.fullmatch(path.name) and path.is_file():
                    path.unlink(missing_ok=True)


def _make_room(
    out: Path, new: dict[str, Any], overwrite: bool, extendable: bool, defaults: dict[str, Any] | None = None
) -> None:
    """Check the run already in ``out`` against ``new``; delete its outputs if they must go (``overwrite``)."""
    # Hidden names last: messages name the visible outputs first.
    entries = sorted((p for p in out.iterdir() if p.name != LOCK), key=lambda p: (p.name.startswith("."), p.name))
    ours = [p for p in entries if is_run_file(p.name)]
    foreign = [p for p in entries if not is_run_file(p.name)]
    if not ours:
        return  # a new run, beside whatever else the folder holds
    cfg_path = out / CONFIG
    has_config = cfg_path.is_file()
    if has_config:
        try:
            old = yaml.safe_load(cfg_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict) or "recipe" not in old:
            what = "unreadable" if not isinstance(old, dict) else "no run's config (it has no recipe key)"
            raise RunDirError(
                f"--out_dir {out}: {cfg_path} is {what}, so it is left alone, even by --overwrite; "
                "move it away or choose another --out_dir"
            )
        reason = _difference(out, old, new, extendable, defaults)
    else:
        reason = f"run outputs but no {CONFIG}"
    if reason is None:
        return
    if foreign and not has_config:
        raise RunDirError(
            f"--out_dir {out} holds run outputs ({listed_names(ours)}) but no {CONFIG} beside other files "
            f"({listed_names(foreign)}), so it may be no run folder and even --overwrite deletes nothing there; "
            "choose another --out_dir"
        )
    if not overwrite:
        raise RunDirError(
            f"--out_dir {out} holds {reason}; choose another --out_dir, or pass --overwrite true to delete "
            f"that run's outputs ({listed_names(ours)}; other files are kept)"
        )
    for p in ours:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()  # a link is removed, never what it points to
    if foreign:
        kept = listed_names(foreign)
        print(f"--overwrite: deleted the old run's outputs in {out} and kept its other files: {kept}", flush=True)


def _difference(
    out: Path, old: dict[str, Any], new: dict[str, Any], extendable: bool, defaults: dict[str, Any] | None = None
) -> str | None:
    """Why the run in ``out`` (config ``old``) cannot go on under ``new``, or None when it can."""
    grows = extendable and all(isinstance(c.get(GENERATIONS), int) for c in (old, new))
    skip = {GENERATIONS} if grows else set()
    diff = _first_difference(_identity(old), _identity(new), skip, defaults=defaults)
    if diff:
        reason = f"a run with a different config ({diff})"
        if diff.startswith(f"{GENERATIONS}:") and not extendable:
            reason += ", and this recipe's runs are never extended (each result is for one count of generations)"
        return reason
    if not grows or old[GENERATIONS] == new[GENERATIONS]:
        return None
    store = GenerationStore(out)
    done = store.completed()
    wanted = new[GENERATIONS]
    if done and done[-1] >= wanted:
        return (
            f"a run with {len(done)} finished generations (the last gen_{done[-1]:03d}), more than --generations "
            f"{wanted} (a run is never cut short: give --generations {done[-1] + 1} or more to keep it)"
        )
    if done and done[-1] < wanted - 1 and store.manifest(done[-1]).get("num_samples") == 0:
        return (
            f"a finished run of {done[-1] + 1} generation(s) whose last one drew no synthetic set (a one-generation "
            f"run draws none), so it cannot be extended to --generations {wanted}"
        )
    return None


def listed_names(paths: Sequence[Path] | Sequence[str], limit: int = 4) -> str:
    """The first ``limit`` of ``paths`` for a message: names only, a folder (not a link to one) with a trailing
    slash, strings as given, then how many more there are: ``"a.txt, notes/ and 3 more"``."""
    shown = [
        p.name + ("/" if p.is_dir() and not p.is_symlink() else "") if isinstance(p, Path) else p for p in paths[:limit]
    ]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(shown) + more


# ---- the run lock -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Lock:
    path: Path
    fd: int


_HELD: dict[Path, _Lock] = {}
"""Run directories this process has locked: their lock file stays open (and so locked) while listed here."""


def lock_run_dir(out_dir: str | Path) -> bool:
    """Lock the existing folder ``out_dir`` for this process; True if taken now, False if already held here.

    An advisory ``flock`` on ``<out_dir>/.collapse-run.lock`` (:data:`LOCK`), a file that also records
    pid, host and start time to name the holder. The kernel drops it when the process ends in any way
    (SIGKILL included), so a crash leaves no stale lock. Where the file system cannot ``flock``, the
    file itself is the lock: it is created exclusively, and one left by a dead process of the same
    host is taken over. A folder held by another process is refused at once. Release with
    :func:`release_run_dir` (or process exit).
    """
    out = Path(out_dir).resolve()
    if out in _HELD:
        return False  # the same process running again in the same folder (tests, notebooks)
    path = out / LOCK
    try:
        fd = _flock(out, path)
        if fd is None:
            fd = _pid_lock(out, path)
    except OSError as exc:
        raise RunDirError(f"--out_dir {out}: cannot lock {path}: {exc.strerror or exc}") from None
    _HELD[out] = _Lock(path, fd)
    return True


def release_run_dir(out_dir: str | Path) -> None:
    """Release this process's lock on ``out_dir`` and remove the lock file; a no-op if not held here."""
    lock = _HELD.pop(Path(out_dir).resolve(), None)
    if lock is None:
        return
    try:
        lock.path.unlink(missing_ok=True)  # while still locked: a process that opened it re-checks after locking
    except OSError:
        pass
    finally:
        os.close(lock.fd)


@atexit.register
def _release_all() -> None:
    for out in list(_HELD):
        release_run_dir(out)


def _flock(out: Path, path: Path) -> int | None:
    """An open, flock-ed descriptor of ``path`` with this process's details, or None where flock is unsupported."""
    try:
        import fcntl
    except ImportError:  # not on a POSIX system
        return None
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirError(_busy(out, holder)) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in NO_FLOCK:
                return None
            raise
        # The previous holder removes the file when it releases: if it did so after our open, this lock is on a
        # file nobody else will see, so open the path again.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            _write_holder(fd)
            return fd
        os.close(fd)
    raise RunDirError(f"--out_dir {out}: cannot lock {path}: it keeps being replaced by other processes")


def _pid_lock(out: Path, path: Path) -> int:
    """The lock without flock: create ``path`` exclusively, taking over one left by a dead process of this host."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if _stale(holder):
                path.unlink(missing_ok=True)
                continue
            hint = "" if holder.get("host") == socket.gethostname() else f" (if that run has ended, delete {path})"
            raise RunDirError(_busy(out, holder) + hint) from None
        _write_holder(fd)
        return fd
    raise RunDirError(f"--out_dir {out}: cannot lock {path}: it keeps being replaced by other processes")


def _write_holder(fd: int) -> None:
    since = datetime.now().astimezone().isoformat(timespec="seconds")
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, text.encode())


def _read_holder(source: int | Path) -> dict[str, Any]:
    """The details in a lock file ({} when it holds none yet, or not ours)."""
    try:
        if isinstance(source, int):
            os.lseek(source, 0, os.SEEK_SET)
            raw = os.read(source, 4096)
        else:
            raw = Path(source).read_bytes()[:4096]
        holder = json.loads(raw.decode())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _stale(holder: dict[str, Any]) -> bool:
    """Whether a lock file was left by a process of this host that no longer runs (this one included)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True  # not in _HELD, so this process no longer holds it (a pid reused after a crash)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def _busy(out: Path, holder: dict[str, Any]) -> str:
    if holder.get("pid") is not None:
        who = f"pid {holder.get('pid')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
    else:
        who = "a process that is just starting"
    return f"--out_dir {out} is in use by another run ({who}); wait for it to end or choose another --out_dir"


def _first_difference(
    old: dict[str, Any],
    new: dict[str, Any],
    skip: Iterable[str] = (),
    prefix: str = "",
    defaults: dict[str, Any] | None = None,
) -> str | None:
    """The first setting that differs between two configs, as ``key: old -> new``, or None.

    Groups (``trainer``, ``model``, ...) are compared key by key. A key the old config does not hold
    belongs to an option added after that run was made: the run behaved as the option's default does,
    so the key is no difference while its new value is that default (``defaults``, same nesting).
    """
    defaults = defaults or {}
    for key in sorted((set(old) | set(new)) - set(skip)):
        after = new.get(key)
        if key not in old:
            if key in defaults and key in new and defaults[key] == after:
                continue
            return f"{prefix}{key}: None -> {after!r}"
        before = old[key]
        if isinstance(before, dict) and isinstance(after, dict):
            below = defaults.get(key) if isinstance(defaults.get(key), dict) else None
            diff = _first_difference(before, after, prefix=f"{prefix}{key}.", defaults=below)
            if diff:
                return diff
        elif before != after and not _resolved_from(f"{prefix}{key}", before, after):
            return f"{prefix}{key}: {before!r} -> {after!r}"
    return None


def _resolved_from(path: str, before: Any, after: Any) -> bool:
    """Whether ``after`` is what a setting recorded as ``before`` by an earlier version now resolves to: runs made
    before ``--trainer.devices auto`` was recorded as its number of devices recorded ``auto`` (or -1)."""
    return path == "trainer.devices" and str(before).strip() in ("auto", "-1") and isinstance(after, int)


def config_defaults(cls: type) -> dict[str, Any]:
    """The defaults of a config dataclass as :func:`config_dict` writes them (fields without one left out)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            try:
                value = f.default_factory()
            except Exception:  # a default that needs the run's context: no default to compare with
                continue
        else:
            continue
        out[f.name] = config_dict(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def metric_name(name: str) -> str:
    """The one spelling of a metric name, used in metrics.json, metrics.csv, W&B and on the console.

    Metric names join their words with underscores: ``test_loss``, ``train_loss``, ``val_loss``,
    ``test_perplexity``, ``sample_fid``. Runs made by earlier versions of the recipes hold a slash instead in
    their ``gen_XXX/metrics.json`` (``test/loss``, ``test/recon``, ``test/kl``, ``test/perplexity``,
    ``test/cov_r``, ``sample/fid``, ``sample/distinct_2``, ...; metrics.csv always had the underscore form):
    every ``/`` becomes ``_``. Names already in the current spelling are returned unchanged.
    """
    return name.replace("/", "_")


def upgrade_metric_names(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics.json's contents with every key in its current spelling (:func:`metric_name`).

    Every reader of a generation's metrics.json goes through this, so a run directory made before the names were
    unified still resumes, writes the same metrics.csv and is read by the report and the figures.
    """
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        new = metric_name(name)
        if new == name or new not in metrics:  # a key in both spellings: the current one wins
            out[new] = value
    return out


def write_metrics(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write a tidy CSV atomically."""
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def concat_csv(target: str | Path, parts: Sequence[str | Path], rows_multiple_of: int = 1) -> int:
    """Concatenate CSV files that share a header into ``target`` atomically; returns data rows written.

    Each part must hold a positive multiple of ``rows_multiple_of`` data rows (checked in the same read).
    """
    header: str | None = None
    rows = 0
    with atomic_open(target, "w") as out:
        for part in parts:
            with open(part, encoding="utf-8") as fh:
                first = fh.readline()
                if header is None:
                    header = first
                    out.write(first)
                elif first != header:
                    raise RunDirError(f"{part}: header differs from the other result files")
                body = fh.read()
                n = body.count("\n")
                if n <= 0 or n % rows_multiple_of:
                    raise RunDirError(
                        f"{part}: {n} rows, expected a multiple of {rows_multiple_of}; delete it to recompute"
                    )
                out.write(body)
                rows += n
    return rows


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """Rows of a metrics.csv as dicts of strings."""
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))
