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


def plot(result: dict, path, title: str | None = None) -> None:
    """Class directions and unit templates as images (rows: models, one colour scale per kind with its
    colour bar), and per-layer norms and effective ranks, all read from a saved ``WeightsResult.to_dict()``.

    Drawn by ``mergescope.report.analysis_figures.plot_weights`` (figures live in ``report/``)."""
    from ..report.analysis_figures import plot_weights

    plot_weights(result, path, title)
