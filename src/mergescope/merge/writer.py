"""Safetensors output whose layout is fixed before any tensor is computed.

A merge knows every output name, dtype and shape from the input headers, so the shard files,
their headers and every tensor's offset can be laid out first; each worker thread then
``pwrite``s its tensor at its offset as soon as it is merged and frees it. Nothing waits in
memory for a shard to fill (``io.ShardedWriter`` keeps a whole shard), tensors may finish in
any order, and the bytes on disk do not depend on that order. Headers come from
``io.safetensors_format.build_header``; the file names and index follow Hugging Face. A shard
whose last tensor lands is hashed into the partial folder's done log (``io.atomic.record_done``;
the last shard to complete is not: the run ends right after it),
so ``resume`` reuses it after a crash instead of merging its tensors again.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path

import torch

from ..errors import MergescopeError
from ..io.atomic import keep_only, record_done, sha256_file, verified_done
from ..io.checkpoint import SAFE_INDEX, SAFE_SINGLE
from ..io.safetensors_format import build_header, tensor_bytes

Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]


def split_shards(layout: Layout, max_shard_size: int) -> list[Layout]:
    """Greedy split in order: a shard closes when the next tensor would push it past the limit."""
    shards: list[Layout] = [[]]
    size = 0
    for entry in layout:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _has_layout(path: Path, header: bytes, end: int) -> bool:
    """Whether ``path`` starts with ``header`` and is ``end`` bytes long (a shard of this very plan)."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size == end and f.read(len(header)) == header


class PlannedWriter:
    """Write tensors of a known layout into ``folder`` (HF shards + index) or one ``file``."""

    def __init__(self, target: str | os.PathLike, layout: Layout, max_shard_size: int, metadata: dict[str, str],
                 single_file: bool = False, resume: bool = False):
        """``resume`` reuses the shards of an interrupted run into the same folder that the done log
        vouches for (sha256) and that start with this plan's header; everything else is removed.
        """
        target = Path(target)
        meta = {"format": "pt", **metadata}
        shards = [layout] if single_file else split_shards(layout, max_shard_size)
        n = len(shards)
        if single_file:
            paths = [target]
        else:
            paths = [target / (SAFE_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors") for i in range(n)]
        headers = [build_header(shard, meta) for shard in shards]
        ends = [len(h) + sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in shard)
                for h, shard in zip(headers, shards)]
        self._log_folder = None if single_file else target
        kept: dict[str, str] = {}
        if resume and not single_file:
            done = verified_done(target)
            kept = {p.name: done[p.name] for p, h, end in zip(paths, headers, ends)
                    if p.name in done and _has_layout(p, h, end)}
            keep_only(target, kept)
        self._slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...], int]] = {}
        self._fds: list[int] = []
        self._written: set[str] = set()
        self._remaining: list[int] = []
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self.paths = paths
        self.reused: set[str] = set()
        self.total_size = 0
        weight_map = {}
        for i, (path, shard, header) in enumerate(zip(paths, shards, headers)):
            names = [name for name, _, _ in shard]
            weight_map.update(dict.fromkeys(names, path.name))
            self.total_size += ends[i] - len(header)
            self._remaining.append(len(shard))
            if path.name in kept:
                self.reused.update(names)
                self._written.update(names)
                self._remaining[i] = 0
                continue
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, header, 0)
            offset = len(header)
            for name, dtype, shape in shard:
                self._slots[name] = (fd, offset, dtype, tuple(shape), i)
                offset += math.prod(shape) * dtype.itemsize
            os.ftruncate(fd, offset)
        self._index = None
        if n > 1:
            self._index = {"metadata": {"total_size": self.total_size, **meta}, "weight_map": weight_map}
            self._index_path = target / SAFE_INDEX

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Store one tensor at its planned place; returns the bytes written."""
        fd, offset, dtype, shape, shard = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise MergescopeError(f"tensor {name!r}: merged to {tensor.dtype} {list(tensor.shape)}, "
                                  f"planned {dtype} {list(shape)}")
        with self._lock:
            if name in self._written:
                raise MergescopeError(f"tensor {name!r}: written twice")
            self._written.add(name)
        data = tensor_bytes(tensor).cast("B")
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        with self._lock:
            self._remaining[shard] -= 1
            finished = self._remaining[shard] == 0
            last = not any(self._remaining)
        if finished and not last and self._log_folder is not None:
            # The last shard to finish is not hashed: the run completes right after it, and a run
            # killed in between only redoes that shard (hashing 1 GB costs ~1 s here).
            self._log_done(self.paths[shard])
        return done

    def _log_done(self, path: Path) -> None:
        """Record a complete shard (and its hash) so an interrupted run can be resumed from it."""
        digest = sha256_file(path)
        with self._log_lock:
            record_done(self._log_folder, path, digest)

    def close(self) -> list[Path]:
        """Check every tensor was written, close the files, write the index when sharded."""
        missing = [n for n in self._slots if n not in self._written]
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if missing:
            raise MergescopeError(f"tensor {missing[0]!r}: never written ({len(missing)} missing)")
        if self._index is not None:
            self._index_path.write_text(json.dumps(self._index, indent=2) + "\n")
        return list(self.paths)

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
