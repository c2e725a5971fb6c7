"""ZipIt! (Stoica et al. 2024, "ZipIt! Merging Models from Different Tasks without Training").

Instead of a one-to-one permutation between A and B, ZipIt! pools the 2n features of both
models at each unit group and greedily merges the most correlated pairs, allowing pairs from
the same model. A merge matrix M (n x 2n, averaging each pair) maps features into the merged
space and an unmerge matrix U (2n x n, copying) maps back, so a layer becomes
W_merged = M_out [W_A (+) W_B] U_in with (+) the block-diagonal stack. Where the unit axis is
an output (axis 0: weights, biases, norms) M applies; on input axes U applies; tensors with only
input axes (the classifier) average the two models' contributions.

Unit groups without a traced activation (attention heads) are zipped along the weight-matching
permutation (cross-model pairs only), which keeps heads whole. Partial zipping (``unmerged=K``:
the last K unit groups keep both models' features, M = U = I) is described in ``partial.py``.
"""

from __future__ import annotations

import math
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
    """Block-diagonal stack of A and B on every unit axis, then M on output axes and U on input axes.

    A group whose ``ops`` entry is None stays unmerged (M = U = I): its axis keeps all 2n units.
    """
    axes = spec.axes_of().get(tensor, [])
    factored, where, owner = [], [], []  # factored shape; (factor dim, perm, role) per unit factor; axis of each factor
    for d, size in enumerate(a.shape):
        if d not in axes:
            factored.append(size)
            owner.append(d)
            continue
        layout = spec.layout(tensor, d, size)
        if len(layout) != 1:
            raise MergescopeError(f"zipit: axis {d} of {tensor!r} concatenates unit groups; not supported")
        for name, s in layout[0]:
            if name is not None:
                where.append((len(factored), name, "merge" if d == 0 else "unmerge"))
            factored.append(s)
            owner.append(d)
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
        if ops[name] is None:
            continue
        mat = ops[name][0 if role == "merge" else 1]
        big = torch.tensordot(mat, big.movedim(dim, 0), dims=1).movedim(0, dim)
    shape = [math.prod(big.shape[i] for i in range(len(owner)) if owner[i] == d) for d in range(a.dim())]
    return big.reshape(shape).to(a.dtype)


def zip_state(spec, state_a, state_b, ops: dict, alpha: float) -> dict[str, torch.Tensor]:
    """Zip every tensor with the per-group (M, U^T) in ``ops`` (None: unmerged); unit-free tensors are lerped."""
    axes = spec.axes_of()
    merged = {}
    for k, a in state_a.items():
        if not a.is_floating_point():
            merged[k] = a
        elif k in axes:
            merged[k] = _zip_tensor(spec, k, a, state_b[k], ops, alpha)
        else:
            merged[k] = torch.lerp(a, state_b[k].to(a.dtype), alpha)
    return merged


def zipit(spec, model_a: nn.Module, model_b: nn.Module, batches: Iterable, alpha: float = 0.5,
          allow_within: bool = True, reset_bn: bool = True, seed: int = 0, unmerged: int = 0) -> ZipResult:
    """Merge B into A by zipping correlated features; BatchNorm statistics are then recomputed on ``batches``.

    ``unmerged=K`` leaves the last K unit groups (in the order the run first creates them)
    unmerged: the state is then *widened* (2n units in those groups, a shared trunk and two tails
    whose outputs are mixed (1 - alpha) : alpha); build the module with ``partial.zipped_model``.
    K = 0 is the full zip; K = all groups is the output ensemble.

    Complexity 22 by radon, kept: one pass over the traced unit groups in forward order, where each
    group is zipped, left unmerged or copied; splitting the pass would scatter its shared state.
    """
    from . import partial
    from .repair import reset_bn_stats
    from .trace import trace_model

    sa, sb = model_a.state_dict(), model_b.state_dict()
    spec = as_spec(spec).with_sizes(sa)
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not batches:
        raise MergescopeError("zipit: no batches given")
    stats: dict[str, CorrelationStats] = {}
    points = order = None
    for x in batches:
        tr_a, tr_b = trace_model(model_a, x, on_unsupported="fix"), trace_model(model_b, x, on_unsupported="fix")
        if points is None:
            points = {p: pt for p, pt in capture_points(tr_a, spec).items()
                      if spec.blocks.get(p, 1) == 1 and p not in spec.heads}
            order = partial.unit_order(tr_a, spec)
            tail = partial.tail_groups(order, unmerged)
            partial.check_attention(spec, order, tail)
        for p, (i, d) in points.items():
            fa, fb = _samples(tr_a.values[i][0], d), _samples(tr_b.values[i][0], d)
            both = torch.cat([fa, fb], dim=1)
            stats.setdefault(p, CorrelationStats()).add(both, both)
    if tail:
        identity_ops = {p: None if p in tail else merge_unmerge(_perm_pairs(torch.arange(spec.sizes[p])), spec.sizes[p], 0.5)
                        for p in spec.perms}
        partial.check_widening(model_a, zip_state(spec, sa, sa, identity_ops, 0.5), batches[0][:256], tail)
    fallback = weight_matching(spec, sa, sb, seed=seed).perms
    ops, within = {}, {}
    for p in spec.perms:
        n = spec.sizes[p]
        if p in tail:
            ops[p] = None
            continue
        if p in stats:
            corr = stats[p].correlation()
            np.fill_diagonal(corr, -np.inf)
            pairs = greedy_pairs(corr, allow_within)
        else:
            pairs = _perm_pairs(fallback[p])
        within[p] = sum(1 for i, j in pairs if (i < n) == (j < n))
        ops[p] = merge_unmerge(pairs, n, alpha)
    merged = zip_state(spec, sa, sb, ops, alpha)
    if reset_bn:  # zipped_model holds the state whatever its widths (full zip: the same shapes as A)
        merged = reset_bn_stats(partial.zipped_model(model_a, merged), batches).state_dict()
    info = {"zipped_by_activation": sorted(p for p in stats if p not in tail), "same_model_pairs": within,
            "alpha": alpha}
    if tail:
        info.update({"order": order, "unmerged": tail, **partial.parameter_counts(model_a, merged, spec, tail)})
    return ZipResult(merged, info)
