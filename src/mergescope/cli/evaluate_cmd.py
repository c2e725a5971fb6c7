"""`mergescope evaluate CKPT...`: each checkpoint's loss and accuracy on a task's splits."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import MergescopeError
from ..io import check_side_outputs
from .common import torch_threads, write_json
from .options import MODEL_OPTIONS, THREADS, model_option, model_options, show, table, task_option
from .options import fmt as _f

SPLIT_CHOICES = ("train", "val", "test")


def _splits(split: str) -> list[str]:
    """'all' or a comma-separated subset of train,val,test."""
    names = list(SPLIT_CHOICES) if split == "all" else [s.strip() for s in split.split(",")]
    bad = [s for s in names if s not in SPLIT_CHOICES]
    if bad or not names:
        raise MergescopeError(f"--split {split!r}: choose train, val, test, a comma-separated list, or all")
    return names


def evaluate_checkpoint(path: Path, model: str | None, task: str | None, splits: list[str],
                        options: dict | None = None) -> dict:
    """{"checkpoint", "model", "task", split: {"loss", "accuracy"}} for one checkpoint; its own
    architecture (the zoo record, a Hugging Face folder, or ``model``) and task."""
    from ..io import load
    from ..tasks.checkpoints import load_state_into, model_for, task_for

    if not Path(path).exists():
        raise MergescopeError(f"{path}: no such file or folder")
    ckpt = load(path)
    module, name, _ = model_for(ckpt, model, **(options or {}))
    load_state_into(module, ckpt, path)
    the_task = task_for(ckpt, task)
    return {"checkpoint": str(path), "model": name, "task": the_task.name,
            **{split: the_task.evaluate(module, split) for split in splits}}


def evaluate(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoints (.safetensors files or folders, HF folders too)."),
    split: str = typer.Option("test", help="train, val, test, a comma-separated list, or all."),
    json_out: Path = typer.Option(None, "--json", help="Also write the results as JSON here."),
    task: str = task_option("each checkpoint records"), model: str = model_option("each checkpoint records"),
    threads: int = THREADS, model_opts: list[str] = MODEL_OPTIONS,
):
    """Loss and accuracy of each checkpoint on the task's splits (its own model and task by default)."""
    splits = _splits(split)
    check_side_outputs(checkpoints, files=[json_out])
    with torch_threads(threads):
        rows = [evaluate_checkpoint(p, model, task, splits, model_options(model_opts)) for p in checkpoints]
    columns = [f"{s} {m}" for s in splits for m in ("accuracy", "loss")]
    t = table(f"{len(rows)} checkpoint(s)", ["checkpoint", "model", "task", *columns])
    for r in rows:
        t.add_row(Path(r["checkpoint"]).name, r["model"], r["task"],
                  *(_f(r[s][m]) for s in splits for m in ("accuracy", "loss")))
    show(t)
    if json_out:
        write_json(json_out, {"splits": splits, "rows": rows})


def register(app: typer.Typer) -> None:
    app.command()(evaluate)
