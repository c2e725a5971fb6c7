"""Figures of the analyses (``mergescope.analysis``), drawn from a saved result's ``to_dict()`` alone.

One function per analysis; each takes the result dict and an output path. The analysis modules keep a
thin ``plot`` that calls these (``analysis.scaling.plot`` is ``plot_scaling`` here), so the figures are
drawn only in ``report/`` and nothing else imports matplotlib.
"""

from __future__ import annotations

import numpy as np

from .figures import pyplot, save, template_image


def plot_weights(result: dict, path, title: str | None = None) -> None:
    """Class directions and unit templates as images (rows: models, one colour scale per kind with its
    colour bar), and per-layer norms and effective ranks, all read from a saved ``WeightsResult.to_dict()``."""
    plt = pyplot()
    names = result["names"]
    units = result["unit_templates"]
    n_cls = len(result["class_templates"][names[0]])
    n_units = len(units[names[0]]) if units else 0
    cols = n_cls + (n_units + 1 if n_units else 0)
    strip = template_image(result["class_templates"][names[0]][0]).shape[0] == 1
    row_h = 0.45 if strip else 0.95
    fig = plt.figure(figsize=(0.8 * cols + 2.2, row_h * len(names) + 3.8))
    grid = fig.add_gridspec(len(names) + 1, cols + 1, height_ratios=[row_h] * len(names) + [3.0],
                            width_ratios=[1] * cols + [0.25], hspace=0.45, wspace=0.08)
    images = _template_rows(fig, grid, result, n_cls, n_units, strip)
    bar = fig.colorbar(images["class"], cax=fig.add_subplot(grid[:len(names), cols]))
    bar.set_label("class directions dz_c/dx", fontsize=7)
    top = 1.0 - 0.1 / (row_h * len(names) + 3.8)
    fig.text(0.45 * n_cls / (cols + 0.25), top, "class directions E[dz_c/dx] (shared colour scale)", ha="center",
             fontsize=9)
    if n_units:
        fig.text((n_cls + 1 + 0.5 * n_units) / (cols + 0.25), top,
                 f"first-layer units ({result['unit_layer']}; each on its own symmetric scale)",
                 ha="center", fontsize=9)
    _layer_bars(fig, grid, result, cols)
    if title:
        fig.suptitle(title, y=1.02)
    save(fig, path)


def _template_rows(fig, grid, result: dict, n_cls: int, n_units: int, strip: bool) -> dict:
    """One row of template images per model (class directions on one shared scale, then units each on
    its own); returns the last image of each kind, for the colour bar."""
    names, units = result["names"], result["unit_templates"]
    scales = {"class": max(np.abs(np.asarray(result["class_templates"][n])).max() for n in names) or 1.0}
    images = {}
    for r, name in enumerate(names):
        blocks = [("class", result["class_templates"][name], 0)]
        if n_units:
            blocks.append(("unit", units[name], n_cls + 1))
        for kind, templates, start in blocks:
            for c, t in enumerate(templates):
                ax = fig.add_subplot(grid[r, start + c])
                lim = scales[kind] if kind == "class" else (np.abs(np.asarray(t)).max() or 1.0)  # units: own scale
                images[kind] = ax.imshow(template_image(t), cmap="RdBu_r", vmin=-lim, vmax=lim,
                                         aspect="auto" if strip else "equal")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"class {c}" if kind == "class" else f"unit {c}", fontsize=7)
                if c == 0 and kind == "class":
                    ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center", fontweight="bold")
    return images


def _layer_bars(fig, grid, result: dict, cols: int) -> None:
    """Bottom row: per-layer norm and effective rank of every model, as grouped bars."""
    names = result["names"]
    layers = list(result["stats"][names[0]])
    for j, key in enumerate(("norm", "effective_rank")):
        half = (cols + 1) // 2
        ax = fig.add_subplot(grid[len(names), j * half:(j + 1) * half - 1 if j == 0 else cols])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar(np.arange(len(layers)) + i * width, [result["stats"][name][l][key] for l in layers], width, label=name)
        ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, [l.removesuffix(".weight") for l in layers],
                      rotation=40, ha="right", fontsize=7)
        ax.set_title(key.replace("_", " "), fontsize=9)
        if j == 0:
            ax.legend(fontsize=7)


def plot_spaces(result: dict, path) -> None:
    """One panel per family: accuracy vs number of models for each space, from saved JSON."""
    plt = pyplot()
    families = result["families"]
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False, sharey=True)
    styles = {"weight_average": "o-", "features": "s-", "probs": "^-", "logits": "v--", "best_member": "k:"}
    for ax, (family, curves) in zip(axes[0], families.items()):
        for space, style in styles.items():
            ax.plot(result["sizes"], curves[space], style, ms=4, label=space.replace("_", " "))
        ax.set_xticks(result["sizes"])
        ax.set_title(f"{result['model']}: {family}")
        ax.set_xlabel("models merged")
    axes[0][0].set_ylabel(f"{result['split']} accuracy")
    axes[0][0].legend(fontsize=7)
    save(fig, path)


def plot_scaling(result: dict, path) -> None:
    """Global-scaling KL and accuracy per model, and per-layer KL at the largest factor, from saved JSON."""
    plt = pyplot()
    f, names, layers = result["factors"], result["names"], result["layers"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in names:
        style = dict(lw=2.4, color="black") if name == "average" else dict(lw=1.2)
        label = f"{name} (|theta|={result['norms'][name]:.1f})"
        kl = np.asarray(result["global"][name]["kl"], dtype=float)
        axes[0].plot(f, np.where(kl > 0, kl, np.nan), "o-", ms=3, label=label, **style)  # log axis: KL(c=1)=0 left out
        axes[1].plot(f, result["global"][name]["accuracy"], "o-", ms=3, label=name, **style)
    axes[0].set_yscale("log")
    axes[0].set_title("KL(p_1 || p_c), all parameters x c")
    axes[1].set_title(f"{result['split']} accuracy, all parameters x c")
    for ax in axes[:2]:
        ax.set_xlabel("scale factor c")
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    last = int(np.argmax(f))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        kl = [result["per_layer"][name][l]["kl"][last] for l in layers]
        axes[2].bar(np.arange(len(layers)) + i * width, kl, width, label=name)
    axes[2].set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers, rotation=35, ha="right", fontsize=7)
    axes[2].set_title(f"KL with one layer x {f[last]}")
    axes[2].legend(fontsize=7)
    save(fig, path)


def plot_stitching(result: dict, path) -> None:
    """Accuracy of the stitched network per layer (identity and trained map) from a saved result."""
    plt = pyplot()
    layers = result["layers"]
    pos = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(layers) + 2), 3.4))
    ax.plot(pos, result["stitched_accuracy"], "o-", label="trained stitch")
    ax.plot(pos, result["identity_accuracy"], "s--", label="identity stitch (untrained)")
    ax.axhline(result["accuracy_b"], color="gray", lw=1, ls=":", label="model B alone")
    ax.set_xticks(list(pos), layers, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"{result['split']} accuracy")
    ax.set_title("stitching A[:l] -> affine -> B[l+1:]")
    ax.legend(fontsize=8)
    save(fig, path)


def plot_similarity(result: dict, path) -> None:
    """CKA heatmap and unit-wise correlation (before/after alignment) from a saved ``CKAResult.to_dict()``."""
    plt = pyplot()
    layers = result["layers"]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    im = ax.imshow(result["cka"], vmin=0, vmax=1, cmap="magma")
    ax.set_title("linear CKA (invariant to unit order)")
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xlabel("model B layer")
    ax.set_ylabel("model A layer")
    fig.colorbar(im, ax=ax, shrink=0.8)
    pos = np.arange(len(layers))
    series = [("CKA, matching layers", np.diag(result["cka"])), ("unit correlation", result["unit_correlation"])]
    if result["aligned_unit_correlation"] is not None:
        series.append(("unit correlation, B aligned", result["aligned_unit_correlation"]))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        bars.bar(pos + i * width, values, width, label=label)
    bars.set_xticks(pos + 0.4 - width / 2, layers, rotation=40, ha="right", fontsize=7)
    bars.set_ylim(min(0.0, *[min(v) for _, v in series]), 1.3)
    bars.set_title("layer-wise agreement of A and B")
    bars.legend(fontsize=7, loc="upper center", ncol=2)
    save(fig, path)


def plot_backdoor(result: dict, path, title: str | None = None) -> None:
    """Clean accuracy and attack success rate of every member and merge, from a saved
    ``analysis.backdoor.PersistenceResult.to_dict()`` (the clean target rate as a tick: the ASR's floor)."""
    plt = pyplot()
    rows = [(f"member {n}", v) for n, v in result["members"].items()] + list(result["merges"].items())
    pos = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) + 2), 3.6))
    ax.bar(pos - 0.2, [v["accuracy"] for _, v in rows], 0.4, label="clean accuracy")
    ax.bar(pos + 0.2, [v["asr"] for _, v in rows], 0.4, label="attack success rate")
    ax.plot(pos + 0.2, [v["clean_target_rate"] for _, v in rows], "k_", ms=14, label="target rate without trigger")
    ax.axvline(len(result["members"]) - 0.5, color="gray", lw=1, ls=":")
    ax.set_xticks(list(pos), [n for n, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{result['split']} rate")
    ax.set_title(title or f"backdoor persistence ({result['trigger']['kind']} trigger, target {result['target']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save(fig, path)
