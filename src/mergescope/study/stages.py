"""The default study's stages: pick models from the cached digits family, measure with ``measure``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..tasks import digits
from . import measure
from .config import StudyConfig
from .family import Family, Recipe, recipe


@dataclass
class Context:
    """What every stage needs: config, the cached family, a progress hook."""

    config: StudyConfig
    family: Family
    tick: Callable[[str], None] = lambda message: None

    @property
    def task(self):
        return digits(seed=self.config.seed)

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
        epochs = c.full_epochs if model == "cnn" else 2 * c.full_epochs
        return [recipe(model, c.seed + 10 + i, epochs, **options) for i in range(2)]

    def states(self, recipes: Sequence[Recipe]) -> list[dict[str, torch.Tensor]]:
        out = []
        for r in recipes:
            out.append(self.family.state(r))
            self.tick(f"model {r.model} seed {r.seed}")
        return out

    def named(self, recipes: Sequence[Recipe], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
        return {f"{prefix} {r.seed}": s for r, s in zip(recipes, self.states(recipes))}

    @property
    def module(self) -> torch.nn.Module:
        return self.family.module(self.parent)


def convexity(ctx: Context) -> dict:
    """Linear paths: same-parent fine-tunes vs independent runs, for MLP, CNN and the transformer."""
    pairs = {}
    for label, recipes in (("MLP, fine-tunes of one parent", ctx.finetunes()[:2]),
                           ("MLP, independent seeds", ctx.independents()[:2]),
                           ("CNN, independent seeds", ctx.pair("cnn")),
                           ("Transformer, independent seeds", ctx.pair("transformer"))):
        a, b = ctx.states(recipes)
        pairs[label] = (ctx.family.module(recipes[0]), a, b)
    result = measure.paths(pairs, ctx.task, ctx.config.path_points, ctx.tick)
    result["same_basin"], result["independent"] = "MLP, fine-tunes of one parent", "MLP, independent seeds"
    return result


def connectivity(ctx: Context) -> dict:
    c = ctx.config
    return measure.connectivity(ctx.module, ctx.named(ctx.independents(), "seed"), ctx.task, c.path_points,
                                c.curve_epochs, c.seed, ctx.tick)


def determinism(ctx: Context) -> dict:
    """Instability analysis (Frankle et al. 2020) on the MLP: spawn two children after k shared epochs."""
    from ..landscape import spawn_stability
    from ..tasks import build

    c = ctx.config
    init = build("mlp", seed=c.seed + 300, width=c.mlp_width, depth=2)
    result = spawn_stability(init, ctx.task, ks=c.spawn_epochs, epochs=c.spawn_total_epochs, seed=c.seed + 300,
                             n=c.path_points, on_epoch=ctx.tick)
    return result.to_dict()


def directedness(ctx: Context) -> dict:
    """Task vectors of label-subset fine-tunes: geometry, arithmetic and negation."""
    from ..landscape import task_vectors

    c = ctx.config
    subsets = ctx.subset_finetunes()
    names = [f"digits {''.join(map(str, r.classes))}" for r in subsets]
    states = dict(zip(names, ctx.states(subsets)))
    tasks = {name: digits(seed=c.seed, classes=r.classes) for name, r in zip(names, subsets)}
    result = task_vectors(ctx.module, ctx.family.state(ctx.parent), states, tasks)
    ctx.tick("task vectors")
    return result.to_dict()


def merging(ctx: Context) -> dict:
    """Every merge family on the same models: fine-tunes of one parent, independent seeds, one pair."""
    c, task, module = ctx.config, ctx.task, ctx.module
    fts = ctx.named(ctx.finetunes(), "fine-tune")
    inds = ctx.named(ctx.independents(), "seed")
    rows = measure.merge_rows(module, fts, task, f"{len(fts)} fine-tunes of one parent",
                              base=ctx.family.state(ctx.parent), seed=c.seed, tick=ctx.tick)
    rows += measure.merge_rows(module, inds, task, f"{len(inds)} independent seeds", seed=c.seed, tick=ctx.tick)
    a, b = list(inds.values())[:2]
    rows += measure.pair_rows(module, a, b, task, "2 independent seeds", c.seed, ctx.tick)
    return {"rows": rows}


def why(ctx: Context) -> dict:
    """Rethink-Merge analyses on fine-tunes and (aligned) independent seeds."""
    module, task = ctx.module, ctx.task
    fts = ctx.states(ctx.finetunes())
    inds = ctx.states(ctx.independents())
    families = {"fine-tunes of one parent": fts, "independent seeds": inds,
                "independent seeds, aligned": measure.align_to_first(module, inds, task, "weight", ctx.config.seed)}
    return measure.why(module, {"fine-tune 0": fts[0], "fine-tune 1": fts[1]}, families, task, ctx.tick)


STAGE_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "convexity": convexity,
    "connectivity": connectivity,
    "determinism": determinism,
    "directedness": directedness,
    "merging": merging,
    "why": why,
}
