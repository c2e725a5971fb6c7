"""Diagnose models before merging them: data-free signals, optional measurements on a task, a recommendation.

``ms.diagnose(models, base=None, task=None, model=None, ...)`` streams the checkpoints once
(``signals.data_free``: distances, cosines, sign conflicts, norm ratios, alignment gap; bounded memory,
multi-GB checkpoints work), then, with a task, measures the barrier and average vs ensemble on a val
sample (``measured.measure``), and asks ``recommend`` which family and method to use and why.

Why this package is callable: as with ``ms.merge``, importing ``mergescope.diagnose.signals`` binds
this package to ``mergescope.diagnose``, so no function of that name can sit next to it; the package
itself is the function (a ``ModuleType`` subclass with ``__call__``, see ``mergescope/merge/__init__.py``).
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergescopeError

__all__ = ["Diagnosis", "diagnose"]


@dataclass(frozen=True)
class Diagnosis:
    """What ``diagnose`` found: global ``signals``, per-tensor ``layers``, ``measured`` (with a task,
    else None), the ``recommendation`` (None until a recommender is installed) and the ``inputs``."""

    signals: dict
    layers: list
    measured: dict | None
    recommendation: dict | None
    inputs: dict

    def to_dict(self) -> dict:
        return {"inputs": self.inputs, "signals": self.signals, "measured": self.measured,
                "recommendation": self.recommendation, "layers": self.layers}


def recommendation(signals: dict, measured: dict | None) -> dict | None:
    """The recommender's verdict (``diagnose.recommend``, calibrated separately); None while it is absent.

    (Not named ``recommend``: importing the submodule binds that name in this package.)"""
    try:
        from .recommend import recommend
    except ImportError:
        return None
    return recommend(signals, measured)


def _checkpoint(source, label: str):
    """A lazy checkpoint for model/task resolution (metadata, ``path``), from a path or a state."""
    from ..io import Checkpoint, load

    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, Mapping):
        return Checkpoint(Path(label), eager=dict(source))
    return load(source)


def resolve(models: Sequence, task, model, model_options: Mapping | None = None) -> tuple:
    """(template module, Task) from what the user gave, else from the first checkpoint's records.

    ``model`` may be an ``nn.Module``, a zoo name or the user's ``package.module:factory`` (built with
    ``model_options``); ``task`` a Task or a spec string. A checkpoint may only name a zoo model / built-in task (``tasks.checkpoints``).
    """
    from torch import nn

    from ..tasks.checkpoints import model_for, task_for

    first = _checkpoint(models[0], "state 0")
    module = model if isinstance(model, nn.Module) else model_for(first, model, **dict(model_options or {}))[0]
    the_task = task_for(first, task) if isinstance(task, str) else task
    return module, the_task


def _name(x) -> str:
    return str(x) if isinstance(x, (str, os.PathLike)) else type(x).__name__


def diagnose(models: Sequence, base=None, task=None, model=None, *, points: int = 5, sample: int = 512, seed: int = 0,
             align_gap: bool = True, threads: int | None = None, model_options: Mapping | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> Diagnosis:
    """Diagnose two or more models (paths or states), optionally against a ``base`` and on a ``task``.

    Without a task only data-free signals are computed (one streamed pass, no model is built). With a
    task, ``model`` (or the first checkpoint's record) gives the architecture, and the barrier along
    ``points`` points and average/ensemble are measured on ``sample`` val examples. ``progress(stage,
    done, total)`` reports each tensor of the streamed pass and each measurement stage.
    """
    if points < 2:
        raise MergescopeError(f"points={points}: a path needs at least 2 points")
    step = progress or (lambda stage, done, total: None)
    from .signals import data_free

    resolved = None if task is None else resolve(models, task, model, model_options)  # a bad --task/--model fails before the pass
    glob, layers = data_free(models, base, align_gap=align_gap, threads=threads, seed=seed,
                             progress=lambda done, total: step("signals", done, total))
    measured = None
    if resolved is not None:
        from .measured import measure

        module, the_task = resolved
        stages = ("path", "members", "average", "ensemble")
        measured = measure(module, [_checkpoint(m, f"state {i}") for i, m in enumerate(models)], the_task,
                           None if base is None else _checkpoint(base, "base state"), points=points, sample=sample,
                           seed=seed, progress=lambda stage: step(stage, stages.index(stage), len(stages)))
    inputs = {"models": glob["models"], "base": glob["base"],
              "task": None if task is None else (task if isinstance(task, str) else getattr(task, "name", _name(task))),
              "model": None if model is None else (model if isinstance(model, str) else _name(model)),
              "points": points, "sample": sample, "seed": seed, "align_gap": align_gap}
    return Diagnosis(glob, layers, measured, recommendation(glob, measured), inputs)


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """``ms.diagnose(models, ...)``: see ``mergescope.diagnose.diagnose``."""
        return diagnose(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
