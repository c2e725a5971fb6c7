"""The one task function every executor runs: a TaskSpec in, a JSON-able result row out.

Workers receive checkpoint *paths* and load them themselves, except that on Ray small states come
ready-made from the object store (``sharing``); either way a task sees the same tensors. Rows hold
no timings or host names: the same spec gives the same row on any worker, which is what makes
local and Ray tables identical.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

from .sharing import resolve

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


class Sources:
    """Where a task's checkpoints come from: states the driver shared (by the name written in the
    sweep), else the files, resolved against the sweep's folder."""

    def __init__(self, root: str, shared: Mapping[str, Mapping] | None = None):
        self.root, self.shared = root, dict(shared or {})

    def open(self, ref: str):
        """A mapping of tensors with ``.metadata`` and ``.path`` (lazy when read from disk)."""
        if ref in self.shared:
            return self.shared[ref]
        from ..io import load

        return load(resolve(self.root, ref))

    def state(self, ref: str) -> dict:
        """Tensors a task may change: shared ones are cloned, as every disk load is a private copy-on-write map."""
        ckpt = self.open(ref)
        if ref in self.shared:
            return {k: ckpt[k].clone() for k in ckpt}
        return {k: ckpt[k] for k in ckpt}


def _module(src: Sources, params: dict, first: str):
    from ..tasks.checkpoints import model_for

    model = params.get("model")
    if model is not None:
        return model_for(src.open(first), model["name"], **model.get("options", {}))[0]
    return model_for(src.open(first))[0]


def _align(module, states: list[dict], task, how: str, seed: int) -> list[dict]:
    if how == "none":
        return states
    from ..study.measure import align_to_first

    return align_to_first(module, states, task, how, seed)


def _barrier(src: Sources, p: dict) -> dict:
    from ..landscape import interpolate

    task = _task(p["task"])
    module = _module(src, p, p["a"])
    a, b = _align(module, [src.state(p["a"]), src.state(p["b"])], task, p["align"], p["seed"])
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


def _evaluate(src: Sources, p: dict) -> dict:
    task = _task(p["task"])
    module = _module(src, p, p["checkpoint"])
    return {"checkpoint": p["checkpoint"], **_evaluate_on(module, src.state(p["checkpoint"]), task, p["splits"])}


def method_params(method: str, params: dict, n: int, seed: int) -> dict:
    """Recipe-style parameters for ``n`` models: per-model scalars are broadcast to lists, a missing
    required per-model weight is 1.0 for each model, random methods get the sweep seed. Values are
    checked and converted as a recipe's are (``recipe.check_parameters``: "false" is False, 1 is 1.0)."""
    from ..merge.methods import get
    from ..recipe import check_parameters

    m = get(method)
    grid_seed = {"seed": params["seed"]} if m.random and "seed" in params else {}
    out = {**check_parameters(method, {k: v for k, v in params.items() if k not in grid_seed}, f"merge {method}", n),
           **grid_seed}
    for p in m.params:
        if p.scope != "shared":
            if p.name not in out and p.required:
                out[p.name] = 1.0
            if p.name in out and not isinstance(out[p.name], list):
                out[p.name] = [out[p.name]] * n
    if m.random and "seed" not in out:
        out["seed"] = seed
    return out


def _merge(src: Sources, p: dict) -> dict:
    from ..study.measure import merge_states

    task = _task(p["task"])
    module = _module(src, p, p["models"][0])
    states = _align(module, [src.state(c) for c in p["models"]], task, p["align"], p["seed"])
    from ..merge import data_aware_recipe as data_aware

    if data_aware.is_data_aware(p["method"]):  # Fisher / RegMean: the model run on the sweep's task
        params = data_aware.check_parameters(p["method"], p["params"], f"merge {p['method']}")
        merged = data_aware.merge_states(p["method"], module, states, task, params)
    else:
        base = None if p["base"] is None else src.state(p["base"])
        merged = merge_states(p["method"], states, base, **method_params(p["method"], p["params"], len(states), p["seed"]))
    return {"method": p["method"], "params": p["params"], "models": p["models"], "align": p["align"],
            **_evaluate_on(module, merged, task, ("val", "test"))}


_KINDS = {"barrier": _barrier, "evaluate": _evaluate, "merge": _merge}


def run_task(spec, shared: Mapping[str, Mapping] | None = None) -> dict:
    """Run one TaskSpec on one thread and return its row: ``{"id", "kind", ...results}``. ``shared``
    maps checkpoints (as written in the sweep) to states already in memory; the rest are read from disk."""
    import torch

    torch.set_num_threads(1)
    inject_fault_once()
    return {"id": spec.id, "kind": spec.kind, **_KINDS[spec.kind](Sources(spec.root, shared), spec.params)}


def run_task_with_states(spec, names: list[str], *states: Mapping) -> dict:
    """``run_task`` for Ray: the shared states are top-level arguments (ObjectRefs on the driver), so
    Ray hands the task the objects themselves; ``names[i]`` is the checkpoint ``states[i]`` stands for."""
    return run_task(spec, dict(zip(names, states, strict=True)))
