"""Rethink-Merge analysis 3 (arXiv 2411.09263): parameter scaling and prediction stability.

Scale a model's parameters by a factor c near 1 (all at once, or one layer at a time) and
measure, against the unscaled model: accuracy, prediction agreement (share of identical argmax)
and KL(p_unscaled || p_scaled) averaged over examples. Comparing endpoints with their weight
average tests "averaging as regularization": the average has a smaller norm, and a flatter
response means its predictions move less when its weights are scaled.
Only parameters are scaled, never buffers (BatchNorm statistics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..ensemble import as_state, weight_average, run, split_tensors
from .similarity import representation_layers

FACTORS = (0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class ScalingResult:
    """Per model: curves over ``factors`` for global scaling and for each layer scaled alone."""

    factors: tuple[float, ...]
    layers: tuple[str, ...]
    names: tuple[str, ...]
    global_scaling: dict  # name -> {"accuracy": [...], "agreement": [...], "kl": [...]}
    per_layer: dict  # name -> layer -> {"accuracy": [...], "agreement": [...], "kl": [...]}
    norms: dict  # name -> global parameter norm
    split: str

    def to_dict(self) -> dict:
        return {"factors": list(self.factors), "layers": list(self.layers), "names": list(self.names),
                "global": self.global_scaling, "per_layer": self.per_layer, "norms": self.norms, "split": self.split}


def scaled(state: Mapping[str, torch.Tensor], factor: float, names: set[str]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with the tensors in ``names`` multiplied by ``factor``."""
    return {k: v * factor if k in names else v for k, v in state.items()}


def stability(reference_logits: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """accuracy, agreement with the reference argmax, and mean KL(p_ref || p) of logits [N, C]."""
    log_ref, log_p = reference_logits.double().log_softmax(-1), logits.double().log_softmax(-1)
    kl = (log_ref.exp() * (log_ref - log_p)).sum(-1).mean()
    return {"accuracy": (logits.argmax(-1) == y).double().mean().item(),
            "agreement": (logits.argmax(-1) == reference_logits.argmax(-1)).double().mean().item(),
            "kl": kl.item()}


def curve(model: nn.Module, state: Mapping, x: torch.Tensor, y: torch.Tensor, factors: Sequence[float],
          names: set[str]) -> dict[str, list[float]]:
    """Stability metrics for each factor when the tensors ``names`` are scaled."""
    reference = run(model, state, x)
    rows = [stability(reference, run(model, scaled(state, f, names), x), y) for f in factors]
    return {key: [r[key] for r in rows] for key in ("accuracy", "agreement", "kl")}


def layer_parameters(model: nn.Module, layers: Sequence[str]) -> dict[str, set[str]]:
    """Parameter names owned by each layer (prefix match)."""
    params = [n for n, _ in model.named_parameters()]
    return {layer: {p for p in params if p == layer or p.startswith(layer + ".")} for layer in layers}


def analyse(model: nn.Module, states: Mapping[str, Mapping[str, torch.Tensor]], task, factors: Sequence[float] = FACTORS,
            layers: Sequence[str] | None = None, split: str = "test", include_average: bool = True) -> ScalingResult:
    """Scaling curves for named ``states`` and (by default) their uniform weight average."""
    named = {k: as_state(v) for k, v in states.items()}
    if include_average and len(named) > 1:
        named["average"] = weight_average(model, list(named.values()), task)
    x, y = split_tensors(task, split)
    layers = tuple(layers or representation_layers(model))
    owned = layer_parameters(model, layers)
    all_params = {n for n, _ in model.named_parameters()}
    global_curves = {k: curve(model, s, x, y, factors, all_params) for k, s in named.items()}
    per_layer = {k: {layer: curve(model, s, x, y, factors, owned[layer]) for layer in layers if owned[layer]}
                 for k, s in named.items()}
    norms = {k: float(torch.sqrt(sum(s[n].double().pow(2).sum() for n in all_params))) for k, s in named.items()}
    return ScalingResult(tuple(float(f) for f in factors), tuple(l for l in layers if owned[l]), tuple(named),
                         global_curves, per_layer, norms, split)


def plot(result: dict, path) -> None:
    """Global-scaling KL and accuracy per model, and per-layer KL at the largest factor, from saved JSON.

    Drawn by ``mergescope.report.analysis_figures.plot_scaling`` (figures live in ``report/``)."""
    from ..report.analysis_figures import plot_scaling

    plot_scaling(result, path)
