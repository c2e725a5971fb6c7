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


def template_image(values):
    """A template as an image: square inputs (8x8 digits) as a square, any other input as a 1 x L strip."""
    import math

    flat = np.asarray(values, dtype=float).reshape(-1)
    side = math.isqrt(flat.size)
    return flat.reshape(side, side) if side * side == flat.size else flat.reshape(1, -1)


def _legend_below(fig, axes, ncol: int = 2) -> None:
    """One legend under the panels, so no curve (a barrier's peak, a dip) is ever hidden behind it."""
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=ncol, fontsize=8, frameon=False)


def _interval(values) -> tuple[float, float]:
    """(mean, 95% half-width) of replicate values (0 half-width for one replicate)."""
    from ..study.stats import interval

    iv = interval(values)
    return iv.mean, iv.half or 0.0


def band_paths_figure(paths: dict[str, list[dict]], out, title: str) -> Path:
    """Test loss and accuracy along t for named paths, each the mean over replicates with a 95% band
    (``paths[label]`` is the list of one PathResult dict per replicate)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, reps in paths.items():
        t = np.asarray(reps[0]["t"])
        color = None
        for ax, key, scale in ((axes[0], "loss", 1.0), (axes[1], "accuracy", 100.0)):
            stats = [_interval([scale * r[key][i] for r in reps]) for i in range(len(t))]
            mean, half = np.array([m for m, _ in stats]), np.array([h for _, h in stats])
            line, = ax.plot(t, mean, marker=".", ms=3, label=f"{label} (n={len(reps)})", color=color)
            color = line.get_color()
            top = 100.0 if key == "accuracy" else np.inf  # bands clipped to the values that can occur
            ax.fill_between(t, np.clip(mean - half, 0, top), np.clip(mean + half, 0, top), color=color, alpha=0.2, lw=0)
    axes[0].set(xlabel="t (0 = model A, 1 = model B)", ylabel="test loss", title="loss along the path")
    axes[1].set(xlabel="t (0 = model A, 1 = model B)", ylabel="test accuracy (%)", title="accuracy along the path")
    fig.suptitle(title + " (mean and 95% interval over replicates, clipped to possible values)")
    _legend_below(fig, axes)
    return save(fig, out)


def barrier_bars_figure(groups: dict[str, dict[str, list[float]]], out, title: str, ylabel: str,
                        panels: dict[str, dict[str, dict[str, list[float]]]] | None = None) -> Path:
    """Grouped bars of barriers with 95% error bars and every replicate as a dot.

    ``panels`` maps a panel title to {group: {condition: replicate values}} (e.g. test and train);
    ``groups`` alone draws one panel.
    """
    plt = pyplot()
    panels = panels or {"": groups}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    axes = axes[0]
    for ax, (panel, data) in zip(axes, panels.items()):
        names = list(data)
        conditions = list(dict.fromkeys(c for g in data.values() for c in g))
        width = 0.8 / len(conditions)
        cmap = plt.get_cmap("tab10")
        for j, cond in enumerate(conditions):
            xs, means, halves = [], [], []
            for i, g in enumerate(names):
                if cond in data[g]:
                    m, h = _interval(data[g][cond])
                    x = i + (j - (len(conditions) - 1) / 2) * width
                    xs.append(x), means.append(m), halves.append(h)
                    ax.scatter([x] * len(data[g][cond]), data[g][cond], s=9, color="black", zorder=3)
            ax.bar(xs, means, width, yerr=halves, capsize=3, color=cmap(j), label=cond, alpha=0.85)
        ax.set_xticks(range(len(names)), names)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set(ylabel=ylabel, title=panel)
    fig.suptitle(title)
    _legend_below(fig, list(axes), ncol=min(len(conditions), 3))
    return save(fig, out)


def heatmaps_figure(matrices: dict[str, dict], out, key: str = "barrier_loss", title: str = "") -> Path:
    """Side-by-side barrier heatmaps sharing one colour scale (BarrierMatrix dicts)."""
    plt = pyplot()
    items = list(matrices.items())
    vmax = max(max(max(r) for r in m[key]) for _, m in items) or 1.0
    fig, axes = plt.subplots(1, len(items), figsize=(min(3.4 * len(items) + 1, 10), 3.6), squeeze=False)
    for k, (ax, (label, m)) in enumerate(zip(axes[0], items)):
        data = np.asarray(m[key])
        im = ax.imshow(data, vmin=0, vmax=vmax, cmap="magma_r")
        ax.set_xticks(range(len(m["names"])), m["names"], rotation=45, ha="right")
        ax.set_yticks(range(len(m["names"])), m["names"] if k == 0 else [""] * len(m["names"]))
        for i in range(len(data)):
            for j in range(len(data)):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] > vmax / 2 else "black")
        ax.set_title(label)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=key.replace("_", " "))
    fig.suptitle(title)
    return save(fig, out)


def merge_table_figure(rows: list[dict], out) -> Path:
    """Test accuracy of every method (mean with 95% error bar over replicates, every replicate a dot),
    one panel per set of models merged, coloured by family; two panels per row so labels stay legible.

    ``rows`` are aggregated rows: models, family, method, accuracy (replicate values list).
    """
    plt = pyplot()
    groups = list(dict.fromkeys(r["models"] for r in rows))
    ncols = min(2, len(groups))
    nrows = -(-len(groups) // ncols)
    tallest = max(sum(r["models"] == g for r in rows) for g in groups)
    fig, axes = plt.subplots(nrows, ncols, figsize=(10, nrows * (0.27 * tallest + 1.2)), squeeze=False)
    for ax, group in zip(axes.flat, groups):
        sub = [r for r in rows if r["models"] == group]
        y = np.arange(len(sub))
        stats = [_interval([100 * v for v in r["accuracy"]]) for r in sub]
        ax.barh(y, [m for m, _ in stats], xerr=[h for _, h in stats], capsize=2,
                color=[FAMILY_COLORS.get(r["family"], "#555") for r in sub])
        for yi, r in zip(y, sub):
            ax.scatter([100 * v for v in r["accuracy"]], [yi] * len(r["accuracy"]), s=6, color="black", zorder=3)
        ax.set_yticks(y, [r["method"] for r in sub], fontsize=8)
        ax.invert_yaxis()
        low = min(min(100 * v for v in r["accuracy"]) for r in sub)
        ax.set_xlim(max(0, low - 3), 100.5)
        for yi, (m, _) in zip(y, stats):
            ax.text(ax.get_xlim()[0] + 0.3, yi, f"{m:.1f}", va="center", fontsize=7, color="white")
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(group, fontsize=10)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in FAMILY_COLORS.values()]
    fig.legend(handles, list(FAMILY_COLORS), loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.tight_layout()
    return save(fig, out)


def stability_figure(settings: dict[str, list[dict]], out) -> Path:
    """Barrier between two spawned children vs the spawn epoch k, per setting: mean and 95% error bars
    over replicates (``settings[label]`` is one StabilityResult dict per replicate)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, reps in settings.items():
        ks = reps[0]["ks"]
        for ax, key, scale in ((axes[0], "barrier_loss", 1.0), (axes[1], "barrier_acc", 100.0)):
            stats = [_interval([scale * r[key][i] for r in reps]) for i in range(len(ks))]
            ax.errorbar(ks, [m for m, _ in stats], yerr=[h for _, h in stats], marker="o", capsize=3,
                        label=f"{label} (trained to epoch {reps[0]['epochs']}, n={len(reps)})")
    axes[0].set(xlabel="spawn epoch k (shared training before the split)", ylabel="test loss barrier")
    axes[1].set(xlabel="spawn epoch k (shared training before the split)", ylabel="test accuracy barrier (pts)")
    for ax in axes:
        ax.axhline(0, color="gray", lw=0.8, ls=":")
    fig.suptitle("Determinism: barrier between two children spawned at epoch k (mean and 95% interval)")
    _legend_below(fig, axes, ncol=1)
    return save(fig, out)


def task_vector_figure(reps: list[dict], out) -> Path:
    """Task vectors over replicates: cosine (mean), task arithmetic and negation curves (mean, 95% band)."""
    plt = pyplot()
    res = reps[0]
    names = res["names"]
    has_negation = bool(res["negation"])
    fig, axes = plt.subplots(1, 3 if has_negation else 2, figsize=(10, 3.4))
    cos = np.mean([np.asarray(r["cosine"]) for r in reps], axis=0)
    im = axes[0].imshow(cos, vmin=-1, vmax=1, cmap="RdBu_r")
    axes[0].set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes[0].set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            axes[0].text(j, i, f"{cos[i, j]:.2f}", ha="center", va="center", fontsize=8,
                         color="white" if abs(cos[i, j]) > 0.6 else "black")
    axes[0].set_title(f"cosine (mean of {len(reps)})", fontsize=9)
    fig.colorbar(im, ax=axes[0], shrink=0.8)

    def band(ax, xs, series, label, style="o-", color=None):
        stats = [_interval([100 * v for v in vals]) for vals in zip(*series)]
        mean, half = np.array([m for m, _ in stats]), np.array([h for _, h in stats])
        line, = ax.plot(xs[:len(mean)], mean, style, ms=3, label=label, color=color)
        ax.fill_between(xs[:len(mean)], np.clip(mean - half, 0, 100), np.clip(mean + half, 0, 100),
                        color=line.get_color(), alpha=0.2, lw=0)
        return line

    for name in names:
        band(axes[1], res["scales"], [r["arithmetic_test"][name] for r in reps], name)
    axes[1].set(xlabel="lambda in base + lambda * sum(tau)", ylabel="test accuracy on the task (%)")
    axes[1].set_title("task arithmetic (addition)", fontsize=9)
    axes[1].legend(fontsize=7)
    if has_negation:
        for name in res["negation"]:
            line = band(axes[2], res["scales"], [r["negation"][name]["target_test"] for r in reps], f"on {name}")
            band(axes[2], res["scales"], [r["negation"][name]["control_test"] for r in reps], "on the others",
                 "s--", line.get_color())
        axes[2].set(xlabel="lambda in base - lambda * tau", ylabel="test accuracy (%)")
        axes[2].set_title("task negation (forget one task)", fontsize=9)
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    return save(fig, out)


def templates_figure(pairs: dict[str, dict], out, title: str) -> Path:
    """Class directions E[dz_c/dx] as images of the input, rows grouped by pair (member, member, average),
    all on one colour scale with its colour bar (``pairs[label]`` is a WeightsResult dict).

    Drawn as one mosaic image (templates separated by blank gaps) rather than one axes per template:
    the same picture at a fraction of the drawing time.
    """
    plt = pyplot()
    rows = [(label, name, res["class_templates"][name]) for label, res in pairs.items() for name in res["names"]]
    n_cls = len(rows[0][2])
    h, w = template_image(rows[0][2][0]).shape
    strip = h == 1
    gap, pair_gap = 1, 2
    heights, y = [], 0
    for i, (label, _, _) in enumerate(rows):
        if i and rows[i - 1][0] != label:
            y += pair_gap
        heights.append(y)
        y += h + gap
    mosaic = np.full((y - gap, n_cls * (w + gap) - gap), np.nan)
    for (label, name, templates), top in zip(rows, heights):
        for c, t in enumerate(templates):
            mosaic[top:top + h, c * (w + gap):c * (w + gap) + w] = template_image(t)
    lim = np.nanmax(np.abs(mosaic)) or 1.0
    fig, ax = plt.subplots(figsize=(min(0.75 * n_cls + 3, 10), (0.3 if strip else 0.72) * len(rows) + 1.2))
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("white")
    im = ax.imshow(mosaic, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto" if strip else "equal",
                   interpolation="nearest")
    ax.set_xticks([c * (w + gap) + (w - 1) / 2 for c in range(n_cls)], [f"class {c}" for c in range(n_cls)],
                  fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([top + (h - 1) / 2 for top in heights], [f"{label}: {name}" for label, name, _ in rows], fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(length=0)
    fig.colorbar(im, ax=ax, shrink=0.7, label="mean input-gradient of the class logit")
    ax.set_title(title, fontsize=10, pad=22)
    return save(fig, out)
