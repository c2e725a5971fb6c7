"""Small checkpoints travel through Ray's object store: read once on the driver, ``ray.put`` once.

By path, every task reads its checkpoints from disk: in a barrier matrix over N checkpoints each
file is read N-1 times, on whichever node runs the pair, and every node needs the file at the same
path. A checkpoint whose tensors total at most ``share_below`` bytes is instead read once on the
driver and put into the object store once; tasks receive its ObjectRef as a top-level argument,
so Ray resolves it before the task starts (fetched once per node into its shared-memory store,
each worker unpickles its own copy) and the worker never opens the file. Larger checkpoints still
go by path: the object store keeps every shared state for the whole sweep, so only small ones are
worth a permanent copy there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MergescopeError

if TYPE_CHECKING:
    import torch

DEFAULT_SHARE_BELOW = "64MB"


class SharedCheckpoint(Mapping):
    """A checkpoint read into memory: tensors plus metadata, picklable, so it can be ``ray.put``.

    It answers what tasks ask of a loaded checkpoint (``[name]``, iteration, ``.metadata``, ``.path``)."""

    def __init__(self, path: str, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]):
        self.path = path
        self.metadata = dict(metadata)
        self.tensors = dict(tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"SharedCheckpoint({self.path!r}, {len(self)} tensors)"


def resolve(root: str | os.PathLike, ref: str) -> Path:
    """A checkpoint as written in the sweep, resolved against the sweep file's folder."""
    p = Path(ref)
    return p if p.is_absolute() else Path(root) / p


def same_file_key(root: str | os.PathLike, ref: str) -> Path:
    """One key per file however the sweep spells it ("a.safetensors", "./a.safetensors", a symlink)."""
    return resolve(root, ref).resolve()


def parse_threshold(size: int | str) -> int:
    """'64MB' -> 64e6 bytes (decimal, like --max-shard-size), '1GiB' -> 2**30; 0 shares nothing."""
    from ..io.writer import parse_size

    if str(size).strip() == "0":
        return 0
    try:
        return parse_size(size)
    except MergescopeError:
        raise MergescopeError(f"--share-below {size!r}: expected a byte count like 64MB or 1GiB, or 0") from None


def state_nbytes(ckpt) -> int:
    """Bytes of all tensors, from the headers (nothing is read)."""
    return sum(ckpt.info(name).nbytes for name in ckpt)


def distinct_checkpoints(specs: Iterable) -> list[Path]:
    """Every file the specs read, each once (``same_file_key``), in order of first use."""
    seen: dict[Path, None] = {}
    for spec in specs:
        for ref in spec.checkpoints:
            seen.setdefault(same_file_key(spec.root, ref), None)
    return list(seen)


def small_states(specs: Iterable, share_below: int) -> Iterator[tuple[Path, SharedCheckpoint]]:
    """(path, in-memory checkpoint) for each distinct checkpoint of at most ``share_below`` bytes;
    each is read once, lazily, so the caller can put it before the next is read."""
    from ..io import load

    if share_below <= 0:
        return
    for path in distinct_checkpoints(specs):
        ckpt = load(path)
        if state_nbytes(ckpt) <= share_below:
            yield path, SharedCheckpoint(str(path), ckpt.metadata, {name: ckpt.read(name) for name in ckpt})
