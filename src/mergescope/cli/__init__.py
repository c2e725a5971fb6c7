"""The ``mergescope`` command line: thin Typer commands over the public API.

Each command group lives in its own module with a ``register(app)`` function; user errors
(``MergescopeError``) print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import functools
import gc
import sys

import typer

try:  # typer >= 0.20 vendors click
    from typer._click import ClickException as _ClickException
except ImportError:  # pragma: no cover
    from click import ClickException as _ClickException

from .._version import __version__
from ..errors import MergescopeError
from .common import STATE, err_console, printable

app = typer.Typer(
    name="mergescope",
    help="Deep model merging grounded in loss-landscape geometry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"mergescope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables; errors still go to stderr."),
):
    """mergescope: merge models (ensembles, weight aggregation, neuron alignment) and measure why merges work."""
    STATE["quiet"] = quiet


def _register_all() -> None:
    from . import (align_cmd, diagnose_cmd, ensemble_cmd, evaluate_cmd, io_cmds, landscape_cmd, merge_cmd, study_cmd,
                   sweep_cmd)

    for module in (io_cmds, merge_cmd, align_cmd, landscape_cmd, ensemble_cmd, evaluate_cmd, study_cmd, sweep_cmd,
                   diagnose_cmd):
        module.register(app)
    from . import lora_cmd  # LoRA adapters: extract-lora, merge-adapters
    lora_cmd.register(app)
    from . import adamerge_cmd  # AdaMerging (merge/adamerging.py)
    adamerge_cmd.register(app)


_register_all()


@functools.cache
def _freeze_imports() -> None:
    """Once per process: the ~10^6 objects torch and the command modules created at import live as long as
    the process; out of the cyclic collector's sight, its full passes stop rescanning them (a tiny `merge`
    spent ~0.55 s of its ~3.1 s CPU there, most while numba loaded its typing registries)."""
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning user errors into one line and exit code 2."""
    _freeze_imports()
    try:
        code = app(args=argv, prog_name="mergescope", standalone_mode=False)  # typer.Exit(n) inside a command comes back as n
    except MergescopeError as e:
        err_console.print(f"[red]error:[/red] {printable(e)}", highlight=False, soft_wrap=True)
        return e.exit_code
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except _ClickException as e:  # usage errors: unknown option, missing argument, bad value: one line too
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = " ".join(e.format_message().split())
        err_console.print(f"[red]error:[/red] {printable(message)}{printable(hint)}", highlight=False, soft_wrap=True)
        return 2
    return code if isinstance(code, int) else 0


def script() -> int:
    """The ``mergescope`` executable: :func:`main`, then what the command created (numba's typing registries:
    ~10^5 objects) is put out of the interpreter's shutdown collections too, as the imports were: a bf16
    model_stock merge's process ended ~0.9 s after its last line, ~0.4 s so. Not in :func:`main`, which
    callers may run many times in one process. Only here, numba's probe for BLAS is skipped (merge/blas_probe.py:
    ~0.19 s of a merge's start-up; no kernel calls BLAS)."""
    from ..merge import blas_probe

    blas_probe.PROBE = False
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(script())
