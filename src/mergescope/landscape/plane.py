"""2-D slices of the loss landscape: random filter-normalized planes and planes through three models.

``plane``: theta(a, b) = theta* + a d1 + b d2 with Gaussian directions rescaled filter by filter to
the norms of the weights' filters (Li et al. 2018, "Visualizing the Loss Landscape of Neural
Nets"), so that scale-invariant networks are compared fairly. ``plane_through``: the plane
spanned by three states A, B, C with an orthonormal basis from Gram-Schmidt (Garipov et al. 2018,
Fig. 1). Grid points are built chunk by chunk and evaluated with functional_call (vmap on GPU),
never one model copy per point; ``vectorize`` overrides the choice (see ``evaluation``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import MergescopeError
from .evaluation import Stack, as_state, evaluate_lazy

Direction = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PlaneResult:
    """Loss and accuracy on a grid: ``loss[i][j]`` is at (alphas[i], betas[j]).

    ``anchors`` names the states lying in the plane with their (alpha, beta) coordinates.
    """

    kind: str
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    loss: tuple[tuple[float, ...], ...]
    accuracy: tuple[tuple[float, ...], ...]
    split: str
    bn_reset: bool
    anchors: tuple[tuple[str, float, float], ...] = ()

    def to_dict(self) -> dict:
        return {"kind": self.kind, "split": self.split, "bn_reset": self.bn_reset, "alphas": list(self.alphas),
                "betas": list(self.betas), "loss": [list(r) for r in self.loss],
                "accuracy": [list(r) for r in self.accuracy],
                "anchors": [{"name": n, "alpha": a, "beta": b} for n, a, b in self.anchors]}


def filter_normalized_direction(model: nn.Module, state: Mapping[str, torch.Tensor], generator: torch.Generator
                                ) -> Direction:
    """A Gaussian direction with each filter scaled to the norm of the matching filter of ``state``.

    A filter is a slice along the first (output) axis of a weight with >= 2 dims (a conv filter or
    a Linear row). Biases, norm-layer parameters and buffers get a zero direction, as in Li et al.
    """
    params = dict(model.named_parameters())
    direction = {}
    for k, w in state.items():
        if k not in params or w.dim() < 2:
            direction[k] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype)
        d_norm = d.reshape(len(d), -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
        w_norm = w.reshape(len(w), -1).norm(dim=1).reshape(-1, *([1] * (w.dim() - 1)))
        direction[k] = d * w_norm / (d_norm + 1e-10)
    return direction


def grid_axis(grid: int, low: float, high: float) -> np.ndarray:
    if grid < 2:
        raise MergescopeError(f"grid={grid}: a plane needs at least 2 points per axis")
    return np.linspace(low, high, grid)


def plane_chunks(origin: Mapping[str, torch.Tensor], d1: Direction, d2: Direction, alphas: np.ndarray,
                 betas: np.ndarray) -> Callable[[int, int], Stack]:
    """Builder of grid points [lo, hi) in row-major (alpha, beta) order: origin + a d1 + b d2."""
    a_all = torch.as_tensor(np.repeat(alphas, len(betas)), dtype=torch.float32)
    b_all = torch.as_tensor(np.tile(betas, len(alphas)), dtype=torch.float32)

    def make(lo: int, hi: int) -> Stack:
        a, b = a_all[lo:hi], b_all[lo:hi]
        out = {}
        for k, w in origin.items():
            shape = (-1, *([1] * w.dim()))
            out[k] = w[None] + a.reshape(shape) * d1[k][None] + b.reshape(shape) * d2[k][None]
        return out

    return make


def _evaluate_grid(model, origin, d1, d2, alphas, betas, task, split, bn_reset, chunk_size, on_chunk, vectorize=None):
    total = len(alphas) * len(betas)
    metrics = evaluate_lazy(model, total, plane_chunks(origin, d1, d2, alphas, betas), task, (split,), bn_reset,
                            chunk_size, on_chunk=on_chunk, vectorize=vectorize)[split]
    shape = (len(alphas), len(betas))
    to_rows = lambda v: tuple(tuple(map(float, r)) for r in v.reshape(shape))  # noqa: E731
    return to_rows(metrics.loss), to_rows(metrics.accuracy)


def plane(model: nn.Module, state: Mapping[str, torch.Tensor], task, grid: int = 25, span: float = 1.0, seed: int = 0,
          split: str = "train", bn_reset: bool = True, directions: tuple[Direction, Direction] | None = None,
          chunk_size: int = 32, on_chunk: Callable | None = None, vectorize: bool | None = None) -> PlaneResult:
    """Loss/accuracy on a grid x grid slice theta + a d1 + b d2, a, b in [-span, span] (Li et al. 2018).

    Directions are filter-normalized Gaussians drawn from ``seed`` unless given. Reported on the
    train split by default (the landscape of the training objective, as in Li et al.).
    """
    origin = as_state(model, state)
    if directions is None:
        g = torch.Generator().manual_seed(seed)
        directions = (filter_normalized_direction(model, origin, g), filter_normalized_direction(model, origin, g))
    d1, d2 = ({k: d[k].float() for k in origin} for d in directions)
    axis = grid_axis(grid, -span, span)
    loss, acc = _evaluate_grid(model, origin, d1, d2, axis, axis, task, split, bn_reset, chunk_size, on_chunk,
                               vectorize)
    return PlaneResult("filter-normalized", tuple(map(float, axis)), tuple(map(float, axis)), loss, acc, split,
                       bn_reset, (("center", 0.0, 0.0),))


def _flat_dot(a: Mapping, b: Mapping) -> float:
    return float(sum((a[k].double() * b[k].double()).sum() for k in a))


def orthonormal_basis(a: Mapping, b: Mapping, c: Mapping) -> tuple[Direction, Direction, list[tuple[float, float]]]:
    """Gram-Schmidt basis (e1, e2) of the plane through a, b, c and the three points' coordinates."""
    u = {k: b[k] - a[k] for k in a}
    w = {k: c[k] - a[k] for k in a}
    u_norm = _flat_dot(u, u) ** 0.5
    if u_norm == 0:
        raise MergescopeError("plane through three models: the first two states are identical")
    e1 = {k: v / u_norm for k, v in u.items()}
    c1 = _flat_dot(w, e1)
    v = {k: w[k] - c1 * e1[k] for k in w}
    v_norm = _flat_dot(v, v) ** 0.5
    if v_norm < 1e-5 * u_norm:  # float32 round-off level
        raise MergescopeError("plane through three models: the three states are collinear")
    e2 = {k: t / v_norm for k, t in v.items()}
    return e1, e2, [(0.0, 0.0), (u_norm, 0.0), (c1, v_norm)]


def plane_through(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], task, grid: int = 25,
                  margin: float = 0.25, names: Sequence[str] = ("A", "B", "C"), split: str = "test",
                  bn_reset: bool = True, chunk_size: int = 32, on_chunk: Callable | None = None) -> PlaneResult:
    """Loss/accuracy on the plane through three states (e.g. A, B and a curve midpoint or a merge).

    Coordinates are Euclidean distances in weight space along the Gram-Schmidt axes from A; the
    grid covers the three points plus ``margin`` of their extent on each side.
    """
    if len(states) != 3:
        raise MergescopeError(f"plane through models: need exactly 3 states, got {len(states)}")
    a, b, c = (as_state(model, s, n) for s, n in zip(states, names))
    e1, e2, coords = orthonormal_basis(a, b, c)
    xs, ys = np.array([p[0] for p in coords]), np.array([p[1] for p in coords])
    pad_x, pad_y = margin * np.ptp(xs), margin * max(np.ptp(ys), 1e-12)
    alphas = grid_axis(grid, xs.min() - pad_x, xs.max() + pad_x)
    betas = grid_axis(grid, ys.min() - pad_y, ys.max() + pad_y)
    loss, acc = _evaluate_grid(model, a, e1, e2, alphas, betas, task, split, bn_reset, chunk_size, on_chunk)
    anchors = tuple((n, float(x), float(y)) for n, (x, y) in zip(names, coords))
    return PlaneResult("three-model", tuple(map(float, alphas)), tuple(map(float, betas)), loss, acc, split, bn_reset,
                       anchors)
