"""Options and table helpers shared by the command groups, each defined once.

``task_option``/``model_option`` name what a checkpoint records (a checkpoint can never name code to
run); ``out_option`` takes each group's default folder; ``show`` prints tables unless --quiet.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import STATE, console


def task_option(records: str = "the checkpoint records"):
    """--task: a built-in task or the user's package.module:factory; by default what the checkpoint records."""
    return typer.Option(None, help="Task: 'digits' or package.module:factory (runs YOUR code, by design). Default: the "
                        f"built-in task {records}; a checkpoint can never name code to run.")


def model_option(records: str = "the checkpoint records"):
    """--model: a zoo name or the user's package.module:factory; by default what the checkpoint records."""
    return typer.Option(None, help="Model: a zoo name, or package.module:factory (imports and runs YOUR code, by "
                        f"design). Default: the zoo model {records}; a checkpoint can never name code to run.")


def out_option(default: str):
    """--out/-o: the folder a command writes its JSON result and PNG figure into."""
    return typer.Option(Path(default), "--out", "-o", help="Folder for the JSON result and the PNG figure.")


THREADS = typer.Option(1, min=1, max=1024, help="Torch threads.")


def size_option(name: str, help: str):
    """A zoo size option (--width, --depth, ...) bounded exactly as ``tasks.zoo.OPTION_BOUNDS`` bounds it."""
    from ..tasks.zoo import OPTION_BOUNDS

    low, high = OPTION_BOUNDS[name]
    return typer.Option(None, min=low, max=high, help=help)


WIDTH = size_option("width", "Hidden width (mlp, cnn, resnet).")
DEPTH = size_option("depth", "Hidden layers (mlp) or blocks (transformer).")
DIM = size_option("dim", "Embedding dim (transformer).")
HEADS = size_option("heads", "Attention heads (transformer).")


def fmt(x: float | None, digits: int = 4) -> str:
    """A number for a table cell ('-' for a missing value)."""
    return "-" if x is None else f"{x:.{digits}f}"


def table(title: str, columns: list[str]) -> Table:
    """A table whose first column is left-aligned and the others right-aligned."""
    t = Table(title=title)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    return t


def show(*tables) -> None:
    """Print tables unless --quiet."""
    if STATE["quiet"]:
        return
    for t in tables:
        console.print(t)
