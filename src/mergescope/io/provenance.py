"""Provenance metadata for written checkpoints: tool version, recipe and input fingerprints, seed.

Deliberately free of timestamps and host paths, so the same inputs and seed give bit-identical
files. Inputs are fingerprinted by their headers (names, dtypes, shapes, offsets) and sizes,
which is cheap for huge checkpoints and changes whenever the tensors' layout does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .._version import __version__
from .untrusted import open_regular


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(path: str | os.PathLike) -> str:
    """sha256 over each tensor file's header bytes and size (sorted by relative name)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        if f.suffix not in (".safetensors", ".json", ".bin", ".pt", ".pth"):
            continue
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        fd = open_regular(f, "input")  # never blocks on a FIFO swapped in after the listing
        try:
            h.update(os.pread(fd, 1 << 20, 0))
        finally:
            os.close(fd)
    return h.hexdigest()


def provenance(inputs: list[str | os.PathLike] = (), recipe_text: str | None = None, seed: int | None = None,
               **extra: object) -> dict[str, str]:
    """String-to-string metadata for a safetensors header."""
    meta = {"mergescope_version": __version__}
    if recipe_text is not None:
        meta["recipe_sha256"] = sha256_bytes(recipe_text.encode())
    if inputs:
        meta["inputs"] = json.dumps([{"name": Path(p).name, "fingerprint": fingerprint(p)} for p in inputs])
    if seed is not None:
        meta["seed"] = str(seed)
    for key, value in extra.items():
        meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return meta
