"""`mergescope landscape ...`: loss-landscape measurements; each prints a table, writes JSON + PNG."""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.table import Table

from ..errors import MergescopeError
from .common import STATE, console, progress, say, torch_threads, write_json

landscape = typer.Typer(name="landscape", help="Loss-landscape geometry: paths, barriers, curves, planes, curvature, "
                        "stability, task vectors.", no_args_is_help=True)

OUT = typer.Option(Path("landscape-out"), "--out", "-o", help="Folder for the JSON result and the PNG figure.")
TASK = typer.Option(None, help="Task: 'digits' or package.module:factory (default: the task recorded in the checkpoint).")
MODEL = typer.Option(None, help="Model (zoo name or package.module:factory) when the checkpoint does not record it.")
THREADS = typer.Option(1, help="Torch threads.")
SPLIT = typer.Option("test", help="Split the path is reported on (train is always measured too).")


def _load_models(paths: list[Path], model: str | None):
    """(template module, states) for checkpoints that share one architecture."""
    from ..io import load
    from ..tasks.checkpoints import model_for

    ckpts = [load(p) for p in paths]
    module, _, _ = model_for(ckpts[0], model)
    return module, ckpts


def _task_for(ckpt, spec: str | None):
    """The task named on the command line, else the one recorded by `mergescope train`."""
    from ..tasks import digits, get_task

    if spec:
        return get_task(spec)
    recorded = getattr(ckpt, "metadata", {}).get("task", "digits")
    match = re.fullmatch(r"digits(?:\[([0-9,]+)\])?", recorded)
    if match is None:
        raise MergescopeError(f"{ckpt.path}: records task {recorded!r}; pass --task")
    return digits(classes=tuple(int(c) for c in match.group(1).split(","))) if match.group(1) else digits()


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _path_table(title: str, path, every: int = 1) -> Table:
    table = Table(title=title)
    for col in ("t", f"{path.split} loss", f"{path.split} acc", "train loss", "train acc"):
        table.add_column(col, justify="right")
    naive = path.naive_loss is not None
    if naive:
        table.add_column(f"{path.split} loss (BN not reset)", justify="right")
    for i in range(0, len(path.t), every):
        row = [_f(path.t[i], 3), _f(path.loss[i]), _f(path.accuracy[i]), _f(path.train_loss[i]), _f(path.train_accuracy[i])]
        table.add_row(*row, *([_f(path.naive_loss[i])] if naive else []))
    return table


def _barrier_table(rows: dict) -> Table:
    table = Table(title="barriers")
    for col in ("path", "loss barrier", "accuracy barrier"):
        table.add_column(col, justify="right" if col != "path" else "left")
    for name, (loss, acc) in rows.items():
        table.add_row(name, _f(loss), _f(acc))
    return table


def _show(*tables) -> None:
    if STATE["quiet"]:
        return
    for table in tables:
        console.print(table)


def line(
    a: Path = typer.Argument(..., help="First checkpoint."),
    b: Path = typer.Argument(..., help="Second checkpoint."),
    n: int = typer.Option(25, help="Points along the path (endpoints included)."),
    split: str = SPLIT,
    bn_reset: bool = typer.Option(True, "--bn-reset/--no-bn-reset", help="Recompute BatchNorm statistics at each point."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, threads: int = THREADS,
):
    """Loss and accuracy along the straight line between two models; loss and accuracy barriers."""
    from ..landscape import interpolate
    from ..landscape.plots import plot_path

    module, (ca, cb) = _load_models([a, b], model)
    the_task = _task_for(ca, task)
    with torch_threads(threads), progress() as bar:
        job = bar.add_task("line", total=n)
        path = interpolate(module, ca, cb, the_task, n=n, split=split, bn_reset=bn_reset,
                           on_chunk=lambda done, total: bar.update(job, completed=done))
    write_json(out / "line.json", {"a": str(a), "b": str(b), **path.to_dict()})
    plot_path(path, out / "line.png", title=f"{a.name} -> {b.name}")
    rows = {f"{split}": (path.barrier_loss, path.barrier_acc), "train": (path.train_barrier_loss, path.train_barrier_acc)}
    if path.naive_loss is not None:
        rows[f"{split}, BN not reset"] = (path.naive_barrier_loss, path.naive_barrier_acc)
    _show(_path_table(f"{a.name} -> {b.name}", path, every=max(1, (n - 1) // 8)), _barrier_table(rows))
    say(f"wrote {out / 'line.json'} and {out / 'line.png'}")


def matrix(
    checkpoints: list[Path] = typer.Argument(..., help="Two or more checkpoints of one architecture."),
    n: int = typer.Option(11, help="Points along each path."),
    split: str = SPLIT,
    bn_reset: bool = typer.Option(True, "--bn-reset/--no-bn-reset", help="Recompute BatchNorm statistics at each point."),
    out: Path = OUT, task: str = TASK, model: str = MODEL, threads: int = THREADS,
):
    """Pairwise loss/accuracy barrier matrix of N models (each pair's path computed once)."""
    from ..landscape import barrier_matrix
    from ..landscape.plots import plot_matrix

    if len(checkpoints) < 2:
        raise MergescopeError("matrix: give at least two checkpoints")
    module, ckpts = _load_models(checkpoints, model)
    names = [p.stem if p.suffix else p.name for p in checkpoints]
    if len(set(names)) != len(names):
        names = [str(p) for p in checkpoints]
    the_task = _task_for(ckpts[0], task)
    pairs = len(ckpts) * (len(ckpts) - 1) // 2
    with torch_threads(threads), progress() as bar:
        job = bar.add_task("pairs", total=pairs)
        result = barrier_matrix(module, ckpts, the_task, names=names, n=n, split=split, bn_reset=bn_reset,
                                on_pair=lambda done, total: bar.update(job, completed=done))
    write_json(out / "matrix.json", result.to_dict())
    plot_matrix(result, out / "matrix.png")
    table = Table(title=f"loss barrier / accuracy barrier ({split})")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    for i, name in enumerate(names):
        table.add_row(name, *(f"{result.loss[i][j]:.3f} / {result.accuracy[i][j]:.3f}" for j in range(len(names))))
    _show(table)
    say(f"wrote {out / 'matrix.json'} and {out / 'matrix.png'}")


def register(app: typer.Typer) -> None:
    """Add the `landscape` command group."""
    for command in (line, matrix):
        landscape.command()(command)
    app.add_typer(landscape, name="landscape")
