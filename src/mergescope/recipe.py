"""Merge recipes: MergeKit YAML files read unchanged, validated with pydantic.

A recipe names the models (``models`` with per-model ``parameters``, or ``slices`` of layer
ranges for layer stacking), the ``merge_method``, an optional ``base_model``, method
``parameters`` (scalars, gradients = lists interpolated over layers, or per-tensor ``filter``
conditions), ``dtype`` / ``out_dtype``, and ``tokenizer_source`` / ``tokenizer`` / ``chat_template``
(merge/tokenizer.py). Unknown keys are errors that
name the key and the valid ones; every error is one line (``MergescopeError``).

Parameter resolution follows MergeKit 0.1.5: a per-model setting beats the slice's, which beats
the top-level one; a filter matches when it is a substring of the tensor name; a gradient
``[v0, ..., vk]`` is read at ``t = layer / (layers - 1)`` (``t = 0`` outside the layers).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .errors import MergescopeError

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16", "fp64")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Conditional(_Strict):
    """``{value: ..., filter: "self_attn"}``: applies to tensors whose name contains ``filter``."""

    value: ScalarOrGradient
    filter: str | None = None


Setting = Union[Conditional, list[Conditional], ScalarOrGradient]
Parameters = dict[str, Setting]


def _model_path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"model must be a local path string, got {value!r}")
    from .lora.adapter import split_reference

    split_reference(value)  # MergeKit's BASE+ADAPTER (a PEFT LoRA applied to a base): one '+'
    return value


class ModelEntry(_Strict):
    model: str
    parameters: Parameters | None = None

    _check = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_path(v)))


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    _check = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_path(v)))

    @model_validator(mode="after")
    def _range(self):
        start, end = self.layer_range
        if not 0 <= start < end:
            raise ValueError(f"model {self.model!r}: layer_range {_show_range(self.layer_range)} must be [start, end) "
                             "with 0 <= start < end")
        return self


def _short_int(v: int) -> str:
    """An integer for an error line; a 4,000-digit one is shortened, not printed whole."""
    text = str(v)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


def _show_range(r) -> str:
    """A layer range for an error line."""
    return f"[{_short_int(r[0])}, {_short_int(r[1])}]"


class OutputSlice(_Strict):
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None

    @field_validator("sources")
    @classmethod
    def _same_length(cls, v):
        if not v:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in v}
        if len(lengths) > 1:
            shown = ", ".join(_short_int(n) for n in sorted(lengths))
            raise ValueError(f"all sources of a slice must span the same number of layers, got [{shown}]")
        return v


class ModelTokenSource(_Strict):
    """A token's row taken from another token of a model: ``token_id`` (a row) or ``token`` (by name)."""

    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source needs exactly one of token_id or token")
        if self.token_id is not None and self.token_id < 0:
            raise ValueError(f"token_id must be >= 0, got {_short_int(self.token_id)}")
        return self


class ZeroSource(_Strict):
    kind: Literal["zero"]


class TokenSetting(_Strict):
    """One entry of ``tokenizer: tokens:``: where the token's row comes from; ``force``: for every model."""

    source: ModelTokenSource | ZeroSource | str | None = None
    force: bool = False


class TokenizerSection(_Strict):
    """``tokenizer:``: the output vocabulary (``union``, ``base`` or a model path), per-token row sources,
    and rows padded to a multiple (MergeKit's TokenizerConfig)."""

    source: str = "union"
    tokens: dict[str, TokenSetting] | None = None
    pad_to_multiple_of: int | None = None

    _check = field_validator("source", mode="before")(classmethod(lambda cls, v: _tokenizer_source(v)))

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, v):
        if v is not None and not 0 <= v <= 65536:
            raise ValueError(f"pad_to_multiple_of must be in [0, 65536], got {_short_int(v)}")
        return v


def _zoo_model_name(value: Any) -> str:
    """A recipe's ``model``: a zoo model name only; a recipe is a file and must never choose code to run."""
    from .io.untrusted import short_repr
    from .tasks.zoo import ZOO

    if not isinstance(value, str) or value not in ZOO:
        raise ValueError(f"model {short_repr(value)} is not a zoo model ({', '.join(ZOO)}); a recipe cannot choose "
                         "code to run (leave 'model' out to use the checkpoints' own record or Hugging Face folder)")
    return value


def _calibration_task(value: Any) -> str:
    """A recipe's ``task``: a built-in task or a data file, never a ``package.module:factory``."""
    from .io.untrusted import short_repr
    from .tasks.checkpoints import TASK_PATTERN
    from .tasks.files import is_data_file

    if not isinstance(value, str) or not (TASK_PATTERN.fullmatch(value) or is_data_file(value)):
        raise ValueError(f"task {short_repr(value)} is neither a built-in task (digits, mnist1d) nor a data file "
                         "(.csv/.tsv/.jsonl/.txt/.npz); a recipe cannot choose code to run")
    return value


def _tokenizer_source(value: Any) -> str:
    """``union``, ``base`` or a local model path."""
    return value if value in ("union", "base") else _model_path(value)


class Recipe(_Strict):
    """A MergeKit-compatible merge configuration (the subset mergescope runs)."""

    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    model: str | None = None  # fisher/regmean only: a zoo model name (merge/data_aware_recipe.py)
    task: str | None = None  # fisher/regmean only: calibration data, a built-in task or a data file
    text: str = ""
    source: str = "recipe"  # where it was read from (the file, or "recipe"): error lines name it

    _check = field_validator("base_model", mode="before")(classmethod(lambda cls, v: v if v is None else _model_path(v)))

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in DTYPE_NAMES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPE_NAMES)}")
        return v

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _tokenizer(cls, v):
        return v if v is None else _tokenizer_source(v)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v):
        if v is not None and not v.strip():
            raise ValueError("chat_template must be 'auto', a built-in template name or a Jinja template")
        return v

    @field_validator("model", "task")
    @classmethod
    def _no_code(cls, v, info):
        """A recipe is a file: it names a zoo model and a built-in task or data file, never code to run."""
        check = _zoo_model_name if info.field_name == "model" else _calibration_task
        return v if v is None else check(v)

    @model_validator(mode="after")
    def _data_aware_keys(self):
        from .merge.data_aware_recipe import METHODS

        given = [k for k in ("model", "task") if getattr(self, k) is not None]
        if given and self.merge_method not in METHODS:
            raise ValueError(f"{given[0]!r} is a key of the data-aware methods ({', '.join(METHODS)}), "
                             f"not of {self.merge_method}")
        return self

    @model_validator(mode="after")
    def _one_tokenizer(self):
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either tokenizer_source or tokenizer, not both (as MergeKit)")
        return self

    def referenced_models(self) -> list[str]:
        """Every model path the recipe names, in first-mention order."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or ():
            seen[m.model] = None
        for s in self.slices or ():
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)


_UNSUPPORTED = {
    "modules": "multi-module recipes ('modules') are not supported; use 'models' or 'slices'",
}


def _describe(error: dict, where: str) -> str:
    loc = ".".join(str(p) for p in error["loc"] if not isinstance(p, str) or not p.startswith(("function-", "list[", "union", "tuple[")))
    kind = error["type"]
    if kind == "extra_forbidden":
        key = error["loc"][-1]
        return f"{where}: unknown key {key!r} at {loc or 'top level'}; valid keys: {', '.join(_valid_keys(error['loc']))}"
    if kind == "missing":
        return f"{where}: missing key {loc!r}"
    return f"{where}: {loc or 'recipe'}: {error['msg'].removeprefix('Value error, ')}"


def _valid_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            continue
        nested = {"models": ModelEntry, "slices": OutputSlice, "sources": SliceSource, "tokenizer": TokenizerSection,
                  "tokens": TokenSetting}.get(part)
        if nested is not None:
            model = nested
    return [k for k in model.model_fields if model is not Recipe or k not in _INTERNAL]


_INTERNAL = ("text", "source")  # Recipe fields mergescope fills in, never keys of a recipe file


def parse(data: Any, text: str = "", where: str = "recipe") -> Recipe:
    """Validate a recipe mapping (as loaded from YAML)."""
    if not isinstance(data, dict):
        raise MergescopeError(f"{where}: a recipe must be a YAML mapping, got {type(data).__name__}")
    for key, why in _UNSUPPORTED.items():
        if data.get(key) is not None:
            raise MergescopeError(f"{where}: {why}")
    for key in _INTERNAL:
        if key in data:
            raise MergescopeError(f"{where}: unknown key {key!r}; valid keys: {', '.join(_valid_keys((key,)))}")
    try:
        recipe = Recipe.model_validate({**data, "text": text, "source": where})
    except ValidationError as e:
        errors = e.errors()
        extra = [err for err in errors if err["type"] == "extra_forbidden"]
        raise MergescopeError(_describe((extra or errors)[0], where)) from None
    if bool(recipe.models) == bool(recipe.slices):
        raise MergescopeError(f"{where}: give exactly one of 'models' or 'slices'")
    return recipe


def read(source: str | os.PathLike | dict | Recipe) -> Recipe:
    """A recipe from a YAML file path, YAML text, a mapping, or a Recipe (returned as is).

    Files and text go through ``io.untrusted``: regular UTF-8 files only (a FIFO is refused, never
    waited on), at most ``MAX_TEXT_BYTES``, YAML aliases bounded, every parse failure one line.
    """
    import yaml

    from .io.untrusted import parse_yaml, read_text

    if isinstance(source, Recipe):
        return source
    if isinstance(source, dict):
        return parse(source, text=yaml.safe_dump(source, sort_keys=True))
    where = "recipe"
    text = str(source)
    if isinstance(source, os.PathLike) or ("\n" not in text and text.endswith((".yml", ".yaml"))):
        path = Path(source)
        where = str(path)
        text = read_text(path, "recipe")
    try:
        data = parse_yaml(text, where)
    except MergescopeError as e:
        if "expected a single document" in str(e):
            _refuse_multistage(text, where)
        raise
    return parse(data, text=text, where=where)


def _refuse_multistage(text: str, where: str) -> None:
    """A file of several YAML documents is a multi-stage recipe: say how to run it (one recipe is expected here)."""
    from .merge.multistage import split_documents

    n = len(split_documents(text, where))
    raise MergescopeError(f"{where}: holds {n} YAML documents, a multi-stage recipe (mergekit-multi): run it with "
                          "'mergescope merge' or mergescope.merge.multistage.run, which run the stages in order")


# ----------------------------------------------------------------------------- parameter resolution


def evaluate(setting: Setting, tensor_name: str, t: float, convert) -> Any:
    """Resolve one setting for one tensor: filters pick a branch, gradients interpolate at ``t``.

    Returns None when no filter matches (the next, lower-precedence scope is tried).
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return convert(setting)
    if not setting:
        return None
    if all(isinstance(e, Conditional) for e in setting):
        for cond in setting:
            if cond.filter in (None, "*") or (tensor_name and cond.filter in tensor_name):
                return evaluate(cond.value, tensor_name, t, convert)
        return None
    values = [convert(e) for e in setting]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return convert((1 - frac) * values[i0] + frac * values[i1])


def converter(name: str, kind: type, where: str):
    """A function turning a YAML scalar into ``kind``, raising a one-line error naming the parameter."""

    def convert(value):
        if value is None:
            return None
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
        elif kind is int:
            if isinstance(value, bool):
                pass
            elif isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return int(value)
            elif isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
        elif kind is float:
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                try:
                    number = float(value)
                except OverflowError:  # an integer of hundreds of digits
                    number = math.inf
            elif isinstance(value, str):
                try:
                    number = float(value)
                except ValueError:
                    pass
            if number is not None and not math.isfinite(number):
                raise MergescopeError(f"{where}: parameter {name!r} must be a finite number, got {_short(value)}")
            if number is not None and abs(number) > FLOAT_LIMIT:
                raise MergescopeError(f"{where}: parameter {name!r} must be at most {FLOAT_LIMIT:.4g} in magnitude "
                                      f"(merges compute in float32), got {_short(value)}")
            if number is not None:
                return number
        else:
            return value
        raise MergescopeError(f"{where}: parameter {name!r} must be {kind.__name__}, got {_short(value)}")

    return convert


def _short(value) -> str:
    """``repr`` of a parameter value for an error line, cut to 60 characters (no 4,000-digit lines)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit
        return "an integer of more than 4300 digits"
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


# Parameters whose meaning fixes a range whatever the method: (low, high], as MergeKit reads them.
RANGES = {"density": (0.0, 1.0)}
# Integer parameters that set a loop count: [low, high] (karcher's iterations; 10,000 is far past convergence).
INT_RANGES = {"max_iter": (1, 10_000)}
# Largest magnitude of any float parameter: merges compute in float32 (a weight of 1e308 would overflow the
# moment it meets a tensor), and the largest float32 is also far beyond any meaningful coefficient.
FLOAT_LIMIT = 3.4028234663852886e38


def check_range(name: str, value, where: str) -> None:
    """Refuse a value outside its parameter's range (e.g. density must be a kept fraction in (0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if name in RANGES:
        low, high = RANGES[name]
        if not low < value <= high:
            raise MergescopeError(f"{where}: parameter {name!r} must be in ({low:g}, {high:g}], got {_short(value)}")
    if name in INT_RANGES:
        low, high = INT_RANGES[name]
        if not low <= value <= high:
            raise MergescopeError(f"{where}: parameter {name!r} must be in [{low}, {high}], got {_short(value)}")


def check_parameters(method_name: str, params: dict, where: str, n_models: int | None = None) -> dict:
    """Validate a flat mapping of method parameters (as a sweep grid point gives them) with the same
    rules as a recipe: only the method's parameter names, the right type, finite floats within float32
    range, densities in (0, 1]; a per-model parameter may be one value or a list (of ``n_models``
    values when given). Returns the converted values."""
    from .merge.methods import get

    method = get(method_name)
    known = {p.name: p for p in method.params}
    out = {}
    for key, value in params.items():
        p = known.get(key)
        if p is None:
            raise MergescopeError(f"{where}: parameter {key!r} is not used by {method.name}; "
                                  f"valid: {', '.join(known) or '(none)'}")
        convert = converter(key, p.kind, where)
        values = value if isinstance(value, list) and p.scope != "shared" else [value]
        if isinstance(value, list) and p.scope != "shared" and n_models is not None and len(value) != n_models:
            raise MergescopeError(f"{where}: parameter {key!r} lists {len(value)} values for {n_models} models")
        if value is None or any(v is None or isinstance(v, (list, dict)) for v in values):
            raise MergescopeError(f"{where}: parameter {key!r} must be {p.kind.__name__}, got {_short(value)}")
        converted = [convert(v) for v in values]
        for v in converted:
            check_range(key, v, where)
        out[key] = converted if values is value else converted[0]
    return out


def resolve(name: str, kind: type, scopes: list[Parameters | None], tensor_name: str, t: float, where: str):
    """The value of parameter ``name`` for one tensor: the first scope that yields a value, else None."""
    convert = converter(name, kind, where)
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor_name, t, convert)
            if value is not None:
                check_range(name, value, where)
                return value
    return None
