"""`adamerge`: AdaMerging (learned task-arithmetic coefficients, entropy minimisation on unlabeled val inputs).

Prints the learned coefficients and the merge's val/test accuracy next to task arithmetic at the
initial coefficients; writes the merged checkpoint (and optionally the result as JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..io import check_side_outputs
from .common import finite, say, torch_threads, write_json
from .ensemble_cmd import _load
from .options import THREADS, model_option, task_option
from .options import fmt as _f
from .options import show as _show
from .options import table as _table

CKPTS = typer.Argument(..., help="BASE then the fine-tuned checkpoints (one architecture).")
OUT = typer.Option(..., "--out", "-o", help="Write the merged checkpoint here (.safetensors or folder).")
LAYER_WISE = typer.Option(False, "--layer-wise", help="One coefficient per task and parameter tensor (default: one "
                          "per task).")
JSON_OUT = typer.Option(None, "--json", help="Also write the result as JSON here.")
FORCE = typer.Option(False, help="Replace an existing output.")


def adamerge(
    checkpoints: list[Path] = CKPTS, out: Path = OUT, task: str = task_option("the base records"),
    layer_wise: bool = LAYER_WISE,
    steps: int = typer.Option(500, min=0, max=1_000_000, help="Adam steps (the paper: 500)."),
    lr: float = typer.Option(1e-3, callback=finite(0.0, open_low=True), help="Adam learning rate (the paper: 1e-3)."),
    init: float = typer.Option(0.3, callback=finite(), help="Initial coefficient (the paper: 0.3)."),
    batch_size: int = typer.Option(16, min=1, max=1_000_000, help="Unlabeled val inputs per step."),
    seed: int = typer.Option(0, min=0, help="Seed of the input order."),
    json_out: Path = JSON_OUT, force: bool = FORCE,
    model: str = model_option("the base records"), threads: int = THREADS,
):
    """AdaMerging (Yang et al., ICLR 2024): task-wise or layer-wise coefficients by entropy minimisation."""
    from ..errors import MergescopeError
    from ..io import check_output_path, load, provenance, save
    from ..merge.adamerging import adamerge as learn
    from ..tasks.checkpoints import hf_folder, passed_metadata

    if len(checkpoints) < 2:
        raise MergescopeError("adamerge needs a base and at least one fine-tuned checkpoint")
    check_side_outputs(checkpoints, files=[json_out], main=out)
    check_output_path(out, checkpoints, force)
    with torch_threads(threads):
        module, states, task_obj = _load(checkpoints, model, task)
        names = list(states)
        base, fts = states[names[0]], [states[n] for n in names[1:]]
        result = learn(module, base, fts, task_obj, layer_wise=layer_wise, steps=steps, lr=lr, init=init,
                       seed=seed, batch_size=batch_size)
        start = learn(module, base, fts, task_obj, layer_wise=False, steps=0, init=init)
        rows = [(f"task arithmetic ({init:g})", start), ("adamerging", result)]
        scores = [(label, r, _scores(module, r.state, task_obj)) for label, r in rows]
    _coefficient_table(result, names[1:])
    table = _table(f"adamerging of {len(fts)} models ({task_obj.name})",
                   ["merge", "val entropy", "val acc", "test acc"])
    for label, r, (val, test) in scores:
        table.add_row(label, _f(r.entropy_after), _f(val), _f(test))
    _show(table)
    if json_out:
        write_json(json_out, {"base": names[0], "models": names[1:], **result.to_dict(),
                              "accuracy": {label: {"val": v, "test": t} for label, _, (v, t) in scores}})
    meta = {**provenance(inputs=checkpoints), **passed_metadata(load(checkpoints[0]).metadata),
            "adamerging": json.dumps({"layer_wise": layer_wise, "steps": steps, "lr": lr, "init": init, "seed": seed,
                                      "batch_size": batch_size, "coefficients": result.coefficients.tolist()})}
    save(result.state, out, metadata=meta, force=force, inputs=checkpoints,
         copy_files_from=hf_folder(load(checkpoints[0])))
    say(f"wrote {out}")


def _scores(module, state, task) -> tuple[float, float]:
    from ..tasks.checkpoints import load_state_into

    load_state_into(module, state)
    return task.evaluate(module, "val")["accuracy"], task.evaluate(module, "test")["accuracy"]


def _coefficient_table(result, models: list[str]) -> None:
    """Task-wise: one row per model; layer-wise: one row per parameter tensor, a column per model."""
    c = result.coefficients
    if not result.layer_wise:
        table = _table("learned coefficients (task-wise)", ["model", "coefficient"])
        for name, value in zip(models, c.tolist()):
            table.add_row(name, _f(value))
    else:
        table = _table("learned coefficients (layer-wise)", ["tensor", *models])
        for j, layer in enumerate(result.layers):
            table.add_row(layer, *(_f(float(c[i, j])) for i in range(len(models))))
    _show(table)


def register(app: typer.Typer) -> None:
    app.command("adamerge")(adamerge)
