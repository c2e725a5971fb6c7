"""Zero-copy tensor reads for the merge engine: map one tensor's byte range, use it, unmap it.

A ``pread`` copy costs a fresh buffer (page faults, zeroing) plus a memcpy from the page cache
for every input tensor; mapping the tensor's range instead reads the page cache in place. The
map lives only while the job that needs it runs, so the mapped pages leave the resident set as
soon as the tensor is merged (a checkpoint-wide map would keep every touched page resident).
Non-safetensors checkpoints (torch pickles) fall back to ``Checkpoint.read``.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import torch

from ..io import Checkpoint, read_header


class Locator:
    """Where each tensor of a safetensors checkpoint lies: file, absolute offset, dtype, shape."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.where: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] | None = None
        files = ckpt.files
        if files and all(Path(f).suffix == ".safetensors" for f in files) and len(ckpt) > 0:
            where = {}
            for path in files:
                data_start, tensors, _ = read_header(path)
                for name, info in tensors.items():
                    where[name] = (Path(path), data_start + info.start, info.dtype, info.shape)
            self.where = where if set(where) == set(ckpt) else None


class JobMaps:
    """The maps one job holds; ``close`` unmaps them (after the tensors viewing them are gone)."""

    def __init__(self):
        self._maps: list[mmap.mmap] = []

    def tensor(self, locator: Locator, name: str) -> torch.Tensor:
        if locator.where is None:
            return locator.ckpt.read(name)
        path, offset, dtype, shape = locator.where[name]
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), offset - start + numel * dtype.itemsize, offset=start,
                               access=mmap.ACCESS_COPY)
        self._maps.append(mapped)
        return torch.frombuffer(mapped, dtype=dtype, count=numel, offset=offset - start).view(shape)

    def close(self) -> None:
        for mapped in self._maps:
            try:
                mapped.close()
            except BufferError:  # a tensor still views it; it is unmapped when that is freed
                pass
        self._maps = []
