"""Run directories: the config guard, ``config.yaml`` and the tidy ``metrics.csv``.

``metrics.csv`` is long format, one row per (workflow, grid cell, seed, generation, metric)::

    workflow,<grid parameters...>,seed,generation,metric,value

``generation`` is 0-based: generation 0 is the model fitted on real data.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from collapse.atomic import atomic_open, atomic_write_text
from collapse.errors import UserError

CONFIG = "config.yaml"
METRICS = "metrics.csv"
TAIL_COLUMNS = ("seed", "generation", "metric", "value")

# Flags that change how a run is executed or logged, not what it computes: they may differ on resume.
EXECUTION_KEYS = frozenset(
    {"overwrite", "wandb", "log_every", "report", "workers", "num_workers", "config", "print_config", "dry_run"}
)


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
    import json

    text = json.dumps(_identity(config), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def resolve_out_dir(template: str, config: dict[str, Any]) -> str:
    """Fill ``{hash}`` in an --out_dir (one folder per distinct config: W&B sweeps, grids of launches)."""
    if "{" not in template:
        return template
    try:
        return template.format(hash=config_hash(config))
    except (KeyError, IndexError, ValueError):
        raise RunDirError(f"--out_dir {template!r}: the only placeholder allowed is {{hash}}") from None


def _looks_like_run(out: Path) -> bool:
    return any(p.name in (METRICS, CONFIG, "cells") or p.name.startswith(("gen_", ".gen_")) for p in out.iterdir())


def prepare_run_dir(out_dir: str | Path, recipe: str, config: dict[str, Any], overwrite: bool = False) -> Path:
    """Make ``out_dir`` ready for this config and write its ``config.yaml``.

    Re-running the same config resumes. A folder that holds a run with a different config is
    refused unless ``overwrite`` is true, in which case the old run is deleted.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out_dir {out} is a file, not a folder")
    new = {"recipe": recipe, **config}
    cfg_path = out / CONFIG
    if out.is_dir() and _looks_like_run(out):
        reason = None
        if cfg_path.is_file():
            try:
                old = yaml.safe_load(cfg_path.read_text()) or {}
            except yaml.YAMLError:
                old = None
            if not isinstance(old, dict):
                reason = f"{cfg_path} is unreadable"
            else:
                diff = _first_difference(_identity(old), _identity(new))
                if diff:
                    reason = f"a run with a different config ({diff})"
        else:
            reason = f"run outputs but no {CONFIG}"
        if reason:
            if not overwrite:
                raise RunDirError(
                    f"--out_dir {out} holds {reason}; pass --overwrite true to replace it, or choose another --out_dir"
                )
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, yaml.safe_dump(new, sort_keys=False))
    return out


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


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
