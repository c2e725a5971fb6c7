"""ZipIt! (Stoica et al. 2024, "ZipIt! Merging Models from Different Tasks without Training").

Instead of a one-to-one permutation between A and B, ZipIt! pools the 2n features of both
models at each unit group and greedily merges the most correlated pairs, allowing pairs from
the same model. A merge matrix M (n x 2n, averaging each pair) maps features into the merged
space and an unmerge matrix U (2n x n, copying) maps back, so a layer becomes
W_merged = M_out [W_A (+) W_B] U_in with (+) the block-diagonal stack. Where the unit axis is
an output (axis 0: weights, biases, norms) M applies; on input axes U applies; tensors with only
input axes (the classifier) average the two models' contributions.

Unit groups without a traced activation (attention heads) are zipped along the weight-matching
permutation (cross-model pairs only), which keeps heads whole. Partial zipping (leaving the last
layers unmerged) needs a two-branch architecture and is not provided here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import MergescopeError
from .matching import CorrelationStats, _samples, capture_points, weight_matching
from .spec import as_spec


@dataclass(frozen=True)
class ZipResult:
    """The merged state and, per unit group, how many merged pairs came from one model."""

    state: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"info": dict(self.info)}


def greedy_pairs(corr: np.ndarray, allow_within: bool = True) -> list[tuple[int, int]]:
    """Pair 2n features by descending correlation, each feature used once (ZipIt!'s greedy matching)."""
    m = corr.shape[0]
    n = m // 2
    score = corr.astype(np.float64).copy()
    if not allow_within:
        score[:n, :n] = -np.inf
        score[n:, n:] = -np.inf
    iu, ju = np.triu_indices(m, k=1)
    order = np.argsort(-score[iu, ju], kind="stable")
    used = np.zeros(m, dtype=bool)
    pairs = []
    for k in order:
        i, j = iu[k], ju[k]
        if used[i] or used[j]:
            continue
        pairs.append((int(i), int(j)))
        used[i] = used[j] = True
        if len(pairs) == n:
            break
    return pairs


def merge_unmerge(pairs: list[tuple[int, int]], n: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """M (n x 2n) averaging each pair (cross pairs weighted 1-alpha : alpha) and U^T (n x 2n) copying back."""
    merge = torch.zeros(n, 2 * n, dtype=torch.float64)
    unmerge_t = torch.zeros(n, 2 * n, dtype=torch.float64)
    for k, (i, j) in enumerate(sorted(pairs)):
        cross = (i < n) != (j < n)
        wi, wj = ((1 - alpha, alpha) if i < n else (alpha, 1 - alpha)) if cross else (0.5, 0.5)
        merge[k, i], merge[k, j] = wi, wj
        unmerge_t[k, i] = unmerge_t[k, j] = 1.0
    return merge, unmerge_t


def _perm_pairs(perm: torch.Tensor) -> list[tuple[int, int]]:
    n = len(perm)
    return [(i, n + int(perm[i])) for i in range(n)]


def _zip_tensor(spec, tensor: str, a: torch.Tensor, b: torch.Tensor, ops: dict, alpha: float) -> torch.Tensor:
    """Block-diagonal stack of A and B on every unit axis, then M on output axes and U on input axes."""
    axes = spec.axes_of().get(tensor, [])
    factored, where = [], []  # factored shape; (factor dim, perm, role) per unit factor
    for d, size in enumerate(a.shape):
        if d not in axes:
            factored.append(size)
            continue
        layout = spec.layout(tensor, d, size)
        if len(layout) != 1:
            raise MergescopeError(f"zipit: axis {d} of {tensor!r} concatenates unit groups; not supported")
        for name, s in layout[0]:
            if name is not None:
                where.append((len(factored), name, "merge" if d == 0 else "unmerge"))
            factored.append(s)
    big_shape = list(factored)
    for dim, _, _ in where:
        big_shape[dim] *= 2
    big = torch.zeros(big_shape, dtype=torch.float64)
    merge_axis = any(role == "merge" for _, _, role in where)
    wa, wb = (1.0, 1.0) if merge_axis else (1 - alpha, alpha)
    for src, block, w in ((a, 0, wa), (b, 1, wb)):
        index = [slice(None)] * len(big_shape)
        for dim, _, _ in where:
            index[dim] = slice(block * factored[dim], (block + 1) * factored[dim])
        big[tuple(index)] = w * src.to(torch.float64).reshape(factored)
    for dim, name, role in where:
        mat = ops[name][0 if role == "merge" else 1]
        big = torch.tensordot(mat, big.movedim(dim, 0), dims=1).movedim(0, dim)
    return big.reshape(a.shape).to(a.dtype)


def zipit(spec, model_a: nn.Module, model_b: nn.Module, batches: Iterable, alpha: float = 0.5,
          allow_within: bool = True, reset_bn: bool = True, seed: int = 0) -> ZipResult:
    """Merge B into A by zipping correlated features; BatchNorm statistics are then recomputed on ``batches``."""
    from .repair import reset_bn_stats
    from .trace import trace_model

    sa, sb = model_a.state_dict(), model_b.state_dict()
    spec = as_spec(spec).with_sizes(sa)
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not batches:
        raise MergescopeError("zipit: no batches given")
    stats: dict[str, CorrelationStats] = {}
    points = None
    for x in batches:
        tr_a, tr_b = trace_model(model_a, x, on_unsupported="fix"), trace_model(model_b, x, on_unsupported="fix")
        if points is None:
            points = {p: pt for p, pt in capture_points(tr_a, spec).items()
                      if spec.blocks.get(p, 1) == 1 and p not in spec.heads}
        for p, (i, d) in points.items():
            fa, fb = _samples(tr_a.values[i][0], d), _samples(tr_b.values[i][0], d)
            both = torch.cat([fa, fb], dim=1)
            stats.setdefault(p, CorrelationStats()).add(both, both)
    fallback = weight_matching(spec, sa, sb, seed=seed).perms
    ops, within = {}, {}
    for p in spec.perms:
        n = spec.sizes[p]
        if p in stats:
            corr = stats[p].correlation()
            np.fill_diagonal(corr, -np.inf)
            pairs = greedy_pairs(corr, allow_within)
        else:
            pairs = _perm_pairs(fallback[p])
        within[p] = sum(1 for i, j in pairs if (i < n) == (j < n))
        ops[p] = merge_unmerge(pairs, n, alpha)
    axes = spec.axes_of()
    merged = {}
    for k, a in sa.items():
        if not a.is_floating_point():
            merged[k] = a
        elif k in axes:
            merged[k] = _zip_tensor(spec, k, a, sb[k], ops, alpha)
        else:
            merged[k] = torch.lerp(a, sb[k].to(a.dtype), alpha)
    if reset_bn:
        model = copy.deepcopy(model_a)
        model.load_state_dict(merged)
        merged = reset_bn_stats(model, batches).state_dict()
    return ZipResult(merged, {"zipped_by_activation": sorted(stats), "same_model_pairs": within, "alpha": alpha})
