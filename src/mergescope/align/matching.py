"""Weight matching and activation matching (Ainsworth et al. 2023, "Git Re-Basin"; Tatro et al. 2020).

Weight matching maximizes sum_l <W_l^A, P_l W_l^B P_{l-1}^T> by coordinate descent: with every
other permutation held, the best P_l is a linear assignment problem on
C = sum_{(tensor, axis) in P_l} A_(axis) B'_(axis)^T (scipy's ``linear_sum_assignment``); layers
are visited in a seeded random order until no step improves. The descent only reaches a local
optimum that depends on its start and order, so a cold start runs ``restarts`` descents (identity,
then seeded random permutations) and keeps the one with the highest objective. Block-structured (attention)
permutations are solved two-level: an assignment inside every pair of heads, then an assignment
of heads on those values (heads move Q/K and V/O together).

Activation matching runs both models on data and, per unit group, assigns units by the
correlation of their activations (post-nonlinearity, where the trace finds one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import MergescopeError
from .permute import Permutation, as_perms, compose_heads, identity, permute_tensor, random_permutation
from .spec import PermutationSpec, as_spec


def axis_segments(spec: PermutationSpec, tensor: str, axis: int, t: torch.Tensor):
    """Yield (part, shaped, names) for each segment of ``t``'s unit axis: the slice of the axis, the
    same slice with the axis split into its factors, and each factor's permutation name."""
    offset = 0
    for seg in spec.layout(tensor, axis, t.shape[axis]):
        sizes = [s for _, s in seg]
        part = t.narrow(axis, offset, int(np.prod(sizes)))
        offset += part.shape[axis]
        yield part, part.reshape(*part.shape[:axis], *sizes, *part.shape[axis + 1:]), [name for name, _ in seg]


def unit_rows(spec: PermutationSpec, tensor: str, axis: int, t: torch.Tensor, perm: str) -> list[torch.Tensor]:
    """Views [n_units, -1] of ``t`` with ``perm``'s units as rows (one per place the perm occurs on the axis)."""
    return [shaped.movedim(axis + i, 0).reshape(shaped.shape[axis + i], -1)
            for _, shaped, names in axis_segments(spec, tensor, axis, t)
            for i, name in enumerate(names) if name == perm]


def cost_matrix(spec: PermutationSpec, perm: str, state_a: Mapping, state_b: Mapping, perms: Mapping) -> np.ndarray:
    """C[i, j] = similarity of A's unit i and B's unit j with all other permutations applied to B."""
    n = spec.sizes[perm]
    cost = torch.zeros(n, n, dtype=torch.float64)
    for tensor, axis in spec.perms[perm]:
        a = state_a[tensor].detach().to(torch.float64)
        b = permute_tensor(spec, perms, tensor, state_b[tensor].detach().to(torch.float64), skip=perm)
        for va, vb in zip(unit_rows(spec, tensor, axis, a, perm), unit_rows(spec, tensor, axis, b, perm)):
            cost += va @ vb.T
    return cost.numpy()


def assign(cost: np.ndarray) -> tuple[np.ndarray, float]:
    """Maximum-weight assignment: (perm with perm[i] = matched column, total weight)."""
    rows, cols = linear_sum_assignment(cost, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm, float(cost[rows, cols].sum())


def assign_blocks(costs: list[np.ndarray], n_blocks: int, move_blocks: bool,
                  block_cost: np.ndarray | None = None) -> list[np.ndarray]:
    """Solve block-structured perms jointly: within-block assignments, then (optionally) block order.

    ``block_cost`` adds similarities of whole blocks (tensors where only the head moves, e.g. Q/K
    under rotary embeddings).
    """
    size = costs[0].shape[0] // n_blocks
    value = np.zeros((n_blocks, n_blocks)) if block_cost is None else np.array(block_cost, dtype=np.float64)
    within: dict = {}
    for a in range(n_blocks):
        for b in range(n_blocks) if move_blocks else [a]:
            for k, cost in enumerate(costs):
                block = cost[a * size:(a + 1) * size, b * size:(b + 1) * size]
                within[(k, a, b)], v = assign(block)
                value[a, b] += v
    order = assign(value)[0] if move_blocks else np.arange(n_blocks)
    return [compose_heads(torch.as_tensor(order), [torch.as_tensor(within[(k, a, order[a])]) for a in range(n_blocks)]
                          ).numpy() for k in range(len(costs))] + [order]


def _units(spec: PermutationSpec) -> list[tuple[str | None, tuple[str, ...]]]:
    """Coordinates of the descent: (head perm or None, perms solved together)."""
    coupled = {p for c in spec.heads.values() for p in c}
    units = [(h, tuple(c)) for h, c in spec.heads.items()]
    units += [(None, (p,)) for p in spec.perms if p not in coupled and p not in spec.heads]
    return units


def _neighbours(spec: PermutationSpec, units) -> list[set[int]]:
    """For each unit, the other units whose cost matrices read a tensor it permutes."""
    tensors = []
    for head, names in units:
        moved = {t for p in names + ((head,) if head in spec.perms else ()) for t, _ in spec.perms[p]}
        tensors.append(moved)
    return [{j for j in range(len(units)) if j != i and tensors[i] & tensors[j]} for i in range(len(units))]


def _objective(costs: list[np.ndarray], perms: list[np.ndarray]) -> float:
    return float(sum(c[np.arange(len(p)), p].sum() for c, p in zip(costs, perms)))


def _descent_step(spec, unit, state_a, state_b, perms) -> bool:
    """Re-solve one coordinate; True if it strictly improved the objective."""
    head, names = unit
    costs = [cost_matrix(spec, p, state_a, state_b, perms) for p in names]
    old = _objective(costs, [perms[p].numpy() for p in names])
    block_cost = cost_matrix(spec, head, state_a, state_b, perms) if head in spec.perms else None
    if block_cost is not None:
        old += _objective([block_cost], [perms[head].numpy()])
    if head is not None:
        solved = assign_blocks(costs, spec.sizes[head], move_blocks=True, block_cost=block_cost)
        new_perms, head_order = solved[:-1], solved[-1]
    elif spec.blocks.get(names[0], 1) > 1:
        new_perms, head_order = assign_blocks(costs, spec.blocks[names[0]], move_blocks=False)[:-1], None
    else:
        new_perms, head_order = [assign(costs[0])[0]], None
    new = _objective(costs, new_perms)
    if block_cost is not None:
        new += _objective([block_cost], [head_order])
    if new <= old + 1e-12 * max(1.0, abs(old)):
        return False
    for p, q in zip(names, new_perms):
        perms[p] = torch.as_tensor(q)
    if head is not None:
        perms[head] = torch.as_tensor(head_order)
    return True


def matching_objective(spec: PermutationSpec, perms: Mapping, state_a: Mapping, state_b: Mapping) -> float:
    """sum over the tensors the spec moves of <W_A, P(W_B)>: what weight matching maximizes."""
    return float(sum((state_a[t].detach().to(torch.float64)
                      * permute_tensor(spec, perms, t, state_b[t].detach().to(torch.float64))).sum()
                     for t in spec.axes_of()))


def _random_start(spec: PermutationSpec, perms: dict, names: set[str], generator: torch.Generator) -> dict:
    """``perms`` with the perms in ``names`` replaced by a uniformly random permutation (head blocks respected)."""
    drawn = random_permutation(spec, generator=generator).perms
    return {p: drawn[p] if p in names else q for p, q in perms.items()}


def _descend(spec, units, state_a, state_b, perms: dict, rng: np.random.Generator, max_iter: int) -> int:
    """Coordinate descent from ``perms`` (updated in place) until a sweep improves nothing; returns the sweeps."""
    neighbours = _neighbours(spec, units)
    dirty = set(range(len(units)))  # a unit whose cost matrix may have changed since it was solved
    iterations = 0
    for iterations in range(1, max_iter + 1):
        improved = False
        for k in rng.permutation(len(units)):
            if k not in dirty:
                continue  # same cost matrix as last time: the step would change nothing
            dirty.discard(k)
            if _descent_step(spec, units[k], state_a, state_b, perms):
                improved = True
                dirty |= neighbours[k]
        if not improved:
            break
    return iterations


def weight_matching(spec, state_a: Mapping, state_b: Mapping, seed: int = 0, max_iter: int = 100,
                    init=None, only: Iterable[str] | None = None, restarts: int = 1) -> Permutation:
    """Permutation of B's units maximizing the inner product of A's and B's weights (Git Re-Basin).

    ``init`` starts from a given permutation (one descent: a warm start is refined, not replaced);
    otherwise ``restarts`` descents start from the identity and from ``restarts - 1`` random
    permutations drawn from ``seed``, and the highest objective wins (the first start on ties), so
    more restarts never lower the objective. ``only`` limits the descent to some perms (the rest
    stay as in ``init``).
    """
    if restarts < 1:
        raise MergescopeError(f"weight_matching: restarts must be >= 1, got {restarts}")
    spec = as_spec(spec).with_sizes(state_a)
    moved = spec.axes_of()  # float64 once, shared by every step of every start
    state_a = {t: state_a[t].detach().to(torch.float64) for t in moved}
    state_b = {t: state_b[t].detach().to(torch.float64) for t in moved}
    start = {**identity(spec), **(as_perms(init) if init is not None else {})}
    units = _units(spec)
    if only is not None:
        only = set(only)
        units = [u for u in units if set(u[1]) & only or u[0] in only]
    free = {p for head, names in units for p in names + ((head,) if head is not None else ())}
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    best, objectives, sweeps = None, [], []
    for k in range(1 if init is not None else restarts):
        perms = dict(start) if k == 0 else _random_start(spec, start, free, generator)
        sweeps.append(_descend(spec, units, state_a, state_b, perms, rng, max_iter))
        objectives.append(matching_objective(spec, perms, state_a, state_b))
        if best is None or objectives[-1] > objectives[best[0]]:
            best = (k, perms)
    return Permutation(best[1], method="weight", info={"iterations": sweeps[best[0]], "seed": seed,
                                                       "objective": objectives[best[0]], "start": best[0],
                                                       "objectives": objectives})


# ---- activation matching ----------------------------------------------------------------

def capture_points(tracer, spec: PermutationSpec) -> dict[str, tuple[int, int]]:
    """For each perm of ``spec``: (value index, dim) of the last traced value carrying exactly that unit group."""
    by_axis = {}
    for p, entries in spec.perms.items():
        for entry in entries:
            by_axis.setdefault(entry, p)
    group_to_perm = {}
    for (tensor, axis), label in tracer.bound.items():
        g = tracer.single_group(label)
        if g is not None and (tensor, axis) in by_axis:
            group_to_perm[tracer.groups.find(g)] = by_axis[(tensor, axis)]
    points = {}
    for i, (t, label) in enumerate(tracer.values):
        if not t.is_floating_point():
            continue
        for d, lab in enumerate(label):
            g = tracer.single_group(lab)
            if g is not None and tracer.groups.find(g) in group_to_perm:
                points[group_to_perm[tracer.groups.find(g)]] = (i, d)
    return points


class CorrelationStats:
    """Running sums for the Pearson correlation of every unit of A with every unit of B."""

    def __init__(self):
        self.n, self.sa, self.sb, self.saa, self.sbb, self.sab = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.to(torch.float64), b.to(torch.float64)
        self.n += a.shape[0]
        self.sa = self.sa + a.sum(0)
        self.sb = self.sb + b.sum(0)
        self.saa = self.saa + (a * a).sum(0)
        self.sbb = self.sbb + (b * b).sum(0)
        self.sab = self.sab + a.T @ b

    def correlation(self) -> np.ndarray:
        ma, mb = self.sa / self.n, self.sb / self.n
        cov = self.sab / self.n - torch.outer(ma, mb)
        sa = (self.saa / self.n - ma * ma).clamp_min(0).sqrt()
        sb = (self.sbb / self.n - mb * mb).clamp_min(0).sqrt()
        return (cov / (torch.outer(sa, sb) + 1e-8)).numpy()


def _samples(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.detach().movedim(dim, -1).reshape(-1, t.shape[dim])


def activation_matching(spec, model_a: torch.nn.Module, model_b: torch.nn.Module, batches: Iterable,
                        seed: int = 0) -> Permutation:
    """Permutation of B's units maximizing the correlation of A's and B's activations on ``batches``.

    ``batches`` yields inputs (or (input, target) pairs). Unit groups whose activations the trace
    cannot see alone (inside attention, or only inside a flatten) are then weight-matched
    with the activation-matched ones held.
    """
    from .trace import trace_model

    spec = as_spec(spec).with_sizes(model_a.state_dict())
    stats: dict[str, CorrelationStats] = {}
    points = None
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 2 else batch
        tr_a, tr_b = trace_model(model_a, x, on_unsupported="fix"), trace_model(model_b, x, on_unsupported="fix")
        if points is None:
            points = {p: pt for p, pt in capture_points(tr_a, spec).items()
                      if spec.blocks.get(p, 1) == 1 and p not in spec.heads}
        if len(tr_a.values) != len(tr_b.values):
            raise MergescopeError("activation_matching: the two models ran different operations")
        for p, (i, d) in points.items():
            stats.setdefault(p, CorrelationStats()).add(_samples(tr_a.values[i][0], d), _samples(tr_b.values[i][0], d))
    if points is None:
        raise MergescopeError("activation_matching: no batches given")
    perms = identity(spec)
    for p, s in stats.items():
        perms[p] = torch.as_tensor(assign(s.correlation())[0])
    rest = [p for p in spec.names if p not in stats]
    if rest:
        perms = weight_matching(spec, model_a.state_dict(), model_b.state_dict(), seed=seed, init=perms, only=rest).perms
    return Permutation(perms, method="activation", info={"matched_by_activation": sorted(stats),
                                                           "matched_by_weights": sorted(rest)})
