"""Shared CLI plumbing: consoles, quiet mode, progress bars, JSON output, model/state helpers."""

from __future__ import annotations

import contextlib
import os
import re
import sys

import typer

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..results import write_json  # noqa: F401  (re-exported for the commands)



def _width(stream) -> int | None:
    """Rich's width: the terminal's own, else $COLUMNS, else wide enough that a table piped to a file or
    a log is never cut to 80 columns with '...' (rich's default off a terminal)."""
    if stream.isatty():
        return None
    return int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 200


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))
STATE = {"quiet": False}


# C0/C1 control characters (ESC starts clear-screen, window-title and OSC-8 link sequences) and the
# Unicode bidirectional overrides that reorder what a terminal shows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def printable(value) -> str:
    """User data (tensor names, metadata, paths, error text) made safe to print with rich: control
    characters shown as escapes (``\\x1b``), rich markup escaped, always one line."""
    text = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))
    return escape(text)


def finite(low: float | None = None, high: float | None = None, open_low: bool = False):
    """A Typer callback refusing NaN, infinities and values outside [low, high] (``open_low``: (low, high]).

    click's FloatRange lets NaN through (every comparison with NaN is false), so floats are
    checked here instead.
    """
    import math

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        bad = not math.isfinite(value) or (low is not None and (value <= low if open_low else value < low)) \
            or (high is not None and value > high)
        if bad:
            span = f"{'(' if open_low else '['}{low:g}, {high:g}]" if low is not None and high is not None else "finite"
            raise typer.BadParameter(f"must be a number in {span}, got {value}")
        return value

    return check


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
