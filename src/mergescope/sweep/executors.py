"""Executors: run TaskSpecs through ``run_task`` and yield rows as they complete.

One protocol, two implementations with the same task function: a local process pool (spawn
context, so workers start clean and import torch once) and Ray tasks on a local or remote cluster.
On Ray, small checkpoints are put into the object store once and passed to tasks as ObjectRefs
(``sharing``); a bad cluster address fails in seconds instead of Ray's minutes (``address``).
A worker that dies is retried: Ray re-runs the task (``max_retries``); the local pool is rebuilt
and the unfinished tasks are resubmitted.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Protocol

from ..errors import MergescopeError
from .address import check_reachable, dialled_address
from .sharing import DEFAULT_SHARE_BELOW, parse_threshold, same_file_key, small_states
from .spec import TaskSpec
from .work import run_task, run_task_with_states


class Executor(Protocol):
    """Runs tasks, yielding each row as soon as its task finishes (order is not defined)."""

    workers: int

    def run(self, specs: Sequence[TaskSpec]) -> Iterator[dict]: ...


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class LocalExecutor:
    """concurrent.futures process pool on this machine, ``workers`` processes (default: all cores)."""

    def __init__(self, workers: int | None = None, max_retries: int = 3):
        self.workers = workers or default_workers()
        self.max_retries = max_retries

    def run(self, specs: Sequence[TaskSpec]) -> Iterator[dict]:
        pending = list(specs)
        crashes = 0
        while pending:
            finished: set[str] = set()
            pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            try:
                futures = {pool.submit(run_task, s): s for s in pending}
                while futures:
                    done, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for f in done:
                        spec = futures.pop(f)
                        row = f.result()
                        finished.add(spec.id)
                        yield row
            except BrokenProcessPool:
                crashes += 1
                if crashes > self.max_retries:
                    raise MergescopeError(f"sweep: a worker process died {crashes} times; giving up") from None
            except BaseException:  # Ctrl-C or an early stop: the tasks under way are not waited for
                _stop_workers(pool)
                raise
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            pending = [s for s in pending if s.id not in finished]


def _stop_workers(pool: ProcessPoolExecutor, grace_s: float = 5.0) -> None:
    """Terminates the pool's worker processes, and kills those still alive ``grace_s`` later. Why:
    ``shutdown(cancel_futures=True)`` cancels only the tasks not yet handed to a worker; the interpreter's
    exit then joins the pool, so a Ctrl-C waited for the running task and the queued one (minutes on a busy
    machine) before the CLI could exit; and a worker that outlives SIGTERM (a task's library may handle it)
    would hold that exit, and the CLI's stdout and stderr, for good."""
    processes = [p for p in (getattr(pool, "_processes", None) or {}).values() if p.is_alive()]
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


class RayExecutor:
    """Ray tasks. ``address``: "local" starts a private local cluster with ``workers`` CPUs; "auto"
    joins the cluster started with ``ray start`` (or $RAY_ADDRESS); anything else is passed to
    ``ray.init(address=...)`` ("HOST:PORT" or "ray://HOST:10001"). If Ray is already initialised
    in this process, that connection is used. At most ``workers`` tasks are in flight (default:
    the cluster's CPUs). Checkpoints of at most ``share_below`` bytes ("64MB", or 0 for none) are
    read once here and ``ray.put`` once, and tasks get them as ObjectRefs; larger ones go by path.
    ``shared`` lists what the last run put (path -> bytes)."""

    def __init__(self, address: str = "auto", workers: int | None = None, max_retries: int = 3,
                 share_below: int | str = DEFAULT_SHARE_BELOW):
        self.address, self.max_retries = address, max_retries
        self.workers = workers
        self.share_below = parse_threshold(share_below)
        self.shared: dict[str, int] = {}
        self._started = False

    def _connect(self):
        try:
            import ray
        except ImportError:
            raise MergescopeError("--ray needs Ray: pip install 'mergescope[ray]' (or pip install ray)") from None
        if not ray.is_initialized():
            if self.address != "local":
                check_reachable(self.address)
            try:
                if self.address == "local":
                    ray.init(num_cpus=self.workers or default_workers(), include_dashboard=False,
                             log_to_driver=False, configure_logging=False)
                else:
                    ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except ConnectionError as e:
                hint = _auth_hint(self.address)
                raise MergescopeError(f"--ray {self.address}: cannot join a Ray cluster ({e}){hint}") from None
            self._started = True
        if self.workers is None:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return ray

    def _put_small_states(self, ray, specs: Sequence[TaskSpec]) -> dict:
        """One ``ray.put`` per distinct small checkpoint: resolved path -> ObjectRef."""
        refs = {}
        self.shared = {}
        for path, ckpt in small_states(specs, self.share_below):
            refs[path] = ray.put(ckpt)
            self.shared[str(path)] = sum(t.nbytes for t in ckpt.tensors.values())
        return refs

    def run(self, specs: Sequence[TaskSpec]) -> Iterator[dict]:
        if not specs:  # e.g. resuming a finished sweep: no cluster to start or join
            return
        ray = self._connect()
        remote = ray.remote(num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)(run_task_with_states)
        queue, in_flight, states = list(specs)[::-1], [], {}
        try:
            states = self._put_small_states(ray, specs)
            while queue or in_flight:
                while queue and len(in_flight) < self.workers:
                    in_flight.append(_submit(remote, queue.pop(), states))
                done, in_flight = ray.wait(in_flight, num_returns=1)
                for ref in done:
                    yield _get(ray, ref)
        finally:
            for ref in in_flight:
                ray.cancel(ref, force=True)
            states.clear()  # drop the driver's references: Ray frees the shared states
            if self._started:
                ray.shutdown()
                self._started = False


def _auth_hint(address: str) -> str:
    """Why a head that accepts TCP may still refuse us: Ray 2.60's `ray start` turns on token
    authentication, and ray.init sends the token to an explicit address only with RAY_AUTH_MODE=token."""
    if os.environ.get("RAY_AUTH_MODE") or dialled_address(address) is None:
        return ""
    return ("; if a Ray head does listen there, it may want token authentication: set RAY_AUTH_MODE=token "
            "(token from ~/.ray/auth_token or $RAY_AUTH_TOKEN)")


def _submit(remote, spec: TaskSpec, states: dict):
    """Submit one task; the shared states it reads go as top-level ObjectRef arguments."""
    names = sorted({c for c in spec.checkpoints if same_file_key(spec.root, c) in states})
    return remote.remote(spec, names, *(states[same_file_key(spec.root, c)] for c in names))


def _get(ray, ref) -> dict:
    """ray.get, with a user error inside a task re-raised as that one-line error."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, MergescopeError):
            raise MergescopeError(str(e.cause)) from None
        raise


def make_executor(ray_address: str | None = None, workers: int | None = None, max_retries: int = 3,
                  share_below: int | str = DEFAULT_SHARE_BELOW) -> Executor:
    """The local pool, or Ray when an address ("local", "auto", "HOST:PORT", "ray://...") is given;
    ``share_below`` only matters on Ray."""
    if workers is not None and workers < 1:
        raise MergescopeError(f"--workers {workers}: must be at least 1")
    if ray_address:
        executor = RayExecutor(ray_address, workers, max_retries, share_below)
        if ray_address != "local" and not _ray_connected():
            check_reachable(ray_address)  # now, before the caller creates the results table
        return executor
    return LocalExecutor(workers, max_retries)


def _ray_connected() -> bool:
    """Whether this process already holds a Ray connection (then ``RayExecutor`` uses it as is)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
