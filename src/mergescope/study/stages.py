"""The default study's stages, each measured on one replicate (its own seeds, models and parents).

A stage takes a ``Context`` (the config, the cached model family, the replicate's seed) and
returns JSON-able results; ``study.run_study`` runs every stage once per replicate and keeps all
replicates, and ``sections`` turns them into intervals, figures and sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..tasks import digits, get_task
from . import measure
from .config import StudyConfig
from .family import Family, Recipe, recipe


@dataclass
class Context:
    """What every stage needs: config, the cached family, the replicate, a progress hook."""

    config: StudyConfig
    family: Family
    replicate: int = 0
    tick: Callable[[str], None] = lambda message: None

    @property
    def seed(self) -> int:
        return self.config.replicate_seed(self.replicate)

    @property
    def task(self):
        return digits(seed=self.config.seed)

    @property
    def mnist1d(self):
        return get_task("mnist1d", seed=self.config.seed)

    def mlp(self, seed: int, epochs: int | None = None, parent: Recipe | None = None, classes=None,
            lr: float | None = None) -> Recipe:
        c = self.config
        return recipe("mlp", seed, c.full_epochs if epochs is None else epochs, parent, classes, lr,
                      width=c.mlp_width, depth=2)

    @property
    def parent(self) -> Recipe:
        return self.mlp(self.seed, self.config.parent_epochs)

    def finetunes(self) -> list[Recipe]:
        c = self.config
        return [self.mlp(self.seed + 100 + i, c.finetune_epochs, self.parent, lr=c.finetune_lr) for i in range(c.finetunes)]

    def independents(self) -> list[Recipe]:
        return [self.mlp(self.seed + 10 + i) for i in range(self.config.independent)]

    def subset_finetunes(self) -> list[Recipe]:
        c = self.config
        return [self.mlp(self.seed + 200 + i, c.finetune_epochs, self.parent, classes, lr=c.finetune_lr)
                for i, classes in enumerate((c.subset_a, c.subset_b))]

    def pair(self, model: str) -> list[Recipe]:
        """Two independent seeds of a digits CNN or transformer, or of the MNIST-1D model."""
        c = self.config
        if model == "mnist1d":
            return [recipe(c.mnist1d_model, self.seed + 10 + i, c.mnist1d_epochs, task="mnist1d",
                           width=c.mnist1d_width) for i in range(2)]
        options = {"cnn": {"width": c.cnn_width}, "transformer": {"dim": c.transformer_dim}}[model]
        epochs = c.full_epochs if model == "cnn" else c.transformer_epochs
        return [recipe(model, self.seed + 10 + i, epochs, **options) for i in range(2)]

    def states(self, recipes: Sequence[Recipe]) -> list[dict[str, torch.Tensor]]:
        out = []
        for r in recipes:
            out.append(self.family.state(r))
            self.tick(f"model {r.model} seed {r.seed}")
        return out

    def named(self, recipes: Sequence[Recipe], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
        return {f"{prefix} {i}": s for i, s in enumerate(self.states(recipes))}

    def module(self, r: Recipe | None = None) -> torch.nn.Module:
        return self.family.module(r or self.parent)


SAME_BASIN, INDEPENDENT = "MLP, fine-tunes of one parent", "MLP, independent seeds"
BACKDOOR_TARGET = 0  # the label the poisoned member's trigger forces (config.backdoor)


def convexity(ctx: Context) -> dict:
    """Linear paths: same-parent fine-tunes vs independent runs, for MLP, CNN, the transformer and MNIST-1D."""
    pairs = {}
    for label, recipes, task in ((SAME_BASIN, ctx.finetunes()[:2], ctx.task),
                                 (INDEPENDENT, ctx.independents()[:2], ctx.task),
                                 ("CNN, independent seeds", ctx.pair("cnn"), ctx.task),
                                 ("Transformer, independent seeds", ctx.pair("transformer"), ctx.task),
                                 ("MNIST-1D CNN, independent seeds", ctx.pair("mnist1d"), ctx.mnist1d)):
        a, b = ctx.states(recipes)
        pairs[label] = (ctx.module(recipes[0]), a, b, task)
    return {**measure.paths(pairs, ctx.config.path_points, ctx.tick), "same_basin": SAME_BASIN,
            "independent": INDEPENDENT}


def connectivity(ctx: Context) -> dict:
    """Per architecture (independent seeds): naive and aligned lines, Bezier curves without and with
    alignment (Tatro et al.), on test and train; plus the MLP barrier matrix naive vs aligned."""
    c = ctx.config
    pairs = {"MLP": (ctx.module(), ctx.independents()[:2], ctx.task),
             "CNN": (ctx.module(ctx.pair("cnn")[0]), ctx.pair("cnn"), ctx.task),
             "Transformer": (ctx.module(ctx.pair("transformer")[0]), ctx.pair("transformer"), ctx.task)}
    out = {"pairs": {}}
    for arch, (module, recipes, task) in pairs.items():
        a, b = ctx.states(recipes)
        curves = arch != "Transformer"  # curve fitting on attention is left to the CLI (cost)
        out["pairs"][arch] = measure.pair_connectivity(module, a, b, task, c.path_points, c.curve_epochs, ctx.seed,
                                                       curves=curves, tick=ctx.tick)
    out["matrices"] = measure.matrices(ctx.module(), ctx.named(ctx.independents(), "seed"), ctx.task, c.path_points,
                                       ctx.seed, ctx.tick)
    return out


def determinism(ctx: Context) -> dict:
    """Instability analysis (Frankle et al. 2020): spawn two children after k shared epochs, on digits
    (MLP) and on MNIST-1D, where a run's basin is decided later."""
    from ..landscape import spawn_stability
    from ..tasks import build, train_defaults

    c = ctx.config
    settings = {
        "digits MLP": ("mlp", {"width": c.mlp_width, "depth": 2}, ctx.task, c.spawn_epochs, c.spawn_total_epochs,
                       train_defaults("mlp")["lr"]),
        f"MNIST-1D {c.mnist1d_spawn_model.upper()}, lr {c.mnist1d_spawn_lr:g}": (
            c.mnist1d_spawn_model, {"width": c.mnist1d_spawn_width, **_mnist1d_inputs(c.mnist1d_spawn_model)},
            ctx.mnist1d, c.mnist1d_spawn_ks, c.mnist1d_spawn_epochs, c.mnist1d_spawn_lr),
    }
    if ctx.replicate >= c.replicates:  # the extra replicates are for MNIST-1D, where the effect is small
        settings.pop("digits MLP")
    out = {}
    for label, (model, options, task, ks, epochs, lr) in settings.items():
        init = build(model, seed=ctx.seed + 300, **options)
        defaults = train_defaults(model)
        result = spawn_stability(init, task, ks=ks, epochs=epochs, lr=lr, weight_decay=defaults["weight_decay"],
                                 batch_size=defaults["batch_size"], seed=ctx.seed + 300, n=c.path_points,
                                 on_epoch=ctx.tick)
        out[label] = {**result.to_dict(), "model": model, "options": options, "lr": lr,
                      "test_examples": task.size("test")}
        out[label].pop("paths", None)
    return {"settings": out}


def _mnist1d_inputs(model: str) -> dict:
    return {"in_features": 40} if model == "mlp" else {}


def directedness(ctx: Context) -> dict:
    """Task vectors of label-subset fine-tunes: geometry, arithmetic and negation."""
    from ..landscape import task_vectors

    c = ctx.config
    subsets = ctx.subset_finetunes()
    names = [f"digits {''.join(map(str, r.classes))}" for r in subsets]
    states = dict(zip(names, ctx.states(subsets)))
    tasks = {name: digits(seed=c.seed, classes=r.classes) for name, r in zip(names, subsets)}
    result = task_vectors(ctx.module(), ctx.family.state(ctx.parent), states, tasks)
    ctx.tick("task vectors")
    return result.to_dict()


def merging(ctx: Context) -> dict:
    """Every merge family on the same models: fine-tunes of one parent, independent seeds, one pair, and a
    pair of MNIST-1D CNNs (where averaging independent runs fails)."""
    c, task, module = ctx.config, ctx.task, ctx.module()
    fts = ctx.named(ctx.finetunes(), "fine-tune")
    inds = ctx.named(ctx.independents(), "seed")
    rows = measure.merge_rows(module, fts, task, f"{len(fts)} fine-tunes of one parent",
                              base=ctx.family.state(ctx.parent), seed=ctx.seed, tick=ctx.tick)
    rows += measure.merge_rows(module, inds, task, f"{len(inds)} independent seeds", seed=ctx.seed, tick=ctx.tick)
    a, b = list(inds.values())[:2]
    rows += measure.pair_rows(module, a, b, task, "2 independent seeds", ctx.seed, ctx.tick)
    recipes = ctx.pair("mnist1d")
    a, b = ctx.states(recipes)
    rows += measure.pair_rows(ctx.module(recipes[0]), a, b, ctx.mnist1d, "MNIST-1D: 2 independent CNN seeds",
                              ctx.seed, ctx.tick)
    out = {"rows": rows}
    if c.backdoor:  # optional column: absent (not empty) when off, so default results stay as they were
        out["backdoor"] = backdoor_persistence(ctx, module, fts)
    return out


def backdoor_persistence(ctx: Context, module: torch.nn.Module, finetunes: dict) -> dict:
    """One more fine-tune of the parent, on digits with 10% of train triggered (corner patch) and relabelled
    0; clean accuracy and attack success rate of every member and merge (uniform average, task arithmetic,
    TIES; ``analysis.backdoor``)."""
    from ..analysis import backdoor
    from ..tasks import train_defaults

    c, task, parent = ctx.config, ctx.task, ctx.family.state(ctx.parent)
    trigger = backdoor.Trigger()
    params = {**train_defaults("mlp"), "epochs": c.finetune_epochs, "lr": c.finetune_lr}  # as the clean fine-tunes
    poisoned = backdoor.poisoned_finetune(module, parent, task, trigger, BACKDOOR_TARGET, seed=ctx.seed + 400,
                                          **params)
    ctx.tick("poisoned fine-tune")
    states = {**finetunes, "poisoned fine-tune": poisoned}
    merges = backdoor.standard_merges(module, states, task, base=parent, seed=ctx.seed)
    result = backdoor.persistence(module, states, merges, task, trigger, BACKDOOR_TARGET).to_dict()
    return {**result, "models": f"{len(finetunes)} fine-tunes + 1 poisoned (backdoor)"}


def why(ctx: Context) -> dict:
    """Rethink-Merge analyses on fine-tunes and (aligned) independent seeds."""
    module, task = ctx.module(), ctx.task
    fts = ctx.states(ctx.finetunes())
    inds = ctx.states(ctx.independents())
    families = {"fine-tunes of one parent": fts, "independent seeds": inds,
                "independent seeds, aligned": measure.align_to_first(module, inds, task, "weight", ctx.seed)}
    aligned = families["independent seeds, aligned"]
    pairs = {"fine-tunes": {"fine-tune 0": fts[0], "fine-tune 1": fts[1]},
             "independent seeds": {"seed 0": inds[0], "seed 1": inds[1]},
             "independent seeds, aligned": {"seed 0": aligned[0], "seed 1 aligned": aligned[1]}}
    return measure.why(module, pairs, families, task, ctx.tick, templates=ctx.replicate == 0)


STAGE_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "convexity": convexity,
    "connectivity": connectivity,
    "determinism": determinism,
    "directedness": directedness,
    "merging": merging,
    "why": why,
}


# The models each stage reads, so the runner can train them all (in parallel) before the stages run.
STAGE_RECIPES: dict[str, Callable[[Context], list[Recipe]]] = {
    "convexity": lambda ctx: (ctx.finetunes()[:2] + ctx.independents()[:2] + ctx.pair("cnn") + ctx.pair("transformer")
                              + ctx.pair("mnist1d")),
    "connectivity": lambda ctx: ctx.independents() + ctx.pair("cnn") + ctx.pair("transformer"),
    "determinism": lambda ctx: [],
    "directedness": lambda ctx: [ctx.parent, *ctx.subset_finetunes()],
    "merging": lambda ctx: [ctx.parent, *ctx.finetunes(), *ctx.independents(), *ctx.pair("mnist1d")],
    "why": lambda ctx: ctx.finetunes() + ctx.independents(),
}
