"""`mergescope align A B -o OUT`: reorder B's hidden units to match A (or write the REPAIRed merge)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from ..errors import MergescopeError
from .common import STATE, console, finite, progress, say, torch_threads, write_json
from .options import DEPTH, DIM, HEADS, JSON_OUT, MODEL_OPTIONS, WIDTH, model_options
from ..tasks.checkpoints import task_for

METHODS = ("weight", "activation", "ste", "ot", "ot_fusion", "zipit", "cca")  # mergescope.align.names()


def align(
    a: Path = typer.Argument(..., help="Reference checkpoint (kept as is)."),
    b: Path = typer.Argument(..., help="Checkpoint whose hidden units are reordered to match A."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint (.safetensors file or folder)."),
    method: str = typer.Option("weight", help=f"Alignment method: {', '.join(METHODS)}."),
    model: str = typer.Option(None, help="Model: a zoo name, or package.module:factory (runs YOUR code, by design); "
                               "default: the zoo model A records (a checkpoint can never name code to run)."),
    width: int = WIDTH,
    depth: int = DEPTH,
    dim: int = DIM,
    heads: int = HEADS,
    model_option: list[str] = MODEL_OPTIONS,
    repair: bool = typer.Option(False, "--repair",
                                help="Write the REPAIRed interpolation (1-alpha) A + alpha B_aligned instead."),
    alpha: float = typer.Option(0.5, callback=finite(0, 1), help="Mixing weight of B for --repair and --method zipit."),
    unmerged: int = typer.Option(0, min=0, max=10000, help="zipit only: leave the last K unit groups unmerged (partial zipping: "
                                          "a shared trunk and both models' tails, outputs mixed by --alpha)."),
    epochs: int = typer.Option(None, min=1, max=100000, help="ste only: epochs of straight-through training (default 2)."),
    lr: float = typer.Option(None, callback=finite(0, 10, open_low=True),
                             help="ste only: Adam learning rate of the free weights (default 1e-3)."),
    reg: float = typer.Option(None, callback=finite(0, 1e6),
                              help="cca: ridge added to the covariances (default 0.01); ot_fusion: entropic "
                                   "regularization (default 0.01)."),
    batch_size: int = typer.Option(None, min=1, max=10**6, help="activation, ste, zipit, cca: examples per batch of "
                                   "train data (default 512); ste takes one step per batch."),
    task: str = typer.Option(None, help="Data for activation-based methods and REPAIR (default: the recorded task)."),
    seed: int = typer.Option(0, min=0, max=2**32 - 1, help="Seed (layer order of weight matching, STE data order)."),
    spec_out: Path = typer.Option(None, help="Also write the derived permutation spec as JSON here."),
    json_out: Path = JSON_OUT,
    threads: int = typer.Option(1, min=1, max=1024, help="Torch threads."),
    force: bool = typer.Option(False, help="Replace an existing output."),
):
    """Align B to A (weight/activation/STE matching, OT, ZipIt!, CCA) and save it; optionally REPAIR the merge."""
    from .. import align as al
    from ..io import check_output_path, check_side_outputs, load, provenance, save
    from ..state import example_input
    from ..tasks.checkpoints import hf_folder, load_state_into, model_for

    aligner = al.get(method)  # an unknown method fails before anything is read
    params = method_params(aligner, epochs=epochs, lr=lr, reg=reg, batch_size=batch_size)
    check_output_path(out, [a, b], force)  # fail before aligning, not after
    check_side_outputs([a, b], files=[spec_out, json_out], main=out)
    options = model_options(model_option, width=width, depth=depth, dim=dim, heads=heads)
    ca, cb = load(a), load(b)
    module_a, name, used = model_for(ca, model, **options)
    module_b, _, _ = model_for(ca, name, **used)
    folder = hf_folder(ca) if name is None else None  # a HF folder in, a HF folder out (config, tokenizer)
    if folder is not None and unmerged:
        raise MergescopeError(f"{a}: --unmerged widens the model, which then no longer fits its config.json; "
                              "pass --model package.module:factory to zip a Hugging Face model partially")
    load_state_into(module_a, ca, a)
    load_state_into(module_b, cb, b)
    the_task = task_for(ca, task)
    with torch_threads(threads), progress() as bar:
        job = bar.add_task(f"align ({method}): permutation spec", total=3)
        start = time.perf_counter()
        spec = al.permutation_spec(module_a, example_input(the_task))
        bar.update(job, advance=1, description=f"align ({method}): matching")
        result = al.align_models(spec, module_a, module_b, method=method, task=the_task, seed=seed, alpha=alpha,
                                 unmerged=unmerged, repair=repair, **params)
        state = result.state
        seconds = time.perf_counter() - start
        bar.update(job, advance=1, description=f"align ({method}): saving")
        record = (name, used)
        from ..tasks.checkpoints import model_metadata

        recipe = {"method": method, "repair": repair, "alpha": alpha if repair or aligner.merges else None, **params}
        meta = {**provenance(inputs=[a, b], seed=seed),
                **({} if name is None else model_metadata(record[0], record[1], task=ca.metadata.get("task", "digits"))),
                "align": json.dumps(recipe, sort_keys=True)}
        if unmerged:
            meta = _partial_zip_metadata(meta, result.info)
        save({k: v.detach() for k, v in state.items()}, out, metadata=meta, force=force, inputs=[a, b],
             copy_files_from=folder)
        bar.update(job, advance=1)
    if spec_out is not None:
        write_json(spec_out, spec.to_dict())
    moved = permutation_rows(result.perms)
    if json_out is not None:
        write_json(json_out, {"a": str(a), "b": str(b), "out": str(out), "method": method, "merged": result.merged,
                              "repair": repair, "alpha": recipe["alpha"], "params": params, "seed": seed,
                              "seconds": seconds, "model": record[0], "model_options": record[1],
                              "permutations": moved, "spec_out": None if spec_out is None else str(spec_out)},
                   strict=True)
    if unmerged and not STATE["quiet"]:
        console.print(_partial_zip_table(spec, result.info, module_a, a.name, b.name))
        say(f"widened model: zipped_model(ms.tasks.make_model({record[0]!r}, **{record[1]!r}), ms.load({str(out)!r})) "
            "(from mergescope.align import zipped_model)")
    elif not STATE["quiet"]:
        table = Table(title=f"align {b.name} -> {a.name} ({method}{', REPAIR' if repair else ''})")
        table.add_column("permutation")
        table.add_column("units", justify="right")
        table.add_column("moved", justify="right")
        for p, row in moved.items():
            table.add_row(p, str(row["units"]), str(row["moved"]))
        console.print(table)
    say(f"wrote {out} ({seconds:.2f}s)")


def method_params(aligner, **given) -> dict:
    """The method options the user gave (None: not given), refused by name when the method lacks them."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(aligner.params))
    if unknown:
        raise MergescopeError(f"align --method {aligner.name}: --{', --'.join(unknown)} not taken by this method "
                              f"(it takes: {', '.join(aligner.params) or 'no parameters'})")
    return given


def permutation_rows(perms: dict) -> dict:
    """Per permutation: its units and how many of them moved (what the table and --json report)."""
    import torch

    return {p: {"units": len(idx), "moved": int((idx != torch.arange(len(idx))).sum())} for p, idx in perms.items()}


def _partial_zip_metadata(meta: dict, info: dict) -> dict:
    """Move the model record to ``partial_zip``: the widened state no longer fits the recorded architecture,
    so commands that rebuild the model from metadata must not try."""
    meta = dict(meta)
    model = json.loads(meta.pop("model"))
    meta["align"] = json.dumps({**json.loads(meta["align"]), "unmerged": len(info["unmerged"])}, sort_keys=True)
    meta["partial_zip"] = json.dumps({"model": model, "unmerged": info["unmerged"], "order": info["order"],
                                      "alpha": info["alpha"], "parameters": info["parameters"]}, sort_keys=True)
    return meta


def _partial_zip_table(spec, info: dict, module_a, name_a: str, name_b: str) -> Table:
    """One row per unit group in forward order: zipped (n units) or unmerged (2n units)."""
    table = Table(title=f"zipit {name_a} + {name_b}: {len(info['unmerged'])} of {len(info['order'])} unit groups unmerged")
    table.add_column("unit group")
    table.add_column("state")
    table.add_column("units", justify="right")
    for p in info["order"]:
        n = spec.sizes[p]
        table.add_row(p, "unmerged" if p in info["unmerged"] else "zipped", str(2 * n if p in info["unmerged"] else n))
    original = sum(t.numel() for t in module_a.parameters())
    table.caption = (f"parameters: {info['parameters']:,} stored ({info['two_branch_parameters']:,} as trunk + two tails), "
                     f"one model: {original:,}")
    return table


def register(app) -> None:
    """Add this module's commands to the app."""
    app.command()(align)
