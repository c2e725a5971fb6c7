"""Study measurements on any models: a module template, named states, a task.

The default digits study and a user's own study (``--config``) both call these; each returns
plain JSON-able results that ``sections`` turns into figures and readings.
"""

from __future__ import annotations

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
    """A copy of the template holding ``state``, in eval mode (``mergescope.state.with_state``)."""
    from ..state import with_state as held

    return held(module, state)


def evaluate_state(module: nn.Module, state: State, task) -> dict:
    """Test accuracy/loss (reported) and validation accuracy/loss (used for every selection)."""
    net = with_state(module, state)
    test, val = task.evaluate(net, "test"), task.evaluate(net, "val")
    return {**test, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}


def ensemble_row(module: nn.Module, states: Sequence[State], task, method: str) -> tuple[dict, float]:
    """An output ensemble's test and validation figures, and the seconds its test evaluation took."""
    from .. import ensemble

    result, seconds = timed(lambda: ensemble.evaluate(module, states, task, method=method))
    val = ensemble.evaluate(module, states, task, method=method, split="val")
    return {"accuracy": result.accuracy, "loss": result.loss, "val_accuracy": val.accuracy, "val_loss": val.loss}, seconds


def spec_for(module: nn.Module, task):
    from .. import align
    from ..state import example_input

    return align.permutation_spec(module, example_input(task))


def merge_states(method: str, states: Sequence[State], base: State | None, **params) -> dict[str, torch.Tensor]:
    """Apply a per-tensor merge method to whole states (integer buffers are taken from the first)."""
    from ..merge.methods import get
    from ..state import per_tensor

    return per_tensor(get(method), states, base, **params)


def align_to_first(module: nn.Module, states: Sequence[State], task, method: str, seed: int = 0) -> list[dict]:
    """Permute every model to match the first (a registry method: weight matching, or activation
    matching on train data in batches of 256)."""
    from .. import align

    spec = spec_for(module, task)
    aligner = align.get(method)
    params = {"batch_size": 256} if "batch_size" in aligner.params else {}
    return [dict(states[0])] + [aligner(spec, states[0], s, task=task, seed=seed, template=module, **params).state
                                for s in states[1:]]


# --- mode convexity ---------------------------------------------------------------------------
def paths(pairs: Mapping[str, tuple[nn.Module, State, State, object]], n: int, tick: Tick = _noop) -> dict:
    """Linear path (with BN reset where present) for each labelled (module, A, B, task)."""
    from ..landscape import interpolate

    out = {}
    for label, (module, a, b, task) in pairs.items():
        out[label] = interpolate(module, a, b, task, n=n).to_dict()
        tick(f"path {label}")
    return {"paths": out}


def all_pairs(module: nn.Module, named: Mapping[str, State], task, limit: int = 6) -> dict:
    return {f"{x} - {y}": (module, named[x], named[y], task) for x, y in list(combinations(named, 2))[:limit]}


# --- connectivity -----------------------------------------------------------------------------
def matrices(module: nn.Module, named: Mapping[str, State], task, n: int, seed: int, tick: Tick = _noop) -> dict:
    """Pairwise barrier matrices of the named models: naive, and after aligning each to the first."""
    from ..landscape import barrier_matrix

    names, states = list(named), list(named.values())
    out = {"naive": barrier_matrix(module, states, task, names=names, n=n).to_dict()}
    tick("barrier matrix naive")
    for method in ("weight", "activation"):
        aligned = align_to_first(module, states, task, method, seed)
        out[f"{method} matching"] = barrier_matrix(module, aligned, task, names=names, n=n).to_dict()
        tick(f"barrier matrix {method}")
    for m in out.values():
        m.pop("paths", None)
    return out


def pair_connectivity(module: nn.Module, a: State, b: State, task, n: int, curve_epochs: int, seed: int,
                      curves: bool = True, tick: Tick = _noop) -> dict:
    """One pair: the straight line naive and after weight / activation matching (BatchNorm statistics
    recomputed at every point where the model has them), and quadratic Bezier curves fitted without and
    with activation matching (Garipov et al.; Tatro et al.). Every path carries test and train barriers."""
    from ..landscape import fit_curve, interpolate

    out = {"line": interpolate(module, a, b, task, n=n).to_dict()}
    for method in ("weight", "activation"):
        _, b_aligned = align_to_first(module, [a, b], task, method, seed)
        out[f"{method} matching"] = interpolate(module, a, b_aligned, task, n=n).to_dict()
        tick(f"line after {method} matching")
    if curves:
        for how, key in ((None, "curve"), ("activation", "aligned curve")):
            result = fit_curve(module, a, b, task, kind="bezier", align=how, epochs=curve_epochs, seed=seed, n=n)
            out[key] = result.curve.to_dict()
            tick(f"curve {key}")
    return out


# --- merging outcome --------------------------------------------------------------------------
def merge_rows(module: nn.Module, named: Mapping[str, State], task, group: str, base: State | None = None,
               seed: int = 0, tick: Tick = _noop) -> list[dict]:
    """Single models, weight aggregation (task-vector methods need ``base``), data-aware merges,
    MergeMany, and output ensembles, all on the same models."""
    from ..align.many import merge_many
    from ..merge import data_aware

    states, n = list(named.values()), len(named)
    rows = [{"models": group, "family": "single model", "method": name, **evaluate_state(module, s, task),
             "seconds": None} for name, s in named.items()]

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
        figures, seconds = ensemble_row(module, states, task, method)
        rows.append({"models": group, "family": "ensembling", "method": f"ensemble ({method})", **figures,
                     "seconds": seconds})
    return rows


def pair_rows(module: nn.Module, a: State, b: State, task, group: str, seed: int = 0, tick: Tick = _noop) -> list[dict]:
    """Every neuron-alignment method on one pair (matching, + REPAIR, OT, ZipIt!) vs the naive average."""
    from .. import align

    spec = spec_for(module, task)
    model_a, model_b = with_state(module, a), with_state(module, b)
    rows = [{"models": group, "family": "single model", "method": label, **evaluate_state(module, s, task),
             "seconds": None} for label, s in (("model A", a), ("model B", b))]
    naive, seconds = timed(lambda: align.interpolate_states(a, b, 0.5))
    rows.append({"models": group, "family": "weight aggregation", "method": "linear (naive average)",
                 **evaluate_state(module, naive, task), "seconds": seconds})
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
    figures, seconds = ensemble_row(module, [a, b], task, "probs")
    rows.append({"models": group, "family": "ensembling", "method": "ensemble (probs)", **figures, "seconds": seconds})
    return rows


# --- why weight averaging works ---------------------------------------------------------------
def why(module: nn.Module, pairs: Mapping[str, Mapping[str, State]], families: Mapping[str, Sequence[State]], task,
        tick: Tick = _noop, templates: bool = True) -> dict:
    """Rethink-Merge analyses: weight templates/statistics, weight vs feature space, and scaling
    stability of each pair and its average."""
    from ..analysis import scaling, spaces, weights

    out = {}
    if templates:
        out["weights"] = {label: weights.analyse(module, dict(pair), task).to_dict() for label, pair in pairs.items()}
        tick("weights")
    out["spaces"] = spaces.compare(module, families, task).to_dict()
    tick("spaces")
    out["scaling"] = {label: scaling.analyse(module, dict(pair), task).to_dict() for label, pair in pairs.items()}
    tick("scaling")
    return out
