"""Sharded safetensors output in the Hugging Face layout, written tensor by tensor.

Shards fill up to ``max_shard_size`` bytes and are written as they fill, so memory holds at
most one shard; names follow HF (``model-00001-of-00003.safetensors`` + index, or a single
``model.safetensors``) and are fixed only when the writer closes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from ..errors import MergescopeError
from .checkpoint import PICKLE_SUFFIXES, SAFE_INDEX, SAFE_SINGLE
from .safetensors_format import DTYPE_NAMES, write_file
from .untrusted import link_allowed, open_regular

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """'2GB' -> 2e9 bytes (decimal, as Hugging Face does), '1GiB' -> 2**30; ints pass through."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not m or m.group(2) not in _UNITS:
            raise MergescopeError(f"max_shard_size {size!r}: expected a byte count like 500MB, 2GB or 1GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise MergescopeError(f"max_shard_size {size!r}: must be positive")
    return value


class ShardedWriter:
    """Accumulate tensors into shards of at most ``max_shard_size`` bytes and write them."""

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = "2GB", metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise MergescopeError(f"tensor {name!r}: written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise MergescopeError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size:
            self.flush()
        self._names.add(name)
        self._pending[name] = tensor
        self._pending_bytes += nbytes
        self.total_size += nbytes

    def flush(self) -> None:
        if not self._pending:
            return
        write_file(self.folder / f".shard-{len(self._shards)}.tmp", self._pending, self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names, write the index if sharded."""
        self.flush()
        if not self._shards:
            write_file(self.folder / SAFE_SINGLE, {}, self.metadata)
            return [self.folder / SAFE_SINGLE]
        n = len(self._shards)
        names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(names):
            os.replace(self.folder / f".shard-{i}.tmp", self.folder / final)
        if n > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self._shards) for t in shard}
            index = {"metadata": {"total_size": self.total_size, **self.metadata}, "weight_map": weight_map}
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
        return [self.folder / name for name in names]


TENSOR_FILES = (".safetensors", *PICKLE_SUFFIXES)
INDEX_FILES = (SAFE_INDEX, "pytorch_model.bin.index.json")


MAX_AUX_FILE_BYTES = 1 << 30  # config/tokenizer files: the largest real tokenizer.json is ~30 MB


def copy_aux_files(src: str | os.PathLike, dst: str | os.PathLike, limit: int = MAX_AUX_FILE_BYTES) -> list[str]:
    """Copy a HF folder's non-tensor files (config.json, tokenizer files, ...) into ``dst``.

    Only regular files are copied, by content, each at most ``limit`` bytes; a symlink is read
    only where ``link_allowed`` says (inside the folder, or an HF cache snapshot's blobs), a
    symlinked subfolder is never entered, and a FIFO or device is refused: a crafted model folder
    can neither pull a local file into the merged output nor stream ``/dev/zero`` into it.
    Returns the copied paths relative to ``src``.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        return []
    copied = []
    for item in _aux_files(src, src):
        rel = item.relative_to(src)
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_regular(item, target, limit)
        copied.append(str(rel))
    return copied


def _aux_files(root: Path, folder: Path) -> list[Path]:
    """The files of ``folder`` (recursively) that ``copy_aux_files`` copies, checked one by one."""
    found = []
    for item in sorted(folder.iterdir()):
        top = folder == root
        if item.name.startswith(".") or (top and (item.name in INDEX_FILES or item.suffix in TENSOR_FILES)):
            continue
        if item.is_symlink() and not link_allowed(root, item):
            raise MergescopeError(f"{item}: symlink points outside the model folder; not copied")
        if item.is_dir():
            if item.is_symlink():
                raise MergescopeError(f"{item}: symlinked folder; mergescope does not copy through folder links")
            found += _aux_files(root, item)
        else:
            found.append(item)
    return found


def _copy_regular(src: Path, dst: Path, limit: int) -> None:
    """Copy one regular file (opened without blocking, so a FIFO is refused, not waited on)."""
    fd = open_regular(src, "model folder file")
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise MergescopeError(f"{src}: {size} bytes, over the {limit}-byte limit for a config/tokenizer file")
        with os.fdopen(fd, "rb", closefd=False) as fin, open(dst, "wb") as fout:
            shutil.copyfileobj(_Capped(fin, limit), fout)
    finally:
        os.close(fd)


class _Capped:
    """A reader that fails once more than ``limit`` bytes came out (a file growing while copied)."""

    def __init__(self, f, limit: int):
        self.f, self.left, self.limit = f, limit, limit

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n if n >= 0 else self.left + 1)
        self.left -= len(data)
        if self.left < 0:
            raise MergescopeError(f"{self.f.name}: grew past the {self.limit}-byte limit while being copied")
        return data
