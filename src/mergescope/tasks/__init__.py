"""Tasks (data + loss + metrics): the built-in digits and MNIST-1D tasks, and the model zoo."""

from __future__ import annotations

from .base import SPLITS, Task, TensorClassificationTask
from .digits import digits
from .factory import resolve
from .files import is_data_file, task_from_file, task_from_spec
from .mnist1d import mnist1d
from .train import train
from .zoo import TRAIN_DEFAULTS, ZOO, build, model_options, train_defaults

__all__ = ["SPLITS", "TRAIN_DEFAULTS", "Task", "TensorClassificationTask", "ZOO", "build", "digits", "get_task",
           "make_model", "mnist1d", "model_options", "resolve", "seeded_model", "task_from_file", "train", "train_defaults"]


def get_task(spec: str = "digits", **kwargs) -> Task:
    """A built-in task by name ('digits', 'mnist1d'), a data file (``tasks.files``: .csv/.tsv/.jsonl/.txt/.npz,
    e.g. ``data.csv:review,stars``) or a user's ``package.module:factory``."""
    if spec == "digits":
        return digits(**kwargs)
    if spec == "mnist1d":
        return mnist1d(**kwargs)
    if is_data_file(spec):
        return task_from_spec(spec, **kwargs)
    return resolve(spec)(**kwargs)


def seeded_model(spec: str, seed: int, options: dict) -> tuple:
    """(module, full options) with the initialization drawn from ``seed`` (zoo or user factory)."""
    import torch

    if ":" in spec:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return make_model(spec, **options), dict(options)
    return build(spec, seed=seed, **options), {**model_options(spec), **options}


def make_model(spec: str, **options):
    """A zoo model by name or a user's ``package.module:factory`` called with ``options``."""
    if ":" in spec:
        return resolve(spec)(**{k: v for k, v in options.items() if v is not None})
    return build(spec, **options)
