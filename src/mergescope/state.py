"""One place for what every family does to whole states: average, interpolate, hold, normalise.

- ``average(states, weights)``: sum_i w_i theta_i (weights normalised to sum 1) of the floating
  tensors, accumulated in float64 and rounded once to each tensor's dtype; integer buffers (BN
  batch counters) are taken from the first state. Weight soups, MergeMany's mean, data-aware
  merges and the ensemble's weight average all use it.
- ``interpolate(a, b, alpha)``: (1 - alpha) A + alpha B with ``torch.lerp`` (the two-point path of
  alignment and REPAIR); integer buffers from A.
- ``per_tensor(fn, states, base)``: a per-tensor merge method applied to whole states.
- ``with_state(module, state)``: a copy of a module template holding a state, in eval mode.
- ``example_input(task)``: the example input every ``permutation_spec`` is derived from: the first
  ``EXAMPLES`` (8) examples of the task's train split. A spec depends only on the model's
  structure and the input's shape, so this rule fixes the spec, never a number.
- ``reset_batchnorm(model, state, batches)``: the one BatchNorm reset (see its docstring).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .errors import MergescopeError

State = Mapping[str, torch.Tensor]
EXAMPLES = 8
NORMS = (nn.modules.batchnorm._BatchNorm,)


def normalized_weights(weights: Sequence[float], n: int) -> torch.Tensor:
    """``n`` non-negative weights scaled to sum to 1 (float64); anything else is a user error."""
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if w.numel() != n or (w < 0).any() or w.sum() <= 0:
        raise MergescopeError(f"weights {list(weights)}: need {n} non-negative numbers with a positive sum")
    return w / w.sum()


def average(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Weighted mean of floating tensors, sum_i w_i theta_i with sum w = 1; integer buffers from the first."""
    if not states:
        raise MergescopeError("average: no states given")
    n = len(states)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else normalized_weights(weights, n)
    out = {}
    for name in states[0]:
        first = states[0][name]
        if not torch.is_floating_point(first):
            out[name] = first.clone()
            continue
        acc = sum(float(w[i]) * states[i][name].to(torch.float64) for i in range(n))
        out[name] = acc.to(first.dtype)
    return out


def interpolate(state_a: State, state_b: State, alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) A + alpha B for floating tensors (``torch.lerp``); integer buffers from A."""
    return {k: torch.lerp(state_a[k], state_b[k].to(state_a[k].dtype), alpha) if state_a[k].is_floating_point()
            else state_a[k] for k in state_a}


def per_tensor(fn: Callable, states: Sequence[State], base: State | None = None, **params) -> dict[str, torch.Tensor]:
    """``fn(tensors, base_tensor, **params)`` on every floating tensor; integer buffers from the first state."""
    return {name: fn([s[name] for s in states], None if base is None else base[name], **params)
            if first.is_floating_point() else first.clone() for name, first in states[0].items()}


def with_state(module: nn.Module, state: State, partial: bool = False) -> nn.Module:
    """A copy of the template holding ``state``, in eval mode (``partial``: keys it lacks stay the template's)."""
    net = copy.deepcopy(module)
    net.load_state_dict({**net.state_dict(), **dict(state)} if partial else state)
    return net.eval()


def example_input(task, n: int = EXAMPLES) -> torch.Tensor:
    """The first ``n`` examples of ``task``'s train split: the input every permutation spec is traced on."""
    x, _ = next(iter(task.batches("train")))
    return x[:n]


def inputs(batches: Iterable) -> list[torch.Tensor]:
    """Input tensors of ``batches`` (inputs, or (input, target) pairs)."""
    return [b[0] if isinstance(b, (tuple, list)) else b for b in batches]


def batchnorm_names(model: nn.Module, state: State, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """BatchNorm layers with running statistics, in the order a forward pass reaches them."""
    order, hooks = [], []
    for name, m in model.named_modules():
        if isinstance(m, NORMS) and m.track_running_stats:
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: order.append((name, mod))))
    if not hooks:
        return []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            functional_call(model, dict(state), (example,), strict=False)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


@torch.no_grad()
def reset_batchnorm(model: nn.Module, state: State, batches: Iterable) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose BatchNorm running statistics are those of its own activations on ``batches``.

    The one statistic mergescope uses (ensemble weight averages, landscape paths, alignment,
    ZipIt!, REPAIR): layer by layer in forward order, in eval mode, each BatchNorm's running mean
    and *population* variance become the exact per-channel mean and variance of its input over all
    of ``batches``, with the layers before it already reset. It is what the deployed (eval-mode)
    network then sees, it does not depend on how the data is split into batches, and an averaged
    or interpolated model's stored statistics are not its own otherwise (Jordan et al. 2023,
    REPAIR). Costs one pass over the data per BatchNorm layer. ``model`` is a template (its hooks
    are removed, its tensors untouched); a state without BatchNorm comes back as an unchanged copy.
    """
    state = {k: v.clone() for k, v in state.items()}
    xs = inputs(batches)
    if not xs:
        raise MergescopeError("reset_batchnorm: no batches given")
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, NORMS) and m.track_running_stats]
    if len(xs) > 1:  # layer by layer needs the forward order (one batch: the hooks fire in it)
        norms = batchnorm_names(model, state, xs[0])
    for name, norm in norms:  # the buffers live in ``state`` (never in the template) while a pass runs
        for stat in ("running_mean", "running_var"):
            key = _key(name, stat)
            state[key] = state[key] if key in state else getattr(norm, stat).clone()
    was_training = model.training
    model.eval()
    try:
        if len(xs) == 1:  # one batch: each layer's hook sets its statistics before it runs, one pass in all
            _one_pass(model, state, xs[0], norms)
        else:
            for name, norm in norms:
                _one_pass(model, state, xs, [(name, norm)])
    finally:
        model.train(was_training)
    return state


def _key(name: str, stat: str) -> str:
    return f"{name}.{stat}" if name else stat


def _one_pass(model: nn.Module, state: dict, xs, norms: list[tuple[str, nn.Module]]) -> None:
    """Set the listed BatchNorms' statistics in ``state`` from their inputs over ``xs`` (a batch or a list).

    With one batch every listed layer is set in the same forward pass (its pre-hook runs before it
    normalizes, after the layers before it were set); with a list, only one layer may be listed.
    """
    many = isinstance(xs, list)

    def statistics(x: torch.Tensor, sums: list) -> None:
        x = x.movedim(1, -1).reshape(-1, x.shape[1]).to(torch.float64)
        sums[0] += x.shape[0]
        sums[1] = sums[1] + x.sum(0)
        sums[2] = sums[2] + (x * x).sum(0)

    def store(name: str, sums: list) -> None:
        mean = sums[1] / sums[0]
        for stat, value in (("running_mean", mean), ("running_var", (sums[2] / sums[0] - mean * mean).clamp_min(0))):
            key = _key(name, stat)
            state[key].copy_(value)  # in place: in the one-pass case the layer reads this very tensor next

    handles, all_sums = [], {}
    for name, norm in norms:
        all_sums[name] = sums = [0, 0.0, 0.0]

        def hook(mod, args, name=name, sums=sums):
            statistics(args[0], sums)
            if not many:
                store(name, sums)

        handles.append(norm.register_forward_pre_hook(hook))
    try:
        for x in (xs if many else [xs]):
            functional_call(model, state, (x,), strict=False)
    finally:
        for h in handles:
            h.remove()
    if many:
        for name, sums in all_sums.items():
            store(name, sums)
