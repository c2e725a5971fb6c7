"""AdaMerging (Yang et al., ICLR 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning").

Task arithmetic ``theta = base + sum_i lambda_i tau_i`` with the coefficients *learned*: the merged
model's mean Shannon entropy ``H(p) = -sum_c p_c log p_c`` on unlabeled validation inputs is the
surrogate loss (low entropy correlates with low error), minimised with Adam over the coefficients
only. Task-wise: one ``lambda_i`` per task. Layer-wise: one per task and per parameter tensor
(FusionBench's "layer" is a parameter tensor). Coefficients start at 0.3 (the paper's init) and are
not clamped (FusionBench's default ``clamp_weights: false``).

Buffers (e.g. BatchNorm statistics) and non-float tensors are the base's, as FusionBench's
functional merge leaves them. Labels are never read while learning; accuracies are reported only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..ensemble import as_state
from ..errors import MergescopeError


@dataclass(frozen=True)
class AdaMergeResult:
    """The merged state, the learned coefficients ([T] task-wise or [T, L] layer-wise) and the entropies."""

    state: dict
    coefficients: torch.Tensor
    layers: tuple[str, ...]  # the L parameter names of layer-wise coefficients (all of them task-wise)
    layer_wise: bool
    init: float
    entropy_before: float  # mean val entropy at the initial coefficients (task arithmetic at ``init``)
    entropy_after: float
    entropy_curve: tuple[float, ...]  # batch entropy at each step

    def to_dict(self) -> dict:
        return {"layer_wise": self.layer_wise, "init": self.init, "layers": list(self.layers),
                "coefficients": self.coefficients.tolist(), "entropy_before": self.entropy_before,
                "entropy_after": self.entropy_after, "entropy_curve": list(self.entropy_curve)}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax over the last axis (every other axis is a prediction)."""
    logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]).double(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def task_deltas(base: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]],
                names: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """tau_i = theta_i - base for the named tensors; one line naming a tensor that is missing or differs in shape."""
    deltas = []
    for i, state in enumerate(states):
        delta = {}
        for k in names:
            if k not in state:
                raise MergescopeError(f"adamerging: model {i + 1} has no tensor {k!r}")
            if tuple(state[k].shape) != tuple(base[k].shape):
                raise MergescopeError(f"adamerging: tensor {k!r} of model {i + 1} has shape {list(state[k].shape)}, "
                                      f"the base {list(base[k].shape)}")
            delta[k] = state[k].detach().float() - base[k].detach().float()
        deltas.append(delta)
    return deltas


def combine(base: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]], coefficients: torch.Tensor,
            names: Sequence[str]) -> dict[str, torch.Tensor]:
    """base + sum_i c_i tau_i per tensor (c [T] or [T, L] with column j for ``names[j]``); differentiable in c."""
    per_layer = coefficients if coefficients.dim() == 2 else coefficients[:, None].expand(-1, len(names))
    return {k: base[k].float() + sum(per_layer[i, j] * d[k] for i, d in enumerate(deltas))
            for j, k in enumerate(names)}


def _check(steps: int, lr: float, batch_size: int, n_models: int) -> None:
    if n_models < 1:
        raise MergescopeError("adamerging: give at least one fine-tuned model")
    if int(steps) != steps or steps < 0:
        raise MergescopeError(f"adamerging: steps must be a whole number >= 0, got {steps}")
    if not (lr > 0 and lr < float("inf")):
        raise MergescopeError(f"adamerging: lr must be a positive finite number, got {lr}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise MergescopeError(f"adamerging: batch_size must be a whole number >= 1, got {batch_size}")


def _inputs(task, split: str) -> torch.Tensor:
    xs = [x for x, _ in task.batches(split)]
    if not xs:
        raise MergescopeError(f"adamerging: split {split!r} of task {getattr(task, 'name', task)!r} has no examples")
    return torch.cat(xs)


def adamerge(model: nn.Module, base: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]], task, *,
             layer_wise: bool = False, steps: int = 500, lr: float = 1e-3, init: float = 0.3, seed: int = 0,
             batch_size: int = 16, split: str = "val") -> AdaMergeResult:
    """Learn task-wise or layer-wise task-arithmetic coefficients by entropy minimisation on ``split`` inputs.

    Each step draws ``batch_size`` inputs (order from ``seed``, reshuffled every pass) and takes one Adam
    step on the coefficients; the same inputs and seed give the same coefficients.
    """
    _check(steps, lr, batch_size, len(states))
    base = as_state(base)
    names = tuple(n for n, _ in model.named_parameters() if n in base and base[n].is_floating_point())
    if not names:
        raise MergescopeError("adamerging: the base state has none of the model's parameters")
    deltas = task_deltas(base, [as_state(s) for s in states], names)
    fixed = {k: v for k, v in base.items() if k not in names}
    shape = (len(states), len(names)) if layer_wise else (len(states),)
    coefficients = torch.full(shape, float(init), dtype=torch.float32, requires_grad=True)
    x = _inputs(task, split)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([coefficients], lr=lr)

    def batch_entropy(inputs: torch.Tensor) -> torch.Tensor:
        return entropy(functional_call(model, {**fixed, **combine(base, deltas, coefficients, names)}, (inputs,)))

    was_training = model.training
    model.eval()
    curve: list[float] = []
    try:
        with torch.no_grad():
            before = float(batch_entropy(x))
        order, at = torch.randperm(len(x), generator=generator), 0
        for _ in range(int(steps)):
            if at + batch_size > len(x):
                order, at = torch.randperm(len(x), generator=generator), 0
            loss = batch_entropy(x[order[at:at + batch_size]])
            at += batch_size
            if not bool(torch.isfinite(loss)):
                raise MergescopeError(f"adamerging: the entropy became {float(loss.detach())} at step {len(curve) + 1} "
                                      f"(coefficients {coefficients.detach().flatten()[:4].tolist()}...); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(float(loss.detach()))
        learned = coefficients.detach().clone()
        with torch.no_grad():
            after = float(batch_entropy(x))
            merged = combine(base, deltas, learned, names)
    finally:
        model.train(was_training)
    state = {k: (merged[k].to(v.dtype) if k in merged else v.clone()) for k, v in base.items()}
    return AdaMergeResult(state, learned, names, bool(layer_wise), float(init), before, after, tuple(curve))
