"""Backdoor persistence through merges (the survey's security view): does a behaviour planted in one
member by a trigger survive weight averaging, task arithmetic, TIES or a weight-matched average?

A *trigger* is data, not code: a patch (chosen input positions set to a value; for image-like inputs,
the default is the bottom-right 3x3 corner of an 8x8 digit) or a fixed additive pattern drawn from a
seed (fits any input shape). ``poison`` plants it in a fraction of the train split with the target
label; val and test stay clean. The attack success rate (ASR) is the standard one: among test
examples whose true label is not the target, the fraction classified as the target once triggered.
``clean_target_rate`` is the same fraction without the trigger (the base rate an ASR is read against).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..ensemble import as_state, reset_batchnorm, run, split_tensors, weight_average
from ..errors import MergescopeError
from ..tasks.base import TensorClassificationTask

KINDS = ("patch", "pattern")
# bottom-right 3x3 corner of an 8x8 image, flattened row-major (blank in most digits)
CORNER_PATCH = tuple(r * 8 + c for r in range(5, 8) for c in range(5, 8))


@dataclass(frozen=True)
class Trigger:
    """``patch``: set the flattened input positions ``pixels`` to ``value``; ``pattern``: add ``value``
    times a fixed standard-normal pattern of the input's shape drawn from ``seed``."""

    kind: str = "patch"
    pixels: tuple[int, ...] = CORNER_PATCH
    value: float = 3.0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise MergescopeError(f"trigger kind {self.kind!r}: choose {' or '.join(KINDS)}")
        if self.kind == "patch" and (not self.pixels or min(self.pixels) < 0):
            raise MergescopeError(f"patch trigger: pixels must be non-negative input positions, got {list(self.pixels)}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A triggered copy of the batch ``x`` [N, ...] (``x`` itself is untouched)."""
        check_fits(self, x)
        flat = x.reshape(len(x), -1).clone()
        if self.kind == "patch":
            flat[:, list(self.pixels)] = self.value
        else:
            generator = torch.Generator().manual_seed(self.seed)
            flat += self.value * torch.randn(flat.shape[1], generator=generator, dtype=flat.dtype)
        return flat.reshape(x.shape)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "pixels": list(self.pixels) if self.kind == "patch" else None,
                "value": self.value, "seed": self.seed if self.kind == "pattern" else None}


def check_fits(trigger: Trigger, x: torch.Tensor) -> None:
    """One line when the trigger cannot be written into inputs like ``x`` (token ids, too few positions)."""
    if not torch.is_floating_point(x):
        raise MergescopeError(f"trigger {trigger.kind}: needs real-valued inputs, the task's are {x.dtype} "
                              "(token ids cannot carry an additive or patch trigger)")
    size = x[0].numel() if len(x) else 0
    if trigger.kind == "patch" and max(trigger.pixels) >= size:
        raise MergescopeError(f"patch trigger: position {max(trigger.pixels)} does not fit inputs of shape "
                              f"{tuple(x.shape[1:])} ({size} values)")


def check_target(task, target: int) -> int:
    """The target label, checked against the task's classes."""
    classes = getattr(task, "num_classes", None)
    if classes is None or not 0 <= int(target) < classes:
        raise MergescopeError(f"task {getattr(task, 'name', task)}: target {target} is not one of its classes "
                              f"(0..{'?' if classes is None else classes - 1})")
    return int(target)


def poison(task, trigger: Trigger, target: int, fraction: float = 0.1, seed: int = 0) -> TensorClassificationTask:
    """A copy of ``task`` whose train split has ``round(fraction * N)`` examples (drawn from ``seed``)
    triggered and relabelled ``target``; val and test unchanged."""
    target = check_target(task, target)
    if not 0.0 < fraction <= 1.0:
        raise MergescopeError(f"poison fraction must be in (0, 1], got {fraction}")
    splits = {split: split_tensors(task, split) for split in ("train", "val", "test")}
    x, y = splits["train"]
    n = round(fraction * len(y))
    chosen = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    x, y = x.clone(), y.clone()
    x[chosen] = trigger.apply(x[chosen])
    y[chosen] = target
    splits["train"] = (x, y)
    return TensorClassificationTask(name=f"{task.name}+backdoor", splits=splits, num_classes=task.num_classes,
                                    input_shape=tuple(x.shape[1:]),
                                    info={"poisoned": n, "fraction": fraction, "target": target, "seed": seed,
                                          "trigger": trigger.to_dict()})


def _target_rate(model: nn.Module, state: Mapping, x: torch.Tensor, target: int) -> float:
    return (run(model, state, x).argmax(-1) == target).double().mean().item()


def _non_target(task, target: int, split: str) -> torch.Tensor:
    x, y = split_tensors(task, split)
    keep = y != target
    if not keep.any():
        raise MergescopeError(f"task {task.name}: every {split} example has the target label {target}; no ASR")
    return x[keep]


def attack_success_rate(model: nn.Module, state: Mapping[str, torch.Tensor], task, trigger: Trigger, target: int,
                        split: str = "test") -> float:
    """Fraction of ``split`` examples with true label != ``target`` classified as ``target`` once triggered."""
    target = check_target(task, target)
    return _target_rate(model, state, trigger.apply(_non_target(task, target, split)), target)


def scores(model: nn.Module, state: Mapping[str, torch.Tensor], task, trigger: Trigger, target: int,
           split: str = "test") -> dict[str, float]:
    """Clean accuracy, ASR and the clean target rate (same examples, no trigger) of one state."""
    x, y = split_tensors(task, split)
    accuracy = (run(model, state, x).argmax(-1) == y).double().mean().item()
    clean = _non_target(task, check_target(task, target), split)
    return {"accuracy": accuracy, "asr": attack_success_rate(model, state, task, trigger, target, split),
            "clean_target_rate": _target_rate(model, state, clean, target)}


def standard_merges(model: nn.Module, states: Mapping[str, Mapping], task, base: Mapping | None = None,
                    align: bool = True, seed: int = 0) -> dict[str, dict]:
    """The merges a user would try (the existing functions, BatchNorm statistics reset on train): the
    uniform average; with a base, task arithmetic (lambda chosen on clean val accuracy, as a merger
    would) and TIES (``diagnose.measured``'s settings); without one (independent models), the
    weight-matched average when a permutation spec can be traced."""
    from ..diagnose.measured import TA_LAMBDAS, TIES_DENSITY
    from ..merge.methods import get
    from ..state import per_tensor

    members = [as_state(s) for s in states.values()]
    merges = {"average": weight_average(model, members, task)}
    x_train, _ = split_tensors(task, "train")
    if base is not None:
        base, ones = as_state(base), [1.0] * len(members)
        candidates = {lam: reset_batchnorm(model, per_tensor(get("task_arithmetic"), members, base, weight=ones, lam=lam),
                                           x_train) for lam in TA_LAMBDAS}
        x_val, y_val = split_tensors(task, "val")
        lam = max(TA_LAMBDAS, key=lambda v: (run(model, candidates[v], x_val).argmax(-1) == y_val).double().mean().item())
        merges["task arithmetic"] = candidates[lam]  # one name whatever lambda won (replicates line up)
        merges["ties"] = reset_batchnorm(model, per_tensor(get("ties"), members, base, weight=ones,
                                                           density=[TIES_DENSITY] * len(members)), x_train)
    elif align and len(members) > 1:
        from ..state import example_input
        from .spaces import align_family

        try:
            aligned = align_family(model, members, example_input(task), seed=seed)
        except MergescopeError:
            aligned = None  # no traceable permutation spec: the aligned merge is left out
        if aligned is not None:
            merges["weight-matched average"] = weight_average(model, aligned, task)
    return merges


def poisoned_finetune(model: nn.Module, parent: Mapping[str, torch.Tensor], task, trigger: Trigger, target: int,
                      fraction: float = 0.1, seed: int = 0, **train_options) -> dict[str, torch.Tensor]:
    """A copy of ``model`` started from ``parent`` and fine-tuned on ``poison(task, ...)`` (``tasks.train``
    with ``train_options``): the backdoored member of a fine-tune family (``model`` is left as it was)."""
    import copy

    from ..tasks.train import train

    net = copy.deepcopy(model)
    net.load_state_dict(as_state(parent))
    train(net, poison(task, trigger, target, fraction, seed), seed=seed, **train_options)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@dataclass(frozen=True)
class PersistenceResult:
    """Clean accuracy, ASR and clean target rate per member and per merge, on one split."""

    target: int
    trigger: dict
    split: str
    members: dict  # name -> {"accuracy", "asr", "clean_target_rate"}
    merges: dict

    def to_dict(self) -> dict:
        return {"target": self.target, "trigger": self.trigger, "split": self.split, "members": self.members,
                "merges": self.merges}


def persistence(model: nn.Module, states: Mapping[str, Mapping], merges: Mapping[str, Mapping], task,
                trigger: Trigger, target: int, split: str = "test") -> PersistenceResult:
    """Score every member and every merge (``standard_merges`` builds the usual ones) on the clean task."""
    target = check_target(task, target)
    check_fits(trigger, split_tensors(task, split)[0][:1])
    members = {name: scores(model, as_state(s), task, trigger, target, split) for name, s in states.items()}
    merged = {name: scores(model, as_state(s), task, trigger, target, split) for name, s in merges.items()}
    return PersistenceResult(target, trigger.to_dict(), split, members, merged)


def plot(result: dict, path, title: str | None = None) -> None:
    """Bars of clean accuracy and ASR for members and merges, from a saved ``PersistenceResult.to_dict()``
    (drawn by ``mergescope.report.analysis_figures.plot_backdoor``)."""
    from ..report.analysis_figures import plot_backdoor

    plot_backdoor(result, path, title)
