"""Turn a recipe into a list of per-tensor jobs: which input tensors, which base, which parameters.

Layers are found by name (``...layers.7.mlp...``, also ``h.N``, ``blocks.N``, ``layer.N``), so no
architecture table is needed. ``models`` recipes merge every tensor under its own name;
``slices`` recipes renumber layers consecutively (layer stacking), take embedding-like tensors
from the first slice's sources and the rest of the non-layer tensors from the last slice's.
Gradients are read at ``t = layer / (layers - 1)`` of the output slice, ``t = 0`` elsewhere
(MergeKit 0.1.5's planner).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergescopeError
from ..io import Checkpoint, load
from ..recipe import Parameters, Recipe, resolve
from .methods import Method, get

LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<index>\d+)(?P<suffix>\..+)$")
PRE = re.compile(r"embed|wte|wpe|tok_emb|pos_emb|patch_emb|cls_token")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


@dataclass(frozen=True)
class Job:
    """One output tensor: ``inputs`` are (model index, tensor name); ``base`` indexes ``inputs``."""

    name: str
    inputs: tuple[tuple[int, str], ...]
    base: int | None
    shared: dict
    per_input: tuple[dict, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes_in: int

    @property
    def nbytes_out(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Plan:
    method: Method
    models: tuple[str, ...]
    jobs: tuple[Job, ...]
    donor: str
    num_layers: int | None
    stacked: bool


@dataclass(frozen=True)
class _Source:
    model: str
    start: int
    stop: int
    parameters: Parameters | None


def layer_index(name: str) -> int | None:
    m = LAYER.match(name)
    return int(m.group("index")) if m else None


def count_layers(ckpt: Checkpoint) -> int:
    indices = [i for i in map(layer_index, ckpt) if i is not None]
    return max(indices) + 1 if indices else 0


def open_models(recipe: Recipe) -> dict[str, Checkpoint]:
    """Open every referenced model lazily; anything not a local path is an error (nothing is downloaded)."""
    opened = {}
    for path in recipe.referenced_models():
        if not Path(path).exists():
            raise MergescopeError(f"model {path!r}: no such local file or folder (mergescope reads local paths only; "
                                  "nothing is downloaded)")
        opened[path] = load(path)
    return opened


def _slices(recipe: Recipe, ckpts: dict[str, Checkpoint]) -> list[tuple[list[_Source], str | None, Parameters | None]]:
    if recipe.slices:
        return [([_Source(s.model, *s.layer_range, s.parameters) for s in sl.sources],
                 sl.base_model or recipe.base_model, sl.parameters) for sl in recipe.slices]
    sources = [_Source(m.model, 0, count_layers(ckpts[m.model]), m.parameters) for m in recipe.models]
    if recipe.base_model and recipe.base_model not in [s.model for s in sources]:
        sources.append(_Source(recipe.base_model, 0, count_layers(ckpts[recipe.base_model]), None))
    lengths = {s.model: s.stop for s in sources}
    if len(set(lengths.values())) > 1:
        raise MergescopeError(f"models have different numbers of layers: {lengths}")
    return [(sources, recipe.base_model, None)]


def _check_contract(method: Method, sources: list[_Source], base: str | None, where: str) -> None:
    names = [s.model for s in sources]
    has_base = base is not None and base in names and method.base != "ignored"
    if method.base == "required" and not has_base:
        raise MergescopeError(f"{where}: merge method {method.name!r} needs a base_model among its inputs")
    if len(names) < method.min_inputs or (method.max_inputs is not None and len(names) > method.max_inputs):
        want = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs
                else f"at least {method.min_inputs}" if method.max_inputs is None else f"at most {method.max_inputs}")
        raise MergescopeError(f"{where}: merge method {method.name!r} takes {want} models, got {len(names)}")


def _check_parameter_names(method: Method, recipe: Recipe) -> None:
    scopes = [("parameters", recipe.parameters)]
    scopes += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(recipe.models or ())]
    for i, sl in enumerate(recipe.slices or ()):
        scopes.append((f"slices[{i}].parameters", sl.parameters))
        scopes += [(f"slices[{i}].sources[{j}].parameters", s.parameters) for j, s in enumerate(sl.sources)]
    valid = method.param_names
    for where, scope in scopes:
        for key in scope or {}:
            if key not in valid:
                raise MergescopeError(f"recipe {where}: parameter {key!r} is not used by {method.name}; "
                                      f"valid: {', '.join(valid) or '(none)'}")


def _job(method: Method, out_name: str, sources: list[_Source], base: str | None, slice_params, recipe: Recipe,
         ckpts: dict[str, Checkpoint], models: list[str], input_names: list[str], t: float, dtype) -> Job:
    base_pos = next((i for i, s in enumerate(sources) if s.model == base), None) if method.base != "ignored" else None
    shared_scopes = [slice_params, recipe.parameters]
    shared = {}
    for p in method.params:
        if p.scope != "shared":
            continue
        value = resolve(p.name, p.kind, shared_scopes, out_name, t, f"tensor {out_name!r}")
        shared[p.name] = _default(method, p, value, f"tensor {out_name!r}")
    per_input = []
    for i, (src, in_name) in enumerate(zip(sources, input_names)):
        values = {}
        scopes = [s.parameters for s in sources if s.model == src.model] + shared_scopes
        for p in method.params:
            if p.scope == "input" or (p.scope == "non_base" and i != base_pos):
                where = f"model {src.model!r} tensor {in_name!r}"
                values[p.name] = _default(method, p, resolve(p.name, p.kind, scopes, in_name, t, where), where)
        per_input.append(values)
    infos = []
    for src, in_name in zip(sources, input_names):
        if in_name not in ckpts[src.model]:
            raise MergescopeError(f"model {src.model!r} has no tensor {in_name!r} (needed for output {out_name!r})")
        infos.append(ckpts[src.model].info(in_name))
    _check_shapes(out_name, sources, infos)
    out_dtype = DTYPES[recipe.out_dtype] if recipe.out_dtype else None
    if out_dtype is None:
        out_dtype = dtype if dtype is not None and infos[0].dtype.is_floating_point else infos[0].dtype
        for info in infos[1:]:
            out_dtype = torch.promote_types(out_dtype, dtype if dtype is not None and info.dtype.is_floating_point
                                            else info.dtype)
    if not infos[0].dtype.is_floating_point:
        out_dtype = infos[base_pos or 0].dtype
    return Job(out_name, tuple((models.index(s.model), n) for s, n in zip(sources, input_names)), base_pos,
               shared, tuple(per_input), tuple(infos[0].shape), out_dtype, sum(i.nbytes for i in infos))


VOCAB = re.compile(r"embed_tokens|lm_head|wte|word_embeddings|embed_out|output\\.weight$")


def _check_shapes(out_name: str, sources: list[_Source], infos) -> None:
    shapes = {s.model: tuple(i.shape) for s, i in zip(sources, infos)}
    if len(set(shapes.values())) <= 1:
        return
    listing = ", ".join(f"{m}: {list(sh)}" for m, sh in shapes.items())
    if VOCAB.search(out_name):
        raise MergescopeError(f"tensor {out_name!r}: vocabulary sizes differ ({listing}); mergescope does not rebuild "
                              "vocabularies (MergeKit needs a 'tokenizer' section for this); align the tokenizers first")
    raise MergescopeError(f"tensor {out_name!r}: shapes differ between models ({listing})")


def _default(method: Method, p, value, where: str):
    if value is not None:
        return value
    if p.required:
        raise MergescopeError(f"{where}: merge method {method.name!r} needs parameter {p.name!r}")
    return p.default


def build(recipe: Recipe, ckpts: dict[str, Checkpoint] | None = None) -> Plan:
    """The job list for a recipe (reads checkpoint headers only)."""
    method = get(recipe.merge_method)
    _check_parameter_names(method, recipe)
    ckpts = ckpts if ckpts is not None else open_models(recipe)
    models = list(ckpts)
    slices = _slices(recipe, ckpts)
    for i, (sources, base, _) in enumerate(slices):
        where = f"recipe slices[{i}]" if recipe.slices else "recipe"
        _check_contract(method, sources, base, where)
    dtype = DTYPES[recipe.dtype] if recipe.dtype else None
    jobs: list[Job] = []

    def add(out_name, sources, base, slice_params, input_names, t):
        jobs.append(_job(method, out_name, sources, base, slice_params, recipe, ckpts, models, input_names, t, dtype))

    first, last = slices[0], slices[-1]
    lead = ckpts[first[0][0].model]
    outer = [n for n in lead if layer_index(n) is None]
    if not recipe.slices:
        sources, base, params = first
        n_layers = sources[0].stop
        for name in lead:
            idx = layer_index(name)
            t = 0.0 if idx is None else (idx / (n_layers - 1) if n_layers > 1 else 1.0)
            add(name, sources, base, params, [name] * len(sources), t)
        return Plan(method, tuple(models), tuple(jobs), recipe.base_model or models[0], n_layers, False)
    for name in (n for n in outer if PRE.search(n)):
        add(name, first[0], first[1], first[2], [name] * len(first[0]), 0.0)
    out_layer = 0
    for sources, base, params in slices:
        length = sources[0].stop - sources[0].start
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            template = ckpts[sources[0].model]
            for name in template:
                m = LAYER.match(name)
                if not m or int(m.group("index")) != sources[0].start + offset:
                    continue
                pre, suf = m.group("prefix"), m.group("suffix")
                add(f"{pre}{out_layer}{suf}", sources, base, params,
                    [f"{pre}{s.start + offset}{suf}" for s in sources], t)
            out_layer += 1
    lead_last = ckpts[last[0][0].model]
    for name in (n for n in lead_last if layer_index(n) is None and not PRE.search(n)):
        add(name, last[0], last[1], last[2], [name] * len(last[0]), 0.0)
    donor = recipe.base_model or models[0]
    return Plan(method, tuple(models), tuple(jobs), donor, out_layer, True)
