"""Data-free merge signals, streamed tensor by tensor: distances, cosines, sign conflicts, norms, alignment gap.

Every signal derives from a few float64 sums per tensor: the Gram matrix of the models' weights
(``G[i, j] = <m_i, m_j>``), with a base the Gram matrix of the task vectors ``d_i = m_i - base``, and
the count of elements whose nonzero task vectors do not all share the TIES-elected sign. Sums of
those over tensors give the global signals, so the whole checkpoint is never in memory: tensors are
read through the merge engine's path (``merge.plan`` checks names and shapes exactly as ``merge``
does, ``merge.reader`` maps one tensor's bytes and unmaps them after use), one tensor of each model at
a time, in float64 chunks of ``CHUNK`` elements.

Alignment gap (spec-free): for a 2-D weight [out, in], how much the mean row cosine between model 0
and model j rises when model j's rows are reordered by the optimal one-to-one assignment
(``scipy.optimize.linear_sum_assignment``) instead of kept in place. Independent training leaves
hidden units in arbitrary order (large gap); fine-tunes of one parent keep their order (gap ~ 0). Its
cost is bounded so the pass stays as cheap as a linear merge: at most ``GAP_ROWS`` rows of model 0 (a
seeded subsample, matched against *all* rows of model j, so a permuted copy still finds its rows), the
cosines on at most ``GAP_COLS`` seeded columns (the same for both models), tensors with at most
``GAP_MAX_OUT`` rows (vocabulary-sized matrices are skipped), and at most ``GAP_TENSORS`` tensors,
spread evenly over the eligible ones in file order.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MergescopeError
from ..io import Checkpoint, load
from ..merge import plan as planning
from ..merge.engine import release_freed_memory, tensor_seed
from ..merge.reader import JobMaps, Locator

CHUNK = 1 << 16  # elements per float64 chunk: 512 KB per model (cache-sized: 1.5x faster than 8 MB chunks)
GAP_ROWS = 512
GAP_COLS = 256
GAP_MAX_OUT = 8192
GAP_TENSORS = 8

Model = str | os.PathLike | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class TensorSums:
    """The float64 sums of one tensor that every signal derives from."""

    name: str
    numel: int
    gram: np.ndarray  # [M, M] weight Gram matrix
    tv_gram: np.ndarray | None  # [M, M] task-vector Gram matrix (with a base)
    conflicts: int | None  # elements whose nonzero task vectors disagree in sign (with a base)
    gap: tuple[float, float, int] | None  # (identity similarity, matched similarity, rows), mean over pairs


# ----------------------------------------------------------------------------- opening and planning

def _open(model: Model, label: str) -> tuple[str, Checkpoint, bool]:
    """(name for messages, lazy checkpoint, opened here) for a path or an in-memory state."""
    if isinstance(model, Checkpoint):
        return str(model.path), model, False
    if isinstance(model, Mapping):
        bad = next((k for k, v in model.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None or not model:
            raise MergescopeError(f"{label}: expected a non-empty mapping of tensor names to tensors")
        return label, Checkpoint(Path(label), eager=dict(model)), False
    if not isinstance(model, (str, os.PathLike)):
        raise MergescopeError(f"{label}: expected a checkpoint path or a state mapping, got {type(model).__name__}")
    if not Path(model).exists():
        raise MergescopeError(f"model {str(model)!r}: no such local file or folder (mergescope reads local paths only; "
                              "nothing is downloaded)")
    return str(model), load(model), True


def open_inputs(models: Sequence[Model], base: Model | None) -> tuple[list[str], str | None, dict[str, Checkpoint], list]:
    """Open every input lazily: (model names, base name, name -> checkpoint, checkpoints to close)."""
    if isinstance(models, (str, os.PathLike, Mapping)) or len(models) < 2:
        raise MergescopeError("diagnose: give at least two models")
    opened = [_open(m, f"state {i}") for i, m in enumerate(models)]
    if base is not None:
        opened.append(_open(base, "base state"))
    names = [n for n, _, _ in opened]
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise MergescopeError(f"model {twice!r} is given twice; diagnose compares different models")
    ckpts = {n: c for n, c, _ in opened}
    mine = [c for _, c, own in opened if own]
    return names[: len(models)], (names[-1] if base is not None else None), ckpts, mine


def plan_jobs(names: list[str], base: str | None, ckpts: dict[str, Checkpoint]) -> planning.Plan:
    """The merge planner's job list (same name and shape checks as ``merge``) for a uniform merge.

    With a base the plan is task arithmetic's (a tensor only the base has is listed with the base
    alone, and skipped by the caller); without, linear's (every model must hold every tensor).
    """
    entries = [{"model": n, "parameters": {"weight": 1.0}} for n in names]
    recipe = {"merge_method": "task_arithmetic", "base_model": base, "models": entries} if base is not None \
        else {"merge_method": "linear", "models": entries}
    from ..recipe import read

    return planning.build(read(recipe), ckpts)


# ----------------------------------------------------------------------------- per-tensor sums

def chunk_sums(models: Sequence[torch.Tensor], base: torch.Tensor | None = None, chunk: int = CHUNK
               ) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """(weight Gram, task-vector Gram or None, sign-conflict count or None) of one tensor, in float64.

    The elected sign is TIES's (``merge.methods._sign_consensus``): the sign of the sum of the task
    vectors, + where the sum is 0. An element is a conflict when a nonzero task vector has the other sign,
    which happens exactly when its nonzero task vectors do not all share one sign (if they do, their sum
    has that sign), so it is counted as ``min < 0 < max``.
    """
    m = len(models)
    flats = [t.reshape(-1) for t in models]
    flat_base = None if base is None else base.reshape(-1)
    n = flats[0].numel()
    rows = m + (base is not None)
    buf = torch.empty(rows, min(chunk, max(n, 1)), dtype=torch.float64)
    gram = torch.zeros(m, m, dtype=torch.float64)
    tv = torch.zeros(m, m, dtype=torch.float64) if base is not None else None
    conflicts = 0
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        x = buf[:, : hi - lo]
        for i, f in enumerate(flats):
            x[i].copy_(f[lo:hi])
        gram += x[:m] @ x[:m].T
        if base is not None:
            x[m].copy_(flat_base[lo:hi])
            d = x[:m].sub_(x[m])  # task vectors in place: the weights are not needed any more
            tv += d @ d.T
            conflicts += _mixed_signs(d)
    return gram.numpy(), (None if tv is None else tv.numpy()), (conflicts if base is not None else None)


def _mixed_signs(d: torch.Tensor) -> int:
    """Columns of ``d`` [M, n] holding both a negative and a positive entry: min * max < 0.

    Pairwise ``minimum``/``maximum`` over the M rows (M is small): 3x faster than ``aminmax(dim=0)``."""
    low = high = d[0]
    for row in d[1:]:
        low, high = torch.minimum(low, row), torch.maximum(high, row)
    return int((low * high < 0).sum())


def row_alignment(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator, rows: int = GAP_ROWS,
                  cols: int = GAP_COLS) -> tuple[float, float, int]:
    """(mean row cosine in place, mean row cosine after the optimal row assignment, rows used) of a 2-D pair.

    At most ``rows`` seeded rows of ``a`` are matched against every row of ``b`` (a rectangular
    assignment), the cosines computed on at most ``cols`` seeded columns shared by both.
    """
    from scipy.optimize import linear_sum_assignment

    out, inp = a.shape
    picked = torch.randperm(out, generator=generator)[:rows].sort().values if out > rows else torch.arange(out)
    columns = torch.randperm(inp, generator=generator)[:cols].sort().values if inp > cols else slice(None)
    left = torch.nn.functional.normalize(a[picked][:, columns].double(), dim=1)
    right = torch.nn.functional.normalize(b[:, columns].double(), dim=1)
    sim = (left @ right.T).numpy()
    identity = float(sim[np.arange(len(picked)), picked.numpy()].mean())
    r, c = linear_sum_assignment(sim, maximize=True)
    return identity, float(sim[r, c].mean()), len(picked)


def gap_eligible(shape: Sequence[int]) -> bool:
    """A 2-D weight whose rows could be hidden units: 2 <= out <= GAP_MAX_OUT rows of >= 2 entries."""
    return len(shape) == 2 and 2 <= shape[0] <= GAP_MAX_OUT and shape[1] >= 2


def gap_selection(jobs: Sequence[planning.Job], limit: int = GAP_TENSORS) -> frozenset[str]:
    """Names of at most ``limit`` eligible floating tensors, spread evenly over the eligible ones in order."""
    eligible = [j.name for j in jobs if j.dtype.is_floating_point and gap_eligible(j.shape)]
    if len(eligible) <= limit:
        return frozenset(eligible)
    return frozenset(eligible[round(i * (len(eligible) - 1) / (limit - 1))] for i in range(limit)) if limit > 1 \
        else frozenset(eligible[:limit])


def tensor_sums(name: str, models: Sequence[torch.Tensor], base: torch.Tensor | None, gap: bool, seed: int = 0
                ) -> TensorSums:
    """All sums of one tensor (the alignment gap only when ``gap``: model 0 against each other model)."""
    gram, tv, conflicts = chunk_sums(models, base)
    measured = None
    if gap:
        parts = [row_alignment(models[0], other, torch.Generator().manual_seed(tensor_seed(seed, name)))
                 for other in models[1:]]
        measured = (float(np.mean([p[0] for p in parts])), float(np.mean([p[1] for p in parts])), parts[0][2])
    return TensorSums(name, models[0].numel(), gram, tv, conflicts, measured)


# ----------------------------------------------------------------------------- signals from sums

def _pairs(m: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(m) for j in range(i + 1, m)]


def relative_distance(gram: np.ndarray) -> float | None:
    """Mean over pairs of ||a - b|| / ((||a|| + ||b||) / 2) (None when both models are zero)."""
    values = []
    for i, j in _pairs(len(gram)):
        scale = (math.sqrt(max(gram[i, i], 0.0)) + math.sqrt(max(gram[j, j], 0.0))) / 2
        if scale > 0:
            values.append(math.sqrt(max(gram[i, i] + gram[j, j] - 2 * gram[i, j], 0.0)) / scale)
    return float(np.mean(values)) if values else None


def mean_cosine(gram: np.ndarray | None) -> float | None:
    """Mean pairwise cosine <a, b> / (||a|| ||b||) over pairs of nonzero vectors (None if there are none)."""
    if gram is None:
        return None
    values = [gram[i, j] / math.sqrt(gram[i, i] * gram[j, j]) for i, j in _pairs(len(gram))
              if gram[i, i] > 0 and gram[j, j] > 0]
    return float(np.clip(np.mean(values), -1.0, 1.0)) if values else None


def norm_ratio(gram: np.ndarray) -> float | None:
    """max / min of the vectors' norms (None when the smallest is 0: the ratio is undefined)."""
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    return float(norms.max() / norms.min()) if norms.min() > 0 else None


def derive(gram: np.ndarray, tv_gram: np.ndarray | None, conflicts: int | None, numel: int) -> dict:
    """The signals of one tensor or of the whole model from its sums."""
    return {
        "relative_distance": relative_distance(gram),
        "weight_cosine": mean_cosine(gram),
        "task_vector_cosine": mean_cosine(tv_gram),
        "sign_conflict": None if conflicts is None or numel == 0 else conflicts / numel,
        "norm_ratio": norm_ratio(tv_gram if tv_gram is not None else gram),
    }


def layer_row(s: TensorSums) -> dict:
    """One per-layer row: ``cosine`` is the task-vector cosine with a base, else the weight cosine."""
    d = derive(s.gram, s.tv_gram, s.conflicts, s.numel)
    row = {"name": s.name, "numel": s.numel, "relative_distance": d["relative_distance"],
           "cosine": d["task_vector_cosine"] if s.tv_gram is not None else d["weight_cosine"],
           "sign_conflict": d["sign_conflict"], "norm_ratio": d["norm_ratio"]}
    if s.gap is not None:
        row.update(alignment_gap=s.gap[1] - s.gap[0], alignment_identity=s.gap[0], alignment_matched=s.gap[1],
                   alignment_rows=s.gap[2])
    return row


def global_signals(sums: Sequence[TensorSums], names: list[str], base: str | None, align_gap: bool) -> dict:
    """The global signals from the per-tensor sums (added in file order: the same bits every run)."""
    m = len(names)
    gram = np.zeros((m, m))
    tv = np.zeros((m, m)) if base is not None else None
    conflicts, numel = 0, 0
    for s in sums:
        gram += s.gram
        numel += s.numel
        if tv is not None:
            tv += s.tv_gram
            conflicts += s.conflicts
    out = derive(gram, tv, conflicts if base is not None else None, numel)
    out.update(n_models=m, n_parameters=numel, n_tensors=len(sums), models=list(names), base=base,
               model_norms=[float(math.sqrt(max(v, 0.0))) for v in np.diag(gram)],
               task_vector_norms=None if tv is None else [float(math.sqrt(max(v, 0.0))) for v in np.diag(tv)])
    out.update(_gap_summary([s for s in sums if s.gap is not None], align_gap))
    return out


def _gap_summary(measured: Sequence[TensorSums], align_gap: bool) -> dict:
    """Row-weighted mean identity/matched similarity and their difference over the measured tensors."""
    if not align_gap or not measured:
        return {"alignment_gap": None, "alignment_identity": None, "alignment_matched": None,
                "alignment_tensors": len(measured)}
    weights = np.array([s.gap[2] for s in measured], float)
    identity = float(np.average([s.gap[0] for s in measured], weights=weights))
    matched = float(np.average([s.gap[1] for s in measured], weights=weights))
    return {"alignment_gap": matched - identity, "alignment_identity": identity, "alignment_matched": matched,
            "alignment_tensors": len(measured)}


# ----------------------------------------------------------------------------- the streamed pass

def compared_jobs(plan: planning.Plan, n_inputs: int) -> list[planning.Job]:
    """The plan's non-empty floating tensors that every input holds (a tensor only the base has is skipped)."""
    return [j for j in plan.jobs if j.dtype.is_floating_point and len(j.inputs) == n_inputs and math.prod(j.shape) > 0]


def _run(plan: planning.Plan, ckpts: dict[str, Checkpoint], n_models: int, base: str | None, gap_names: frozenset,
         threads: int, seed: int, progress: Callable[[int, int], None] | None) -> list[TensorSums]:
    """One job per floating tensor on ``threads`` threads, results in file order.

    Each job maps its inputs inside its thread and unmaps them when done, so at most ``threads`` jobs'
    input tensors are resident at once (plus 8 MB of float64 chunk per model and job).
    """
    locators = [Locator(ckpts[m]) for m in plan.models]
    jobs = compared_jobs(plan, n_models + (base is not None))
    lock = threading.Lock()
    done = [0]

    def work(job: planning.Job) -> TensorSums:
        maps = JobMaps()
        try:
            tensors = [maps.tensor(locators[i], name) for i, name in job.inputs]
            b = None if job.base is None else tensors[job.base]
            others = [t for k, t in enumerate(tensors) if k != job.base]
            sums = tensor_sums(job.name, others, b, job.name in gap_names, seed)
            del tensors, b, others
        finally:
            maps.close()
        if progress is not None:
            with lock:
                done[0] += 1
                progress(done[0], len(jobs))
        return sums

    if threads == 1:
        return [work(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="diagnose") as pool:
        return list(pool.map(work, jobs))  # an error cancels the jobs not started


def data_free(models: Sequence[Model], base: Model | None = None, *, align_gap: bool = True,
              threads: int | None = None, seed: int = 0, progress: Callable[[int, int], None] | None = None
              ) -> tuple[dict, list[dict]]:
    """(global signals, per-layer rows) of two or more models (paths or states), streamed tensor by tensor.

    Global keys: relative_distance, weight_cosine, task_vector_cosine, sign_conflict, norm_ratio,
    alignment_gap (+ _identity, _matched, _tensors), n_models, n_parameters, n_tensors, models, base,
    model_norms, task_vector_norms; None where a signal needs a base that was not given. Only floating
    tensors count (integer buffers are skipped). ``progress(done, total)`` is called after each tensor.
    """
    release_freed_memory()
    names, base_name, ckpts, mine = open_inputs(models, base)
    threads = max(1, int(threads or min(2, os.cpu_count() or 1)))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-worker single thread: the sums' bits do not depend on the core count
    try:
        plan = plan_jobs(names, base_name, ckpts)
        gap_names = gap_selection(compared_jobs(plan, len(names) + (base is not None))) if align_gap else frozenset()
        sums = _run(plan, ckpts, len(names), base_name, gap_names, threads, seed, progress)
    finally:
        torch.set_num_threads(old_threads)
        for c in mine:
            c.close()
    if not sums:
        raise MergescopeError(f"{names[0]}: no floating-point tensor in common to compare")
    return global_signals(sums, names, base_name, align_gap), [layer_row(s) for s in sums]
