"""Evaluate many weight vectors of one architecture (stacked states, torch.func.functional_call).

Every landscape measurement (paths, curves, planes) reduces to "loss and accuracy of the model at
P points in weight space". The P states are stacked along a leading axis and built chunk by
chunk; no model is copied or reloaded per point. Each chunk runs either as one
``vmap``-ed ``functional_call`` (batched matmuls; the fast choice on GPU) or as a loop of
``functional_call`` over the chunk's points (usually faster on CPU, where plain GEMMs beat batched
ones: 1.3-2.2x on the zoo models, one thread; see docs/landscape.md). ``vectorize=None`` picks
vmap on CUDA inputs and the loop on CPU. Cost is linear in points x examples either way.

The caller's model is only a template: it is deep-copied, never run or modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from ..errors import MergescopeError
from ..tasks.checkpoints import load_state_into

State = Mapping[str, torch.Tensor]
Stack = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SplitMetrics:
    """Per-point mean loss and accuracy on one split (arrays of length P)."""

    loss: np.ndarray
    accuracy: np.ndarray


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm layers that keep running statistics (the ones interpolation breaks)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_modules(model))


def working_copy(model: nn.Module) -> nn.Module:
    """A private eval-mode copy without grads, so the caller's module is never touched."""
    net = copy.deepcopy(model)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
        p.grad = None
    return net


def float_keys(model: nn.Module) -> list[str]:
    """State keys that live in weight space (parameters and float buffers; not step counters)."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def as_state(model: nn.Module, state: State, source: str = "state") -> dict[str, torch.Tensor]:
    """Validate ``state`` against ``model`` (one-line errors) and return its float tensors, float32.

    Lazy checkpoints are read once here.
    """
    probe = working_copy(model)
    load_state_into(probe, state, str(getattr(state, "path", source)))
    full = probe.state_dict()
    return {k: full[k].detach().clone().float() for k in float_keys(model)}


def stack(states: Sequence[Mapping[str, torch.Tensor]]) -> Stack:
    """Stack P states key by key into tensors with a leading axis of size P."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}


def lerp(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], ts: Iterable[float]) -> Stack:
    """Points (1 - t) a + t b for each t, stacked: the linear path of Frankle et al. / Garipov et al."""
    t = torch.as_tensor(list(ts), dtype=torch.float32)
    return {k: a[k][None] + t.reshape(-1, *([1] * a[k].dim())) * (b[k] - a[k])[None] for k in a}


def tied_aliases(model: nn.Module) -> frozenset[str]:
    """Second names of tied parameters (GPT-2's lm_head.weight = transformer.wte.weight): the state lists
    both, the module holds one tensor."""
    canonical = {n for n, _ in model.named_parameters()}
    return frozenset(n for n, _ in model.named_parameters(remove_duplicate=False) if n not in canonical)


def _forward(net: nn.Module, chunk: Stack, x: torch.Tensor, vectorize: bool | None = None) -> torch.Tensor:
    """Outputs [P, N, ...] of the P states in ``chunk`` on the same inputs (vmap or a loop, see above)."""
    aliases = tied_aliases(net)
    if aliases:  # functional_call ties the twins itself and refuses two values for one tied parameter
        chunk = {k: v for k, v in chunk.items() if k not in aliases}

    def one(weights, inputs):
        return functional_call(net, weights, (inputs,), strict=False)

    if vectorize is None:
        vectorize = x.is_cuda
    if vectorize:
        return vmap(one, in_dims=(0, None))(chunk, x)
    size = next(iter(chunk.values())).shape[0]
    return torch.stack([one({k: v[i] for k, v in chunk.items()}, x) for i in range(size)])


def recompute_batchnorm(net: nn.Module, chunk: Stack, task, split: str = "train", vectorize: bool | None = None
                        ) -> Stack:
    """Replace the running statistics of every point by those of its own activations on ``split``.

    Interpolating BN running statistics does not give the statistics of the interpolated network
    (the variance collapses along the path; Jordan et al. 2023, "REPAIR"). Each point is reset by
    ``mergescope.state.reset_batchnorm``: exact per-layer mean and population variance over the
    whole split, layer by layer in eval mode (one point at a time; ``vectorize`` is not used here).
    """
    from ..state import reset_batchnorm

    bns = batchnorm_modules(net)
    if not bns:
        return chunk
    keys = [f"{n}.{s}" for n, _ in bns for s in ("running_mean", "running_var")]
    xs = [x for x, _ in task.batches(split)]
    if not xs:
        raise MergescopeError(f"task {getattr(task, 'name', task)}: split {split!r} is empty; cannot recompute BatchNorm")
    size = next(iter(chunk.values())).shape[0]
    points = [reset_batchnorm(net, {k: v[i] for k, v in chunk.items()}, xs) for i in range(size)]
    return {**chunk, **{k: torch.stack([p[k] for p in points]) for k in keys}}


def split_metrics(net: nn.Module, chunk: Stack, task, split: str, batches: int | None = None,
                  vectorize: bool | None = None) -> SplitMetrics:
    """Mean task loss and accuracy over ``split`` (or its first ``batches`` batches) for each point.

    A task with ``token_sums`` (language-model loss, ``tasks.files.TokenLMTask``) is averaged over its
    scored tokens, as its own ``evaluate`` does; any other over examples."""
    points = next(iter(chunk.values())).shape[0]
    loss_sum = torch.zeros(points, dtype=torch.float64)
    correct = torch.zeros(points, dtype=torch.float64)
    count = 0.0
    token_sums = getattr(task, "token_sums", None)
    with torch.no_grad():
        for i, (x, y) in enumerate(task.batches(split)):
            if batches is not None and i >= batches:
                break
            out = _forward(net, chunk, x, vectorize)
            if token_sums is not None:  # [P, 3]: summed loss, correct, scored tokens (the same for every point)
                sums = torch.stack([token_sums(o, y) for o in out])
                loss_sum += sums[:, 0]
                correct += sums[:, 1]
                count += float(sums[0, 2])
                continue
            loss_sum += torch.stack([task.loss(o, y) for o in out]).double() * len(y)
            if out.dim() >= 3:
                correct += (out.argmax(-1) == y).double().sum(-1)
            else:  # not a classifier: accuracy is undefined
                correct += float("nan")
            count += len(y)
    if count == 0:
        raise MergescopeError(f"task {getattr(task, 'name', task)}: split {split!r} is empty")
    return SplitMetrics((loss_sum / count).numpy(), (correct / count).numpy())


def evaluate_points(model: nn.Module, points: Stack, task, splits: Sequence[str] = ("test",),
                    bn_reset: bool = True, chunk_size: int = 32, batches: int | None = None,
                    on_chunk=None, vectorize: bool | None = None) -> dict[str, SplitMetrics]:
    """Loss and accuracy of each of the P stacked states on each split.

    ``bn_reset`` recomputes BatchNorm statistics per point on the train split first (no-op for
    models without BatchNorm). ``on_chunk(done, total)`` reports progress. ``vectorize``: vmap
    (True), loop (False) or by device (None).
    """
    total = next(iter(points.values())).shape[0]
    return evaluate_lazy(model, total, lambda lo, hi: {k: v[lo:hi] for k, v in points.items()}, task, splits,
                         bn_reset, chunk_size, batches, on_chunk, vectorize)


def evaluate_lazy(model: nn.Module, total: int, make_chunk: Callable[[int, int], Stack], task,
                  splits: Sequence[str] = ("test",), bn_reset: bool = True, chunk_size: int = 32,
                  batches: int | None = None, on_chunk=None, vectorize: bool | None = None
                  ) -> dict[str, SplitMetrics]:
    """Like ``evaluate_points`` but points [lo, hi) are built on demand by ``make_chunk(lo, hi)``.

    Memory stays at one chunk of states however many points there are (planes of big models).
    """
    net = working_copy(model)
    parts: dict[str, list[SplitMetrics]] = {s: [] for s in splits}
    for start in range(0, total, chunk_size):
        chunk = make_chunk(start, min(start + chunk_size, total))
        if bn_reset:
            chunk = recompute_batchnorm(net, chunk, task, vectorize=vectorize)
        for s in splits:
            parts[s].append(split_metrics(net, chunk, task, s, batches, vectorize))
        if on_chunk is not None:
            on_chunk(min(start + chunk_size, total), total)
    return {s: SplitMetrics(np.concatenate([p.loss for p in ps]), np.concatenate([p.accuracy for p in ps]))
            for s, ps in parts.items()}
