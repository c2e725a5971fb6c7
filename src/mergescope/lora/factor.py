"""Rank-r LoRA factors by truncated SVD, adapter folders written atomically, and ``extract-lora``.

By Eckart-Young the truncated SVD is the best rank-r approximation of an update in the Frobenius
and spectral norms, so a merged update refactored this way loses only its tail singular values
(``residual`` reports how much). The singular values are split evenly between the factors
(``A = sqrt(S) Vh``, ``B = U sqrt(S)``, as mergekit-extract-lora) and ``lora_alpha = r``, so the
scale is 1 and the factors have equal norms (fp16 / bf16 friendly).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergescopeError
from ..io import atomic_output, load, provenance, write_state
from ..io.untrusted import short_repr
from .adapter import CONFIG, MAX_RANK, PREFIX, WEIGHTS


@dataclass(frozen=True)
class Factors:
    """One target's rank-k factors in PEFT's layout and the share of the update's norm they miss."""

    weight: str
    a: torch.Tensor
    b: torch.Tensor
    kind: str  # as adapter.Target: linear, conv1d (fan_in_fan_out) or embedding
    residual: float  # ||D - B A|| / ||D|| (Frobenius), 0 when rank >= the update's rank


def factorize(name: str, delta: torch.Tensor, rank: int, kind: str = "linear") -> Factors:
    """The best rank-``rank`` factors of ``delta`` (in the base weight's layout), scale 1."""
    m = (delta if kind == "linear" else delta.T).float()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    total = float(s.square().sum())
    residual = math.sqrt(float(s[k:].square().sum()) / total) if total > 0 else 0.0
    return Factors(name, (root[:, None] * vh[:k]).contiguous(), (u[:, :k] * root).contiguous(), kind, residual)


def _keys(f: Factors) -> tuple[str, str]:
    module = PREFIX + f.weight.removesuffix(".weight")
    if f.kind == "embedding":
        return f"{module}.lora_embedding_A", f"{module}.lora_embedding_B"
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def adapter_config(factors: list[Factors], rank: int, fan_in_fan_out: bool = False, saved: tuple[str, ...] = ()) -> dict:
    """PEFT's ``adapter_config.json``: full module names as targets; smaller ranks (a module narrower
    than ``rank``) in ``rank_pattern`` / ``alpha_pattern`` so every scale stays 1; ``saved`` tensors'
    modules in ``modules_to_save``."""
    modules = [f.weight.removesuffix(".weight") for f in factors]
    smaller = {m: f.a.shape[0] for m, f in zip(modules, factors) if f.a.shape[0] != rank}
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": rank,
            "lora_alpha": rank, "use_rslora": False, "target_modules": modules, "rank_pattern": smaller,
            "alpha_pattern": dict(smaller), "fan_in_fan_out": fan_in_fan_out, "bias": "none",
            "lora_dropout": 0.0, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": sorted({name.rpartition(".")[0] for name in saved}) or None}


def write_adapter(out: str | os.PathLike, factors: list[Factors], rank: int, inputs: list[Path] = (),
                  force: bool = False, dtype: torch.dtype = torch.float32, metadata: dict | None = None,
                  saved: dict[str, torch.Tensor] | None = None) -> Path:
    """An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), atomically; ``saved``:
    whole tensors (base name -> tensor) written as ``modules_to_save``."""
    saved = saved or {}
    if not factors and not saved:
        raise MergescopeError(f"{out}: no tensor to write (no target has a non-zero update)")
    kinds = {f.kind for f in factors} - {"embedding"}
    if len(kinds) > 1:
        raise MergescopeError(f"{out}: cannot write Linear and Conv1D (fan_in_fan_out) updates in one adapter")
    fan_in_fan_out = kinds == {"conv1d"}
    state = {PREFIX + name: t for name, t in sorted(saved.items())}
    for f in factors:
        a_key, b_key = _keys(f)
        state[a_key], state[b_key] = f.a.to(dtype), f.b.to(dtype)
    out = Path(out)
    with atomic_output(out, inputs, force=force, is_dir=True) as tmp:
        write_state(tmp / WEIGHTS[0], state, metadata=provenance(**(metadata or {})), single_file=True)
        text = json.dumps(adapter_config(factors, rank, fan_in_fan_out, tuple(saved)), indent=2, sort_keys=True)
        (tmp / CONFIG).write_text(text + "\n")
    return out


def check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= MAX_RANK:
        raise MergescopeError(f"rank must be an integer in 1..{MAX_RANK}, got {short_repr(rank)}")
    return rank


@dataclass(frozen=True)
class ExtractResult:
    out: str
    rank: int
    targets: int
    worst_residual: float  # largest ||D - BA|| / ||D|| over the targets
    not_extracted: tuple[str, ...]  # tensors that differ but are not 2-D linear weights (norms, biases, embeddings)

    def to_dict(self) -> dict:
        return {"out": self.out, "rank": self.rank, "targets": self.targets, "worst_residual": self.worst_residual,
                "not_extracted": list(self.not_extracted)}


def _extractable(name: str, info) -> bool:
    from ..merge.plan import VOCAB

    return len(info.shape) == 2 and info.dtype.is_floating_point and name.endswith(".weight") and not VOCAB.search(name)


def extract_lora(finetuned: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, rank: int,
                 force: bool = False, dtype: torch.dtype = torch.float32) -> ExtractResult:
    """The rank-``rank`` LoRA adapter closest to ``finetuned - base`` on every 2-D linear weight
    (as mergekit-extract-lora; embeddings, heads, norms and biases that differ are listed, not extracted)."""
    rank = check_rank(rank)
    ft_ckpt, base_ckpt = load(finetuned), load(base)
    try:
        factors, skipped = [], []
        for name in base_ckpt:
            if name not in ft_ckpt:
                continue
            info, ft_info = base_ckpt.info(name), ft_ckpt.info(name)
            if tuple(info.shape) != tuple(ft_info.shape):
                raise MergescopeError(f"{finetuned}: tensor {short_repr(name)} is {list(ft_info.shape)} but "
                                      f"{list(info.shape)} in the base {base}")
            delta = ft_ckpt[name].float() - base_ckpt[name].float()
            if not bool(delta.any()):
                continue
            if _extractable(name, info):
                factors.append(factorize(name, delta, rank))
            else:
                skipped.append(name)
        meta = {"lora_extracted_rank": str(rank)}
        write_adapter(out, factors, rank, [Path(finetuned), Path(base)], force=force, dtype=dtype, metadata=meta)
    finally:
        ft_ckpt.close()
        base_ckpt.close()
    return ExtractResult(str(out), rank, len(factors), max(f.residual for f in factors), tuple(skipped))
