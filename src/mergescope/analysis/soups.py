"""Model soups (Wortsman et al. 2022): average the weights of fine-tuned models.

- Uniform soup: theta = (1/N) sum_i theta_i.
- Greedy soup: sort models by validation accuracy; starting from the best, add a model to the
  soup only if the soup's validation accuracy does not drop. Choices use validation only; the
  soup is reported on test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ensemble import as_state, average_states, member_logits
from ..errors import MergescopeError


@dataclass(frozen=True)
class SoupResult:
    """A soup: which members went in (by input index), its validation and test metrics."""

    kind: str
    included: tuple[int, ...]
    ranking: tuple[int, ...]
    val_accuracy: float
    test_accuracy: float
    test_loss: float
    member_val_accuracy: tuple[float, ...]
    member_test_accuracy: tuple[float, ...]
    state: dict = field(repr=False, compare=False, default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "included": list(self.included), "ranking": list(self.ranking),
                "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy, "test_loss": self.test_loss,
                "member_val_accuracy": list(self.member_val_accuracy),
                "member_test_accuracy": list(self.member_test_accuracy)}


def _accuracy_and_loss(model: nn.Module, state: Mapping, task, split: str) -> tuple[float, float]:
    logits, y = member_logits(model, [state], task, split)
    return (logits[0].argmax(-1) == y).double().mean().item(), torch.nn.functional.cross_entropy(logits[0], y).item()


def _member_accuracies(model: nn.Module, states: Sequence[Mapping], task, split: str) -> tuple[float, ...]:
    logits, y = member_logits(model, states, task, split)
    return tuple((logits.argmax(-1) == y).double().mean(-1).tolist())


def greedy_order(val_accuracy: Sequence[float]) -> tuple[int, ...]:
    """Indices by decreasing validation accuracy (stable: earlier inputs first among ties)."""
    return tuple(sorted(range(len(val_accuracy)), key=lambda i: -val_accuracy[i]))


def soup(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], task, kind: str = "greedy") -> SoupResult:
    """Build a uniform or greedy soup of ``states`` (all fitting ``model``) and report it on test."""
    if kind not in ("uniform", "greedy"):
        raise MergescopeError(f"unknown soup {kind!r} (choose uniform or greedy)")
    if not states:
        raise MergescopeError("soup: no models given")
    states = [as_state(s) for s in states]
    val = _member_accuracies(model, states, task, "val")
    test = _member_accuracies(model, states, task, "test")
    ranking = greedy_order(val)
    if kind == "uniform":
        included = tuple(range(len(states)))
        state = average_states(states)
        best_val, _ = _accuracy_and_loss(model, state, task, "val")
    else:
        included, state, best_val = (ranking[0],), states[ranking[0]], val[ranking[0]]
        for i in ranking[1:]:
            candidate = average_states([states[j] for j in (*included, i)])
            acc, _ = _accuracy_and_loss(model, candidate, task, "val")
            if acc >= best_val:
                included, state, best_val = (*included, i), candidate, acc
    test_acc, test_loss = _accuracy_and_loss(model, state, task, "test")
    return SoupResult(kind, tuple(included), ranking, best_val, test_acc, test_loss, val, test, state)
