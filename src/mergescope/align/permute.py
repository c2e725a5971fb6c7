"""Permutations as index vectors, applying them to states, and drawing random ones.

Convention (Git Re-Basin's): ``perm[p][i] = j`` means unit i of the aligned model is unit j of
the original, so aligning reads ``tensor.index_select(axis, perm[p])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import MergescopeError
from .spec import PermutationSpec, as_spec


@dataclass(frozen=True)
class Permutation:
    """Permutation name -> index vector, with how it was found (method, objective, iterations...)."""

    perms: dict[str, torch.Tensor]
    method: str = ""
    info: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.perms[name]

    def __contains__(self, name: str) -> bool:
        return name in self.perms

    def to_dict(self) -> dict:
        return {"method": self.method, "info": dict(self.info), "perms": {k: v.tolist() for k, v in self.perms.items()}}


def as_perms(perm) -> dict[str, torch.Tensor]:
    if isinstance(perm, Permutation):
        return perm.perms
    if isinstance(perm, Mapping):
        return {k: torch.as_tensor(v, dtype=torch.long) for k, v in perm.items()}
    raise MergescopeError(f"permutation: expected a Permutation or a dict of index vectors, got {type(perm).__name__}")


def identity(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    return {p: torch.arange(spec.sizes[p]) for p in spec.names}


def axis_index(spec: PermutationSpec, perms: Mapping, tensor: str, axis: int, length: int,
               skip: str | None = None) -> torch.Tensor | None:
    """The gather index for one axis (None if nothing moves it); ``skip`` treats one perm as identity."""
    layout = spec.layout(tensor, axis, length)
    parts, moved = [], False
    for seg in layout:
        idx = torch.zeros((), dtype=torch.long)
        for name, size in seg:
            if name is not None and name != skip and name in perms:
                step = torch.as_tensor(perms[name], dtype=torch.long)
                if len(step) != size:
                    raise MergescopeError(f"permutation {name!r} has length {len(step)}, axis {axis} of {tensor!r} needs {size}")
                moved = True
            else:
                step = torch.arange(size)
            idx = (idx.unsqueeze(-1) * size + step).reshape(-1)
        parts.append(idx.reshape(-1) + sum(len(p) for p in parts))
    full = torch.cat(parts)
    if len(full) != length:
        raise MergescopeError(f"spec: layout of {tensor!r} axis {axis} covers {len(full)} entries, the axis has {length}")
    return full if moved else None


def permute_tensor(spec: PermutationSpec, perms: Mapping, tensor: str, t: torch.Tensor,
                   skip: str | None = None) -> torch.Tensor:
    """One tensor with every permutation in ``spec`` applied to its axes (``skip`` left as is)."""
    for axis in spec.axes_of().get(tensor, []):
        idx = axis_index(spec, perms, tensor, axis, t.shape[axis], skip)
        if idx is not None:
            t = t.index_select(axis, idx)
    return t


def apply(spec, perm, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state with ``perm`` applied; tensors the spec does not name are passed through."""
    spec = as_spec(spec)
    perms = as_perms(perm)
    axes = spec.axes_of()
    missing = [t for t in axes if t not in state]
    if missing:
        raise MergescopeError(f"apply: the state lacks tensor(s) {missing[:3]} named by the spec")
    return {name: permute_tensor(spec, perms, name, state[name]) if name in axes else state[name] for name in state}


def compose_heads(head: torch.Tensor, within: list[torch.Tensor]) -> torch.Tensor:
    """Full index of a block-structured perm: new block b takes old block head[b], reordered by within[b]."""
    size = len(within[0])
    return torch.cat([head[b] * size + w for b, w in enumerate(within)])


def random_permutation(spec, generator: torch.Generator | None = None, state: Mapping | None = None) -> Permutation:
    """A uniformly random permutation of every unit group (respecting head blocks): tests and null baselines."""
    spec = as_spec(spec)
    if state is not None:
        spec = spec.with_sizes(state)
    missing = [p for p in spec.names if p not in spec.sizes]
    if missing:
        raise MergescopeError(f"random_permutation: sizes unknown for {missing[:3]}; pass state=")
    draw = lambda n: torch.randperm(n, generator=generator)  # noqa: E731
    perms = {h: draw(spec.sizes[h]) for h in spec.heads}
    for p in spec.perms:
        if p in perms:
            continue
        k = spec.blocks.get(p, 1)
        if k == 1:
            perms[p] = draw(spec.sizes[p])
            continue
        head = spec.head_of(p)
        order = perms[head] if head is not None else torch.arange(k)
        perms[p] = compose_heads(order, [draw(spec.sizes[p] // k) for _ in range(k)])
    return Permutation(perms, method="random")
