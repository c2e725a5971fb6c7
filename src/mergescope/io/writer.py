"""The one sharded safetensors writer: Hugging Face layout, index and ``format: pt`` metadata.

Everything that writes a checkpoint comes here (``ms.save``, the merge engine, ``ShardedWriter``),
so one place decides:

- the metadata of every file: ``file_metadata`` (``{"format": "pt", **metadata}``);
- the split: ``split_shards``, greedy in order (a shard closes when the next tensor would push it
  past ``max_shard_size``; a tensor larger than the limit gets a shard of its own);
- the names: ``shard_names`` (one shard: ``model.safetensors``; else ``model-00001-of-00003.safetensors``, ...);
- the index: ``index_json`` (``{"metadata": {"total_size": ..., **file metadata}, "weight_map": ...}``).

``PlannedWriter`` lays out every shard file (header and each tensor's offset) from the names,
dtypes and shapes before any tensor exists and reserves each shard's full size on disk
(``posix_fallocate``: a full disk is one line naming the shard before any work, not a SIGBUS in a
mapped write). Each tensor is then either ``pwrite``n at its offset (``write``) or computed straight
into the file through ``slot``: a tensor viewing a shared map of exactly its byte range, so the
result needs no buffer of its own and no second copy. Either way, in any order and from any thread:
nothing waits in memory for a shard to fill, and the bytes do not depend on the order. A shard whose
last tensor lands is logged in the partial folder's done log (``io.atomic.record_done``; the last
shard to complete is not: the run ends right after it), so a merge's ``resume`` reuses it after a
crash instead of redoing it. Its digest (``io.atomic.parts_digest``) comes from each tensor's bytes
hashed from memory as they are written (never read back); the merge engine logs it on its background
thread after the shard's fsync, so the log only vouches for durable bytes.
``write_state`` (``ms.save``) streams a state through it tensor by tensor. ``ShardedWriter`` is for
callers that learn their tensors one by one without knowing the layout up front: it holds one
shard, writes it through a ``PlannedWriter`` when it fills, and names the shards at ``close``.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import mmap
import os
import re
import shutil
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..errors import MergescopeError
from ..merge import pages
from .atomic import keep_only, part_hash, parts_digest, record_done, verified_done
from .checkpoint import PICKLE_SUFFIXES, SAFE_INDEX, SAFE_SINGLE
from .safetensors_format import DTYPE_NAMES, build_header, tensor_bytes
from .untrusted import link_allowed, open_regular, short_repr

Layout = list[tuple[str, torch.dtype, tuple[int, ...]]]

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


def file_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The ``__metadata__`` of every written safetensors file: ``format: pt`` (what HF loaders check) first."""
    return {"format": "pt", **(metadata or {})}


def shard_names(count: int) -> list[str]:
    """Hugging Face file names of ``count`` shards: ``model.safetensors`` alone, else ``model-00001-of-000NN...``."""
    if count == 1:
        return [SAFE_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


class _Splitter:
    """The split rule, fed one tensor size at a time."""

    def __init__(self, max_shard_size: int):
        self.limit, self.size, self.count = max_shard_size, 0, 0

    def opens_shard(self, size: int) -> bool:
        """Whether a tensor of ``size`` bytes must start a new shard (the current one is not empty)."""
        return self.count > 0 and self.size + size > self.limit

    def add(self, size: int) -> None:
        self.size += size
        self.count += 1

    def reset(self) -> None:
        self.size, self.count = 0, 0


def split_shards(layout: Layout, max_shard_size: int) -> list[Layout]:
    """Greedy split in order: a shard closes when the next tensor would push it past the limit."""
    shards: list[Layout] = [[]]
    splitter = _Splitter(max_shard_size)
    for entry in layout:
        size = nbytes(entry[1], entry[2])
        if splitter.opens_shard(size):
            shards.append([])
            splitter.reset()
        splitter.add(size)
        shards[-1].append(entry)
    return shards


def index_json(shards: list[Layout], names: list[str], metadata: Mapping[str, str]) -> str:
    """``model.safetensors.index.json`` text of shards ``names`` (``metadata`` as from ``file_metadata``)."""
    weight_map = {name: file for shard, file in zip(shards, names) for name, _, _ in shard}
    total = sum(nbytes(dtype, shape) for shard in shards for _, dtype, shape in shard)
    return json.dumps({"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}, indent=2) + "\n"


def _has_layout(path: Path, header: bytes, end: int) -> bool:
    """Whether ``path`` starts with ``header`` and is ``end`` bytes long (a shard of this very plan)."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size == end and f.read(len(header)) == header


def _reusable(folder: Path, paths: list[Path], headers: list[bytes], ends: list[int]) -> dict[str, str]:
    """The shards of an interrupted run that the done log vouches for and that have this plan's
    header and size (name -> digest); everything else in ``folder`` is removed."""
    done = verified_done(folder)
    kept = {p.name: done[p.name] for p, h, end in zip(paths, headers, ends) if p.name in done and _has_layout(p, h, end)}
    keep_only(folder, kept)
    return kept


def _reserve(fd: int, path: Path, size: int) -> bool:
    """Allocate ``size`` bytes of ``path`` on disk; False where the file system cannot (the shard is
    then written with ``pwrite`` only: a mapped write into a hole could SIGBUS on a full disk)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return False
        raise MergescopeError(f"{path}: cannot reserve {size} bytes for this shard ({e.strerror or e})") from None
    return True


def map_tensor(fd: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...], shared: bool = False
               ) -> tuple[torch.Tensor, mmap.mmap]:
    """A tensor viewing bytes ``[offset, offset + nbytes)`` of ``fd`` through a page-aligned map of just
    that range, and the map (it lives while a view does). ``shared``: writes reach the file (output
    slots); else a private copy-on-write map (inputs: read in place from the page cache)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    size = offset + nbytes(dtype, shape) - start
    mapped = (mmap.mmap(fd, size, flags=mmap.MAP_SHARED, offset=start) if shared
              else mmap.mmap(fd, size, offset=start, access=mmap.ACCESS_COPY))
    return torch.frombuffer(mapped, dtype=dtype, count=math.prod(shape), offset=offset - start).view(shape), mapped


class Slot:
    """One planned tensor's bytes in its shard file, as a writable contiguous tensor (a shared map of
    exactly that range, page-aligned). ``done`` marks it written; ``close`` lets the map go (always call it).

    The map is never closed explicitly: ``mmap.close`` succeeds under a live torch view (torch holds a
    reference to the map, not a buffer export), and a view kept anywhere (a traceback's frame) would
    then read freed memory. Dropping the references unmaps it at once when no view is left, else
    when the last view goes. While open, the map is tracked by merge/pages.py: the kernels give back
    the pages they have written (they stay in the page cache, dirty, and reach the file as before).
    """

    def __init__(self, writer: PlannedWriter, name: str, tensor: torch.Tensor, mapped: mmap.mmap | None):
        self.writer, self.name, self.tensor, self._map = writer, name, tensor, mapped
        if mapped is not None:
            pages.track(mapped)

    def done(self) -> int:
        """Record the tensor as written (as ``PlannedWriter.write`` does); returns its byte count."""
        if self.writer._logged:  # windowed: each window's pages given back once hashed, as the kernels do
            flat = self.tensor.reshape(-1)
            self.writer._hash_part(self.name, (tensor_bytes(flat[a:b]) for a, b in pages.windows(flat.numel(),
                                                                                                  pages.WINDOW, flat)))
        self.close()
        return self.writer._written_slot(self.name)

    def close(self) -> None:
        if self._map is not None:
            pages.forget(self._map)
        self.tensor, self._map = None, None


DIRECT_ALIGN = 4096  # an O_DIRECT write's file offset, length and memory address: a page (every file system takes it)
DIRECT_MIN = 1 << 20  # smaller tensors go through the page cache whole (an O_DIRECT write waits for the device)


def direct_span(address: int, offset: int, size: int) -> tuple[int, int] | None:
    """(first, last): the bytes ``[first, last)`` of a tensor at memory ``address`` bound for file ``offset``
    that fill whole pages of the file, when there are at least DIRECT_MIN of them and the memory lines up with
    the file (address = offset modulo a page: the engine allocates results so); else None."""
    if (address - offset) % DIRECT_ALIGN:
        return None
    first = -offset % DIRECT_ALIGN
    last = size - (offset + size) % DIRECT_ALIGN
    return (first, last) if last - first >= DIRECT_MIN else None


def _open_direct(path: Path) -> int | None:
    """A second, O_DIRECT descriptor of ``path``, or None where the file system refuses it (tmpfs: EINVAL)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class PlannedWriter:
    """Write tensors of a known layout into ``folder`` (HF shards + index) or one ``file``."""

    def __init__(self, target: str | os.PathLike, layout: Layout, max_shard_size: int, metadata: Mapping[str, str] | None,
                 single_file: bool = False, resume: bool = False, log_done: bool = True,
                 on_shard: Callable[[int, int, Callable[[], None] | None], None] | None = None,
                 mapped: bool = True, direct: bool = False):
        """``resume`` reuses the shards of an interrupted run into the same folder that the done log
        vouches for (by digest) and that start with this plan's header; everything else is removed.
        ``log_done=False`` skips the done log (and its hashing) for a writer that never resumes.
        ``on_shard(shard index, fd, log)`` is called (from the writing thread) once a shard's last
        tensor is written; ``log`` (None when the shard is not logged) hashes it into the done log and
        is the caller's to run, after the shard is durable (the merge engine: on its fsync thread);
        ``fd`` stays open until ``close``. Without ``on_shard`` the writer logs the shard itself.
        ``mapped=False`` reserves nothing and offers no slots (every tensor goes through ``write``).
        ``direct``: ``write`` sends the whole pages of a tensor past the page cache (O_DIRECT, see
        :func:`direct_span`) where the file system takes it; the partial pages at its ends go as before.
        """
        target = Path(target)
        meta = file_metadata(metadata)
        shards = [layout] if single_file else split_shards(layout, max_shard_size)
        n = len(shards)
        paths = [target] if single_file else [target / name for name in shard_names(n)]
        headers = [build_header(shard, meta) for shard in shards]
        ends = [len(h) + sum(nbytes(dtype, shape) for _, dtype, shape in shard) for h, shard in zip(headers, shards)]
        self._log_folder = None if single_file or not log_done else target
        self._parts: dict[str, bytes] = {}  # part_hash of each tensor written (logged writers only)
        self._shards = [[name for name, _, _ in shard] for shard in shards]
        self._header_parts = [part_hash((h,)) for h in headers] if self._log_folder is not None else []
        self._on_shard = on_shard
        kept = _reusable(target, paths, headers, ends) if resume and not single_file else {}
        self._slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...], int]] = {}
        self._fds: list[int] = []
        self._direct: dict[int, int] = {}  # buffered fd -> its O_DIRECT twin (while the twin takes writes)
        self._twins: list[int] = []  # every O_DIRECT descriptor opened: closed with the others
        self.direct_bytes = 0  # bytes written past the page cache (tests, benchmarks)
        self._reserved: set[int] = set()
        self._written: set[str] = set()
        self._remaining: list[int] = []
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()
        self.paths = paths
        self.reused: set[str] = set()
        self.total_size = 0
        for i, (path, shard, header) in enumerate(zip(paths, shards, headers)):
            names = [name for name, _, _ in shard]
            self.total_size += ends[i] - len(header)
            self._remaining.append(len(shard))
            if path.name in kept:
                self.reused.update(names)
                self._written.update(names)
                self._remaining[i] = 0
                continue
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            if direct:
                twin = _open_direct(path)
                if twin is not None:
                    self._direct[fd] = twin
                    self._twins.append(twin)
            os.pwrite(fd, header, 0)
            if mapped and ends[i] > len(header) and _reserve(fd, path, ends[i]):
                self._reserved.add(i)
            offset = len(header)
            for name, dtype, shape in shard:
                self._slots[name] = (fd, offset, dtype, tuple(shape), i)
                offset += nbytes(dtype, shape)
            os.ftruncate(fd, offset)
        self._index = None
        if n > 1:
            self._index = index_json(shards, [p.name for p in paths], meta)
            self._index_path = target / SAFE_INDEX

    @property
    def writes_direct(self) -> bool:
        """Whether any shard takes O_DIRECT writes (then results lined up with the file skip the page cache)."""
        return bool(self._direct)

    def extent(self, name: str) -> tuple[int, int, int]:
        """(file descriptor, offset, bytes) of ``name``'s bytes in its shard (valid until ``close``)."""
        fd, offset, dtype, shape, _ = self._slots[name]
        return fd, offset, nbytes(dtype, shape)

    def slot(self, name: str) -> Slot | None:
        """A writable tensor over ``name``'s bytes in its shard, or None where its shard is not
        reserved on disk (``write`` it instead)."""
        fd, offset, dtype, shape, shard = self._slots[name]
        if shard not in self._reserved:
            return None
        if name in self._written:
            raise MergescopeError(f"tensor {name!r}: written twice")
        size = nbytes(dtype, shape)
        if size == 0:
            return Slot(self, name, torch.empty(shape, dtype=dtype), None)
        try:
            tensor, mapped = map_tensor(fd, offset, dtype, shape, shared=True)
        except OSError as e:  # ENOMEM (address space, map count limit), ...: one line, as for an input's map
            raise MergescopeError(f"{self.paths[shard]}: tensor {short_repr(name)}: cannot map its output slot "
                                  f"({e.strerror or e})") from None
        return Slot(self, name, tensor, mapped)

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Store one tensor at its planned place; returns the bytes written."""
        fd, offset, dtype, shape, shard = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise MergescopeError(f"tensor {name!r}: merged to {tensor.dtype} {list(tensor.shape)}, "
                                  f"planned {dtype} {list(shape)}")
        self._claim(name)
        tensor = tensor.detach().contiguous()
        data = tensor_bytes(tensor).cast("B")
        self._hash_part(name, (data,))
        twin = self._direct.get(fd)
        span = None if twin is None else direct_span(tensor.data_ptr(), offset, len(data))
        if span is None:
            _pwrite_all(fd, data, offset)
        else:  # the partial pages at the ends through the page cache, the whole pages between past it
            first, last = span
            _pwrite_all(fd, data[:first], offset)
            self._write_direct(twin, fd, data[first:last], offset + first)
            _pwrite_all(fd, data[last:], offset + last)
        self._landed(shard, fd)
        return len(data)

    def _write_direct(self, twin: int, fd: int, data: memoryview, offset: int) -> None:
        """Whole pages through the O_DIRECT descriptor; what it refuses (EINVAL: an alignment this file
        system wants larger than a page) goes through the page cache, and so do this shard's later writes."""
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(twin, data[done:], offset + done)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            with self._lock:
                self._direct.pop(fd, None)
            _pwrite_all(fd, data[done:], offset + done)
        with self._lock:
            self.direct_bytes += done

    @property
    def _logged(self) -> bool:
        return self._log_folder is not None

    def _hash_part(self, name: str, chunks) -> None:
        """Hash a tensor's bytes (buffers in order) for its shard's done-log digest, while they are in memory;
        nothing for a writer that keeps no log."""
        if self._logged:
            self._parts[name] = part_hash(chunks)

    def _written_slot(self, name: str) -> int:
        fd, _, dtype, shape, shard = self._slots[name]
        self._claim(name)
        self._landed(shard, fd)
        return nbytes(dtype, shape)

    def _claim(self, name: str) -> None:
        with self._lock:
            if name in self._written:
                raise MergescopeError(f"tensor {name!r}: written twice")
            self._written.add(name)

    def _landed(self, shard: int, fd: int) -> None:
        """One tensor of ``shard`` is in place: when it was the shard's last, log it and tell ``on_shard``."""
        with self._lock:
            self._remaining[shard] -= 1
            finished = self._remaining[shard] == 0
            last = not any(self._remaining)
        if not finished:
            return
        # The last shard to finish is not logged: the run completes right after it, and a run
        # killed in between only redoes that shard.
        log = None
        if not last and self._log_folder is not None:
            log = functools.partial(self._log_done, shard)
        if self._on_shard is not None:
            self._on_shard(shard, fd, log)
        elif log is not None:
            log()

    def _log_done(self, shard: int) -> None:
        """Record a complete shard (and its digest, from its parts' hashes) so an interrupted run can be resumed
        from it: the parts are its header and its non-empty tensors, back to back in layout order."""
        parts = [(0, self._header_parts[shard])]
        for name in self._shards[shard]:
            _, offset, dtype, shape, _ = self._slots[name]
            if nbytes(dtype, shape):
                parts.append((offset, self._parts[name]))
        with self._log_lock:
            record_done(self._log_folder, self.paths[shard], parts_digest(parts))

    def close(self) -> list[Path]:
        """Check every tensor was written, close the files, write the index when sharded."""
        missing = [n for n in self._slots if n not in self._written]
        self._close_files()
        if missing:
            raise MergescopeError(f"tensor {missing[0]!r}: never written ({len(missing)} missing)")
        if self._index is not None:
            self._index_path.write_text(self._index)
        return list(self.paths)

    def abort(self) -> None:
        self._close_files()

    def _close_files(self) -> None:
        for fd in [*self._twins, *self._fds]:
            os.close(fd)
        self._fds, self._twins, self._direct = [], [], {}


def _checked(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise MergescopeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPE_NAMES:
        raise MergescopeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
    return t


def write_state(target: str | os.PathLike, state: Mapping[str, torch.Tensor], max_shard_size: int | str = "2GB",
                metadata: Mapping[str, str] | None = None, single_file: bool = False) -> list[Path]:
    """Stream ``state`` into ``target`` (a folder of HF shards + index, or one file) through ``PlannedWriter``.

    The layout is read from the tensors' dtypes and shapes first; then each tensor is fetched again,
    moved to the CPU if needed and written at its offset, so memory holds one tensor (not a shard).
    No done log: a ``save`` is not resumed.
    """
    layout = []
    for name in state:
        t = _checked(name, state[name])
        layout.append((name, t.dtype, tuple(t.shape)))
        del t
    limit = 0 if single_file else parse_size(max_shard_size)  # a single file ignores the limit
    writer = PlannedWriter(target, layout, limit, metadata, single_file=single_file, log_done=False, mapped=False)
    try:
        for name in state:
            writer.write(name, _checked(name, state[name]).detach().to("cpu"))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class ShardedWriter:
    """Write tensors given one at a time (layout not known up front) as HF shards + index in ``folder``.

    Holds at most one shard: when the next tensor would overflow it, the shard is written through a
    ``PlannedWriter`` under a temporary name; ``close`` gives the shards their final names. Same
    split, names, index and bytes as ``write_state`` of the same tensors.
    """

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = "2GB", metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = file_metadata(metadata)
        self._given = dict(metadata or {})
        self._splitter = _Splitter(self.max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._shards: list[Layout] = []
        self._names: set[str] = set()
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise MergescopeError(f"tensor {name!r}: written twice")
        _checked(name, tensor)
        size = nbytes(tensor.dtype, tuple(tensor.shape))
        if self._splitter.opens_shard(size):
            self.flush()
        self._splitter.add(size)
        self._names.add(name)
        self._pending[name] = tensor
        self.total_size += size

    def flush(self) -> None:
        """Write the pending tensors as the next shard (under a temporary name until ``close``)."""
        if not self._pending:
            return
        layout = [(name, t.dtype, tuple(t.shape)) for name, t in self._pending.items()]
        write_state(self.folder / f".shard-{len(self._shards)}.tmp", self._pending, metadata=self._given, single_file=True)
        self._shards.append(layout)
        self._pending = {}
        self._splitter.reset()

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names, write the index if sharded."""
        self.flush()
        if not self._shards:
            return write_state(self.folder / SAFE_SINGLE, {}, metadata=self._given, single_file=True)
        names = shard_names(len(self._shards))
        for i, final in enumerate(names):
            os.replace(self.folder / f".shard-{i}.tmp", self.folder / final)
        if len(names) > 1:
            (self.folder / SAFE_INDEX).write_text(index_json(self._shards, names, self.metadata))
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
            raise MergescopeError(f"{item}: symlink points outside the model folder (or cannot be resolved); not copied")
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
