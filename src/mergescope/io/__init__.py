"""Checkpoint I/O: lazy reading of safetensors / HF folders / torch files, atomic sharded writing."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic import atomic_output, check_output_path, check_side_outputs
from .checkpoint import Checkpoint, load, summarize
from .provenance import fingerprint, provenance
from .safetensors_format import DTYPES, SafetensorsFile, read_header, write_file
from .writer import ShardedWriter, copy_aux_files, parse_size

__all__ = [
    "Checkpoint", "DTYPES", "SafetensorsFile", "ShardedWriter", "atomic_output", "check_output_path",
    "check_side_outputs", "copy_aux_files", "fingerprint", "load", "parse_size", "provenance", "read_header", "save",
    "summarize",
    "write_file",
]


def save(state: Mapping[str, torch.Tensor], out: str | os.PathLike, max_shard_size: int | str = "2GB",
         metadata: dict[str, str] | None = None, force: bool = False, copy_files_from: str | os.PathLike | None = None,
         inputs: tuple = ()) -> Path:
    """Write a state atomically: ``out`` ending in ``.safetensors`` gives one file, else a HF folder.

    ``copy_files_from`` copies config/tokenizer files of a HF folder alongside the weights.
    """
    out = Path(out)
    meta = {**provenance(), **(metadata or {})}
    if out.suffix == ".safetensors":
        with atomic_output(out, inputs, force=force, is_dir=False) as tmp:
            write_file(tmp, {k: _cpu(state[k], k) for k in state}, {"format": "pt", **meta})
        return out
    with atomic_output(out, inputs, force=force) as tmp:
        writer = ShardedWriter(tmp, max_shard_size, meta)
        for name in state:
            writer.add(name, _cpu(state[name], name))
        writer.close()
        if copy_files_from is not None:
            copy_aux_files(copy_files_from, tmp)
    return out


def _cpu(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        from ..errors import MergescopeError

        raise MergescopeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
    return t.detach().to("cpu")
