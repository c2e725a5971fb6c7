"""Rethink-Merge analysis 2 (arXiv 2411.09263): weight space vs feature/output space.

For a family of models, merge the first k (k = 2..8) in three spaces and compare test accuracy:

- weight space: one model with the uniform weight average (BatchNorm statistics recomputed on
  train data when the model has BatchNorm, since averaged statistics are not the model's own);
- feature space: average the penultimate features, apply the averaged head;
- output space: mean of probabilities (``probs``) and of logits (``logits``).

Families: fine-tunes of one parent (close in weight space), independent seeds (far apart,
permuted units), and independent seeds aligned to the first by weight matching (``aligned``,
needs ``mergescope.align``). Weight averaging should win for fine-tunes and aligned seeds at a
fraction of the cost; only output/feature averaging works for unaligned seeds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ensemble import as_state, average_states, head_module, penultimate, reset_batchnorm, run, split_tensors

SPACES = ("weight_average", "features", "probs", "logits")


@dataclass(frozen=True)
class SpacesResult:
    """Accuracy per family, per space, per number of merged models (``sizes``)."""

    sizes: tuple[int, ...]
    families: dict  # family -> space -> [accuracy per size]; also "best_member", "mean_member"
    split: str
    model: str

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "families": self.families, "split": self.split, "model": self.model}


# ---------------------------------------------------------------- families of models

def train_family(kind: str, name: str, n: int, task, options: Mapping | None = None, seed: int = 0,
                 epochs: int | None = None, on_model: Callable[[int], None] | None = None) -> list[dict]:
    """Train ``n`` zoo models: ``seeds`` (init and data order from seed+i) or ``finetunes`` (one
    parent trained a quarter of the epochs from ``seed``, then each copy trained the full schedule
    with data order seed+100+i: children of a shared early checkpoint, as in spawning / soups)."""
    from ..tasks import TRAIN_DEFAULTS, build, train

    options = dict(options or {})
    hp = dict(TRAIN_DEFAULTS[name])
    if epochs is not None:
        hp["epochs"] = epochs
    train_kw = {k: v for k, v in hp.items() if k in ("epochs", "lr", "weight_decay", "batch_size")}
    states = []
    if kind == "seeds":
        for i in range(n):
            model = build(name, seed=seed + i, **options)
            train(model, task, seed=seed + i, **train_kw)
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            on_model and on_model(i)
        return states
    if kind == "finetunes":
        parent = build(name, seed=seed, **options)
        train(parent, task, seed=seed, **{**train_kw, "epochs": max(1, train_kw["epochs"] // 4)})
        for i in range(n):
            child = copy.deepcopy(parent)
            train(child, task, seed=seed + 100 + i, **train_kw)
            states.append({k: v.clone() for k, v in child.state_dict().items()})
            on_model and on_model(i)
        return states
    from ..errors import MergescopeError

    raise MergescopeError(f"unknown family {kind!r} (seeds or finetunes; aligned comes from seeds)")


def alignment_available() -> bool:
    """Whether ``mergescope.align`` offers permutation_spec, weight_matching and apply."""
    try:
        import mergescope.align as align
    except ImportError:
        return False
    return all(hasattr(align, f) for f in ("permutation_spec", "weight_matching", "apply"))


def align_family(model: nn.Module, states: Sequence[Mapping], example: torch.Tensor, seed: int = 0) -> list[dict]:
    """Every state permuted to match the first by weight matching (Ainsworth et al. 2023)."""
    from ..errors import MergescopeError

    if not alignment_available():
        raise MergescopeError("alignment is not available in this build (mergescope.align lacks weight_matching)")
    import mergescope.align as align

    spec = align.permutation_spec(model, example)
    reference = as_state(states[0])
    aligned = [reference]
    for s in states[1:]:
        s = as_state(s)
        aligned.append(align.apply(spec, align.weight_matching(spec, reference, s, seed=seed), s))
    return aligned


# ---------------------------------------------------------------- the comparison

def family_curves(model: nn.Module, states: Sequence[Mapping], task, sizes: Sequence[int], split: str) -> dict:
    """Accuracy of each space for the first k models, k in ``sizes``."""
    states = [as_state(s) for s in states]
    x, y = split_tensors(task, split)
    xt, _ = split_tensors(task, "train")
    logits = torch.stack([run(model, s, x) for s in states])
    feats = torch.stack([penultimate(model, s, x) for s in states])
    head, _ = head_module(model)
    member = (logits.argmax(-1) == y).double().mean(-1)
    acc = lambda z: (z.argmax(-1) == y).double().mean().item()  # noqa: E731
    out = {key: [] for key in (*SPACES, "best_member", "mean_member")}
    for k in sizes:
        avg = reset_batchnorm(model, average_states(states[:k]), xt)
        out["weight_average"].append(acc(run(model, avg, x)))
        w = torch.stack([s[f"{head}.weight"] for s in states[:k]]).mean(0)
        b = torch.stack([s[f"{head}.bias"] for s in states[:k]]).mean(0) if f"{head}.bias" in states[0] else None
        out["features"].append(acc(F.linear(feats[:k].mean(0), w, b)))
        out["probs"].append(acc(logits[:k].softmax(-1).mean(0)))
        out["logits"].append(acc(logits[:k].mean(0)))
        out["best_member"].append(member[:k].max().item())
        out["mean_member"].append(member[:k].mean().item())
    return out


def compare(model: nn.Module, families: Mapping[str, Sequence[Mapping]], task, sizes: Sequence[int] | None = None,
            split: str = "test", model_name: str = "") -> SpacesResult:
    """Weight vs feature vs output averaging for each family, at each size (default 2..N)."""
    n = min(len(v) for v in families.values())
    sizes = tuple(sizes or range(2, n + 1))
    curves = {name: family_curves(model, states, task, sizes, split) for name, states in families.items()}
    return SpacesResult(sizes, curves, split, model_name or type(model).__name__)


def plot(result: dict, path) -> None:
    """One panel per family: accuracy vs number of models for each space, from saved JSON.

    Drawn by ``mergescope.report.analysis_figures.plot_spaces`` (figures live in ``report/``)."""
    from ..report.analysis_figures import plot_spaces

    plot_spaces(result, path)
