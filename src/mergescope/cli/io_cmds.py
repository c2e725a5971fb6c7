"""`inspect` and `train`: look inside checkpoints, and train zoo models on a task."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..errors import MergescopeError
from .common import STATE, console, finite, printable, progress, say, write_json
from .options import DEPTH, DIM, HEADS, JSON_OUT, MODEL_OPTIONS, WIDTH, model_options


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _buffer_elements(ckpt) -> int:
    """Elements of the checkpoint's buffers (``position_ids``, GPT-2 mask ``attn.bias``, integer tensors):
    state the model keeps, not trained parameters, so ``inspect`` counts them apart."""
    from ..merge.architectures import is_buffer

    total = 0
    for name in ckpt:
        info = ckpt.info(name)
        if is_buffer(name, info.dtype.is_floating_point):
            total += info.numel
    return total


def inspect(
    path: Path = typer.Argument(..., help="A .safetensors/.pt/.bin file, a Hugging Face model folder or a PEFT "
                                          "adapter folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    top: int = typer.Option(10, min=0, max=10**6, help="How many of the largest tensors to list."),
):
    """Tensor count, parameter count, dtypes, total bytes, largest tensors and metadata of a checkpoint."""
    from ..io import load, summarize
    from ..lora import is_adapter_folder

    if is_adapter_folder(path):  # a PEFT LoRA adapter folder
        from .lora_cmd import show_adapter
        return show_adapter(path, as_json)
    ckpt = load(path)
    info = summarize(ckpt, top=top)
    info["buffers"] = _buffer_elements(ckpt)
    info["parameters"] -= info["buffers"]
    if as_json:
        console.print_json(json.dumps(info))
        return
    if STATE["quiet"]:
        return
    table = Table(title=printable(path), show_header=False)
    table.add_row("files", str(info["files"]))
    table.add_row("tensors", f"{info['tensors']:,}")
    table.add_row("parameters", f"{info['parameters']:,}")
    if info["buffers"]:
        table.add_row("buffers", f"{info['buffers']:,} elements (position ids, masks: not parameters)")
    table.add_row("bytes", f"{info['bytes']:,} ({_human(info['bytes'])})")
    table.add_row("dtypes", ", ".join(f"{k}: {v}" for k, v in info["dtypes"].items()))
    console.print(table)
    largest = Table(title="largest tensors")
    for col in ("name", "shape", "dtype", "bytes"):
        largest.add_column(col)
    for row in info["largest"]:
        largest.add_row(printable(row["name"]), str(row["shape"]), row["dtype"], _human(row["bytes"]))
    console.print(largest)
    if info["metadata"]:
        meta = Table(title="metadata", show_header=False)
        for k, v in info["metadata"].items():
            meta.add_row(printable(k[:200]), printable(v if len(v) < 200 else v[:197] + "..."))
        console.print(meta)


def train(
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint (.safetensors file or folder)."),
    model: str = typer.Option(None, help="Zoo model (mlp, cnn, resnet, transformer) or package.module:factory "
                                         "[default: mlp, or the --from checkpoint's]."),
    width: int = WIDTH,
    depth: int = DEPTH,
    dim: int = DIM,
    heads: int = HEADS,
    batchnorm: bool = typer.Option(None, "--batchnorm/--no-batchnorm",
                                   help="cnn: with or without BatchNorm [default: with]."),
    model_opts: list[str] = MODEL_OPTIONS,
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed for initialization and data order."),
    epochs: int = typer.Option(None, min=1, max=100000, help="Epochs (default: the zoo model's)."),
    lr: float = typer.Option(None, callback=finite(0, 10, open_low=True), help="Peak learning rate (default: the zoo model's)."),
    init_from: Path = typer.Option(None, "--from", help="Continue training from this checkpoint."),
    classes: str = typer.Option(None, help="Train only on these labels, e.g. 0,1,2,3,4 (label-subset tasks)."),
    task_spec: str = typer.Option("digits", "--task", help="digits, mnist1d, a data file (.npz; docs/tasks.md) or "
                                  "package.module:factory (runs YOUR code, by design)."),
    json_out: Path = JSON_OUT,
    force: bool = typer.Option(False, help="Replace an existing output."),
):
    """Train a model deterministically (same seed, same bits) on digits, MNIST-1D or your data; print its test accuracy.

    An mlp takes the task's input size and every zoo head its number of classes (unless given)."""
    from ..io import load, provenance, save
    from ..tasks import seeded_model, train as train_model, train_defaults
    from ..tasks.zoo import options_for_task
    from ..tasks.checkpoints import load_state_into, model_for, model_metadata

    from ..io import check_output_path, check_side_outputs

    check_output_path(out, [init_from] if init_from else [], force)  # fail before training, not after
    check_side_outputs([init_from], files=[json_out], main=out)
    label_set = _parse_classes(classes)
    task = _train_task(task_spec, label_set)
    given = model_options(model_opts, width=width, depth=depth, dim=dim, heads=heads, batchnorm=batchnorm)
    if init_from is not None:
        source = load(init_from)
        module, model, options = model_for(source, model, **given)
        if model is None:  # a Hugging Face folder: train fits zoo models and factories on digits
            raise MergescopeError(f"{init_from}: train --from takes zoo or factory checkpoints; "
                                  "a Hugging Face folder's model does not take digits")
        load_state_into(module, source, init_from)
    else:
        model = model or "mlp"
        given.update(options_for_task(model, task, given))
        module, options = seeded_model(model, seed, given)
    if hasattr(task, "check_model"):
        task.check_model(module)  # a data file the model cannot take: one line before training
    defaults = train_defaults(model)
    params = {**defaults, "epochs": defaults["epochs"] if epochs is None else epochs, "lr": defaults["lr"] if lr is None else lr}
    epochs = params["epochs"]
    with progress() as bar:
        job = bar.add_task(f"train {model}", total=epochs)
        train_model(module, task, seed=seed, on_epoch=lambda e, loss: bar.update(job, advance=1), **params)
    metrics = task.evaluate(module, "test")
    meta = {**provenance(inputs=[init_from] if init_from else [], seed=seed),
            **model_metadata(model, options, task=task.name,
                             train=json.dumps(params, sort_keys=True))}
    save(module.state_dict(), out, metadata=meta, force=force, inputs=[init_from] if init_from else [])
    if json_out is not None:
        write_json(json_out, {"out": str(out), "model": model, "options": options, "task": task.name, "seed": seed,
                              "params": params, "parameters": sum(p.numel() for p in module.parameters()),
                              "from": None if init_from is None else str(init_from), "metrics": {"test": metrics}},
                   strict=True)
    say(f"{out}: {model} test accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")


def _train_task(spec: str, classes: tuple[int, ...] | None):
    """The task to train on: a built-in (optionally restricted to ``classes``), a data file or the
    user's factory."""
    from ..tasks import get_task
    from ..tasks.checkpoints import builtin_task

    if spec in ("digits", "mnist1d"):  # the name a checkpoint records, e.g. mnist1d[0,1,2]
        return builtin_task(f"{spec}[{','.join(map(str, classes))}]" if classes else spec)
    if classes:
        raise MergescopeError(f"--classes works with the built-in tasks (digits, mnist1d), not {spec!r}")
    return get_task(spec)


def _parse_classes(classes: str | None) -> tuple[int, ...] | None:
    if not classes:
        return None
    try:
        labels = tuple(sorted({int(c) for c in classes.split(",")}))
    except ValueError:
        raise MergescopeError(f"--classes {classes!r}: expected comma-separated digits like 0,1,2") from None
    if not labels or not all(0 <= c <= 9 for c in labels):
        raise MergescopeError(f"--classes {classes!r}: labels must be digits 0-9")
    return labels


def register(app: typer.Typer) -> None:
    app.command()(inspect)
    app.command()(train)
