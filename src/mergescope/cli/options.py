"""Options and table helpers shared by the command groups, each defined once.

``task_option``/``model_option`` name what a checkpoint records (a checkpoint can never name code to
run); ``out_option`` takes each group's default folder; ``show`` prints tables unless --quiet.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import MergescopeError
from .common import STATE, console, printable


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
JSON_OUT = typer.Option(None, "--json", help="Also write what the command did as strict JSON to this file.")


def size_option(name: str, help: str):
    """A zoo size option (--width, --depth, ...) bounded exactly as ``tasks.zoo.OPTION_BOUNDS`` bounds it."""
    from ..tasks.zoo import OPTION_BOUNDS

    low, high = OPTION_BOUNDS[name]
    return typer.Option(None, min=low, max=high, help=help)


WIDTH = size_option("width", "Hidden width (mlp, cnn, resnet).")
DEPTH = size_option("depth", "Hidden layers (mlp) or blocks (transformer).")
DIM = size_option("dim", "Embedding dim (transformer).")
HEADS = size_option("heads", "Attention heads (transformer).")
MODEL_OPTIONS = typer.Option(None, "--model-option", metavar="KEY=VALUE",
                             help="An option of the model (repeatable), e.g. width=128 or batchnorm=false: passed "
                                  "to a zoo model (checked) or to your factory as key=value (int, float, "
                                  "true/false, null, JSON list/object, else a string).")


def parse_model_options(pairs: list[str] | None) -> dict:
    """``--model-option key=value`` pairs as keyword arguments (values parsed as ``option_value`` says)."""
    options: dict = {}
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise MergescopeError(f"--model-option {printable(pair)[:80]!r}: expected key=value with a name as key")
        if key in options:
            raise MergescopeError(f"--model-option {key}: given twice")
        options[key] = option_value(raw.strip())
    return options


def option_value(raw: str):
    """int, finite float, true/false, null, a JSON list/object, else the string itself."""
    import json
    import math

    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    for kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            continue
        if kind is float and not math.isfinite(value):
            raise MergescopeError(f"--model-option value {raw!r}: not a finite number")
        return value
    if raw[:1] in "[{" and raw:
        try:
            return json.loads(raw, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise MergescopeError(f"--model-option value {printable(raw)[:80]!r}: invalid JSON ({e.msg})") from None
    return raw


def _no_constant(token: str):
    raise MergescopeError(f"--model-option value: {token} is not a finite number")


def model_options(pairs: list[str] | None = None, **sizes) -> dict:
    """The one dict of model options a command passes to ``model_for``: the size options (--width,
    ...) that were given plus ``--model-option`` pairs; a key given both ways is refused."""
    given = {k: v for k, v in sizes.items() if v is not None}
    extra = parse_model_options(pairs)
    twice = sorted(set(given) & set(extra))
    if twice:
        raise MergescopeError(f"--model-option {twice[0]}: also given as --{twice[0]}; give it once")
    return {**given, **extra}


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
