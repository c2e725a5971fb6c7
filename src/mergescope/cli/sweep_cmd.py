"""`mergescope sweep SWEEP.yaml`: run a sweep locally (process pool) or on Ray, resumably."""

from __future__ import annotations

import math
import time
from pathlib import Path

import typer
from rich.table import Table

from ..io import check_side_outputs
from .common import err_console, progress, say, write_json


def _f(x, digits: int = 4) -> str:
    """A number for a table cell; a missing or non-finite value (a diverged run) is '-'."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _barrier_table(matrix) -> Table:
    table = Table(title=f"loss barrier ({matrix.split}, {matrix.n} points)")
    table.add_column("")
    for name in matrix.names:
        table.add_column(Path(name).stem, justify="right")
    for name, row in zip(matrix.names, matrix.loss):
        table.add_row(Path(name).stem, *(_f(v, 3) for v in row))
    return table


def _search_table(choices) -> Table:
    table = Table(title="coefficient search: picked on val, reported on test")
    for col in ("method", "models", "align", "picked", "of", "val acc", "test acc", "test loss"):
        table.add_column(col, justify="right" if col in ("of", "val acc", "test acc", "test loss") else "left",
                         overflow="fold")  # a picked parameter is never cut to '...'; long ones wrap
    for c in choices:
        table.add_row(c.method, ", ".join(Path(m).stem for m in c.models), c.align, ", ".join(f"{k}={v}" for k, v in c.params.items()) or "-",
                      str(c.candidates), _f(c.val_accuracy), _f(c.test_accuracy), _f(c.test_loss))
    return table


def _eval_table(rows) -> Table:
    keys = sorted(k for k in rows[0] if k.endswith(("_loss", "_accuracy")))
    table = Table(title="evaluation")
    table.add_column("checkpoint")
    for k in keys:
        table.add_column(k, justify="right")
    for r in rows:
        table.add_row(r["checkpoint"], *(_f(r[k]) for k in keys))
    return table


def _summary(kind: str, rows):
    """(JSON-able summary, rich table) of a finished sweep."""
    from ..sweep import barrier_matrix_from_rows, coefficient_search

    if kind == "barrier_matrix":
        matrix = barrier_matrix_from_rows(rows)
        return matrix, matrix.to_dict(), _barrier_table(matrix)
    if kind == "merge_grid":
        choices = coefficient_search(rows)
        return choices, {"choices": [c.to_dict() for c in choices]}, _search_table(choices)
    return rows, {"rows": list(rows)}, _eval_table(rows)


def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML (kind: barrier_matrix | merge_grid | evaluate)."),
    ray: str = typer.Option(None, "--ray", help="Run as Ray tasks: 'local' (start a local cluster), 'auto' "
                            "(the cluster from `ray start` / $RAY_ADDRESS), or HOST:PORT / ray://HOST:10001."),
    workers: int = typer.Option(None, "--workers", "-w", min=1, max=4096, help="Parallel tasks (default: all local cores / cluster CPUs)."),
    out: Path = typer.Option(Path("results.jsonl"), "--out", "-o", help="Results table (JSON lines, one row per task)."),
    resume: bool = typer.Option(False, "--resume", help="Keep rows already in --out and run only the missing tasks."),
    force: bool = typer.Option(False, "--force", help="Start --out over if it exists."),
    summary: Path = typer.Option(None, "--summary", help="Write the summary JSON (barrier_matrix: the "
                                 "BarrierMatrix dict the study heatmap reads; merge_grid: the coefficient search)."),
    plot: Path = typer.Option(None, "--plot", help="barrier_matrix: also draw the heatmap PNG."),
    retries: int = typer.Option(3, "--retries", min=0, max=100, help="Times a task whose worker died is re-run."),
    share_below: str = typer.Option("64MB", "--share-below", help="Ray: checkpoints up to this size are read "
                                    "once here and shared through the object store; larger ones are read by "
                                    "path on the workers (0: all by path)."),
):
    """Run a sweep: every task's row is written as it finishes, so an interrupted sweep resumes."""
    # pydantic and the executors load for this command only (~0.12 s of every other command's start-up)
    from .. import sweep as sw
    from ..sweep.sharing import same_file_key

    config = sw.read(sweep_file)
    specs = sw.expand(config, root=sweep_file.resolve().parent)
    inputs = {same_file_key(s.root, ref) for s in specs for ref in s.checkpoints}
    check_side_outputs([sweep_file, *sorted(inputs)], files=[out, summary, plot])
    executor = sw.make_executor(ray, workers, retries, share_below)
    start = time.perf_counter()
    with progress() as bar:
        job = bar.add_task(f"sweep {config.kind}", total=len(specs))

        ran = [0]

        def on_row(done: int, total: int, row: dict) -> None:
            ran[0] += 1
            rate = ran[0] / max(time.perf_counter() - start, 1e-9)
            bar.update(job, completed=done, description=f"sweep {config.kind} {rate:.2f} tasks/s")

        try:
            result = sw.run_specs(specs, out, executor, resume=resume, force=force, on_row=on_row)
        except KeyboardInterrupt:
            done = len(sw.read_rows(out))
            err_console.print(f"interrupted: {done} of {len(specs)} rows are in {out}; "
                              f"rerun with --resume to finish", soft_wrap=True)
            raise typer.Exit(130) from None
    seconds = time.perf_counter() - start
    value, data, table = _summary(config.kind, result.rows)
    if summary:
        write_json(summary, data, strict=True)  # a diverged run's NaN is written as null: valid JSON
    if plot and config.kind == "barrier_matrix":
        from ..report.figures import heatmaps_figure

        heatmaps_figure({"linear paths": data}, plot, "barrier_loss", f"Pairwise loss barriers ({sweep_file.name})")
    if table.row_count <= 40:
        say(table)
    where = f"Ray ({ray})" if ray else "local pool"
    shared = len(getattr(executor, "shared", {}))
    rate = result.ran / seconds if result.ran else 0.0
    say(f"{result.total} tasks: ran {result.ran}, already done {result.skipped}, on {where} with "
        f"{executor.workers or 'no'} workers in {seconds:.1f}s ({rate:.2f} tasks/s)"
        + (f"; {shared} checkpoint(s) sent through the object store" if shared else "") + f"; wrote {out}"
        + (f", {summary}" if summary else "") + (f", {plot}" if plot and config.kind == "barrier_matrix" else ""))


def register(app: typer.Typer) -> None:
    """Add `sweep` to the app."""
    app.command()(sweep)
