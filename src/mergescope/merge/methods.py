"""Merge methods as pure per-tensor functions, plus a name registry.

Every method takes the tensors of one parameter and returns the merged tensor; none reads files,
keeps state or touches a global random generator. Conventions (as MergeKit 0.1.5 binds them):

* ``base="ignored"`` methods (linear, karcher, passthrough) get *all* inputs in ``tensors``;
  per-model parameters are aligned with ``tensors``.
* ``base="required"|"optional"`` methods get the non-base inputs in ``tensors`` and the base
  model's tensor as ``base``; per-model parameters are aligned with the non-base ``tensors``.
* Arithmetic runs in float32 (float64 for float64 inputs) in chunks of ``CHUNK`` elements, so
  scratch memory stays a small multiple of one tensor; the result has the inputs' dtype.
* Random methods take ``seed``: the same seed gives the same bits (one private generator).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..errors import MergescopeError
from . import pages, scratch

Tensor = torch.Tensor
STOCK_WINDOW = pages.WINDOW  # entries per pass of model_stock's cosine fills (tests make it small)
CHUNK = 1 << 17  # elements per chunk: 512 KB float32 temporaries stay in cache and in the heap (no mmap churn)


# ----------------------------------------------------------------------------- helpers


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _flat(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    flat = t.reshape(-1)
    return flat if dtype is None or flat.dtype == dtype else flat.to(dtype)


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def _window_chunks(n: int, *touched: Tensor):
    """CHUNK-entry slices of [0, n), window by window, the mapped pages of ``touched`` (flat views) given back
    behind each window (merge/pages.py): a job keeps a window of its inputs and output resident, not tensors."""
    for start, stop in pages.windows(n, pages.WINDOW, *touched):
        for lo in range(start, stop, CHUNK):
            yield slice(lo, min(stop, lo + CHUNK))


def _check_same_shape(tensors: Sequence[Tensor], base: Tensor | None = None) -> None:
    shapes = {tuple(t.shape) for t in tensors} | ({tuple(base.shape)} if base is not None else set())
    if len(shapes) > 1:
        raise MergescopeError(f"inputs have different shapes: {sorted(shapes)}")


def top_k_mask(score: Tensor, k: int, tie_order: Callable[[], Tensor] | None = None) -> Tensor:
    """Boolean mask of the ``k`` largest entries of a flat score.

    Uses a selection (``kth_largest``, O(n)) instead of a full sort. When entries equal to the k-th
    largest value straddle the cut, which of them are kept is a convention: ``tie_order()`` (when
    given) returns the mask to use then (SCE: MergeKit's ``topk``); without it ties go to lower
    indices and the masks are nested (``top_k_mask(s, j)`` inside ``top_k_mask(s, k)``). Masks in
    ``torch.sort``'s order (TIES, breadcrumbs) come from ``select.sorted_range_mask``.
    """
    n = score.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    threshold = kth_largest(score, k)
    mask = torch.empty(n, dtype=torch.bool)
    kept = tied = 0
    for part in _chunks(n):  # chunked: no tensor-sized boolean temporaries
        torch.gt(score[part], threshold, out=mask[part])
        kept += int(mask[part].sum())
        if tie_order is not None:
            tied += int((score[part] == threshold).sum())
    need = k - kept
    if tie_order is not None and tied > need:
        return tie_order()
    for part in _chunks(n):
        if need <= 0:
            break
        ties = torch.nonzero(score[part] == threshold).reshape(-1)[:need] + part.start
        mask[ties] = True
        need -= ties.numel()
    return mask


def _positions_mask(n: int, positions: Tensor) -> Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[positions] = True
    return mask


def kth_largest(score: Tensor, k: int) -> Tensor:
    """The k-th largest value of a flat tensor (1 <= k <= n), exactly as ``torch.kthvalue`` gives it."""
    from . import select  # numba: imported on first use, not at ``import mergescope``

    return select.kth_largest(score, k)


def _rescale_factor(magnitude: Tensor, mask: Tensor, eps: float = 1e-7) -> Tensor | float:
    """L1 norm restoring factor ``|delta|_1 / |delta * mask|_1`` (1 when either is tiny), as MergeKit.

    Overwrites ``magnitude`` (the caller's scratch) with ``magnitude * mask``: no second tensor-sized
    temporary, and torch's sum sees the same values in the same layout, so the same bits.
    """
    before = magnitude.sum()
    kernels = _kernels(magnitude.dtype, [magnitude], [mask]) or _bf16_kernels([magnitude])
    after = (kernels.mask_(magnitude, mask) if kernels is not None else magnitude.reshape(-1).mul_(mask)).sum()
    return _factor(before, after, eps)


def _factor(before: Tensor, after: Tensor, eps: float = 1e-7) -> Tensor | float:
    if before < eps or after < eps:
        return 1.0
    return before / after


def _rescale(fused, t: Tensor, base: Tensor, mask: Tensor, magnitude: Tensor | Callable[[], Tensor]) -> Tensor | float:
    """The L1 rescale factor from the fused sums when they apply (``fused`` not None, and it gives sums), else
    from the |delta| tensor ``magnitude`` (or that a callable computes then; :func:`_rescale_factor`: consumed)."""
    sums = None if fused is None else fused(t, base, mask)
    if sums is not None:
        return _factor(*sums)
    return _rescale_factor(magnitude if isinstance(magnitude, Tensor) else magnitude(), mask)


def _fused_rescale(t: Tensor, base: Tensor, sparsify: str, rescale: bool):
    """A function (t, base, mask) -> (|delta|_1, |delta * mask|_1) as 0-d tensors of their dtype with the bits of torch's
    sums (merge/reductions.py: one pass, no |delta| tensor) for a rescaled drawn mask (DARE's draw reads no
    |delta|), or None: no rescale, a sparsifier that ranks |delta| anyway, or where the fused sums do not
    reproduce torch here (other dtypes, several torch threads, small tensors, no numba)."""
    if not rescale or sparsify not in _DRAWN or t.dtype not in (torch.float32, torch.bfloat16) or base.dtype != t.dtype:
        return None
    try:
        from . import reductions
    except ImportError:
        return None
    if not reductions.fits(base.reshape(-1), [t.reshape(-1), base.reshape(-1)], t.dtype):
        return None
    lanes = reductions.torch_layout()[0]
    return lambda t, base, mask: reductions.masked_abs_sums(t, base, mask, lanes)


# ----------------------------------------------------------------------------- sparsification


def magnitude_mask(magnitude: Tensor, density: float, out: Tensor | None = None, counted=None, **_) -> Tensor | None:
    """TIES trimming (Yadav et al. 2023, arXiv:2306.01708): keep the top ``density`` fraction of |delta|.

    Keeps ``max(1, int(density * n))`` entries; ``None`` means keep everything. Every sparsifier writes its
    flat mask into ``out`` (a contiguous bool tensor of n entries) when given, else into a new tensor.
    ``counted``: the histogram of |delta|'s bit patterns, when its kernel counted them (kernels.abs_diff_counted).
    """
    if density >= 1:
        return None
    n = magnitude.numel()
    if density <= 0 or n == 0:
        return _mask_buffer(out, n).fill_(False)
    from . import select

    # float32 scores, as MergeKit ranks them: the first k of its argsort(descending=True), ties included
    return select.sorted_prefix_mask(_scores(magnitude), max(1, int(density * n)), out=out, counted=counted)


def bernoulli_mask(magnitude: Tensor, density: float, generator: np.random.Generator, out: Tensor | None = None,
                   **_) -> Tensor | None:
    """DARE drop (Yu et al. 2023, arXiv:2311.03099): keep each entry with probability ``density``.

    Entry j is kept when the j-th float32 uniform of the generator's stream is ``< density``, compared in
    float32 as torch's ``uniforms < density`` does. Drawn and compared in one loop (kernels.pcg64_float32,
    numpy's PCG64 stream bit for bit); without numba, CHUNK uniforms at a time into one reused buffer
    (numpy's PCG64 keeps its spare 32 bits between calls: the same stream) and numpy's compare.
    """
    if density >= 1:
        return None
    n = magnitude.numel()
    mask = _mask_buffer(out, n)
    flat, threshold = mask.numpy(), np.float32(density)  # torch casts the Python scalar to float32
    if _pcg(generator, mask=flat, threshold=threshold):
        return mask
    for part in _chunks(n):
        np.less(_uniform(part.stop - part.start, generator).numpy(), threshold, out=flat[part])
    return mask


def outlier_mask(magnitude: Tensor, density: float, gamma: float = 0.01, out: Tensor | None = None,
                 counted=None, **_) -> Tensor | None:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795).

    Drops the ``gamma`` fraction of largest |delta| (outliers), then the smallest, keeping
    ``int(density * n)`` entries: ascending ranks ``[n_bot, n_bot + keep)``.
    """
    if density >= 1:
        return None
    n = magnitude.numel()
    keep, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    from . import select

    # float32 scores, as MergeKit ranks them: its ascending torch.sort, positions [n_bot, n_bot + keep)
    return select.sorted_range_mask(_scores(magnitude), n_bot, n_bot + keep, descending=False, out=out,
                                    counted=counted)


_DELLA_BLOCK = 4 * CHUNK  # draws per della block (2 MB scratch): each block's draw and call cost ~50 us


def della_mask(magnitude: Tensor, density: float, generator: np.random.Generator, epsilon: float = 0.15,
               out: Tensor | None = None, **_) -> Tensor | None:
    """DELLA MagPrune (Deep et al. 2024, arXiv:2406.11617): keep probability grows with magnitude rank.

    Within each row (dim 1; 1-D tensors are one row), p = density - eps + 2 eps (rank - 1) / (m - 1).
    """
    if density >= 1:
        return None
    if density <= 0 or magnitude.numel() == 0:  # nothing kept, or nothing to rank (a [0, n] tensor)
        return _mask_buffer(out, magnitude.numel()).fill_(False)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergescopeError(f"della: epsilon {epsilon} must keep density {density} +/- epsilon inside (0, 1)")
    from . import select

    rows = magnitude if magnitude.dim() >= 2 else magnitude.reshape(1, -1)
    rows = rows.reshape(rows.shape[0], rows.shape[1], -1).movedim(2, 1)  # ranks run along dim 1
    m = rows.shape[-1]
    mask = _mask_buffer(out, magnitude.numel())
    columns = rows.shape[1]  # > 1 for conv kernels: rows are strided, their mask is written back transposed
    keep = mask.view(rows.shape) if columns == 1 else torch.empty(rows.shape, dtype=torch.bool)
    step = max(1, _DELLA_BLOCK // m)  # row blocks bound the draws' scratch
    flat_rows, flat_keep = rows.reshape(-1, m), keep.view(-1, m).numpy()
    probs = _della_probabilities(m, density, epsilon, magnitude.dtype)
    for start in range(0, flat_rows.shape[0], step):
        block = flat_rows[start:start + step]
        draws = _uniform(block.numel(), generator).numpy().reshape(block.shape)
        # draws < probs[rank], the rank torch.argsort(block, dim=1) gives, as MergeKit
        select.draw_rank_mask(block, draws, probs, flat_keep[start:start + step])
    if columns > 1:
        mask.view(rows.shape[0], m, columns).copy_(keep.movedim(1, 2))
    return mask


def _della_probabilities(m: int, density: float, epsilon: float, dtype: torch.dtype) -> np.ndarray:
    """Keep probability per rank 0..m-1 (float64; exact for every dtype), from MergeKit's own expression and
    roundings on a row of all ranks: elementwise, so each entry's probability is a lookup by its rank."""
    ranks = torch.arange(m).reshape(1, m)
    rank_norm = ranks.to(dtype) / (m - 1) if m > 1 else torch.zeros((1, m), dtype=dtype)
    return ((density - epsilon) + rank_norm * (2 * epsilon)).reshape(-1).double().numpy()


def _uniform(n: int, generator: np.random.Generator) -> Tensor:
    """n float32 uniforms in [0, 1) from a private PCG64 stream (3-4x faster than torch's mt19937), drawn
    into this thread's reused buffer: valid until the next call on the thread."""
    draws = scratch.array("methods.uniforms", n, np.float32)
    if not _pcg(generator, values=draws):
        generator.random(out=draws, dtype=np.float32)
    return torch.from_numpy(draws)


def _pcg(generator: np.random.Generator, **fill) -> bool:
    """kernels.pcg64_float32 (numpy's PCG64 float32 stream, faster) when numba imports and the generator is
    a PCG64 one; False: the caller draws with numpy."""
    kernels = _kernel_module()
    return kernels is not None and kernels.pcg64_float32(generator, **fill)


def _scores(magnitude: Tensor) -> Tensor:
    """The flat scores to rank as MergeKit ranks ``magnitude.float()``: the tensor itself when float32, bf16 or
    fp16 (merge/select.py ranks half scores by their 16-bit patterns, in their float32 order: no 4-byte
    copy, a bf16 embedding's would be 131 MB), else a float32 copy in this thread's reused buffer."""
    flat = magnitude.reshape(-1)
    if flat.dtype in (torch.float32, *HALF):
        return flat
    return scratch.tensor("methods.scores", flat.numel(), torch.float32).copy_(flat)


def _mask_buffer(out: Tensor | None, n: int) -> Tensor:
    """Where a sparsifier writes its flat mask: ``out`` (checked) or a new tensor."""
    if out is None:
        return torch.empty(n, dtype=torch.bool)
    if out.dtype != torch.bool or out.numel() != n or out.dim() != 1 or not out.is_contiguous():
        raise MergescopeError(f"mask out: needs a contiguous flat bool tensor of {n} entries, got {out.dtype} "
                              f"{list(out.shape)}")
    return out


def random_stream(seed: int) -> np.random.Generator:
    """The private generator of one random merge: same seed, same bits."""
    return np.random.Generator(np.random.PCG64(int(seed) & 0xFFFFFFFFFFFFFFFF))


SPARSIFIERS: dict[str, Callable[..., Tensor | None]] = {
    "magnitude": magnitude_mask,
    "random": bernoulli_mask,
    "magnitude_outliers": outlier_mask,
    "della_magprune": della_mask,
}
_SORTED = {"magnitude", "magnitude_outliers"}  # sparsifiers that rank |delta| by a radix histogram of its bits
_DRAWN = {"random"}  # sparsifiers that read only |delta|'s size


# ----------------------------------------------------------------------------- task arithmetic family


def _task_vector_plan(tensors, base, density, sparsify, rescale, seed, extra):
    """Per model: (keep mask or None, L1 rescale factor). Sparsifiers only need |theta_i - base|.

    |delta| and the masks live in this thread's reused buffers (merge/scratch.py): the plan is consumed
    within the calling method, before its next call on the thread, and never returned."""
    work = _work_dtype(base)
    generator = random_stream(seed)
    plan = []
    n = base.numel()
    kernels = _kernels(work, [base, *tensors]) if sparsify is not None else None
    for i, t in enumerate(tensors):
        mask, factor = None, 1.0
        if sparsify is not None:
            params = {k: v[i] for k, v in extra.items()}
            fused = _fused_rescale(t, base, sparsify, rescale)  # then no |delta| is computed at all
            buffer = None if kernels is None else scratch.tensor("methods.magnitude", n, work).view(base.shape)
            if fused is not None:
                magnitude = base
            elif buffer is not None and work == torch.float32 and sparsify in _SORTED:  # select's histogram too
                magnitude, params["counted"] = kernels.abs_diff_counted(buffer, t, base)
            elif buffer is not None:  # one buffer for all models
                magnitude = kernels.abs_diff(buffer, t, base)
            else:
                magnitude = (_flat(t).to(work) - _flat(base).to(work)).abs_().reshape(base.shape)
            mask = SPARSIFIERS[sparsify](magnitude, density=density[i], generator=generator,
                                         out=scratch.tensor(f"methods.mask{i}", n, torch.bool), **params)
            if mask is not None and rescale:  # consumes magnitude
                factor = _rescale(fused, t, base, mask, magnitude)
            del magnitude
        plan.append((mask, factor))
    return plan


def generalized_task_arithmetic(tensors: Sequence[Tensor], base: Tensor, *, weight: Sequence[float],
                                density: Sequence[float] | None = None, sparsify: str | None = None,
                                consensus: bool = False, normalize: bool = False, rescale: bool = False,
                                lam: float = 1.0, seed: int = 0, out: Tensor | None = None,
                                **extra: Sequence[float]) -> Tensor:
    """base + lam * combine_i(w_i * sparsify(theta_i - base)).

    combine = sum (task arithmetic) or, with ``consensus``, the TIES sign election: the majority
    sign is that of sum_i w_i d_i (>= 0 counts positive) and only agreeing entries are summed;
    ``normalize`` divides by the summed weights of the contributing models (per entry with consensus).
    float32/float64 run as one fused loop (merge/kernels.py, the same bits); ``out`` (see _out_buffer)
    receives the result and is returned.
    """
    _check_same_shape(tensors, base)
    if not tensors:
        return base.clone() if out is None else _out_buffer(out, base).copy_(base)
    density = density if density is not None else [1.0] * len(tensors)
    if base.dtype in HALF:
        merged = _half_task_arithmetic(tensors, base, weight, density, sparsify, consensus, normalize, rescale, lam,
                                       seed, extra, out)
        return merged if out is None or merged is out else _out_buffer(out, base).copy_(merged)
    work = _work_dtype(base)
    plan = _task_vector_plan(tensors, base, density, sparsify, rescale, seed, extra)
    total = float(torch.tensor([float(x) for x in weight], dtype=work).sum())
    if abs(total) < 1e-8:
        total = 1.0
    weights = [float(x) for x in weight]
    result = _out_buffer(out, base)
    kernels = _kernels(work, [base, *tensors] if weights else [], [m for m, _ in plan if m is not None])
    if kernels is not None:
        return kernels.task_vectors(result, base, tensors, plan, weights, total, consensus, normalize, lam)
    out = result.view(-1)
    b_flat = _flat(base)
    for part in _chunks(base.numel()):
        b = b_flat[part].to(work)
        deltas = []
        for t, (mask, factor), w_i in zip(tensors, plan, weights):
            d = _flat(t)[part].to(work) - b
            if mask is not None:
                d.mul_(mask[part].to(work))
            if not (isinstance(factor, float) and factor == 1.0):
                d.mul_(factor)
            deltas.append(d.mul_(w_i))
        mixed = _sum(deltas)
        if consensus:
            mixed, divisor = _sign_consensus(deltas, weights, mixed)
        else:
            divisor = total
        out[part] = _scaled_sum(b, mixed, divisor, normalize, lam)
    return result


def _out_buffer(out: Tensor | None, like: Tensor) -> Tensor:
    """Where a method writes its result: ``out`` when given (a contiguous CPU tensor of the result's dtype
    and shape, e.g. the mapped pages of an output shard: no allocation, no copy), else a new tensor."""
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype)
    if not isinstance(out, Tensor) or out.shape != like.shape or out.dtype != like.dtype \
            or out.device.type != "cpu" or not out.is_contiguous():
        got = f"{out.dtype} {list(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise MergescopeError(f"out: needs a contiguous CPU {like.dtype} tensor of shape {list(like.shape)}, "
                              f"got {got}")
    return out


def _kernels(dtype: torch.dtype, tensors: Sequence[Tensor], masks: Sequence[Tensor] = ()):
    """merge/kernels.py when numba imports and the inputs fit its loops, else None (the torch chain)."""
    kernels = _kernel_module() if tensors else None
    return kernels if kernels is not None and kernels.fits(dtype, tensors, masks) else None


def _bf16_kernels(tensors: Sequence[Tensor]):
    """merge/kernels.py when numba imports and its bf16 loops take ``tensors`` (contiguous CPU bf16), else None."""
    kernels = _kernel_module() if tensors and tensors[0].dtype == torch.bfloat16 else None  # numba: only for bf16
    return kernels if kernels is not None and kernels.fits_bf16(tensors) else None


def _kernel_module():
    """merge/kernels.py, or None where numba does not import. Imported on first use, not at
    ``import mergescope``: numba takes a while to load."""
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


def _scaled_sum(b: Tensor, mixed: Tensor, divisor, normalize: bool, lam: float) -> Tensor:
    """base + lam * mixed (/ divisor when normalising), in MergeKit's order of operations."""
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return b + mixed


HALF = (torch.bfloat16, torch.float16)


def _half_masks(tensors, base, density, sparsify, rescale, seed, extra) -> list[tuple]:
    """Per model: (keep mask or None, _rescale_factor or None), from the half-precision delta as MergeKit
    rounds it (its ranking and its norms see those values, not the exact float32 difference).

    |delta| is computed window by window, the mapped pages of large inputs given back behind each window
    (pages.reread): the masks need all of |delta|, not the inputs, which the merge's own pass reads again.
    The rescale's masked |delta| overwrites |delta| itself (the same values in the same layout: the same sum).
    """
    generator = random_stream(seed)
    plan = []
    n = base.numel()
    for i, t in enumerate(tensors):
        mask = factor = None
        if sparsify is not None:  # |delta| and masks in this thread's reused buffers, as _task_vector_plan's
            params = {k: v[i] for k, v in extra.items()}
            buffer = scratch.tensor("methods.half_magnitude", n, base.dtype)
            kernels = _bf16_kernels([base, t]) if sparsify in _SORTED else None
            fused = _fused_rescale(t, base, sparsify, rescale)
            if fused is not None:
                magnitude = base.reshape(-1)
            elif kernels is not None:  # select's histogram counted in the same pass
                magnitude, params["counted"] = kernels.abs_diff_counted(buffer, t, base)
            else:
                magnitude = _half_magnitude(t, base, buffer)
            mask = SPARSIFIERS[sparsify](magnitude.view(base.shape), density=density[i], generator=generator,
                                         out=scratch.tensor(f"methods.mask{i}", n, torch.bool), **params)
            if mask is not None and rescale:
                factor = _rescale(fused, t, base, mask, functools.partial(_half_magnitude, t, base, buffer)
                                  if fused is not None else magnitude)
        plan.append((mask, factor))
    return plan


def _half_magnitude(t: Tensor, base: Tensor, out: Tensor) -> Tensor:
    """``(t - base).abs()`` in the inputs' half dtype into flat ``out``, window by window, giving back the
    mapped pages of inputs over pages.RESIDENT bytes behind each window (pages.reread: the merge's own pass
    reads them again; elementwise torch ops: the same bits as one whole-tensor op)."""
    t_flat, b_flat = t.reshape(-1), base.reshape(-1)
    for start, stop in pages.windows(out.numel(), pages.WINDOW, *pages.reread(t_flat, b_flat)):
        torch.sub(t_flat[start:stop], b_flat[start:stop], out=out[start:stop]).abs_()
    return out


def _half_task_arithmetic(tensors, base, weight, density, sparsify, consensus, normalize, rescale, lam, seed,
                          extra, out: Tensor | None = None) -> Tensor:
    """MergeKit 0.1.5's own arithmetic for bf16/fp16 inputs: each step rounded to the input dtype in its
    order (weights rounded to it too), so half-precision outputs are its bytes. Rounding once from float32
    (the float32 path) is more accurate, but a merge of bf16 models would then differ from MergeKit's at
    about half of the entries by an ulp (measured on its own test recipes). Chunked after the masks; bf16
    runs as one numba loop with the same roundings (merge/kernels.py) where numba imports."""
    plan = _half_masks(tensors, base, density, sparsify, rescale, seed, extra)
    w = torch.tensor([float(x) for x in weight], dtype=base.dtype)[:, None]
    kernels = _bf16_kernels([base, *tensors])
    if kernels is not None:  # one fused pass, the same roundings
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
        result = _out_buffer(out, base)  # the output slot itself when given
        return kernels.half_task_vectors(result, base, tensors, plan, w, consensus, normalize, lam, divisor)
    out = torch.empty(base.numel(), dtype=base.dtype)
    b_flat = base.reshape(-1)
    for part in _chunks(base.numel()):
        b = b_flat[part]
        deltas = torch.stack([t.reshape(-1)[part] - b for t in tensors])
        for i, (mask, factor) in enumerate(plan):
            if mask is not None:
                deltas[i] = deltas[i] * mask[part]
            if factor is not None:
                deltas[i] = deltas[i] * factor
        deltas.mul_(w)
        if consensus:
            agree = deltas.sign() == (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
            mixed, divisor = (deltas * agree).sum(dim=0), (w * agree).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed, divisor = deltas.sum(dim=0), w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        out[part] = _scaled_sum(b, mixed, divisor, normalize, lam)
    return out.reshape(base.shape)


def _sum(parts: list[Tensor]) -> Tensor:
    total = parts[0].clone()
    for p in parts[1:]:
        total.add_(p)
    return total


def _sign_consensus(deltas: list[Tensor], weights: list[float], total: Tensor) -> tuple[Tensor, Tensor]:
    """TIES sign election: majority sign = sign of the sum (>= 0 is +); keep entries that agree.

    Returns (sum of agreeing entries, sum of the weights of agreeing models; 1 where none agree).
    Float arithmetic throughout (d * majority > 0), which is much faster than boolean kernels.
    """
    majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for d, w in zip(deltas, weights):
        agree = (d * majority > 0).to(total.dtype)
        mixed.addcmul_(d, agree)
        divisor.add_(agree, alpha=w)
    divisor[divisor == 0] = 1
    return mixed, divisor


def task_arithmetic(tensors, base, *, weight, normalize=False, lam=1.0, out=None, **_):
    """Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): base + lam * sum_i w_i (theta_i - base).

    Negative weights subtract a task vector (task negation).
    """
    return generalized_task_arithmetic(tensors, base, weight=weight, normalize=normalize, lam=lam, out=out)


def ties(tensors, base, *, weight, density=None, normalize=True, lam=1.0, rescale=False, out=None, **_):
    """TIES-merging (Yadav et al. 2023, arXiv:2306.01708): trim to top-density |delta|, elect signs, disjoint mean."""
    return generalized_task_arithmetic(tensors, base, weight=weight, density=density, sparsify="magnitude",
                                       consensus=True, normalize=normalize, rescale=rescale, lam=lam, out=out)


def dare_ties(tensors, base, *, weight, density=None, normalize=False, rescale=True, lam=1.0, seed=0, out=None,
              **_):
    """DARE (Yu et al. 2023, arXiv:2311.03099) drop with probability 1 - density, L1-rescale, then TIES sign election."""
    return generalized_task_arithmetic(tensors, base, weight=weight, density=density, sparsify="random",
                                       consensus=True, normalize=normalize, rescale=rescale, lam=lam, seed=seed,
                                       out=out)


def dare_linear(tensors, base, *, weight, density=None, normalize=False, rescale=True, lam=1.0, seed=0, out=None,
                **_):
    """DARE (arXiv:2311.03099) drop with probability 1 - density, L1-rescale, then task arithmetic."""
    return generalized_task_arithmetic(tensors, base, weight=weight, density=density, sparsify="random",
                                       normalize=normalize, rescale=rescale, lam=lam, seed=seed, out=out)


def breadcrumbs(tensors, base, *, weight, density=None, gamma=None, normalize=False, rescale=False, lam=1.0,
                out=None, **_):
    """Model Breadcrumbs (arXiv:2312.06795): drop the largest gamma and the smallest |delta|, then sum."""
    gamma = gamma if gamma is not None else [0.01] * len(tensors)
    return generalized_task_arithmetic(tensors, base, weight=weight, density=density, sparsify="magnitude_outliers",
                                       normalize=normalize, rescale=rescale, lam=lam, gamma=gamma, out=out)


def breadcrumbs_ties(tensors, base, *, weight, density=None, gamma=None, normalize=False, rescale=False, lam=1.0,
                     out=None, **_):
    """Model Breadcrumbs (arXiv:2312.06795) masks with the TIES sign election."""
    gamma = gamma if gamma is not None else [0.01] * len(tensors)
    return generalized_task_arithmetic(tensors, base, weight=weight, density=density, sparsify="magnitude_outliers",
                                       consensus=True, normalize=normalize, rescale=rescale, lam=lam, gamma=gamma,
                                       out=out)


def della(tensors, base, *, weight, density=None, epsilon=None, normalize=True, rescale=True, lam=1.0, seed=0,
          out=None, **_):
    """DELLA (Deep et al. 2024, arXiv:2406.11617): MagPrune by rank, L1-rescale, TIES sign election."""
    epsilon = epsilon if epsilon is not None else [0.15] * len(tensors)
    return generalized_task_arithmetic(tensors, base, weight=weight, density=density, sparsify="della_magprune",
                                       consensus=True, normalize=normalize, rescale=rescale, lam=lam, seed=seed,
                                       epsilon=epsilon, out=out)


def della_linear(tensors, base, *, weight, density=None, epsilon=None, normalize=False, rescale=True, lam=1.0,
                 seed=0, out=None, **_):
    """DELLA MagPrune (arXiv:2406.11617) followed by plain task arithmetic."""
    epsilon = epsilon if epsilon is not None else [0.15] * len(tensors)
    return generalized_task_arithmetic(tensors, base, weight=weight, density=density, sparsify="della_magprune",
                                       normalize=normalize, rescale=rescale, lam=lam, seed=seed, epsilon=epsilon,
                                       out=out)


# ----------------------------------------------------------------------------- averages and interpolation


def linear(tensors: Sequence[Tensor], base: Tensor | None = None, *, weight: Sequence[float],
           normalize: bool = True, out: Tensor | None = None, **_) -> Tensor:
    """Model soup / weighted average (Wortsman et al. 2022, arXiv:2203.05482): sum_i w_i theta_i / sum_i w_i.

    With ``normalize=False`` the weighted sum is returned unscaled. float32/float64 run as one fused loop
    (merge/kernels.py, the same bits); ``out`` (see _out_buffer) receives the result and is returned.
    """
    _check_same_shape(tensors)
    first = tensors[0]
    if not first.is_floating_point():
        raise MergescopeError("linear merging needs floating-point tensors")
    work = _work_dtype(first)
    w = torch.tensor([float(x) for x in weight], dtype=work)  # weights and their sum in the working dtype,
    total = w.sum()  # as MergeKit 0.1.5 rounds them (a float64 sum rounded once differs in the last bit)
    result = _out_buffer(out, first)
    kernels = _kernels(work, tensors if len(w) else [])
    if kernels is not None and kernels.torch_fuses_addcmul(work) is not None:
        return kernels.weighted_sum(result, tensors, w, total, normalize)
    bf16 = _bf16_kernels(tensors[:len(w)])
    if bf16 is not None and bf16.torch_fuses_addcmul(work, torch.bfloat16) is not None:
        return bf16.bf16_weighted_sum(result, tensors, w, total, normalize)
    out, flats = result.view(-1), [_flat(t) for t in tensors]
    for part in _window_chunks(first.numel(), out, *flats):
        acc = torch.zeros(part.stop - part.start, dtype=work)
        for t, w_i in zip(flats, w):
            acc.addcmul_(t[part], w_i)
        if normalize:
            acc.div_(total)
        out[part] = acc
    return result


SLERP_CHUNK = 1 << 20  # entries per partial norm / dot (MergeKit 0.1.5's chunk: the same sums, the same bits)


def _slerp_coefficients(a: Tensor, b: Tensor, t: float, dot_threshold: float, eps: float) -> tuple[Tensor, Tensor]:
    """Slerp's two coefficients, as MergeKit 0.1.5 computes them: norms as the norm of per-chunk norms,
    the dot of the normalised vectors summed per chunk (float32, float64 for float64 inputs). A single
    float32 reduction over tens of millions of entries is off by ~0.2%; the chunked one is not.
    The normalised chunks and their product go to this thread's reused buffers (the same elementwise
    roundings and the same sums as MergeKit's temporaries, without a fresh 4 MB mapping per chunk)."""
    work = _work_dtype(a)
    rows_a, rows_b = a.reshape(1, -1), b.reshape(1, -1)
    spans = [slice(s, s + SLERP_CHUNK) for s in range(0, rows_a.shape[1], SLERP_CHUNK)]
    width = min(SLERP_CHUNK, rows_a.shape[1])
    converted = None if a.dtype == b.dtype == work else scratch.tensor("methods.slerp_in", width, work)

    def in_work(rows: Tensor, span: slice) -> Tensor:  # MergeKit's ``.to(work)``, into a reused buffer
        part = rows[:, span]
        return part if part.dtype == work else converted[:part.shape[1]].view(1, -1).copy_(part)

    given_back = pages.reread(a, b)  # the mix reads a and b again: only large inputs' pages go back here
    fused = _fused_slerp_reductions(a, b)

    def norms(span: slice) -> tuple[Tensor, Tensor]:  # of one chunk, whose mapped input pages then may go back
        pair = None if fused is None else fused.norms(a[span], b[span])
        if pair is None:
            pair = tuple(torch.linalg.vector_norm(in_work(rows, span), dim=1, keepdim=True)
                         for rows in (rows_a, rows_b))
        for flat in given_back:
            pages.release(flat, span.start, min(span.stop, flat.numel()))
        return pair

    chunk_a, chunk_b = zip(*(norms(s) for s in spans))
    norm_a = torch.linalg.vector_norm(torch.stack(chunk_a), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(chunk_b), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    x_buf, y_buf = scratch.tensor("methods.slerp_x", width, work), scratch.tensor("methods.slerp_y", width, work)
    parts = []
    for s in spans:
        part = None if fused is None else fused.dot(a[s], b[s], float(norm_a), float(norm_b))
        if part is None:
            x = torch.div(in_work(rows_a, s), norm_a, out=x_buf[:rows_a[:, s].shape[1]].view(1, -1))
            y = torch.div(in_work(rows_b, s), norm_b, out=y_buf[:x.shape[1]].view(1, -1))
            part = torch.mul(x, y, out=x).sum(dim=1, keepdim=True)
        parts.append(part)
        for flat in given_back:
            pages.release(flat, s.start, min(s.stop, flat.numel()))
    dot = torch.stack(parts).sum(dim=0).clamp(-1, 1)
    t = torch.tensor([t]).reshape(-1, 1).to(work)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    return (torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta),
            torch.where(linear, t, torch.sin(t * theta) / sin_theta))


class _SlerpReductions(NamedTuple):
    """Slerp's per-chunk reductions from merge/reductions.py, each None for a chunk it does not take (too short,
    several torch threads): ``norms(a, b)`` -> the two (1, 1) norms (bf16 chunks only), ``dot(a, b, norm_a,
    norm_b)`` -> the (1, 1) dot of the normalised chunks; torch's float32 bits, one pass each, no float32 copy
    of bf16 chunks (bf16 slerp in-process 2.4-2.6 -> 1.4-1.6 s on 4 x 0.54 GB)."""
    norms: Callable[[Tensor, Tensor], tuple[Tensor, Tensor] | None]
    dot: Callable[[Tensor, Tensor, float, float], Tensor | None]


def _fused_slerp_reductions(a: Tensor, b: Tensor) -> _SlerpReductions | None:
    """The fused reductions for float32 a and b, or bf16 ones (torch reduces their float32 copies: the same
    values); None for other dtypes, small tensors, no numba, or no layout matching torch's here."""
    if a.dtype != b.dtype or a.dtype not in (torch.float32, torch.bfloat16):
        return None
    try:
        from . import reductions
    except ImportError:
        return None
    if a.numel() < reductions.MIN_ENTRIES or reductions.torch_layout() is None:  # small: not worth calibrating
        return None
    lanes, fused_tail = reductions.torch_layout()
    fits = lambda x, y: reductions.fits(x, [x, y], x.dtype, as_float32=True)

    def norms(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor] | None:  # float32: torch's own vector kernel is faster
        if x.dtype != torch.bfloat16 or not fits(x, y):  # (0.5 ms per 1 M-entry pair against the loop's 2.6 ms)
            return None
        return tuple(torch.tensor([[value]], dtype=torch.float32)
                     for value in reductions.two_norms(x, y, lanes, fused_tail))

    def dot(x: Tensor, y: Tensor, norm_x: float, norm_y: float) -> Tensor | None:
        if not fits(x, y):
            return None
        return torch.tensor([[reductions.quotient_product_sum(x, y, norm_x, norm_y, lanes)]])
    return _SlerpReductions(norms, dot)


def slerp(tensors: Sequence[Tensor], base: Tensor, *, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8,
          out: Tensor | None = None, **_) -> Tensor:
    """Spherical interpolation (Shoemake 1985) from ``base`` (t=0) to the other model (t=1).

    Each tensor is one flat vector: theta = acos(<a/|a|, b/|b|>), result =
    sin((1-t) theta)/sin theta * a + sin(t theta)/sin theta * b; plain lerp when |cos theta| > 0.9995.
    ``out`` (see _out_buffer) receives the result and is returned.
    """
    if len(tensors) != 1:
        raise MergescopeError(f"slerp merges exactly two models (a base and one other), got {len(tensors) + 1}")
    _check_same_shape(tensors, base)
    work = _work_dtype(base)
    a, b = base.reshape(-1), tensors[0].reshape(-1)
    result = _out_buffer(out, base)
    if a.numel() == 0:
        return result
    coef_a, coef_b = _slerp_coefficients(a, b, float(t), dot_threshold, eps)
    coef_a, coef_b = coef_a.reshape(1), coef_b.reshape(1)
    kernels = _bf16_kernels([a, b, result]) or _kernels(work, [a, b, result])
    if kernels is not None:  # one loop instead of torch's (bf16 -> float32 copies and) ops per chunk
        return kernels.lerp(result, a, b, float(coef_a), float(coef_b))
    flat, in_place = result.view(-1), base.dtype == work
    x_buf, y_buf = scratch.tensor("methods.slerp_x", CHUNK, work), scratch.tensor("methods.slerp_y", CHUNK, work)
    for part in _window_chunks(a.numel(), a, b, flat):  # chunked into reused buffers: no tensor-sized temporaries
        size = part.stop - part.start
        x = torch.mul(coef_a, a[part].to(work), out=x_buf[:size])
        y = torch.mul(coef_b, b[part].to(work), out=y_buf[:size])
        if in_place:
            torch.add(x, y, out=flat[part])
        else:
            flat[part] = x.add_(y)
    return result


def _nuslerp_pair(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(tensors: Sequence[Tensor], base: Tensor | None = None, *, weight: Sequence[float],
            nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True, **_) -> Tensor:
    """Slerp between two models with t = w_2 / (w_1 + w_2); with a base, slerp of the task vectors.

    ``nuslerp_flatten`` treats the tensor as one vector; else rows (or columns, ``nuslerp_row_wise``).
    """
    if len(tensors) != 2:
        raise MergescopeError(f"nuslerp merges exactly two non-base models, got {len(tensors)}")
    _check_same_shape(tensors, base)
    total = float(weight[0]) + float(weight[1])
    t = 0.5 if abs(total) < 1e-6 else float(weight[1]) / total
    v0, v1 = tensors
    if base is None:
        return _nuslerp_pair(t, v0, v1, nuslerp_row_wise, nuslerp_flatten)
    return base + _nuslerp_pair(t, v0 - base, v1 - base, nuslerp_row_wise, nuslerp_flatten)


def multislerp(tensors: Sequence[Tensor], base: Tensor | None = None, *, weight: Sequence[float],
               normalize_weights: bool = True, eps: float = 1e-8, **_) -> Tensor:
    """Barycentric interpolation on the hypersphere (Goddard, "multislerp"): tangent-space mean at the
    weighted mean direction, mapped back with the exponential map, scaled by the weighted mean norm.
    """
    _check_same_shape(tensors, base)
    if len(tensors) == 1:
        return tensors[0].clone()
    x = torch.stack([t.reshape(-1) for t in tensors])
    if base is not None:
        x = x - base.reshape(-1)
    w = torch.tensor([float(v) for v in weight], dtype=x.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise MergescopeError("multislerp: the weighted mean direction is zero (antipodal inputs balance out)")
        out = x[0] * w[0] + x[1] * w[1]
    else:
        mean = mean / mean_norm
        tangent = units - (units * mean).sum(-1, keepdim=True) * mean
        step = (tangent * w[:, None]).sum(0)
        step_norm = torch.linalg.vector_norm(step) + eps
        out = (mean * torch.cos(step_norm) + step * (torch.sin(step_norm) / step_norm)) * (norms[:, 0] * w).sum()
    out = out.reshape(tensors[0].shape)
    return out + base if base is not None else out


def karcher(tensors: Sequence[Tensor], base: Tensor | None = None, *, max_iter: int = 10, tol: float = 1e-5,
            **_) -> Tensor:
    """Karcher (Riemannian) mean of the directions on the unit sphere, scaled by the mean norm.

    Fixed-point iteration m <- exp_m(sum_i a_i log_m(u_i)) (Karcher 1977), equal weights a_i = 1/n.
    Norms are taken in float32 (float64 inputs: float64); directions, the mean and the tangent stay in
    the inputs' dtype, rounded where MergeKit 0.1.5 rounds them, so bf16 outputs are its bytes.
    """
    _check_same_shape(tensors)
    if len(tensors) == 1:
        return tensors[0].clone()
    work = _work_dtype(tensors[0])
    alphas = [1.0 / len(tensors)] * len(tensors)
    flats = [t.reshape(-1) for t in tensors]
    norms = [torch.linalg.vector_norm(f.to(work)) for f in flats]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = [(flats[i] / norms[i]).to(flats[i].dtype) for i in valid]
    a_sum = sum(alphas[i] for i in valid)
    a = [alphas[i] / a_sum for i in valid]
    mean = torch.zeros_like(units[0])
    for ai, u in zip(a, units):
        mean += ai * u
    mean_norm = torch.linalg.vector_norm(mean.to(work))
    mean = units[0].clone() if float(mean_norm) < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, units):
            dot = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += ai * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(work))
        if float(tangent_norm) < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(work))
        if float(unit_norm) > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return (scale * mean).to(tensors[0].dtype).reshape(tensors[0].shape)


def model_stock(tensors: Sequence[Tensor], base: Tensor, *, filter_wise: bool = False, out: Tensor | None = None,
                **_) -> Tensor:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522): t = N cos / (1 + (N-1) cos) from the mean
    pairwise cosine of the deltas; result t * mean(theta_i) + (1 - t) * base (per row if ``filter_wise``).
    ``out`` (see _out_buffer) receives the result and is returned.
    """
    if len(tensors) < 2:
        raise MergescopeError(f"model_stock needs a base and at least two other models, got {len(tensors)}")
    _check_same_shape(tensors, base)
    if filter_wise:
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
        ws = [t if t.dim() > 1 else t.unsqueeze(0) for t in tensors]
    else:
        w0, ws = base.reshape(-1), [t.reshape(-1) for t in tensors]
    cos = _stock_cosine(ws, w0)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    singular = denom.abs() < 1e-6
    ratio = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denom), denom))
    result = _out_buffer(out, base) if ratio.dtype == base.dtype else None
    mixed = _stock_mix(ws, w0, ratio, None if result is None else result.view(w0.shape))
    return mixed.reshape(base.shape) if result is None else result


def _stock_cosine(ws: Sequence[Tensor], w0: Tensor) -> Tensor:
    """The mean pairwise cosine of the offsets ``w - w0`` along the last dimension, as MergeKit 0.1.5 computes
    it: whole-tensor torch norms and sums (their bits depend on torch's reduction order). On torch's path, why
    one buffer: each reduction's operand (an offset, or the product of two) is filled into this thread's
    one tensor-sized buffer window by window, with the same elementwise roundings as MergeKit's whole-tensor
    offsets, and the inputs' mapped pages are given back behind each window (merge/pages.py): one tensor of
    scratch, not n offsets and a product, and a few windows of input resident, not every input whole.
    Whole-tensor float32 reductions on one thread take one fused pass instead (merge/reductions.py: torch's
    summation orders reproduced, the same bits), with no buffer."""
    fused = _fused_reductions(ws, w0)
    if fused is not None:  # float32 values: bf16 ones rounded once, as torch stores its float accumulators
        norms, sums = (list(torch.from_numpy(values).to(w0.dtype).unbind()) for values in fused)
        cosines = [(sums.pop(0) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
                   for i in range(len(ws)) for j in range(i + 1, len(ws))]
        return torch.stack(cosines).mean(0).unsqueeze(-1)
    work = _reused("methods.stock_work", w0.shape, torch.result_type(ws[0], w0))
    flat_work, flat_w0, flat_ws = work.view(-1), w0.reshape(-1), [w.reshape(-1) for w in ws]
    kernels = _stock_kernels(work.dtype, [w0, *ws])
    fill = _stock_fill if kernels is None else kernels.stock_operand
    norms = [torch.linalg.vector_norm(fill(flat_work, flat_w0, w).view(w0.shape), dim=-1) for w in flat_ws]
    cosines = []
    for i in range(len(ws)):
        for j in range(i + 1, len(ws)):
            product = fill(flat_work, flat_w0, flat_ws[i], flat_ws[j]).view(w0.shape)
            cosines.append((product.sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(0).unsqueeze(-1)


def _fused_reductions(ws: Sequence[Tensor], w0: Tensor):
    """merge/reductions.py's (norms, pair sums) of the offsets, or None where it does not reproduce torch's
    reductions (per-row cosines, other dtypes, several torch threads, no numba)."""
    if w0.dim() != 1:
        return None
    try:
        from . import reductions
    except ImportError:
        return None
    if w0.dtype not in (torch.float32, torch.bfloat16) or not reductions.fits(w0, list(ws), w0.dtype):
        return None
    return reductions.offset_reductions(w0, list(ws), *reductions.torch_layout())


def _stock_fill(work: Tensor, w0: Tensor, a: Tensor, b: Tensor | None = None) -> Tensor:
    """``work = a - w0`` (or ``(a - w0) * (b - w0)``), flat, window by window; the inputs' pages of each finished
    window are released when they are over pages.RESIDENT bytes (pages.reread). Returns ``work``."""
    n = work.numel()
    spare = None if b is None else _reused("methods.stock_spare", torch.Size([min(n, STOCK_WINDOW)]), work.dtype)
    for start, stop in pages.windows(n, STOCK_WINDOW, *pages.reread(*((w0, a) if b is None else (w0, a, b)))):
        part = work[start:stop]
        torch.sub(a[start:stop], w0[start:stop], out=part)
        if b is not None:
            part.mul_(torch.sub(b[start:stop], w0[start:stop], out=spare[:stop - start]))
    return work


def _stock_kernels(dtype: torch.dtype, tensors: Sequence[Tensor]):
    """merge/kernels.py for model_stock's passes: float32/float64 as _kernels, and bf16 (each op rounded to
    bf16 as torch does); None: torch's ops."""
    if dtype == torch.bfloat16:
        return _bf16_kernels(tensors)
    return _kernels(dtype, tensors)


def _reused(purpose: str, shape: torch.Size, dtype: torch.dtype) -> Tensor:
    """This thread's reused buffer for ``purpose`` (merge/scratch.py's rules) for float32/float64, else a new
    tensor: a half-precision one is freed after its job instead of staying in the worker's arena."""
    if dtype not in (torch.float32, torch.float64):
        return torch.empty(shape, dtype=dtype)
    return scratch.tensor(purpose, math.prod(shape), dtype).view(shape)


def _stock_mix(ws: Sequence[Tensor], w0: Tensor, ratio: Tensor, out: Tensor | None = None) -> Tensor:
    """``ratio * (sum(ws) / n) + (1 - ratio) * w0`` in blocks: the same elementwise roundings as the whole-tensor
    expression (MergeKit's), without its seven tensor-sized temporaries; mapped pages of the inputs and of
    ``out`` are given back window by window. ``ratio`` is one number, or one per row of the last dimension
    (filter-wise). ``out`` (w0's shape, ratio's dtype) receives the result."""
    n, keep = len(ws), 1 - ratio
    out = torch.empty(w0.shape, dtype=torch.result_type(ratio, w0)) if out is None else out
    kernels = _stock_kernels(out.dtype, [w0, *ws, out, ratio.reshape(-1).contiguous()])
    if kernels is not None:  # one fused pass, the same roundings
        return kernels.stock_mix(out, ws, w0, ratio, keep)
    per_row = ratio.numel() > 1
    width = w0.shape[-1] if per_row else 1
    flat_ws, flat_w0, flat_out = [w.reshape(-1, width) for w in ws], w0.reshape(-1, width), out.view(-1, width)
    rows, step = flat_w0.shape[0], max(1, CHUNK // width)
    window = max(step, STOCK_WINDOW // width // step * step)
    for first in range(0, rows, window):
        last = min(rows, first + window)
        for lo in range(first, last, step):
            part = slice(lo, min(last, lo + step))
            r, k = (ratio.reshape(-1, 1)[part], keep.reshape(-1, 1)[part]) if per_row else (ratio, keep)
            flat_out[part] = r * (sum(w[part] for w in flat_ws) / n) + k * flat_w0[part]
        for t in (flat_out, flat_w0, *flat_ws):
            pages.release(t, first * width, last * width)
    return out


def nearswap(tensors: Sequence[Tensor], base: Tensor, *, t: float, **_) -> Tensor:
    """NearSwap: take the other model where it is within ``t`` of the base:
    w = clamp(t / max(|a - b|, 1e-6), 0, 1), result w * b + (1 - w) * a.
    """
    if len(tensors) != 1:
        raise MergescopeError(f"nearswap merges exactly two models (a base and one other), got {len(tensors) + 1}")
    _check_same_shape(tensors, base)
    other = tensors[0]
    weight = (float(t) / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * other + (1 - weight) * base


def sce(tensors: Sequence[Tensor], base: Tensor, *, select_topk: float = 1.0, **_) -> Tensor:
    """SCE (Wan et al. 2024, arXiv:2408.07990): Select entries with top-k variance across task vectors,
    Calculate weights mean(d_i^2) / sum_j mean(d_j^2), Erase minority signs, weighted disjoint mean.
    """
    _check_same_shape(tensors, base)
    if not tensors:
        return base.clone()
    deltas = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        deltas = deltas * _variance_mask(deltas, select_topk).to(deltas.dtype)
    positive = deltas.sum(0) >= 0
    agree = torch.where(positive, deltas > 0, deltas < 0)
    energy = deltas.square().reshape(len(tensors), -1).mean(1)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1 / len(tensors)) if abs(total) < 1e-6 else energy / total
    weights = weights.reshape(-1, *([1] * base.dim())) * agree
    return base + (deltas * weights).sum(0) / weights.sum(0).clamp(min=1e-6)


def _variance_mask(deltas: Tensor, density: float) -> Tensor:
    if density <= 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.bool)
    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)  # a float32 product, as MergeKit computes it
    score = var.abs().reshape(-1)

    def mergekit_order() -> Tensor:  # ties at the cut: MergeKit's torch.topk picks among them
        return _positions_mask(score.numel(), torch.topk(score, k=k, largest=True).indices)

    return top_k_mask(score, k, mergekit_order).reshape(var.shape)


def _ram_masks(tensors: Sequence[Tensor], base: Tensor, epsilon: float):
    """RAM's shared pieces: flat task vectors, which entries each model changes (|d| > epsilon), how many
    models change each entry, and the entries changed by several / by exactly one."""
    deltas = torch.stack([t - base for t in tensors]).reshape(len(tensors), -1)
    changed = deltas.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return deltas, changed, counts, counts > 1, counts == 1


def ram(tensors: Sequence[Tensor], base: Tensor, *, epsilon: float = 1e-5, **_) -> Tensor:
    """Reinforced Agent Merging (arXiv:2601.13572): an entry only one model changes keeps that change in
    full; one several models change gets their mean change (sum / number of models changing it).
    Computed in the inputs' dtype with MergeKit 0.1.5's operations, so bf16 outputs match its bytes."""
    _check_same_shape(tensors, base)
    if not tensors:
        return base.clone()
    deltas, changed, counts, shared, unique = _ram_masks(tensors, base, epsilon)
    kept = deltas * changed
    merged = (kept * unique + kept * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape)


def ramplus_tl(tensors: Sequence[Tensor], base: Tensor, *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5, **_) -> Tensor:
    """RAM+ tensor-local (arXiv:2601.13572): as ``ram``, with each model's unique changes scaled by
    1 + r * clamp(shared / unique, 0, alpha), from that model's counts of shared and unique entries."""
    _check_same_shape(tensors, base)
    if not tensors:
        return base.clone()
    deltas, changed, counts, shared, unique = _ram_masks(tensors, base, epsilon)
    ratio = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=epsilon)
    scale = 1 + r * ratio.clamp(min=0, max=alpha)
    kept = deltas * changed
    merged = (kept * unique * scale.unsqueeze(-1) + kept * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape(base.shape)


FUSION_SAMPLE = 1_000_000  # arcee_fusion's quantiles are read from at most this many entries (MergeKit's size)


def arcee_fusion(tensors: Sequence[Tensor], base: Tensor, *, seed: int = 0, **_) -> Tensor:
    """Arcee Fusion (MergeKit): take the other model's value where its importance |d| * KL(softmax(x) ||
    softmax(base)) (per row) is at least median + 1.5 IQR of the importances, else keep the base.

    Quantiles are read from the sorted importances at index floor(q (n - 1)); tensors over
    ``FUSION_SAMPLE`` entries use a sample (with replacement) drawn from ``seed``, where MergeKit draws
    from torch's global generator (so only those masks differ between the tools)."""
    if len(tensors) != 1:
        raise MergescopeError(f"arcee_fusion merges exactly two models (a base and one other), got {len(tensors) + 1}")
    _check_same_shape(tensors, base)
    other = tensors[0]
    eps = 1e-8
    p = torch.nn.functional.softmax(other, dim=-1) + eps
    q = torch.nn.functional.softmax(base, dim=-1) + eps
    importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > FUSION_SAMPLE:
        picks = random_stream(seed).integers(0, flat.numel(), FUSION_SAMPLE)
        flat = flat[torch.from_numpy(picks)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


def passthrough(tensors: Sequence[Tensor], base: Tensor | None = None, *, scale: Sequence[float | None] | None = None,
                **_) -> Tensor:
    """Copy the single input (optionally times ``scale``); used for layer stacking ("frankenmerges")."""
    if len(tensors) != 1:
        raise MergescopeError(f"passthrough takes exactly one model per tensor, got {len(tensors)}")
    s = scale[0] if scale else None
    return tensors[0].clone() if s is None else tensors[0] * s


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Param:
    """A recipe parameter: ``scope`` is "shared", "input" (every model) or "non_base" (every non-base model)."""

    name: str
    kind: type
    scope: str = "shared"
    default: object = None
    required: bool = False
    arg: str | None = None  # keyword the function takes, when it differs from the recipe name


@dataclass(frozen=True)
class Method:
    """A registered merge method: the function, how it treats the base model, its parameters."""

    name: str
    fn: Callable[..., Tensor]
    base: str  # "required", "optional" or "ignored"
    params: tuple[Param, ...] = ()
    random: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    reference: str = ""
    stacks_layers: bool = False
    extra: dict = field(default_factory=dict)
    # A tensor only some models have (MergeKit's OptionalTensorPolicy): "merge" the holders; "singleton": one
    # holder is copied; "base_singleton": copied if it is the base; "base_or_skip": that, else left out
    partial: str = "merge"

    def __call__(self, tensors, base=None, **params):
        for p in self.params:
            if p.arg and p.name in params:
                params[p.arg] = params.pop(p.name)
        return self.fn(list(tensors), base, **params)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def to_dict(self) -> dict:
        return {"name": self.name, "base": self.base, "random": self.random, "reference": self.reference,
                "parameters": {p.name: {"scope": p.scope, "default": p.default, "required": p.required}
                               for p in self.params}}


def _gta_params(normalize: bool, rescale: bool, extra: tuple[Param, ...] = ()) -> tuple[Param, ...]:
    return (Param("weight", float, "non_base", required=True), Param("density", float, "non_base", 1.0),
            Param("normalize", bool, default=normalize), Param("rescale", bool, default=rescale),
            Param("lambda", float, default=1.0, arg="lam"), Param("int8_mask", bool, default=False), *extra)


_GAMMA = (Param("gamma", float, "non_base", 0.01),)
_EPSILON = (Param("epsilon", float, "non_base", 0.15),)

REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("linear", linear, "ignored", (Param("weight", float, "input", required=True),
                                         Param("normalize", bool, default=True)), reference="arXiv:2203.05482"),
    Method("slerp", slerp, "required", (Param("t", float, required=True),), min_inputs=2, max_inputs=2,
           partial="singleton"),
    Method("nuslerp", nuslerp, "optional", (Param("weight", float, "non_base", required=True),
                                            Param("nuslerp_row_wise", bool, default=False),
                                            Param("nuslerp_flatten", bool, default=True)), partial="singleton"),
    Method("multislerp", multislerp, "optional", (Param("weight", float, "non_base", required=True),
                                                  Param("normalize_weights", bool, default=True),
                                                  Param("eps", float, default=1e-8))),
    Method("karcher", karcher, "ignored", (Param("max_iter", int, default=10), Param("tol", float, default=1e-5))),
    Method("task_arithmetic", task_arithmetic, "required", _gta_params(False, False), reference="arXiv:2212.04089"),
    Method("ties", ties, "required", _gta_params(True, False), reference="arXiv:2306.01708"),
    Method("dare_ties", dare_ties, "required", _gta_params(False, True), random=True, reference="arXiv:2311.03099"),
    Method("dare_linear", dare_linear, "required", _gta_params(False, True), random=True,
           reference="arXiv:2311.03099"),
    Method("breadcrumbs", breadcrumbs, "required", _gta_params(False, False, _GAMMA), reference="arXiv:2312.06795"),
    Method("breadcrumbs_ties", breadcrumbs_ties, "required", _gta_params(False, False, _GAMMA),
           reference="arXiv:2312.06795"),
    Method("della", della, "required", _gta_params(True, True, _EPSILON), random=True, reference="arXiv:2406.11617"),
    Method("della_linear", della_linear, "required", _gta_params(False, True, _EPSILON), random=True,
           reference="arXiv:2406.11617"),
    Method("sce", sce, "required", (Param("select_topk", float, default=1.0), Param("int8_mask", bool, default=False)),
           reference="arXiv:2408.07990"),
    Method("model_stock", model_stock, "required", (Param("filter_wise", bool, default=False),), min_inputs=3,
           partial="base_or_skip",
           reference="arXiv:2403.19522"),
    Method("nearswap", nearswap, "required", (Param("t", float, required=True),), min_inputs=2, max_inputs=2,
           partial="base_singleton"),
    Method("ram", ram, "required", (Param("epsilon", float, default=1e-5),), reference="arXiv:2601.13572"),
    Method("ramplus_tl", ramplus_tl, "required", (Param("r", float, default=0.1), Param("alpha", float, default=0.2),
                                                  Param("epsilon", float, default=1e-5)), reference="arXiv:2601.13572"),
    Method("arcee_fusion", arcee_fusion, "required", (), random=True, min_inputs=2, max_inputs=2, partial="singleton",
           reference="MergeKit (Arcee AI)"),
    Method("passthrough", passthrough, "ignored", (Param("scale", float, "input", None),), max_inputs=1,
           stacks_layers=True),
)}


def names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(REGISTRY)


def get(name: str) -> Method:
    """The merge method called ``name`` (a callable ``(tensors, base, **params) -> Tensor``)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise MergescopeError(f"unknown merge method {name!r}; known: {', '.join(names())}") from None


from . import svd_methods as _svd_methods  # noqa: F401  (registers tsv, iso_c, iso_cts: a module of their own)
