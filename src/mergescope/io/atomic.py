"""Atomic outputs: write under a temporary name beside the target, rename into place when done.

The temporary name is fixed (``.NAME.partial``) so a crashed run's leftovers are found and
cleaned by the next run; an advisory lock on ``.NAME.lock`` makes concurrent runs on the same
output fail fast instead of mixing shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import MergescopeError


def check_output_path(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse outputs that would overwrite or live inside an input (or contain one)."""
    target = out.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if target == src or target.is_relative_to(src) or (src.is_relative_to(target) and force):
            raise MergescopeError(f"{out}: output path is or overlaps input {inp}; choose another output")
        if src.is_relative_to(target):
            raise MergescopeError(f"{out}: output path contains input {inp}; choose another output")
    if (out.exists() or out.is_symlink()) and not force:
        raise MergescopeError(f"{out}: already exists; pass --force (force=True) to replace it")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, inputs: Iterable[Path] = (), force: bool = False, is_dir: bool = True,
                  resume: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write into; it replaces ``out`` only if the block succeeds."""
    out = Path(out)
    check_output_path(out, inputs, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    lock_path = out.with_name(f".{out.name}.lock")
    try:
        lock = open(lock_path, "a+")
    except OSError as e:
        raise MergescopeError(f"{out}: cannot write beside the output ({e.strerror or e})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MergescopeError(f"{out}: another mergescope run is writing this output") from None
        try:
            if not resume:
                _remove(partial)
            if is_dir:
                partial.mkdir(exist_ok=True)
            yield partial
            old = out.with_name(f".{out.name}.old")
            _remove(old)
            if out.is_dir() and not out.is_symlink():
                os.replace(out, old)  # a folder cannot be replaced in one rename
            os.replace(partial, out)
            _remove(old)
        except BaseException:
            with contextlib.suppress(OSError):
                _remove(partial)
            raise
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()
