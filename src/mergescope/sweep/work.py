"""The one task function every executor runs: a TaskSpec in, a JSON-able result row out.

Workers receive checkpoint *paths* and load them themselves, so nothing large crosses process
or machine boundaries. Rows hold no timings or host names: the same spec gives the same row on
any worker, which is what makes local and Ray tables identical.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

FAULT_ENV = "MERGESCOPE_SWEEP_FAULT_MARKER"


def inject_fault_once() -> None:
    """Fault injection for tests: if $MERGESCOPE_SWEEP_FAULT_MARKER names a file that does not
    exist yet, create it and kill this worker process (exactly one task in the sweep dies once)."""
    marker = os.environ.get(FAULT_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(137)


@functools.lru_cache(maxsize=4)
def _task(name: str):
    """The task, built once per worker process (its data split is fixed: the sweep seed is not used)."""
    from ..tasks import get_task

    return get_task(name)


def _path(root: str, ref: str) -> Path:
    p = Path(ref)
    return p if p.is_absolute() else Path(root) / p


def _load(root: str, ref: str) -> dict:
    from ..io import load

    ckpt = load(_path(root, ref))
    return {k: ckpt[k] for k in ckpt}


def _module(root: str, params: dict, first: str):
    from ..io import load
    from ..tasks.checkpoints import model_for

    model = params.get("model")
    if model is not None:
        return model_for(load(_path(root, first)), model["name"], **model.get("options", {}))[0]
    return model_for(load(_path(root, first)))[0]


def _align(module, states: list[dict], task, how: str, seed: int) -> list[dict]:
    if how == "none":
        return states
    from ..study.measure import align_to_first

    return align_to_first(module, states, task, how, seed)


def _barrier(root: str, p: dict) -> dict:
    from ..landscape import interpolate

    task = _task(p["task"])
    module = _module(root, p, p["a"])
    a, b = _align(module, [_load(root, p["a"]), _load(root, p["b"])], task, p["align"], p["seed"])
    if p.get("path", "line") == "line":
        path = interpolate(module, a, b, task, n=p["points"], split=p["split"], bn_reset=p["bn_reset"])
    else:
        from ..landscape import fit_curve

        path = fit_curve(module, a, b, task, kind=p["path"], epochs=p["curve_epochs"], seed=p["seed"],
                         n=p["points"], split=p["split"], bn_reset=p["bn_reset"]).curve
    return {"i": p["i"], "j": p["j"], "a": p["a"], "b": p["b"], "barrier_loss": path.barrier_loss,
            "barrier_acc": path.barrier_acc, "path": path.to_dict()}


def _evaluate_on(module, state: dict, task, splits) -> dict:
    from ..study.measure import with_state

    net = with_state(module, state)
    out = {}
    for split in splits:
        metrics = task.evaluate(net, split)
        out[f"{split}_loss"], out[f"{split}_accuracy"] = float(metrics["loss"]), float(metrics["accuracy"])
    return out


def _evaluate(root: str, p: dict) -> dict:
    task = _task(p["task"])
    module = _module(root, p, p["checkpoint"])
    return {"checkpoint": p["checkpoint"], **_evaluate_on(module, _load(root, p["checkpoint"]), task, p["splits"])}


def method_params(method: str, params: dict, n: int, seed: int) -> dict:
    """Recipe-style parameters for ``n`` models: per-model scalars are broadcast to lists, a missing
    required per-model weight is 1.0 for each model, random methods get the sweep seed."""
    from ..merge.methods import get

    m = get(method)
    out = dict(params)
    for p in m.params:
        if p.scope != "shared":
            if p.name not in out and p.required:
                out[p.name] = 1.0
            if p.name in out and not isinstance(out[p.name], list):
                out[p.name] = [out[p.name]] * n
    if m.random and "seed" not in out:
        out["seed"] = seed
    return out


def _merge(root: str, p: dict) -> dict:
    from ..study.measure import merge_states

    task = _task(p["task"])
    module = _module(root, p, p["models"][0])
    states = _align(module, [_load(root, c) for c in p["models"]], task, p["align"], p["seed"])
    base = None if p["base"] is None else _load(root, p["base"])
    merged = merge_states(p["method"], states, base, **method_params(p["method"], p["params"], len(states), p["seed"]))
    return {"method": p["method"], "params": p["params"], "models": p["models"], "align": p["align"],
            **_evaluate_on(module, merged, task, ("val", "test"))}


_KINDS = {"barrier": _barrier, "evaluate": _evaluate, "merge": _merge}


def run_task(spec) -> dict:
    """Run one TaskSpec on one thread and return its row: ``{"id", "kind", ...results}``."""
    import torch

    torch.set_num_threads(1)
    inject_fault_once()
    return {"id": spec.id, "kind": spec.kind, **_KINDS[spec.kind](spec.root, spec.params)}
