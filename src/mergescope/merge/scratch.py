"""Per-thread reusable working buffers for the per-tensor methods (|delta| scores, keep masks, DARE's
uniforms, the selection replay's work arrays).

Why: the merge engine pins glibc's mmap threshold at 1 MB (engine.release_freed_memory), so every
tensor-sized temporary is a fresh mapping whose pages are faulted in and zeroed on first touch: on
the reference VM ~3.2 ms per 12 MB buffer against ~0.6 ms to refill a reused one. A buffer handed out
here is reused by the next request for the same purpose on the same thread and grows to the largest
request. Buffers come from torch's allocator, not numpy's: numpy advises huge pages on big arrays, and
on the reference VM (page cache fragmented) their first touch waited on the kernel's compaction (ties
on 14 tensors: 9.4 s CPU with numpy-allocated buffers, 5.1 s with torch's, 5.9 s with no reuse).

Rules (the caller's side): a buffer is valid until the next request for the same ``purpose`` on this
thread, so it must never be returned to a caller that keeps it (a method's result, ``out``); its
contents on hand-out are undefined. Purposes used together in one call must differ.

Memory bound: each thread holds, per purpose, one array of the largest size it asked for, i.e. at
most the scratch the largest tensor's job already used at its peak (for the task-vector family on n
entries and M models: 4n |delta| bytes (2n in bf16/fp16), M n mask bytes, 8n replay bytes when ties
straddle a cut (6n for bf16/fp16 scores: 16-bit keys),
16 CHUNK for della's block draws; model_stock: one array of n and
one window; slerp: two
arrays of at most 1 M entries), kept between jobs instead of
freed, but after each job the engine lets a worker keep only the buffers of at most a typical job's
size (:func:`trim`): the few largest tensors (embeddings, LM head) get fresh buffers, so two workers
never both hold an embedding-sized arena. The engine's workers are the threads of a per-merge pool,
so their arenas go when the merge ends; :func:`release` frees the calling thread's at any time.

Parking: the buffers a worker lets go in :func:`trim` can instead be parked (one per purpose and dtype, the
largest), and the next request of that size on any thread takes them. Why: an LM head's job after the
embedding's would otherwise fault in an embedding-sized arena afresh (ties on 4 x 3.05 GB fp32: ~180 k page
faults, ~0.7 s of system time). At most one buffer per purpose is parked (the largest), so parking holds at
most one largest job's scratch beyond what the workers hold, and only until the engine's last job over the
kept size is done (:func:`clear_parked`; also when the merge ends). Several merges in one process share the
parked buffers: harmless, a buffer's contents are undefined on hand-out anyway.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_local = threading.local()
_parked: dict = {}  # (purpose, dtype) -> array: buffers a trim let go, for the next large request on any thread
_parked_lock = threading.Lock()
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.bool: np.bool_, torch.int32: np.int32,
          torch.int64: np.int64, torch.uint8: np.uint8}


def _buffers() -> dict:
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    return buffers


def array(purpose: str, n: int, dtype) -> np.ndarray:
    """A 1-D numpy array of ``n`` entries of ``dtype`` for ``purpose`` (contents undefined), reused by this
    thread's next request for ``purpose``."""
    dtype = np.dtype(dtype)
    buffers = _buffers()
    key = (purpose, dtype)
    held = buffers.get(key)
    if held is None or held.size < n:
        buffers.pop(key, None)  # drop the smaller one before the larger one is mapped
        held = _take_parked(key, n)
        held = buffers[key] = _allocate(max(1, int(n)), dtype) if held is None else held
    return held[:n]


def _take_parked(key, n: int) -> np.ndarray | None:
    """The parked buffer for ``key`` when it holds ``n`` entries and not over twice as many (it is no longer
    parked; a much smaller request leaves it to the large job it waits for), else None."""
    with _parked_lock:
        parked = _parked.get(key)
        return _parked.pop(key) if parked is not None and parked.size >= n > parked.size // 2 else None


_HALF = (torch.bfloat16, torch.float16)  # numpy has no bf16: held as int16 arrays, handed out as views


def holds(dtype: torch.dtype) -> bool:
    """Whether :func:`tensor` hands out buffers of ``dtype``."""
    return dtype in _NUMPY or dtype in _HALF


def tensor(purpose: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`array` as a flat CPU torch tensor sharing its memory (same reuse rules)."""
    if dtype in _HALF:
        return torch.from_numpy(array(purpose, n, np.int16)).view(dtype)
    return torch.from_numpy(array(purpose, n, _NUMPY[dtype]))


def _allocate(n: int, dtype: np.dtype) -> np.ndarray:
    """n entries from torch's allocator (no MADV_HUGEPAGE), seen as a numpy array that keeps it alive."""
    return torch.empty(n * dtype.itemsize, dtype=torch.uint8).numpy().view(dtype)


def held_bytes() -> int:
    """Bytes this thread's buffers hold (their allocated size, touched or not)."""
    return sum(a.nbytes for a in _buffers().values())


def release() -> None:
    """Frees this thread's buffers (the next request allocates afresh)."""
    _buffers().clear()


def trim(max_entries: int, park: bool = False) -> None:
    """Lets go of this thread's buffers of more than ``max_entries`` entries (the smaller ones stay for reuse):
    freed, or with ``park`` parked for the next request on any thread (where a parked buffer of the same purpose
    is at least as large, the let-go one is freed)."""
    buffers = _buffers()
    for key in [key for key, held in buffers.items() if held.size > max_entries]:
        held = buffers.pop(key)
        if park:
            with _parked_lock:
                if key not in _parked or _parked[key].size < held.size:
                    _parked[key] = held


def parked_bytes() -> int:
    """Bytes of the parked buffers."""
    with _parked_lock:
        return sum(a.nbytes for a in _parked.values())


def clear_parked() -> None:
    """Frees the parked buffers."""
    with _parked_lock:
        _parked.clear()
