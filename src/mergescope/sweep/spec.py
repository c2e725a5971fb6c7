"""Sweep files: a pydantic schema (unknown keys are errors) and their expansion into task specs.

A sweep expands into small, pure, picklable ``TaskSpec``s. Each has a stable id, the hash of its
kind and parameters (checkpoints as written in the YAML, relative to it), so a resumed run, a
moved sweep folder and a Ray run all agree on which rows already exist.

Sizes are bounded before anything is expanded or launched: at most ``MAX_TASKS`` tasks per sweep
(counted arithmetically from the file, never by building the list), ``points`` <= ``MAX_POINTS``,
``curve_epochs`` <= ``MAX_CURVE_EPOCHS``. Merge-grid values obey the recipe rules
(``recipe.check_parameters``): only the method's parameters, finite numbers, density in (0, 1].
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import MergescopeError

SPLITS = ("train", "val", "test")
MAX_TASKS = 10_000  # tasks per sweep: a 141-checkpoint barrier matrix, or a 10,000-point grid
MAX_POINTS = 1_001  # points on each path (t = 0, 0.001, ..., 1)
MAX_CURVE_EPOCHS = 10_000
MAX_SEED = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    """The architecture to rebuild, when the checkpoints' metadata does not record it."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class _Common(_Strict):
    checkpoints: list[str] = Field(min_length=1)
    task: str = "digits"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    model: ModelRef | None = None

    @field_validator("checkpoints")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted(c for c, n in Counter(v).items() if n > 1)
        if dup:
            raise ValueError(f"checkpoints listed twice: {dup}")
        return v


class BarrierSweep(_Common):
    """Every unordered pair of checkpoints: the loss/accuracy barrier of the linear path, or of a
    Bezier / polychain curve fitted between them (``path``, trained ``curve_epochs`` epochs)."""

    kind: Literal["barrier_matrix"]
    points: int = Field(25, ge=2, le=MAX_POINTS)
    split: Literal["train", "val", "test"] = "test"
    bn_reset: bool = True
    align: Literal["none", "weight"] = "none"
    path: Literal["line", "bezier", "polychain"] = "line"
    curve_epochs: int = Field(20, ge=1, le=MAX_CURVE_EPOCHS)

    @field_validator("checkpoints")
    @classmethod
    def _two(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("a barrier matrix needs at least 2 checkpoints")
        return v


class EvaluateSweep(_Common):
    """Every checkpoint evaluated on the given splits."""

    kind: Literal["evaluate"]
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["val", "test"], min_length=1)


class MethodGrid(_Strict):
    """One merge method and a grid of its parameters (the Cartesian product of the lists)."""

    method: str
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, vals in v.items() if not vals]
        if empty:
            raise ValueError(f"grid parameters with no values: {empty}")
        return v


class MergeGridSweep(_Common):
    """merge method x parameters x model set x alignment; every merge is evaluated on val and test."""

    kind: Literal["merge_grid"]
    methods: list[MethodGrid] = Field(min_length=1)
    model_sets: list[list[str]] | None = None
    base: str | None = None
    align: list[Literal["none", "weight"]] = Field(default_factory=lambda: ["none"], min_length=1)

    @model_validator(mode="after")
    def _sets_known(self):
        known = set(self.checkpoints)
        for s in self.model_sets or []:
            unknown = [c for c in s if c not in known]
            if unknown:
                raise ValueError(f"model_sets name checkpoints not in 'checkpoints': {unknown}")
            if not s:
                raise ValueError("an empty model set")
        from ..merge.data_aware_recipe import METHODS as DATA_AWARE
        from ..merge.methods import names

        bad = [m.method for m in self.methods if m.method not in names() and m.method not in DATA_AWARE]
        if bad:
            raise ValueError(f"unknown merge methods {bad}; known: {', '.join([*names(), *DATA_AWARE])}")
        return self


def _check_grid(sweep: MergeGridSweep) -> None:
    """Every grid value of every method obeys the recipe rules (``recipe.check_parameters``) for every
    model-set size; a method that needs a base has one, and every model set has a size the method takes.
    Each value is checked on its own (not the Cartesian product), so the work is linear in the file."""
    from ..merge import data_aware_recipe
    from ..merge.methods import get
    from ..recipe import check_parameters

    sets = sweep.model_sets or [list(sweep.checkpoints)]
    for i, m in enumerate(sweep.methods):
        where = f"methods.{i} ({m.method})"
        if data_aware_recipe.is_data_aware(m.method):  # calibrated on the sweep's task; no base, no per-model lists
            for key, values in m.grid.items():
                for v in values:
                    data_aware_recipe.check_parameters(m.method, {key: v}, f"{where}: grid.{key}")
            continue
        method = get(m.method)
        if method.base == "required" and sweep.base is None:
            raise MergescopeError(f"{where}: merge method {m.method!r} needs 'base'")
        for models in sets:
            _check_set_size(where, m.method, method, len(models), sweep.base is not None)
        for key, values in m.grid.items():
            if key == "seed" and method.random:
                _check_seeds(where, values)
                continue
            for v in values:
                for n in sorted({len(models) for models in sets}):
                    check_parameters(m.method, {key: v}, f"{where}: grid.{key}", n)


def _check_set_size(where: str, name: str, method, size: int, has_base: bool) -> None:
    """A model set (plus the base, when the method uses it) must be a size the method takes."""
    n = size + (1 if has_base and method.base != "ignored" else 0)
    if n < method.min_inputs or (method.max_inputs is not None and n > method.max_inputs):
        takes = ("" if method.max_inputs == method.min_inputs else
                 " or more" if method.max_inputs is None else f" to {method.max_inputs}")
        raise MergescopeError(f"{where}: a model set of {size} checkpoint(s) gives {n} models (with the base), "
                              f"but {name} takes {method.min_inputs}{takes}")


def _check_seeds(where: str, values: list) -> None:
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SEED:
            raise MergescopeError(f"{where}: grid.seed: seeds must be integers in [0, 2**63-1], got {v!r}")


def count_tasks(sweep) -> int:
    """How many tasks ``expand`` would make, computed from the lengths alone (nothing is built)."""
    n = len(sweep.checkpoints)
    if sweep.kind == "barrier_matrix":
        return n * (n - 1) // 2
    if sweep.kind == "evaluate":
        return n
    sets = len(sweep.model_sets) if sweep.model_sets else 1
    points = sum(math.prod(len(v) for v in m.grid.values()) for m in sweep.methods)
    return points * sets * len(sweep.align)


def check_size(sweep, source: str = "sweep") -> int:
    """The task count, or a one-line error when it is over ``MAX_TASKS``."""
    count = count_tasks(sweep)
    if count > MAX_TASKS:
        shown = f"{count:,}" if count < 10**30 else f"about 10^{len(str(count)) - 1}"
        raise MergescopeError(f"{source}: the sweep expands to {shown} tasks, over the limit of {MAX_TASKS:,} "
                              "per sweep; split it into several sweeps")
    return count


Sweep = Annotated[Union[BarrierSweep, EvaluateSweep, MergeGridSweep], Field(discriminator="kind")]


class _File(_Strict):
    sweep: Sweep


@dataclass(frozen=True)
class TaskSpec:
    """One unit of work: ``kind`` and JSON-able ``params``; ``root`` resolves relative checkpoint paths.

    ``root`` is not part of the id, so the same sweep gives the same ids wherever it lives.
    """

    kind: str
    params: dict = field(hash=False)
    root: str = "."

    @property
    def id(self) -> str:
        return task_id(self.kind, self.params)

    @property
    def checkpoints(self) -> tuple[str, ...]:
        """The checkpoints this task reads, as written in the sweep (relative to ``root``)."""
        p = self.params
        if self.kind == "barrier":
            return (p["a"], p["b"])
        if self.kind == "evaluate":
            return (p["checkpoint"],)
        return (*p["models"], *([] if p["base"] is None else [p["base"]]))


def task_id(kind: str, params: dict) -> str:
    """sha256 of the canonical JSON of (kind, params), first 16 hex digits."""
    text = json.dumps({"kind": kind, "params": params}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse(data: Any, source: str = "sweep") -> BarrierSweep | EvaluateSweep | MergeGridSweep:
    """Validate a sweep mapping; any problem becomes one MergescopeError line naming the field."""
    try:
        sweep = _File(sweep=data).sweep
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "sweep"
        raise MergescopeError(f"{source}: {where}: {_one_line(first['msg'])} ({e.error_count()} problem(s))") from None
    check_size(sweep, source)
    if sweep.kind == "merge_grid":
        try:
            _check_grid(sweep)
        except MergescopeError as e:
            raise MergescopeError(f"{source}: {e}") from None
    return sweep


def _one_line(text: str) -> str:
    return " ".join(text.split())


def read(path: str | Path):
    """Read and validate a sweep YAML file (a regular UTF-8 file; aliases bounded; one-line errors)."""
    from ..io.untrusted import read_yaml

    path = Path(path)
    data = read_yaml(path, "sweep file")
    if not isinstance(data, dict):
        raise MergescopeError(f"{path}: a sweep file must be a mapping with a 'kind' key")
    return parse(data, str(path))


def _common(s) -> dict:
    return {"task": s.task, "seed": s.seed, "model": None if s.model is None else s.model.model_dump()}


def _curve(sweep) -> dict:
    """Curve settings, only for curves (so linear-path ids do not depend on unused fields)."""
    return {} if sweep.path == "line" else {"path": sweep.path, "curve_epochs": sweep.curve_epochs}


def _grid_points(grid: dict[str, list]) -> list[dict]:
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand(sweep, root: str | Path = ".") -> list[TaskSpec]:
    """The sweep's task specs, in a deterministic order (ids are unique); at most ``MAX_TASKS``."""
    check_size(sweep)
    root = str(root)
    common = _common(sweep)
    if sweep.kind == "barrier_matrix":
        cks = sweep.checkpoints
        specs = [TaskSpec("barrier", {**common, "i": i, "j": j, "a": cks[i], "b": cks[j], "points": sweep.points,
                                      "split": sweep.split, "bn_reset": sweep.bn_reset, "align": sweep.align,
                                      **_curve(sweep)}, root)
                 for i in range(len(cks)) for j in range(i + 1, len(cks))]
    elif sweep.kind == "evaluate":
        specs = [TaskSpec("evaluate", {**common, "checkpoint": c, "splits": list(sweep.splits)}, root)
                 for c in sweep.checkpoints]
    else:
        sets = sweep.model_sets or [list(sweep.checkpoints)]
        specs = [TaskSpec("merge", {**common, "method": m.method, "params": point, "models": list(models),
                                    "base": sweep.base, "align": how}, root)
                 for m in sweep.methods for point in _grid_points(m.grid) for models in sets for how in sweep.align]
    ids = [s.id for s in specs]
    if len(set(ids)) != len(ids):
        raise MergescopeError("sweep: two tasks have the same parameters (duplicate grid values?)")
    return specs
