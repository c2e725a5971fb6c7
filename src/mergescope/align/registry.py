"""The aligner registry: every alignment method behind one signature and one result type.

``get(name)(spec, a, b, task=None, seed=0, template=None, **params) -> AlignResult``. ``a`` and
``b`` are models (``nn.Module``) or states (then ``template``, a module of the architecture, holds
them when a method needs to run the model). Methods that read data take ``task``'s train split.
An entry returns B aligned to A (``merged=False``, with its permutations) or the merged model
itself (``merged=True``). A new method (e.g. CCA Merge) is one ``Aligner`` in ``REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import MergescopeError


@dataclass(frozen=True)
class AlignResult:
    """``state``: B aligned to A (or, when ``merged``, the merged model itself); ``perms``: index vectors."""

    state: dict[str, torch.Tensor]
    perms: dict[str, torch.Tensor]
    method: str
    merged: bool = False
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "merged": self.merged, "info": dict(self.info),
                "perms": {k: v.tolist() for k, v in self.perms.items()}}


class Endpoint:
    """One side of an alignment: its state, and a module holding it, built only when a method runs it."""

    def __init__(self, value, template: nn.Module | None, role: str):
        self.role, self.template = role, template
        if isinstance(value, nn.Module):
            self._module, self.state = value, value.state_dict()
        elif isinstance(value, Mapping):
            self._module, self.state = None, dict(value)
        else:
            raise MergescopeError(f"align: model {role} must be an nn.Module or a state dict, not {type(value).__name__}")

    @property
    def module(self) -> nn.Module:
        if self._module is None:
            if self.template is None:
                raise MergescopeError(f"align: model {self.role} is a state; this method runs the model, pass template=")
            from ..state import with_state

            self._module = with_state(self.template, self.state, partial=True)
        return self._module


@dataclass(frozen=True)
class Aligner:
    """A registered alignment method: ``run(spec, a, b, task, seed, **params) -> AlignResult``."""

    name: str
    run: Callable
    params: tuple[str, ...] = ()
    needs_data: bool = False
    merges: bool = False
    summary: str = ""
    reference: str = ""

    def __call__(self, spec, a, b, task=None, seed: int = 0, template: nn.Module | None = None,
                 **params) -> AlignResult:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            takes = f"takes {', '.join(self.params)}" if self.params else "takes no parameters"
            raise MergescopeError(f"align: method {self.name!r} {takes}, not {', '.join(unknown)}")
        if self.needs_data and task is None:
            raise MergescopeError(f"align: method {self.name!r} needs data (a task)")
        return self.run(spec, Endpoint(a, template, "A"), Endpoint(b, template, "B"), task, seed, **params)


def _permuted(spec, perm, b: Endpoint, method: str) -> AlignResult:
    from .permute import apply

    return AlignResult(apply(spec, perm, b.state), dict(perm.perms), method, info=dict(perm.info))


def _weight(spec, a, b, task, seed, **params) -> AlignResult:
    from .matching import weight_matching

    return _permuted(spec, weight_matching(spec, a.state, b.state, seed=seed, **params), b, "weight")


def _activation(spec, a, b, task, seed, batch_size: int | None = 512) -> AlignResult:
    from .matching import activation_matching

    perm = activation_matching(spec, a.module, b.module, task.batches("train", batch_size=batch_size), seed=seed)
    return _permuted(spec, perm, b, "activation")


def _ste(spec, a, b, task, seed, **params) -> AlignResult:
    from .ste import ste_matching

    return _permuted(spec, ste_matching(spec, a.module, b.module, task, seed=seed, **params), b, "ste")


def _ot(spec, a, b, task, seed) -> AlignResult:
    from .ot import ot_alignment

    return _permuted(spec, ot_alignment(spec, a.state, b.state), b, "ot")


def _ot_fusion(spec, a, b, task, seed, alpha: float = 0.5, reg: float | None = 0.01) -> AlignResult:
    from .ot import ot_fusion

    fused = ot_fusion(spec, a.state, b.state, alpha=alpha, reg=reg)
    return AlignResult(fused.state, {}, "ot_fusion", merged=True, info=dict(fused.info))


def _zipit(spec, a, b, task, seed, alpha: float = 0.5, batch_size: int | None = 512, unmerged: int = 0,
           **params) -> AlignResult:
    from .zipit import zipit

    if unmerged < 0:
        raise MergescopeError(f"align: unmerged={unmerged}: must be 0 or more")
    merged = zipit(spec, a.module, b.module, task.batches("train", batch_size=batch_size), alpha=alpha, seed=seed,
                   unmerged=unmerged, **params)
    return AlignResult(merged.state, {}, "zipit", merged=True, info=merged.info)


def _cca(spec, a, b, task, seed, alpha: float = 0.5, batch_size: int | None = 512, reg: float = 1e-2,
         reset_bn: bool = True) -> AlignResult:
    from .cca import cca_merge

    merged = cca_merge(spec, a.module, b.module, task.batches("train", batch_size=batch_size), alpha=alpha, reg=reg,
                       reset_bn=reset_bn, seed=seed)
    return AlignResult(merged.state, {}, "cca", merged=True, info=merged.info)


REGISTRY: dict[str, Aligner] = {m.name: m for m in (
    Aligner("weight", _weight, ("max_iter", "init", "only", "restarts"),
            summary="weight matching: permutation maximizing <W_A, P W_B> (Git Re-Basin)", reference="arXiv:2209.04836"),
    Aligner("activation", _activation, ("batch_size",), needs_data=True,
            summary="activation matching: permutation maximizing activation correlation on train data",
            reference="arXiv:2209.04836"),
    Aligner("ste", _ste, ("epochs", "lr", "batch_size"), needs_data=True,
            summary="straight-through estimator: permutation minimizing the midpoint's train loss",
            reference="arXiv:2209.04836"),
    Aligner("ot", _ot, summary="optimal-transport alignment (exact OT: a permutation)", reference="arXiv:1910.05653"),
    Aligner("ot_fusion", _ot_fusion, ("alpha", "reg"), merges=True,
            summary="OT fusion: soft transport of B onto A, then (1 - alpha) A + alpha T B", reference="arXiv:1910.05653"),
    Aligner("zipit", _zipit, ("alpha", "batch_size", "unmerged", "allow_within", "reset_bn"), needs_data=True,
            merges=True, summary="ZipIt!: merge correlated features within and across models",
            reference="arXiv:2305.03053"),
    Aligner("cca", _cca, ("alpha", "batch_size", "reg", "reset_bn"), needs_data=True, merges=True,
            summary="CCA Merge: map B's features into A's by canonical correlation (linear, not a permutation)",
            reference="arXiv:2407.05385"),
)}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Aligner:
    """The aligner called ``name`` (a callable ``(spec, a, b, task=None, seed=0, **params) -> AlignResult``)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise MergescopeError(f"align: unknown method {name!r}; known: {', '.join(names())}") from None
