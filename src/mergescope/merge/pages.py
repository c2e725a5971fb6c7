"""Give a file map's resident pages back while a job still holds the map (the merge engine's memory bound).

Why: a job maps its input tensors and its output slot whole (merge/reader.py, io/writer.py), and every
page it touches stays resident until the map goes at the job's end: 4 inputs and the output of a
32000 x 1024 float32 embedding keep 655 MB resident. The kernels (merge/kernels.py) pass over a tensor
in windows; after each window they call :func:`release`, so a job keeps a few windows resident, not
its tensors. ``madvise(MADV_DONTNEED)`` drops the pages from this process only: the page cache keeps
them (the output's dirty pages included: they are written back as before), and the next read faults
them in again from there.

Safety: on anonymous memory the same call would zero the data, so :func:`release` acts only inside a
map registered here by its maker (:func:`track`; the registry holds the map, so its addresses cannot be
reused by other memory until :func:`forget`), and only through that map's own ``madvise``. Inputs are
private copy-on-write maps that nothing writes (a write would be lost at the next release); output slots
are shared maps, whose writes reach the page cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading

import torch

WINDOW = 1 << 22  # entries per pass of the callers that release as they go (16 MB of float32)
RESIDENT = 1 << 26  # bytes: an input this small keeps its pages from a job's first pass to its last (see reread)
_lock = threading.Lock()
_maps: dict[int, tuple[int, mmap.mmap]] = {}  # first address -> (end address, the map)
_local = threading.local()  # .resident: this thread's bound for :func:`reread` (:func:`resident_up_to`)


def track(mapped: mmap.mmap) -> None:
    """Let :func:`release` give back pages of ``mapped`` (a file map) until :func:`forget`."""
    if len(mapped) == 0:
        return
    view = ctypes.c_char.from_buffer(mapped)  # a buffer export: let go at once, so the map can close
    start = ctypes.addressof(view)
    del view
    with _lock:
        _maps[start] = (start + len(mapped), mapped)


def forget(mapped: mmap.mmap) -> None:
    """Stop releasing pages of ``mapped`` (before its last reference goes)."""
    with _lock:
        for start, (_, held) in list(_maps.items()):
            if held is mapped:
                del _maps[start]


def tracked() -> int:
    """How many maps are registered (tests: none may be left when a merge ends)."""
    with _lock:
        return len(_maps)


def release(tensor: torch.Tensor, start: int, stop: int) -> None:
    """Drop this process's pages of entries ``[start, stop)`` of contiguous ``tensor`` (the whole pages
    inside that range) when they lie in a tracked file map; otherwise do nothing."""
    if stop <= start or not tensor.is_contiguous() or tensor.device.type != "cpu":
        return
    size = tensor.element_size()
    first = tensor.data_ptr() + start * size
    end = tensor.data_ptr() + stop * size
    lo = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = end - end % mmap.PAGESIZE
    if hi <= lo:
        return
    found = _find(lo, hi)
    if found is not None:
        base, mapped = found
        mapped.madvise(mmap.MADV_DONTNEED, lo - base, hi - lo)


def windows(n: int, size: int, *touched: torch.Tensor):
    """(start, stop) of each ``size``-entry window of ``n`` entries; once the caller is done with a window,
    the pages of ``touched`` (flat views of n entries) in it are released."""
    for start in range(0, n, size):
        stop = min(n, start + size)
        yield start, stop
        for t in touched:
            release(t, start, stop)


def reread(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Of the inputs a pass reads that a later pass of the same job reads again (a selection or reduction before
    the merge's own pass), those whose pages it should give back behind its windows: only tensors over RESIDENT
    bytes. Why: the later pass refaults whatever was given back (ties on 4 x 3.05 GB: 140 k of its 880 k page
    faults, ~0.5-0.8 s of system time); a job then keeps at most RESIDENT bytes of each input resident in
    between, a bound independent of the model's size. The last pass over an input gives back every window.
    The bound is RESIDENT, or what the calling thread's :func:`resident_up_to` set."""
    limit = getattr(_local, "resident", RESIDENT)
    return tuple(t for t in tensors if t.numel() * t.element_size() > limit)


@contextlib.contextmanager
def resident_up_to(nbytes: int):
    """Within the block, :func:`reread` on this thread keeps inputs of at most ``nbytes`` resident (not RESIDENT).
    Why: the engine passes 0 for its few jobs over the typical job's size (an embedding, an LM head), whose
    inputs under RESIDENT stayed resident whole between passes: 4 x 0.54 GB bf16 ties held its LM head's four
    65.5 MB inputs at once, 262 MB of its 0.69 GB peak over the baseline (peak RSS 0.59x MergeKit's)."""
    before = getattr(_local, "resident", None)
    _local.resident = nbytes
    try:
        yield
    finally:
        if before is None:
            del _local.resident  # RESIDENT again, as it is then
        else:
            _local.resident = before


def _find(lo: int, hi: int) -> tuple[int, mmap.mmap] | None:
    """(first address, map) of the tracked map holding all of ``[lo, hi)``, or None."""
    with _lock:
        for base, (end, mapped) in _maps.items():
            if base <= lo and hi <= end:
                return base, mapped
    return None
