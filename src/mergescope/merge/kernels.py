"""Fused element loops for the task-vector family and linear, bit-identical to methods.py's torch chains.

Why: the torch chain sends every element through 10-20 separate kernels (delta, mask, rescale, weight,
sum, sign election, divide, scale, add), each a full pass over memory; one loop per element (float) or
per L1-resident block (bf16) does the same IEEE operations in the same order and rounding, once. No
fastmath (no reassociation, no contraction), so each ``a * b`` and ``a + b`` rounds as torch's kernel does; where torch contracts
(``addcmul_``: linear's ``acc + t * w``, and the election's ``kept + d * agree`` where only the NaN
that survives ``inf * 0 + NaN`` depends on it) a run-time probe says whether it fuses, and LLVM's fma
does the same. L1 sums are torch's, or merge/reductions.py's bit-exact replay of its order (a float64 or
serial sum gives other bits). The kernels release
the GIL (the engine calls methods from two worker threads). The wrappers call a loop one WINDOW of entries
at a time and give back the file-mapped pages of each window once done (merge/pages.py): a job's mapped
inputs and output slot stay resident a window at a time, not whole. numba is imported here, and methods.py
imports this module only when a merge runs, so ``import mergescope`` never loads it. Callers check
:func:`fits` first: anything that does not (half precision, mixed dtypes, non-CPU, strided) stays on
the torch path. :func:`pcg64_float32` draws numpy's PCG64 float32 stream bit for bit (DARE's and DELLA's
uniforms), faster than numpy's per-value bit-generator calls and with DARE's compare fused in.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba.core import types as nbtypes
from numba.extending import intrinsic, overload

from . import blas_probe, finite, pages

blas_probe.apply()  # before numba's CPU target loads: the executable skips its scipy import (merge/blas_probe.py)

Tensor = torch.Tensor
BLOCK = 2048  # entries per block of the bf16 loops: the per-block scratch stays in L1/L2
# Entries per call of a loop: the wrappers pass over a tensor window by window and give back each
# window's file-mapped pages (inputs, output slot) once done (merge/pages.py), so a job keeps a few
# windows resident, not whole tensors. A multiple of BLOCK, so the blocks are the unwindowed call's;
# the loops are elementwise anyway: the same bits.
WINDOW = pages.WINDOW
assert WINDOW % BLOCK == 0
FLOATS = (torch.float32, torch.float64)


def jit(kernel, **options):
    """numba.njit for the merge engine's kernels (here and merge/select.py): compiled once per machine
    (numba's on-disk cache; per process where no cache folder is writable), GIL-free (the engine's
    worker threads)."""
    options = {"nogil": True, **options}
    try:
        return numba.njit(cache=True, **options)(kernel)
    except RuntimeError:  # no writable cache folder (read-only install, no home)
        return numba.njit(**options)(kernel)


def _jit(kernel):
    """:func:`jit`, a float division by 0 giving inf / NaN as torch's does."""
    return jit(kernel, error_model="numpy")


@intrinsic
def _prefetch(typingctx, array, index):
    """A hint to load the cache line of ``array[index]`` into the caches (LLVM's llvm.prefetch: a read, kept in
    every level); it changes no value."""
    if not isinstance(array, nbtypes.Array):
        return None

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        data = context.make_array(signature.args[0])(context, builder, value=args[0]).data
        byte = ir.IntType(8).as_pointer()
        int32 = ir.IntType(32)
        name = "llvm.prefetch.p0"
        hint = builder.module.globals.get(name) or ir.Function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte, int32, int32, int32]), name)
        builder.call(hint, [builder.bitcast(builder.gep(data, [args[1]]), byte), ir.Constant(int32, 0),
                            ir.Constant(int32, 3), ir.Constant(int32, 1)])
        return context.get_dummy_value()
    return nbtypes.void(array, nbtypes.int64), codegen


@jit
def _prefetch_range(array, start, stop):
    """:func:`_prefetch` each 64-byte line of ``array[start:stop]`` (clipped to the array). Why: inside a merge
    job the bf16 task-vector loop ran at its speed with the caches flushed, and it makes eight passes over each
    block's scratch: time for the next block's lines, asked for here, to arrive (bf16 TIES's combine, one 2.9
    M-entry tensor: 3.8 -> 2.8 ns a position inside a job). Loops that are an input's first pass in a job, or one
    fused pass (the float32 ones), measured no faster or slower with it (docs/merge.md)."""
    step = max(1, 64 // array.itemsize)
    for q in range(start, min(stop, array.size), step):
        _prefetch(array, q)


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's llvm.fma), the contraction torch's addcmul_ compiles to."""
    if isinstance(a, nbtypes.Float) and a == b == c:
        def codegen(context, builder, signature, args):
            return builder.fma(*args)
        return a(a, b, c), codegen
    return None


@_jit
def _task_vectors(out, base, tensors, masks, factors, weights, consts, consensus, normalize, scale, fused):
    """methods.generalized_task_arithmetic per entry; consts = (total, lam, 0, 1, -1) in the work dtype.

    Each model's delta is w * (factor * (mask * (t - b))), one rounding per step as torch's in-place mul_s
    (a factor of 1 and a kept entry's mask 1 are exact: x * 1 is x, NaN included, and t - b never leaves
    a signalling NaN), summed d_0 + d_1 + ... (from d_0: -0.0 survives), then the sign election
    recomputes the deltas (cheaper than storing them). Scalars per entry, no per-block arrays: LLVM
    vectorises this form across entries (measured 2-2.6x the block-of-passes loop it replaced).
    ``masks``: a tuple with every model's mask, or None (numba compiles each case apart, no branch left).
    """
    total, lam, zero, one, minus = consts[0], consts[1], consts[2], consts[3], consts[4]
    models = len(tensors)
    for k in range(base.size):
        b = base[k]
        mixed = zero
        for i in range(models):
            d = tensors[i][k] - b
            if masks is not None:
                d = d * (one if masks[i][k] else zero)
            d = (d * factors[i]) * weights[i]
            mixed = d if i == 0 else mixed + d
        divisor = total
        if consensus:  # _sign_consensus: majority = sign(sum) (>= 0 is +); the agreeing deltas and weights
            sign = one if mixed >= zero else minus
            kept, divisor = zero, zero
            for i in range(models):
                d = tensors[i][k] - b
                if masks is not None:
                    d = d * (one if masks[i][k] else zero)
                d = (d * factors[i]) * weights[i]
                agree = one if d * sign > zero else zero  # d * agree: a NaN or inf delta poisons, as in torch
                # addcmul_: the product is exact; fused only decides which NaN survives inf * 0 + NaN
                kept = _fma(d, agree, kept) if fused else kept + d * agree
                divisor = divisor + weights[i] * agree
            if divisor == zero:
                divisor = one
            mixed = kept
        if normalize:
            mixed = mixed / divisor
        if scale:
            mixed = mixed * lam
        out[k] = b + mixed


@_jit
def _weighted_sum(out, tensors, weights, total, normalize, fused):
    """methods.linear's chunk loop: acc = 0; acc += t_i * w_i (fused when torch's addcmul_ is); / total. A scalar
    accumulator per entry, not a block of them: LLVM vectorises this form (measured 2.3x the block loop)."""
    zero = np.zeros(1, out.dtype)[0]
    for k in range(out.size):
        acc = zero
        for i in range(len(tensors)):
            acc = _fma(tensors[i][k], weights[i], acc) if fused else acc + tensors[i][k] * weights[i]
        out[k] = acc / total if normalize else acc


@_jit
def _abs_diff(out, t, base):
    for k in range(out.size):
        out[k] = abs(t[k] - base[k])


_HISTOGRAM_BLOCK = 4096  # entries per block: computed (vectorised), then counted while still in L1


@jit
def _count_patterns(bits, shift, hist, top):
    """hist[pattern >> shift] += 1 per entry; returns the largest pattern seen (and ``top``)."""
    for k in range(bits.shape[0]):
        hist[bits[k] >> shift] += 1
        top = max(top, bits[k])
    return top


@_jit
def _abs_diff_counted(out, t, base, hist):
    """:func:`_abs_diff` (float32), counting the top 16 bits of each result's pattern into ``hist``; returns the
    largest pattern (select.py's radix select needs exactly this histogram of |delta|)."""
    bits, top = out.view(np.uint32), np.uint32(0)
    for start in range(0, out.shape[0], _HISTOGRAM_BLOCK):
        stop = min(out.shape[0], start + _HISTOGRAM_BLOCK)
        _abs_diff(out[start:stop], t[start:stop], base[start:stop])
        top = _count_patterns(bits[start:stop], np.uint32(16), hist, top)
    return top


@jit
def _bf16_abs_diff(out, t, base):
    """bf16 ``(t - base).abs_()`` on bit patterns: the float32 difference rounded to bf16 (one rounding, as
    torch's), sign cleared."""
    for k in range(out.shape[0]):
        out[k] = _bf16_bits(abs(_bf16_round(_bf16_value(t[k]) - _bf16_value(base[k]))))


@jit
def _bf16_abs_diff_counted(out, t, base, hist):
    """:func:`_bf16_abs_diff`, counting every result's 16-bit pattern into ``hist``; returns the largest."""
    top = np.uint16(0)
    for start in range(0, out.shape[0], _HISTOGRAM_BLOCK):
        stop = min(out.shape[0], start + _HISTOGRAM_BLOCK)
        _bf16_abs_diff(out[start:stop], t[start:stop], base[start:stop])
        top = _count_patterns(out[start:stop], np.uint16(0), hist, top)
    return top


@_jit
def _offsets(out, a, b, w0, pair):
    """model_stock's cosine operands: ``a - w0``, or with ``pair`` ``(a - w0) * (b - w0)``; each step rounded
    to the dtype, as torch's sub, sub, mul."""
    if pair:
        for k in range(out.size):
            out[k] = (a[k] - w0[k]) * (b[k] - w0[k])
    else:
        for k in range(out.size):
            out[k] = a[k] - w0[k]


@_jit
def _stock_mix(out, tensors, w0, ratio, keep, width, count, zero):
    """model_stock's ``ratio * (sum(ws) / count) + keep * w0`` with torch's roundings: Python's sum starts
    from 0 (so -0.0 + 0 is +0.0, as torch's ``0 + t``). Rows of ``width`` entries, one ratio per row.
    Returns how many stored entries are not finite (merge/finite.py)."""
    bad = 0
    for r in range(out.size // width):
        rt, kp = ratio[r], keep[r]
        for j in range(np.uint64(r * width), np.uint64((r + 1) * width)):  # unsigned: no negative-index check
            acc = zero + tensors[0][j]
            for i in range(1, len(tensors)):
                acc = acc + tensors[i][j]
            x = rt * (acc / count) + kp * w0[j]
            out[j] = x
            bad += not np.isfinite(x)
    return bad


@jit
def _bf16_round_inner(x):
    """float32 -> the nearest bf16 (ties to even), as a float32, without :func:`_bf16_round`'s NaN select: for a
    kernel's intermediate values (~20 % of model_stock's bf16 reduction pass, ~12 % of the bf16 task-vector
    loop). Exact when a NaN ``x`` has its low 16 bits zero, as every NaN computed from bf16 values has: an IEEE
    op returns one of its NaN operands (quieted) or the default NaN 0xFFC00000, and adding 0x7FFF or 0x8000 to
    zero low bits carries nothing into the high ones. Such a NaN keeps its own sign and payload, so the
    rounding whose bits a kernel stores stays :func:`_bf16_round` (torch's canonical NaN)."""
    u = np.float32(x).view(np.uint32)
    up = np.uint32(u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return np.uint32(up & np.uint32(0xFFFF0000)).view(np.float32)


@jit
def _bf16_round(x):
    """float32 -> the nearest bf16 (ties to even), as a float32: how torch rounds each bf16 op's float32
    result (NaN -> its canonical NaN). Branch-free, so the block loops vectorise."""
    rounded = _bf16_round_inner(x)
    return np.float32(np.nan) if np.isnan(x) else rounded


@jit
def _bf16_value(bits):
    return np.uint32(np.uint32(bits) << np.uint32(16)).view(np.float32)


def _as_float(x):
    """An entry of a float array as it is, a bf16 bit pattern (uint16) as its float32 value: one kernel
    serves float32 arrays and bf16 ones whose torch ops run on a float32 copy (numba only)."""
    raise NotImplementedError("numba-compiled kernels only")


@overload(_as_float)
def _as_float_typed(x):
    if isinstance(x, nbtypes.Integer):
        return lambda x: _bf16_value(x)
    return lambda x: x


@jit
def _bf16_bits(x):
    """The bf16 bit pattern of a float32 that holds a bf16 value (as _bf16_round returns)."""
    return np.uint16(np.float32(x).view(np.uint32) >> np.uint32(16))


@jit
def _bf16_offsets(out, a, b, w0, pair):
    """:func:`_offsets` on bf16 bit arrays: ``bf16(a - w0)``, or ``bf16(bf16(a - w0) * bf16(b - w0))``, each step
    a float32 operation rounded to bf16, as torch's bf16 sub, sub, mul."""
    if pair:
        for k in range(out.size):
            w = _bf16_value(w0[k])
            d = _bf16_round(_bf16_round(_bf16_value(a[k]) - w) * _bf16_round(_bf16_value(b[k]) - w))
            out[k] = _bf16_bits(d)
    else:
        for k in range(out.size):
            out[k] = _bf16_bits(_bf16_round(_bf16_value(a[k]) - _bf16_value(w0[k])))


@jit
def _bf16_stock_mix(out, tensors, w0, ratio, keep, width, count):
    """:func:`_stock_mix` on bf16 bit arrays, each torch op rounded to bf16: ``0 + w1`` (+0.0 for -0.0, exact),
    each further ``+ wi``, ``/ count``, ``ratio *``, ``keep * w0`` and the final sum. ``ratio``/``keep``: float32
    values of the bf16 ratios, one per row of ``width`` entries. Returns 1 when a stored entry is not finite."""
    zero = np.float32(0)
    for r in range(out.size // width):
        rt, kp = ratio[r], keep[r]
        for j in range(np.uint64(r * width), np.uint64((r + 1) * width)):  # unsigned: no negative-index check
            acc = zero + _bf16_value(tensors[0][j])
            for i in range(1, len(tensors)):
                acc = _bf16_round_inner(acc + _bf16_value(tensors[i][j]))
            mean = _bf16_round_inner(acc / count)
            mixed = _bf16_round_inner(rt * mean) + _bf16_round_inner(kp * _bf16_value(w0[j]))
            out[j] = _bf16_bits(_bf16_round(mixed))
    return _bf16_nonfinite(out)


@_jit
def _bf16_weighted_sum(out, tensors, weights, total, normalize, fused):
    """:func:`_weighted_sum` on bf16 bit arrays: methods.linear's float32 accumulator over bf16 inputs (exact
    float32 values), divided in float32 and rounded to bf16 once, as torch's chunk loop stores it."""
    zero = np.float32(0)
    for k in range(out.size):
        acc = zero
        for i in range(len(tensors)):
            value = _bf16_value(tensors[i][k])
            acc = _fma(value, weights[i], acc) if fused else acc + value * weights[i]
        out[k] = _bf16_bits(_bf16_round(acc / total if normalize else acc))


@jit
def _bf16_nonfinite(bits):
    """1 if a bf16 pattern is Inf or NaN (its magnitude 0x7F80 or more), else 0: the bf16 kernels' test of what
    they stored, a loop of its own after the storing one (a test inside that loop stops LLVM vectorising it:
    2-2.6x slower)."""
    top = np.uint16(0)
    for k in range(bits.shape[0]):
        top = max(top, np.uint16(bits[k] & np.uint16(0x7FFF)))
    return int(top >= np.uint16(0x7F80))


@_jit
def _bf16_lerp(out, a, b, coef_a, coef_b):
    """slerp's mix on bf16 bit arrays: ``coef_a * a`` and ``coef_b * b`` rounded to float32, their float32 sum
    rounded to bf16, as methods.slerp's torch chunk loop (mul, mul, add_, store). Returns 1 when a stored entry
    is not finite, else 0 (merge/finite.py)."""
    for k in range(out.size):
        x = coef_a * _bf16_value(a[k])
        y = coef_b * _bf16_value(b[k])
        out[k] = _bf16_bits(_bf16_round(x + y))
    return _bf16_nonfinite(out)


@_jit
def _lerp(out, a, b, coef_a, coef_b):
    """``coef_a * a + coef_b * b``, each product and the sum rounded to the dtype (no fused multiply-add).
    Returns how many stored entries are not finite."""
    bad = 0
    for k in range(out.size):
        x = coef_a * a[k] + coef_b * b[k]
        out[k] = x
        bad += not np.isfinite(x)
    return bad


@jit
def _bf16_mask(bits, mask):
    """bf16 ``values.mul_(mask)`` on bit patterns: a dropped finite entry becomes a zero of its sign, a dropped
    Inf or NaN becomes NaN (torch's ``inf * 0``; the NaN's bits may differ: only sums read it). Selects, not
    branches: half the entries are dropped at random."""
    nan, exponent, sign = np.uint16(0x7FC0), np.uint16(0x7F80), np.uint16(0x8000)
    for k in range(bits.size):
        b = bits[k]
        dropped = nan if (b & exponent) == exponent else np.uint16(b & sign)
        bits[k] = b if mask[k] else dropped


@_jit
def _bf16_load(b, total, bits):
    """A block's base values (float32) and a zeroed float32 sum."""
    for k in range(b.size):
        b[k] = _bf16_value(bits[k])
        total[k] = 0


@_jit
def _bf16_deltas(d, t, b, mask, has_mask, factor, has_factor, weight, total):
    """d = bf16(w * bf16(f * (mask * bf16(t - b)))) over one block; total += d (float32)."""
    one, zero = np.float32(1), np.float32(0)
    for k in range(d.size):
        x = _bf16_round_inner(_bf16_value(t[k]) - b[k])  # NaNs' bits: read only by sums, signs and _bf16_store
        if has_mask:
            x = x * (one if mask[k] else zero)
        if has_factor:
            x = _bf16_round_inner(x * factor)
        x = _bf16_round_inner(x * weight)
        d[k] = x
        total[k] = total[k] + x


@_jit
def _bf16_majority(total, kept, weight):
    """The majority sign of each entry (+1 where the bf16 sum is >= 0) into ``total``; the agreeing sums zeroed."""
    one, zero = np.float32(1), np.float32(0)
    for k in range(total.size):
        total[k] = one if _bf16_round(total[k]) >= zero else -one
        kept[k] = zero
        weight[k] = zero


@_jit
def _bf16_agree(kept, weight, major, d, w):
    """The agreeing delta and its weight added in (torch's ``deltas.sign() == major``; 0 never agrees)."""
    one, zero = np.float32(1), np.float32(0)
    for k in range(d.size):
        sign = one if d[k] > zero else (-one if d[k] < zero else zero)
        agree = one if sign == major[k] else zero
        kept[k] = kept[k] + d[k] * agree
        weight[k] = weight[k] + w * agree


@_jit
def _bf16_elected(total, kept, weight):
    """The agreeing deltas' bf16 sum into ``total``, their weights' (1 where none agree) into ``weight``."""
    one, zero = np.float32(1), np.float32(0)
    for k in range(total.size):
        total[k] = _bf16_round(kept[k])
        div = _bf16_round(weight[k])
        weight[k] = one if div == zero else div


@_jit
def _bf16_summed(total, weight, divisor):
    """The deltas' bf16 sum into ``total``, the one divisor into ``weight``."""
    for k in range(total.size):
        total[k] = _bf16_round(total[k])
        weight[k] = divisor


@_jit
def _bf16_store(out, b, mixed, divisor, normalize, scale, lam):
    """out = bf16(b + bf16(lam * bf16(mixed / divisor))) as bf16 bits (each step only when asked)."""
    for k in range(out.size):
        x = mixed[k]
        if normalize:
            x = _bf16_round_inner(x / divisor[k])
        if scale:
            x = _bf16_round_inner(x * lam)
        out[k] = _bf16_bits(_bf16_round(b[k] + x))


@jit
def _half_task_vectors(out, base, tensors, masks, has_mask, factors, has_factor, weights, consensus, normalize,
                       divisor, scale, lam):
    """methods._half_task_arithmetic's chunk loop for bf16 (uint16 bit arrays): every step MergeKit's bf16
    rounding of a float32 result, sums over the models accumulated in float32 from 0 and rounded once (as
    torch's bf16 ``sum(dim=0)``). One pass per step over an L1-resident block, as ``_task_vectors``; each pass a
    kernel over the block's own slices (an index from ``range`` needs no negative-index check, and the numpy
    error model no zero check: the passes vectorise; inline loops indexing ``start + k`` ran ~2x slower)."""
    n, count = len(tensors), out.size
    b = np.empty(BLOCK, np.float32)
    d = np.empty((n, BLOCK), np.float32)
    total = np.empty(BLOCK, np.float32)
    kept = np.empty(BLOCK, np.float32)
    weight = np.empty(BLOCK, np.float32)
    for start in range(0, count, BLOCK):
        stop = min(count, start + BLOCK)
        size = stop - start
        _prefetch_range(base, stop, stop + BLOCK)  # the next block's inputs (see _prefetch_range)
        for i in range(n):
            _prefetch_range(tensors[i], stop, stop + BLOCK)
            if has_mask[i]:
                _prefetch_range(masks[i], stop, stop + BLOCK)
        _bf16_load(b[:size], total[:size], base[start:stop])
        for i in range(n):
            mask = masks[i][start:stop] if has_mask[i] else masks[i]
            _bf16_deltas(d[i, :size], tensors[i][start:stop], b[:size], mask, has_mask[i], factors[i], has_factor[i],
                         weights[i], total[:size])
        if consensus:
            _bf16_majority(total[:size], kept[:size], weight[:size])
            for i in range(n):
                _bf16_agree(kept[:size], weight[:size], total[:size], d[i, :size], weights[i])
            _bf16_elected(total[:size], kept[:size], weight[:size])
        else:
            _bf16_summed(total[:size], weight[:size], divisor)
        _bf16_store(out[start:stop], b[:size], total[:size], weight[:size], normalize, scale, lam)


@_jit
def _mask(values, mask, one, zero):
    for k in range(values.size):
        values[k] = values[k] * (one if mask[k] else zero)


@functools.cache
def torch_fuses_addcmul(dtype: torch.dtype, operand: torch.dtype | None = None) -> bool | None:
    """Whether torch's addcmul_ rounds ``acc + t * w`` once (FMA) on this CPU, for ``acc`` and ``w`` of
    ``dtype`` and ``t`` of ``operand`` (default: ``dtype``; bf16 inputs to a float32 accumulator, as
    methods.linear adds them): True, False, or None when its scalar and vector loops disagree (then the
    kernel cannot match it and linear stays on torch)."""
    bits = round(-np.log2(torch.finfo(dtype).eps))  # 23 / 52 fraction bits
    t_bits = round(-np.log2(torch.finfo(operand or dtype).eps))
    t = 1 + 2.0 ** -min(t_bits, bits // 2 + 1)  # exact in ``operand``
    w = 1 + 2.0 ** -bits  # t * w needs more bits than the dtype has
    verdicts = set()
    for n in (1, 67):  # a scalar tail alone, then vector body + tail
        x = torch.full((n,), t, dtype=operand or dtype)
        acc = -(x.to(dtype) * w)  # the product rounded: fused gives the rounding error, unfused gives 0
        acc.addcmul_(x, torch.tensor(w, dtype=dtype))
        verdicts |= {bool(v != 0) for v in acc.tolist()}
    return verdicts.pop() if len(verdicts) == 1 else None


def fits(dtype: torch.dtype, tensors: Sequence[Tensor], masks: Sequence[Tensor] = ()) -> bool:
    """The kernels take contiguous CPU float32/float64 tensors of exactly ``dtype`` (no conversion) and flat
    bool masks of as many entries."""
    n = tensors[0].numel() if tensors else 0
    return (dtype in FLOATS and all(t.dtype == dtype and _plain(t) for t in tensors)
            and all(m.dtype == torch.bool and m.numel() == n and _plain(m) for m in masks))


def _plain(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.is_contiguous()


def _arrays(tensors: Sequence[Tensor]) -> tuple[np.ndarray, ...]:
    """Flat numpy views for a kernel; a kernel may write through them, so this thread's vouch goes (finite.py)."""
    finite.forget()
    return tuple(t.detach().reshape(-1).numpy() for t in tensors)


def task_vectors(out: Tensor, base: Tensor, tensors: Sequence[Tensor], plan: Sequence[tuple], weights: Sequence[float],
                 total: float, consensus: bool, normalize: bool, lam: float) -> Tensor:
    """Writes methods.generalized_task_arithmetic's float32/float64 result into ``out`` (contiguous, base's dtype).

    plan: per model (bool mask of base.numel() entries or None, rescale factor: float 1.0 = none, or a
    0-d tensor), as methods._task_vector_plan makes it. At least one model and one weight.
    """
    tensors, plan, weights = zip(*zip(tensors, plan, weights))  # as the torch loop's zip: the shortest wins
    np_dtype = base.detach().numpy().dtype
    masked = any(m is not None for m, _ in plan)
    masks = tuple(None if m is None else m.detach().reshape(-1).numpy() for m, _ in plan) if masked else None
    factors = np.array([float(f) for _, f in plan], dtype=np_dtype)  # 1.0 (none) multiplies exactly
    consts = np.array([total, lam, 0.0, 1.0, -1.0], dtype=np_dtype)
    flat_out, flat_base, arrays = out.reshape(-1).numpy(), base.detach().reshape(-1).numpy(), _arrays(tensors)
    weights, fused = np.array(weights, dtype=np_dtype), bool(torch_fuses_addcmul(base.dtype))
    for start, stop in pages.windows(flat_base.size, WINDOW, out, base, *tensors):
        part = slice(start, stop)
        window = None if masks is None else tuple(_all_kept(stop - start) if m is None else m[part] for m in masks)
        _task_vectors(flat_out[part], flat_base[part], tuple(a[part] for a in arrays), window, factors, weights,
                      consts, bool(consensus), bool(normalize), lam != 1, fused)
    return out


def _all_kept(n: int) -> np.ndarray:
    """An all-True mask of n entries (a model without a mask beside masked ones: its mask 1 is exact)."""
    return np.ones(n, dtype=np.bool_)


def weighted_sum(out: Tensor, tensors: Sequence[Tensor], weights: Tensor, total: Tensor, normalize: bool) -> Tensor:
    """Writes methods.linear's result into ``out``; weights and their total are work-dtype tensors (as linear
    rounds them; at least one). Callers check :func:`torch_fuses_addcmul` is not None."""
    tensors = tensors[:len(weights)]  # as the torch loop's zip
    fused = torch_fuses_addcmul(weights.dtype)
    flat_out, arrays = out.reshape(-1).numpy(), _arrays(tensors)
    for start, stop in pages.windows(flat_out.size, WINDOW, out, *tensors):
        part = slice(start, stop)
        _weighted_sum(flat_out[part], tuple(a[part] for a in arrays), weights.numpy(), total.numpy()[()],
                      bool(normalize), bool(fused))
    return out


def bf16_weighted_sum(out: Tensor, tensors: Sequence[Tensor], weights: Tensor, total: Tensor,
                      normalize: bool) -> Tensor:
    """:func:`weighted_sum` of contiguous bf16 tensors into bf16 ``out`` (float32 weights and total, as linear
    rounds them). Callers check ``torch_fuses_addcmul(torch.float32, torch.bfloat16)`` is not None."""
    tensors = tensors[:len(weights)]
    fused = torch_fuses_addcmul(torch.float32, torch.bfloat16)
    flat_out, arrays = _bits16(out), tuple(_bits16(t) for t in tensors)
    for start, stop in pages.windows(flat_out.size, WINDOW, out, *tensors):
        part = slice(start, stop)
        _bf16_weighted_sum(flat_out[part], tuple(a[part] for a in arrays), weights.numpy(), total.numpy()[()],
                           bool(normalize), bool(fused))
    return out


def lerp(out: Tensor, a: Tensor, b: Tensor, coef_a: float, coef_b: float) -> Tensor:
    """slerp's ``coef_a * a + coef_b * b`` into ``out``: contiguous bf16 tensors (float32 coefficients), or
    float32/float64 ones (coefficients of their dtype: each product and the sum rounded to it, as torch's
    mul, mul, add)."""
    bf16 = out.dtype == torch.bfloat16
    flat_out, flat_a, flat_b = (_bits16(t) for t in (out, a, b)) if bf16 else _arrays((out, a, b))
    kernel, scalar = (_bf16_lerp, np.float32) if bf16 else (_lerp, flat_out.dtype.type)
    bad = 0
    for start, stop in pages.windows(flat_out.size, WINDOW, out, a, b):
        bad += kernel(flat_out[start:stop], flat_a[start:stop], flat_b[start:stop], scalar(coef_a), scalar(coef_b))
    return _vouched_if_finite(out, bad)


def _vouched_if_finite(out: Tensor, bad: int) -> Tensor:
    """``out``, vouched finite (merge/finite.py) when the kernel that wrote all of it stored no Inf or NaN."""
    if bad == 0:
        finite.vouch(out)
    return out


def abs_diff(out: Tensor, t: Tensor, base: Tensor) -> Tensor:
    """out = |t - base| (torch's ``(t - base).abs_()``: one rounding, sign cleared) without a temporary.

    The combine pass reads the inputs again: their pages are given back only when they are over
    pages.RESIDENT bytes (pages.reread)."""
    flat_out, flat_t, flat_base = out.reshape(-1).numpy(), t.detach().reshape(-1).numpy(), base.detach().reshape(-1).numpy()
    for start, stop in pages.windows(flat_out.size, WINDOW, *pages.reread(t, base)):
        _abs_diff(flat_out[start:stop], flat_t[start:stop], flat_base[start:stop])
    return out


def abs_diff_counted(out: Tensor, t: Tensor, base: Tensor) -> tuple[Tensor, tuple[np.ndarray, int]]:
    """out = |t - base| (float32, or bf16 with torch's rounding) and the histogram of its bit patterns with the
    largest pattern, as merge/select.py's radix select counts them (float32: the top 16 bits): one pass over
    |delta| instead of a second one in select (~17 ms of ~55 saved per bf16 32.8 M-entry tensor). None for the
    histogram when a bf16 |delta| holds NaN. Pages as :func:`abs_diff`."""
    half = out.dtype == torch.bfloat16
    flat_out = _bits16(out) if half else out.reshape(-1).numpy()
    flat_t, flat_base = (_bits16(t), _bits16(base)) if half else (t.detach().reshape(-1).numpy(), base.detach().reshape(-1).numpy())
    kernel = _bf16_abs_diff_counted if half else _abs_diff_counted
    hist, top = np.zeros(1 << 16, np.int64), 0
    for start, stop in pages.windows(flat_out.size, pages.WINDOW, *pages.reread(t, base)):
        top = max(top, int(kernel(flat_out[start:stop], flat_t[start:stop], flat_base[start:stop], hist)))
    if half and top > 0x7F80:  # a NaN: torch's own bits (its NaN payload differs between its vectorised and
        torch.sub(t.reshape(-1), base.reshape(-1), out=out.reshape(-1)).abs_()  # scalar loops); no histogram
        return out, None
    return out, (hist, top)


def stock_operand(out: Tensor, w0: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
    """``out = a - w0`` or ``(a - w0) * (b - w0)`` (flat, contiguous, one dtype: float32, float64 or bf16) in one
    pass per window, the mapped pages of inputs over pages.RESIDENT bytes released behind it (pages.reread: the
    mix reads them again; methods.model_stock's cosine operands: torch's bits)."""
    bf16 = out.dtype == torch.bfloat16
    tensors = [out, a, a if b is None else b, w0]  # _offsets' order
    arrays = tuple(_bits16(t) for t in tensors) if bf16 else _arrays(tensors)
    kernel = _bf16_offsets if bf16 else _offsets
    for start, stop in pages.windows(arrays[0].size, WINDOW, *pages.reread(w0, a, *(() if b is None else (b,)))):
        kernel(*(x[start:stop] for x in arrays), b is not None)
    return out


def stock_mix(out: Tensor, ws: Sequence[Tensor], w0: Tensor, ratio: Tensor, keep: Tensor) -> Tensor:
    """methods.model_stock's mix into ``out``: one ratio (and keep) for all, or one per row of w0's last
    dimension; window by window, mapped pages of the inputs and ``out`` released behind each."""
    bf16 = out.dtype == torch.bfloat16
    if bf16:  # bit arrays; the bf16 ratios as float32 values (exact)
        flat_out, flat_w0, arrays = _bits16(out), _bits16(w0), tuple(_bits16(w) for w in ws)
        ratios, keeps = ratio.reshape(-1).float().numpy(), keep.reshape(-1).float().numpy()
    else:
        flat_out, flat_w0, arrays = out.reshape(-1).numpy(), w0.detach().reshape(-1).numpy(), _arrays(ws)
        ratios, keeps = ratio.reshape(-1).numpy(), keep.reshape(-1).numpy()
    if flat_out.size == 0:
        return out
    per_row = ratios.size > 1
    width = w0.shape[-1] if per_row else max(1, flat_out.size)
    step = max(1, WINDOW // width) * width if per_row else WINDOW
    dtype = np.float32 if bf16 else flat_out.dtype.type
    zero, count = dtype(0), dtype(len(ws))
    bad = 0
    for start, stop in pages.windows(flat_out.size, step, out, w0, *ws):
        rows = slice(start // width, -(-stop // width)) if per_row else slice(0, 1)
        parts = (flat_out[start:stop], tuple(a[start:stop] for a in arrays), flat_w0[start:stop], ratios[rows],
                 keeps[rows], width if per_row else stop - start, count)
        bad += _bf16_stock_mix(*parts) if bf16 else _stock_mix(*parts, zero)
    return _vouched_if_finite(out, bad)


def fits_bf16(tensors: Sequence[Tensor]) -> bool:
    """:func:`half_task_vectors` takes contiguous CPU bf16 tensors."""
    return all(t.dtype == torch.bfloat16 and _plain(t) for t in tensors)


def _bits16(t: Tensor) -> np.ndarray:
    """A flat uint16 view of a 16-bit tensor's bits for a kernel (which may write through it: as :func:`_arrays`)."""
    finite.forget()
    return t.detach().reshape(-1).view(torch.int16).numpy().view(np.uint16)


def half_task_vectors(out: Tensor, base: Tensor, tensors: Sequence[Tensor], plan: Sequence[tuple], weights: Tensor,
                      consensus: bool, normalize: bool, lam: float, divisor: Tensor) -> Tensor:
    """Writes methods._half_task_arithmetic's bf16 result into ``out`` (contiguous bf16, base's entries) in one
    pass per window instead of torch ops over chunks. plan: per model (flat bool mask or None, bf16 0-d
    rescale factor or None); weights: the bf16 weights; divisor: the bf16 divisor without consensus."""
    tensors, plan = zip(*zip(tensors, plan))
    empty = np.zeros(1, dtype=np.bool_)
    masks = tuple(empty if m is None else m.detach().reshape(-1).numpy() for m, _ in plan)
    has_mask = np.array([m is not None for m, _ in plan], dtype=np.bool_)
    has_factor = np.array([f is not None for _, f in plan], dtype=np.bool_)
    factors = np.array([0.0 if f is None else float(f) for _, f in plan], dtype=np.float32)
    flat_out, flat_base, arrays = _bits16(out), _bits16(base), tuple(_bits16(t) for t in tensors)
    w = weights.reshape(-1).float().numpy()[:len(tensors)]
    for start, stop in pages.windows(flat_base.size, WINDOW, out, base, *tensors):
        part = slice(start, stop)
        _half_task_vectors(flat_out[part], flat_base[part], tuple(a[part] for a in arrays),
                           tuple(m[part] if has else m for m, has in zip(masks, has_mask)), has_mask, factors,
                           has_factor, w, bool(consensus), bool(normalize), np.float32(float(divisor)), lam != 1,
                           np.float32(lam))
    return out


def mask_(values: Tensor, mask: Tensor) -> Tensor:
    """values *= mask (as 1 / 0 in values' dtype, so -0.0 and NaN come out as torch's ``mul_(mask)``); bf16 on its
    bit patterns (torch's bf16 ``mul_(mask)`` takes ~10x as long: its bool operand goes through type promotion)."""
    if values.dtype == torch.bfloat16:
        _bf16_mask(_bits16(values), mask.reshape(-1).numpy())
        return values
    flat = values.reshape(-1).numpy()
    _mask(flat, mask.reshape(-1).numpy(), flat.dtype.type(1), flat.dtype.type(0))
    return values


# ----------------------------------------------------------------------------- numpy's PCG64 float32 stream

_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645  # numpy's PCG64 (XSL-RR 128/64) multiplier
_MASK64, _MASK128 = (1 << 64) - 1, (1 << 128) - 1
_LANES = 4  # independent states stepped together: the 128-bit multiply's latency is hidden


@intrinsic
def _mulhi(typingctx, a, b):
    """High 64 bits of the 128-bit product of two uint64 (LLVM's i128 multiply)."""
    if a == b == nbtypes.uint64:
        def codegen(context, builder, signature, args):
            from llvmlite import ir

            wide = ir.IntType(128)
            product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
            return builder.trunc(builder.lshr(product, ir.Constant(wide, 64)), ir.IntType(64))
        return nbtypes.uint64(a, b), codegen
    return None


@numba.njit(nogil=True)
def _pcg_output(hi, lo):
    """pcg_output_xsl_rr_128_64: (hi ^ lo) rotated right by the state's top 6 bits."""
    x, rot = hi ^ lo, hi >> np.uint64(58)
    return (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))


@numba.njit(nogil=True)
def _pcg_jump(hi, lo, a_hi, a_lo, c_hi, c_lo):
    """(hi, lo) * A + C mod 2^128."""
    new_lo = lo * a_lo
    new_hi = _mulhi(lo, a_lo) + hi * a_lo + lo * a_hi
    out_lo = new_lo + c_lo
    return new_hi + c_hi + (np.uint64(1) if out_lo < new_lo else np.uint64(0)), out_lo


@numba.njit(nogil=True)
def _pcg_floats(out):
    """The two float32 uniforms of one 64-bit output, low half first (numpy's next_float)."""
    scale, low, eight = np.float32(1.0 / 16777216.0), np.uint64(0xFFFFFFFF), np.uint64(8)
    return np.float32((out & low) >> eight) * scale, np.float32((out >> np.uint64(32)) >> eight) * scale


@_jit
def _pcg_fill(values, mask, threshold, to_mask, start, hi, lo, jump):
    """The float32 uniforms (u32 >> 8) * 2^-24 of 64-bit outputs, low half first, into values[start:]
    (or mask[start:] = u < threshold). Lane j holds state s_{j+1}; jump = (A_hi, A_lo, C_hi, C_lo) steps
    a state by _LANES. Returns the last 64-bit output used (its high half is the spare when n is odd)."""
    scale, n = np.float32(1.0 / 16777216.0), values.size if not to_mask else mask.size
    a_hi, a_lo, c_hi, c_lo = jump[0], jump[1], jump[2], jump[3]
    low, eight = np.uint64(0xFFFFFFFF), np.uint64(8)
    last = np.uint64(0)
    k = start
    h0, l0, h1, l1, h2, l2, h3, l3 = hi[0], lo[0], hi[1], lo[1], hi[2], lo[2], hi[3], lo[3]
    while k + 8 <= n:  # whole groups: 4 independent multiply chains, no bounds branches
        o0, o1, o2, o3 = _pcg_output(h0, l0), _pcg_output(h1, l1), _pcg_output(h2, l2), _pcg_output(h3, l3)
        h0, l0 = _pcg_jump(h0, l0, a_hi, a_lo, c_hi, c_lo)
        h1, l1 = _pcg_jump(h1, l1, a_hi, a_lo, c_hi, c_lo)
        h2, l2 = _pcg_jump(h2, l2, a_hi, a_lo, c_hi, c_lo)
        h3, l3 = _pcg_jump(h3, l3, a_hi, a_lo, c_hi, c_lo)
        u0, u1 = _pcg_floats(o0)
        u2, u3 = _pcg_floats(o1)
        u4, u5 = _pcg_floats(o2)
        u6, u7 = _pcg_floats(o3)
        if to_mask:  # (no helper taking the arrays: each such call pays reference-count atomics)
            mask[k], mask[k + 1], mask[k + 2], mask[k + 3] = u0 < threshold, u1 < threshold, u2 < threshold, u3 < threshold
            mask[k + 4], mask[k + 5], mask[k + 6], mask[k + 7] = u4 < threshold, u5 < threshold, u6 < threshold, u7 < threshold
        else:
            values[k], values[k + 1], values[k + 2], values[k + 3] = u0, u1, u2, u3
            values[k + 4], values[k + 5], values[k + 6], values[k + 7] = u4, u5, u6, u7
        last = o3
        k += 8
    hi[0], lo[0], hi[1], lo[1], hi[2], lo[2], hi[3], lo[3] = h0, l0, h1, l1, h2, l2, h3, l3
    while k < n:  # the tail, lane by lane
        for j in range(_LANES):
            if k >= n:
                break
            out = _pcg_output(hi[j], lo[j])
            last = out
            for half in range(2):
                if k < n:
                    u = np.float32(((out >> np.uint64(32 * half)) & low) >> eight) * scale
                    if to_mask:
                        mask[k] = u < threshold
                    else:
                        values[k] = u
                    k += 1
            new_lo = lo[j] * a_lo
            new_hi = _mulhi(lo[j], a_lo) + hi[j] * a_lo + lo[j] * a_hi
            lo[j] = new_lo + c_lo
            hi[j] = new_hi + c_hi + (np.uint64(1) if lo[j] < new_lo else np.uint64(0))
    return last


def _affine_power(mult: int, inc: int, steps: int) -> tuple[int, int]:
    """(A, C) with s_{k+steps} = A s_k + C mod 2^128 for s_{k+1} = mult s_k + inc."""
    a, c = 1, 0
    for _ in range(steps):
        a, c = (a * mult) & _MASK128, (c * mult + inc) & _MASK128
    return a, c


def pcg64_float32(generator: np.random.Generator, values: np.ndarray | None = None, mask: np.ndarray | None = None,
                  threshold: float = 0.0) -> bool:
    """``generator.random(out=values, dtype=float32)`` (or ``mask[:] = that < float32(threshold)``) as numpy's
    PCG64 gives it, bit for bit, its state (spare 32 bits included) advanced as numpy's would be; False
    (nothing drawn) for another bit generator. Why: numpy calls the bit generator through a pointer per
    value (~1.9 ns each, ~1.15 ns here on the reference VM); the compare is fused for DARE's masks."""
    bits = getattr(generator, "bit_generator", None)
    if type(bits) is not np.random.PCG64:
        return False
    target = values if mask is None else mask
    state = bits.state
    s, inc = state["state"]["state"], state["state"]["inc"]
    has_spare, spare = state["has_uint32"], state["uinteger"]
    n, start, scale = target.size, 0, np.float32(1.0 / 16777216.0)
    if has_spare and n:
        u = np.float32(spare >> 8) * scale
        target[0] = u < np.float32(threshold) if mask is not None else u
        start, has_spare = 1, 0
    outputs = (n - start + 1) // 2  # 64-bit outputs this fill uses
    if outputs:
        lanes, t = [], s
        for _ in range(_LANES):
            t = (t * _PCG_MULT + inc) & _MASK128
            lanes.append(t)
        a, c = _affine_power(_PCG_MULT, inc, _LANES)
        split = lambda xs: (np.array([x >> 64 for x in xs], np.uint64), np.array([x & _MASK64 for x in xs], np.uint64))
        hi, lo = split(lanes)
        jump = np.array([a >> 64, a & _MASK64, c >> 64, c & _MASK64], np.uint64)
        empty_f, empty_m = np.empty(0, np.float32), np.empty(0, np.bool_)
        last = _pcg_fill(values if mask is None else empty_f, empty_m if mask is None else mask,
                         np.float32(threshold), mask is not None, start, hi, lo, jump)
        a_m, c_m = _affine_power_fast(_PCG_MULT, inc, outputs)
        s = (a_m * s + c_m) & _MASK128
        has_spare, spare = (n - start) % 2, int(last) >> 32  # numpy keeps the last high half, used or not
    bits.state = {"bit_generator": "PCG64", "state": {"state": s, "inc": inc}, "has_uint32": has_spare,
                  "uinteger": spare}
    return True


def _affine_power_fast(mult: int, inc: int, steps: int) -> tuple[int, int]:
    """:func:`_affine_power` by squaring (Brown's jump-ahead): O(log steps)."""
    acc_a, acc_c, cur_a, cur_c = 1, 0, mult, inc
    while steps:
        if steps & 1:
            acc_a, acc_c = (acc_a * cur_a) & _MASK128, (acc_c * cur_a + cur_c) & _MASK128
        cur_c, cur_a = (cur_c * (cur_a + 1)) & _MASK128, (cur_a * cur_a) & _MASK128
        steps >>= 1
    return acc_a, acc_c
