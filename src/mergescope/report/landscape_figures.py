"""Figures of landscape results (``mergescope.landscape``: paths, barrier matrices, curves, planes,
sharpness, stability, task vectors), read from the result objects, never recomputed.

matplotlib is imported inside each function (``figures.pyplot``, Agg backend), so importing this
module stays light and works without a display.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .figures import pyplot as _pyplot  # one style for every figure
from .figures import save as _save  # atomic PNG writes without timestamps


def plot_path(path, out: str | os.PathLike, title: str = "linear path", extra: dict | None = None) -> Path:
    """Loss (left) and accuracy (right) along t for a PathResult; ``extra`` adds named PathResults."""
    plt = _pyplot()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
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


def plot_curve(curve, out: str | os.PathLike) -> Path:
    """Loss/accuracy along the fitted curve next to the straight line(s)."""
    extra = {"line": curve.line}
    if curve.aligned_line is not None:
        extra[f"line after {curve.align} alignment"] = curve.aligned_line
    return plot_path(curve.curve, out, title=f"{curve.kind} curve", extra=extra)


def plot_plane(plane, out: str | os.PathLike) -> Path:
    """Contour maps of loss (log scale) and accuracy over the plane, with the anchor states marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    a, b = np.meshgrid(plane.alphas, plane.betas, indexing="ij")
    loss = np.log10(np.maximum(np.asarray(plane.loss), 1e-12))
    for ax, values, label in ((axes[0], loss, f"log10 {plane.split} loss"),
                              (axes[1], np.asarray(plane.accuracy), f"{plane.split} accuracy")):
        cs = ax.contourf(a, b, values, levels=20, cmap="viridis")
        fig.colorbar(cs, ax=ax)
        for name, x, y in plane.anchors:
            ax.plot(x, y, "w*", ms=10)
            ax.annotate(name, (x, y), color="w", xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel="alpha", ylabel="beta", title=f"{label} ({plane.kind})")
    return _save(fig, out)


def plot_sharpness(eig, trace, out: str | os.PathLike) -> Path:
    """Top Hessian eigenvalues (bars) and the running Hutchinson trace estimate."""
    plt = _pyplot()
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax_e.bar(range(1, len(eig.eigenvalues) + 1), eig.eigenvalues)
    ax_e.set(xlabel="rank", ylabel="eigenvalue", title=f"top Hessian eigenvalues ({eig.method})")
    if trace is not None:
        ax_t.plot(range(1, len(trace.running) + 1), trace.running)
        ax_t.axhline(trace.trace, ls="--", color="gray")
        ax_t.set(xlabel="probe vectors", ylabel="trace estimate",
                 title=f"Hutchinson trace {trace.trace:.3g} +- {trace.stderr:.2g}")
    for ax in (ax_e, ax_t):
        ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_stability(result, out: str | os.PathLike) -> Path:
    """Barrier between spawned children vs the spawn epoch k."""
    plt = _pyplot()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    ax_l.plot(result.ks, result.barrier_loss, marker="o")
    ax_a.plot(result.ks, result.barrier_acc, marker="o")
    ax_l.set(xlabel="spawn epoch k", ylabel="loss barrier", title="instability (loss)")
    ax_a.set(xlabel="spawn epoch k", ylabel="accuracy barrier", title="instability (accuracy)")
    for ax in (ax_l, ax_a):
        ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_task_vectors(result, out: str | os.PathLike) -> Path:
    """Cosine matrix, task-arithmetic curves (test) and negation curves."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    im = axes[0].imshow(np.asarray(result.cosine), vmin=-1, vmax=1, cmap="coolwarm")
    axes[0].set_xticks(range(len(result.names)), result.names, rotation=45, ha="right")
    axes[0].set_yticks(range(len(result.names)), result.names)
    axes[0].set_title("task-vector cosine")
    fig.colorbar(im, ax=axes[0])
    for name in result.names:
        axes[1].plot(result.scales, result.arithmetic_test[name], marker=".", label=name)
        if name in result.negation:
            axes[2].plot(result.scales, result.negation[name]["target_test"], marker=".", label=f"-{name}: {name}")
            axes[2].plot(result.scales, result.negation[name]["control_test"], ls="--", label=f"-{name}: others")
    axes[1].axvline(result.chosen_scale, color="gray", ls=":")
    axes[1].set(xlabel="lambda", ylabel="test accuracy", title="base + lambda * sum(tau)")
    axes[2].set(xlabel="lambda", ylabel="test accuracy", title="base - lambda * tau (negation)")
    for ax in axes[1:]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)
