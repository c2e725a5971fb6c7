"""The study's model family, trained once and cached by recipe.

Each model is described by a recipe (architecture, options, seed, epochs, parent, label subset);
its checkpoint's metadata stores that recipe, and a cached file is reused only when the stored
recipe matches exactly (provenance match) — change anything and it is retrained.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._version import __version__
from ..errors import MergescopeError
from ..io import load, save
from ..tasks import build, get_task, train, train_defaults
from ..tasks.checkpoints import load_state_into, model_metadata


@dataclass(frozen=True)
class Recipe:
    """How to produce one model: train ``model`` from ``parent`` (or a fresh init) on ``classes``."""

    model: str
    options: tuple[tuple[str, object], ...]
    seed: int
    epochs: int
    parent: Recipe | None = None
    classes: tuple[int, ...] | None = None
    lr: float | None = None
    task: str = "digits"

    def to_dict(self) -> dict:
        d = {"model": self.model, "options": dict(self.options), "seed": self.seed, "epochs": self.epochs,
             "parent": None if self.parent is None else self.parent.to_dict(),
             "classes": None if self.classes is None else list(self.classes), "lr": self.lr, "version": __version__}
        if self.task != "digits":  # digits recipes keep their keys (and cached checkpoints)
            d["task"] = self.task
        return d

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def recipe(model: str, seed: int, epochs: int, parent: Recipe | None = None, classes=None, lr: float | None = None,
           task: str = "digits", **options) -> Recipe:
    return Recipe(model, tuple(sorted(options.items())), seed, epochs, parent, tuple(classes) if classes else None, lr,
                  task)


@dataclass
class Family:
    """Trains and caches models under ``folder``; ``state(r)`` returns the trained state of recipe ``r``."""

    folder: Path
    on_trained: Callable[[str], None] | None = None
    trained: int = 0
    reused: int = 0
    _memo: dict = field(default_factory=dict)

    def module(self, r: Recipe) -> torch.nn.Module:
        return build(r.model, **dict(r.options))

    def state(self, r: Recipe) -> dict[str, torch.Tensor]:
        if r.key in self._memo:
            return self._memo[r.key]
        path = self.folder / f"{r.model}-{r.key}.safetensors"
        expected = json.dumps(r.to_dict(), sort_keys=True)
        state = None
        if path.exists():
            try:
                ckpt = load(path)
                if ckpt.metadata.get("study_recipe") == expected:
                    state = {k: ckpt.read(k) for k in ckpt}
            except MergescopeError:
                state = None  # a damaged cache entry is simply retrained
        if state is None:
            state = self._train(r)
            meta = {**model_metadata(r.model, dict(r.options), task=self._task(r).name), "study_recipe": expected,
                    "seed": str(r.seed)}
            save(state, path, metadata=meta, force=True)
            self.trained += 1
        else:
            self.reused += 1
        self._memo[r.key] = state
        if self.on_trained is not None:
            self.on_trained(r.key)
        return state

    def _train(self, r: Recipe) -> dict[str, torch.Tensor]:
        net = build(r.model, seed=r.seed, **dict(r.options))
        if r.parent is not None:
            load_state_into(net, self.state(r.parent), f"parent {r.parent.key}")
        params = {**train_defaults(r.model), "epochs": r.epochs}
        if r.lr is not None:
            params["lr"] = r.lr
        if r.epochs > 0:
            train(net, self._task(r), seed=r.seed, **params)
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    @staticmethod
    def _task(r: Recipe):
        return get_task(r.task, classes=r.classes) if r.classes else get_task(r.task)
