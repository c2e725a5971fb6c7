"""torch's own float32 CPU reductions, reproduced bit for bit and fused with the operands they reduce.

Why: model_stock's cosines are whole-tensor torch reductions (MergeKit 0.1.5: ``torch.norm(offset, dim=-1)``
and ``(offset_i * offset_j).sum(dim=-1)``), and their bits depend on torch's summation order. Computed with
torch, each operand is first written to a tensor-sized buffer and read back: 2 passes per norm, 2 per pair,
each over every input again. Reproducing the two summation orders lets one pass over the inputs feed every
norm and every pair sum, with the same bits. DARE's L1 rescale (``|delta|.sum()`` and ``(|delta| * mask).sum()``)
likewise comes from one pass over the model and the base, and its draw needs no |delta| tensor at all.

The orders (single-threaded, contiguous, ``Vectorized<float>`` of ``lanes`` floats: 8 for AVX2, 16 for AVX512):

* ``vector_norm`` (p=2, last dim): one vector accumulator ``acc += x * x`` (multiply, then add) over the full
  vectors, its lanes folded left to right, the tail's ``acc += x * x`` (fused multiply-add where torch's build
  contracts it), then ``sqrt``.
* ``sum``: libtorch's cascade sum. The full vectors are read as rows of 4 (``ilp``), each vector added to its
  column's level-0 accumulator; after every ``2**level_power`` rows the levels carry upward; at the end the
  levels fold into level 0, leftover vectors (< 4) join column 0, the columns fold, and a scalar starts from the
  tail entries and adds the lanes left to right.

The layout (lanes, fused tail) is detected per process against torch itself (:func:`torch_layout`); where none
matches, or torch would use several threads (another order), callers keep torch's own reductions.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import kernels, pages
from .kernels import _fma, jit

Tensor = torch.Tensor
_ILP = 4  # vectors per cascade row (libtorch's ilp_factor)
_LEVELS = 4  # cascade levels (num_levels)
_MIN_ENTRIES = 1 << 12  # smaller tensors keep torch's reductions (nothing to gain)
_GRAIN = 32768  # at::internal::GRAIN_SIZE: torch reduces fewer entries on one thread whatever its thread count


def _level_power(rows: int) -> int:
    """libtorch's ``max(4, CeilLog2(rows) / num_levels)`` (CeilLog2(x) = 1 for x <= 2)."""
    ceil_log2 = 1 if rows <= 2 else (rows - 1).bit_length()
    return max(4, ceil_log2 // _LEVELS)


@jit
def _rows(w0, ws, first, last, level_power, acc, squares, offsets):
    """Rows [first, last) of the cascade: each row's offsets ``w - w0`` (4 vectors) squared into its model's norm
    lanes and multiplied pairwise into the pair's level-0 columns; every ``2**level_power`` rows the levels
    carry. ``ws``/``w0``: whole flat arrays; acc: (pairs, levels, ilp * lanes), a row's layout (column k's lanes
    at k * lanes); squares: (models, lanes); offsets: (models, ilp * lanes). Flat rows: long loops that
    vectorise (~1.5x the per-vector loops)."""
    models, lanes = len(ws), squares.shape[1]
    width = offsets.shape[1]
    step = 1 << level_power
    for r in range(first, last):
        start = np.uint64(r * width)
        for i in range(models):
            w = ws[i]
            for e in range(width):
                offsets[i, e] = w[start + np.uint64(e)] - w0[start + np.uint64(e)]
            for k in range(4):  # the norm's one accumulator takes the vectors in order
                for lane in range(lanes):
                    x = offsets[i, k * lanes + lane]
                    squares[i, lane] += x * x
        p = 0
        for i in range(models):
            for j in range(i + 1, models):
                for e in range(width):
                    acc[p, 0, e] += offsets[i, e] * offsets[j, e]
                p += 1
        if (r + 1) % step == 0:
            _carry(acc, r + 1, level_power)


@jit
def _carry(acc, done, level_power):
    """The cascade's carry after ``done`` rows (a multiple of the level step): each level into the next, up to
    the first level whose step ``done`` is not a multiple of. acc: (sums, levels, row entries)."""
    mask = (1 << level_power) - 1
    for level in range(1, 4):
        for p in range(acc.shape[0]):
            for e in range(acc.shape[2]):
                acc[p, level, e] += acc[p, level - 1, e]
                acc[p, level - 1, e] = 0
        if done & (mask << (level * level_power)) != 0:
            break


@jit
def _masked_abs_rows(t, base, mask, first, last, level_power, acc, work):
    """Rows [first, last) of two cascades at once: |t - base| and |t - base| * mask (as 1.0 / 0.0, as
    kernels.mask_), the sums of MergeKit's L1 rescale. acc: (2, levels, ilp * lanes); work: (2, ilp * lanes)."""
    width = work.shape[1]
    one, zero = np.float32(1), np.float32(0)
    step = 1 << level_power
    for r in range(first, last):
        start = np.uint64(r * width)
        for e in range(width):
            i = start + np.uint64(e)
            d = abs(t[i] - base[i])
            work[0, e] = d
            work[1, e] = d * (one if mask[i] else zero)
        for s in range(2):
            for e in range(width):
                acc[s, 0, e] += work[s, e]
        if (r + 1) % step == 0:
            _carry(acc, r + 1, level_power)


@jit
def _masked_abs_tails(t, base, mask, start):
    """The scalar sums (from 0) of the tail entries [start, n) of both cascades."""
    one, zero = np.float32(1), np.float32(0)
    total, kept = np.float32(0), np.float32(0)
    for i in range(start, t.shape[0]):
        d = abs(t[i] - base[i])
        total += d
        kept += d * (one if mask[i] else zero)
    return total, kept


@jit
def _cascade_total(acc, leftover, n_leftover, p, tail):
    """Cascade p's sum: its levels folded into level 0 per column, the leftover vectors (``leftover[p, 0, k]``)
    joined to column 0 in order, the columns folded, then the tail's scalar sum adds the lanes left to right;
    as torch stores it (0 + sum: -0.0 -> +0.0). acc, leftover: (sums, levels, ilp, lanes)."""
    lanes = acc.shape[3]
    columns = np.empty((4, lanes), np.float32)
    for k in range(4):
        for lane in range(lanes):
            x = acc[p, 0, k, lane]
            for level in range(1, 4):
                x += acc[p, level, k, lane]
            columns[k, lane] = x
    for k in range(n_leftover):
        for lane in range(lanes):
            columns[0, lane] += leftover[p, 0, k, lane]
    for lane in range(lanes):
        for k in range(1, 4):
            columns[0, lane] += columns[k, lane]
    total = tail
    for lane in range(lanes):
        total += columns[0, lane]
    return np.float32(0) + total


@jit
def _finish(w0, ws, full_vectors, fused_tail, acc, leftover, squares, norms, sums):
    """Folds and tails (see the module's docstring): sqrt of each model's squared norm into ``norms``, each pair's
    sum into ``sums``. ``leftover``: the leftover vectors' products, column k the k-th (a row of its own)."""
    models, lanes = len(ws), squares.shape[1]
    n = w0.shape[0]
    for i in range(models):
        total = squares[i, 0]
        for lane in range(1, lanes):
            total += squares[i, lane]
        for e in range(full_vectors * lanes, n):
            x = ws[i][e] - w0[e]
            total = _fma(x, x, total) if fused_tail else total + x * x
        norms[i] = np.sqrt(total)
    p = 0
    for i in range(models):
        for j in range(i + 1, models):
            tail = np.float32(0)
            for e in range(full_vectors * lanes, n):
                tail += (ws[i][e] - w0[e]) * (ws[j][e] - w0[e])
            sums[p] = _cascade_total(acc, leftover, full_vectors % 4, p, tail)
            p += 1


def offset_reductions(w0: Tensor, ws: list[Tensor], lanes: int, fused_tail: bool) -> tuple[np.ndarray, np.ndarray]:
    """(norms of ``w - w0`` per model, sums of ``(w_i - w0) * (w_j - w0)`` per pair i < j), float32, as
    torch's single-threaded ``vector_norm(dim=-1)`` and ``sum(dim=-1)`` of those tensors compute them, in one
    pass over flat contiguous float32 inputs; the inputs' mapped pages are released window by window."""
    flat_w0 = w0.detach().reshape(-1).numpy()
    flat = tuple(w.detach().reshape(-1).numpy() for w in ws)
    n, models = flat_w0.shape[0], len(flat)
    pairs = models * (models - 1) // 2
    squares = np.zeros((models, lanes), np.float32)
    offsets = np.empty((models, _ILP * lanes), np.float32)
    acc, leftover = _cascades(_rows, (flat_w0, flat), (w0, *ws), pairs, n, lanes, (squares, offsets))
    norms, sums = np.empty(models, np.float32), np.empty(pairs, np.float32)
    _finish(flat_w0, flat, n // lanes, fused_tail, acc, leftover, squares, norms, sums)
    return norms, sums


def masked_abs_sums(t: Tensor, base: Tensor, mask: Tensor, lanes: int) -> tuple[np.float32, np.float32]:
    """(sum of |t - base|, sum of |t - base| * mask) as torch's single-threaded ``sum()`` of those float32 tensors
    computes them (MergeKit's L1 rescale of a sparsified task vector), in one pass over t, base and the bool mask,
    without the |t - base| tensor; the inputs' mapped pages are released window by window."""
    arrays = (t.detach().reshape(-1).numpy(), base.detach().reshape(-1).numpy(), mask.reshape(-1).numpy())
    n = arrays[0].shape[0]
    work = np.empty((2, _ILP * lanes), np.float32)
    acc, leftover = _cascades(_masked_abs_rows, arrays, (t, base), 2, n, lanes, (work,))
    full_vectors = n // lanes
    tails = _masked_abs_tails(*arrays, full_vectors * lanes)
    return tuple(np.float32(_cascade_total(acc, leftover, full_vectors % 4, p, np.float32(tails[p]))) for p in (0, 1))


def _cascades(kernel, arrays: tuple, released: tuple, sums: int, n: int, lanes: int, scratch: tuple):
    """Runs ``kernel(*arrays, first, last, level_power, acc, *scratch)`` over the full rows of ``sums`` cascades in
    windows (``released``' mapped pages given back behind each), then over the leftover vectors (< 4) as one
    zero-padded row of their own (zeros add nothing to a norm's lanes; _cascade_total adds only the leftover
    vectors' columns). Returns (acc, leftover), each (sums, levels, ilp, lanes)."""
    row_entries = _ILP * lanes
    full_vectors = n // lanes
    rows = full_vectors // 4
    acc = np.zeros((sums, _LEVELS, _ILP, lanes), np.float32)
    flat_acc = acc.reshape(sums, _LEVELS, row_entries)  # the kernels' view of it
    power = _level_power(rows)
    window_rows = max(1, kernels.WINDOW // row_entries)  # the fused kernels' windows
    for first in range(0, rows, window_rows):
        last = min(rows, first + window_rows)
        kernel(*arrays, first, last, power, flat_acc, *scratch)
        for t in released:
            pages.release(t.reshape(-1), first * row_entries, last * row_entries)
    leftover = np.zeros_like(acc)
    start, stop = rows * row_entries, full_vectors * lanes
    if stop > start:
        padded = tuple(_padded(x, start, stop, row_entries) for x in arrays)
        kernel(*padded, 0, 1, power, leftover.reshape(flat_acc.shape), *scratch)
    return acc, leftover


def _padded(values, start: int, stop: int, width: int):
    """values[start:stop] at the front of ``width`` zeros (False for a mask); a tuple: each of its arrays."""
    if isinstance(values, tuple):
        return tuple(_padded(x, start, stop, width) for x in values)
    row = np.zeros(width, values.dtype)
    row[: stop - start] = values[start:stop]
    return row


def _torch_reductions(w0: Tensor, ws: list[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    offsets = [w - w0 for w in ws]
    norms = np.array([float(torch.linalg.vector_norm(d, dim=-1)) for d in offsets], np.float32)
    sums = np.array([float((offsets[i] * offsets[j]).sum(dim=-1)) for i in range(len(ws))
                     for j in range(i + 1, len(ws))], np.float32)
    return norms, sums


@functools.cache
def torch_layout() -> tuple[int, bool] | None:
    """(lanes, fused tail) for which :func:`offset_reductions` gives torch's bits on this machine, found by
    comparing with torch on probes small enough that torch reduces them on one thread; None if none does."""
    rng = np.random.default_rng(0)
    probes = []
    for n in (_MIN_ENTRIES + 13, 20000 + 7, _GRAIN - 3):
        arrays = [torch.from_numpy(rng.standard_normal(n).astype(np.float32) * scale) for scale in (1, 1.5, 0.7)]
        probes.append((arrays[0], arrays[1:] + [arrays[1] + arrays[2] * np.float32(0.01)]))
    expected = [_torch_reductions(w0, ws) for w0, ws in probes]
    for lanes in (16, 8, 4, 32):
        for fused_tail in (True, False):
            if all(all(np.array_equal(a, b) for a, b in zip(offset_reductions(w0, ws, lanes, fused_tail), want))
                   for (w0, ws), want in zip(probes, expected)):
                return lanes, fused_tail
    return None


def fits(w0: Tensor, ws: list[Tensor]) -> bool:
    """Whether :func:`offset_reductions` reproduces torch here: flat contiguous CPU float32 inputs of one size,
    large enough to pay, and torch reducing them on one thread (as the merge engine's workers do)."""
    n = w0.numel()
    return (n >= _MIN_ENTRIES and len(ws) >= 2
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 1 and t.is_contiguous()
                    and t.numel() == n for t in (w0, *ws))
            and (torch.get_num_threads() == 1 or n < _GRAIN)
            and torch_layout() is not None)
