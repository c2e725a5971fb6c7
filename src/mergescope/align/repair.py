"""REPAIR and BatchNorm statistics reset for interpolated models (Jordan et al. 2023, "REPAIR").

Interpolating two aligned networks shrinks the variance of hidden units ("variance collapse"):
the midpoint's units are averages of imperfectly correlated units. REPAIR rescales every
unit of the interpolated network at mixing weight alpha so that its mean and standard deviation
match the interpolation of the endpoints' statistics,

    mu_target = (1 - alpha) mu_A + alpha mu_B,   sigma_target = (1 - alpha) sigma_A + alpha sigma_B,

folding the per-unit affine correction into the layer that produces the unit (a BatchNorm's
affine, or a Linear/Conv's weight and bias). As in the paper, the corrected statistics are the
per-channel pre-activations (a BatchNorm's output, else the Linear/Conv output before the
nonlinearity) at every such layer, shortcut branches included, measured on the given data, and each
layer is corrected after the ones before it (the paper's exact, forward-pass variant).

A plain BatchNorm reset only recomputes the running statistics on data. In a network whose every
REPAIR point is a BatchNorm output, the reset already sets each unit's mean to the interpolated
beta and its std to |interpolated gamma|, which are within a few percent of the REPAIR targets
(1-2% on the zoo CNN), so REPAIR equals the reset up to noise there: it matters where nothing can
be reset (networks without BatchNorm), the case the paper introduced it for.
Both take their data as a list of input batches (or (input, target) pairs).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..state import reset_batchnorm

NORMS = (nn.modules.batchnorm._BatchNorm,)
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _inputs(batches: Iterable) -> list[torch.Tensor]:
    return [b[0] if isinstance(b, (tuple, list)) else b for b in batches]


def reset_bn_stats(model: nn.Module, batches: Iterable) -> nn.Module:
    """Set every BatchNorm's running mean/var to the exact statistics of its input over ``batches`` (in place).

    ``mergescope.state.reset_batchnorm`` (layer by layer in forward order, eval mode, population
    variance) written into the model's own buffers.
    """
    new = reset_batchnorm(model, model.state_dict(), _inputs(batches))
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")) and name in new:
                buffer.copy_(new[name])
    return model


def repair_points(model: nn.Module, example_input) -> list[str]:
    """Modules whose outputs REPAIR corrects, in forward order: BatchNorms, and Linear/Conv layers
    not followed by a BatchNorm, excluding the layer that produces the model's output."""
    produced, consumed, order = {}, set(), []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, NORMS + LAYERS):
            def hook(mod, args, out, name=name):
                order.append(name)
                produced[id(out)] = name
                if isinstance(mod, NORMS):
                    consumed.add(produced.get(id(args[0])))
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    final = produced.get(id(out))
    modules = dict(model.named_modules())
    points = []
    for name in dict.fromkeys(order):
        if name == final or name in consumed:
            continue
        if getattr(modules[name], "weight", None) is None or (isinstance(modules[name], LAYERS) and modules[name].bias is None):
            continue
        points.append(name)
    return points


def _channel_dim(module: nn.Module, out: torch.Tensor) -> int:
    return out.dim() - 1 if isinstance(module, nn.Linear) else (1 if out.dim() > 1 else 0)


@torch.no_grad()
def channel_stats(model: nn.Module, names: list[str], batches: Iterable) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-unit mean and standard deviation of the named modules' outputs over ``batches`` (eval mode)."""
    modules = dict(model.named_modules())
    sums: dict[str, list] = {}
    hooks = []
    for name in names:
        def hook(mod, args, out, name=name):
            d = _channel_dim(mod, out)
            y = out.movedim(d, -1).reshape(-1, out.shape[d]).to(torch.float64)
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += y.shape[0]
            s[1] = s[1] + y.sum(0)
            s[2] = s[2] + (y * y).sum(0)
        hooks.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for x in _inputs(batches):
            model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    stats = {}
    for name, (n, s1, s2) in sums.items():
        mean = s1 / n
        stats[name] = (mean, (s2 / n - mean * mean).clamp_min(0).sqrt())
    return stats


@torch.no_grad()
def _correct(module: nn.Module, mean, std, target_mean, target_std) -> None:
    """Fold y -> (y - mean) * target_std / std + target_mean into the module's parameters."""
    ratio = (target_std / (std + 1e-8)).to(module.weight.dtype)
    shape = (-1,) + (1,) * (module.weight.dim() - 1)
    module.weight.mul_(ratio.reshape(shape))
    if module.bias is not None:
        module.bias.copy_((module.bias - mean.to(module.bias.dtype)) * ratio + target_mean.to(module.bias.dtype))


def repair(model: nn.Module, model_a: nn.Module, model_b: nn.Module, batches: Iterable, alpha: float = 0.5,
           example_input=None) -> nn.Module:
    """REPAIR the interpolated ``model`` (in place) at mixing weight ``alpha`` between A and aligned B."""
    batches = _inputs(batches)
    example = batches[0] if example_input is None else example_input
    reset_bn_stats(model, batches)
    points = repair_points(model, example)
    stats_a, stats_b = channel_stats(model_a, points, batches), channel_stats(model_b, points, batches)
    modules = dict(model.named_modules())
    for name in points:  # in forward order: each correction sees the ones before it
        mean, std = channel_stats(model, [name], batches)[name]
        (ma, sa), (mb, sb) = stats_a[name], stats_b[name]
        _correct(modules[name], mean, std, (1 - alpha) * ma + alpha * mb, (1 - alpha) * sa + alpha * sb)
    return model
