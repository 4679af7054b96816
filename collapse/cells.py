"""The result files of the analytic recipes' grid cells, written so that only a whole, unchanged one is ever used.

A finished cell is ``cells/<cell>.csv`` plus, written after it, ``cells/<cell>.json``: its row count and the
sha256 of its bytes. Resume and the figure tools use a cell only when the two agree, so a file cut at any
point, edited, or left by something else is recomputed (or skipped), never half-read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from collapse.atomic import atomic_open

CELL_RECORD_SUFFIX = ".json"
"""Beside each ``cells/<cell>.csv``: ``<cell>.json``, its row count and sha256, written after it."""


def write_cell(path: Path, columns: Sequence[str], rows: list[str]) -> None:
    """Write a cell's CSV, then its record (row count and sha256 of the CSV's bytes), each atomically.

    The record is written last: a cell counts as finished only when both exist and agree
    (:func:`cell_problem`), so a cut, edited or foreign file is recomputed rather than half-read.
    """
    data = (",".join(columns) + "\n" + "".join(row + "\n" for row in rows)).encode("utf-8")
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    record = {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
    with atomic_open(path.with_suffix(CELL_RECORD_SUFFIX), "w") as fh:
        json.dump(record, fh)


def cell_problem(path: Path) -> str | None:
    """Why the cell file ``path`` cannot be used as a finished cell, or None when it can.

    It must have its record (written after it) and match it: same sha256, same number of rows.
    """
    record_path = path.with_suffix(CELL_RECORD_SUFFIX)
    if not record_path.is_file():
        return "no record of a finished cell beside it"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        rows, digest = int(record["rows"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return f"its record {record_path.name} is unreadable ({type(exc).__name__})"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        return "its contents differ from what was written (cut or edited)"
    found = data.count(b"\n") - 1  # the header line is not a row
    if found != rows:
        return f"it holds {found} rows, its record {rows}"
    return None


__all__ = ["CELL_RECORD_SUFFIX", "cell_problem", "write_cell"]
