"""Zero-copy tensor reads for the merge engine: map one tensor's byte range, use it, unmap it.

A ``pread`` copy costs a fresh buffer (page faults, zeroing) plus a memcpy from the page cache
for every input tensor; mapping the tensor's range instead reads the page cache in place. The
map lives only while the job that needs it runs, so the mapped pages leave the resident set as
soon as the tensor is merged (a checkpoint-wide map would keep every touched page resident), and
the kernels give back each window's pages sooner, as they pass over it (merge/pages.py).
Non-safetensors checkpoints (torch pickles) fall back to ``Checkpoint.read``.

Inputs may change while a merge runs: each map is made from a regular file (``open_regular``)
whose current size (``fstat``) covers the tensor's byte range, so an input truncated after its
header was read is a one-line error naming the file and tensor, not a SIGBUS.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import torch

from ..errors import MergescopeError
from ..io import Checkpoint
from ..io.untrusted import open_regular, short_repr
from ..io.writer import map_tensor
from . import pages


class Locator:
    """Where each tensor of a safetensors checkpoint lies: file, absolute offset, dtype, shape."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.where: dict[str, tuple[Path, int, torch.dtype, tuple[int, ...]]] | None = None
        locate = getattr(ckpt, "locate", None)
        if locate is not None and len(ckpt) > 0:
            # The headers the checkpoint validated when it was opened (the plan was built from
            # them too); reading them again could see a file changed in the meantime.
            where = {name: locate(name) for name in ckpt}
            self.where = where if all(w is not None for w in where.values()) else None


class JobMaps:
    """The maps one job holds; ``close`` lets them go: each is unmapped as soon as no tensor views it.
    Each is tracked by merge/pages.py while the job runs, so the kernels can give back its pages as they
    pass over it.

    Not ``mmap.close``: it succeeds under a live torch view (torch keeps a reference to the map, not
    a buffer export), so a view kept past the job (a traceback's frame) would read unmapped memory.
    """

    def __init__(self):
        self._maps: list[mmap.mmap] = []

    def tensor(self, locator: Locator, name: str) -> torch.Tensor:
        if locator.where is None:
            return locator.ckpt.read(name)
        path, offset, dtype, shape = locator.where[name]
        numel = math.prod(shape)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        end = offset + numel * dtype.itemsize
        fd = open_regular(path, "checkpoint")
        try:
            size = os.fstat(fd).st_size
            if size < end:  # mapping past the end of the file would SIGBUS on first touch
                raise MergescopeError(f"{path}: tensor {short_repr(name)}: the file is now {size} bytes but the tensor "
                                      f"ends at byte {end} (truncated while the merge ran?)")
            tensor, mapped = map_tensor(fd, offset, dtype, shape)
        except OSError as e:
            raise MergescopeError(f"{path}: tensor {short_repr(name)}: cannot map ({e.strerror or e})") from None
        finally:
            os.close(fd)
        self._maps.append(mapped)
        pages.track(mapped)
        return tensor

    def close(self) -> None:
        for mapped in self._maps:
            pages.forget(mapped)
        self._maps = []
