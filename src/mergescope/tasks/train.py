"""Deterministic training: same seed and inputs -> same bits (on the same machine and thread count)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import TensorClassificationTask


def train(model: nn.Module, task: TensorClassificationTask, epochs: int = 30, lr: float = 1e-3,
          weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0,
          on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train in place with AdamW and a cosine schedule; data order drawn from ``seed``.

    ``on_epoch(epoch, mean_loss)`` reports progress (the CLI draws a bar with it).
    """
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-task.size("train") // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    model.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for x, y in task.batches("train", batch_size=batch_size, shuffle=True, generator=generator):
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            count += len(y)
        if on_epoch is not None:
            on_epoch(epoch, total / max(count, 1))
    model.eval()
    return model
