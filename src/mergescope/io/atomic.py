"""Atomic outputs: write under a temporary name beside the target, rename into place when done.

The temporary name is fixed (``.NAME.partial``) so a crashed run's leftovers are found by the
next run, which removes them or, with ``resume``, keeps the files a done log vouches for. An
advisory lock on ``.NAME.lock`` makes concurrent runs on the same output fail fast instead of
mixing shards. OS errors while writing (disk full, read-only or forbidden folder) become one-line
``MergescopeError``s after the partial output is removed.

Resume log: a writer calls ``record_done(folder, file)`` when a file of the partial folder is
complete; the log line holds the file's digest (``xxh3_128:HEX``; a safetensors shard the planned writer
logs: ``xxh3_128-parts:HEX``, see :func:`parts_digest`; logs of earlier versions hold a ``sha256``, still
honoured). ``verified_done(folder)`` returns only the files whose bytes still hash
to the logged value, so a torn write, a lost page after a power cut or a file changed by hand is
rewritten rather than trusted (no fsync needed for correctness). The digest guards against accidents,
not an adversary (one who can write the partial folder can write its log too), so it is XXH3-128:
~12x sha256's speed here, where hashing every finished shard competed with the merge for the CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import xxhash

from ..errors import MergescopeError

DONE_LOG = ".done.jsonl"


# Beside an output go ``.NAME.partial``, ``.NAME.lock`` and ``.NAME.old``: NAME must leave room.
MAX_NAME_BYTES = 255 - len("..partial")


def check_name(out: Path) -> None:
    """Refuse an output whose name (or temporary sibling's name) the file system cannot hold."""
    if not out.name or out.name in (".", ".."):
        raise MergescopeError(f"{out}: not a file or folder name")
    size = len(os.fsencode(out.name))
    if size > MAX_NAME_BYTES:
        raise MergescopeError(f"{str(out)[:80]}...: output name is {size} bytes, at most {MAX_NAME_BYTES} are allowed")


def _check_folder_name(folder: Path) -> None:
    """A results folder is created in place (its files are written atomically), so only the file
    system's own limit applies; ``.`` and ``..`` are fine."""
    name = folder.resolve().name
    if len(os.fsencode(name)) > 255:
        raise MergescopeError(f"{str(folder)[:80]}...: folder name is {len(os.fsencode(name))} bytes, over 255")


def _overlap(out: Path, inputs: Iterable[Path]) -> Path | None:
    """The input that ``out`` is or lies inside (symlinks resolved), if any."""
    target = out.resolve()
    for inp in inputs:
        src = Path(inp).resolve()
        if target == src or target.is_relative_to(src):
            return Path(inp)
    return None


def check_output_path(out: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse outputs that would overwrite or live inside an input (or contain one)."""
    out = Path(out)
    check_name(out)
    inputs = list(inputs)
    target = out.resolve()
    hit = _overlap(out, inputs)
    if hit is not None:
        raise MergescopeError(f"{out}: output path is or overlaps input {hit}; choose another output")
    for inp in inputs:
        if Path(inp).resolve().is_relative_to(target):
            raise MergescopeError(f"{out}: output path contains input {inp}; choose another output")
    if (out.exists() or out.is_symlink()) and not force:
        raise MergescopeError(f"{out}: already exists; pass --force (force=True) to replace it")


def check_side_outputs(inputs: Iterable[Path], files: Iterable[Path | None] = (),
                       folders: Iterable[tuple[Path, Iterable[str]] | None] = (),
                       main: Path | None = None) -> None:
    """The one guard for every option that writes a file or a folder of results.

    ``files`` are written whole (JSON, PNG, a spec, a table); ``folders`` are (folder, names of
    the files written into it). Refused: a file or folder that is, or lies inside, an input
    (symlinks resolved, so a link to a checkpoint counts), a file path that is a folder, a folder
    path that is a file, a name too long, and two outputs on the same path (``main``, the command's
    checkpoint output, checked by ``check_output_path``, counts too). Run before any work.
    """
    inputs = [Path(p) for p in inputs if p is not None]
    written: dict[Path, Path] = {} if main is None else {Path(main).resolve(): Path(main)}
    for folder, names in (f for f in folders if f is not None):
        folder = Path(folder)
        _check_folder_name(folder)
        if folder.exists() and not folder.is_dir():
            raise MergescopeError(f"{folder}: exists and is not a folder; choose another output folder")
        hit = _overlap(folder, inputs)
        if hit is not None:
            raise MergescopeError(f"{folder}: output folder is or lies inside input {hit}; choose another")
        files = [*files, *(folder / name for name in names)]
    for path in (Path(f) for f in files if f is not None):
        check_name(path)
        hit = _overlap(path, inputs)
        if hit is not None:
            raise MergescopeError(f"{path}: would overwrite input {hit}; choose another output")
        if path.is_dir():
            raise MergescopeError(f"{path}: is a folder; give a file name")
        key = path.resolve()
        if key in written:
            raise MergescopeError(f"{path}: given for two outputs ({written[key]} too); choose different paths")
        written[key] = path


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def os_error_message(out: Path, e: OSError) -> str:
    """One line for an OS error met while producing ``out`` (errno text, and the file if known)."""
    where = f" ({e.filename})" if e.filename else ""
    return f"{out}: {e.strerror or e}{where}; no output written, partial files removed"


@contextlib.contextmanager
def _exclusive_lock(out: Path) -> Iterator[None]:
    """Hold ``flock`` on ``.NAME.lock``; re-open when the file was replaced while we waited.

    The holder unlinks the lock file when done, so a lock won on an unlinked inode is stale: the
    path is re-opened until the locked inode is the one the path names.
    """
    lock_path = out.with_name(f".{out.name}.lock")
    while True:
        try:
            lock = open(lock_path, "a+")
        except OSError as e:
            raise MergescopeError(f"{out}: cannot write beside the output ({e.strerror or e})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise MergescopeError(f"{out}: another mergescope run is writing this output") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(lock.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        lock.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        lock.close()


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, inputs: Iterable[Path] = (), force: bool = False, is_dir: bool = True,
                  resume: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write into; it replaces ``out`` only if the block succeeds.

    ``resume`` keeps a folder left by an interrupted run (the writer decides what to reuse via
    ``verified_done``); otherwise it is removed first. On an error the partial output is removed,
    except on Ctrl-C (KeyboardInterrupt), which leaves it for ``resume`` like a kill does.
    """
    out = Path(out)
    check_output_path(out, inputs, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MergescopeError(os_error_message(out, e)) from None
    partial = out.with_name(f".{out.name}.partial")
    with _exclusive_lock(out):
        _finish_interrupted_swap(out, partial)
        if (out.exists() or out.is_symlink()) and not force:  # a concurrent run finished while we checked
            raise MergescopeError(f"{out}: already exists; pass --force (force=True) to replace it")
        try:
            if not (resume and is_dir and partial.is_dir() and not partial.is_symlink()):
                _remove(partial)
            if is_dir:
                partial.mkdir(exist_ok=True)
            yield partial
            if is_dir:
                (partial / DONE_LOG).unlink(missing_ok=True)
            old = out.with_name(f".{out.name}.old")
            _remove(old)
            if out.is_dir() and not out.is_symlink():
                os.replace(out, old)  # a folder cannot be replaced in one rename
            os.replace(partial, out)
            _remove(old)
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            with contextlib.suppress(OSError):
                _remove(partial)
            if isinstance(e, OSError):
                raise MergescopeError(os_error_message(out, e)) from None
            raise


def _finish_interrupted_swap(out: Path, partial: Path) -> None:
    """A run killed between moving the old folder aside and renaming the finished partial into
    place leaves ``.NAME.old`` and a complete ``.NAME.partial`` but no ``NAME``: finish its swap,
    so neither the old nor the new output is lost."""
    old = out.with_name(f".{out.name}.old")
    if old.exists() and not (out.exists() or out.is_symlink()) and partial.is_dir():
        os.replace(partial, out)
        _remove(old)


DIGESTS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}  # the first is what new logs hold
PARTS = "xxh3_128-parts"  # a safetensors file hashed part by part (header, each tensor): see parts_digest
_READ = 1 << 23  # bytes per read while hashing a part


def part_hash(chunks: Iterable) -> bytes:
    """The XXH3-128 of one part's bytes, given as buffers in order, as :func:`parts_digest` takes it."""
    h = xxhash.xxh3_128()
    for chunk in chunks:
        h.update(chunk)
    return h.digest()


def parts_digest(parts: Iterable[tuple[int, bytes]]) -> str:
    """``xxh3_128-parts:HEX``: XXH3-128 over each part's start offset (8 bytes, little-endian) followed by its own
    :func:`part_hash`, parts in file order. Why: a merge hashes each tensor from memory as it is written, in any
    order, and never reads a shard back to log it (the read-back's kernel copy alone was ~0.37 s of CPU per GB
    under perf, and shards written past the page cache came back from the disk while the merge wrote to it)."""
    total = xxhash.xxh3_128()
    for start, digest in parts:
        total.update(struct.pack("<Q", start) + digest)
    return f"{PARTS}:{total.hexdigest()}"


def _safetensors_parts(path: Path) -> list[tuple[int, int]]:
    """A safetensors file cut at its header's end and at every tensor's first and last byte: the [start, stop)
    of each non-empty part, in file order (gaps and trailing bytes are parts too: they are hashed)."""
    # imported here, not at import time: atomic outputs need no torch
    from .safetensors_format import read_header

    data_start, tensors, _ = read_header(path)
    size = path.stat().st_size
    cuts = sorted({0, data_start, size, *(data_start + x for t in tensors.values() for x in (t.start, t.end))})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _file_parts_digest(path: Path) -> str:
    buffer = bytearray(_READ)
    parts = []
    with open(path, "rb") as f:
        for start, stop in _safetensors_parts(path):
            h = xxhash.xxh3_128()
            f.seek(start)
            left = stop - start
            while left:
                got = f.readinto(memoryview(buffer)[:min(left, _READ)])
                if not got:
                    raise OSError(f"{path}: shorter than its header says")
                h.update(memoryview(buffer)[:got])
                left -= got
            parts.append((start, h.digest()))
    return parts_digest(parts)


def file_digest(path: str | os.PathLike, algorithm: str = "xxh3_128") -> str:
    """``ALGORITHM:HEX`` of a file, read through one small reused buffer.

    Not a whole-file map: every mapped page counts in the process's resident set, so hashing a
    1 GB shard that way doubled a merge's peak RSS; reads into a fixed buffer keep it flat.
    """
    if algorithm == PARTS:
        return _file_parts_digest(Path(path))
    with open(path, "rb") as f:
        return f"{algorithm}:{hashlib.file_digest(f, DIGESTS[algorithm]).hexdigest()}"


def record_done(folder: str | os.PathLike, path: str | os.PathLike, digest: str | None = None) -> None:
    """Log ``path`` (a file directly in ``folder``) as complete, with its digest (:func:`file_digest`)."""
    line = json.dumps({"file": Path(path).name, "digest": digest or file_digest(path)}) + "\n"
    with open(Path(folder) / DONE_LOG, "a") as log:
        log.write(line)


def _logged_digest(entry: dict) -> str:
    """``ALGORITHM:HEX`` of a log line: ``digest``, or an earlier version's bare ``sha256``."""
    digest = entry["digest"] if "digest" in entry else entry["sha256"]
    if not isinstance(digest, str):
        raise TypeError("not a digest")
    if "digest" not in entry:
        return f"sha256:{digest}"
    if digest.partition(":")[0] not in (*DIGESTS, PARTS):
        raise ValueError("unknown digest algorithm")
    return digest


def verified_done(folder: str | os.PathLike) -> dict[str, str]:
    """Files logged complete (name -> ``ALGORITHM:HEX``) whose bytes still match the logged hash (torn lines
    ignored)."""
    folder = Path(folder)
    logged: dict[str, str] = {}
    try:
        lines = (folder / DONE_LOG).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            entry = json.loads(line)
            name = entry["file"]
            if isinstance(name, str) and name == Path(name).name:
                logged[name] = _logged_digest(entry)
    return {name: digest for name, digest in logged.items() if (folder / name).is_file()
            and not (folder / name).is_symlink() and _digest_or_none(folder / name, digest) == digest}


def _digest_or_none(path: Path, logged: str) -> str | None:
    """The file's digest by the logged digest's algorithm; None where it cannot be taken (a parts digest of a
    file whose safetensors header no longer parses)."""
    try:
        return file_digest(path, logged.partition(":")[0])
    except (OSError, MergescopeError):
        return None


def keep_only(folder: str | os.PathLike, done: dict[str, str]) -> None:
    """Remove everything in ``folder`` but the files of ``done`` and rewrite the log to list only those."""
    folder = Path(folder)
    for item in list(folder.iterdir()):
        if item.name not in done:
            _remove(item)
    for name in sorted(done):
        record_done(folder, folder / name, done[name])
