"""Zoo checkpoints remember which model they hold, so commands can rebuild it from the file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import MergescopeError


def model_metadata(name: str, options: Mapping, task: str = "digits", **extra) -> dict[str, str]:
    """Metadata entries that let ``model_for`` rebuild the architecture later."""
    return {"model": json.dumps({"name": name, "options": dict(options)}, sort_keys=True), "task": task,
            **{k: str(v) for k, v in extra.items()}}


def model_spec_of(ckpt) -> tuple[str, dict] | None:
    """(name, options) recorded in a checkpoint's metadata, or None."""
    raw = getattr(ckpt, "metadata", {}).get("model")
    if raw is None:
        return None
    try:
        spec = json.loads(raw)
        return spec["name"], dict(spec.get("options", {}))
    except (ValueError, KeyError, TypeError):
        raise MergescopeError(f"{ckpt.path}: metadata 'model' is not valid JSON with name/options") from None


def model_for(ckpt, model: str | None = None, **options) -> tuple[nn.Module, str, dict]:
    """Build the module a checkpoint belongs to: from ``model``/options if given, else its metadata."""
    from . import make_model

    recorded = model_spec_of(ckpt)
    given = {k: v for k, v in options.items() if v is not None}  # unset CLI options arrive as None
    if model is None:
        if recorded is None:
            raise MergescopeError(f"{ckpt.path}: no model recorded in metadata; pass --model NAME or package.module:factory")
        model = recorded[0]
    base = recorded[1] if recorded is not None and recorded[0] == model else {}
    options = {**base, **given}
    return make_model(model, **options), model, options


def load_state_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike = "state") -> nn.Module:
    """Load a state strictly, turning key/shape mismatches into one-line errors."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing or extra:
        raise MergescopeError(
            f"{source}: does not fit the model (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for k, t in expected.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise MergescopeError(f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, the model needs {tuple(t.shape)}")
    module.load_state_dict({k: state[k] for k in expected}, strict=True)
    return module


def task_for(ckpt, spec: str | None = None):
    """The task named on the command line, else the one `mergescope train` recorded (digits or a subset)."""
    import re

    from . import digits, get_task

    if spec:
        return get_task(spec)
    recorded = getattr(ckpt, "metadata", {}).get("task", "digits")
    match = re.fullmatch(r"digits(?:\[([0-9,]+)\])?", recorded)
    if match is None:
        raise MergescopeError(f"{ckpt.path}: records task {recorded!r}; pass --task")
    return digits(classes=tuple(int(c) for c in match.group(1).split(","))) if match.group(1) else digits()
