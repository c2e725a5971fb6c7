"""`diagnose`: before merging, which family and method, and why (JSON, PNG and HTML written to --out)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .common import printable, progress, say, torch_threads, write_json
from .options import MODEL_OPTIONS, fmt, model_option, model_options, out_option, show, table

OUTPUTS = ("diagnosis.json", "diagnosis.png", "diagnosis.html")
SIGNALS = (("relative_distance", "relative distance"), ("weight_cosine", "weight cosine"),
           ("task_vector_cosine", "task-vector cosine"), ("sign_conflict", "sign conflict (TIES)"),
           ("norm_ratio", "norm ratio (max/min)"), ("alignment_gap", "alignment gap"))
MEASURED = (("members", "members (mean)"), ("average", "uniform average"), ("aligned", "weight matching + average"),
            ("task_arithmetic", "task arithmetic"), ("ties", "TIES"), ("ensemble", "output ensemble"))
TOP_LAYERS = 10


def _signals_table(signals: dict) -> Table:
    t = table("signals (data-free)", ["signal", "value"])
    for key, label in SIGNALS:
        t.add_row(label, fmt(signals.get(key)))
    t.add_row("parameters", f"{signals['n_parameters']:,} in {signals['n_tensors']:,} tensors")
    return t


def _layers_table(layers: list[dict]) -> Table:
    t = table(f"layers (top {TOP_LAYERS} by distance)", ["tensor", "numel", "distance", "cosine", "sign conflict",
                                                       "norm ratio", "alignment gap"])
    top = sorted(layers, key=lambda r: -(r.get("relative_distance") or 0.0))[:TOP_LAYERS]
    for r in top:
        t.add_row(printable(r["name"]), f"{r['numel']:,}", fmt(r["relative_distance"]), fmt(r["cosine"]),
                  fmt(r["sign_conflict"]), fmt(r["norm_ratio"], 3), fmt(r.get("alignment_gap")))
    return t


def _measured_table(m: dict) -> Table:
    t = table(f"measured on a {m['split']} sample of {m['sample_size']}", ["merge", "accuracy", "loss"])
    for key, label in MEASURED:
        if m.get(f"{key}_accuracy") is not None or m.get(f"{key}_loss") is not None:
            t.add_row(label, fmt(m.get(f"{key}_accuracy")), fmt(m.get(f"{key}_loss")))
    t.add_row("barrier (linear path)", fmt(m["barrier_accuracy"]), fmt(m["barrier_loss"]))
    return t


def _say_recommendation(rec: dict | None) -> None:
    if rec is None:
        say("no recommender installed: signals only")
        return
    change = rec.get("expected_change")
    expected = "" if change is None else f", expected {rec['metric']} change {change:+.4f}"
    say(f"[bold]recommendation:[/bold] {printable(rec['family'])} / {printable(rec['method'])}{expected}")
    for reason in rec.get("reasons", []):
        say(f"  - {printable(reason)}")


MODELS = typer.Argument(..., help="Two or more checkpoints (files or Hugging Face folders).")
BASE = typer.Option(None, "--base", help="The common parent: task vectors, sign conflicts, TIES.")
TASK = typer.Option(None, help="Measure on this task: a data file (data.csv, .jsonl, .npz, ...), 'digits', or "
                    "package.module:factory (runs YOUR code, by design). Without it: data-free signals only.")
MODEL = model_option()
OUT = out_option("diagnose-out")  # diagnosis.json, .png and .html
POINTS = typer.Option(5, min=2, max=101, help="Points on the linear path (with --task).")
SAMPLE = typer.Option(512, min=1, max=1_000_000, help="Val examples measured (with --task).")
SEED = typer.Option(0, min=0, max=2**32 - 1, help="Seed for the val sample and the alignment-gap subsample.")
ALIGN_GAP = typer.Option(True, "--align-gap/--no-align-gap", help="Measure the alignment gap.")
THREADS = typer.Option(None, "--threads", min=1, max=1024, help="Worker threads (default: up to 2).")
JSON_OUT = typer.Option(None, "--json", help="Also write the diagnosis JSON here.")


def diagnose(models: list[Path] = MODELS, base: Path = BASE, task: str = TASK, model: str = MODEL, out: Path = OUT,
             points: int = POINTS, sample: int = SAMPLE, seed: int = SEED, align_gap: bool = ALIGN_GAP,
             threads: int = THREADS, json_out: Path = JSON_OUT, model_opts: list[str] = MODEL_OPTIONS):
    """Which merge for these models (average, task vectors, align first, ensemble, or none) and why."""
    from ..diagnose import diagnose as run
    from ..io import check_side_outputs
    from ..report.diagnose_figures import plot_diagnosis, write_page

    inputs = [*models, *([base] if base else [])]
    check_side_outputs(inputs, files=[json_out], folders=[(out, OUTPUTS)])
    with torch_threads(threads), progress() as bar:
        job = bar.add_task("diagnose", total=None)

        def on_progress(stage: str, done: int, total: int) -> None:
            bar.update(job, description=stage, completed=done, total=total)

        result = run([str(m) for m in models], None if base is None else str(base), task=task, model=model,
                     points=points, sample=sample, seed=seed, align_gap=align_gap, threads=threads,
                     model_options=model_options(model_opts), progress=on_progress)
    path = write_json(out / "diagnosis.json", result.to_dict(), strict=True)
    data = json.loads(path.read_text())
    plot_diagnosis(data, out / "diagnosis.png")
    write_page(data, out / "diagnosis.png", out / "diagnosis.html")
    if json_out:
        write_json(json_out, data, strict=True)
    show(_signals_table(result.signals), _layers_table(result.layers),
         *([_measured_table(result.measured)] if result.measured else []))
    _say_recommendation(result.recommendation)
    say(f"wrote {', '.join(str(out / n) for n in OUTPUTS)}")


def register(app: typer.Typer) -> None:
    """Add `diagnose` to the app."""
    app.command()(diagnose)
