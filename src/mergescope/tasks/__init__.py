"""Tasks (data + loss + metrics) and the built-in digits model zoo."""

from __future__ import annotations

from .base import SPLITS, Task, TensorClassificationTask
from .digits import digits
from .factory import resolve
from .train import train
from .zoo import TRAIN_DEFAULTS, ZOO, build, model_options

__all__ = ["SPLITS", "TRAIN_DEFAULTS", "Task", "TensorClassificationTask", "ZOO", "build", "digits", "get_task",
           "make_model", "model_options", "resolve", "train"]


def get_task(spec: str = "digits", **kwargs) -> Task:
    """A built-in task by name ('digits') or a user's ``package.module:factory``."""
    if spec == "digits":
        return digits(**kwargs)
    return resolve(spec)(**kwargs)


def make_model(spec: str, **options):
    """A zoo model by name or a user's ``package.module:factory`` called with ``options``."""
    if ":" in spec:
        return resolve(spec)(**{k: v for k, v in options.items() if v is not None})
    return build(spec, **options)
