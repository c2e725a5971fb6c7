"""With a task: what merging actually does on a small validation sample (barrier, average vs ensemble, aligned).

Measured on ``sample`` examples of the *val* split (seeded), never test: these numbers choose a
method, so they must not touch the data a user reports. BatchNorm statistics of merged states (path
points, averages, task-vector merges) are recomputed on ``sample`` train examples, as the landscape
path does; members and the output ensemble are used as they are. Candidates are built and evaluated
a few at a time (``landscape.evaluation.evaluate_lazy``), so memory holds a chunk of states, not all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import MergescopeError
from ..landscape.evaluation import as_state, evaluate_lazy, split_metrics, working_copy
from ..landscape.paths import accuracy_barrier, loss_barrier, path_points
from ..state import average, per_tensor

SPLIT = "val"
TA_LAMBDAS = (0.3, 0.5, 0.7, 1.0)  # task-arithmetic scales tried on val (Ilharco et al. pick lambda there)
TIES_DENSITY = 0.2  # TIES paper default: keep the top 20% of each task vector, lambda 1
CHUNK = 4  # states evaluated together


def _head(x, n: int):
    """The first ``n`` examples of a batch (a tensor, or a mapping of tensors such as tokenized text)."""
    return {k: v[:n] for k, v in x.items()} if isinstance(x, Mapping) else x[:n]


def _take(task, split: str, n: int, seed: int) -> list[tuple]:
    """``n`` examples of ``split`` in a seeded random order, as the task's own batches (the last one cut)."""
    generator = torch.Generator().manual_seed(seed)
    out, count = [], 0
    for x, y in task.batches(split, shuffle=True, generator=generator):
        keep = min(len(y), n - count)
        out.append((_head(x, keep), y[:keep]))
        count += keep
        if count >= n:
            break
    if count == 0:
        raise MergescopeError(f"task {getattr(task, 'name', task)}: split {split!r} is empty")
    return out


class SampleTask:
    """A task restricted to a seeded sample of its val split (and of train, for BatchNorm resets)."""

    def __init__(self, task, sample: int, seed: int = 0):
        self.task = task
        self.name = f"{getattr(task, 'name', 'task')} (val sample)"
        self.num_classes = getattr(task, "num_classes", None)
        self.parts = {SPLIT: _take(task, SPLIT, sample, seed), "train": _take(task, "train", sample, seed + 1)}
        if hasattr(task, "token_sums"):  # a language-model task: losses averaged over scored tokens
            self.token_sums = task.token_sums

    @property
    def sample_size(self) -> int:
        return sum(len(y) for _, y in self.parts[SPLIT])

    def batches(self, split: str, batch_size=None, shuffle=False, generator=None):
        if split not in self.parts:
            raise MergescopeError(f"task {self.name}: only the {SPLIT} sample (and train for BatchNorm) is loaded, "
                                  f"not {split!r}")
        yield from self.parts[split]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.task.loss(outputs, targets)

    def evaluate(self, model: nn.Module, split: str = SPLIT) -> dict[str, float]:
        """Loss and accuracy of one model on the sample (its own parameters)."""
        state = {k: v[None] for k, v in model.state_dict().items() if v.is_floating_point()}
        m = split_metrics(working_copy(model), state, self, split)
        return {"loss": float(m.loss[0]), "accuracy": float(m.accuracy[0])}


def _evaluate(model: nn.Module, builders: Sequence[Callable[[], dict]], task: SampleTask, bn_reset: bool
              ) -> tuple[np.ndarray, np.ndarray]:
    """(losses, accuracies) on the val sample of the states the builders make, a chunk at a time."""
    def make_chunk(lo: int, hi: int) -> dict:
        states = [b() for b in builders[lo:hi]]
        return {k: torch.stack([s[k] for s in states]) for k in states[0]}

    m = evaluate_lazy(model, len(builders), make_chunk, task, (SPLIT,), bn_reset=bn_reset, chunk_size=CHUNK)[SPLIT]
    return m.loss, m.accuracy


def _ensemble(model: nn.Module, states: Sequence[dict], task: SampleTask) -> dict:
    """The output ensemble (mean of probabilities); None for a language-model task (``ensemble`` compares
    class probabilities per example)."""
    from ..ensemble import evaluate

    if hasattr(task, "token_sums"):
        return {"ensemble_accuracy": None, "ensemble_loss": None}

    result = evaluate(model, states, task, method="probs", split=SPLIT)
    return {"ensemble_accuracy": result.accuracy, "ensemble_loss": result.loss}


def _task_vector_builders(states: list[dict], base: dict) -> dict[str, Callable[[], dict]]:
    """Task arithmetic at each lambda of ``TA_LAMBDAS``, and TIES (density 0.2, lambda 1): whole-state merges."""
    from ..merge.methods import get

    n = len(states)
    ones = [1.0] * n
    out = {f"ta{lam}": (lambda lam=lam: per_tensor(get("task_arithmetic"), states, base, weight=ones, lam=lam))
           for lam in TA_LAMBDAS}
    out["ties"] = lambda: per_tensor(get("ties"), states, base, weight=ones, density=[TIES_DENSITY] * n)
    return out


def _aligned_builder(model: nn.Module, states: list[dict], task: SampleTask, seed: int) -> Callable[[], dict] | None:
    """Weight matching (Git Re-Basin) of every model to the first, then the uniform average; None when
    the model's permutation spec cannot be traced (the align family is then not measured)."""
    from ..align import apply, permutation_spec, weight_matching
    from ..state import example_input

    try:
        spec = permutation_spec(model, example_input(task))
    except MergescopeError:
        return None

    def build() -> dict:
        aligned = [apply(spec, weight_matching(spec, states[0], s, seed=seed), s) for s in states[1:]]
        return average([states[0], *aligned])

    return build


def measure(model: nn.Module, models: Sequence[Mapping[str, torch.Tensor]], task, base=None, *, points: int = 5,
            sample: int = 512, seed: int = 0, progress: Callable[[str], None] | None = None) -> dict:
    """Barrier between the first two models, members vs uniform average vs output ensemble (and with a
    base, task arithmetic with lambda chosen on the sample and TIES), all on a val sample.

    Keys: barrier_loss, barrier_accuracy, path {t, loss, accuracy}, members_accuracy/_loss (means),
    member_accuracies, average_*, ensemble_*, aligned_* (weight matching to the first model + average;
    None when no permutation spec can be traced), task_arithmetic_* (+ _lambda), ties_* (None without
    a base), split, sample_size, points.
    """
    if sample < 1:
        raise MergescopeError(f"sample={sample}: need at least one example")
    step = progress or (lambda stage: None)
    sample_task = SampleTask(task, sample, seed)
    states = [as_state(model, s, f"model {i}") for i, s in enumerate(models)]
    base_state = None if base is None else as_state(model, base, "base")
    ts = path_points(points)
    a, b = states[0], states[1]
    step("path")
    path_builders = [lambda t=float(t): {k: torch.lerp(a[k], b[k], t) for k in a} for t in ts]
    path_loss, path_acc = _evaluate(model, path_builders, sample_task, bn_reset=True)
    step("members")
    member_loss, member_acc = _evaluate(model, [lambda s=s: s for s in states], sample_task, bn_reset=False)
    step("average")
    merged = {"average": lambda: average(states)}
    aligned = _aligned_builder(model, states, sample_task, seed)
    if aligned is not None:
        merged["aligned"] = aligned
    if base_state is not None:
        merged.update(_task_vector_builders(states, base_state))
    merged_loss, merged_acc = _evaluate(model, list(merged.values()), sample_task, bn_reset=True)
    got = {name: (float(merged_loss[i]), float(merged_acc[i])) for i, name in enumerate(merged)}
    step("ensemble")
    out = {
        "split": SPLIT, "sample_size": sample_task.sample_size, "points": points,
        "barrier_loss": loss_barrier(ts, path_loss), "barrier_accuracy": accuracy_barrier(ts, path_acc),
        "path": {"t": [float(t) for t in ts], "loss": path_loss.tolist(), "accuracy": path_acc.tolist()},
        "members_accuracy": float(np.mean(member_acc)), "members_loss": float(np.mean(member_loss)),
        "member_accuracies": member_acc.tolist(),
        "average_loss": got["average"][0], "average_accuracy": got["average"][1],
        **_ensemble(model, states, sample_task),
    }
    out.update(_task_vector_results(got))
    out["aligned_loss"], out["aligned_accuracy"] = got.get("aligned", (None, None))
    return out


def _task_vector_results(got: dict[str, tuple[float, float]]) -> dict:
    """Task arithmetic at the lambda with the lowest val-sample loss, and TIES (all None without a base)."""
    if "ties" not in got:
        return dict.fromkeys(("task_arithmetic_accuracy", "task_arithmetic_loss", "task_arithmetic_lambda",
                              "ties_accuracy", "ties_loss"))
    lam = min(TA_LAMBDAS, key=lambda v: got[f"ta{v}"][0])
    return {"task_arithmetic_loss": got[f"ta{lam}"][0], "task_arithmetic_accuracy": got[f"ta{lam}"][1],
            "task_arithmetic_lambda": lam, "ties_loss": got["ties"][0], "ties_accuracy": got["ties"][1]}
