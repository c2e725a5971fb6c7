"""Sweeps: grids of merges, evaluations and pairwise barriers, on a local process pool or on Ray.

A sweep YAML (``spec``) expands into picklable task specs with stable ids; an executor
(``executors``) runs the same task function (``work.run_task``) locally or as Ray tasks (small
checkpoints reach Ray tasks through the object store, ``sharing``; a dead ``--ray`` address fails
fast, ``address``); rows go to a JSON-lines table as they finish (``results``), so an interrupted
sweep resumes; ``tables`` turns rows into a barrier matrix or a validation-picked coefficient search.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .executors import Executor, LocalExecutor, RayExecutor, make_executor
from .results import ResultsWriter, read_rows, write_sorted
from .spec import TaskSpec, expand, parse, read, task_id
from .tables import Choice, barrier_matrix_from_rows, coefficient_search
from .work import FAULT_ENV, run_task

HOLD_ENV = "MERGESCOPE_SWEEP_HOLD_AFTER_FIRST_ROW"
HOLD_LIMIT_S = 300.0


def _hold_after_first_row() -> None:
    """Test hook: with $MERGESCOPE_SWEEP_HOLD_AFTER_FIRST_ROW naming a file, the driver stops once the
    first row of this run is on disk, until that file exists (at most ``HOLD_LIMIT_S``), so a test's
    Ctrl-C always lands mid-sweep however busy the machine is. Unset (always, outside tests): no effect."""
    marker = os.environ.get(HOLD_ENV)
    if not marker:
        return
    import time

    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.02)


@dataclass(frozen=True)
class SweepResult:
    """What a run did: the table it wrote, how many tasks there are, ran now and were already there."""

    out: str
    total: int
    ran: int
    skipped: int
    rows: tuple[dict, ...]

    def to_dict(self) -> dict:
        return {"out": self.out, "total": self.total, "ran": self.ran, "skipped": self.skipped}


def run(sweep_file: str | os.PathLike, out: str | os.PathLike, executor: Executor | None = None,
        resume: bool = False, force: bool = False,
        on_row: Callable[[int, int, dict], None] | None = None) -> SweepResult:
    """Run a sweep YAML; checkpoints are resolved relative to the YAML's folder. ``on_row(done, total,
    row)`` is called after each row is safely on disk. Rows for tasks no longer in the sweep are kept."""
    sweep_file = Path(sweep_file)
    specs = expand(read(sweep_file), root=sweep_file.resolve().parent)
    return run_specs(specs, out, executor, resume, force, on_row)


def run_specs(specs, out, executor: Executor | None = None, resume: bool = False, force: bool = False,
              on_row: Callable[[int, int, dict], None] | None = None) -> SweepResult:
    """Run task specs into the table at ``out`` (see ``run``)."""
    executor = executor or LocalExecutor()
    writer = ResultsWriter(out, resume=resume, force=force)
    todo = [s for s in specs if s.id not in writer.rows]
    skipped, ran = len(specs) - len(todo), 0
    produced = executor.run(todo)
    try:
        for row in produced:
            added = writer.add(row)
            ran += added
            if on_row is not None:
                on_row(skipped + ran, len(specs), writer.rows[row["id"]])
            if added and ran == 1:
                _hold_after_first_row()
    except BaseException:
        getattr(produced, "close", lambda: None)()  # the executor stops its workers now, not when collected
        writer.close(sort=False)
        if not read_rows(writer.path):  # failed before its first row (no cluster, bad checkpoint): no empty
            writer.path.unlink(missing_ok=True)  # table left; asks the file, as Ctrl-C can land mid-``add``
        raise
    writer.close(sort=True)
    wanted = {s.id for s in specs}
    rows = tuple(r for k, r in sorted(writer.rows.items()) if k in wanted)
    return SweepResult(str(out), len(specs), ran, skipped, rows)


__all__ = ["Choice", "Executor", "FAULT_ENV", "HOLD_ENV", "LocalExecutor", "RayExecutor", "ResultsWriter", "SweepResult",
           "TaskSpec", "barrier_matrix_from_rows", "coefficient_search", "expand", "make_executor", "parse", "read",
           "read_rows", "run", "run_specs", "run_task", "task_id", "write_sorted"]
