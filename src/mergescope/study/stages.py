"""The study's stages: each measures one characteristic and returns plain JSON-able results.

Stages read models from the cached ``Family`` and call only the public API (landscape, align,
merge methods, ensembles, analyses); figures are drawn later from the saved results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..tasks import digits
from .config import StudyConfig
from .family import Family, Recipe, recipe


@dataclass
class Context:
    """What every stage needs: config, the cached family, the task, a progress hook."""

    config: StudyConfig
    family: Family
    tick: Callable[[str], None] = lambda message: None

    @property
    def task(self):
        return digits(seed=self.config.seed)

    # --- the family's recipes -------------------------------------------------------------
    def mlp(self, seed: int, epochs: int | None = None, parent: Recipe | None = None, classes=None,
            lr: float | None = None) -> Recipe:
        c = self.config
        return recipe("mlp", seed, c.full_epochs if epochs is None else epochs, parent, classes, lr,
                      width=c.mlp_width, depth=2)

    @property
    def parent(self) -> Recipe:
        return self.mlp(self.config.seed, self.config.parent_epochs)

    def finetunes(self) -> list[Recipe]:
        c = self.config
        return [self.mlp(c.seed + 100 + i, c.finetune_epochs, self.parent, lr=c.finetune_lr) for i in range(c.finetunes)]

    def independents(self) -> list[Recipe]:
        return [self.mlp(self.config.seed + 10 + i) for i in range(self.config.independent)]

    def subset_finetunes(self) -> list[Recipe]:
        c = self.config
        return [self.mlp(c.seed + 200 + i, c.finetune_epochs, self.parent, classes, lr=c.finetune_lr)
                for i, classes in enumerate((c.subset_a, c.subset_b))]

    def pair(self, model: str) -> list[Recipe]:
        c = self.config
        options = {"cnn": {"width": c.cnn_width}, "transformer": {"dim": c.transformer_dim}}[model]
        epochs = c.full_epochs if model == "cnn" else 3 * c.full_epochs
        return [recipe(model, c.seed + 10 + i, epochs, **options) for i in range(2)]

    def states(self, recipes: Sequence[Recipe]) -> list[dict[str, torch.Tensor]]:
        out = []
        for r in recipes:
            out.append(self.family.state(r))
            self.tick(f"model {r.model} seed {r.seed}")
        return out


def _path_summary(path) -> dict:
    return path.to_dict()


# --- 1. mode convexity ------------------------------------------------------------------------
def convexity(ctx: Context) -> dict:
    """Linear paths: same-parent fine-tunes vs independent runs, for MLP, CNN and the transformer."""
    from ..landscape import interpolate

    c, task = ctx.config, ctx.task
    pairs = {
        "MLP, fine-tunes of one parent": ctx.finetunes()[:2],
        "MLP, independent seeds": ctx.independents()[:2],
        "CNN, independent seeds": ctx.pair("cnn"),
        "Transformer, independent seeds": ctx.pair("transformer"),
    }
    paths = {}
    for label, recipes in pairs.items():
        a, b = ctx.states(recipes)
        paths[label] = interpolate(ctx.family.module(recipes[0]), a, b, task, n=c.path_points).to_dict()
        ctx.tick(f"path {label}")
    return {"paths": paths}


# --- 6. merging outcome table ------------------------------------------------------------------
def merge_states(method: str, states: Sequence[Mapping[str, torch.Tensor]], base: Mapping[str, torch.Tensor] | None,
                 **params) -> dict[str, torch.Tensor]:
    """Apply a per-tensor merge method to whole states (integer buffers are taken from the first)."""
    from ..merge.methods import get

    fn = get(method)
    merged = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            merged[name] = first.clone()
            continue
        merged[name] = fn([s[name] for s in states], None if base is None else base[name], **params)
    return merged


def _evaluate_state(module, state, task) -> dict:
    module.load_state_dict(state)
    return task.evaluate(module, "test")


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def merging(ctx: Context) -> dict:
    """Every merge family on the same models: fine-tunes of one parent, and independent seeds."""
    from .. import ensemble
    from ..merge import data_aware

    task, rows = ctx.task, []
    module = ctx.family.module(ctx.parent)
    base = ctx.family.state(ctx.parent)
    fts = ctx.states(ctx.finetunes())
    n = len(fts)
    weight = [1.0 / n] * n

    def add(models, family, method, state_fn):
        state, seconds = _timed(state_fn)
        rows.append({"models": models, "family": family, "method": method, **_evaluate_state(module, state, task),
                     "seconds": seconds})
        ctx.tick(f"merge {method}")

    def add_ensemble(models, states, method):
        result, seconds = _timed(lambda: ensemble.evaluate(module, states, task, method=method))
        rows.append({"models": models, "family": "ensembling", "method": f"ensemble ({method})",
                     "accuracy": result.accuracy, "loss": result.loss, "seconds": seconds})

    group = f"{n} fine-tunes of one parent"
    for i, s in enumerate(fts):
        rows.append({"models": group, "family": "single model", "method": f"fine-tune {i}",
                     **_evaluate_state(module, s, task), "seconds": 0.0})
    add(group, "weight aggregation", "linear", lambda: merge_states("linear", fts, None, weight=weight))
    add(group, "weight aggregation", "task_arithmetic", lambda: merge_states("task_arithmetic", fts, base, weight=[1.0] * n, lam=1.0 / n))
    add(group, "weight aggregation", "ties", lambda: merge_states("ties", fts, base, weight=[1.0] * n, density=[0.5] * n))
    add(group, "weight aggregation", "dare_ties", lambda: merge_states("dare_ties", fts, base, weight=[1.0 / n] * n, density=[0.5] * n, seed=ctx.config.seed))
    add(group, "weight aggregation", "model_stock", lambda: merge_states("model_stock", fts, base) if n >= 2 else fts[0])
    add(group, "weight aggregation", "fisher", lambda: data_aware.fisher_merge(module, fts, task))
    add(group, "weight aggregation", "regmean", lambda: data_aware.regmean_merge(module, fts, task))
    for method in ("probs", "logits", "vote"):
        add_ensemble(group, fts, method)

    inds = ctx.states(ctx.independents())
    group = f"{len(inds)} independent seeds"
    for i, s in enumerate(inds):
        rows.append({"models": group, "family": "single model", "method": f"seed {i}",
                     **_evaluate_state(module, s, task), "seconds": 0.0})
    add(group, "weight aggregation", "linear (naive)", lambda: merge_states("linear", inds, None, weight=[1.0] * len(inds)))
    add(group, "weight aggregation", "regmean", lambda: data_aware.regmean_merge(module, inds, task))
    for method in ("probs", "logits"):
        add_ensemble(group, inds, method)
    rows.append(_merge_many_row(ctx, module, inds, group))
    rows.extend(pair_rows(ctx, module, inds[0], inds[1], "2 independent seeds"))
    return {"rows": rows}


def _merge_many_row(ctx: Context, module, states, group) -> dict:
    """MergeMany (Ainsworth et al. 2023): align every model to the mean of the others, then average."""
    from .. import align
    from ..align.many import merge_many

    spec = align.permutation_spec(module, next(iter(ctx.task.batches("train", batch_size=8)))[0])
    result, seconds = _timed(lambda: merge_many(spec, states, seed=ctx.config.seed))
    ctx.tick("merge many")
    return {"models": group, "family": "neuron alignment", "method": "MergeMany (weight matching) + average",
            **_evaluate_state(module, result.mean, ctx.task), "seconds": seconds}


def _with(module, state):
    import copy

    m = copy.deepcopy(module)
    m.load_state_dict(state)
    return m.eval()


def align_to_first(module, states: Sequence[Mapping[str, torch.Tensor]], task, method: str, seed: int = 0
                   ) -> list[dict[str, torch.Tensor]]:
    """Permute every model to match the first (weight or activation matching)."""
    from .. import align
    from ..align.many import align_to_reference

    spec = align.permutation_spec(module, next(iter(task.batches("train", batch_size=8)))[0])
    if method == "weight":
        return list(align_to_reference(spec, states, seed=seed).states)
    reference = _with(module, states[0])
    return [dict(states[0])] + [
        align.apply(spec, align.activation_matching(spec, reference, _with(module, s), task.batches("train", batch_size=256),
                                                    seed=seed), s) for s in states[1:]]


def pair_rows(ctx: Context, module, a: Mapping, b: Mapping, group: str) -> list[dict]:
    """Every neuron-alignment method on one pair: matching (+ REPAIR), OT, ZipIt!, against the naive average."""
    from .. import align

    task, rows = ctx.task, []
    spec = align.permutation_spec(module, next(iter(task.batches("train", batch_size=8)))[0])
    model_a, model_b = _with(module, a), _with(module, b)
    rows.append({"models": group, "family": "single model", "method": "seed A", **_evaluate_state(module, a, task),
                 "seconds": 0.0})
    rows.append({"models": group, "family": "single model", "method": "seed B", **_evaluate_state(module, b, task),
                 "seconds": 0.0})
    rows.append({"models": group, "family": "weight aggregation", "method": "linear (naive)",
                 **_evaluate_state(module, align.interpolate_states(a, b, 0.5), task), "seconds": 0.0})
    for method in ("weight", "activation", "ot", "zipit"):
        result, seconds = _timed(lambda: align.align_models(spec, model_a, model_b, method, task=task, seed=ctx.config.seed))
        merged = result.state if result.merged else align.interpolate_states(a, result.state, 0.5)
        label = "ZipIt!" if method == "zipit" else f"{method} matching + average"
        rows.append({"models": group, "family": "neuron alignment", "method": label,
                     **_evaluate_state(module, merged, task), "seconds": seconds})
        ctx.tick(f"align {method}")
        if method == "activation":
            def repaired():
                net = _with(module, merged)
                align.repair(net, model_a, _with(module, result.state), task.batches("train", batch_size=512))
                return net.state_dict()

            state, extra = _timed(repaired)
            rows.append({"models": group, "family": "neuron alignment", "method": "activation matching + REPAIR",
                         **_evaluate_state(module, state, task), "seconds": seconds + extra})
    result, seconds = _timed(lambda: __import__("mergescope.ensemble", fromlist=["evaluate"]).evaluate(module, [a, b], task))
    rows.append({"models": group, "family": "ensembling", "method": "ensemble (probs)", "accuracy": result.accuracy,
                 "loss": result.loss, "seconds": seconds})
    return rows


# --- 2. connectivity ---------------------------------------------------------------------------
def connectivity(ctx: Context) -> dict:
    """Barrier matrices naive vs aligned, and a Bezier curve vs the line, before and after alignment."""
    from ..landscape import barrier_matrix, fit_curve

    c, task = ctx.config, ctx.task
    recipes = ctx.independents()
    module = ctx.family.module(recipes[0])
    states = ctx.states(recipes)
    names = [f"seed {r.seed}" for r in recipes]
    matrices = {"naive": barrier_matrix(module, states, task, names=names, n=c.path_points).to_dict()}
    ctx.tick("barrier matrix naive")
    for method in ("weight", "activation"):
        aligned = align_to_first(module, states, task, method, c.seed)
        matrices[f"{method} matching"] = barrier_matrix(module, aligned, task, names=names, n=c.path_points).to_dict()
        ctx.tick(f"barrier matrix {method}")
    for m in matrices.values():
        m.pop("paths", None)
    curves = {}
    for align in (None, "activation"):
        curve = fit_curve(module, states[0], states[1], task, kind="bezier", align=align, epochs=c.curve_epochs,
                          seed=c.seed, n=c.path_points)
        curves["aligned" if align else "unaligned"] = curve.to_dict()
        ctx.tick(f"curve {align}")
    return {"matrices": matrices, "curves": curves}


# --- 3. determinism ----------------------------------------------------------------------------
def determinism(ctx: Context) -> dict:
    """Instability analysis (Frankle et al. 2020): spawn two children after k shared epochs."""
    from ..landscape import spawn_stability

    c = ctx.config
    parent = ctx.mlp(c.seed + 300, 0)
    result = spawn_stability(ctx.family.module(parent), ctx.task, spawn_epochs=list(c.spawn_epochs),
                             total_epochs=c.spawn_total_epochs, seed=c.seed + 300, n=c.path_points)
    ctx.tick("spawning")
    return result.to_dict()


# --- 4. directedness ---------------------------------------------------------------------------
def directedness(ctx: Context) -> dict:
    """Task vectors of label-subset fine-tunes: geometry, arithmetic and negation."""
    from ..landscape import task_vectors

    c = ctx.config
    base = ctx.family.state(ctx.parent)
    subsets = ctx.subset_finetunes()
    states = ctx.states(subsets)
    names = [f"digits {''.join(map(str, r.classes))}" for r in subsets]
    tasks = [digits(seed=c.seed, classes=r.classes) for r in subsets]
    result = task_vectors(ctx.family.module(ctx.parent), base, states, tasks, names=names, seed=c.seed)
    ctx.tick("task vectors")
    return result.to_dict()


# --- 7. why weight averaging works -------------------------------------------------------------
def why(ctx: Context) -> dict:
    """Rethink-Merge analyses: weight templates, weight vs feature space, scaling stability."""
    from ..analysis import scaling, spaces, weights

    task = ctx.task
    module = ctx.family.module(ctx.parent)
    inds = ctx.states(ctx.independents())
    fts = ctx.states(ctx.finetunes())
    out = {"weights": weights.analyse(module, {"fine-tune 0": fts[0], "fine-tune 1": fts[1]}, task).to_dict()}
    ctx.tick("weights")
    families = {"fine-tunes of one parent": fts, "independent seeds": inds,
                "independent seeds, aligned": align_to_first(module, inds, task, "weight", ctx.config.seed)}
    out["spaces"] = spaces.compare(module, families, task).to_dict()
    ctx.tick("spaces")
    out["scaling"] = scaling.analyse(module, {"fine-tune 0": fts[0], "fine-tune 1": fts[1]}, task).to_dict()
    ctx.tick("scaling")
    return out


STAGE_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "convexity": convexity,
    "connectivity": connectivity,
    "determinism": determinism,
    "directedness": directedness,
    "merging": merging,
    "why": why,
}
