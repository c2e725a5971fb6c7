"""Representation similarity: linear CKA between every pair of layers of two models.

Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited"):
for centered features X [n, p] and Y [n, q],

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),

invariant to orthogonal transforms and isotropic scaling of either side, so in particular to a
permutation of units: two models that differ only by a relabelling of neurons have CKA 1 at
matching layers, and neuron alignment leaves it unchanged. What alignment changes is the
*unit-wise* agreement: the mean correlation of unit j of A with unit j of B (channels of feature
maps and token features count spatial positions/tokens as samples). High CKA with low unit
correlation means the same features in a different order; alignment then raises the latter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..ensemble import as_state, run, split_tensors


@dataclass(frozen=True)
class CKAResult:
    """CKA[i][j] between layer i of model A and layer j of model B, and unit-wise correlation of
    matching layers (``aligned*``: with B after alignment, when given)."""

    layers: tuple[str, ...]
    cka: tuple[tuple[float, ...], ...]
    aligned: tuple[tuple[float, ...], ...] | None
    unit_correlation: tuple[float, ...]
    aligned_unit_correlation: tuple[float, ...] | None
    split: str
    n_examples: int

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "cka": [list(r) for r in self.cka],
                "aligned": None if self.aligned is None else [list(r) for r in self.aligned],
                "unit_correlation": list(self.unit_correlation),
                "aligned_unit_correlation": None if self.aligned_unit_correlation is None
                else list(self.aligned_unit_correlation),
                "split": self.split, "n_examples": self.n_examples}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two feature matrices with the same rows (examples); computed in float64.

    Uses the feature form ||Y^T X||^2 / (||X^T X|| ||Y^T Y||) when features are few, else the equal
    example-Gram form <K_x, K_y> / (||K_x|| ||K_y||) with K = X X^T (cheaper when p, q > n).
    """
    x = x.flatten(1).double()
    y = y.flatten(1).double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if x.shape[1] * y.shape[1] <= x.shape[0] ** 2:
        cross = (y.T @ x).pow(2).sum()
        denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    else:
        kx, ky = x @ x.T, y @ y.T
        cross = (kx * ky).sum()
        denom = torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky)
    return float(cross / denom) if denom > 0 else 0.0


def representation_layers(model: nn.Module) -> list[str]:
    """Layers whose outputs are the model's successive representations: the top-level children,
    with ModuleLists (and Sequentials of blocks) expanded one level; e.g. MLP layers.0, layers.1,
    head; ResNet stem, stage1.0, ..., head; TinyViT embed, blocks.0, blocks.1, norm, head."""
    names = []
    for name, child in model.named_children():
        blocks = list(child.named_children())
        expand = isinstance(child, nn.ModuleList) or (
            isinstance(child, nn.Sequential) and any(len(list(c.children())) for _, c in blocks))
        names.extend(f"{name}.{sub}" for sub, _ in blocks) if expand else names.append(name)
    return names


@torch.no_grad()
def layer_outputs(model: nn.Module, state: Mapping[str, torch.Tensor], x: torch.Tensor,
                  layers: Sequence[str], flatten: bool = True) -> dict[str, torch.Tensor]:
    """Each named module's output for ``x`` under ``state`` (flattened per example unless told)."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: captured.__setitem__(n, out.detach()))
               for n in layers]
    try:
        run(model, state, x)
    finally:
        for h in handles:
            h.remove()
    return {n: captured[n].flatten(1) if flatten else captured[n] for n in layers}


def normalized_gram(features: torch.Tensor) -> torch.Tensor:
    """K / ||K||_F for the centered example Gram K = X X^T (so CKA(X, Y) = <K_x, K_y>_F)."""
    x = features.flatten(1).double()
    x = x - x.mean(0, keepdim=True)
    k = x @ x.T
    norm = torch.linalg.matrix_norm(k)
    return k / norm if norm > 0 else k


def cka_matrix(model: nn.Module, state_a: Mapping, state_b: Mapping, x: torch.Tensor,
               layers: Sequence[str]) -> tuple[tuple[float, ...], ...]:
    """CKA between every layer of A and every layer of B on inputs ``x`` (Gram form, each Gram once)."""
    ka = [normalized_gram(f) for f in layer_outputs(model, state_a, x, layers).values()]
    kb = [normalized_gram(f) for f in layer_outputs(model, state_b, x, layers).values()]
    return tuple(tuple(float((gi * gj).sum()) for gj in kb) for gi in ka)


def units_as_columns(features: torch.Tensor) -> torch.Tensor:
    """[samples, units]: channels of [N, C, H, W] and features of [N, T, D] with positions as samples."""
    if features.dim() == 4:
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    return features.reshape(-1, features.shape[-1])


def matched_unit_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over units j of corr(a[:, j], b[:, j]); units constant in either model are skipped."""
    a, b = units_as_columns(a).double(), units_as_columns(b).double()
    a, b = a - a.mean(0), b - b.mean(0)
    sa, sb = a.norm(dim=0), b.norm(dim=0)
    keep = (sa > 1e-12) & (sb > 1e-12)
    if not keep.any():
        return 0.0
    return float(((a * b).sum(0)[keep] / (sa * sb)[keep]).mean())


def unit_correlations(model: nn.Module, state_a: Mapping, state_b: Mapping, x: torch.Tensor,
                      layers: Sequence[str]) -> tuple[float, ...]:
    fa = layer_outputs(model, state_a, x, layers, flatten=False)
    fb = layer_outputs(model, state_b, x, layers, flatten=False)
    return tuple(matched_unit_correlation(fa[n], fb[n]) for n in layers)


def compare(model: nn.Module, state_a: Mapping, state_b: Mapping, task, split: str = "test",
            layers: Sequence[str] | None = None, state_b_aligned: Mapping | None = None,
            n_examples: int | None = None) -> CKAResult:
    """Layer-by-layer CKA heatmap and unit-wise correlation of two models, and of A against
    aligned B when given."""
    x, _ = split_tensors(task, split)
    x = x[:n_examples] if n_examples else x
    layers = tuple(layers or representation_layers(model))
    a, b = as_state(state_a), as_state(state_b)
    aligned = aligned_units = None
    if state_b_aligned is not None:
        b_aligned = as_state(state_b_aligned)
        aligned = cka_matrix(model, a, b_aligned, x, layers)
        aligned_units = unit_correlations(model, a, b_aligned, x, layers)
    return CKAResult(layers, cka_matrix(model, a, b, x, layers), aligned, unit_correlations(model, a, b, x, layers),
                     aligned_units, split, len(x))


def plot(result: dict, path) -> None:
    """CKA heatmap and unit-wise correlation (before/after alignment) from a saved ``CKAResult.to_dict()``.

    Drawn by ``mergescope.report.analysis_figures.plot_similarity`` (figures live in ``report/``)."""
    from ..report.analysis_figures import plot_similarity

    plot_similarity(result, path)
