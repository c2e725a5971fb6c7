"""Matplotlib figures of landscape results (read from the result objects, never recomputed).

matplotlib is imported inside each function with the Agg backend, so importing
``mergescope.landscape`` stays light and works without a display.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", metadata={"Software": None})
    os.replace(tmp, out)
    _pyplot().close(fig)
    return out


def plot_path(path, out: str | os.PathLike, title: str = "linear path", extra: dict | None = None) -> Path:
    """Loss (left) and accuracy (right) along t for a PathResult; ``extra`` adds named PathResults."""
    plt = _pyplot()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4))
    series = {title: path, **(extra or {})}
    for label, p in series.items():
        ax_l.plot(p.t, p.loss, marker=".", label=f"{label} ({p.split})")
        ax_a.plot(p.t, p.accuracy, marker=".", label=f"{label} ({p.split})")
        if label == title:
            ax_l.plot(p.t, p.train_loss, ls="--", label=f"{label} (train)")
            ax_a.plot(p.t, p.train_accuracy, ls="--", label=f"{label} (train)")
            if p.naive_loss is not None:
                ax_l.plot(p.t, p.naive_loss, ls=":", label=f"{label} ({p.split}, BN not reset)")
                ax_a.plot(p.t, p.naive_accuracy, ls=":", label=f"{label} ({p.split}, BN not reset)")
    ax_l.set(xlabel="t", ylabel="loss", title=f"loss barrier {path.barrier_loss:.4f}")
    ax_a.set(xlabel="t", ylabel="accuracy", title=f"accuracy barrier {path.barrier_acc:.4f}")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def plot_matrix(matrix, out: str | os.PathLike) -> Path:
    """Heatmaps of the pairwise loss and accuracy barriers."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, values, label in ((axes[0], matrix.loss, "loss barrier"), (axes[1], matrix.accuracy, "accuracy barrier")):
        data = np.asarray(values)
        im = ax.imshow(data, cmap="viridis")
        ax.set_xticks(range(len(matrix.names)), matrix.names, rotation=45, ha="right")
        ax.set_yticks(range(len(matrix.names)), matrix.names)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, f"{data[i, j]:.3f}", ha="center", va="center", color="w", fontsize=7)
        ax.set_title(f"{label} ({matrix.split})")
        fig.colorbar(im, ax=ax)
    return _save(fig, out)
