"""Turn a recipe into a list of per-tensor jobs: which input tensors, which base, which parameters.

Layers are found by name (``...layers.7.mlp...``, also ``h.N``, ``blocks.N``, ``layer.N``), so no
architecture table is needed. ``models`` recipes merge every tensor under its own name;
``slices`` recipes renumber layers consecutively (layer stacking), take embedding-like tensors
from the first slice's sources and the rest of the non-layer tensors from the last slice's.
Gradients are read at ``t = layer / (layers - 1)`` of the output slice, ``t = 0`` elsewhere
(MergeKit 0.1.5's planner).

Checks made here, on headers only, before any tensor is read:

* every ``layer_range`` lies inside the layers its model has; at most ``MAX_OUTPUT_LAYERS`` output layers;
* the output tensors are the union of the inputs' tensors (not the first model's list). A tensor some
  inputs lack is an error naming it and the models that lack it, except: an output head a model omits
  because it is tied reads that model's input embedding (MergeKit's ``tied_names``); a tensor a model
  may lack (``architectures.optional``: tied heads, buffers such as BERT's ``position_ids``) follows
  MergeKit's rule for optional weights: merged from the models that have it (``_present_sources``); a
  tensor *only the base has* is copied by the methods that return the base when no model differs
  from it (task arithmetic, TIES, DARE, breadcrumbs, DELLA, SCE); a tensor *only the base lacks* is
  merged from the others by methods whose base is optional (nuslerp, multislerp). Each case taken is
  one warning line;
* per-model weights must sum to a finite float32 value (a sum of huge weights would overflow while
  normalising).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergescopeError
from ..io import Checkpoint, load
from ..recipe import FLOAT_LIMIT, Parameters, Recipe, resolve
from .architectures import optional, tied_source
from .methods import Method, get
from .tokenizer import attach, is_vocab_tensor, rebuilds_vocabulary

MAX_OUTPUT_LAYERS = 10_000  # layers of a stacked output: 50x the deepest published frankenmerges
# Methods that return the base unchanged when no other model has the tensor (no task vector to add).
COPIES_FROM_BASE = frozenset({"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "ram", "ramplus_tl",
                              "breadcrumbs_ties", "della", "della_linear", "sce"})

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
    copy: bool = False  # the single input is copied as is (a tensor only one model has; MergeKit's passthrough)

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
    warnings: tuple[str, ...] = ()  # one line each: recipe settings accepted but without effect
    tokenizer: object = None  # merge.tokenizer.TokenizerPlan: rebuilt vocabulary / chat template, or None


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
    """Open every referenced model lazily; anything not a local path is an error (nothing is downloaded).

    ``BASE+ADAPTER`` (MergeKit's LoRA syntax) opens the base with the adapter's updates added per tensor."""
    from ..lora.adapter import open_reference, split_reference

    opened = {}
    for path in recipe.referenced_models():
        for part in filter(None, split_reference(path)):
            if not Path(part).exists():
                raise MergescopeError(f"model {part!r}: no such local file or folder (mergescope reads local paths "
                                      "only; nothing is downloaded)")
        opened[path] = open_reference(path)
    for path in list(opened):  # each adapter's base too: the output's config and provenance come from it
        base = split_reference(path)[0]
        if base not in opened:
            opened[base] = load(base)
    return opened


def _short_int(v: int) -> str:
    """An integer for an error line; a 4,000-digit one is shortened, not printed whole."""
    text = str(v)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


def _show_range(start: int, stop: int) -> str:
    return f"[{_short_int(start)}, {_short_int(stop)}]"


def _check_layer_ranges(recipe: Recipe, ckpts: dict[str, Checkpoint]) -> None:
    """Every slice source's layer_range inside the layers its model has; the output not absurdly deep.
    Runs before planning, whose work grows with the ranges."""
    layers: dict[str, int] = {}
    total = 0
    for i, sl in enumerate(recipe.slices or ()):
        for j, src in enumerate(sl.sources):
            where = f"{recipe.source}: slices[{i}].sources[{j}]"
            start, stop = src.layer_range
            if not 0 <= start < stop:
                raise MergescopeError(f"{where}: model {src.model!r}: layer_range "
                                      f"{_show_range(start, stop)} must be [start, end) with 0 <= start < end")
            if src.model not in layers:
                layers[src.model] = count_layers(ckpts[src.model])
            n = layers[src.model]
            if n == 0:
                raise MergescopeError(f"{where}: model {src.model!r} has no numbered layers "
                                      "(tensor names like '...layers.N...', 'h.N', 'blocks.N', 'layer.N'), so "
                                      f"layer_range {_show_range(start, stop)} selects nothing")
            if stop > n:
                raise MergescopeError(f"{where}: model {src.model!r} has {n} layers, but "
                                      f"layer_range {_show_range(start, stop)} reaches layer {_short_int(stop - 1)} "
                                      f"(a range must lie within [0, {n}])")
        total += sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
    if total > MAX_OUTPUT_LAYERS:
        raise MergescopeError(f"{recipe.source}: the slices stack {_short_int(total)} layers, over the limit of "
                              f"{MAX_OUTPUT_LAYERS}")


def _slices(recipe: Recipe, ckpts: dict[str, Checkpoint]) -> list[tuple[list[_Source], str | None, Parameters | None]]:
    if recipe.slices:
        _check_layer_ranges(recipe, ckpts)
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


# Parameters MergeKit accepts and ignores on methods that do not use them (its own test recipes give every
# model a ``weight``, whatever the method): accepted here too, with a one-line warning.
IGNORED_IF_UNUSED = frozenset({"weight"})


def _check_parameter_names(method: Method, recipe: Recipe) -> tuple[str, ...]:
    """Refuse parameter names the method does not take (a typo must not pass silently); returns the
    warnings for the ones MergeKit ignores (``IGNORED_IF_UNUSED``)."""
    scopes = [("parameters", recipe.parameters)]
    scopes += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(recipe.models or ())]
    for i, sl in enumerate(recipe.slices or ()):
        scopes.append((f"slices[{i}].parameters", sl.parameters))
        scopes += [(f"slices[{i}].sources[{j}].parameters", s.parameters) for j, s in enumerate(sl.sources)]
    valid = method.param_names
    ignored: dict[str, list[str]] = {}
    for where, scope in scopes:
        for key in scope or {}:
            if key not in valid and key in IGNORED_IF_UNUSED:
                ignored.setdefault(key, []).append(where)
            elif key not in valid:
                raise MergescopeError(f"recipe {where}: parameter {key!r} is not used by {method.name}; "
                                      f"valid: {', '.join(valid) or '(none)'}")
    return tuple(f"{recipe.source}: parameter {key!r} is not used by {method.name}; ignored (as MergeKit does) "
                 f"at {_names_plain(wheres)}" for key, wheres in ignored.items())


def _names_plain(items: list[str]) -> str:
    return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")


def _job(method: Method, out_name: str, sources: list[_Source], base: str | None, slice_params, recipe: Recipe,
         ckpts: dict[str, Checkpoint], models: list[str], input_names: list[str], t: float, dtype) -> Job:
    base_pos = next((i for i, s in enumerate(sources) if s.model == base), None) if method.base != "ignored" else None
    shared_scopes = [slice_params, recipe.parameters]
    shared = _shared_params(method, shared_scopes, out_name, t)
    per_input = [_input_params(method, sources, shared_scopes, i, in_name, base_pos, t)
                 for i, in_name in enumerate(input_names)]
    _check_weight_sum(method, f"{recipe.source}: tensor {out_name!r}", per_input, base_pos)
    infos = _input_infos(sources, input_names, ckpts, out_name)
    _check_shapes(out_name, sources, infos, rows_free=rebuilds_vocabulary(recipe) and is_vocab_tensor(out_name))
    return Job(out_name, tuple((models.index(s.model), n) for s, n in zip(sources, input_names)), base_pos,
               shared, tuple(per_input), tuple(infos[0].shape), _out_dtype(recipe, infos, base_pos, dtype),
               sum(i.nbytes for i in infos))


def _shared_params(method: Method, scopes: list, out_name: str, t: float) -> dict:
    """The method's shared parameters for one output tensor (slice, then recipe scope)."""
    where = f"tensor {out_name!r}"
    return {p.name: _default(method, p, resolve(p.name, p.kind, scopes, out_name, t, where), where)
            for p in method.params if p.scope == "shared"}


def _input_params(method: Method, sources: list[_Source], shared_scopes: list, i: int, in_name: str,
                  base_pos: int | None, t: float) -> dict:
    """Input ``i``'s per-model parameters (the model's own scopes first, then the shared ones)."""
    src = sources[i]
    scopes = [s.parameters for s in sources if s.model == src.model] + shared_scopes
    where = f"model {src.model!r} tensor {in_name!r}"
    return {p.name: _default(method, p, resolve(p.name, p.kind, scopes, in_name, t, where), where)
            for p in method.params if p.scope == "input" or (p.scope == "non_base" and i != base_pos)}


def _input_infos(sources: list[_Source], input_names: list[str], ckpts: dict[str, Checkpoint], out_name: str) -> list:
    infos = []
    for src, in_name in zip(sources, input_names):
        if in_name not in ckpts[src.model]:
            raise MergescopeError(f"model {src.model!r} has no tensor {in_name!r} (needed for output {out_name!r})")
        infos.append(ckpts[src.model].info(in_name))
    return infos


def _out_dtype(recipe: Recipe, infos: list, base_pos: int | None, dtype) -> torch.dtype:
    """The recipe's out_dtype, else the promotion of the inputs' dtypes (floats computed in ``dtype``);
    an integer tensor always keeps the base's (or first input's) dtype."""
    if not infos[0].dtype.is_floating_point:
        return infos[base_pos or 0].dtype
    if recipe.out_dtype:
        return DTYPES[recipe.out_dtype]
    out = dtype if dtype is not None else infos[0].dtype
    for info in infos[1:]:
        out = torch.promote_types(out, dtype if dtype is not None and info.dtype.is_floating_point else info.dtype)
    return out


def _check_weight_sum(method: Method, where: str, per_input: list[dict], base_pos: int | None) -> None:
    """Refuse per-model weights whose sum (the normaliser of linear, TIES, DELLA, multislerp...) is
    beyond float32: each weight is finite and in range (``recipe.converter``), but 1e38 + 1e38 + 1e38
    would overflow in the middle of the merge."""
    for p in method.params:
        if p.scope == "shared" or p.name != "weight":
            continue
        weights = [v[p.name] for i, v in enumerate(per_input) if p.name in v and v[p.name] is not None
                   and not (p.scope == "non_base" and i == base_pos)]
        if not weights:
            continue
        total = math.fsum(float(w) for w in weights)
        magnitude = math.fsum(abs(float(w)) for w in weights)
        if not math.isfinite(magnitude) or magnitude > FLOAT_LIMIT:
            raise MergescopeError(f"{where}: parameter 'weight': the models' weights add up to "
                                  f"{magnitude:.4g} in magnitude (sum {total:.4g}), beyond float32 range "
                                  f"({FLOAT_LIMIT:.4g}); the merge would overflow")


VOCAB = re.compile(r"embed_tokens|lm_head|wte|word_embeddings|embed_out|(?:^|\.)output\.weight$")


def _check_shapes(out_name: str, sources: list[_Source], infos, rows_free: bool = False) -> None:
    """Inputs of one tensor must agree in shape; with ``rows_free`` (a vocabulary tensor of a recipe that
    rebuilds vocabularies: merge/tokenizer.py remaps its rows) all but the first dimension."""
    shapes = {s.model: tuple(i.shape) for s, i in zip(sources, infos)}
    if len({sh[1:] if rows_free else sh for sh in shapes.values()}) <= 1 and not (rows_free and () in shapes.values()):
        return
    listing = ", ".join(f"{m}: {list(sh)}" for m, sh in shapes.items())
    if VOCAB.search(out_name) and not rows_free:
        raise MergescopeError(f"tensor {out_name!r}: vocabulary sizes differ ({listing}); give the recipe a "
                              "'tokenizer_source' (union, base or a model) or a 'tokenizer' section to rebuild them")
    raise MergescopeError(f"tensor {out_name!r}: shapes differ between models ({listing})")


def _default(method: Method, p, value, where: str):
    if value is not None:
        return value
    if p.required:
        raise MergescopeError(f"{where}: merge method {method.name!r} needs parameter {p.name!r}")
    return p.default


def _union(keys_per_source: list[list]) -> list[tuple[object, frozenset[int]]]:
    """The keys any source has, in first-seen order (the first source's order, then each later
    source's new keys), each with the positions of the sources that have it."""
    have: dict[object, set[int]] = {}
    for pos, keys in enumerate(keys_per_source):
        for key in keys:
            have.setdefault(key, set()).add(pos)
    return [(key, frozenset(positions)) for key, positions in have.items()]


def _present_sources(method: Method, out_name: str, sources: list[_Source], base: str | None,
                     have: frozenset[int]) -> tuple[list[int], bool] | None:
    """Which sources merge a tensor that only the sources at ``have`` hold, and whether the one left is
    copied as is; None: the tensor is left out (see the module docstring).

    A tensor a model may lack (``architectures.optional``) follows MergeKit 0.1.5's rule for optional
    weights (its ``OptionalTensorPolicy``): the method runs on the models that have it; a single holder
    is copied by slerp/nuslerp, by nearswap/model_stock only when it is the base; model_stock with too
    few holders leaves it out. Any tensor only the base has is copied by the methods that return the
    base without task vectors; one only the base lacks is merged by methods whose base is optional."""
    if len(have) == len(sources):
        return list(range(len(sources))), False
    base_pos = next((i for i, s in enumerate(sources) if s.model == base), None) if method.base != "ignored" else None
    held = sorted(have)
    missing = [sources[i].model for i in range(len(sources)) if i not in have]
    present = [sources[i].model for i in held]
    may_lack = optional(out_name)
    single_base = held == [base_pos]
    if may_lack and len(held) == 1 and (method.partial == "singleton" or (
            method.partial in ("base_singleton", "base_or_skip") and single_base)):
        return held, True
    if may_lack and method.partial == "base_or_skip" and len(held) < method.min_inputs:
        return None
    if single_base:
        if method.name in COPIES_FROM_BASE:
            return held, False
        raise MergescopeError(f"tensor {out_name!r} is only in the base model {base!r} (missing from "
                              f"{_names(missing)}); merge method {method.name!r} cannot merge it from the base alone")
    if base_pos is not None and base_pos not in have:
        if method.base == "optional" and (may_lack or missing == [base]):
            return held, False
        raise MergescopeError(f"tensor {out_name!r} is missing from the base model {base!r} (present in "
                              f"{_names(present)}); merge method {method.name!r} needs the base's tensor")
    if may_lack and len(held) >= method.min_inputs:
        return held, False
    raise MergescopeError(f"tensor {out_name!r} is missing from {_names(missing)} but present in {_names(present)}; "
                          "a tensor is merged only when every model has it (or when a model may lack it: tied "
                          "heads, buffers)")


def _tied_inputs(sources: list[_Source], input_names: list[str], have: frozenset[int], ckpts, notes: list[str]):
    """A source lacking an output embedding but holding the input embedding it is tied to reads that one
    (``architectures.TIED``, as MergeKit's ``tied_names``)."""
    if len(have) == len(sources):
        return input_names, have
    names, held = list(input_names), set(have)
    for i, src in enumerate(sources):
        if i in held:
            continue
        tied = tied_source(input_names[i], ckpts[src.model].__contains__)
        if tied is not None:
            names[i] = tied
            held.add(i)
            notes.append(f"model {src.model!r} has no {input_names[i]!r}: its tied {tied!r} is used")
    return names, frozenset(held)


_PARTIAL_OUTCOMES = ((lambda c: c is not None and not c[1], "merged from only the models that have them"),
                     (lambda c: c is not None and c[1], "copied from the one model that has them"),
                     (lambda c: c is None, "left out (too few models have them for the method)"))


def _partial_warnings(recipe: Recipe, notes: list[str], partial: list[tuple]) -> tuple[str, ...]:
    """One line per kind of event, naming the first tensor (a model can lack hundreds)."""
    lines = [f"{recipe.source}: {notes[0]}" + (f" (and {len(notes) - 1} more)" if len(notes) > 1 else "")] if notes else []
    for done, verb in _PARTIAL_OUTCOMES:
        hits = [(name, lacking) for name, lacking, chosen in partial if done(chosen)]
        if hits:
            name, lacking = hits[0]
            lines.append(f"{recipe.source}: {len(hits)} tensor(s) not in every model {verb} (MergeKit's rule), "
                         f"e.g. {name!r} (missing from {_names(lacking)})")
    return tuple(lines)


def _names(models: list[str]) -> str:
    unique = list(dict.fromkeys(models))
    shown = ", ".join(repr(m) for m in unique[:4])
    return shown + (f" and {len(unique) - 4} more" if len(unique) > 4 else "")


def _layer_table(ckpt: Checkpoint) -> dict[int, list[tuple[str, str]]]:
    """layer index -> [(prefix, suffix)] of the tensors in that layer, in file order (one pass over the names)."""
    table: dict[int, list[tuple[str, str]]] = {}
    for name in ckpt:
        m = LAYER.match(name)
        if m:
            table.setdefault(int(m.group("index")), []).append((m.group("prefix"), m.group("suffix")))
    return table


def _donor(model: str) -> str:
    """The folder config and tokenizer files come from: a ``BASE+ADAPTER``'s base."""
    from ..lora.adapter import split_reference

    return split_reference(model)[0]


def build(recipe: Recipe, ckpts: dict[str, Checkpoint] | None = None) -> Plan:
    """The job list for a recipe (reads checkpoint headers only).

    Complexity 22 by radon, kept: the two plan shapes (a models list; slices with their pre-layer,
    layer and post-layer tensors) share the ``add``/``outer`` closures over eight values, and the
    branches are one per shape, read top to bottom."""
    method = get(recipe.merge_method)
    warnings = _check_parameter_names(method, recipe)
    ckpts = ckpts if ckpts is not None else open_models(recipe)
    models = list(ckpts)
    slices = _slices(recipe, ckpts)
    for i, (sources, base, _) in enumerate(slices):
        where = f"recipe slices[{i}]" if recipe.slices else "recipe"
        _check_contract(method, sources, base, where)
    dtype = DTYPES[recipe.dtype] if recipe.dtype else None
    jobs: list[Job] = []
    notes: list[str] = []  # tied embeddings read in place of a missing output embedding
    partial: list[tuple] = []  # tensors some inputs lack: (name, models lacking it, what was done)

    def add(out_name, sources, base, slice_params, input_names, t, have):
        input_names, have = _tied_inputs(sources, input_names, have, ckpts, notes)
        chosen = _present_sources(method, out_name, sources, base, have)
        if chosen is None or len(chosen[0]) < len(sources):
            partial.append((out_name, [sources[i].model for i in range(len(sources)) if i not in have], chosen))
        if chosen is None:
            return
        keep, copy = chosen
        job = _job(method, out_name, [sources[i] for i in keep], base, slice_params, recipe, ckpts, models,
                   [input_names[i] for i in keep], t, dtype)
        jobs.append(dataclasses.replace(job, copy=True) if copy else job)

    def outer(sources, pick):
        """Non-layer tensors of a slice's sources that ``pick`` selects, as (name, holders)."""
        return _union([[n for n in ckpts[s.model] if layer_index(n) is None and pick(n)] for s in sources])

    first, last = slices[0], slices[-1]
    if not recipe.slices:
        sources, base, params = first
        n_layers = sources[0].stop
        for name, have in _union([list(ckpts[s.model]) for s in sources]):
            idx = layer_index(name)
            t = 0.0 if idx is None else (idx / (n_layers - 1) if n_layers > 1 else 1.0)
            add(name, sources, base, params, [name] * len(sources), t, have)
        warnings += _partial_warnings(recipe, notes, partial)
        return attach(Plan(method, tuple(models), tuple(jobs), _donor(recipe.base_model or models[0]), n_layers,
                           False, warnings), recipe)
    for name, have in outer(first[0], lambda n: PRE.search(n)):
        add(name, first[0], first[1], first[2], [name] * len(first[0]), 0.0, have)
    tables: dict[str, dict[int, list[tuple[str, str]]]] = {}
    out_layer = 0
    for sources, base, params in slices:
        for s in sources:
            if s.model not in tables:
                tables[s.model] = _layer_table(ckpts[s.model])
        length = sources[0].stop - sources[0].start
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            for (pre, suf), have in _union([tables[s.model].get(s.start + offset, []) for s in sources]):
                add(f"{pre}{out_layer}{suf}", sources, base, params, [f"{pre}{s.start + offset}{suf}" for s in sources],
                    t, have)
            out_layer += 1
    for name, have in outer(last[0], lambda n: not PRE.search(n)):
        add(name, last[0], last[1], last[2], [name] * len(last[0]), 0.0, have)
    donor = _donor(recipe.base_model or models[0])
    warnings += _partial_warnings(recipe, notes, partial)
    return attach(Plan(method, tuple(models), tuple(jobs), donor, out_layer, True, warnings), recipe)
