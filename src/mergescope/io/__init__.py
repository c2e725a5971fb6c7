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
from .writer import (
    PlannedWriter,
    ShardedWriter,
    copy_aux_files,
    parse_size,
    write_state,
)

__all__ = [
    "DTYPES",
    "Checkpoint",
    "PlannedWriter",
    "SafetensorsFile",
    "ShardedWriter",
    "atomic_output",
    "check_output_path",
    "check_side_outputs",
    "copy_aux_files",
    "fingerprint",
    "load",
    "parse_size",
    "provenance",
    "read_header",
    "save",
    "summarize",
    "write_file",
    "write_state",
]


def save(state: Mapping[str, torch.Tensor], out: str | os.PathLike, max_shard_size: int | str = "2GB",
         metadata: dict[str, str] | None = None, force: bool = False, copy_files_from: str | os.PathLike | None = None,
         inputs: tuple = ()) -> Path:
    """Write a state atomically: ``out`` ending in ``.safetensors`` gives one file, else a HF folder.

    Tensors stream one at a time through ``writer.write_state`` (the merge engine's writer), so
    memory holds one tensor, not a shard. ``copy_files_from`` copies config/tokenizer files of a HF
    folder alongside the weights.
    """
    out = Path(out)
    meta = {**provenance(), **(metadata or {})}
    single = out.suffix == ".safetensors"
    with atomic_output(out, inputs, force=force, is_dir=not single) as tmp:
        write_state(tmp, state, max_shard_size, meta, single_file=single)
        if copy_files_from is not None and not single:
            copy_aux_files(copy_files_from, tmp)
    return out
