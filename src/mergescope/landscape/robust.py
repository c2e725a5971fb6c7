"""Robust (adversarial) loss along paths and curves: Tatro et al. 2020's robust loss barrier.

At each point theta(t) the loss is taken on PGD adversarial inputs (Madry et al. 2018):
x_{k+1} = clip_{x, eps}(x_k + alpha sign(grad_x L(theta(t); x_k, y))), an L-infinity attack of
radius ``eps`` in input units, starting at x (deterministic). The barrier definitions are those
of ``paths`` applied to the robust loss and robust accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..errors import MergescopeError
from .evaluation import Stack, as_state, has_batchnorm, lerp, recompute_batchnorm, working_copy
from .paths import PathResult, path_points


def pgd(net: nn.Module, weights: Mapping, task, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
        step_size: float) -> torch.Tensor:
    """L-infinity PGD from x (no random start): ``steps`` signed-gradient ascent steps, projected."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = task.loss(functional_call(net, dict(weights), (adv,)), y)
        (g,) = torch.autograd.grad(loss, adv)
        adv = (x + (adv.detach() + step_size * g.sign() - x).clamp(-eps, eps)).detach()
    return adv


def robust_metrics(model: nn.Module, points: Stack, task, split: str, eps: float, steps: int,
                   step_size: float | None, bn_reset: bool) -> tuple[np.ndarray, np.ndarray]:
    """Adversarial mean loss and accuracy of each stacked state on ``split``."""
    net = working_copy(model)
    if bn_reset:
        points = recompute_batchnorm(net, points, task)
    alpha = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    size = next(iter(points.values())).shape[0]
    losses, accs = np.zeros(size), np.zeros(size)
    for i in range(size):
        weights = {k: v[i] for k, v in points.items()}
        total = correct = count = 0.0
        for x, y in task.batches(split):
            adv = pgd(net, weights, task, x, y, eps, steps, alpha) if eps > 0 and steps > 0 else x
            with torch.no_grad():
                out = functional_call(net, weights, (adv,))
                total += float(task.loss(out, y)) * len(y)
                correct += float((out.argmax(-1) == y).sum())
                count += len(y)
        losses[i], accs[i] = total / count, correct / count
    return losses, accs


def robust_interpolate(model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                       task, n: int = 11, split: str = "test", eps: float = 0.1, steps: int = 5,
                       step_size: float | None = None, bn_reset: bool = True) -> PathResult:
    """The linear path evaluated on PGD adversarial examples; its barriers are the robust barriers.

    ``train_*`` fields hold the robust values on the train split. Default step size 2.5 eps/steps.
    """
    a, b = as_state(model, state_a, "state_a"), as_state(model, state_b, "state_b")
    ts = path_points(n)
    return robust_path(model, lerp(a, b, ts), ts, task, split, eps, steps, step_size, bn_reset)


def robust_path(model: nn.Module, points: Stack, ts, task, split: str = "test", eps: float = 0.1, steps: int = 5,
                step_size: float | None = None, bn_reset: bool = True) -> PathResult:
    """Robust loss/accuracy at already-stacked path points (a line or a fitted curve)."""
    if eps < 0 or steps < 0:
        raise MergescopeError(f"robust path: eps={eps} and steps={steps} must be >= 0")
    test_loss, test_acc = robust_metrics(model, points, task, split, eps, steps, step_size, bn_reset)
    train_loss, train_acc = robust_metrics(model, points, task, "train", eps, steps, step_size, bn_reset)
    as_tuple = lambda v: tuple(float(x) for x in v)  # noqa: E731
    return PathResult(t=as_tuple(ts), split=split, loss=as_tuple(test_loss), accuracy=as_tuple(test_acc),
                      train_loss=as_tuple(train_loss), train_accuracy=as_tuple(train_acc),
                      bn_reset=bn_reset and has_batchnorm(model))
