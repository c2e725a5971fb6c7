"""Rethink-Merge analysis 1 (arXiv 2411.09263): what weights encode, and what averaging does to it.

For 8x8 digits, weights live in image space, so they can be looked at (any other input is drawn
as a 1 x L strip, e.g. an MNIST-1D signal of length 40):

- *Unit templates*: rows of the first Linear layer (when it reads the raw inputs) as images.
- *Class directions*: d_c = E_x[d z_c / d x], the mean input-gradient of each class logit over a
  split, as an 8x8 image (for a linear model this is exactly the class's weight row; it works for
  any architecture).

shown for every endpoint and for their weight average. Per-layer statistics: Frobenius norm,
effective rank exp(H(s / sum s)) of the singular values s (Roy & Vetterli 2007), the top of the
spectrum, and the relative distance ||W - W_avg|| / ||W_avg|| to the average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..ensemble import as_state, weight_average, split_tensors

SPECTRUM_TOP = 16
UNITS_SHOWN = 12


@dataclass(frozen=True)
class WeightsResult:
    """Templates (64-vectors, reshape to 8x8) and per-layer statistics for each model and the average."""

    names: tuple[str, ...]
    class_templates: dict  # name -> [classes][64]
    unit_templates: dict | None  # name -> [units][64], or None when no Linear reads the raw pixels
    unit_layer: str | None
    stats: dict  # name -> layer -> {"norm", "effective_rank", "spectrum", "distance_to_average"}

    def to_dict(self) -> dict:
        return {"names": list(self.names), "class_templates": self.class_templates,
                "unit_templates": self.unit_templates, "unit_layer": self.unit_layer, "stats": self.stats}


def effective_rank(matrix: torch.Tensor) -> float:
    """exp of the entropy of the normalized singular values (Roy & Vetterli 2007)."""
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def layer_statistics(state: Mapping[str, torch.Tensor], average: Mapping[str, torch.Tensor]) -> dict:
    """Per weight tensor (2+ dims, as out x rest): norm, effective rank, spectrum top, distance to average."""
    stats = {}
    for name, w in state.items():
        if w.dim() < 2 or not torch.is_floating_point(w):
            continue
        m = w.detach().reshape(w.shape[0], -1).double()
        avg = average[name].reshape(m.shape).double()
        stats[name] = {
            "norm": float(torch.linalg.matrix_norm(m)),
            "effective_rank": effective_rank(m),
            "spectrum": torch.linalg.svdvals(m)[:SPECTRUM_TOP].tolist(),
            "distance_to_average": float(torch.linalg.matrix_norm(m - avg) / torch.linalg.matrix_norm(avg).clamp_min(1e-30)),
        }
    return stats


def class_directions(model: nn.Module, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """[classes, input] mean gradient of each class logit with respect to the input (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        x = x.clone().requires_grad_(True)
        with torch.enable_grad():
            logits = functional_call(model, dict(state), (x,), strict=False)
            rows = [torch.autograd.grad(logits[:, c].sum(), x, retain_graph=True)[0].mean(0)
                    for c in range(logits.shape[1])]
    finally:
        model.train(was_training)
    return torch.stack(rows).detach()


def pixel_layer(model: nn.Module, n_inputs: int) -> str | None:
    """The first Linear layer that reads all ``n_inputs`` raw inputs (its rows are pixel templates)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return name if m.in_features == n_inputs else None
    return None


def analyse(model: nn.Module, states: Mapping[str, Mapping[str, torch.Tensor]], task, split: str = "test",
            units: Sequence[int] | None = None) -> WeightsResult:
    """Templates and statistics for named ``states`` plus their uniform weight average ("average")."""
    named = {k: as_state(v) for k, v in states.items()}
    named["average"] = weight_average(model, list(named.values()), task)
    x, _ = split_tensors(task, split)
    classes = {k: class_directions(model, s, x).tolist() for k, s in named.items()}
    layer = pixel_layer(model, x.shape[1])
    unit_templates = None
    if layer is not None:
        idx = list(units) if units is not None else list(range(min(UNITS_SHOWN, named["average"][f"{layer}.weight"].shape[0])))
        unit_templates = {k: s[f"{layer}.weight"][idx].tolist() for k, s in named.items()}
    stats = {k: layer_statistics(s, named["average"]) for k, s in named.items()}
    return WeightsResult(tuple(named), classes, unit_templates, layer, stats)


def template_image(values):
    """A template as an image: square inputs (8x8 digits) as a square, any other input as a 1 x L strip."""
    import math

    import numpy as np

    flat = np.asarray(values, dtype=float).reshape(-1)
    side = math.isqrt(flat.size)
    return flat.reshape(side, side) if side * side == flat.size else flat.reshape(1, -1)


def plot(result: dict, path, title: str | None = None) -> None:
    """Class directions and unit templates as images (rows: models, one colour scale per kind with its
    colour bar), and per-layer norms and effective ranks, all read from a saved ``WeightsResult.to_dict()``."""
    from ..report.figures import pyplot, save

    plt = pyplot()
    import numpy as np

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
    bar = fig.colorbar(images["class"], cax=fig.add_subplot(grid[:len(names), cols]))
    bar.set_label("class directions dz_c/dx", fontsize=7)
    top = 1.0 - 0.1 / (row_h * len(names) + 3.8)
    fig.text(0.45 * n_cls / (cols + 0.25), top, "class directions E[dz_c/dx] (shared colour scale)", ha="center",
             fontsize=9)
    if n_units:
        fig.text((n_cls + 1 + 0.5 * n_units) / (cols + 0.25), top,
                 f"first-layer units ({result['unit_layer']}; each on its own symmetric scale)",
                 ha="center", fontsize=9)
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
    if title:
        fig.suptitle(title, y=1.02)
    save(fig, path)
