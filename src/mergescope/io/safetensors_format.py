"""The safetensors file format: strict header parsing, lazy memory-mapped reads, writing.

Checkpoints come from strangers, so the header is validated before anything is trusted:
its length, JSON (depth and integer size bounded), dtypes, shapes (bounded dims, element counts
that fit in int64) vs byte ranges, ranges inside the file, no overlaps, no duplicate names. Only
regular files are opened (a FIFO never blocks), and the file's size is checked again before a
tensor is mapped, so an input truncated after its header was read is an error, not a SIGBUS.
Every violation is a one-line ``MergescopeError`` naming file and tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergescopeError
from .untrusted import open_regular, parse_json, short_repr  # noqa: F401  (short_repr re-exported)

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 64  # real tensors have at most a handful
MAX_ELEMENTS = 2**63 - 1  # int64: torch's sizes, strides and element counts

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file (offsets relative to the data section)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _no_duplicate_keys(path: Path):
    def hook(pairs):
        seen = dict(pairs)
        if len(seen) != len(pairs):
            keys: set[str] = set()
            for key, _ in pairs:
                if key in keys:
                    raise MergescopeError(f"{path}: header names tensor {short_repr(key)} twice")
                keys.add(key)
        return seen

    return hook


class _Where:
    """``FILE: tensor 'NAME'`` for an error message, formatted only when one is raised."""

    __slots__ = ("path", "name")

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def __format__(self, spec: str) -> str:
        return f"{self.path}: tensor {short_repr(self.name)}"


def _parse_entry(path: Path, name: str, entry, data_size: int) -> TensorInfo:
    where = _Where(path, name)
    if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
        raise MergescopeError(f"{where}: header entry must hold only dtype, shape, data_offsets")
    dtype_name = entry.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:  # a list or dict is unhashable
        raise MergescopeError(f"{where}: unknown dtype {short_repr(dtype_name)} (known: {', '.join(DTYPES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise MergescopeError(f"{where}: shape must be a list of non-negative integers, got {short_repr(shape)}")
    if len(shape) > MAX_DIMS:
        raise MergescopeError(f"{where}: shape has {len(shape)} dimensions, more than the {MAX_DIMS} allowed")
    # Every dim, the element count and the strides must fit in int64, even when another dim is 0
    # (torch.empty((0, 10**30)) raises): the product of the dims with zeros counted as 1 bounds them all.
    span = 1
    for d in shape:
        span *= max(d, 1)
        if span > MAX_ELEMENTS:
            raise MergescopeError(f"{where}: shape {short_repr(shape)} is too large (more than 2**63 - 1 elements "
                                  "or a dimension over int64)")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise MergescopeError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end, "
                              f"got {short_repr(offsets)}")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise MergescopeError(
            f"{where}: shape {short_repr(shape)} of {dtype_name} needs {expected} bytes but data_offsets span "
            f"{short_repr(offsets[1] - offsets[0])}"
        )
    if offsets[1] > data_size:
        raise MergescopeError(f"{where}: data_offsets end {short_repr(offsets[1])} lies past the end of the data "
                              f"({data_size} bytes; truncated file?)")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (data_start, tensors, metadata)."""
    path = Path(path)
    fd = open_regular(path, "checkpoint")  # a FIFO or device is refused without blocking
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, 8, 0)
        if len(prefix) < 8:
            raise MergescopeError(f"{path}: not a safetensors file (only {size} bytes, header length missing)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise MergescopeError(f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap")
        if 8 + header_len > size:
            raise MergescopeError(f"{path}: header length {header_len} runs past the end of the file ({size} bytes; truncated?)")
        raw = _pread_exactly(fd, header_len, 8)
        if len(raw) < header_len:
            raise MergescopeError(f"{path}: file shrank while its header was read (truncated?)")
    except OSError as e:
        raise MergescopeError(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergescopeError(f"{path}: header is not valid JSON ({e})") from None
    del raw  # a header may be 100 MB: keep at most one copy of it alive at a time
    header = parse_json(text, str(path), "header", object_pairs_hook=_no_duplicate_keys(path))
    del text
    if not isinstance(header, dict):
        raise MergescopeError(f"{path}: header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise MergescopeError(f"{path}: __metadata__ must map strings to strings")
    data_size = size - 8 - header_len
    tensors = {}
    for name in list(header):
        entry, header[name] = header[name], None  # free each parsed entry once validated
        tensors[name] = _parse_entry(path, name, entry, data_size)
    _check_no_overlap(path, tensors)
    return 8 + header_len, tensors, metadata


def _pread_exactly(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer only at end of file: pread may return short reads)."""
    parts, got = [], 0
    while got < n:
        chunk = os.pread(fd, min(n - got, 1 << 24), offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    ranges = sorted((info.start, info.end, name) for name, info in tensors.items() if info.nbytes)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(ranges, ranges[1:]):
        if start_b < end_a:
            raise MergescopeError(f"{path}: tensors {name_a!r} and {name_b!r} overlap in the data section")


class SafetensorsFile:
    """A lazily read safetensors file: the header is parsed on open, tensors on access.

    ``get`` returns a zero-copy view of a private (copy-on-write) memory map: the file is never
    modified. ``read`` copies the bytes with ``pread`` instead, so resident memory stays bounded
    by what the caller keeps (the merge engine's choice).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.data_start, self.tensors, self.metadata = read_header(self.path)
        self._mmap: mmap.mmap | None = None
        self._mapped_inode: tuple[int, int] | None = None

    def keys(self):
        return self.tensors.keys()

    def _map(self, name: str) -> mmap.mmap:
        if self._mmap is None:
            fd = open_regular(self.path, "checkpoint")
            try:
                st = os.fstat(fd)
                self._check_size(name, st.st_size)
                self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                self._mapped_inode = (st.st_dev, st.st_ino)
            except OSError as e:
                raise MergescopeError(f"{self.path}: cannot map ({e.strerror or e})") from None
            finally:
                os.close(fd)
        else:
            # Touching a mapped page past the end of a file truncated since it was mapped is a
            # SIGBUS: look at the file's size again (the map stays valid if it was replaced instead).
            try:
                st = os.stat(self.path)
            except OSError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self._mapped_inode:
                self._check_size(name, st.st_size)
        return self._mmap

    def _check_size(self, name: str, size: int) -> None:
        end = self.data_start + self.tensors[name].end
        if size < end:
            raise MergescopeError(f"{self.path}: tensor {short_repr(name)}: the file is now {size} bytes but the tensor "
                                  f"ends at byte {end} (truncated while being read?)")

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        mapped = self._map(name)
        if len(mapped) < self.data_start + info.end:
            self._check_size(name, len(mapped))
        flat = torch.frombuffer(mapped, dtype=info.dtype, count=info.numel, offset=self.data_start + info.start)
        return flat.view(info.shape)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            buf = out.view(-1).view(torch.uint8).numpy()
            fd = open_regular(self.path, "checkpoint")
            try:
                got, view = 0, memoryview(buf).cast("B")
                while got < info.nbytes:  # pread may return short counts before the end of the file
                    n = os.preadv(fd, [view[got:]], self.data_start + info.start + got)
                    if n == 0:
                        break
                    got += n
            except OSError as e:
                raise MergescopeError(f"{self.path}: tensor {short_repr(name)}: cannot read ({e.strerror or e})") from None
            finally:
                os.close(fd)
            if got != info.nbytes:
                raise MergescopeError(f"{self.path}: tensor {short_repr(name)}: file shorter than its header says "
                                      "(truncated while being read?)")
        return out

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # tensors still view the map; it closes when they are freed
                pass
            self._mmap = None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor, without a copy when it is already contiguous."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def build_header(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """Header bytes for tensors laid out back to back in the given order (8-byte padded)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in layout:
        if dtype not in DTYPE_NAMES:
            raise MergescopeError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file; returns bytes of tensor data written."""
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    total = 0
    with open(path, "wb") as f:
        f.write(build_header(layout, metadata))
        for t in tensors.values():
            data = tensor_bytes(t)
            f.write(data)
            total += data.nbytes
    return total
