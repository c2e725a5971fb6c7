"""Shared CLI plumbing: consoles, quiet mode, progress bars, JSON output, model/state helpers."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..results import write_json  # noqa: F401  (re-exported for the commands)

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
