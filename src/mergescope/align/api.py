"""One entry point over the alignment methods, for the CLI and for scripts comparing methods."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import MergescopeError
from .permute import apply


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


def interpolate_states(state_a: Mapping, state_b: Mapping, alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) A + alpha B for floating tensors; integer buffers (BN batch counters) from A."""
    return {k: torch.lerp(state_a[k], state_b[k].to(state_a[k].dtype), alpha) if state_a[k].is_floating_point()
            else state_a[k] for k in state_a}


def align_models(spec, model_a: nn.Module, model_b: nn.Module, method: str = "weight", task=None, seed: int = 0,
                 alpha: float = 0.5, batch_size: int = 512, unmerged: int = 0) -> AlignResult:
    """Run one alignment method; data-driven ones read ``task``'s train split.

    ``unmerged`` (zipit only): leave the last K unit groups unmerged (partial zipping, a widened state).
    """
    from . import matching

    sa, sb = model_a.state_dict(), model_b.state_dict()
    if method in ("activation", "ste", "zipit") and task is None:
        raise MergescopeError(f"align: method {method!r} needs data (a task)")
    if unmerged and method != "zipit":
        raise MergescopeError(f"align: unmerged={unmerged} applies to method 'zipit' only, not {method!r}")
    if method == "weight":
        perm = matching.weight_matching(spec, sa, sb, seed=seed)
    elif method == "activation":
        perm = matching.activation_matching(spec, model_a, model_b, task.batches("train", batch_size=batch_size), seed=seed)
    elif method == "ste":
        from .ste import ste_matching

        perm = ste_matching(spec, model_a, model_b, task, seed=seed)
    elif method == "ot":
        from .ot import ot_alignment

        perm = ot_alignment(spec, sa, sb)
    elif method == "zipit":
        from .zipit import zipit

        merged = zipit(spec, model_a, model_b, task.batches("train", batch_size=batch_size), alpha=alpha, seed=seed,
                       unmerged=unmerged)
        return AlignResult(merged.state, {}, "zipit", merged=True, info=merged.info)
    else:
        raise MergescopeError(f"align: unknown method {method!r} (weight, activation, ste, ot, zipit)")
    return AlignResult(apply(spec, perm, sb), dict(perm.perms), method, info=dict(perm.info))
