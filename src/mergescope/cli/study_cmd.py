"""`mergescope study`: the four-characteristics study and its HTML report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import STATE, console, progress, say, torch_threads


def study(
    out: Path = typer.Option(Path("study"), "--out", "-o", help="Folder for report.html, results.json, figures/, checkpoints/."),
    quick: bool = typer.Option(False, "--quick", help="Small widths and few epochs (about a minute)."),
    seed: int = typer.Option(None, min=0, max=2**32 - 1, help="Seed of the whole study [default: 0, or the --config's]."),
    replicates: int = typer.Option(None, min=1, max=50, help="Independent replicates of every measurement (new seeds "
                                   "each) [default: 3, --quick 2]; the report shows means with 95% intervals."),
    workers: int = typer.Option(None, min=1, max=64, help="Processes running replicates in parallel "
                                "[default: one per core, at most 2]."),
    stages: str = typer.Option(None, help="Comma-separated subset of stages to run."),
    backdoor: bool = typer.Option(False, "--backdoor", help="Merging stage: also fine-tune one poisoned member "
                                  "and add an attack-success column (docs/backdoor.md). Off: nothing changes."),
    threads: int = typer.Option(1, min=1, max=1024, help="torch threads (small models run fastest on one)."),
    config: Path = typer.Option(None, "--config", help="Study YAML for your own checkpoints (model, task, checkpoints, "
                                "base). Its model and task may be package.module:factory: that runs YOUR code, by "
                                "design; only use configs you trust."),
):
    """Train (or reuse) the digits and MNIST-1D model families over several replicates, measure the four
    landscape characteristics with 95% intervals, compare every merge method, and write report.html."""
    from ..errors import MergescopeError
    from ..io import check_side_outputs
    from ..study import STAGES, StudyConfig, run_study

    overrides = {k: v for k, v in {"seed": seed, "replicates": replicates, "workers": workers}.items() if v is not None}
    if stages:
        chosen = tuple(s.strip() for s in stages.split(",") if s.strip())
        unknown = set(chosen) - set(STAGES)
        if unknown:
            raise MergescopeError(f"--stages: unknown stage(s) {', '.join(sorted(unknown))} (choose from {', '.join(STAGES)})")
        overrides["stages"] = chosen
    if backdoor:
        overrides["backdoor"] = True
    inputs = []
    if config is not None:
        from ..study.custom import read_config

        cfg = read_config(config)
        inputs = [config, *cfg.named_checkpoints.values(), cfg.base]
    check_side_outputs(inputs, folders=[(out, ["results.json", "report.html"])])
    with torch_threads(threads), progress() as bar:
        job = bar.add_task("study", total=None)
        hooks = {"on_stage": lambda name, i, n: bar.update(job, description=f"stage {i + 1}/{n}: {name}"),
                 "tick": lambda message: bar.update(job, advance=1)}
        if config is not None:
            from ..study import run_custom_study

            if replicates is not None or quick or backdoor:
                raise MergescopeError("--replicates/--quick/--backdoor apply to the built-in study; with --config your "
                                      "checkpoints are the one replicate")
            results = run_custom_study(config, out, seed=seed, stages=overrides.get("stages"), **hooks)
        else:
            settings = StudyConfig.quick_config(**overrides) if quick else StudyConfig(**overrides)
            results = run_study(out, settings, **hooks)
    table = Table(title="mergescope study: summary")
    table.add_column("finding")
    from ..study.sections import summary_lines

    for line in summary_lines(results):
        table.add_row(line)
    if not STATE["quiet"]:
        console.print(table)
    seconds = results.get("wall_seconds", sum(results["timings"].values()))
    say(f"report: {out / 'report.html'}  ({seconds:.0f}s; {results['replicates']} replicate(s); models trained "
        f"{results['models']['trained']}, reused {results['models']['reused']})")


def register(app: typer.Typer) -> None:
    app.command()(study)
