"""Data-aware merging: methods that need the model and some calibration data, not just tensors.

- Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging"):
  theta* = sum_i l_i F_i * theta_i / sum_i l_i F_i, elementwise, with F_i the diagonal
  *empirical* Fisher E_(x,y)[(d log p(y|x) / d theta)^2] of model i on its data (true labels).
  It is the maximum of the sum of the models' Laplace-approximated posteriors.
- RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"):
  for every ``nn.Linear``, W* = argmin_W sum_i ||X_i W^T - X_i W_i^T||^2, solved in closed form
  W*^T = (sum_i G_i)^-1 sum_i G_i W_i^T with G_i = X_i^T X_i the Gram matrix of the layer's inputs
  in model i. Off-diagonal entries of every G_i are scaled by ``alpha`` (the paper's remedy for
  ill-conditioning): G~ = alpha G + (1 - alpha) diag(G). The bias is solved jointly by appending
  a constant 1 to the inputs (so alpha = 1 is exactly least squares on the concatenated data).
  Everything that is not a Linear weight/bias (convs, norms, embeddings, buffers) is averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..ensemble import as_state, average_states, normalized_weights
from ..errors import MergescopeError


# ---------------------------------------------------------------- calibration data

def calibration_batches(task, split: str = "train", n_examples: int | None = None, batch_size: int = 128):
    """The first ``n_examples`` of a split (all when None) in batches, in a fixed order."""
    seen = 0
    for x, y in task.batches(split, batch_size=batch_size):
        if n_examples is not None:
            if seen >= n_examples:
                return
            x, y = x[: n_examples - seen], y[: n_examples - seen]
        seen += len(y)
        yield x, y


# ---------------------------------------------------------------- Fisher merging

def diagonal_fisher(model: nn.Module, state: Mapping[str, torch.Tensor], task, split: str = "train",
                    n_examples: int | None = None, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of every parameter: mean over examples of the squared per-example
    gradient of -log p(y|x) (true labels), computed with torch.func.vmap in eval mode."""
    names = {n for n, _ in model.named_parameters()}
    state = as_state(state)
    params = {k: v.detach().float() for k, v in state.items() if k in names}
    buffers = {k: v for k, v in state.items() if k not in names}

    def example_loss(p, x, y):
        return F.cross_entropy(functional_call(model, {**p, **buffers}, (x[None],)), y[None])

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    fisher = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in calibration_batches(task, split, n_examples, batch_size):
            grads = per_example(params, x, y)
            for k, g in grads.items():
                fisher[k] += g.double().pow(2).sum(0)
            count += len(y)
    finally:
        model.train(was_training)
    if count == 0:
        raise MergescopeError(f"fisher: split {split!r} gave no examples")
    return {k: (v / count).to(params[k].dtype) for k, v in fisher.items()}


def fisher_weighted_average(states: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]],
                            weights: Sequence[float] | None = None, floor: float = 1e-6) -> dict[str, torch.Tensor]:
    """theta* = sum_i l_i (F_i + floor) theta_i / sum_i l_i (F_i + floor) for tensors with a Fisher;
    the rest (buffers, e.g. BatchNorm statistics) is the l-weighted average."""
    n = len(states)
    if len(fishers) != n:
        raise MergescopeError(f"fisher merge: {n} states but {len(fishers)} Fishers")
    lam = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else normalized_weights(weights, n)
    merged = average_states(states, lam.tolist())
    for name in fishers[0]:
        num = sum(float(lam[i]) * (fishers[i][name].double() + floor) * states[i][name].double() for i in range(n))
        den = sum(float(lam[i]) * (fishers[i][name].double() + floor) for i in range(n))
        merged[name] = (num / den).to(states[0][name].dtype)
    return merged


def fisher_merge(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], task, weights: Sequence[float] | None = None,
                 split: str = "train", n_examples: int | None = None, batch_size: int = 128, floor: float = 1e-6,
                 tasks: Sequence | None = None) -> dict[str, torch.Tensor]:
    """Fisher-weighted merge of ``states``; model i's Fisher uses ``tasks[i]`` if given, else ``task``."""
    if not states:
        raise MergescopeError("fisher merge: no states given")
    states = [as_state(s) for s in states]
    per_model = list(tasks) if tasks is not None else [task] * len(states)
    fishers = [diagonal_fisher(model, s, t, split, n_examples, batch_size) for s, t in zip(states, per_model)]
    return fisher_weighted_average(states, fishers, weights, floor)


# ---------------------------------------------------------------- RegMean

def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def input_grams(model: nn.Module, state: Mapping[str, torch.Tensor], task, split: str = "train",
                n_examples: int | None = None, batch_size: int = 128) -> dict[str, torch.Tensor]:
    """Per Linear layer, the Gram matrix X^T X of its inputs (with a ones column when the layer has
    a bias) under ``state``; token dimensions count as extra rows. Sums, as in the paper, so a
    model calibrated on more data weighs more (least squares on the concatenated data)."""
    layers = linear_layers(model)
    sums: dict[str, torch.Tensor] = {}

    def hook(name, module):
        def record(_, args):
            x = args[0].detach().reshape(-1, module.in_features).double()
            if module.bias is not None:
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            sums[name] = sums.get(name, 0) + x.T @ x
        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for x, _ in calibration_batches(task, split, n_examples, batch_size):
            functional_call(model, as_state(state), (x,), strict=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sums


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G~ = alpha * G + (1 - alpha) * diag(G) (RegMean's off-diagonal scaling)."""
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_solve(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 0.9,
                  ridge: float = 1e-6) -> torch.Tensor:
    """W*^T = (sum_i G~_i + eps I)^-1 (sum_i G~_i W_i^T + eps W_avg^T) for weights [out, in], Grams [in, in].

    The tiny ridge eps = ridge * mean(diag(sum G~)) pulls directions the data never spans (for
    example always-zero pixels) to the plain average instead of leaving them undetermined.
    """
    g = [shrink_off_diagonal(gi.double(), alpha) for gi in grams]
    lhs = sum(g)
    eps = ridge * torch.diagonal(lhs).mean().clamp_min(1e-12)
    mean_w = torch.stack([w.double() for w in weights]).mean(0)
    rhs = sum(gi @ w.double().T for gi, w in zip(g, weights)) + eps * mean_w.T
    solution = torch.linalg.solve(lhs + eps * torch.eye(len(lhs), dtype=lhs.dtype), rhs)
    return solution.T.to(weights[0].dtype)


def regmean_merge(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], task, alpha: float = 0.9,
                  split: str = "train", n_examples: int | None = None, batch_size: int = 128,
                  tasks: Sequence | None = None) -> dict[str, torch.Tensor]:
    """RegMean merge of ``states``: Linear layers in closed form from each model's own input Grams
    (on ``tasks[i]`` if given, else ``task``); every other tensor averaged uniformly."""
    if not states:
        raise MergescopeError("regmean: no states given")
    if not 0.0 <= alpha <= 1.0:
        raise MergescopeError(f"regmean: alpha must be in [0, 1], got {alpha}")
    states = [as_state(s) for s in states]
    per_model = list(tasks) if tasks is not None else [task] * len(states)
    grams = [input_grams(model, s, t, split, n_examples, batch_size) for s, t in zip(states, per_model)]
    merged = average_states(states)
    for name, layer in linear_layers(model).items():
        if name not in grams[0]:
            continue  # layer never ran on the calibration data: keep the average
        stacked = [_augmented(s, name, layer) for s in states]
        solved = regmean_solve(stacked, [g[name] for g in grams], alpha)
        merged[f"{name}.weight"] = solved[:, : layer.in_features].contiguous()
        if layer.bias is not None:
            merged[f"{name}.bias"] = solved[:, layer.in_features].contiguous()
    return merged


def _augmented(state: Mapping[str, torch.Tensor], name: str, layer: nn.Linear) -> torch.Tensor:
    """[W | b] of a Linear layer (just W without a bias)."""
    w = state[f"{name}.weight"]
    return torch.cat([w, state[f"{name}.bias"][:, None]], 1) if layer.bias is not None else w


__all__ = ["calibration_batches", "diagonal_fisher", "fisher_merge", "fisher_weighted_average", "input_grams",
           "regmean_merge", "regmean_solve", "shrink_off_diagonal"]
