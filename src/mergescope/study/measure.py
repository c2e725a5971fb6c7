"""Study measurements on any models: a module template, named states, a task.

The default digits study and a user's own study (``--config``) both call these; each returns
plain JSON-able results that ``sections`` turns into figures and readings.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations

import torch
from torch import nn

State = Mapping[str, torch.Tensor]
Tick = Callable[[str], None]


def _noop(message: str) -> None:
    pass


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def with_state(module: nn.Module, state: State) -> nn.Module:
    """A copy of the template holding ``state``, in eval mode."""
    net = copy.deepcopy(module)
    net.load_state_dict(state)
    return net.eval()


def evaluate_state(module: nn.Module, state: State, task) -> dict:
    return task.evaluate(with_state(module, state), "test")


def spec_for(module: nn.Module, task):
    from .. import align

    return align.permutation_spec(module, next(iter(task.batches("train", batch_size=8)))[0])


def merge_states(method: str, states: Sequence[State], base: State | None, **params) -> dict[str, torch.Tensor]:
    """Apply a per-tensor merge method to whole states (integer buffers are taken from the first)."""
    from ..merge.methods import get

    fn = get(method)
    return {name: fn([s[name] for s in states], None if base is None else base[name], **params)
            if first.is_floating_point() else first.clone() for name, first in states[0].items()}


def align_to_first(module: nn.Module, states: Sequence[State], task, method: str, seed: int = 0) -> list[dict]:
    """Permute every model to match the first: weight matching, or activation matching on train data."""
    from .. import align
    from ..align.many import align_to_reference

    spec = spec_for(module, task)
    if method == "weight":
        return list(align_to_reference(spec, states, seed=seed).states)
    reference = with_state(module, states[0])
    return [dict(states[0])] + [
        align.apply(spec, align.activation_matching(spec, reference, with_state(module, s),
                                                    task.batches("train", batch_size=256), seed=seed), s)
        for s in states[1:]]


# --- mode convexity ---------------------------------------------------------------------------
def paths(pairs: Mapping[str, tuple[nn.Module, State, State]], task, n: int, tick: Tick = _noop) -> dict:
    """Linear path (with BN reset where present) for each labelled pair."""
    from ..landscape import interpolate

    out = {}
    for label, (module, a, b) in pairs.items():
        out[label] = interpolate(module, a, b, task, n=n).to_dict()
        tick(f"path {label}")
    return {"paths": out}


def all_pairs(module: nn.Module, named: Mapping[str, State], limit: int = 6) -> dict:
    return {f"{x} - {y}": (module, named[x], named[y]) for x, y in list(combinations(named, 2))[:limit]}


# --- connectivity -----------------------------------------------------------------------------
def connectivity(module: nn.Module, named: Mapping[str, State], task, n: int, curve_epochs: int, seed: int,
                 tick: Tick = _noop) -> dict:
    """Barrier matrices naive vs aligned (weight, activation), and Bezier curves without/with alignment."""
    from ..landscape import barrier_matrix, fit_curve

    names, states = list(named), list(named.values())
    matrices = {"naive": barrier_matrix(module, states, task, names=names, n=n).to_dict()}
    tick("barrier matrix naive")
    for method in ("weight", "activation"):
        aligned = align_to_first(module, states, task, method, seed)
        matrices[f"{method} matching"] = barrier_matrix(module, aligned, task, names=names, n=n).to_dict()
        tick(f"barrier matrix {method}")
    for m in matrices.values():
        m.pop("paths", None)
    curves = {}
    for how in (None, "activation"):
        curve = fit_curve(module, states[0], states[1], task, kind="bezier", align=how, epochs=curve_epochs,
                          seed=seed, n=n)
        curves["aligned" if how else "unaligned"] = curve.to_dict()
        tick(f"curve {how}")
    return {"matrices": matrices, "curves": curves, "pair": names[:2]}


# --- merging outcome --------------------------------------------------------------------------
def merge_rows(module: nn.Module, named: Mapping[str, State], task, group: str, base: State | None = None,
               seed: int = 0, tick: Tick = _noop) -> list[dict]:
    """Single models, weight aggregation (task-vector methods need ``base``), data-aware merges,
    MergeMany, and output ensembles, all on the same models."""
    from .. import ensemble
    from ..align.many import merge_many
    from ..merge import data_aware

    states, n = list(named.values()), len(named)
    rows = [{"models": group, "family": "single model", "method": name, **evaluate_state(module, s, task),
             "seconds": 0.0} for name, s in named.items()]

    def add(family, method, make):
        state, seconds = timed(make)
        rows.append({"models": group, "family": family, "method": method, **evaluate_state(module, state, task),
                     "seconds": seconds})
        tick(f"merge {method}")

    add("weight aggregation", "linear (uniform average)", lambda: merge_states("linear", states, None, weight=[1.0] * n))
    if base is not None:
        add("weight aggregation", "task_arithmetic (lambda 1/N)",
            lambda: merge_states("task_arithmetic", states, base, weight=[1.0] * n, lam=1.0 / n))
        add("weight aggregation", "ties (density 0.5)",
            lambda: merge_states("ties", states, base, weight=[1.0] * n, density=[0.5] * n))
        add("weight aggregation", "dare_ties (density 0.5)",
            lambda: merge_states("dare_ties", states, base, weight=[1.0 / n] * n, density=[0.5] * n, seed=seed))
        if n >= 2:
            add("weight aggregation", "model_stock", lambda: merge_states("model_stock", states, base))
    add("weight aggregation", "fisher", lambda: data_aware.fisher_merge(module, states, task))
    add("weight aggregation", "regmean", lambda: data_aware.regmean_merge(module, states, task))
    add("neuron alignment", "MergeMany (weight matching) + average",
        lambda: merge_many(spec_for(module, task), states, seed=seed).mean)
    for method in ("probs", "logits", "vote"):
        result, seconds = timed(lambda: ensemble.evaluate(module, states, task, method=method))
        rows.append({"models": group, "family": "ensembling", "method": f"ensemble ({method})",
                     "accuracy": result.accuracy, "loss": result.loss, "seconds": seconds})
    return rows


def pair_rows(module: nn.Module, a: State, b: State, task, group: str, seed: int = 0, tick: Tick = _noop) -> list[dict]:
    """Every neuron-alignment method on one pair (matching, + REPAIR, OT, ZipIt!) vs the naive average."""
    from .. import align, ensemble

    spec = spec_for(module, task)
    model_a, model_b = with_state(module, a), with_state(module, b)
    rows = [{"models": group, "family": "single model", "method": label, **evaluate_state(module, s, task),
             "seconds": 0.0} for label, s in (("model A", a), ("model B", b))]
    rows.append({"models": group, "family": "weight aggregation", "method": "linear (naive average)",
                 **evaluate_state(module, align.interpolate_states(a, b, 0.5), task), "seconds": 0.0})
    for method in ("weight", "activation", "ot", "zipit"):
        result, seconds = timed(lambda: align.align_models(spec, model_a, model_b, method, task=task, seed=seed))
        merged = result.state if result.merged else align.interpolate_states(a, result.state, 0.5)
        label = "ZipIt!" if method == "zipit" else f"{method} matching + average"
        rows.append({"models": group, "family": "neuron alignment", "method": label,
                     **evaluate_state(module, merged, task), "seconds": seconds})
        tick(f"align {method}")
        if method == "activation":
            def repaired():
                net = with_state(module, merged)
                align.repair(net, model_a, with_state(module, result.state), task.batches("train", batch_size=512))
                return net.state_dict()

            state, extra = timed(repaired)
            rows.append({"models": group, "family": "neuron alignment", "method": "activation matching + REPAIR",
                         **evaluate_state(module, state, task), "seconds": seconds + extra})
    result, seconds = timed(lambda: ensemble.evaluate(module, [a, b], task))
    rows.append({"models": group, "family": "ensembling", "method": "ensemble (probs)", "accuracy": result.accuracy,
                 "loss": result.loss, "seconds": seconds})
    return rows


# --- why weight averaging works ---------------------------------------------------------------
def why(module: nn.Module, pair: Mapping[str, State], families: Mapping[str, Sequence[State]], task,
        tick: Tick = _noop) -> dict:
    """Rethink-Merge analyses: weight templates/statistics, weight vs feature space, scaling stability."""
    from ..analysis import scaling, spaces, weights

    out = {"weights": weights.analyse(module, dict(pair), task).to_dict()}
    tick("weights")
    out["spaces"] = spaces.compare(module, families, task).to_dict()
    tick("spaces")
    out["scaling"] = scaling.analyse(module, dict(pair), task).to_dict()
    tick("scaling")
    return out
