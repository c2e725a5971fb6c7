"""The diagnosis figure and page, drawn from ``Diagnosis.to_dict()`` (the saved JSON), never recomputed.

``plot_diagnosis``: per-layer bars (relative distance, cosine, sign conflict, alignment gap) for at
most ``MAX_LAYERS`` tensors (those with an alignment gap and the most distant ones, in file order), plus, when measured, the
loss/accuracy along the linear path and the measured merges next to the members and the ensemble.
``write_page``: one self-contained HTML page (``report.html.render_report``, base64 PNG).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .figures import pyplot as _pyplot
from .figures import save as _save

MAX_LAYERS = 30
LAYER_SIGNALS = (("relative_distance", "relative distance"), ("cosine", "cosine"),
                 ("sign_conflict", "sign conflict"), ("alignment_gap", "alignment gap"))
MEASURED = (("members", "members (mean)"), ("average", "uniform average"), ("aligned", "weight matching + avg"),
            ("task_arithmetic", "task arithmetic"), ("ties", "TIES"), ("ensemble", "output ensemble"))


def shown_layers(layers: list[dict], limit: int = MAX_LAYERS) -> list[dict]:
    """At most ``limit`` rows in file order: those with an alignment gap, then the largest relative distances."""
    if len(layers) <= limit:
        return list(layers)
    order = sorted(range(len(layers)), key=lambda i: (layers[i].get("alignment_gap") is None,
                                                      -(layers[i].get("relative_distance") or 0.0)))
    return [layers[i] for i in sorted(order[:limit])]


def _value(v) -> float:
    return float("nan") if v is None else float(v)


def _layer_panels(axes, layers: list[dict]) -> None:
    names = [r["name"] for r in layers]
    y = np.arange(len(names))
    for ax, (key, label) in zip(axes, LAYER_SIGNALS):
        values = [_value(r.get(key)) for r in layers]
        ax.barh(y, np.nan_to_num(values), color="#1f77b4" if key != "alignment_gap" else "#2ca02c")
        if ax is axes[0]:
            ax.set_yticks(y, names, fontsize=6)
        else:
            ax.set_yticks([])  # the names once: every tick label costs text layout at save time
        ax.invert_yaxis()
        ax.set_title(label)
        if all(np.isnan(values)):  # say why the panel is empty instead of drawing a blank axis
            ax.set_xticks([])
            ax.text(0.5, 0.5, "needs --base" if key == "sign_conflict" else "not measured",
                    transform=ax.transAxes, ha="center", va="center", color="#777777")
        ax.grid(axis="x", alpha=0.3)


# which measured row a recommended family is (green in the bars)
FAMILY_ROW = {"average": "uniform average", "align": "weight matching + avg", "ensemble": "output ensemble",
              "none": "members (mean)"}


def _measured_panels(ax_path, ax_bars, measured: dict, recommended: str | None = None) -> None:
    path = measured["path"]
    ax_path.plot(path["t"], path["loss"], marker="o", color="#1f77b4")
    ax_path.set_ylabel(f"{measured['split']} loss (blue)", color="#1f77b4")
    ax_path.set(xlabel="t (model 0 -> model 1)",
                title=f"linear path: loss barrier {_value(measured['barrier_loss']):.3f}")
    twin = ax_path.twinx()
    twin.plot(path["t"], path["accuracy"], marker=".", color="#ff7f0e")
    twin.set_ylabel("accuracy (orange)", color="#ff7f0e")
    ax_path.grid(alpha=0.3)
    labels, values = [], []
    for key, label in MEASURED:
        v = measured.get(f"{key}_accuracy")
        if v is not None and np.isfinite(v):
            labels.append(label)
            values.append(v)
    metric = "accuracy"
    if not values:  # no accuracies (a regression task): the losses instead
        metric = "loss"
        for key, label in MEASURED:
            v = measured.get(f"{key}_loss")
            if v is not None and np.isfinite(v):
                labels.append(label)
                values.append(v)
    colors = ["#2ca02c" if label == recommended else "#9e9e9e" for label in labels]
    ax_bars.barh(np.arange(len(values)), values, color=colors)
    ax_bars.set_yticks(np.arange(len(values)), labels)
    ax_bars.invert_yaxis()
    low, high = min(values), max(values)
    pad = max(high - low, 1e-3) * 0.6  # zoomed on the differences: bars from 0 hide them
    ax_bars.set_xlim(max(low - pad, 0.0), high + pad)
    for i, v in enumerate(values):
        ax_bars.text(v, i, f" {v:.3f}", va="center", fontsize=7)
    ax_bars.set(xlabel=f"{measured['split']} {metric} (sample of {measured['sample_size']})",
                title="measured merges (green: recommended)" if recommended in labels else "measured merges")


def plot_diagnosis(diagnosis: dict, out: str | os.PathLike) -> Path:
    """The diagnosis PNG: layer signals (top row), path and measured merges (bottom row, with a task)."""
    plt = _pyplot()
    layers = shown_layers(diagnosis["layers"])
    measured = diagnosis.get("measured")
    rows = 2 if measured else 1
    height = max(3.0, 0.16 * len(layers) + 1.2)
    fig = plt.figure(figsize=(13, height + (3.4 if measured else 0)))
    grid = fig.add_gridspec(rows, 4, height_ratios=[height, 3.4] if measured else [1], left=0.2, right=0.98,
                            wspace=0.25, hspace=0.25)  # fixed margins: constrained layout took seconds
    axes = [fig.add_subplot(grid[0, i]) for i in range(4)]
    _layer_panels(axes, layers)
    if measured:
        bottom = grid[1, :].subgridspec(1, 2, wspace=0.6)  # room for the path's right axis and the bar labels
        rec = diagnosis.get("recommendation") or {}
        row = FAMILY_ROW.get(rec.get("family"))
        if rec.get("family") == "task_vectors":
            row = "TIES" if rec.get("method", "").endswith("ties") else "task arithmetic"
        _measured_panels(fig.add_subplot(bottom[0]), fig.add_subplot(bottom[1]), measured, row)
    rec = diagnosis.get("recommendation")
    title = "diagnosis" if not rec else f"diagnosis: {rec['family']} / {rec['method']}"
    fig.suptitle(title)
    return _save(fig, out)


def summary_lines(diagnosis: dict) -> list[str]:
    """The recommendation and its reasons, as sentences."""
    rec = diagnosis.get("recommendation")
    if not rec:
        return ["No recommender is installed (mergescope.diagnose.recommend): signals only."]
    change = rec.get("expected_change")
    expected = "no expected change measured" if change is None else f"expected {rec['metric']} change {change:+.4f}"
    return [f"Recommendation: {rec['family']} / {rec['method']} ({expected}).", *rec.get("reasons", [])]


def _signal_table(signals: dict) -> dict:
    keys = ("relative_distance", "weight_cosine", "task_vector_cosine", "sign_conflict", "norm_ratio",
            "alignment_gap", "alignment_identity", "alignment_matched", "alignment_tensors", "n_models",
            "n_parameters", "n_tensors")
    return {"columns": ["signal", "value"], "rows": [{"signal": k, "value": "-" if signals.get(k) is None
                                                      else signals[k]} for k in keys]}


def _measured_table(measured: dict) -> dict:
    rows = [{"merge": label, "accuracy": measured.get(f"{key}_accuracy") if measured.get(f"{key}_accuracy") is not None
             else "-", "loss": measured.get(f"{key}_loss") if measured.get(f"{key}_loss") is not None else "-"}
            for key, label in MEASURED]
    rows.append({"merge": "barrier (linear path)", "accuracy": measured["barrier_accuracy"],
                 "loss": measured["barrier_loss"]})
    return {"columns": ["merge", "accuracy", "loss"], "rows": rows}


def _layer_table(layers: list[dict]) -> dict:
    cols = ["name", "numel", "relative_distance", "cosine", "sign_conflict", "norm_ratio", "alignment_gap"]
    return {"columns": cols, "rows": [{c: "-" if r.get(c) is None else r[c] for c in cols} for r in layers]}


def write_page(diagnosis: dict, png: str | os.PathLike, out: str | os.PathLike) -> Path:
    """diagnosis.html: the recommendation first, then the figure and the signal, measured and layer tables."""
    from .html import render_report

    png = Path(png)
    inputs = diagnosis["inputs"]
    intro = f"Models: {', '.join(inputs['models'])}" + (f"; base: {inputs['base']}" if inputs.get("base") else "")
    sections = [{"id": "signals", "title": "Signals", "intro": intro,
                 "figures": [{"file": png.name, "caption": "Per-layer signals (tensors with an alignment gap and the most distant ones, file order)"
                              + ("; linear path and measured merges on the val sample" if diagnosis.get("measured")
                                 else "")}],
                 "tables": [_signal_table(diagnosis["signals"])]}]
    if diagnosis.get("measured"):
        m = diagnosis["measured"]
        sections.append({"id": "measured", "title": "Measured on the task",
                         "intro": f"{m['split']} sample of {m['sample_size']} examples, {m['points']} path points.",
                         "tables": [_measured_table(m)]})
    sections.append({"id": "layers", "title": "Layers", "intro": "Tensors with an alignment gap and those with the largest relative distance.",
                     "tables": [_layer_table(shown_layers(diagnosis["layers"]))]})
    return render_report("mergescope diagnose", summary_lines(diagnosis), sections,
                         "Data-free signals are streamed from the checkpoints; measured figures use the val split "
                         "only.", out, png.parent, subtitle="mergescope diagnose: which merge, and why")
