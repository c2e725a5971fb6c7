"""The label model of the tracer (see ``trace.py``): unit groups, dimension labels, flattening.

A dimension's label is a tuple of segments (``cat``), each a tuple of factors ``(group, size)``
(``flatten`` of channels x space); group 0 is FIXED (must not move). This module imports nothing
from the tracer, so the tracer (``trace.py``), its op table (``rules.py``) and the attention leaf
rules (``attention.py``) all build on it without importing each other in a circle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

FIXED = 0


class UnitGroups:
    """Union-find over unit groups; group 0 is FIXED and absorbs anything joined to it."""

    def __init__(self):
        self.parent = [0]
        self.size = [0]
        self.name: list[str | None] = [None]

    def new(self, size: int, name: str | None = None) -> int:
        if size <= 1:  # a single unit has nothing to permute
            return FIXED
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.name.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] == 1 or self.size[rb] == 1:  # a single unit has nothing to permute
            self.parent[ra] = self.parent[rb] = FIXED
            return
        if ra == FIXED or rb == FIXED or self.size[ra] != self.size[rb]:
            for r in (ra, rb):
                self.parent[r] = FIXED
            return
        keep, drop = (ra, rb) if ra < rb else (rb, ra)
        self.parent[drop] = keep
        self.name[keep] = self.name[keep] or self.name[drop]

    def is_fixed(self, g: int) -> bool:
        return self.find(g) == FIXED


def fixed_dim(size: int) -> tuple:
    """The label of a dimension whose units must stay in place."""
    return (((FIXED, size),),)


def fixed_label(shape) -> tuple:
    """A label with every dimension of ``shape`` FIXED."""
    return tuple(fixed_dim(s) for s in shape)


def dim_size(label: tuple) -> int:
    return sum(math.prod(s for _, s in seg) for seg in label)


def canonical(factors) -> tuple:
    """Drop size-1 factors and merge neighbouring FIXED ones, so equal layouts compare equal."""
    out = []
    for g, s in factors:
        if s == 1:
            continue
        if g == FIXED and out and out[-1][0] == FIXED:
            out[-1] = (FIXED, out[-1][1] * s)
        else:
            out.append((g, s))
    return tuple(out) or ((FIXED, 1),)


def canonical_named(seg) -> tuple:
    """``canonical`` for a segment of named factors ``(perm name or None, size)``."""
    out = []
    for p, s in seg:
        if s == 1:
            continue
        if p is None and out and out[-1][0] is None:
            out[-1] = (None, out[-1][1] * s)
        else:
            out.append((p, s))
    return tuple(out)


def flat(items) -> list:
    """Leaves of nested lists, tuples, mappings and Hugging Face ``ModelOutput``s, in order."""
    out = []
    for x in items:
        if isinstance(x, (list, tuple)):
            out.extend(flat(list(x)))
        elif isinstance(x, Mapping):
            out.extend(flat(list(x.values())))
        elif hasattr(x, "to_tuple") and callable(x.to_tuple):  # Hugging Face ModelOutput
            out.extend(flat(list(x.to_tuple())))
        else:
            out.append(x)
    return out
