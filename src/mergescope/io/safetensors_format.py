"""The safetensors file format: strict header parsing, lazy memory-mapped reads, writing.

Checkpoints come from strangers, so the header is validated before anything is trusted:
its length, JSON, dtypes, shapes vs byte ranges, ranges inside the file, no overlaps, no
duplicate names. Every violation is a one-line ``MergescopeError`` naming file and tensor.
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

MAX_HEADER_BYTES = 100 * 1024 * 1024

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


@dataclass(frozen=True)
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
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise MergescopeError(f"{path}: header names tensor {key!r} twice")
            seen[key] = value
        return seen

    return hook


def _parse_entry(path: Path, name: str, entry, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"}:
        raise MergescopeError(f"{where}: header entry must hold only dtype, shape, data_offsets")
    dtype_name = entry.get("dtype")
    if dtype_name not in DTYPES:
        raise MergescopeError(f"{where}: unknown dtype {dtype_name!r} (known: {', '.join(DTYPES)})")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise MergescopeError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise MergescopeError(f"{where}: data_offsets must be [start, end] with 0 <= start <= end, got {offsets!r}")
    dtype = DTYPES[dtype_name]
    expected = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != expected:
        raise MergescopeError(
            f"{where}: shape {shape} of {dtype_name} needs {expected} bytes but data_offsets span {offsets[1] - offsets[0]}"
        )
    if offsets[1] > data_size:
        raise MergescopeError(f"{where}: data_offsets end {offsets[1]} lies past the end of the data ({data_size} bytes; truncated file?)")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def read_header(path: str | os.PathLike) -> tuple[int, dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header. Returns (data_start, tensors, metadata)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise MergescopeError(f"{path}: not a safetensors file (only {size} bytes, header length missing)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise MergescopeError(f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap")
            if 8 + header_len > size:
                raise MergescopeError(f"{path}: header length {header_len} runs past the end of the file ({size} bytes; truncated?)")
            raw = f.read(header_len)
    except OSError as e:
        raise MergescopeError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergescopeError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise MergescopeError(f"{path}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise MergescopeError(f"{path}: __metadata__ must map strings to strings")
    data_size = size - 8 - header_len
    tensors = {name: _parse_entry(path, name, entry, data_size) for name, entry in header.items()}
    _check_no_overlap(path, tensors)
    return 8 + header_len, tensors, metadata


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

    def keys(self):
        return self.tensors.keys()

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mmap

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._map(), dtype=info.dtype, count=info.numel, offset=self.data_start + info.start)
        return flat.view(info.shape)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            buf = out.view(-1).view(torch.uint8).numpy()
            with open(self.path, "rb", buffering=0) as f:
                got = os.preadv(f.fileno(), [buf], self.data_start + info.start)
            if got != info.nbytes:
                raise MergescopeError(f"{self.path}: tensor {name!r}: file shorter than its header says")
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
