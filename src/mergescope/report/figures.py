"""Study figures, drawn only from the JSON results (never recomputed), as PNG files.

One function per figure; each takes the stage's result dict and an output path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

FAMILY_COLORS = {"single model": "#9e9e9e", "weight aggregation": "#1f77b4", "neuron alignment": "#2ca02c",
                 "ensembling": "#ff7f0e"}


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.spines.top": False, "axes.spines.right": False, "font.size": 9})
    return plt


def save(fig, out: str | os.PathLike) -> Path:
    """Save a PNG atomically and close the figure; no timestamps in the file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight", metadata={"Software": None})
    os.replace(tmp, out)
    pyplot().close(fig)
    return out


def paths_figure(paths: dict[str, dict], out, title: str) -> Path:
    """Test loss and accuracy along t for several named paths (PathResult dicts)."""
    plt = pyplot()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, p in paths.items():
        line, = ax_l.plot(p["t"], p["loss"], marker=".", label=f"{label} (barrier {p['barrier_loss']:.3f})")
        ax_a.plot(p["t"], 100 * np.asarray(p["accuracy"]), marker=".", color=line.get_color(),
                  label=f"{label} (barrier {100 * p['barrier_acc']:.1f} pts)")
    ax_l.set(xlabel="t (0 = model A, 1 = model B)", ylabel=f"test loss", title="loss along the path")
    ax_a.set(xlabel="t (0 = model A, 1 = model B)", ylabel="test accuracy (%)", title="accuracy along the path")
    for ax in (ax_l, ax_a):
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save(fig, out)


def heatmaps_figure(matrices: dict[str, dict], out, key: str = "barrier_loss", title: str = "") -> Path:
    """Side-by-side barrier heatmaps sharing one colour scale (BarrierMatrix dicts)."""
    plt = pyplot()
    items = list(matrices.items())
    vmax = max(max(max(r) for r in m[key]) for _, m in items) or 1.0
    fig, axes = plt.subplots(1, len(items), figsize=(4.2 * len(items), 3.8), squeeze=False)
    for ax, (label, m) in zip(axes[0], items):
        data = np.asarray(m[key])
        im = ax.imshow(data, vmin=0, vmax=vmax, cmap="magma_r")
        ax.set_xticks(range(len(m["names"])), m["names"], rotation=45, ha="right")
        ax.set_yticks(range(len(m["names"])), m["names"])
        for i in range(len(data)):
            for j in range(len(data)):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] > vmax / 2 else "black")
        ax.set_title(label)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=key.replace("_", " "))
    fig.suptitle(title)
    return save(fig, out)


def merge_table_figure(rows: list[dict], out) -> Path:
    """Test accuracy of every merge, grouped by the models merged, coloured by family."""
    plt = pyplot()
    groups = list(dict.fromkeys(r["models"] for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 0.32 * max(len(rows), 8) + 1), squeeze=False)
    for ax, group in zip(axes[0], groups):
        sub = [r for r in rows if r["models"] == group]
        y = np.arange(len(sub))
        ax.barh(y, [100 * r["accuracy"] for r in sub], color=[FAMILY_COLORS.get(r["family"], "#555") for r in sub])
        ax.set_yticks(y, [r["method"] for r in sub])
        ax.invert_yaxis()
        low = min(100 * r["accuracy"] for r in sub)
        ax.set_xlim(max(0, low - 5), 100)
        for yi, r in zip(y, sub):
            ax.text(100 * r["accuracy"] + 0.1, yi, f"{100 * r['accuracy']:.1f}", va="center", fontsize=7)
        ax.set(xlabel="test accuracy (%)", title=group)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in FAMILY_COLORS.values()]
    fig.legend(handles, list(FAMILY_COLORS), loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save(fig, out)


def stability_figure(res: dict, out) -> Path:
    """Barrier between two spawned children vs the epoch they were spawned at."""
    plt = pyplot()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_l.plot(res["ks"], res["barrier_loss"], "o-", color="#d62728")
    ax_a.plot(res["ks"], 100 * np.asarray(res["barrier_acc"]), "o-", color="#d62728")
    ax_l.set(xlabel="spawn epoch k (shared training before the split)", ylabel="test loss barrier")
    ax_a.set(xlabel="spawn epoch k (shared training before the split)", ylabel="test accuracy barrier (pts)")
    for ax in (ax_l, ax_a):
        ax.axhline(0, color="gray", lw=0.8, ls=":")
    fig.suptitle(f"Determinism: barrier between two children trained to epoch {res['epochs']}")
    return save(fig, out)


def task_vector_figure(res: dict, out) -> Path:
    """Cosine matrix of task vectors, the task-arithmetic curve per task, and negation per task."""
    plt = pyplot()
    names = res["names"]
    has_negation = bool(res["negation"])
    fig, axes = plt.subplots(1, 3 if has_negation else 2, figsize=(13 if has_negation else 9, 3.6))
    cos = np.asarray(res["cosine"])
    im = axes[0].imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
    axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[0].set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            axes[0].text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=8,
                         color="white" if abs(cos[i, j]) > 0.6 else "black")
    axes[0].set_title("cosine between task vectors")
    fig.colorbar(im, ax=axes[0], shrink=0.8)
    for name in names:
        axes[1].plot(res["scales"], 100 * np.asarray(res["arithmetic_test"][name]), "o-", ms=3, label=name)
    axes[1].axvline(res["chosen_scale"], color="gray", ls=":", lw=1, label=f"chosen on val ({res['chosen_scale']:g})")
    axes[1].set(xlabel="lambda in base + lambda * sum(tau)", ylabel="test accuracy on the task (%)",
                title="task arithmetic (addition)")
    axes[1].legend(fontsize=7)
    if has_negation:
        scales = res["scales"]
        for name, neg in res["negation"].items():
            line, = axes[2].plot(scales[:len(neg["target_test"])], 100 * np.asarray(neg["target_test"]), "o-", ms=3,
                                 label=f"forget {name}: on {name}")
            axes[2].plot(scales[:len(neg["control_test"])], 100 * np.asarray(neg["control_test"]), "s--", ms=3,
                         color=line.get_color(), label=f"forget {name}: on the others")
        axes[2].set(xlabel="lambda in base - lambda * tau", ylabel="test accuracy (%)", title="task negation")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    return save(fig, out)
