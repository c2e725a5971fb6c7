"""The results table: one JSON line per task id, appended as tasks finish, sorted by id at the end.

Every row is appended, flushed and fsync'ed as soon as it arrives, so Ctrl-C or a crash loses
at most the task in flight; ``--resume`` reads the ids already present (ignoring a torn last
line) and skips them. Sorting by id at the end makes local and Ray tables byte-identical.

Rows are strict JSON (RFC 8259): a metric that is not a finite number (a diverged merge gives a
NaN or infinite loss) is written as ``null``, meaning "not a finite number"; the tables
(``tables``) read ``null`` back as NaN. No ``NaN``/``Infinity`` token is ever written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import MergescopeError
from ..results import finite_or_null


def _dumps(row: dict) -> str:
    return json.dumps(finite_or_null(row), sort_keys=True, separators=(",", ":"), allow_nan=False)


def read_rows(path: str | os.PathLike) -> dict[str, dict]:
    """Rows by id; lines that do not parse (a torn write) are skipped, the first row of an id wins."""
    from ..io.untrusted import open_regular

    rows: dict[str, dict] = {}
    path = Path(path)
    if not path.exists():
        return rows
    fd = open_regular(path, "results table")  # a FIFO or folder is refused, never waited on
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        text = f.read()
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError):  # torn, nested too deeply, huge integer
            continue
        if isinstance(row, dict) and "id" in row:
            rows.setdefault(row["id"], row)
    return rows


def write_sorted(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Rewrite the table atomically, one row per id, sorted by id."""
    path = Path(path)
    unique = {}
    for row in rows:
        unique.setdefault(row["id"], row)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for key in sorted(unique):
            f.write(_dumps(unique[key]) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


class ResultsWriter:
    """Append-only JSONL writer that never writes an id twice."""

    def __init__(self, path: str | os.PathLike, resume: bool = False, force: bool = False):
        self.path = Path(path)
        if self.path.exists() and not (resume or force):
            raise MergescopeError(f"{self.path}: exists; pass --resume to continue it or --force to start over")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_rows(self.path) if resume else {}
        write_sorted(self.path, self.rows.values())  # drops a torn last line before appending
        self._file = open(self.path, "a")

    def add(self, row: dict) -> bool:
        """Append ``row`` unless its id is already in the table; returns whether it was written."""
        if row["id"] in self.rows:
            return False
        row = finite_or_null(row)  # what is kept in memory is what the file says
        self._file.write(_dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows[row["id"]] = row
        return True

    def close(self, sort: bool = True) -> None:
        self._file.close()
        if sort:
            write_sorted(self.path, self.rows.values())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()
