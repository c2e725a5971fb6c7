"""Streaming merge executor: tensor by tensor, bounded memory, a thread pool, atomic output.

``merge(recipe, out)`` plans the output from the input headers, lays out the output shards
(``writer.PlannedWriter``: header written; with 2+ threads, full size reserved on disk), then runs
one job per output tensor on ``threads`` worker threads: map just the input tensors' byte ranges
(``reader.JobMaps``: no copy, unmapped when the job ends, so resident memory is only what jobs in
flight hold), with 2+ threads map the output tensor's byte range (``PlannedWriter.slot``) and merge
straight into it when the method's function takes ``out=`` (no result buffer, no second copy);
other results are ``pwrite``n and freed. A finished shard is fsynced and hashed into the resume log on one
background thread, off the workers' path.

Memory bound: jobs start only while the bytes of the jobs in flight (inputs + output) stay
within ``max(largest job + a typical job, 256 MB)`` (``in_flight_limit``), so their maps stay within that. Resident pages are less: the
fused loops of the task-vector family and linear (merge/kernels.py), ``check_finite`` and casts give
back each pass's file-mapped pages as they go (merge/pages.py), so such a job keeps a 16 MB window
per input and output resident, not its tensors; other methods touch up to the job's bytes. A method's
scratch (merge/scratch.py: |delta|, masks, selection work arrays, a few bytes per entry of the job's
tensor) is kept between jobs only up to the size of a typical job (``typical_entries``), so only the
job running the largest tensor holds the largest scratch (parked between the jobs larger than typical, for
the next of them, and freed after the last: scratch.trim). Peak resident memory is therefore about
``interpreter + torch + numba (~0.45 GB) + the largest tensor's scratch + the in-flight jobs' windows``
for those methods (``+ max(largest job + a typical job, 256 MB)`` for the others), independent of model size.
Randomized methods draw from a generator seeded by ``(seed, tensor name)``, and torch runs
single-threaded inside each worker (intra-op parallel reductions change summation order): the
same seed gives the same bits whatever the worker count, core count or completion order.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergescopeError
from ..io import atomic_output, copy_aux_files, parse_size, provenance
from ..io.writer import DIRECT_ALIGN
from ..recipe import Recipe, read
from ..tasks.checkpoints import passed_metadata
from . import finite, pages, scratch
from . import plan as planning
from .architectures import set_layer_count
from .reader import JobMaps, Locator
from .tokenizer import fix_config, remap_job, write_files
from .writer import PlannedWriter

LOG = logging.getLogger("mergescope.merge")
MIN_BUDGET = 256 * 10**6
# How results reach the output shards: unset ("auto"): with 2+ threads results over pages.RESIDENT bytes or the
# typical job's size through mapped slots, smaller ones by pwrite (through_slot); with 1 thread all by pwrite
# (docs/merge.md measures both); "mapped" or "pwrite" forces one path (the tests compare both paths' bytes).
WRITE_ENV = "MERGESCOPE_WRITE"
# "0": every pwritten result goes through the page cache; else their whole pages go past it (O_DIRECT, where the
# file system takes it: io/writer.direct_span; docs/merge.md measures both).
DIRECT_ENV = "MERGESCOPE_DIRECT"


def maps_output(threads: int) -> bool:
    """Whether results are written through mapped, preallocated shards (``WRITE_ENV``)."""
    mode = os.environ.get(WRITE_ENV, "auto")
    return mode == "mapped" or (mode != "pwrite" and threads > 1)


def through_slot(job: planning.Job, typical: int) -> bool:
    """Whether a job's result goes into its mapped slot (where the shard is mapped): one over pages.RESIDENT
    bytes or over ``typical`` entries (typical_entries: an embedding, an LM head), or any with
    ``WRITE_ENV=mapped``. Why: a smaller one is computed in the worker's reused buffer and pwritten, which skips
    the shared map's first-touch faults (two workers faulting one shard's map cost ~1 s of system time in a bf16
    linear merge writing 0.54 GB); a larger one keeps the map, whose pages go back window by window, so no
    result buffer grows with the model's largest tensors (4 x 0.54 GB bf16 breadcrumbs: two 65.5 MB result
    buffers for its embedding and LM head, peak RSS 0.88 -> 0.77 GB through the map, walls within noise)."""
    return (os.environ.get(WRITE_ENV) == "mapped" or math.prod(job.shape) * job.dtype.itemsize > pages.RESIDENT
            or math.prod(job.shape) > typical)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model")


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote and what it cost."""

    out: str
    method: str
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    files: tuple[str, ...]
    seed: int
    reused: int = 0  # tensors kept from an interrupted run's verified shards (``resume``)
    warnings: tuple[str, ...] = ()  # recipe settings accepted without effect (also logged)
    # The engine's own timestamps, in seconds from the start of ``merge`` (None: no tensor merged).
    first_tensor_s: float | None = None  # the first merged tensor written (start-up: recipe, plan, layout)
    last_tensor_s: float | None = None  # the last merged tensor written
    shards_s: tuple[float, ...] = ()  # each shard's last tensor written, in completion order
    steady_bytes_read: int = 0  # input bytes of the tensors merged after the first one
    fsync: bool = False  # shards, small files and folders synced to disk before returning
    fsync_wait_s: float = 0.0  # waited for the background syncs/done-log hashes once every tensor was written

    @property
    def steady_bytes_per_s(self) -> float | None:
        """Input bytes per second after the first tensor (start-up and finishing left out)."""
        if self.first_tensor_s is None or self.last_tensor_s is None or self.last_tensor_s <= self.first_tensor_s:
            return None
        return self.steady_bytes_read / (self.last_tensor_s - self.first_tensor_s)

    def to_dict(self) -> dict:
        return {"out": self.out, "method": self.method, "tensors": self.tensors, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "seconds": self.seconds, "files": list(self.files),
                "seed": self.seed, "reused": self.reused, "warnings": list(self.warnings),
                "first_tensor_s": self.first_tensor_s, "last_tensor_s": self.last_tensor_s,
                "shards_s": list(self.shards_s), "steady_bytes_per_s": self.steady_bytes_per_s,
                "fsync": self.fsync, "fsync_wait_s": self.fsync_wait_s}


def release_freed_memory() -> None:
    """Make glibc return freed tensor buffers to the OS at once (Linux only; no-op elsewhere).

    glibc raises its mmap threshold after large frees, after which tensor-sized buffers come
    from the heap and stay resident; pinning the threshold at 1 MB keeps RSS near what is live.
    The heap itself may keep 32 MB free before trimming: a 1 MB trim threshold returned the
    chunk temporaries' pages after every chunk and faulted them back in (slerp of 2 x 1 GB: ~1-2 s
    slower, for ~6 MB less peak RSS).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run seed and the output tensor name (order-independent)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def run_job(job: planning.Job, plan: planning.Plan, read: Callable[[int, str], torch.Tensor],
            dtype: torch.dtype | None, seed: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """Read one job's inputs with ``read(model index, tensor name)`` and merge them (no writing).

    The result never shares memory with an input (inputs may be maps that are closed next).
    ``into`` (the output slot, of the job's dtype and shape) receives the result, which is returned:
    the method writes it there itself when its function takes ``out=`` and works in the job's dtype,
    otherwise the result is copied (cast) in.
    """
    tensors = remap_job(plan, job, _read_inputs(job, read, dtype))
    if job.copy or not tensors[0].is_floating_point():  # a single holder's tensor, a buffer: copied
        source = tensors[job.base or 0]
        return source.to(job.dtype, copy=True) if into is None else _copy_into(into, source)
    method = plan.method
    base, others, params = _method_arguments(method, job, tensors)
    if method.random:
        params["seed"] = tensor_seed(seed, job.name)
    if into is not None and tensors[0].dtype == job.dtype and takes_out(method.fn):
        params["out"] = into
    try:
        out = method(others, base, **params)
    except MergescopeError as e:
        raise MergescopeError(f"tensor {job.name!r}: {e}") from None
    if into is not None:
        return into if _same_memory(out, into) else _copy_into(into, out)
    out = out if out.dtype == job.dtype else out.to(job.dtype)
    if any(_shares_storage(out, t) for t in tensors):
        out = out.clone()
    return out


@functools.cache
def takes_out(fn: Callable) -> bool:
    """Whether a method's function accepts an ``out=`` tensor to write its result into."""
    try:
        param = inspect.signature(fn).parameters.get("out")
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _same_memory(result: torch.Tensor, slot: torch.Tensor) -> bool:
    """Whether ``result`` is ``slot``'s bytes (a method that wrote into ``out``, maybe reshaped)."""
    return (result.dtype == slot.dtype and result.numel() == slot.numel() and result.is_contiguous()
            and result.data_ptr() == slot.data_ptr())


def _read_inputs(job: planning.Job, read: Callable[[int, str], torch.Tensor], dtype: torch.dtype | None) -> list:
    """The job's input tensors, floats cast to ``dtype`` when given, then to one promoted working dtype."""
    tensors = []
    for model_index, name in job.inputs:
        t = read(model_index, name)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = _cast(t, dtype)
        tensors.append(t)
    if not tensors[0].is_floating_point():
        return tensors
    work = tensors[0].dtype
    for t in tensors[1:]:
        work = torch.promote_types(work, t.dtype)
    return [t if t.dtype == work else _cast(t, work) for t in tensors]


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``; the source's mapped pages are given back (merge/pages.py): only the copy is read."""
    cast = t.to(dtype)
    pages.release(t, 0, t.numel())
    return cast


def _method_arguments(method, job: planning.Job, tensors: list) -> tuple:
    """(base, others, params) for the method call: the base split out unless the method ignores it,
    per-input parameters listed for the non-base inputs."""
    params = dict(job.shared)
    if method.base == "ignored" or job.base is None:
        base, others, kept = None, tensors, range(len(tensors))
    else:
        base = tensors[job.base]
        kept = [i for i in range(len(tensors)) if i != job.base]
        others = [tensors[i] for i in kept]
    for p in method.params:
        if p.scope != "shared":
            params[p.name] = [job.per_input[i][p.name] for i in kept]
    return base, others, params


def check_finite(name: str, tensor: torch.Tensor, chunk: int = 1 << 20, window: int = pages.WINDOW) -> None:
    """Refuse a merged tensor holding NaN/Inf (a bad input or parameter would poison the model silently).

    A finite sum proves every entry finite (one NaN/Inf makes the sum NaN/Inf) at the cost of one
    read; only a non-finite sum (or an overflowing one) pays for the exact count, in 1 M-entry chunks.
    A contiguous tensor is summed ``window`` entries at a time, each window's pages given back after
    (an output slot's, merge/pages.py), so the check does not fault the whole result back in.
    """
    if not tensor.is_floating_point():
        return
    flat = tensor.view(-1) if tensor.is_contiguous() else None
    if (_finite_sum(tensor) if flat is None
            else all(_finite_sum(flat[start:stop]) for start, stop in pages.windows(flat.numel(), window, flat))):
        return
    flat = tensor.reshape(-1)
    bad = sum(int((~torch.isfinite(part)).sum()) for part in flat.split(chunk))
    if bad:
        raise MergescopeError(f"tensor {name!r}: merged result has {bad} NaN/Inf value(s) of {flat.numel()}; "
                              "check the inputs and parameters, or pass --allow-nonfinite to keep them")


def _copy_into(into: torch.Tensor, source: torch.Tensor, window: int = pages.WINDOW) -> torch.Tensor:
    """``into.copy_(source)`` (cast included), ``window`` entries at a time when both are contiguous and of
    one shape, each window's mapped pages of both given back once copied (merge/pages.py)."""
    if not (into.is_contiguous() and source.is_contiguous() and into.shape == source.shape):
        return into.copy_(source)
    flat_into, flat_source = into.view(-1), source.view(-1)
    for start, stop in pages.windows(flat_source.numel(), window, flat_into, flat_source):
        flat_into[start:stop].copy_(flat_source[start:stop])
    return into


def _finite_sum(tensor: torch.Tensor) -> bool:
    """True proves every entry finite. Half dtypes: ``aminmax`` (NaN makes both NaN, Inf shows at an end), one
    vectorised pass about 7x faster than their float32-accumulated sum (the bf16 check cost as much as linear's
    merge); float32/64: the sum (faster than aminmax there)."""
    if tensor.numel() == 0:
        return True
    if tensor.element_size() < 4:
        low, high = torch.aminmax(tensor)
        return bool(torch.isfinite(low) and torch.isfinite(high))
    return bool(torch.isfinite(tensor.sum()))


def typical_entries(jobs) -> int:
    """Entries of the job holding the median input byte (jobs in size order): a worker keeps its scratch
    buffers (merge/scratch.py) up to this size between jobs, so only the few larger tensors (embeddings,
    LM head) get fresh buffers and two workers never both keep one of their size."""
    typical = _median_byte_job(jobs)
    return 0 if typical is None else math.prod(typical.shape)


def in_flight_limit(jobs) -> int:
    """Bytes (inputs + output) the jobs in flight may hold: the largest job plus the job holding the median
    input byte, at least MIN_BUDGET. Why the second term: with the largest job alone as the limit, nothing
    ran beside an embedding or LM head job, and other workers idled through it (ties on 4 x 1.07 GB: about
    0.7 s of a 2-thread merge's wall per such job)."""
    typical = _median_byte_job(jobs)
    if typical is None:
        return MIN_BUDGET
    return max(MIN_BUDGET, max(_job_bytes(j) for j in jobs) + _job_bytes(typical))


def _median_byte_job(jobs) -> planning.Job | None:
    """The job holding the median input byte, jobs taken in size order (None for no jobs)."""
    by_size = sorted(jobs, key=lambda j: (math.prod(j.shape), j.nbytes_in))
    half, seen = sum(j.nbytes_in for j in by_size) / 2, 0
    for job in by_size:
        seen += job.nbytes_in
        if seen >= half:
            return job
    return None


def dispatch_order(jobs, limit: int) -> collections.deque:
    """Jobs too large to run beside another of their size (an embedding, an LM head) first, the rest in plan
    order. Why: a long job started last runs alone while the other workers idle; started first, the small
    jobs fill in around it (with :func:`_next_fitting`, which skips a job that does not fit yet)."""
    large = [j for j in jobs if 2 * _job_bytes(j) > limit]
    return collections.deque(large + [j for j in jobs if 2 * _job_bytes(j) <= limit])


def _next_fitting(waiting: collections.deque, budget: _Budget, lookahead: int = 64):
    """Removes and returns the first of the next ``lookahead`` waiting jobs that fits beside the jobs in
    flight (None: none does; the bounded look keeps dispatch O(jobs) on checkpoints of 100k tensors)."""
    for i, job in enumerate(itertools.islice(waiting, lookahead)):
        if budget.fits(_job_bytes(job)):
            del waiting[i]
            return job
    return None


class _Budget:
    """Admit jobs while the bytes in flight stay under a limit (one job always runs)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def fits(self, nbytes: int) -> bool:
        return self.used == 0 or self.used + nbytes <= self.limit


def _job_bytes(job: planning.Job) -> int:
    return job.nbytes_in + job.nbytes_out


class _Timeline:
    """The merge's milestones as seconds from its start (called from worker threads)."""

    def __init__(self, start: float):
        self.start, self.first, self.last, self.first_bytes, self.total = start, None, None, 0, 0
        self.shards: list[float] = []
        self._lock = threading.Lock()

    def tensor(self, nbytes_in: int) -> None:
        now = time.perf_counter() - self.start
        with self._lock:
            if self.first is None:
                self.first, self.first_bytes = now, nbytes_in
            self.last = now
            self.total += nbytes_in

    def shard(self) -> None:
        now = time.perf_counter() - self.start
        with self._lock:
            self.shards.append(now)


class _ShardSync:
    """fsync each finished shard, then hash it into the done log, on one background thread while the
    next shards are merged.

    One sync per shard (not per tensor): the kernel writes the shard's dirty pages back while the
    workers keep computing; the done-log entry follows the sync, so it only vouches for durable
    bytes, and workers never wait for the hash. Only the last shard's work is waited for at the end
    (``wait``). With ``fsync`` off the thread only hashes.

    Each finished tensor's pages are handed to the disk at once (``kick``: ``sync_file_range``'s
    start-writeback, which does not wait), so the shard's fsync finds most of them written: without
    it the kernel starts writing back only at the fsync, and the last shard's whole write-back came
    after the last tensor (a 500 MB shard written through a map: fsync 0.67-0.77 s after, total
    1.00-1.66 s; with a start per 25 MB: fsync 0.40-0.50 s, total 0.73-0.89 s).
    """

    def __init__(self, fsync: bool):
        self.fsync = fsync
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fsync")
        self._futures: list[Future] = []

    def submit(self, fd: int, log: Callable[[], None] | None) -> None:
        if self.fsync or log is not None:
            self._futures.append(self._pool.submit(self._finish, fd, log))

    def kick(self, fd: int, offset: int, nbytes: int) -> None:
        """Start writing back ``nbytes`` at ``offset`` of ``fd`` (one finished tensor) on the sync thread."""
        if self.fsync and _SYNC_FILE_RANGE is not None and nbytes:
            self._futures.append(self._pool.submit(_start_writeback, fd, offset, nbytes))

    def _finish(self, fd: int, log: Callable[[], None] | None) -> None:
        if self.fsync:
            os.fsync(fd)
        if log is not None:
            log()

    def wait(self) -> float:
        """Block until every submitted sync and log entry is done (errors re-raised); the seconds waited."""
        start = time.perf_counter()
        self._pool.shutdown(wait=True)
        for f in self._futures:
            f.result()
        return time.perf_counter() - start

    def cancel(self) -> None:
        """Stop before the writer closes the files on an error (pending work dropped, running work awaited)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _libc_sync_file_range():
    """Linux's sync_file_range through libc (Python's os module lacks it), or None elsewhere."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # start write-out of the range's dirty pages, wait for nothing


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Advice only: a failure (an old kernel, a file system without it) leaves the work to the shard's fsync,
    which reports real write errors."""
    _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or folder by path (a folder's sync makes its entries, e.g. a rename, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path, done: set[Path]) -> None:
    """fsync the files of ``folder`` not in ``done`` (index, config, tokenizer, resumed shards), then its folders."""
    folders = [folder]
    for item in sorted(folder.rglob("*")):
        if item.is_symlink():
            continue
        if item.is_dir():
            folders.append(item)
        elif item.is_file() and item not in done:
            fsync_path(item)
    for f in reversed(folders):
        fsync_path(f)


def reused_result(job: planning.Job, offset: int | None = None, index: int = 0) -> torch.Tensor | None:
    """This worker's reused buffer for a job's result on the pwrite path (merge/scratch.py's rules: written
    out before the worker's next job), or None for dtypes scratch does not hold. Why: a fresh result tensor
    per job costs a page fault and a zeroed page per 4 KB (1 GB of output: 262,144 of each). With the
    result's file ``offset``, the buffer starts where memory lines up with the file (the same place in a
    page), so its whole pages can be written past the page cache (io/writer.direct_span). ``index``: which of
    the worker's two buffers (one is computed into while the other's result is written: _ResultWrites)."""
    if not scratch.holds(job.dtype):
        return None
    n, size = math.prod(job.shape), job.dtype.itemsize
    purpose = f"engine.result{index}"
    if offset is None:
        return scratch.tensor(purpose, n, job.dtype).view(job.shape)
    flat = scratch.tensor(purpose, n + DIRECT_ALIGN // size, job.dtype)
    shift = (offset - flat.data_ptr()) % DIRECT_ALIGN
    start = shift // size if shift % size == 0 else 0  # else it cannot line up: the page cache takes it whole
    return flat[start:start + n].view(job.shape)


class _ResultWrites:
    """The pwritten results go out on one background thread while their workers compute the next job. Each worker
    alternates two result buffers and, before a job, waits until the write from its buffer's last use is done
    (its error raised there): at most two results per worker wait to be written. Why: a result's write (past
    the page cache it waits for the device) held its worker; the device and the CPUs now work at once."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write")
        self._local = threading.local()
        self._futures: list[Future] = []
        self._lock = threading.Lock()

    def _state(self) -> list:
        """This worker's [next buffer index, [the pending write of buffer 0, of buffer 1]]."""
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = [0, [None, None]]
        return state

    def next_buffer(self) -> int:
        """This worker's buffer for its next job, once the write from that buffer's last use is done."""
        state = self._state()
        index = state[0]
        state[0] ^= 1
        self.drain(index)
        return index

    def submit(self, index: int, write: Callable[[], None]) -> None:
        future = self._pool.submit(write)
        self._state()[1][index] = future
        with self._lock:
            self._futures.append(future)

    def drain(self, index: int) -> None:
        """The write from this worker's buffer ``index`` done (its error raised)."""
        pending = self._state()[1][index]
        if pending is not None:
            pending.result()

    def wait(self) -> None:
        """Every write done (the first error raised)."""
        with self._lock:
            futures = list(self._futures)
        for future in futures:
            future.result()

    def close(self) -> None:
        """No write left running (those not started are dropped): the writer's files may close after this."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _execute(plan, ckpts, writer, dtype, seed, threads, on_tensor, allow_nonfinite=False,
             timeline: _Timeline | None = None, kick: Callable[[int, int, int], None] = lambda *_: None
             ) -> tuple[int, int]:
    budget = _Budget(in_flight_limit(plan.jobs))
    totals = [0, 0]
    lock = threading.Lock()
    locators = [Locator(ckpts[m]) for m in plan.models]
    in_place = takes_out(plan.method.fn)
    direct = writer.writes_direct
    kept_entries = typical_entries(plan.jobs)
    larger_left = [sum(math.prod(j.shape) > kept_entries for j in plan.jobs)]  # jobs whose scratch is parked

    def landed(job, written: int) -> None:
        with lock:
            totals[0] += job.nbytes_in
            totals[1] += written
        if timeline is not None:
            timeline.tensor(job.nbytes_in)
        if on_tensor is not None:
            on_tensor(job.name, job.nbytes_in)

    def write_out(job, out) -> None:  # on the write thread
        written = writer.write(job.name, out)
        kick(*writer.extent(job.name))
        landed(job, written)

    def work(job):
        maps = JobMaps()
        larger = math.prod(job.shape) > kept_entries  # an embedding, an LM head: fresh scratch, parked after
        # Only a method writing into ``out=`` (and a plain copy) goes through the mapped slot: copying
        # another method's finished result into the map measured no faster than pwrite (docs/merge.md).
        slot = writer.slot(job.name) if (in_place or job.copy) and through_slot(job, kept_entries) else None
        index = writes.next_buffer() if slot is None else 0
        offset = writer.extent(job.name)[1] if direct else None
        into = slot.tensor if slot is not None else reused_result(job, offset, index) if in_place or job.copy else None
        try:
            finite.forget()
            with pages.resident_up_to(0 if larger else pages.RESIDENT):  # its inputs' pages go back between passes
                out = run_job(job, plan, lambda i, name: maps.tensor(locators[i], name), dtype, seed, into=into)
            if not allow_nonfinite and not finite.vouched(out):  # else its kernel counted as it stored
                check_finite(job.name, out)
            if slot is None:
                writes.submit(index, functools.partial(write_out, job, out))
                del out
                written = None
            else:
                del out  # a view of the map: gone before the slot unmaps
                kick(*writer.extent(job.name))  # before done(): ahead of the shard's fsync when it is the last
                written = slot.done()
        finally:
            maps.close()
            into = None  # a view of the slot's map: gone before the slot unmaps
            if slot is not None:
                slot.close()
            elif larger:  # its result buffer is let go below, maybe parked for another
                writes.drain(index)  # worker's next job: its write must be done first
            with lock:  # one step with the count: no buffer parked after the last larger job cleared them
                larger_left[0] -= larger
                # kept: up to the typical job's size (+ the result's alignment pad); larger ones parked for the next
                scratch.trim(kept_entries + DIRECT_ALIGN, park=larger_left[0] > 0)  # larger job, on either worker
                if larger_left[0] == 0:
                    scratch.clear_parked()
        if written is not None:
            landed(job, written)
        return job

    pending: set[Future] = set()
    writes = _ResultWrites()
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="merge") as pool:
            try:
                waiting = dispatch_order(plan.jobs, budget.limit)
                while waiting:
                    job = _next_fitting(waiting, budget) if len(pending) < threads else None
                    if job is None:  # every worker busy, or no waiting job fits beside the jobs in flight
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for f in done:
                            budget.used -= _job_bytes(f.result())
                        continue
                    budget.used += _job_bytes(job)
                    pending.add(pool.submit(work, job))
                for f in pending:
                    f.result()
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
        writes.wait()
    finally:
        writes.close()
        scratch.clear_parked()
    return totals[0], totals[1]


def _read_config(path: Path, where: Path) -> dict:
    """``config.json`` at ``path`` as a dict that can be written back; every problem is one line naming ``where``.

    ``where`` is the donor's own file (``path`` may be its copy in the partial output folder).
    Garbage, non-UTF-8 text, JSON nested too deeply or holding a huge integer, a FIFO and a
    non-object are refused.
    """
    from ..io.untrusted import parse_json, read_bytes

    try:
        data = read_bytes(path, "config.json")
    except MergescopeError as e:
        raise MergescopeError(str(e).replace(str(path), str(where), 1)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MergescopeError(f"{where}: config.json is not UTF-8 text (byte {e.start})") from None
    config = parse_json(text, str(where), "config.json")
    if not isinstance(config, dict):
        raise MergescopeError(f"{where}: config.json must be a JSON object, got {type(config).__name__}")
    _dump_config(config, where)  # it is written back after the merge: fail now, not after the work
    return config


def _dump_config(config: dict, where: Path) -> str:
    try:
        return json.dumps(config, indent=2, sort_keys=True) + "\n"
    except RecursionError:
        raise MergescopeError(f"{where}: config.json is nested too deeply") from None
    except (TypeError, ValueError) as e:  # mixed key types cannot be sorted; huge integers
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MergescopeError(f"{where}: config.json cannot be rewritten ({first})") from None


def _check_donor_config(donor: str | os.PathLike) -> None:
    """Refuse an unusable base ``config.json`` before merging (it is rewritten into the output)."""
    donor = Path(donor)
    if donor.is_dir() and os.path.lexists(donor / "config.json"):
        from ..io.untrusted import inside_folder

        try:
            inside_folder(donor, "config.json", donor)
        except MergescopeError:  # (a ValueError too)
            raise
        except (RuntimeError, OSError, ValueError) as e:  # symlink loop, name unreadable
            raise MergescopeError(f"{donor / 'config.json'}: cannot read config.json ({e})") from None
        _read_config(donor / "config.json", donor / "config.json")


def _finish_folder(tmp: Path, plan: planning.Plan, recipe: Recipe, copy_tokenizer: bool) -> None:
    """Copy config/tokenizer files from the donor (base) model and fix the config's layer count/dtype."""
    donor = Path(plan.donor)
    if donor.is_dir():
        copied = copy_aux_files(donor, tmp)
        if not copy_tokenizer:
            for name in copied:
                if name in TOKENIZER_FILES:
                    (tmp / name).unlink()
    if plan.tokenizer is not None:
        write_files(tmp, plan.tokenizer, copied=donor.is_dir() and copy_tokenizer)
    config_path = tmp / "config.json"
    if config_path.is_file():
        config = _read_config(config_path, donor / "config.json")
        if plan.stacked:  # n_layer (GPT-2), n_layers, num_layers, text_config.num_hidden_layers, ...
            set_layer_count(config, plan.num_layers)
        fix_config(config, plan.tokenizer)
        out_dtype = recipe.out_dtype or recipe.dtype
        if out_dtype:
            name = str(planning.DTYPES[out_dtype]).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = name
        config_path.write_text(_dump_config(config, donor / "config.json"))
    if recipe.text:
        (tmp / "mergescope_recipe.yml").write_text(recipe.text)
    if (tmp / "config.json").is_file() or (tmp / "README.md").is_file():  # a Hugging Face model folder:
        (tmp / "README.md").write_text(model_card(plan, recipe))  # its own card (the base's describes the base)


def model_card(plan: planning.Plan, recipe: Recipe) -> str:
    """A short model card for the merged folder: the method, the models and the recipe (no dates, no host
    details beyond the paths the recipe itself names, so reruns give the same bytes)."""
    from .. import __version__

    models = "\n".join(f"* `{m}`" + (" (base)" if m == recipe.base_model else "") for m in plan.models)
    recipe_text = recipe.text.rstrip("\n") if recipe.text else "(given as a Python object)"
    fence = "````" if "```" in recipe_text else "```"
    return (f"---\ntags:\n- merge\n- mergescope\n---\n# Merged model\n\nMerged with mergescope {__version__} "
            f"using the `{plan.method.name}` method ({plan.method.reference or 'see docs/merge.md'}), from a "
            f"MergeKit-compatible recipe.\n\n## Models\n\n{models}\n\n## Recipe\n\n{fence}yaml\n{recipe_text}\n{fence}\n")


def merge(recipe: str | os.PathLike | dict | Recipe, out_dir: str | os.PathLike, force: bool = False,
          seed: int | None = None, threads: int | None = None, max_shard_size: int | str = "2GB",
          copy_tokenizer: bool = True, on_tensor: Callable[[str, int], None] | None = None,
          on_plan: Callable[[int, int], None] | None = None, resume: bool = False,
          allow_nonfinite: bool = False, fsync: bool = True) -> MergeResult:
    """Run a MergeKit-compatible recipe (file path, YAML text, mapping or Recipe) into ``out_dir``.

    ``out_dir`` ending in ``.safetensors`` gives one file; otherwise a Hugging Face folder with
    shards of at most ``max_shard_size``, index, config and tokenizer copied from the base model.
    ``on_plan(tensors, bytes)`` is called once before work starts, ``on_tensor(name, bytes_read)``
    after each tensor (from worker threads). ``resume`` reuses the hash-verified shards that an
    interrupted run into the same output left in ``.NAME.partial`` (the bytes are those of an
    uninterrupted run). A merged tensor with NaN/Inf is an error unless ``allow_nonfinite``.
    ``fsync`` (default) makes the output durable before returning: each finished shard is synced on a
    background thread while the next is merged, then the small files, the folder, and after the
    rename its parent (docs/merge.md, Performance, measures the cost); ``fsync=False`` leaves it to the OS.
    """
    start = time.perf_counter()
    release_freed_memory()
    recipe = read(recipe)
    from . import data_aware_recipe

    if data_aware_recipe.is_data_aware(recipe.merge_method):  # needs a model + calibration data: not streamed
        return data_aware_recipe.merge(recipe, out_dir, force=force, seed=seed, max_shard_size=max_shard_size,
                                on_plan=on_plan, on_tensor=on_tensor, allow_nonfinite=allow_nonfinite)
    seed = 0 if seed is None else int(seed)
    threads = max(1, int(threads or min(2, os.cpu_count() or 1)))
    shard_bytes = parse_size(max_shard_size)
    ckpts = planning.open_models(recipe)
    plan = planning.build(recipe, ckpts)
    for line in plan.warnings:
        LOG.warning(line)
    if Path(out_dir).suffix != ".safetensors":  # a folder output carries the base's config.json
        _check_donor_config(plan.donor)
    layout = [(j.name, j.dtype, j.shape) for j in plan.jobs]
    dtype = planning.DTYPES[recipe.dtype] if recipe.dtype else None
    donor_meta = ckpts[plan.donor].metadata
    from ..lora.adapter import reference_paths

    # BASE+ADAPTER reads (and guards) both folders; each folder once
    inputs = list(dict.fromkeys(p for m in plan.models for p in reference_paths(m)))
    meta = provenance(inputs=inputs, recipe_text=recipe.text, seed=seed, merge_method=plan.method.name)
    meta.update(passed_metadata(donor_meta))  # zoo model / built-in task records only: a payload never spreads
    out = Path(out_dir)
    single = out.suffix == ".safetensors"
    if on_plan is not None:
        on_plan(len(plan.jobs), sum(j.nbytes_in for j in plan.jobs))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallel reductions would make the bits depend on the core count
    try:
        with atomic_output(out, inputs, force=force, is_dir=not single, resume=resume) as tmp:
            timeline, sync, synced = _Timeline(start), _ShardSync(fsync), set()

            def on_shard(index: int, fd: int, log: Callable[[], None] | None) -> None:
                timeline.shard()
                synced.add(writer.paths[index])
                sync.submit(fd, log)

            writer = PlannedWriter(tmp, layout, shard_bytes, meta, single_file=single, resume=resume, on_shard=on_shard,
                                   mapped=maps_output(threads), direct=os.environ.get(DIRECT_ENV) != "0")
            todo = dataclasses.replace(plan, jobs=tuple(j for j in plan.jobs if j.name not in writer.reused))
            try:
                read_bytes, written = _execute(todo, ckpts, writer, dtype, seed, threads, on_tensor, allow_nonfinite,
                                               timeline, sync.kick)
                fsync_wait = sync.wait()
            except BaseException:
                sync.cancel()
                writer.abort()
                raise
            files = writer.close()
            if not single:
                _finish_folder(tmp, plan, recipe, copy_tokenizer)
                if fsync:
                    _fsync_tree(tmp, synced)  # reused (resumed) shards too
        if fsync:
            fsync_path(out.parent)  # the rename into place
    finally:
        torch.set_num_threads(old_threads)
        for c in ckpts.values():
            c.close()
    names = tuple(out.name if single else f.name for f in files)
    return MergeResult(str(out), plan.method.name, len(plan.jobs), read_bytes, written,
                       time.perf_counter() - start, names, seed, len(writer.reused), plan.warnings,
                       timeline.first, timeline.last, tuple(timeline.shards), timeline.total - timeline.first_bytes,
                       fsync, fsync_wait)
