"""Linear paths between two states, loss/accuracy barriers, and pairwise barrier matrices.

Mode convexity (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis";
Entezari et al. 2022): two solutions are linearly connected when the loss along
theta(t) = (1 - t) theta_A + t theta_B never rises above the straight line between the end losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import MergescopeError
from .evaluation import as_state, evaluate_points, has_batchnorm, lerp


def loss_barrier(ts: Sequence[float], losses: Sequence[float]) -> float:
    """max_t [L(t) - ((1 - t) L(0) + t L(1))]: the loss barrier (>= 0, 0 at the endpoints).

    ``ts`` must start at 0 and end at 1; L(0) and L(1) are the first and last values.
    """
    t, v = np.asarray(ts, float), np.asarray(losses, float)
    return float(np.max(v - ((1 - t) * v[0] + t * v[-1])))


def accuracy_barrier(ts: Sequence[float], accuracies: Sequence[float]) -> float:
    """max_t [((1 - t) A(0) + t A(1)) - A(t)]: the accuracy barrier (>= 0, 0 at the endpoints)."""
    t, v = np.asarray(ts, float), np.asarray(accuracies, float)
    return float(np.max(((1 - t) * v[0] + t * v[-1]) - v))


def _tuple(a) -> tuple[float, ...]:
    return tuple(float(x) for x in np.asarray(a).ravel())


@dataclass(frozen=True)
class PathResult:
    """Loss/accuracy at n points of a path on ``split`` and on train; barriers are on ``split``.

    ``naive_*`` hold the same path evaluated with interpolated (not recomputed) BatchNorm
    statistics; they are present only when the model has BatchNorm and ``bn_reset`` was on.
    """

    t: tuple[float, ...]
    split: str
    loss: tuple[float, ...]
    accuracy: tuple[float, ...]
    train_loss: tuple[float, ...]
    train_accuracy: tuple[float, ...]
    bn_reset: bool
    naive_loss: tuple[float, ...] | None = None
    naive_accuracy: tuple[float, ...] | None = None

    @property
    def barrier_loss(self) -> float:
        return loss_barrier(self.t, self.loss)

    @property
    def barrier_acc(self) -> float:
        return accuracy_barrier(self.t, self.accuracy)

    @property
    def train_barrier_loss(self) -> float:
        return loss_barrier(self.t, self.train_loss)

    @property
    def train_barrier_acc(self) -> float:
        return accuracy_barrier(self.t, self.train_accuracy)

    @property
    def naive_barrier_loss(self) -> float | None:
        return None if self.naive_loss is None else loss_barrier(self.t, self.naive_loss)

    @property
    def naive_barrier_acc(self) -> float | None:
        return None if self.naive_accuracy is None else accuracy_barrier(self.t, self.naive_accuracy)

    def to_dict(self) -> dict:
        return {
            "t": list(self.t), "split": self.split, "bn_reset": self.bn_reset,
            "loss": list(self.loss), "accuracy": list(self.accuracy),
            "train_loss": list(self.train_loss), "train_accuracy": list(self.train_accuracy),
            "naive_loss": None if self.naive_loss is None else list(self.naive_loss),
            "naive_accuracy": None if self.naive_accuracy is None else list(self.naive_accuracy),
            "barrier_loss": self.barrier_loss, "barrier_acc": self.barrier_acc,
            "train_barrier_loss": self.train_barrier_loss, "train_barrier_acc": self.train_barrier_acc,
            "naive_barrier_loss": self.naive_barrier_loss, "naive_barrier_acc": self.naive_barrier_acc,
        }


def path_points(n: int) -> np.ndarray:
    """n evenly spaced t in [0, 1], endpoints included."""
    if n < 2:
        raise MergescopeError(f"n={n}: a path needs at least 2 points")
    return np.linspace(0.0, 1.0, n)


def evaluate_path(model: nn.Module, points: dict[str, torch.Tensor], ts: np.ndarray, task, split: str,
                  bn_reset: bool, on_chunk: Callable | None = None) -> PathResult:
    """Evaluate already-stacked path points (linear or curved) into a PathResult."""
    splits = tuple(dict.fromkeys((split, "train")))
    metrics = evaluate_points(model, points, task, splits, bn_reset=bn_reset, on_chunk=on_chunk)
    naive = None
    if bn_reset and has_batchnorm(model):
        naive = evaluate_points(model, points, task, (split,), bn_reset=False)[split]
    return PathResult(
        t=_tuple(ts), split=split, loss=_tuple(metrics[split].loss), accuracy=_tuple(metrics[split].accuracy),
        train_loss=_tuple(metrics["train"].loss), train_accuracy=_tuple(metrics["train"].accuracy), bn_reset=bn_reset,
        naive_loss=None if naive is None else _tuple(naive.loss),
        naive_accuracy=None if naive is None else _tuple(naive.accuracy),
    )


def interpolate(model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], task,
                n: int = 25, split: str = "test", bn_reset: bool = True, on_chunk: Callable | None = None) -> PathResult:
    """Loss and accuracy along theta(t) = (1 - t) A + t B at n points, on ``split`` and on train.

    Parameters and BatchNorm buffers are interpolated; with ``bn_reset`` the BN running statistics
    are then recomputed at every point on the train split (the naive, interpolated-statistics
    variant is reported alongside). ``model`` is a template and is never modified.
    """
    a, b = as_state(model, state_a, "state_a"), as_state(model, state_b, "state_b")
    ts = path_points(n)
    return evaluate_path(model, lerp(a, b, ts), ts, task, split, bn_reset, on_chunk)


@dataclass(frozen=True)
class BarrierMatrix:
    """Symmetric N x N loss and accuracy barriers of the linear paths between N states."""

    names: tuple[str, ...]
    loss: tuple[tuple[float, ...], ...]
    accuracy: tuple[tuple[float, ...], ...]
    split: str
    n: int
    bn_reset: bool
    paths: tuple[PathResult, ...] = ()
    align: str | None = None

    def to_dict(self) -> dict:
        return {"names": list(self.names), "split": self.split, "n": self.n, "bn_reset": self.bn_reset, "align": self.align,
                "barrier_loss": [list(r) for r in self.loss], "barrier_acc": [list(r) for r in self.accuracy],
                "paths": [p.to_dict() for p in self.paths]}


def barrier_matrix(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], task,
                   names: Sequence[str] | None = None, n: int = 25, split: str = "test", bn_reset: bool = True,
                   on_pair: Callable[[int, int], None] | None = None, align: str | None = None,
                   seed: int = 0) -> BarrierMatrix:
    """Pairwise loss/accuracy barriers; each unordered pair's path is computed once.

    ``align`` (a permuting ``mergescope.align`` method: weight, activation, ste, ot) first permutes
    the second model of each pair (i < j) to match the first (``curves.align_endpoint``, seeded by
    ``seed``): the barriers left once permutation symmetry is factored out.
    """
    from .curves import align_endpoint  # curves builds on this module

    if len(states) < 2:
        raise MergescopeError(f"barrier matrix: need at least 2 states, got {len(states)}")
    names = tuple(names) if names is not None else tuple(f"model{i}" for i in range(len(states)))
    if len(names) != len(states):
        raise MergescopeError(f"barrier matrix: {len(names)} names for {len(states)} states")
    loaded = [as_state(model, s, name) for s, name in zip(states, names)]
    ts = path_points(n)
    size = len(loaded)
    loss, acc = np.zeros((size, size)), np.zeros((size, size))
    paths = []
    pairs = [(i, j) for i in range(size) for j in range(i + 1, size)]
    for done, (i, j) in enumerate(pairs):
        other = loaded[j] if align is None else align_endpoint(model, loaded[i], loaded[j], task, align, seed)
        path = evaluate_path(model, lerp(loaded[i], other, ts), ts, task, split, bn_reset)
        loss[i, j] = loss[j, i] = path.barrier_loss
        acc[i, j] = acc[j, i] = path.barrier_acc
        paths.append(path)
        if on_pair is not None:
            on_pair(done + 1, len(pairs))
    return BarrierMatrix(names, tuple(map(_tuple, loss)), tuple(map(_tuple, acc)), split, n, bn_reset, tuple(paths),
                        align)
