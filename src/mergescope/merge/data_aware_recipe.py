"""Fisher merging and RegMean from recipes, the CLI and sweeps (``merge_method: fisher | regmean``).

Why a separate path: the streaming engine merges tensor by tensor without a model, but these methods
need the whole model run on calibration data (per-example gradients, layer-input Grams). So a recipe
names its ``model`` (a zoo name; else the checkpoints' own record or Hugging Face folder via
``model_for``) and its calibration ``task`` (a built-in task or a data file). A recipe is a file: it
may never name a ``package.module:factory`` (``recipe.py`` refuses it) - only the user's own
``--model``/``--task`` may. The merged state goes through the same writer (``io.save``: atomic,
sharded, provenance metadata, the zoo record passed on) as any recipe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import MergescopeError

METHODS = ("fisher", "regmean")
# name -> (kind, (low, high) inclusive bounds); every parameter a recipe or a sweep grid may set.
PARAMS = {
    "fisher": {"weight": (float, (0.0, 3.4e38)), "examples": (int, (1, 10_000_000)),
               "batch_size": (int, (1, 65_536)), "floor": (float, (0.0, 1.0))},
    "regmean": {"alpha": (float, (0.0, 1.0)), "examples": (int, (1, 10_000_000)),
                "batch_size": (int, (1, 65_536))},
}


def is_data_aware(method: str) -> bool:
    return method in METHODS


def check_parameters(method: str, params: Mapping, where: str) -> dict:
    """Convert and bound ``params`` (names, types and ranges of ``PARAMS``); one line per problem."""
    from ..recipe import converter

    known = PARAMS[method]
    out = {}
    for key, value in params.items():
        if key not in known:
            raise MergescopeError(f"{where}: parameter {key!r} is not used by {method}; valid: {', '.join(known)}")
        kind, (low, high) = known[key]
        if isinstance(value, (list, dict)) or value is None:
            raise MergescopeError(f"{where}: parameter {key!r} must be one {kind.__name__}, got {value!r:.60}")
        v = converter(key, kind, where)(value)
        if not low <= v <= high:
            raise MergescopeError(f"{where}: parameter {key!r} must be in [{low:g}, {high:g}], got {v!r:.60}")
        out[key] = v
    return out


def merge_states(method: str, module, states: Sequence[Mapping[str, torch.Tensor]], task, params: Mapping,
                 weights: Sequence[float] | None = None, tasks: Sequence | None = None) -> dict[str, torch.Tensor]:
    """The API call a recipe or sweep point stands for (``data_aware.fisher_merge`` / ``regmean_merge``);
    model i is calibrated on ``tasks[i]`` when given, else on ``task``."""
    from . import data_aware

    p = dict(params)
    common = {"n_examples": p.pop("examples", None), "batch_size": p.pop("batch_size", 128), "tasks": tasks}
    if method == "fisher":
        p.pop("weight", None)
        try:
            return data_aware.fisher_merge(module, states, task, weights=weights, floor=p.pop("floor", 1e-6), **common)
        except RuntimeError as e:  # per-example gradients run under torch.func.vmap; some models' code cannot
            if "vmap" not in str(e):
                raise
            raise MergescopeError(f"fisher: {type(module).__name__} cannot run under torch.func.vmap (per-example "
                                  f"gradients): {str(e).splitlines()[0][:160]}; use regmean for this model") from None
    return data_aware.regmean_merge(module, states, task, alpha=p.pop("alpha", 0.9), **common)


PER_MODEL = {"fisher": ("weight", "task"), "regmean": ("task",)}  # per-model keys (``models[i].parameters``)


def _recipe_parameters(recipe) -> tuple[dict, list[float] | None, list[str]]:
    """(shared parameters, per-model Fisher weights or None, per-model calibration task specs) from a
    recipe's plain scalar settings; a model's own ``task`` (checked like the top-level one) beats ``task``."""
    from ..recipe import Conditional, _calibration_task

    where, method = recipe.source, recipe.merge_method

    def scalar(scope, key):
        value = scope[key]
        if isinstance(value, (list, Conditional)):
            raise MergescopeError(f"{where}: parameter {key!r} of {method} must be one value "
                                  "(no gradients or filters: the method solves whole layers)")
        return value

    top = recipe.parameters or {}
    if "task" in top:
        raise MergescopeError(f"{where}: give the calibration data as the top-level key 'task', not a parameter")
    shared = check_parameters(method, {k: scalar(top, k) for k in top if k != "weight"}, where)
    if "weight" in top and method != "fisher":
        raise MergescopeError(f"{where}: parameter 'weight' is not used by {method}")
    weights, tasks = [], []
    for m in recipe.models:
        own = m.parameters or {}
        extra = [k for k in own if k not in PER_MODEL[method]]
        if extra:
            raise MergescopeError(f"{where}: model {m.model!r}: per-model parameter {extra[0]!r} is not used by "
                                  f"{method}; valid: {', '.join(PER_MODEL[method])}")
        try:
            tasks.append(_calibration_task(scalar(own, "task")) if "task" in own else recipe.task)
        except ValueError as e:
            raise MergescopeError(f"{where}: model {m.model!r}: {e}") from None
        scope = own if "weight" in own else top
        weights.append(check_parameters(method, {"weight": scalar(scope, "weight")}, where)["weight"]
                       if "weight" in scope else 1.0)
    if sum(weights) <= 0:
        raise MergescopeError(f"{where}: fisher weights must not all be zero")
    return shared, weights if method == "fisher" else None, tasks


def check_recipe(recipe) -> None:
    """The shape a data-aware recipe must have (before anything is read)."""
    where = recipe.source
    if recipe.slices or not recipe.models:
        raise MergescopeError(f"{where}: {recipe.merge_method} merges whole models: use 'models', not 'slices'")
    if recipe.task is None:
        raise MergescopeError(f"{where}: {recipe.merge_method} needs calibration data: add 'task: digits' "
                              "(a built-in task) or 'task: data.csv' (a data file)")
    if recipe.base_model is not None:
        raise MergescopeError(f"{where}: {recipe.merge_method} takes no base_model (it merges the models' weights "
                              "directly)")
    if recipe.tokenizer_source or recipe.tokenizer or recipe.chat_template:
        raise MergescopeError(f"{where}: {recipe.merge_method} keeps the models' vocabulary; tokenizer settings "
                              "are not supported")
    _recipe_parameters(recipe)


def merge(recipe, out_dir: str | os.PathLike, force: bool = False, seed: int | None = None,
          max_shard_size: int | str = "2GB", on_plan=None, on_tensor=None, allow_nonfinite: bool = False):
    """Run a fisher/regmean recipe into ``out_dir`` (a ``.safetensors`` file or a HF-layout folder); a merged
    tensor with NaN/Inf is an error unless ``allow_nonfinite`` (as in the streamed engine)."""
    from ..io import check_output_path, load, provenance
    from ..tasks import checkpoints as ck
    from .engine import MergeResult, check_finite
    from .plan import DTYPES

    start = time.perf_counter()
    check_recipe(recipe)
    seed = 0 if seed is None else int(seed)
    paths = [m.model for m in recipe.models]
    out = Path(out_dir)
    check_output_path(out, [Path(p) for p in paths], force)
    for p in paths:
        if not Path(p).exists():
            raise MergescopeError(f"{recipe.source}: model {p!r}: no such file or folder")
    ckpts = [load(p) for p in paths]
    module, name, _ = ck.model_for(ckpts[0], recipe.model)
    states = [ck.fitted_state(module, {k: c[k] for k in c}, p) for p, c in zip(paths, ckpts)]
    shared, weights, specs = _recipe_parameters(recipe)
    built = {t: ck.task_for(ckpts[0], t) for t in dict.fromkeys(specs)}  # each named task built once
    tasks = [built[t] for t in specs]
    if on_plan is not None:
        on_plan(len(states[0]), sum(t.numel() * t.element_size() for s in states for t in s.values()))
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # same bits whatever the core count
    try:
        merged = merge_states(recipe.merge_method, module, states, tasks[0], shared, weights, tasks)
    finally:
        torch.set_num_threads(old)
    out_dtype = recipe.out_dtype or recipe.dtype
    if out_dtype:
        merged = {k: v.to(DTYPES[out_dtype]) if v.is_floating_point() else v for k, v in merged.items()}
    for k, v in merged.items() if not allow_nonfinite else ():
        check_finite(k, v)
    meta = provenance(inputs=paths, recipe_text=recipe.text, seed=seed, merge_method=recipe.merge_method)
    meta.update(ck.passed_metadata(ckpts[0].metadata))
    folder = ck.hf_folder(ckpts[0]) if name is None else None
    files = _write(merged, out, meta, max_shard_size, force, [Path(p) for p in paths], folder, recipe.text)
    written = sum(f.stat().st_size for f in files)
    read = sum(t.numel() * t.element_size() for s in states for t in s.values())
    if on_tensor is not None:
        for k, v in merged.items():
            on_tensor(k, v.numel() * v.element_size())
    return MergeResult(str(out), recipe.merge_method, len(merged), read, written, time.perf_counter() - start,
                       tuple(f.name for f in files), seed)


def _write(state, out: Path, meta, max_shard_size, force, inputs, folder, recipe_text: str) -> list[Path]:
    """Atomically write the merged state (the engine's writer); a folder output also gets the donor's
    config/tokenizer files and ``mergescope_recipe.yml`` (multi-stage recipes reuse a stage by it)."""
    from ..io import atomic_output, copy_aux_files, write_state

    single = out.suffix == ".safetensors"
    with atomic_output(out, inputs, force=force, is_dir=not single) as tmp:
        names = [Path(f).name for f in write_state(tmp, state, max_shard_size, meta, single_file=single)]
        if not single:
            if folder is not None:
                copy_aux_files(folder, tmp)
            if recipe_text:
                (tmp / "mergescope_recipe.yml").write_text(recipe_text)
    return [out] if single else [out / n for n in names]


__all__ = ["METHODS", "PARAMS", "check_parameters", "check_recipe", "is_data_aware", "merge", "merge_states"]
