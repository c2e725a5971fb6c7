"""Instability analysis (determinism): how early does training commit to one linearly connected basin?

Frankle et al. 2020 ("Linear Mode Connectivity and the Lottery Ticket Hypothesis"): train a
parent for k epochs, copy it (weights, optimizer and schedule state) into two children that
finish the same run with different data orders, and measure the barrier between the children.
A barrier near zero from some k on means SGD noise after k no longer changes the basin.

One optimizer + one-cycle schedule spans the whole run, so a child at epoch k continues exactly
where the parent was; ``tasks.train`` cannot be resumed mid-schedule, hence the small loop here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MergescopeError
from .paths import PathResult, interpolate


@dataclass(frozen=True)
class StabilityResult:
    """Barrier between two children spawned at each k (epochs of parent training)."""

    ks: tuple[int, ...]
    epochs: int
    barrier_loss: tuple[float, ...]
    barrier_acc: tuple[float, ...]
    child_accuracy: tuple[tuple[float, float], ...]
    seed: int
    paths: tuple[PathResult, ...] = ()

    def to_dict(self) -> dict:
        return {"ks": list(self.ks), "epochs": self.epochs, "seed": self.seed, "barrier_loss": list(self.barrier_loss),
                "barrier_acc": list(self.barrier_acc), "child_accuracy": [list(c) for c in self.child_accuracy],
                "paths": [p.to_dict() for p in self.paths]}


@dataclass
class _Run:
    """A training run that can be forked: module, optimizer, schedule, epochs done."""

    module: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    max_lr: float
    total_steps: int
    epoch: int = 0

    def fork(self) -> _Run:
        module = copy.deepcopy(self.module)
        group = self.opt.param_groups[0]
        opt = torch.optim.AdamW(module.parameters(), lr=group["lr"], weight_decay=group["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.max_lr, total_steps=self.total_steps, pct_start=0.15)
        # The new schedule resets the learning rates: load the optimizer (moments, lr) after it.
        opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        sched.load_state_dict(copy.deepcopy(self.sched.state_dict()))
        return _Run(module, opt, sched, self.max_lr, self.total_steps, self.epoch)


def _start(model: nn.Module, task, epochs: int, lr: float, weight_decay: float, batch_size: int) -> _Run:
    module = copy.deepcopy(model)
    for p in module.parameters():
        p.requires_grad_(True)
        p.grad = None
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(sum(len(y) for _, y in task.batches("train")) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    return _Run(module, opt, sched, lr, max(steps, 1))


def _train_epoch(run: _Run, task, batch_size: int, generator: torch.Generator) -> None:
    run.module.train()
    for x, y in task.batches("train", batch_size=batch_size, shuffle=True, generator=generator):
        run.opt.zero_grad(set_to_none=True)
        task.loss(run.module(x), y).backward()
        run.opt.step()
        run.sched.step()
    run.epoch += 1
    run.module.eval()


def _child_seed(seed: int, k: int, child: int) -> int:
    """Data-order seed of child ``child`` spawned at epoch ``k`` (distinct from the parent's)."""
    return 1_000_003 * (seed + 1) + 1_009 * (k + 1) + child + 1


def spawn_stability(model: nn.Module, task, ks: Sequence[int] = (0, 1, 2, 5), epochs: int = 20, lr: float = 1e-3,
                    weight_decay: float = 1e-4, batch_size: int = 32, seed: int = 0, n: int = 11,
                    split: str = "test", bn_reset: bool = True, on_epoch: Callable[[str], None] | None = None
                    ) -> StabilityResult:
    """Barrier between two children spawned from a parent at each k in ``ks`` (Frankle et al. 2020).

    ``model`` holds the initialization (copied, never modified). The parent uses data order
    ``seed``; children differ only in their data order. Barriers on ``split`` with ``n`` points.
    ``on_epoch(label)`` is called after every trained epoch (parent or child), for progress.
    """
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 0 or ks[-1] >= epochs:
        raise MergescopeError(f"ks={ks}: spawn points must lie in [0, epochs={epochs})")
    parent = _start(model, task, epochs, lr, weight_decay, batch_size)
    parent_gen = torch.Generator().manual_seed(seed)
    losses, accs, child_acc, paths = [], [], [], []
    for k in ks:
        while parent.epoch < k:
            _train_epoch(parent, task, batch_size, parent_gen)
            if on_epoch:
                on_epoch("parent")
        children = []
        for c in range(2):
            run, gen = parent.fork(), torch.Generator().manual_seed(_child_seed(seed, k, c))
            while run.epoch < epochs:
                _train_epoch(run, task, batch_size, gen)
                if on_epoch:
                    on_epoch(f"k={k} child {c}")
            children.append(run.module)
        path = interpolate(model, children[0].state_dict(), children[1].state_dict(), task, n=n, split=split,
                           bn_reset=bn_reset)
        losses.append(path.barrier_loss)
        accs.append(path.barrier_acc)
        child_acc.append((path.accuracy[0], path.accuracy[-1]))
        paths.append(path)
    return StabilityResult(tuple(ks), epochs, tuple(losses), tuple(accs), tuple(child_acc), seed, tuple(paths))


def spawn_epochs(ks: Sequence[int], epochs: int) -> int:
    """Epochs trained in total (parent once + two children per k): for progress bars."""
    ks = sorted(set(ks))
    return (ks[-1] if ks else 0) + sum(2 * (epochs - k) for k in ks)
