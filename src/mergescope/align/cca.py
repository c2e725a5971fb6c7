"""CCA Merge (Horoi et al., ICML 2024, "Harmony in Diversity: Merging Neural Networks with CCA").

Permutations assume a one-to-one map between the units of two models. CCA Merge instead aligns
*linear combinations* of units: per unit group, Canonical Correlation Analysis of the two models'
activations on data gives directions P_A, P_B (X_A P_A and X_B P_B maximally correlated,
identity covariance), and T = P_B P_A^{-1} maps B's features into A's space (X_B T ~ X_A). Every
layer of B is then rewritten W_B' = T_out^T W_B T_in^{-T} (bias T_out^T b) and the models are
averaged. Where a group has no activation alone (attention heads) T is the weight-matching
permutation. N models: every model is mapped to one reference ("all to one") and the mapped
states are averaged.

Closed form with whitened cross-covariance (both covariances regularized by ``reg`` times their
mean variance, so ``reg`` is scale-free):
M = S_AA^{-1/2} S_AB S_BB^{-1/2} = U diag(rho) V^T, P_A = S_AA^{-1/2} U, P_B = S_BB^{-1/2} V,
T = S_BB^{-1/2} V U^T S_AA^{1/2} and T^{-1} = S_AA^{-1/2} U V^T S_BB^{1/2} (no inversion needed).

The weight rewrite reuses ZipIt!'s block machinery (``zipit.zip_state``): B alone is the
B-block of a zip whose merge matrix on output axes is [0, T^T] and unmerge on input axes
[0, T^{-1}]. With ReLUs between layers the rewrite is exact only when T is a permutation
(scaled); for linear stretches it is exact for any invertible T.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import MergescopeError
from ..state import average, with_state
from .matching import CorrelationStats, _samples, capture_points, weight_matching
from .spec import as_spec
from .zipit import zip_state


@dataclass(frozen=True)
class CCAResult:
    """The merged state, every model mapped into the reference's space, and per-group canonical correlations."""

    state: dict[str, torch.Tensor]
    states: list[dict[str, torch.Tensor]]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"info": dict(self.info)}


def _sym_power(s: np.ndarray, power: float) -> np.ndarray:
    """S^power of a symmetric PSD matrix; eigenvalues floored at 1e-12 of the largest (a singular S stays finite)."""
    w, q = np.linalg.eigh((s + s.T) / 2)
    w = np.maximum(w, max(float(w.max()), 1e-300) * 1e-12)
    return (q * w**power) @ q.T


def _regularized(s: np.ndarray, reg: float) -> np.ndarray:
    return s + reg * max(float(np.trace(s)) / len(s), 1e-12) * np.eye(len(s))


def _whitened_svd(s_aa: np.ndarray, s_bb: np.ndarray, s_ab: np.ndarray, reg: float):
    """Regularized covariances, their inverse square roots and the SVD of the whitened cross-covariance."""
    s_aa, s_bb = _regularized(s_aa, reg), _regularized(s_bb, reg)
    wa, wb = _sym_power(s_aa, -0.5), _sym_power(s_bb, -0.5)
    u, rho, vt = np.linalg.svd(wa @ s_ab @ wb)
    return s_aa, s_bb, wa, wb, u, rho, vt


def canonical(s_aa: np.ndarray, s_bb: np.ndarray, s_ab: np.ndarray, reg: float = 0.0):
    """CCA from covariances: (P_A, P_B, rho), columns of P_* the canonical directions, rho descending."""
    _, _, wa, wb, u, rho, vt = _whitened_svd(s_aa, s_bb, s_ab, reg)
    return wa @ u, wb @ vt.T, rho


def cca_transform(s_aa: np.ndarray, s_bb: np.ndarray, s_ab: np.ndarray, reg: float = 0.0):
    """(T, T^{-1}, rho): T = P_B P_A^{-1} maps B's features into A's (X_B T ~ X_A)."""
    s_aa, s_bb, wa, wb, u, rho, vt = _whitened_svd(s_aa, s_bb, s_ab, reg)
    polar = u @ vt  # U V^T: the orthogonal factor, unique when the whitened cross-covariance is nonsingular
    return wb @ polar.T @ _sym_power(s_aa, 0.5), wa @ polar @ _sym_power(s_bb, 0.5), rho


def covariance(stats: CorrelationStats) -> np.ndarray:
    """Population covariance of the stacked features ``stats`` was fed as (x, x)."""
    mean = stats.sa / stats.n
    return (stats.sab / stats.n - torch.outer(mean, mean)).numpy()


def _inputs(batches: Iterable) -> list[torch.Tensor]:
    out = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not out:
        raise MergescopeError("cca_merge: no batches given")
    return out


def collect_covariances(spec, models: Sequence[nn.Module], batches: list, reference: int) -> dict:
    """perm -> [joint covariance of (reference, model i) activations, or None for the reference]."""
    from .trace import trace_model

    stats: dict[str, list] = {}
    points = None
    for x in batches:
        traces = [trace_model(m, x, on_unsupported="fix") for m in models]
        if points is None:
            points = {p: pt for p, pt in capture_points(traces[reference], spec).items()
                      if spec.blocks.get(p, 1) == 1 and p not in spec.heads}
        if len({len(t.values) for t in traces}) != 1:
            raise MergescopeError("cca_merge: the models ran different operations")
        for p, (i, d) in points.items():
            ref = _samples(traces[reference].values[i][0], d)
            row = stats.setdefault(p, [None if k == reference else CorrelationStats() for k in range(len(models))])
            for k, t in enumerate(traces):
                if k != reference:
                    both = torch.cat([ref, _samples(t.values[i][0], d)], dim=1)
                    row[k].add(both, both)
    return {p: [None if s is None else covariance(s) for s in row] for p, row in stats.items()}


def _b_only_ops(t: np.ndarray, t_inv: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """zip_state's (merge, unmerge^T) that keep only the B block, mapped: [0, T^T] and [0, T^{-1}]."""
    n = len(t)
    zero = np.zeros((n, n))
    return (torch.as_tensor(np.hstack([zero, t.T])), torch.as_tensor(np.hstack([zero, t_inv])))


def _perm_matrix(perm: torch.Tensor) -> np.ndarray:
    """T of a permutation in Git Re-Basin's convention (aligned unit i = original unit perm[i])."""
    n = len(perm)
    t = np.zeros((n, n))
    t[perm.numpy(), np.arange(n)] = 1.0
    return t


def transformed_state(spec, ref_state, state, transforms: dict) -> dict[str, torch.Tensor]:
    """``state`` with every unit group mapped by its (T, T^{-1}): W' = T_out^T W T_in^{-T}."""
    ops = {p: _b_only_ops(*transforms[p]) for p in spec.perms}
    return zip_state(spec, ref_state, state, ops, 1.0)


def _check(models, reference: int, weights, reg: float) -> None:
    if len(models) < 2:
        raise MergescopeError(f"cca_merge: need at least 2 models, got {len(models)}")
    if not 0 <= reference < len(models):
        raise MergescopeError(f"cca_merge: reference={reference} is not a model index (0..{len(models) - 1})")
    if not (np.isfinite(reg) and reg >= 0):
        raise MergescopeError(f"cca_merge: reg={reg}: must be a finite number >= 0")
    if weights is not None and len(weights) != len(models):
        raise MergescopeError(f"cca_merge: {len(weights)} weights for {len(models)} models")
    for k, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise MergescopeError(f"cca_merge: model {k} must be an nn.Module, not {type(m).__name__}")


def cca_merge_many(spec, models: Sequence[nn.Module], batches: Iterable, reference: int = 0,
                   weights: Sequence[float] | None = None, reg: float = 1e-2, reset_bn: bool = True,
                   seed: int = 0) -> CCAResult:
    """Map every model into ``models[reference]``'s space by CCA on ``batches`` and average ("all to one").

    ``weights`` (default uniform) weight the mapped states; ``reg`` regularizes both covariances
    by that fraction of their mean variance; BatchNorm statistics are then recomputed on
    ``batches`` (``reset_bn``); groups without a traced activation use weight matching (``seed``).
    """
    from .repair import reset_bn_stats

    models = list(models)
    _check(models, reference, weights, reg)
    states = [m.state_dict() for m in models]
    spec = as_spec(spec).with_sizes(states[reference])
    for k, s in enumerate(states):
        try:
            spec.with_sizes(s)
        except MergescopeError as e:
            raise MergescopeError(f"cca_merge: model {k}: {e}") from None
    batches = _inputs(batches)
    covs = collect_covariances(spec, models, batches, reference)
    mapped, rhos = [], {}
    for k, s in enumerate(states):
        if k == reference:
            mapped.append(dict(s))
            continue
        fallback = None
        transforms = {}
        for p in spec.perms:
            n = spec.sizes[p]
            if p in covs:
                c = covs[p][k]
                t, t_inv, rho = cca_transform(c[:n, :n], c[n:, n:], c[:n, n:], reg)
                rhos.setdefault(p, []).append(float(rho.mean()))
            else:
                if fallback is None:
                    fallback = weight_matching(spec, states[reference], s, seed=seed).perms
                t = _perm_matrix(fallback[p])
                t_inv = t.T
            transforms[p] = (t, t_inv)
        mapped.append(transformed_state(spec, states[reference], s, transforms))
    merged = average(mapped, weights)
    if reset_bn:
        merged = reset_bn_stats(with_state(models[reference], merged), batches).state_dict()
    info = {"reference": reference, "reg": reg, "aligned_by_cca": sorted(covs),
            "aligned_by_weights": sorted(p for p in spec.perms if p not in covs),
            "mean_canonical_correlation": rhos}
    return CCAResult(merged, mapped, info)


def cca_merge(spec, model_a: nn.Module, model_b: nn.Module, batches: Iterable, alpha: float = 0.5,
              reg: float = 1e-2, reset_bn: bool = True, seed: int = 0) -> CCAResult:
    """(1 - alpha) A + alpha B mapped into A's space by CCA (two-model ``cca_merge_many``)."""
    if not 0.0 <= alpha <= 1.0:
        raise MergescopeError(f"cca_merge: alpha={alpha}: must be within [0, 1]")
    return cca_merge_many(spec, [model_a, model_b], batches, reference=0, weights=[1 - alpha, alpha], reg=reg,
                          reset_bn=reset_bn, seed=seed)
