"""PermutationSpec: which axes of which tensors share one permutation of hidden units.

Plain data, like Git Re-Basin's ``perm_to_axes`` (Ainsworth et al. 2023): ``perms`` maps a
permutation name to the ``(tensor, axis)`` pairs it reorders. A hand-written dict of that shape
is a valid spec. Three optional fields describe what a flat list cannot:

- ``layouts[(tensor, axis)]``: the axis is made of segments (concatenation) of factors
  (flatten): e.g. a linear head after ``flatten(conv_out)`` has axis 1 laid out as
  ``(((perm, C), (None, H*W)),)`` - channel blocks of H*W contiguous entries.
- ``blocks[perm] = k``: the permutation may only move units inside k equal blocks (the
  dimensions inside one attention head).
- ``heads[head_perm] = (perm, ...)``: a permutation of the k blocks, applied to all listed
  block-structured perms together (Q/K share one, V/O another, both move heads the same way).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import MergescopeError

Factor = tuple  # (perm name or None for a fixed stretch, size)
Layout = tuple  # tuple of segments, each a tuple of factors


@dataclass(frozen=True)
class PermutationSpec:
    """Permutation name -> (tensor, axis) pairs, plus sizes, layouts, blocks and head couplings."""

    perms: dict[str, tuple[tuple[str, int], ...]]
    sizes: dict[str, int] = field(default_factory=dict)
    layouts: dict[tuple[str, int], Layout] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)
    heads: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """All permutation names: the ones with axes, then head permutations."""
        return list(self.perms) + [h for h in self.heads if h not in self.perms]

    def axes_of(self) -> dict[str, list[int]]:
        """tensor name -> its permuted axes."""
        out: dict[str, list[int]] = {}
        for entries in self.perms.values():
            for tensor, axis in entries:
                if axis not in out.setdefault(tensor, []):
                    out[tensor].append(axis)
        return out

    def layout(self, tensor: str, axis: int, length: int) -> Layout:
        """The layout of an axis; a plain entry is one segment holding one permutation."""
        if (tensor, axis) in self.layouts:
            return self.layouts[(tensor, axis)]
        owners = [p for p, entries in self.perms.items() if (tensor, axis) in entries]
        if len(owners) != 1:
            raise MergescopeError(f"spec: axis {axis} of {tensor!r} is listed under {owners} without a layout")
        return (((owners[0], length),),)

    def head_of(self, perm: str) -> str | None:
        """The head permutation that moves ``perm``'s blocks, if any."""
        return next((h for h, coupled in self.heads.items() if perm in coupled), None)

    def with_sizes(self, state: Mapping) -> PermutationSpec:
        """Fill in missing sizes from a state's tensor shapes; check the spec fits the state."""
        sizes = dict(self.sizes)
        for perm, entries in self.perms.items():
            for tensor, axis in entries:
                if tensor not in state:
                    raise MergescopeError(f"spec: tensor {tensor!r} (permutation {perm!r}) is not in the state")
                shape = tuple(state[tensor].shape)
                if not -len(shape) <= axis < len(shape):
                    raise MergescopeError(f"spec: tensor {tensor!r} has no axis {axis} (shape {shape})")
                if (tensor, axis) in self.layouts:
                    continue
                n = shape[axis]
                if sizes.setdefault(perm, n) != n:
                    raise MergescopeError(f"spec: permutation {perm!r} has size {sizes[perm]} but {tensor!r} axis {axis} has {n}")
        for head, coupled in self.heads.items():
            for perm in coupled:
                if perm in sizes and head in sizes and sizes[perm] % sizes[head]:
                    raise MergescopeError(f"spec: {perm!r} (size {sizes[perm]}) does not split into {sizes[head]} heads")
        return PermutationSpec(dict(self.perms), sizes, dict(self.layouts), dict(self.blocks), dict(self.heads))

    def to_dict(self) -> dict:
        return {
            "perms": {p: [list(e) for e in entries] for p, entries in self.perms.items()},
            "sizes": dict(self.sizes),
            "layouts": {f"{t}:{a}": [[list(f) for f in seg] for seg in lay] for (t, a), lay in self.layouts.items()},
            "blocks": dict(self.blocks),
            "heads": {h: list(c) for h, c in self.heads.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> PermutationSpec:
        """Read ``to_dict`` output, or a bare Git Re-Basin style ``{perm: [(tensor, axis), ...]}``."""
        if "perms" not in data:
            data = {"perms": data}
        try:
            perms = {str(p): tuple((str(t), int(a)) for t, a in entries) for p, entries in data["perms"].items()}
            layouts = {}
            for key, lay in data.get("layouts", {}).items():
                tensor, axis = (key.rsplit(":", 1) if isinstance(key, str) else key)
                layouts[(tensor, int(axis))] = tuple(tuple((f[0], int(f[1])) for f in seg) for seg in lay)
        except (TypeError, ValueError, AttributeError):
            raise MergescopeError("spec: expected {permutation: [(tensor, axis), ...]}") from None
        return cls(perms, {k: int(v) for k, v in data.get("sizes", {}).items()}, layouts,
                   {k: int(v) for k, v in data.get("blocks", {}).items()},
                   {k: tuple(v) for k, v in data.get("heads", {}).items()})


def as_spec(spec) -> PermutationSpec:
    """Accept a PermutationSpec or the plain-dict forms ``from_dict`` reads."""
    if isinstance(spec, PermutationSpec):
        return spec
    if isinstance(spec, Mapping):
        return PermutationSpec.from_dict(spec)
    raise MergescopeError(f"spec: expected a PermutationSpec or a dict, got {type(spec).__name__}")
