"""Shared CLI plumbing: consoles, quiet mode, progress bars, JSON output, model/state helpers."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console()
err_console = Console(stderr=True)
STATE = {"quiet": False}


def say(*args, **kwargs) -> None:
    """Print unless --quiet."""
    if not STATE["quiet"]:
        console.print(*args, **kwargs)


def progress() -> Progress:
    """A rich progress bar, hidden when --quiet or when stderr is not a terminal."""
    disable = STATE["quiet"] or not sys.stderr.isatty()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err_console, disable=disable, transient=True)


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_default) + "\n")
    os.replace(tmp, path)
    return path


def _default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with a given torch thread count (small models are often faster on one thread)."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
