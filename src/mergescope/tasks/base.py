"""The Task protocol: data + loss + metrics, so landscape code never knows what a model is for."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


@runtime_checkable
class Task(Protocol):
    """What mergescope needs from a task. Any object with these members works."""

    name: str

    def batches(self, split: str, batch_size: int | None = None, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def evaluate(self, model: torch.nn.Module, split: str = "test") -> dict[str, float]: ...


@dataclass
class TensorClassificationTask:
    """A classification task held in memory as tensors: batches, mean cross-entropy, accuracy."""

    name: str
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    num_classes: int
    input_shape: tuple[int, ...]
    eval_batch_size: int = 4096
    info: dict = field(default_factory=dict)

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self.splits:
            from ..errors import MergescopeError

            raise MergescopeError(f"task {self.name}: unknown split {split!r} (have {', '.join(self.splits)})")
        return self.splits[split]

    def size(self, split: str) -> int:
        return len(self._split(split)[1])

    def batches(self, split: str, batch_size: int | None = None, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches; the whole split at once when ``batch_size`` is None."""
        x, y = self._split(split)
        n = len(y)
        order = torch.randperm(n, generator=generator) if shuffle else None
        step = batch_size or self.eval_batch_size
        for start in range(0, n, step):
            idx = order[start:start + step] if order is not None else slice(start, start + step)
            yield x[idx], y[idx]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: str = "test") -> dict[str, float]:
        """Mean cross-entropy and accuracy over the whole split, model in eval mode (restored after)."""
        was_training = model.training
        model.eval()
        total_loss = correct = count = 0.0
        for x, y in self.batches(split):
            out = model(x)
            total_loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(-1) == y).sum().item()
            count += len(y)
        model.train(was_training)
        return {"loss": total_loss / count, "accuracy": correct / count}
