"""One entry point over the alignment methods (the registry), for the CLI and for scripts comparing methods."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import MergescopeError
from ..state import interpolate
from .registry import AlignResult, get

__all__ = ["AlignResult", "align_models", "interpolate_states"]


def interpolate_states(state_a: Mapping, state_b: Mapping, alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) A + alpha B for floating tensors; integer buffers from A (``mergescope.state.interpolate``)."""
    return interpolate(state_a, state_b, alpha)


def align_models(spec, model_a: nn.Module, model_b: nn.Module, method: str = "weight", task=None, seed: int = 0,
                 alpha: float = 0.5, batch_size: int = 512, unmerged: int = 0, repair: bool = False,
                 **params) -> AlignResult:
    """Run one registered alignment method (``mergescope.align.get(method)``); data-driven ones read ``task``'s train split.

    ``alpha`` is the mixing weight of B for methods that merge (zipit, ot_fusion) and for ``repair``;
    ``batch_size`` applies to the methods that read batches; ``unmerged`` (zipit only): leave the
    last K unit groups unmerged (partial zipping, a widened state). ``repair``: return the REPAIRed
    interpolation (1 - alpha) A + alpha B_aligned (``merged=True``, ``info["repair"]``); a method
    that already merges is returned as it is. ``params``: the method's own parameters (ste: epochs,
    lr; cca, ot_fusion: reg; ...), refused by the registry when the method does not take them.
    """
    if not 0.0 <= alpha <= 1.0:
        raise MergescopeError(f"align: alpha={alpha}: must be within [0, 1]")
    aligner = get(method)
    given = {"alpha": alpha, "batch_size": batch_size}
    params = {**{k: v for k, v in given.items() if k in aligner.params}, **params}
    if unmerged:
        params["unmerged"] = unmerged
    result = aligner(spec, model_a, model_b, task=task, seed=seed, **params)
    if repair and not result.merged:
        result = repaired(result, model_a, task, alpha)
    return result


def repaired(result: AlignResult, model_a: nn.Module, task, alpha: float = 0.5) -> AlignResult:
    """The REPAIRed interpolation between A and the aligned B of ``result`` (Jordan et al. 2023), on train data."""
    from ..state import with_state
    from .repair import repair

    if task is None:
        raise MergescopeError("align: REPAIR needs data (a task)")
    merged = with_state(model_a, interpolate(model_a.state_dict(), result.state, alpha))
    aligned_b = with_state(model_a, result.state)
    batches = [x for x, _ in task.batches("train")]
    state = repair(merged, model_a, aligned_b, batches, alpha=alpha).state_dict()
    return AlignResult(state, result.perms, result.method, merged=True, info={**result.info, "repair": True, "alpha": alpha})
