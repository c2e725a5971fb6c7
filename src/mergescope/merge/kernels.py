"""Fused element loops for the task-vector family and linear, bit-identical to methods.py's torch chains.

Why: the torch chain sends every element through 10-20 separate kernels (delta, mask, rescale, weight,
sum, sign election, divide, scale, add), each a full pass over memory; one loop per block of elements
does the same IEEE operations in the same order and rounding, once. No fastmath (no reassociation, no
contraction), so each ``a * b`` and ``a + b`` rounds as torch's kernel does; where torch contracts
(``addcmul_``: linear's ``acc + t * w``, and the election's ``kept + d * agree`` where only the NaN
that survives ``inf * 0 + NaN`` depends on it) a run-time probe says whether it fuses, and LLVM's fma
does the same. L1 sums stay torch's (a float64 or serial sum gives other bits). The kernels release
the GIL (the engine calls methods from two worker threads). numba is imported here, and methods.py
imports this module only when a merge runs, so ``import mergescope`` never loads it. Callers check
:func:`fits` first: anything that does not (half precision, mixed dtypes, non-CPU, strided) stays on
the torch path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba.core import types as nbtypes
from numba.extending import intrinsic

Tensor = torch.Tensor
BLOCK = 2048  # elements per block: the per-block scratch (3 x 16 KB float64) stays in L1/L2
FLOATS = (torch.float32, torch.float64)


def _jit(kernel):
    """Compiled once per machine (numba's on-disk cache; per process where no cache folder is writable),
    GIL-free (the engine's worker threads), a float division by 0 giving inf / NaN as torch's does."""
    options = {"nogil": True, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **options)(kernel)
    except RuntimeError:  # no writable cache folder (read-only install, no home)
        return numba.njit(**options)(kernel)


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (LLVM's llvm.fma), the contraction torch's addcmul_ compiles to."""
    if isinstance(a, nbtypes.Float) and a == b == c:
        def codegen(context, builder, signature, args):
            return builder.fma(*args)
        return a(a, b, c), codegen
    return None


@_jit
def _deltas(d, t, b, mask, has_mask, factor, has_factor, weight, one, zero):
    """d = w * (factor * (mask * (t - b))) over one block: one rounding per step, as torch's in-place mul_s
    (a pass per step over an L1-resident block vectorises; branches inside one loop did not)."""
    for k in range(d.size):
        d[k] = t[k] - b[k]
    if has_mask:
        for k in range(d.size):
            d[k] = d[k] * (one if mask[k] else zero)
    if has_factor:
        for k in range(d.size):
            d[k] = d[k] * factor
    for k in range(d.size):
        d[k] = d[k] * weight


@_jit
def _elect(mixed, divisor, kept, deltas, weights, one, zero, minus, fused):
    """_sign_consensus over one block: majority = sign(sum) (>= 0 is +); mixed <- sum of agreeing deltas
    (d * agree, so a NaN or inf delta poisons as in torch), divisor <- their weights, 1 where none agree."""
    size = mixed.size
    for k in range(size):
        kept[k] = zero
        divisor[k] = zero
    for i in range(deltas.shape[0]):
        d, w = deltas[i, :size], weights[i]
        for k in range(size):
            agree = one if d[k] * (one if mixed[k] >= zero else minus) > zero else zero
            # addcmul_: the product is exact; fused only decides which NaN survives inf * 0 + NaN, as in torch
            kept[k] = _fma(d[k], agree, kept[k]) if fused else kept[k] + d[k] * agree
            divisor[k] = divisor[k] + w * agree
    for k in range(size):
        mixed[k] = kept[k]
        if divisor[k] == zero:
            divisor[k] = one


@_jit
def _task_vectors(out, base, tensors, masks, has_mask, factors, has_factor, weights, consts, consensus,
                  normalize, scale, fused):
    """methods.generalized_task_arithmetic's chunk loop; consts = (total, lam, 0, 1, -1) in the work dtype."""
    total, lam, zero, one, minus = consts[0], consts[1], consts[2], consts[3], consts[4]
    n, models = base.size, len(tensors)
    deltas = np.empty((models, BLOCK), base.dtype)
    sums, kept = np.empty(BLOCK, base.dtype), np.empty(BLOCK, base.dtype)
    divisors = np.full(BLOCK, total)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        size, b = stop - start, base[start:stop]
        mixed, divisor = sums[:size], divisors[:size]
        for i in range(models):
            mask = masks[i][start:stop] if has_mask[i] else masks[i]
            _deltas(deltas[i, :size], tensors[i][start:stop], b, mask, has_mask[i], factors[i], has_factor[i],
                    weights[i], one, zero)
        mixed[:] = deltas[0, :size]  # _sum: d_0 + d_1 + ... (from d_0, not from 0: -0.0 survives)
        for i in range(1, models):
            d = deltas[i, :size]
            for k in range(size):
                mixed[k] = mixed[k] + d[k]
        if consensus:
            _elect(mixed, divisor, kept[:size], deltas, weights, one, zero, minus, fused)
        if normalize:  # _scaled_sum: (/ divisor) (* lam) then base +
            for k in range(size):
                mixed[k] = mixed[k] / divisor[k]
        if scale:
            for k in range(size):
                mixed[k] = mixed[k] * lam
        o = out[start:stop]
        for k in range(size):
            o[k] = b[k] + mixed[k]


@_jit
def _weighted_sum(out, tensors, weights, total, normalize, fused):
    """methods.linear's chunk loop: acc = 0; acc += t_i * w_i (fused when torch's addcmul_ is); / total."""
    n = out.size
    acc = np.empty(BLOCK, out.dtype)
    zero = weights[0] - weights[0]
    for start in range(0, n, BLOCK):
        size = min(n, start + BLOCK) - start
        for k in range(size):
            acc[k] = zero
        for i in range(len(tensors)):
            t, w = tensors[i], weights[i]
            if fused:
                for k in range(size):
                    acc[k] = _fma(t[start + k], w, acc[k])
            else:
                for k in range(size):
                    acc[k] = acc[k] + t[start + k] * w
        for k in range(size):
            out[start + k] = acc[k] / total if normalize else acc[k]


@_jit
def _abs_diff(out, t, base):
    for k in range(out.size):
        out[k] = abs(t[k] - base[k])


@_jit
def _mask(values, mask, one, zero):
    for k in range(values.size):
        values[k] = values[k] * (one if mask[k] else zero)


@functools.cache
def torch_fuses_addcmul(dtype: torch.dtype) -> bool | None:
    """Whether torch's addcmul_ rounds ``acc + t * w`` once (FMA) on this CPU: True, False, or None when
    its scalar and vector loops disagree (then the kernel cannot match it and linear stays on torch)."""
    bits = round(-np.log2(torch.finfo(dtype).eps))  # 23 / 52 fraction bits
    t = 1 + 2.0 ** -(bits // 2 + 1)  # t * t needs more bits than the dtype has
    verdicts = set()
    for n in (1, 67):  # a scalar tail alone, then vector body + tail
        x = torch.full((n,), t, dtype=dtype)
        acc = -(x * x)  # the product rounded: fused gives the rounding error, unfused gives 0
        acc.addcmul_(x, torch.tensor(t, dtype=dtype))
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
    return tuple(t.detach().reshape(-1).numpy() for t in tensors)


def task_vectors(out: Tensor, base: Tensor, tensors: Sequence[Tensor], plan: Sequence[tuple], weights: Sequence[float],
                 total: float, consensus: bool, normalize: bool, lam: float) -> Tensor:
    """Writes methods.generalized_task_arithmetic's float32/float64 result into ``out`` (contiguous, base's dtype).

    plan: per model (bool mask of base.numel() entries or None, rescale factor: float 1.0 = none, or a
    0-d tensor), as methods._task_vector_plan makes it. At least one model and one weight.
    """
    tensors, plan, weights = zip(*zip(tensors, plan, weights))  # as the torch loop's zip: the shortest wins
    np_dtype = base.detach().numpy().dtype
    empty = np.zeros(1, dtype=np.bool_)
    masks = tuple(empty if m is None else m.detach().reshape(-1).numpy() for m, _ in plan)
    has_mask = np.array([m is not None for m, _ in plan], dtype=np.bool_)
    has_factor = np.array([not (isinstance(f, float) and f == 1.0) for _, f in plan], dtype=np.bool_)
    factors = np.array([float(f) for _, f in plan], dtype=np_dtype)
    consts = np.array([total, lam, 0.0, 1.0, -1.0], dtype=np_dtype)
    _task_vectors(out.reshape(-1).numpy(), base.detach().reshape(-1).numpy(), _arrays(tensors), masks, has_mask,
                  factors, has_factor, np.array(weights, dtype=np_dtype), consts, bool(consensus),
                  bool(normalize), lam != 1, bool(torch_fuses_addcmul(base.dtype)))
    return out


def weighted_sum(out: Tensor, tensors: Sequence[Tensor], weights: Tensor, total: Tensor, normalize: bool) -> Tensor:
    """Writes methods.linear's result into ``out``; weights and their total are work-dtype tensors (as linear
    rounds them; at least one). Callers check :func:`torch_fuses_addcmul` is not None."""
    tensors = tensors[:len(weights)]  # as the torch loop's zip
    fused = torch_fuses_addcmul(weights.dtype)
    _weighted_sum(out.reshape(-1).numpy(), _arrays(tensors), weights.numpy(), total.numpy()[()], bool(normalize),
                  bool(fused))
    return out


def abs_diff(out: Tensor, t: Tensor, base: Tensor) -> Tensor:
    """out = |t - base| (torch's ``(t - base).abs_()``: one rounding, sign cleared) without a temporary."""
    _abs_diff(out.reshape(-1).numpy(), t.detach().reshape(-1).numpy(), base.detach().reshape(-1).numpy())
    return out


def mask_(values: Tensor, mask: Tensor) -> Tensor:
    """values *= mask (as 1 / 0 in values' dtype, so -0.0 and NaN come out as torch's ``mul_(mask)``)."""
    flat = values.reshape(-1).numpy()
    _mask(flat, mask.reshape(-1).numpy(), flat.dtype.type(1), flat.dtype.type(0))
    return values
