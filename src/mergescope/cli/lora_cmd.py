"""`extract-lora` and `merge-adapters`: LoRA adapters from fine-tunes, and adapters merged by their updates."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import console, printable, say

RANK = typer.Option(..., "--rank", "-r", min=1, max=1 << 16, help="Rank of the adapter written.")


def extract_lora(
    finetuned: Path = typer.Argument(..., help="The fine-tuned model (folder or file)."),
    base: Path = typer.Argument(..., help="The base model it was fine-tuned from."),
    out: Path = typer.Option(..., "--out", "-o", help="Output adapter folder (adapter_config.json + weights)."),
    rank: int = RANK,
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """The rank-R LoRA adapter closest to FINETUNED - BASE on every linear weight (truncated SVD, as
    mergekit-extract-lora); PEFT loads it with PeftModel.from_pretrained."""
    from ..lora import extract_lora as run

    result = run(finetuned, base, out, rank, force=force)
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
        return
    say(f"wrote {printable(out)}: {result.targets} modules at rank {rank}; worst relative residual "
        f"||D - BA|| / ||D|| = {result.worst_residual:.3g}", soft_wrap=True)
    if result.not_extracted:
        say(f"{len(result.not_extracted)} other tensor(s) differ and are not in the adapter (norms, biases, "
            f"embeddings): {printable(', '.join(result.not_extracted[:5]))}{' ...' if len(result.not_extracted) > 5 else ''}",
            soft_wrap=True)


def merge_adapters(
    base: Path = typer.Argument(..., help="The base model the adapters were trained on."),
    adapters: list[Path] = typer.Argument(..., help="PEFT adapter folders."),
    out: Path = typer.Option(..., "--out", "-o", help="Output: a full model folder, or an adapter folder with --rank."),
    method: str = typer.Option("task_arithmetic", "--method", "-m", help="Merge method applied to the updates."),
    weight: list[float] = typer.Option(None, "--weight", "-w", help="One weight per adapter (default 1 each)."),
    density: float = typer.Option(None, "--density", help="Fraction of each update kept (ties, dare_*, della...)."),
    lam: float = typer.Option(None, "--lambda", help="Scale of the merged update (task-vector methods)."),
    rank: int = typer.Option(None, "--rank", "-r", min=1, max=1 << 16,
                             help="Write an adapter of this rank (truncated SVD of the merged update) instead of a model."),
    random_seed: int = typer.Option(0, "--random-seed", min=0, max=2**32 - 1, help="Seed for DARE / DELLA."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
):
    """Merge LoRA adapters of BASE by their weight updates scale * B @ A (never A and B apart): a full
    model, or with --rank an adapter re-factored by SVD (PEFT's svd / ties_svd / dare_*_svd)."""
    from ..lora import merge_adapters as run

    params = {k: v for k, v in (("density", density), ("lambda", lam)) if v is not None}
    result = run(base, adapters, out, method=method, weights=weight or None, parameters=params or None, rank=rank,
                 seed=random_seed, force=force)
    if rank is None:
        say(f"wrote {printable(out)}: {result.tensors} tensors, {method} of {len(adapters)} adapter(s)", soft_wrap=True)
    else:
        worst = max(f.residual for f in result)
        say(f"wrote {printable(out)}: {len(result)} modules at rank {rank}, {method} of {len(adapters)} adapter(s); "
            f"worst relative residual {worst:.3g}", soft_wrap=True)


def show_adapter(path: Path, as_json: bool) -> None:
    """`inspect` of a PEFT adapter folder: rank, alpha, scales, target modules, parameter count."""
    from rich.table import Table

    from ..lora import Adapter

    adapter = Adapter(path)
    try:
        info = adapter.summary()
    finally:
        adapter.close()
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title=f"{printable(path)} (LoRA adapter)", show_header=False)
    for key in ("rank", "lora_alpha", "use_rslora", "scales", "ranks", "fan_in_fan_out", "targets", "parameters"):
        value = info[key]
        table.add_row(key, f"{value:,}" if type(value) is int else printable(value))
    table.add_row("target_modules", printable(", ".join(info["target_modules"])))
    table.add_row("dtypes", ", ".join(info["dtypes"]))
    say(table)


def register(app: typer.Typer) -> None:
    app.command("extract-lora")(extract_lora)
    app.command("merge-adapters")(merge_adapters)
