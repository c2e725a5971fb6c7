"""`merge`: run a MergeKit-compatible recipe with the streaming engine."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from .common import STATE, console, err_console, printable, say


def _bar() -> Progress:
    import sys

    disable = STATE["quiet"] or not sys.stderr.isatty()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeElapsedColumn(), console=err_console, disable=disable, transient=True)


class _WarningLines(logging.Handler):
    """The merge engine's warnings (settings accepted without effect) as one escaped line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        err_console.print(f"warning: {printable(record.getMessage())}", soft_wrap=True, highlight=False)


@contextlib.contextmanager
def _engine_warnings():
    log = logging.getLogger("mergescope.merge")
    handler, propagate = _WarningLines(logging.WARNING), log.propagate
    log.addHandler(handler)
    log.propagate = False  # printed here once, not again by logging's last-resort handler
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


JSON_OUT = typer.Option(None, "--json", help="Also write the merge result (tensors, bytes, seconds, warnings, files; "
                        "per stage for a multi-stage recipe) as strict JSON to this file.")


def merge(
    recipe: Path = typer.Argument(..., help="MergeKit-style YAML recipe (the same file mergekit-yaml reads)."),
    out: Path = typer.Argument(..., help="Output folder (Hugging Face layout) or a .safetensors file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    random_seed: int = typer.Option(None, "--random-seed", min=0, max=2**32 - 1, help="Seed for randomized methods (DARE, DELLA); default 0."),
    threads: int = typer.Option(None, "--threads", min=1, max=1024, help="Worker threads (default: up to 2)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest output shard, e.g. 500MB, 2GB."),
    copy_tokenizer: bool = typer.Option(True, "--copy-tokenizer/--no-copy-tokenizer",
                                        help="Copy tokenizer files from the base model."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the hash-verified shards an interrupted run left."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Keep merged tensors with NaN/Inf."),
    fsync: bool = typer.Option(True, "--fsync/--no-fsync", help="Sync each finished shard to disk (in the background, "
                               "while the next is merged) and the folder after its rename; --no-fsync leaves it to the OS."),
    intermediate_dir: Path = typer.Option(None, "--intermediate-dir",
                                          help="Multi-stage recipes (YAML documents separated by ---, as "
                                               "mergekit-multi): folder for the named stages [default: OUT.stages]."),
    json_out: Path = JSON_OUT,
):
    """Merge the models of RECIPE into OUT (same recipes and numbers as mergekit-yaml, streamed).

    A RECIPE of several YAML documents is run stage by stage (as mergekit-multi); a stage already
    merged from the same recipe is reused."""
    from ..io import check_side_outputs
    from ..merge.engine import merge as run
    from ..merge.multistage import is_multistage
    from ..results import write_json

    if json_out is not None:
        check_side_outputs(_recipe_inputs(recipe), files=[json_out], main=out)
    if _is_multistage_file(recipe, is_multistage):
        results = _run_stages(recipe, out, intermediate_dir, force=force, seed=random_seed, threads=threads,
                              max_shard_size=max_shard_size, copy_tokenizer=copy_tokenizer, resume=resume,
                              allow_nonfinite=allow_nonfinite, fsync=fsync)
        if json_out is not None:
            write_json(json_out, {"stages": [None if r is None else r.to_dict() for r in results]}, strict=True)
        return

    lock = threading.Lock()
    with _engine_warnings(), _bar() as bar:
        job = bar.add_task("merge", total=None)

        count = {"done": 0, "total": 0}

        def on_plan(tensors: int, nbytes: int) -> None:
            count["total"] = tensors
            bar.update(job, total=nbytes, description=f"merge 0/{tensors} tensors")

        def on_tensor(name: str, nbytes: int) -> None:
            with lock:
                count["done"] += 1
                bar.update(job, advance=nbytes, description=f"merge {count['done']}/{count['total']} tensors")

        result = run(recipe, out, force=force, seed=random_seed, threads=threads, max_shard_size=max_shard_size,
                     copy_tokenizer=copy_tokenizer, on_tensor=on_tensor, on_plan=on_plan, resume=resume,
                     allow_nonfinite=allow_nonfinite, fsync=fsync)
    if json_out is not None:
        write_json(json_out, result.to_dict(), strict=True)
    if STATE["quiet"]:
        return
    table = Table(title=f"{out}", show_header=False)
    table.add_row("method", result.method)
    table.add_row("tensors", f"{result.tensors:,}")
    table.add_row("read", f"{result.bytes_read / 1e9:.3f} GB")
    table.add_row("written", f"{result.bytes_written / 1e9:.3f} GB in {len(result.files)} file(s)")
    table.add_row("time", f"{result.seconds:.2f} s ({result.bytes_read / 1e9 / max(result.seconds, 1e-9):.2f} GB/s read)")
    for row in _timing_rows(result):
        table.add_row(*row)
    table.add_row("seed", str(result.seed))
    if result.reused:
        table.add_row("resumed", f"{result.reused:,} tensors reused from the interrupted run")
    console.print(table)
    say(f"wrote {out}")


def _timing_rows(result) -> list[tuple[str, str]]:
    """Time to the first merged tensor, steady-state input throughput and the sync wait (engine timestamps)."""
    rows = []
    if result.first_tensor_s is not None:
        rows.append(("first tensor", f"{result.first_tensor_s:.2f} s after start"))
    steady = result.steady_bytes_per_s
    if steady is not None:
        rows.append(("steady state", f"{steady / 1e9:.2f} GB/s read after the first tensor"))
    rows.append(("fsync", f"on ({result.fsync_wait_s:.2f} s waited at the end)" if result.fsync else "off"))
    return rows


def _recipe_inputs(recipe: Path) -> list[Path]:
    """The recipe and every model its stages name: what --json must never write over."""
    from ..io.untrusted import read_text
    from ..merge.multistage import is_multistage, read_stages
    from ..recipe import parse, read

    text = read_text(recipe, "recipe")
    if is_multistage(text, str(recipe)):
        recipes = [parse(stage.data, where=str(recipe)) for stage in read_stages(text, str(recipe))]
    else:
        recipes = [read(recipe)]
    return [recipe, *(Path(m) for r in recipes for m in r.referenced_models())]


def _is_multistage_file(recipe: Path, is_multistage) -> bool:
    from ..io.untrusted import read_text

    return is_multistage(read_text(recipe, "recipe"), str(recipe))


def _run_stages(recipe: Path, out: Path, intermediate_dir: Path | None, **options) -> list:
    """A multi-stage recipe: one line per stage (reused or merged), then the final output; the per-stage
    MergeResults (None: reused)."""
    from ..merge.multistage import run as run_stages

    def on_stage(i: int, n: int, name: str | None, reused: bool) -> None:
        say(f"stage {i + 1}/{n} {printable(name or '(final)')}: {'reused (same recipe, already merged)' if reused else 'merging'}")

    with _engine_warnings():
        results = run_stages(recipe, out, intermediate_dir, on_stage=on_stage, **options)
    merged = [r for r in results if r is not None]
    say(f"wrote {printable(out)} ({len(merged)} of {len(results)} stages merged, {len(results) - len(merged)} reused)")
    return results


def register(app: typer.Typer) -> None:
    """Add `merge` to the app."""
    app.command()(merge)
