"""Merging LoRA adapters by their weight updates ``scale * B @ A``, never factor by factor.

Averaging the A's and the B's separately is not averaging the updates (the mean of products is not
the product of means), so each adapter is treated as the model ``base + delta_i``:

* a full model: the recipe ``models: [BASE+ADAPTER_i]`` run by the merge engine (every method);
* an adapter of rank r: the same plan (parameters, filters, gradients, per-tensor seeds) run on the
  updates alone, base = 0, then refactored by truncated SVD (PEFT's ``svd``, ``ties_svd``,
  ``dare_*_svd`` combinations). This equals the full merge minus the base for the methods that act
  on task vectors (``DELTA_METHODS``: shifting every input and the base by the same tensor shifts
  their result by it), which are therefore the only ones allowed here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergescopeError
from ..io import load
from .adapter import Adapter, BaseView
from .factor import Factors, check_rank, factorize, write_adapter

DELTA_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                 "della", "della_linear")


def adapter_recipe(base: str, adapters: Sequence[str], method: str = "task_arithmetic",
                   weights: Sequence[float] | None = None, parameters: dict | None = None) -> dict:
    """The MergeKit recipe merging ``base + adapter_i`` (weights default to 1, linear's to 1/n)."""
    from ..merge.methods import get

    if not adapters:
        raise MergescopeError("give at least one adapter")
    if weights is not None and len(weights) != len(adapters):
        raise MergescopeError(f"{len(weights)} weight(s) for {len(adapters)} adapter(s); give one per adapter")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    m = get(method)
    recipe = {"merge_method": method, "models": [{"model": f"{base}+{a}", "parameters": {"weight": float(w)}}
                                                 for a, w in zip(adapters, weights)]}
    if m.base != "ignored":
        recipe["base_model"] = str(base)
    if parameters:
        recipe["parameters"] = dict(parameters)
    return recipe


@dataclass(frozen=True)
class _Info:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    @property
    def numel(self) -> int:
        return self.nbytes // self.dtype.itemsize


class _Updates(BaseView):
    """A model seen as its update from the base: the adapter's delta on targets, zeros elsewhere (float32)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        if self.adapter is not None and name in self.adapter.targets:
            return self.adapter.delta(name)
        if self.adapter is not None and name in self.adapter.replaced:  # a modules_to_save copy
            return self.adapter.replacement(name).float() - self.base[name].float()
        return torch.zeros(self.info(name).shape)

    def info(self, name: str) -> _Info:
        return _Info(torch.float32, tuple(self.base.info(name).shape))

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def close(self) -> None:  # the base and adapters are shared between views; merged_updates closes them
        pass


def merged_updates(base: str | os.PathLike, adapters: Sequence[str | os.PathLike], method: str = "task_arithmetic",
                   weights: Sequence[float] | None = None, parameters: dict | None = None,
                   seed: int = 0) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(tensor name, kind, merged update) for every tensor some adapter targets or saves, one at a time
    (kind ``full`` for a ``modules_to_save`` tensor: no low-rank form)."""
    from ..merge import plan as planning
    from ..merge.engine import run_job
    from ..recipe import read

    if method not in DELTA_METHODS:
        raise MergescopeError(f"method {method!r} does not act on updates alone; for an adapter output use one of "
                              f"{', '.join(DELTA_METHODS)} (any method can write a full model)")
    if method == "linear" and (parameters or {}).get("normalize") is False:
        raise MergescopeError("linear with normalize: false mixes in the base; use task_arithmetic for a sum of updates")
    recipe = read(adapter_recipe(str(base), [str(a) for a in adapters], method, weights, parameters))
    base_ckpt = load(base)
    opened = [Adapter(a) for a in adapters]
    kinds: dict[str, str] = {}
    try:
        for adapter in opened:
            for name, target in adapter.targets.items():
                if kinds.setdefault(name, target.kind) != target.kind:
                    raise MergescopeError(f"{adapter.path}: {name!r} is a {target.kind} update here but a "
                                          f"{kinds[name]} update in another adapter")
            for name in adapter.replaced:
                if kinds.setdefault(name, "full") != "full":
                    raise MergescopeError(f"{adapter.path}: {name!r} is a modules_to_save tensor here but a "
                                          f"{kinds[name]} update in another adapter (not supported)")
        ckpts = {str(base): _Updates(base_ckpt, None)} if recipe.base_model else {}
        ckpts.update({m.model: _Updates(base_ckpt, a) for m, a in zip(recipe.models, opened)})
        plan = planning.build(recipe, ckpts)
        readers = [ckpts[m] for m in plan.models]
        for job in plan.jobs:
            if job.name in kinds:
                yield job.name, kinds[job.name], run_job(job, plan, lambda i, n: readers[i][n], None, seed)
    finally:
        for a in opened:
            a.close()
        base_ckpt.close()


def merge_adapters(base: str | os.PathLike, adapters: Sequence[str | os.PathLike], out: str | os.PathLike,
                   method: str = "task_arithmetic", weights: Sequence[float] | None = None,
                   parameters: dict | None = None, rank: int | None = None, seed: int = 0, force: bool = False,
                   threads: int | None = None):
    """Merge adapters of one base into ``out``: a full model (``rank=None``, the merge engine's
    ``MergeResult``) or an adapter of rank ``rank`` (its list of ``Factors``)."""
    inputs = [Path(base), *map(Path, adapters)]
    if rank is None:
        from ..io import check_output_path
        from ..merge.engine import merge

        recipe = adapter_recipe(str(base), [str(a) for a in adapters], method, weights, parameters)
        check_output_path(Path(out), inputs, force)  # the engine sees BASE+ADAPTER names, not the adapter folders
        return merge(recipe, out, seed=seed, force=force, threads=threads)
    rank = check_rank(rank)
    factors: list[Factors] = []
    saved: dict[str, torch.Tensor] = {}  # modules_to_save tensors: base + merged update, written whole
    base_ckpt = load(base)
    try:
        for name, kind, delta in merged_updates(base, adapters, method, weights, parameters, seed):
            if not bool(delta.any()):
                continue
            if kind == "full":
                t = base_ckpt[name]
                saved[name] = (t.float() + delta).to(t.dtype)
            else:
                factors.append(factorize(name, delta, rank, kind))
    finally:
        base_ckpt.close()
    write_adapter(out, factors, rank, inputs, force=force, metadata={"merge_method": method, "seed": seed},
                  saved=saved)
    return factors
