"""Merge methods that work on the singular vectors of each layer's task matrices (2024-2025).

- TSV-M (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model
  Merging", arXiv:2412.00081): keep each task matrix's top ``r // T`` singular triplets, concatenate
  the left and the right singular vectors of all tasks, replace each concatenation by its nearest
  orthogonal matrix (polar factor, Procrustes), and sum: ``alpha * U_perp diag(S) V_perp^T``.
  Orthogonal task subspaces stop interfering with one another.
- Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", arXiv:2502.04959): the task-arithmetic sum ``M = sum_i tau_i`` with every
  singular value replaced by their mean: ``alpha * U mean(S) V^T`` (a flat spectrum, so no task's
  directions dominate).
- Iso-CTS (same paper): the top ``common_space_fraction`` of ``M``'s singular directions (the common
  subspace) plus, per task, the top directions of its matrix projected off the common subspace;
  both sides orthogonalised as in TSV-M, then the isotropic (mean) spectrum as in Iso-C.

Every function takes the fine-tuned tensors of one parameter and the base's tensor (task matrices
``tau_i = theta_i - base``). A tensor that is not 2-D (biases, norms) or whose rank is too small to
split between the tasks is merged as FusionBench 0.2.33 does it: the mean task vector, scaled by
``alpha`` (task arithmetic with weights ``1/T``). SVDs run in float64 for float64 inputs, else float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MergescopeError
from .methods import REGISTRY, Method, Param, _check_same_shape, _work_dtype

Tensor = torch.Tensor


def task_matrices(tensors: Sequence[Tensor], base: Tensor, weight: Sequence[float] | None = None) -> list[Tensor]:
    """``w_i * (theta_i - base)`` in the working dtype (float64 stays float64)."""
    if base is None:
        raise MergescopeError("SVD merge methods need a base model (the task matrices are theta_i - base)")
    if not tensors:
        raise MergescopeError("SVD merge methods need at least one fine-tuned model")
    _check_same_shape(tensors, base)
    dtype = _work_dtype(base)
    weight = [1.0] * len(tensors) if weight is None else list(weight)
    if len(weight) != len(tensors):
        raise MergescopeError(f"{len(weight)} weights for {len(tensors)} models")
    return [float(w) * (t.to(dtype) - base.to(dtype)) for t, w in zip(tensors, weight)]


def _finish(base: Tensor, delta: Tensor, alpha: float) -> Tensor:
    return (base.to(delta.dtype) + alpha * delta).to(base.dtype)


def _mean_fallback(base: Tensor, taus: list[Tensor], alpha: float) -> Tensor:
    """Non-matrix tensors: the mean task vector, scaled (FusionBench's rule for all three methods)."""
    return _finish(base, torch.stack(taus).mean(0), alpha)


def svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD; a non-finite matrix (weights or inputs near the float limit) is a one-line error, not LAPACK's."""
    if not bool(torch.isfinite(a).all()):
        raise MergescopeError("SVD merge: a task matrix is not finite (inputs or weights beyond the float range)")
    return torch.linalg.svd(a, full_matrices=False)


def polar(a: Tensor) -> Tensor:
    """The orthogonal matrix nearest to ``a`` in Frobenius norm (Procrustes): ``P Q^T`` for ``a = P S Q^T``."""
    p, _, qh = svd(a)
    return p @ qh


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not torch.isfinite(torch.tensor(alpha)):
        raise MergescopeError(f"alpha must be a finite number, got {alpha}")
    return alpha


def tsv_merge_delta(taus: list[Tensor]) -> Tensor:
    """TSV-M of 2-D task matrices with ``min(shape) >= len(taus)`` (the merged task matrix, unscaled)."""
    k = min(taus[0].shape) // len(taus)
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = svd(tau)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    u_perp = polar(torch.cat(us, dim=1))
    vh_perp = polar(torch.cat(vhs, dim=0))
    return u_perp @ torch.diag(torch.cat(ss)) @ vh_perp


def tsv(tensors: Sequence[Tensor], base: Tensor, *, weight: Sequence[float] | None = None, alpha: float = 1.0,
        **_) -> Tensor:
    """TSV-M (arXiv:2412.00081): per-task top singular triplets, orthogonalised, summed; times ``alpha``.

    ``weight`` scales each task matrix before its SVD (FusionBench's list-valued alpha).
    """
    alpha = _check_alpha(alpha)
    taus = task_matrices(tensors, base, weight)
    if base.dim() != 2 or min(base.shape) < len(taus):
        return _mean_fallback(base, taus, alpha)
    return _finish(base, tsv_merge_delta(taus), alpha)


def iso_c(tensors: Sequence[Tensor], base: Tensor, *, alpha: float = 1.0, **_) -> Tensor:
    """Iso-C (arXiv:2502.04959): the summed task matrix with a flat spectrum (every singular value the mean)."""
    alpha = _check_alpha(alpha)
    taus = task_matrices(tensors, base)
    if base.dim() != 2:
        return _mean_fallback(base, taus, alpha)
    u, s, vh = svd(torch.stack(taus).sum(0))
    return _finish(base, (u * s.mean()) @ vh, alpha)


def cts_split(rank: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(common dims, dims per task) as FusionBench splits ``rank``: the task-specific total is a multiple of
    the task count (rounded), the common subspace takes the rest."""
    common = int(rank * fraction)
    per_task = round((rank - common) / n_tasks)
    if per_task * n_tasks > rank:  # rounding up past the rank (tiny matrices): fewer per task
        per_task = rank // n_tasks
    return rank - per_task * n_tasks, per_task


def iso_cts_delta(taus: list[Tensor], fraction: float) -> Tensor:
    """Iso-CTS of 2-D task matrices (the merged task matrix, unscaled)."""
    common, per_task = cts_split(min(taus[0].shape), len(taus), fraction)
    u, s, vh = svd(torch.stack(taus).sum(0))
    uc = u[:, :common]
    us, ss, vhs = [], [], []
    for tau in taus:
        ut, st, vht = svd(tau - uc @ (uc.T @ tau))
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    u_all = polar(torch.cat([*us, uc], dim=1))
    vh_all = polar(torch.cat([*vhs, vh[:common]], dim=0))
    level = torch.cat([*ss, s[:common]]).mean()
    return (u_all * level) @ vh_all


def iso_cts(tensors: Sequence[Tensor], base: Tensor, *, alpha: float = 1.0, common_space_fraction: float = 0.8,
            **_) -> Tensor:
    """Iso-CTS (arXiv:2502.04959): common subspace of the summed task matrix + each task's own top directions,
    orthogonalised, with the isotropic spectrum; ``common_space_fraction`` = 1 is Iso-C."""
    alpha = _check_alpha(alpha)
    fraction = float(common_space_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise MergescopeError(f"iso_cts: common_space_fraction must be in [0, 1], got {fraction}")
    taus = task_matrices(tensors, base)
    if base.dim() != 2:
        return _mean_fallback(base, taus, alpha)
    return _finish(base, iso_cts_delta(taus, fraction), alpha)


SVD_METHODS: tuple[Method, ...] = (
    Method("tsv", tsv, "required", (Param("weight", float, "non_base", 1.0), Param("alpha", float, default=1.0)),
           reference="arXiv:2412.00081"),
    Method("iso_c", iso_c, "required", (Param("alpha", float, default=1.0),), reference="arXiv:2502.04959"),
    Method("iso_cts", iso_cts, "required", (Param("alpha", float, default=1.0),
                                            Param("common_space_fraction", float, default=0.8)),
           reference="arXiv:2502.04959"),
)

REGISTRY.update({m.name: m for m in SVD_METHODS})
