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
from .kernels import _as_float, _bf16_round, _bf16_round_inner, _bf16_value, _fma, jit

Tensor = torch.Tensor
_ILP = 4  # vectors per cascade row (libtorch's ilp_factor)
_LEVELS = 4  # cascade levels (num_levels)
MIN_ENTRIES = 1 << 12  # smaller tensors keep torch's reductions (nothing to gain)
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


_BLOCK_ROWS = 64  # rows filled per call of _add_rows (2 x 64 x 32 floats of work: in L1)


@jit
def _add_rows(acc, work, first, rows, level_power):
    """Rows [first, first + rows) of the cascades whose row-major operands ``work`` holds: each row added to level
    0, the levels carried every ``2**level_power`` rows. acc: (sums, levels, ilp * lanes)."""
    width = acc.shape[2]
    step = 1 << level_power
    for r in range(rows):
        for s in range(acc.shape[0]):
            for e in range(width):
                acc[s, 0, e] += work[s, r * width + e]
        if (first + r + 1) % step == 0:
            _carry(acc, first + r + 1, level_power)


@jit
def _masked_abs_rows(t, base, mask, first, last, level_power, acc, work):
    """Rows [first, last) of two cascades at once: |t - base| and |t - base| * mask (as 1.0 / 0.0, as
    kernels.mask_), the sums of MergeKit's L1 rescale. acc: (2, levels, ilp * lanes); work: (2, _BLOCK_ROWS x
    ilp * lanes), filled block by block."""
    width = acc.shape[2]
    one, zero = np.float32(1), np.float32(0)
    for block in range(first, last, _BLOCK_ROWS):
        rows = min(_BLOCK_ROWS, last - block)
        start = np.uint64(block * width)
        for e in range(rows * width):
            i = start + np.uint64(e)
            d = abs(t[i] - base[i])
            work[0, e] = d
            work[1, e] = d * (one if mask[i] else zero)
        _add_rows(acc, work, block, rows, level_power)


@jit
def _bf16_masked_abs_rows(t, base, mask, first, last, level_power, acc, work):
    """:func:`_masked_abs_rows` for bf16 bit arrays, as torch sums a bf16 tensor: |t - base| rounded to bf16 as
    torch's bf16 sub and abs give it, a dropped entry +0.0 (mask_ on bit patterns; a non-finite sum sends the
    caller to torch), and each vector of 2 x lanes entries loaded as the float sum of its two halves (libtorch's
    bf16 load policy: lane l gets entry l + entry lanes + l)."""
    lanes = acc.shape[2] // 4
    zero = np.float32(0)
    for block in range(first, last, _BLOCK_ROWS):
        rows = min(_BLOCK_ROWS, last - block)
        start = np.uint64(block * 8 * lanes)
        for v in range(rows * 4):  # vectors of 2 x lanes entries
            for lane in range(lanes):
                i = start + np.uint64(2 * v * lanes + lane)
                j = i + np.uint64(lanes)
                x = abs(_bf16_round(_bf16_value(t[i]) - _bf16_value(base[i])))
                y = abs(_bf16_round(_bf16_value(t[j]) - _bf16_value(base[j])))
                work[0, v * lanes + lane] = x + y
                work[1, v * lanes + lane] = (x if mask[i] else zero) + (y if mask[j] else zero)
        _add_rows(acc, work, block, rows, level_power)


@jit
def _bf16_masked_abs_tails(t, base, mask, start):
    """The scalar sums (from 0) of the tail entries [start, n) of both bf16 cascades."""
    zero = np.float32(0)
    total, kept = zero, zero
    for i in range(start, t.shape[0]):
        d = abs(_bf16_round(_bf16_value(t[i]) - _bf16_value(base[i])))
        total += d
        kept += d if mask[i] else zero
    return total, kept


@jit
def _quotient_product_rows(a, b, first, last, level_power, acc, work, divisors):
    """Rows [first, last) of the cascade of ``(a / divisors[0]) * (b / divisors[1])`` (each step rounded to
    float32, as torch's div, div, mul): slerp's dot of the normalised vectors. acc: (1, levels, ilp * lanes).
    a, b: float32, or bf16 bits read as their float32 values (torch's ops on the float32 copy)."""
    width = acc.shape[2]
    da, db = divisors[0], divisors[1]
    for block in range(first, last, _BLOCK_ROWS):
        rows = min(_BLOCK_ROWS, last - block)
        start = np.uint64(block * width)
        for e in range(rows * width):
            i = start + np.uint64(e)
            work[0, e] = (_as_float(a[i]) / da) * (_as_float(b[i]) / db)
        _add_rows(acc, work, block, rows, level_power)


@jit
def _quotient_product_tail(a, b, start, divisors):
    total = np.float32(0)
    for i in range(start, a.shape[0]):
        total += (_as_float(a[i]) / divisors[0]) * (_as_float(b[i]) / divisors[1])
    return total


@jit
def _two_norms(a, b, lanes, fused_tail, norms):
    """``vector_norm`` of a and of b as torch's float32 kernel takes it (see the module's docstring: one vector
    accumulator ``acc += x * x``, lanes folded left to right, the tail's scalar steps, sqrt), in one pass over
    both; bf16 bits read as their float32 values. norms: 2 float32 out."""
    n = a.shape[0]
    full = n // lanes
    acc = np.zeros((2, lanes), np.float32)
    for v in range(full):
        start = np.uint64(v * lanes)  # unsigned: no negative-index check in the loop (it would not vectorise)
        for lane in range(lanes):
            i = start + np.uint64(lane)
            x, y = _as_float(a[i]), _as_float(b[i])
            acc[0, lane] += x * x
            acc[1, lane] += y * y
    for k in range(2):
        values = a if k == 0 else b
        total = acc[k, 0]
        for lane in range(1, lanes):
            total += acc[k, lane]
        for e in range(full * lanes, n):
            x = _as_float(values[e])
            total = _fma(x, x, total) if fused_tail else total + x * x
        norms[k] = np.sqrt(total)


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
    total = np.float32(tail)  # a float64 start would make every add below a float64 one
    for lane in range(lanes):
        total += columns[0, lane]
    return np.float32(0) + total


@jit
def _bf16_rows(w0, ws, first, last, level_power, acc, squares, offsets):
    """:func:`_rows` on bf16 bit arrays, as torch reduces bf16 tensors: offsets rounded to bf16 (torch's bf16 sub),
    each vector of 2 x lanes entries squared into the norm lanes half by half (``acc += f0 * f0; acc += f1 * f1``),
    and the bf16-rounded pair products loaded as the float sum of the vector's two halves. offsets: (models,
    8 * lanes), a row's entries."""
    models, lanes = len(ws), squares.shape[1]
    width = offsets.shape[1]
    step = 1 << level_power
    for r in range(first, last):
        start = np.uint64(r * width)
        for i in range(models):
            w = ws[i]
            for e in range(width):
                x = start + np.uint64(e)
                offsets[i, e] = _bf16_round_inner(_bf16_value(w[x]) - _bf16_value(w0[x]))
            for half in range(8):  # 4 vectors x 2 halves, in order
                for lane in range(lanes):
                    x = offsets[i, half * lanes + lane]
                    squares[i, lane] += x * x
        p = 0
        for i in range(models):
            for j in range(i + 1, models):
                for k in range(4):
                    for lane in range(lanes):
                        e0, e1 = 2 * k * lanes + lane, (2 * k + 1) * lanes + lane
                        x0 = _bf16_round_inner(offsets[i, e0] * offsets[j, e0])
                        x1 = _bf16_round_inner(offsets[i, e1] * offsets[j, e1])
                        acc[p, 0, k * lanes + lane] += x0 + x1
                p += 1
        if (r + 1) % step == 0:
            _carry(acc, r + 1, level_power)


@jit
def _finish(tails, round_products, fused_tail, full_vectors, acc, leftover, squares, norms, sums):
    """Folds and tails (see the module's docstring): sqrt of each model's squared norm into ``norms``, each pair's
    sum into ``sums``. ``tails``: (models, tail) the operands past the full vectors; products rounded to bf16 with
    ``round_products``. ``leftover``: the leftover vectors' products, column k the k-th (a row of its own)."""
    models, lanes = tails.shape[0], squares.shape[1]
    for i in range(models):
        total = squares[i, 0]
        for lane in range(1, lanes):
            total += squares[i, lane]
        for e in range(tails.shape[1]):
            x = tails[i, e]
            total = _fma(x, x, total) if fused_tail else total + x * x
        norms[i] = np.sqrt(total)
    p = 0
    for i in range(models):
        for j in range(i + 1, models):
            tail = np.float32(0)
            for e in range(tails.shape[1]):
                product = tails[i, e] * tails[j, e]
                tail += _bf16_round(product) if round_products else product
            sums[p] = _cascade_total(acc, leftover, full_vectors % 4, p, tail)
            p += 1


def offset_reductions(w0: Tensor, ws: list[Tensor], lanes: int, fused_tail: bool) -> tuple[np.ndarray, np.ndarray]:
    """(norms of ``w - w0`` per model, sums of ``(w_i - w0) * (w_j - w0)`` per pair i < j) as float32 values of
    the inputs' dtype, as torch's single-threaded ``vector_norm(dim=-1)`` and ``sum(dim=-1)`` of those tensors
    compute them, in one pass over flat contiguous float32 or bf16 inputs (bf16: each op rounded as torch's
    bf16 ops, the results as float32 to round to bf16 once); the inputs' mapped pages are released window by
    window."""
    bf16 = w0.dtype == torch.bfloat16
    flat_w0, *flat = (_flat(t) for t in (w0, *ws))
    flat = tuple(flat)
    n, models = flat_w0.shape[0], len(flat)
    pairs = models * (models - 1) // 2
    vector = 2 * lanes if bf16 else lanes
    squares = np.zeros((models, lanes), np.float32)
    offsets = np.empty((models, _ILP * vector), np.float32)
    kernel = _bf16_rows if bf16 else _rows
    acc, leftover = _cascades(kernel, (flat_w0, flat), pages.reread(w0, *ws), pairs, n, vector, lanes,
                              (squares, offsets))
    full_vectors = n // vector
    tails = torch.stack([w.reshape(-1)[full_vectors * vector:] - w0.reshape(-1)[full_vectors * vector:]
                         for w in ws]).float().numpy()  # torch's own sub (and bf16 rounding) on the few left
    norms, sums = np.empty(models, np.float32), np.empty(pairs, np.float32)
    _finish(tails, bf16, fused_tail, full_vectors, acc, leftover, squares, norms, sums)
    return norms, sums


def _flat(t: Tensor) -> np.ndarray:
    """A flat numpy view: float32 values, or bf16 bit patterns as uint16."""
    flat = t.detach().reshape(-1)
    return flat.view(torch.int16).numpy().view(np.uint16) if flat.dtype == torch.bfloat16 else flat.numpy()


def masked_abs_sums(t: Tensor, base: Tensor, mask: Tensor, lanes: int) -> tuple[Tensor, Tensor] | None:
    """(sum of |t - base|, sum of |t - base| * mask) as 0-d tensors of t's dtype, as torch's single-threaded
    ``sum()`` of those float32 or bf16 tensors computes them (MergeKit's L1 rescale of a sparsified task vector:
    bf16 steps rounded as torch's bf16 ops), in one pass over t, base and the bool mask, without the |t - base|
    tensor; the inputs' mapped pages are released window by window. None for bf16 whose sum is not finite
    (an inf or NaN |t - base|: torch's NaN bits come from the caller's torch path)."""
    bf16 = t.dtype == torch.bfloat16
    arrays = (_flat(t), _flat(base), mask.reshape(-1).numpy())
    n, vector = arrays[0].shape[0], lanes * (2 if bf16 else 1)
    work = np.empty((2, _BLOCK_ROWS * _ILP * lanes), np.float32)
    kernel = _bf16_masked_abs_rows if bf16 else _masked_abs_rows
    acc, leftover = _cascades(kernel, arrays, pages.reread(t, base), 2, n, vector, lanes, (work,))
    full_vectors = n // vector
    tails = (_bf16_masked_abs_tails if bf16 else _masked_abs_tails)(*arrays, full_vectors * vector)
    sums = [_cascade_total(acc, leftover, full_vectors % 4, p, np.float32(tails[p])) for p in (0, 1)]
    if bf16 and not np.isfinite(sums[0]):  # an inf or NaN |t - base| (or the sum overflowed): torch's path
        return None
    return tuple(torch.tensor(np.float32(x)).to(t.dtype) for x in sums)  # torch's store: rounded once


def two_norms(a: Tensor, b: Tensor, lanes: int, fused_tail: bool) -> np.ndarray:
    """(``vector_norm(a)``, ``vector_norm(b)``) of flat bf16 a and b's float32 copies (or float32 ones) as torch's
    single-threaded float32 kernel gives them, in one pass over both, without the copies: bf16 slerp's
    per-chunk norms (a float32 pair: torch's own vector kernel is ~5x this loop)."""
    norms = np.empty(2, np.float32)
    _two_norms(_flat(a), _flat(b), lanes, fused_tail, norms)
    return norms


def quotient_product_sum(a: Tensor, b: Tensor, norm_a: float, norm_b: float, lanes: int) -> np.float32:
    """``((a / norm_a) * (b / norm_b)).sum()`` of flat float32 a and b (or bf16 ones: of their float32 copies) as
    torch's single-threaded ops give it, in one pass without the quotients' tensors (slerp's per-chunk dot); a
    and b's mapped pages are released."""
    arrays = (_flat(a), _flat(b))
    n = arrays[0].shape[0]
    divisors = np.array([norm_a, norm_b], np.float32)
    work = np.empty((1, _BLOCK_ROWS * _ILP * lanes), np.float32)
    acc, leftover = _cascades(_quotient_product_rows, arrays, pages.reread(a, b), 1, n, lanes, lanes, (work, divisors))
    full_vectors = n // lanes
    tail = np.float32(_quotient_product_tail(*arrays, full_vectors * lanes, divisors))  # float32 in: float32 adds
    return np.float32(_cascade_total(acc, leftover, full_vectors % 4, 0, tail))


def _cascades(kernel, arrays: tuple, released: tuple, sums: int, n: int, vector: int, lanes: int, scratch: tuple):
    """Runs ``kernel(*arrays, first, last, level_power, acc, *scratch)`` over the full rows (4 vectors of ``vector``
    entries each) of ``sums`` cascades in windows (``released``' mapped pages given back behind each), then over
    the leftover vectors (< 4) as one zero-padded row of their own (zeros add nothing to a norm's lanes;
    _cascade_total adds only the leftover vectors' columns). Returns (acc, leftover), each (sums, levels, ilp,
    lanes)."""
    row_entries = _ILP * vector
    full_vectors = n // vector
    rows = full_vectors // 4
    acc = np.zeros((sums, _LEVELS, _ILP, lanes), np.float32)
    flat_acc = acc.reshape(sums, _LEVELS, _ILP * lanes)  # the kernels' view of it
    power = _level_power(rows)
    window_rows = max(1, kernels.WINDOW // row_entries)  # the fused kernels' windows
    for first in range(0, rows, window_rows):
        last = min(rows, first + window_rows)
        kernel(*arrays, first, last, power, flat_acc, *scratch)
        for t in released:
            pages.release(t.reshape(-1), first * row_entries, last * row_entries)
    leftover = np.zeros_like(acc)
    start, stop = rows * row_entries, full_vectors * vector
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


def _torch_reductions(w0: Tensor, ws: list[Tensor], dtype: torch.dtype = torch.float32):
    """torch's own norms and pair sums of the offsets: float32 arrays, or (with ``dtype`` bf16) bf16 tensors."""
    offsets = [w - w0 for w in ws]
    norms = torch.stack([torch.linalg.vector_norm(d, dim=-1) for d in offsets])
    sums = torch.stack([(offsets[i] * offsets[j]).sum(dim=-1) for i in range(len(ws)) for j in range(i + 1, len(ws))])
    return (norms, sums) if dtype == torch.bfloat16 else (norms.numpy(), sums.numpy())


@functools.cache
def torch_layout() -> tuple[int, bool] | None:
    """(lanes, fused tail) for which :func:`offset_reductions` gives torch's bits on this machine, found by
    comparing with torch on probes small enough that torch reduces them on one thread; None if none does."""
    rng = np.random.default_rng(0)
    probes = []
    for n in (MIN_ENTRIES + 13, 20000 + 7, _GRAIN - 3):
        arrays = [torch.from_numpy(rng.standard_normal(n).astype(np.float32) * scale) for scale in (1, 1.5, 0.7)]
        probes.append((arrays[0], arrays[1:] + [arrays[1] + arrays[2] * np.float32(0.01)]))
    expected = [_torch_reductions(w0, ws) for w0, ws in probes]
    for lanes in (16, 8, 4, 32):
        for fused_tail in (True, False):
            if all(all(np.array_equal(a, b) for a, b in zip(offset_reductions(w0, ws, lanes, fused_tail), want))
                   for (w0, ws), want in zip(probes, expected)):
                return lanes, fused_tail
    return None


def fits(w0: Tensor, ws: list[Tensor], dtype: torch.dtype = torch.float32, as_float32: bool = False) -> bool:
    """Whether these reductions reproduce torch's here: flat contiguous CPU inputs of ``dtype`` (float32; bf16 for
    :func:`masked_abs_sums`) and one size, large enough to pay, and torch reducing them on one thread (as the
    merge engine's workers do). ``as_float32``: bf16 inputs that torch reduces as a float32 copy (slerp's
    chunks), so float32's layout is the one to match."""
    n = w0.numel()
    return (n >= MIN_ENTRIES and len(ws) >= 2
            and all(t.dtype == dtype and t.device.type == "cpu" and t.dim() == 1 and t.is_contiguous()
                    and t.numel() == n for t in (w0, *ws))
            and (torch.get_num_threads() == 1 or n < _GRAIN)
            and torch_layout() is not None and (dtype == torch.float32 or as_float32 or bf16_matches()))


@functools.cache
def bf16_matches() -> bool:
    """Whether :func:`masked_abs_sums` and :func:`offset_reductions` of bf16 tensors give torch's bits here
    (libtorch's bf16 loads: 2 x lanes entries per vector), checked on probes torch reduces on one thread."""
    rng = np.random.default_rng(1)
    lanes, fused_tail = torch_layout()
    same = lambda got, want: all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(got, want))
    for n in (MIN_ENTRIES + 29, 20000 + 3, _GRAIN - 5):
        base = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).bfloat16()
        ts = [(base.float() + torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * s).bfloat16()
              for s in (0.01, 0.1, 0.05)]
        mask = torch.from_numpy(rng.random(n) < 0.4)
        magnitude = (ts[0] - base).abs()
        got = masked_abs_sums(ts[0], base, mask, lanes)
        if got is None or not same(got, (magnitude.sum(), (magnitude * mask).sum())):
            return False
        norms, sums = offset_reductions(base, ts, lanes, fused_tail)
        want = _torch_reductions(base, ts, torch.bfloat16)
        if not same([torch.from_numpy(norms).bfloat16(), torch.from_numpy(sums).bfloat16()], want):
            return False
    return True
