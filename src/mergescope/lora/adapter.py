"""PEFT LoRA adapter folders read as hostile input, and a base model seen through an adapter.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``,
read with ``weights_only``). Each adapted weight ``W`` of the base gets ``scale * B @ A`` with
``scale = lora_alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), transposed for GPT-2's
``Conv1D`` (``fan_in_fan_out``) and for embeddings (PEFT stores their factors transposed).
Tensors of ``modules_to_save`` (full copies PEFT trains in place of the base's; mergekit-extract-lora
writes norms and embeddings this way) replace the base's. Everything PEFT would apply differently
(DoRA, LoRA biases, conv layers) is refused by name rather than merged wrongly.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergescopeError
from ..io import Checkpoint, load
from ..io.untrusted import inside_folder, read_json, short_repr

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
MAX_RANK = 1 << 16  # larger than any published adapter; a rank is also checked against the base's shape
KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$|^(?P<emodule>.+)\.(?P<epart>lora_embedding_[AB])$")
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class Target:
    """One adapted base tensor: its factor names, scale and whether ``B @ A`` is stored transposed."""

    weight: str
    a: str
    b: str
    rank: int
    scale: float
    kind: str  # "linear" (B @ A), "conv1d" (fan_in_fan_out: transposed) or "embedding" (transposed)

    @property
    def transposed(self) -> bool:
        return self.kind != "linear"


def split_reference(name: str) -> tuple[str, str | None]:
    """MergeKit's ``model+adapter`` syntax: (base, adapter), or (name, None) for a plain path.

    A path that exists as written is a path even when it holds '+' (as MergeKit's loader would not
    guess)."""
    if "+" not in name or os.path.exists(name):
        return name, None
    parts = name.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise MergescopeError(f"model {name!r}: expected BASE+ADAPTER (a LoRA adapter applied to a base: one '+', as MergeKit)")
    return parts[0], parts[1]


def reference_paths(name: str) -> list[Path]:
    """The folders a recipe's model reads: ``BASE+ADAPTER`` is both (for output guards and fingerprints)."""
    return [Path(p) for p in split_reference(name) if p is not None]


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and os.path.lexists(Path(path) / CONFIG)


def _number(config: dict, key: str, where: str, default=None) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergescopeError(f"{where}: {key!r} must be a finite number, got {short_repr(value)}")
    return float(value)


def _rank(value, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_RANK:
        raise MergescopeError(f"{where}: {key!r} must be an integer in 1..{MAX_RANK}, got {short_repr(value)}")
    return value


def _pattern(config: dict, key: str, where: str) -> dict:
    """``rank_pattern`` / ``alpha_pattern``: module-name suffixes only (a regex from a file is refused)."""
    value = config.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and PLAIN_NAME.match(k) for k in value):
        raise MergescopeError(f"{where}: {key!r} must map plain module names to numbers (regular expressions "
                              "are not supported)")
    return value


def _pick(pattern: dict, module: str, default):
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def _check_config(config, where: str) -> None:
    if not isinstance(config, dict):
        raise MergescopeError(f"{where}: must be a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise MergescopeError(f"{where}: peft_type {short_repr(config.get('peft_type'))} is not supported (LORA only)")
    unsupported = {"use_dora": "DoRA", "layer_replication": "layer_replication", "lora_bias": "lora_bias"}
    for key, what in unsupported.items():
        if config.get(key):
            raise MergescopeError(f"{where}: {what} adapters are not supported (only plain LoRA updates are merged)")
    if config.get("bias", "none") != "none":
        raise MergescopeError(f"{where}: bias {short_repr(config.get('bias'))} is not supported (only bias 'none')")
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) and PLAIN_NAME.match(m) for m in saved):
        raise MergescopeError(f"{where}: 'modules_to_save' must be a list of plain module names")


class Adapter:
    """A LoRA adapter folder: ``targets`` (base tensor name -> Target) and ``delta(name)`` in float32."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergescopeError(f"{self.path}: not an adapter folder (expected a folder with {CONFIG})")
        where = str(self.path / CONFIG)
        if not os.path.lexists(self.path / CONFIG):
            raise MergescopeError(f"{where}: missing (a PEFT adapter folder holds {CONFIG} and adapter_model.safetensors)")
        self.config = read_json(inside_folder(self.path, CONFIG, self.path), CONFIG)
        _check_config(self.config, where)
        self.rank = _rank(self.config.get("r", 8), where, "r")
        self.alpha = _number(self.config, "lora_alpha", where, default=8)
        self.rslora = bool(self.config.get("use_rslora", False))
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self.weights = self._open_weights()
        self.replaced: dict[str, str] = {}  # base tensor name -> its modules_to_save copy in the adapter file
        self.targets = self._targets(where)

    def _open_weights(self) -> Checkpoint:
        for name in WEIGHTS:
            if os.path.lexists(self.path / name):
                return load(inside_folder(self.path, name, self.path))
        raise MergescopeError(f"{self.path}: no {' or '.join(WEIGHTS)}")

    def _scale(self, module: str, rank: int, where: str) -> float:
        alpha = _pick(_pattern(self.config, "alpha_pattern", where), module, self.alpha)
        alpha = _number({"alpha": alpha}, "alpha", f"{where} alpha_pattern[{module!r}]")
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def _targets(self, where: str) -> dict[str, Target]:
        parts: dict[str, dict[str, str]] = {}
        for key in self.weights:
            m = KEY.match(key)
            if m is None and self._saved_module(key):
                self.replaced[key[len(PREFIX):]] = key
                continue
            if m is None or not key.startswith(PREFIX):
                raise MergescopeError(f"{self.weights.path}: tensor {short_repr(key)} is not a LoRA factor "
                                      f"({PREFIX}MODULE.lora_A.weight / lora_B.weight); not supported")
            module = (m.group("module") or m.group("emodule"))[len(PREFIX):]
            parts.setdefault(module, {})[(m.group("part") or m.group("epart"))[-1]] = key
        if not parts and not self.replaced:
            raise MergescopeError(f"{self.weights.path}: holds no LoRA factors")
        patterns = _pattern(self.config, "rank_pattern", where)
        targets = {}
        for module, ab in sorted(parts.items()):
            if set(ab) != {"A", "B"}:
                raise MergescopeError(f"{self.weights.path}: module {short_repr(module)} has lora_{next(iter(ab))} "
                                      "but not its other factor")
            rank = _rank(_pick(patterns, module, self.rank), f"{where} rank_pattern[{module!r}]", "r")
            kind = "embedding" if "embedding" in ab["A"] else "conv1d" if self.fan_in_fan_out else "linear"
            targets[f"{module}.weight"] = Target(f"{module}.weight", ab["A"], ab["B"], rank,
                                                 self._scale(module, rank, where), kind)
            self._check_factors(targets[f"{module}.weight"])
        return targets

    def _saved_module(self, key: str) -> bool:
        module = key[len(PREFIX):].rpartition(".")[0] if key.startswith(PREFIX) else ""
        return bool(module) and _pick(dict.fromkeys(self.config.get("modules_to_save") or [], True), module, False)

    def _check_factors(self, t: Target) -> None:
        a, b = self.weights.info(t.a), self.weights.info(t.b)
        ok = len(a.shape) == 2 and len(b.shape) == 2 and a.dtype.is_floating_point and b.dtype.is_floating_point
        if not ok or a.shape[0] != t.rank or b.shape[1] != t.rank:
            raise MergescopeError(f"{self.weights.path}: {short_repr(t.weight)}: factors A {list(a.shape)} and "
                                  f"B {list(b.shape)} do not have rank r={t.rank} (A [r, in], B [out, r])")

    def delta_shape(self, name: str) -> tuple[int, int]:
        t = self.targets[name]
        out, inn = self.weights.info(t.b).shape[0], self.weights.info(t.a).shape[1]
        return (inn, out) if t.transposed else (out, inn)

    def delta(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` of one target in float32, in the base weight's layout."""
        t = self.targets[name]
        d = (self.weights[t.b].float() @ self.weights[t.a].float()) * t.scale
        return d.T.contiguous() if t.transposed else d

    def replacement(self, name: str) -> torch.Tensor:
        """The ``modules_to_save`` copy of base tensor ``name``."""
        return self.weights[self.replaced[name]]

    def check_base(self, base: Mapping) -> None:
        """Every target must be a 2-D float tensor of the base with the delta's shape; every saved module's
        tensor a base tensor of the same shape."""
        for name, key in self.replaced.items():
            info = self.weights.info(key)
            if name not in base or tuple(base.info(name).shape) != tuple(info.shape):
                raise MergescopeError(f"{self.path}: modules_to_save tensor {short_repr(name)} {list(info.shape)} "
                                      "is not a tensor of the base model of that shape")
        for name in self.targets:
            if name not in base:
                raise MergescopeError(f"{self.path}: target {short_repr(name)} is not a tensor of the base model")
            info = base.info(name)
            if tuple(info.shape) != self.delta_shape(name) or not info.dtype.is_floating_point:
                raise MergescopeError(f"{self.path}: target {short_repr(name)}: the update is "
                                      f"{list(self.delta_shape(name))} but the base tensor is {list(info.shape)} "
                                      f"{str(info.dtype).removeprefix('torch.')}")

    def parameters(self) -> int:
        return sum(self.weights.info(k).numel for t in self.targets.values() for k in (t.a, t.b))

    def summary(self) -> dict:
        """What ``inspect`` shows: rank, alpha, scales, targets (module suffixes and count), parameters."""
        suffixes = sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in self.targets})
        return {"path": str(self.path), "rank": self.rank, "lora_alpha": self.alpha, "use_rslora": self.rslora,
                "scales": sorted({t.scale for t in self.targets.values()}),
                "ranks": sorted({t.rank for t in self.targets.values()}), "fan_in_fan_out": self.fan_in_fan_out,
                "target_modules": suffixes, "targets": len(self.targets), "parameters": self.parameters(),
                "modules_to_save": sorted(self.replaced),
                "dtypes": sorted({str(self.weights.info(k).dtype).removeprefix("torch.") for k in self.weights})}

    def close(self) -> None:
        self.weights.close()


class BaseView(Mapping):
    """A lazy checkpoint with the base's tensor names, read per tensor (``__getitem__``, in subclasses).

    It has no ``locate``, so the merge engine reads it through ``read`` (a computed tensor, not a map)."""

    def __init__(self, base: Checkpoint, adapter: Adapter | None):
        if adapter is not None:
            adapter.check_base(base)
        self.base, self.adapter = base, adapter
        self.path = base.path

    def read(self, name: str) -> torch.Tensor:
        return self[name]

    def info(self, name: str):
        return self.base.info(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __contains__(self, name) -> bool:
        return name in self.base

    @property
    def metadata(self) -> dict[str, str]:
        return self.base.metadata

    def close(self) -> None:
        self.base.close()
        if self.adapter is not None:
            self.adapter.close()


class AdaptedCheckpoint(BaseView):
    """The base checkpoint with the adapter's updates added (in float32, stored in the base's dtype)."""

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.base[name]
        if name in self.adapter.replaced:
            return self.adapter.replacement(name).to(t.dtype)
        if name not in self.adapter.targets:
            return t
        return (t.float() + self.adapter.delta(name)).to(t.dtype)


def open_reference(name: str) -> Checkpoint | AdaptedCheckpoint:
    """A recipe's model: a checkpoint, or ``BASE+ADAPTER`` as the base with the adapter applied."""
    base, adapter = split_reference(name)
    ckpt = load(base)
    if adapter is None:
        return ckpt
    try:
        return AdaptedCheckpoint(ckpt, Adapter(adapter))
    except BaseException:
        ckpt.close()
        raise
