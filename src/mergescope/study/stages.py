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
    rows.extend(_aligned_rows(ctx, module, inds, group))
    return {"rows": rows}


def _aligned_rows(ctx: Context, module, states, group) -> list[dict]:
    """Neuron alignment family: align every model to the first, then average (MergeMany-style)."""
    from .. import align

    task = ctx.task
    example = next(iter(task.batches("train", batch_size=8)))[0]
    spec = align.permutation_spec(module, example)
    rows = []
    for method in ("weight", "activation"):
        start = time.perf_counter()
        aligned = [states[0]]
        for s in states[1:]:
            if method == "weight":
                perm = align.weight_matching(spec, states[0], s, seed=ctx.config.seed)
            else:
                perm = align.activation_matching(spec, _with(module, states[0]), _with(module, s),
                                                 task.batches("train", batch_size=256))
            aligned.append(align.apply(spec, perm, s))
        merged = merge_states("linear", aligned, None, weight=[1.0] * len(aligned))
        seconds = time.perf_counter() - start
        rows.append({"models": group, "family": "neuron alignment", "method": f"{method} matching + average",
                     **_evaluate_state(module, merged, task), "seconds": seconds})
        ctx.tick(f"align {method}")
    return rows


def _with(module, state):
    import copy

    m = copy.deepcopy(module)
    m.load_state_dict(state)
    return m.eval()


STAGE_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "convexity": convexity,
    "merging": merging,
}
