"""Exact top-k / sorted-range selection in O(n), with torch's CPU sort order among ties.

Why: MergeKit picks the TIES and breadcrumbs masks with ``torch.argsort``/``torch.sort`` and the
DELLA ranks with ``torch.argsort(dim=1)``. Those sorts are unstable, so *which* of several entries
equal to the value at a cut are kept depends on the sort itself, and a full O(n log n) sort was the
only way to reproduce MergeKit's masks. torch 2.x's CPU sort (``stable=False``) is libstdc++'s
``std::sort`` (introsort) on (value, index) pairs, comparator ``a > b`` (descending) or ``a < b``
(ascending). This module replays that algorithm exactly, but only along the segments that hold a
requested boundary (a quickselect: expected O(n)), so the masks are bit for bit MergeKit's.

Why replaying only some segments is exact: libstdc++ partitions a segment [first, last) around a
median-of-three pivot into [first, cut), whose entries are all <= pivot, and [cut, last), all >=
pivot (in the comparator's order); segments of <= 16 entries are left to one final insertion sort
of the whole array. That insertion sort moves an entry left only past entries strictly after it, and
every entry of an earlier segment is <= every entry of a later one, so no entry leaves its segment:
the final sort equals a stable insertion sort of each <= 16 segment. Hence the *set* of entries in
positions [0, b) is fixed once b falls on a segment edge, and the order among ties is fixed by the
path of segments containing b. A segment past the depth limit (2 floor(log2 n) partitions) is
heapsorted by libstdc++; that is not replayed: the caller then runs the full torch sort (rare).

The replay moves one array of packed unsigned ints, not keys and indices: std::sort only compares keys,
so any ints that order like the keys, with entries of equal keys treated as equal, give the same swaps.
For a mask only the entries of a cut's own key (the ties that straddle it) need their index back; they
get a range of n ints of their own (key + index) and every larger key moves up by n, so a bf16 score's
entry is one uint32 (4 bytes instead of 2 + 4), a float32 one too (instead of 4 + 4). A class of equal
ints is then a range, and the partition's compares against a pivot become compares against its range's
ends (as cheap as before). Rows pack their group (rank of the distinct value) or key above the column.

A descending sort with ``a > b`` performs the same swaps as an ascending one on keys mapped by an
order-reversing bijection (``~bits``), so the kernels only know ``<``. The k-th value is found by a
radix select on the float32 bit patterns (non-negative floats order like their uint32 bits): one
histogram of the top 16 bits, then one pass filling the low-16-bit histograms inside every cut's bin.
bfloat16 and float16 scores are ranked by their own 16-bit patterns (one histogram is exact): MergeKit
sorts their float32 values, and the conversion keeps every comparison (non-negative, no NaN), so the
replayed swaps are the same, with a quarter of the key bytes and no float32 copy. Scores of other dtypes
or holding NaN or a sign bit (negatives, -0.0) take the old torch path (half ones sorted as float32).

numba kernels release the GIL (the merge engine calls methods from worker threads); this module
imports numba, so import it lazily (never at ``import mergescope``).
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils
from numba.core import types as nbtypes
from numba.extending import intrinsic

from . import scratch
from .kernels import jit

Tensor = torch.Tensor
_SMALL = 16  # libstdc++ _S_threshold: segments this short wait for the final insertion sort
_BLOCK = 256  # entries per block of the branch-free partition scan
_MIN_BLOCK = 8  # shorter blocks near the crossing go to the scalar loop
_SKIM_BLOCK = 64  # patterns tested together for a hit before the two-bin low histograms count any
_MAX_BITS = 0x7F800000  # +inf; larger uint32 patterns are NaN or carry the sign bit
_MAX_HALF_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}  # their +inf, as uint16


# ----------------------------------------------------------------------------- libstdc++ std::sort replay
#
# Packed ints (see the module's docstring): entries that std::sort sees as equal share a *class*, a range of
# ints described by an array ``classes`` (:func:`_classes`): the ints' low bits (an index under a key: class =
# the high bits), and up to two explicit ranges (a cut's tied key: its entries packed as key + index).


@jit
def _u(i):
    """An index as uint64: numba checks a signed index for a negative value (and wraps it) on every access;
    positions here never are negative, and without the checks the partition scans run ~1.5x as fast."""
    return np.uint64(i)


def _classes(dtype, low: int = 0, ranges=()) -> np.ndarray:
    """The classes of equal packed ints: [~low, low, first, last, first, last] as ``dtype`` (an int's class is its
    range when it falls in one of the two (first, last) ranges, else its value with the ``low`` bits cleared)."""
    top = np.iinfo(dtype).max
    spans = [*ranges, (1, 0), (1, 0)][:2]  # (1, 0): an empty range
    return np.array([top & ~low, low, *[x for span in spans for x in span]], dtype)


@jit
def _lo(x, classes):
    """The smallest packed int of x's class."""
    t = x & classes[0]
    if classes[2] <= t and t <= classes[3]:
        return classes[2]
    if classes[4] <= t and t <= classes[5]:
        return classes[4]
    return t


@jit
def _hi(x, classes):
    """The largest packed int of x's class."""
    t = x | classes[1]
    if classes[2] <= t and t <= classes[3]:
        return classes[3]
    if classes[4] <= t and t <= classes[5]:
        return classes[5]
    return t


@jit
def _less(a, b, classes):
    """std::sort's comparator on the keys of packed ints a and b."""
    return _hi(a, classes) < _lo(b, classes)


@jit
def _swap(v, i, j):
    i, j = _u(i), _u(j)
    v[i], v[j] = v[j], v[i]


@jit
def _median_to_first(v, result, a, b, c, classes):
    """std::__move_median_to_first."""
    ka, kb, kc = v[_u(a)], v[_u(b)], v[_u(c)]
    if _less(ka, kb, classes):
        m = b if _less(kb, kc, classes) else (c if _less(ka, kc, classes) else a)
    elif _less(ka, kc, classes):
        m = a
    else:
        m = c if _less(kb, kc, classes) else b
    _swap(v, result, m)


@jit
def _partition(v, first, last, plo, phi):
    """std::__unguarded_partition (Hoare) around a pivot whose class is [plo, phi]: ``x < pivot`` is
    ``x < plo`` and ``pivot < x`` is ``x > phi``."""
    while True:
        while v[_u(first)] < plo:
            first += 1
        last -= 1
        while v[_u(last)] > phi:
            last -= 1
        if not first < last:
            return first
        _swap(v, first, last)
        first += 1


def _compresses() -> bool:
    """Whether numba compiles for a CPU with AVX-512 (vpcompressd: a block's stops in a few instructions per 16
    entries). Elsewhere LLVM would expand the compress into a branch per entry, slower than the scalar scan."""
    import llvmlite.binding as llvm

    features = numba.config.CPU_FEATURES or ""  # NUMBA_CPU_NAME / NUMBA_CPU_FEATURES override the host's
    if features or numba.config.CPU_NAME not in (None, "", "host"):
        return "+avx512f" in features
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


_COMPRESS = _compresses()
_LANES = 16  # entries per compressed scan step


def _stops(descending_addresses: bool):
    """An intrinsic (v, at, bound, off, count, j0) -> count + hits: of the 16 entries v[at + i] (with
    ``descending_addresses``: v[at - i]), the offsets j0 + i of those >= bound (<= bound) stored in order at
    off[count:] (LLVM's masked compress store: vpcompressd on AVX-512). The scalar scans' stops, 16 at once."""
    lanes = _LANES

    @intrinsic
    def stops(typingctx, v, at, bound, off, count, j0):
        if not (isinstance(v, nbtypes.Array) and isinstance(off, nbtypes.Array)):
            return None

        def codegen(context, builder, signature, args):
            values, at, bound, offsets, count, j0 = args
            array_of = lambda ty, value: cgutils.create_struct_proxy(ty)(context, builder, value=value).data
            element = context.get_value_type(signature.args[0].dtype)
            offset = context.get_value_type(signature.args[3].dtype)
            splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)

            def splat(value, ty):
                vector = ir.VectorType(ty, lanes)
                one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
                return builder.shuffle_vector(one, one, splat_mask)

            start = builder.sub(at, ir.Constant(at.type, lanes - 1)) if descending_addresses else at
            pointer = builder.gep(array_of(signature.args[0], values), [start])
            block = builder.load(builder.bitcast(pointer, ir.VectorType(element, lanes).as_pointer()),
                                 align=element.width // 8)
            if descending_addresses:
                reverse = ir.Constant(ir.VectorType(ir.IntType(32), lanes), list(range(lanes - 1, -1, -1)))
                block = builder.shuffle_vector(block, block, reverse)
            hits = builder.icmp_unsigned("<=" if descending_addresses else ">=", block, splat(bound, element))
            where = builder.add(splat(builder.trunc(j0, offset), offset),
                                ir.Constant(ir.VectorType(offset, lanes), list(range(lanes))))
            module = builder.module
            name = f"llvm.masked.compressstore.v{lanes}i{offset.width}"
            store = module.globals.get(name) or ir.Function(module, ir.FunctionType(ir.VoidType(), [
                where.type, offset.as_pointer(), hits.type]), name)
            builder.call(store, [where, builder.gep(array_of(signature.args[3], offsets), [count]), hits])
            name = f"llvm.ctpop.i{lanes}"
            popcount = module.globals.get(name) or ir.Function(module, ir.FunctionType(ir.IntType(lanes), [
                ir.IntType(lanes)]), name)
            found = builder.call(popcount, [builder.bitcast(hits, ir.IntType(lanes))])
            return builder.add(count, builder.zext(found, count.type))

        return nbtypes.int64(v, nbtypes.int64, v.dtype, off, nbtypes.int64, nbtypes.int64), codegen

    return stops


_stops_at_least = _stops(False)
_stops_at_most = _stops(True)


@jit
def _scan_left(v, base, width, plo, off):
    """Offsets j < width (ascending) of the entries v[base + j] >= plo into off; returns how many."""
    count = 0
    full = width - width % _LANES if _COMPRESS else 0
    for j in range(0, full, _LANES):
        count = _stops_at_least(v, np.int64(base + j), plo, off, np.int64(count), np.int64(j))
    for j in range(full, width):
        off[_u(count)] = j
        count += v[_u(base + j)] >= plo
    return count


@jit
def _scan_right(v, base, width, phi, off):
    """Offsets j < width (ascending) of the entries v[base - j] <= phi into off; returns how many."""
    count = 0
    full = width - width % _LANES if _COMPRESS else 0
    for j in range(0, full, _LANES):
        count = _stops_at_most(v, np.int64(base - j), phi, off, np.int64(count), np.int64(j))
    for j in range(full, width):
        off[_u(count)] = j
        count += v[_u(base - j)] <= phi
    return count


@jit
def _block_partition(v, first, last, pivot, off_l, off_r, classes):
    """The same swaps as ``_partition`` (pivot value at ``pivot``), found without branches (BlockQuicksort's idea).

    Hoare swaps the i-th entry a left-to-right scan stops at (not < pivot) with the i-th entry a
    right-to-left scan stops at (not > pivot), until the scans cross; stops are decided by values no
    swap has touched yet. So stops are collected for whole disjoint blocks from both ends and paired
    in order; near the crossing, the scalar loop resumes from the same state (the next pending stop
    on each side, or the next unscanned entry: skipped entries are not stops). Blocks shrink to half of
    what is left near the crossing, so the scalar loop (branches on random keys) sees few entries.
    """
    size = off_l.shape[0]
    plo, phi = _lo(v[pivot], classes), _hi(v[pivot], classes)
    lo, hi = first, last  # entries not scanned yet: [lo, hi)
    n_l = i_l = n_r = i_r = 0
    base_l = base_r = 0
    while True:
        if i_l == n_l:
            width = min(size, (hi - lo) >> 1)
            if width < _MIN_BLOCK:
                break
            base_l, i_l = lo, 0
            n_l = _scan_left(v, base_l, width, plo, off_l)
            lo += width
        if i_r == n_r:
            width = min(size, (hi - lo) >> 1)
            if width < _MIN_BLOCK:
                break
            base_r, i_r = hi - 1, 0
            n_r = _scan_right(v, base_r, width, phi, off_r)
            hi -= width
        c = min(n_l - i_l, n_r - i_r)
        for j in range(c):
            _swap(v, base_l + off_l[_u(i_l + j)], base_r - off_r[_u(i_r + j)])
        i_l += c
        i_r += c
    left = base_l + off_l[i_l] if i_l < n_l else lo
    right = base_r - off_r[i_r] + 1 if i_r < n_r else hi
    return _partition(v, left, right, plo, phi)


@jit
def _insertion_sort(v, first, last, classes):
    """std::__insertion_sort: stable, moves an entry left past strictly larger ones only."""
    for i in range(first + 1, last):
        val, j = v[_u(i)], i
        top = _hi(val, classes)
        while j > first and top < _lo(v[_u(j - 1)], classes):
            v[_u(j)] = v[_u(j - 1)]
            j -= 1
        v[_u(j)] = val


@jit
def _holds(bounds, first, last, full):
    """Whether a sorted boundary lies strictly inside [first, last) (binary search: rows pass many)."""
    if full:
        return True
    i = np.searchsorted(bounds, first, side="right")
    return i < bounds.shape[0] and bounds[i] < last


@jit
def _depth_limit(n):
    """libstdc++'s partition budget for n entries: 2 floor(log2 n)."""
    depth0 = 0
    while (n >> depth0) > 1:
        depth0 += 1
    return 2 * depth0


@jit
def _introsort(v, bounds, full, classes):
    """std::sort's permutation of the packed ints ``v`` (ascending by class), restricted to the segments holding
    a boundary (all of them when ``full``). False when a needed segment hits the depth limit (libstdc++
    heapsorts it; not replayed)."""
    n = v.shape[0]
    depth_limit = _depth_limit(n)
    size = depth_limit + bounds.shape[0] + 4  # pending segments: one per boundary, or one per level
    s_first = np.empty(size, np.int64)
    s_last = np.empty(size, np.int64)
    s_depth = np.empty(size, np.int64)
    s_first[0], s_last[0], s_depth[0], top = 0, n, depth_limit, 1
    off_l = np.empty(_BLOCK, np.int32)
    off_r = np.empty(_BLOCK, np.int32)
    while top > 0:
        top -= 1
        first, last, depth = s_first[top], s_last[top], s_depth[top]
        resolved = True
        while last - first > _SMALL:
            if depth == 0:
                return False
            depth -= 1
            _median_to_first(v, first, first + 1, first + (last - first) // 2, last - 1, classes)
            cut = _block_partition(v, first + 1, last, first, off_l, off_r, classes)
            if _holds(bounds, cut, last, full):
                s_first[top], s_last[top], s_depth[top] = cut, last, depth
                top += 1
            if not _holds(bounds, first, cut, full):
                resolved = False
                break
            last = cut
        if resolved:
            _insertion_sort(v, first, last, classes)
    return True


def _index_packed(keys: np.ndarray):
    """(packed, classes) for the replay of unsigned ``keys`` that returns every entry's index: key << 32 | index
    (the index: ``packed & 0xFFFFFFFF``)."""
    packed = (keys.astype(np.uint64) << np.uint64(32)) | np.arange(keys.shape[0], dtype=np.uint64)
    return packed, _classes(np.uint64, 0xFFFFFFFF)


@jit
def _pack_ties(bits, flip, base, k1, k2, n, out, mask, start, width):
    """``out[i]``: the sort key (bits ^ flip) - base, moved up by n past each tied key k1 < k2, and the entries of
    k1 or k2 given their own range of n ints (key + i, i their index): the ints order like the keys. k2 < 0: one
    tied key (a loop of its own: the two-key one runs at half the speed of memory). The same pass writes
    :func:`_range_mask`'s ``mask`` (start <= bits ^ flip < start + width, in uint64: every key fits): one read
    of the bits, not two."""
    two = k2 >= 0
    base, k1, k2, n = np.uint64(base), np.uint64(k1), np.uint64(max(k2, 0)), np.uint64(n)  # uint64 math: as fast
    if two:
        for i in range(bits.shape[0]):
            x = bits[_u(i)] ^ flip
            mask[_u(i)] = np.uint64(x) - start < width  # wraps below start
            key = np.uint64(x) - base
            moved = key + (n if key > k1 else np.uint64(0)) + (n if key > k2 else np.uint64(0))
            out[_u(i)] = moved + np.uint64(i) if (key == k1) | (key == k2) else moved
    else:
        for i in range(bits.shape[0]):
            x = bits[_u(i)] ^ flip
            mask[_u(i)] = np.uint64(x) - start < width  # wraps below start
            key = np.uint64(x) - base
            moved = key + (n if key > k1 else np.uint64(0))
            out[_u(i)] = moved + np.uint64(i) if key == k1 else moved
    return out


@jit
def _row_ranks(block, sorted_cols, ranks, ok, v, classes):
    """Per row: the rank of each entry in an ascending std::sort (``torch.argsort(dim=1)``).

    ``sorted_cols`` is any ascending argsort of each row (its low 32 bits: packed keys work): it fixes every rank except
    inside groups of equal values, which the replay decides, bounded by every position of a group and its edges
    (a position whose two edges are resolved holds its final entry). The replay's ints ``v`` are an entry's
    group << bits | column (``classes``: :func:`_classes` with the column's bits low)."""
    m = block.shape[1]
    low, step = classes[1], np.int64(classes[1]) + 1
    group = np.empty(m, np.int64)
    bounds = np.empty(m + 1, np.int64)
    tied = np.empty(m, np.bool_)
    for r in range(block.shape[0]):
        count = 0
        p = 0
        g = 0
        while p < m:
            at = sorted_cols[r, p] & 0xFFFFFFFF
            ranks[r, at] = p
            group[at] = g
            q = p + 1
            while q < m and block[r, sorted_cols[r, q] & 0xFFFFFFFF] == block[r, at]:
                ranks[r, sorted_cols[r, q] & 0xFFFFFFFF] = q
                group[sorted_cols[r, q] & 0xFFFFFFFF] = g
                q += 1
            tied_group = q - p > 1
            tied[p:q] = tied_group
            for b in range(max(p, 1), min(q, m - 1) + 1) if tied_group else range(0):
                if count == 0 or bounds[count - 1] < b:  # neighbouring groups share an edge
                    bounds[count] = b
                    count += 1
            p = q
            g += 1
        ok[r] = True
        if count == 0:
            continue
        for j in range(m):
            v[j] = group[j] * step + j
        ok[r] = _introsort(v, bounds[:count], count > m // 4, classes)
        if ok[r]:
            for p in range(m):
                if tied[p]:
                    ranks[r, v[p] & low] = p


@jit
def _packed_keys(block, out):
    """uint64 per entry into ``out``: an order-preserving key of the float32 value (high half; -0.0 as 0.0,
    so equal values share a key) and the column (low half): one numpy sort of these is an argsort."""
    for r in range(block.shape[0]):
        for j in range(block.shape[1]):
            u = np.uint32(np.float32(block[r, j] + np.float32(0.0)).view(np.uint32))
            key = ~u if u >> 31 else u | np.uint32(0x80000000)
            out[r, j] = (np.uint64(key) << np.uint64(32)) | np.uint64(j)
    return out


@functools.cache
def replay_matches_torch() -> bool:
    """Whether this torch's CPU sort is the std::sort replayed here (checked once per process).

    A torch built against another C++ library (libc++ on macOS) orders ties its own way; there
    every mask and rank comes from torch's sort, as MergeKit's would on that machine.
    """
    values = np.random.default_rng(0).integers(0, 9, 5003).astype(np.float32)
    bits = values.view(np.uint32)
    for descending in (True, False):
        packed, classes = _index_packed(bits ^ _flip(bits, descending))
        _introsort(packed, np.empty(0, np.int64), True, classes)
        want = torch.sort(torch.from_numpy(values), descending=descending).indices.numpy()
        if not np.array_equal(packed & classes[1], want):
            return False
    rows = torch.from_numpy(values[:5000].reshape(5, 1000))
    return bool(torch.equal(_replayed_ranks(rows, torch.empty((5, 1000), dtype=torch.int64)), _torch_ranks(rows)))


# ----------------------------------------------------------------------------- radix select


@jit
def _high_histogram(bits):
    """Counts of the top 16 bits; the largest pattern (anything above +inf means: not radix-able)."""
    hist = np.zeros(1 << 16, np.int64)
    top, shift = np.uint32(0), np.uint32(16)  # uint32 operands: no widening in the loop
    for i in range(bits.shape[0]):
        hist[bits[i] >> shift] += 1
        top = max(top, bits[i])
    return hist, top


@jit
def _histogram16(bits):
    """Counts of every 16-bit pattern and the largest one (a bf16/fp16 score's whole radix select)."""
    hist = np.zeros(1 << 16, np.int64)
    top = np.uint16(0)
    for i in range(bits.shape[0]):
        hist[bits[i]] += 1
        top = max(top, bits[i])
    return hist, top


@jit
def _descend(hist, above, k):
    """The highest bin whose count, with the bins above it and ``above`` more, reaches k; and that count
    without the bin's own (how many patterns are larger than the bin's)."""
    b = hist.shape[0] - 1
    while above + hist[b] < k:
        above += hist[b]
        b -= 1
    return b, above


@jit
def _kth_patterns16(hist, ks):
    """:func:`_kth_patterns` for 16-bit patterns, from their full histogram alone."""
    c = ks.shape[0]
    patterns = np.empty(c, np.uint16)
    above = np.zeros(c, np.int64)
    equal = np.empty(c, np.int64)
    for t in range(c):
        pattern, above[t] = _descend(hist, 0, ks[t])
        patterns[t], equal[t] = np.uint16(pattern), hist[pattern]
    return patterns, above, equal


@jit
def _low_histogram(bits, start, low_hist):
    """Counts of the low 16 bits of the patterns in the bin starting at ``start``."""
    width = np.uint32(1 << 16)
    for i in range(bits.shape[0]):
        low = bits[i] - start  # wraps around below the bin: one compare tests both ends
        if low < width:
            low_hist[low] += 1


@jit
def _low_histograms(bits, first, second, low_hist, skim):
    """:func:`_low_histogram` of two bins in one pass (breadcrumbs' two cuts). ``skim``: each block of _SKIM_BLOCK
    patterns is first tested for a hit in either bin by a vectorised compare and counted only when it holds one,
    for bins that hold few patterns. Why: two compare-and-branch steps per entry cost 0.55-1.4 ns, skimmed
    0.35-0.63 ns (a 1.07 GB fine-tune's |delta|, bins holding 0.04-0.24 %); one bin's loop is as fast unskimmed."""
    width = np.uint32(1 << 16)
    n = bits.shape[0]
    full = n - n % _SKIM_BLOCK if skim else 0
    for start in range(0, full, _SKIM_BLOCK):
        hit = np.uint32(0)
        for j in range(_SKIM_BLOCK):
            x = bits[start + j]
            hit |= np.uint32(np.uint32(x - first) < width) | np.uint32(np.uint32(x - second) < width)
        if hit:
            _count_two(bits, start, start + _SKIM_BLOCK, first, second, low_hist)
    _count_two(bits, full, n, first, second, low_hist)


@jit
def _count_two(bits, start, stop, first, second, low_hist):
    """Counts the low 16 bits of bits[start:stop] in the bin at ``first`` (low_hist[0]) and at ``second`` ([1])."""
    width = np.uint32(1 << 16)
    for i in range(start, stop):
        low = bits[i] - first
        if low < width:
            low_hist[0, low] += 1
        low = bits[i] - second
        if low < width:
            low_hist[1, low] += 1


@jit
def _kth_patterns(bits, hist, ks, low_hist):
    """For each k (one or two): the k-th largest bit pattern, how many are larger and how many equal. One
    pass over the bits fills the low-16-bit histograms of every k's high bin (``low_hist``: (c, 2^16) counts,
    zeroed here; the caller's reused buffer: a fresh one of two bins, 1 MB, was a fresh map faulted in page by
    page on every call: 4 x 1.07 GB breadcrumbs, 127.6 k page faults, this step's CPU 0.70 s against 0.49)."""
    c = ks.shape[0]
    starts = np.empty(c, np.uint32)
    above = np.zeros(c, np.int64)
    for t in range(c):
        high, above[t] = _descend(hist, 0, ks[t])
        starts[t] = np.uint32(high << 16)
    low_hist[:] = 0
    if c == 1 or starts[0] == starts[1]:
        _low_histogram(bits, starts[0], low_hist[0])
        low_hist[c - 1] = low_hist[0]
    else:  # skimmed when most blocks hold no hit: the bins' counts are the high histogram's
        held = hist[starts[0] >> 16] + hist[starts[1] >> 16]
        _low_histograms(bits, starts[0], starts[1], low_hist, held * _SKIM_BLOCK < bits.shape[0] // 4)
    patterns = np.empty(c, np.uint32)
    equal = np.empty(c, np.int64)
    for t in range(c):
        low, above[t] = _descend(low_hist[t], above[t], ks[t])
        patterns[t], equal[t] = starts[t] | np.uint32(low), low_hist[t, low]
    return patterns, above, equal


def _bits(score: Tensor, counted=None):
    """The bit patterns of a float32 (uint32) or bf16/fp16 (uint16) score and their histogram (float32: of
    the top 16 bits), or None when the patterns do not order like the values (NaN, sign bits, other dtypes).
    ``counted``: (histogram, largest pattern) of these patterns already counted (kernels.abs_diff_counted)."""
    if score.numel() == 0:
        return None
    flat = score.detach().reshape(-1).contiguous()
    if flat.dtype == torch.float32:
        bits = flat.numpy().view(np.uint32)
        hist, top = _high_histogram(bits) if counted is None else counted
        return (bits, hist) if top <= _MAX_BITS else None
    if flat.dtype in _MAX_HALF_BITS:
        bits = flat.view(torch.int16).numpy().view(np.uint16)
        hist, top = _histogram16(bits) if counted is None else counted
        return (bits, hist) if top <= _MAX_HALF_BITS[flat.dtype] else None
    return None


def _kth(bits, hist, ks):
    """(patterns, how many larger, how many equal) of the ks-th largest patterns."""
    if bits.dtype == np.uint16:
        return _kth_patterns16(hist, ks)
    return _kth_patterns(bits, hist, ks, _low_hists()[:ks.shape[0]])


_local = threading.local()


def _low_hists() -> np.ndarray:
    """This thread's (2, 2^16) int64 low-histogram counts (1 MB, allocated once): a constant size, kept outside
    merge/scratch.py, whose buffers follow the job's size and go between jobs over the typical one's."""
    held = getattr(_local, "low_hists", None)
    if held is None:
        held = _local.low_hists = np.empty((2, 1 << 16), np.int64)
    return held


def _flip(bits, descending: bool):
    """The xor that maps patterns to ascending sort keys: all ones for a descending sort."""
    return bits.dtype.type(np.iinfo(bits.dtype).max if descending else 0)


def _exact(score: Tensor) -> Tensor:
    """The values MergeKit sorts: float32 copies of half scores (torch's own sort then orders them)."""
    return score.float() if score.dtype in _MAX_HALF_BITS else score


def kth_largest(score: Tensor, k: int) -> Tensor:
    """The k-th largest value of a flat tensor (1 <= k <= n), exactly ``torch.kthvalue(score, n - k + 1)``.

    Two passes over the float32 bit patterns instead of a copy and nth_element; other dtypes, NaN or
    negative scores go to ``torch.kthvalue``.
    """
    found = _bits(score)
    if found is None:
        return torch.kthvalue(score.reshape(-1), score.numel() - k + 1).values
    bits, hist = found
    pattern = _kth(bits, hist, np.array([k], np.int64))[0][:1]
    return torch.from_numpy(pattern.view(np.int16 if bits.dtype == np.uint16 else np.float32)).view(score.dtype)[0]


# ----------------------------------------------------------------------------- sorted-order masks


def _positions(mask: Tensor, positions: Tensor) -> Tensor:
    mask.fill_(False)
    mask[positions] = True
    return mask


@jit
def _range_mask(bits, flip, start, width, mask):
    """mask[i] = start <= key < start + width, key = bits ^ flip (ascending in sort order): one wrapping
    uint32 compare (vectorises; ~4x faster than torch.ge here)."""
    for i in range(bits.shape[0]):
        mask[i] = np.uint32(np.uint32(bits[i] ^ flip) - start) < width


@jit
def _mark_replayed(v, end, count, classes, starts, ends, mask):
    """The ``count`` entries of a straddling cut's key (the ``classes``' two ranges; index: packed int - range
    start) at sorted positions p < ``end`` (the last straddling cut): in the mask iff starts[r] <= p < ends[r] for
    their range r. Found scanning down from ``end``: the replay leaves them near it (a cut's ties leave its
    segments only where a pivot holds their key). Past ``end`` none is before any straddling cut (the range mask
    has set them by key)."""
    p = end
    while count > 0 and p > 0:
        p -= 1
        x = v[_u(p)]
        if classes[2] <= x and x <= classes[3]:
            mask[_u(x - classes[2])] = starts[0] <= p and p < ends[0]
            count -= 1
        elif classes[4] <= x and x <= classes[5]:
            mask[_u(x - classes[4])] = starts[1] <= p and p < ends[1]
            count -= 1


def _packed_replay(bits, flip, tied: list[int], mask, start, width):
    """The replay's packed ints of a whole score (:func:`_pack_ties`) and their classes, for the cuts' tied keys
    (one or two, ascending): uint32 where every packed int fits (this thread's reused buffer). Writes the range
    mask [start, start + width) of the keys into ``mask`` on the way."""
    n = bits.shape[0]
    top = int(np.iinfo(bits.dtype).max)
    largest = int(_MAX_BITS if bits.dtype == np.uint32 else max(_MAX_HALF_BITS.values()))
    base = top - largest if flip else 0  # keys of a descending sort start there: down to 0
    dtype = np.uint32 if largest + len(tied) * n < 2**32 else np.uint64
    k1, k2 = tied[0] - base, (tied[1] - base if len(tied) > 1 else -1)
    ranges = [(k1, k1 + n - 1)] + ([(k2 + n, k2 + 2 * n - 1)] if len(tied) > 1 else [])
    packed = _pack_ties(bits, flip, base, k1, k2, n, scratch.array("select.packed_ties", n, dtype), mask,
                        np.uint64(start), np.uint64(width))
    return packed, _classes(dtype, 0, ranges)


def _cut_keys(bits, hist, cuts: list[int], descending: bool):
    """Per cut b: the key (``bits ^ flip``, ascending in sort order) at sort position b - 1, the sort position of
    that key's first entry and how many entries hold it (its ties straddle b when b falls inside them)."""
    n = bits.shape[0]
    ks = np.array([b if descending else n - b + 1 for b in cuts], np.int64)
    patterns, larger, equal = _kth(bits, hist, ks)
    flip = _flip(bits, descending)
    return [(int(pattern ^ flip), int(above if descending else n - above - same), int(same))
            for pattern, above, same in zip(patterns, larger, equal)]


def sorted_range_mask(score: Tensor, lo: int, hi: int, descending: bool = True, out: Tensor | None = None,
                      counted=None) -> Tensor:
    """Mask of the entries that ``torch.sort(score, descending)`` puts at positions [lo, hi), written into
    ``out`` (a flat contiguous bool tensor of n entries) when given.

    Expected O(n): radix select for the keys at the cuts; the introsort replay only when ties
    straddle a cut, and then only along the segments holding such a cut. Bit-identical to
    ``torch.sort(score, descending=descending).indices[lo:hi]`` as a mask (tested against it); a bf16 or
    fp16 score is ranked as its float32 values (``score.float()``), as MergeKit ranks it.
    One pass writes the mask from the keys at the cuts (the replay's packing pass, when ties straddle a cut);
    the replay then sets the straddling ties.
    The replay's work arrays are this thread's reused buffers (merge/scratch.py). ``counted``: the histogram
    of score's bit patterns and the largest, when already counted (:func:`_bits`).
    """
    flat = score.detach().reshape(-1)
    n = flat.numel()
    mask = torch.empty(n, dtype=torch.bool) if out is None else out
    lo, hi = max(0, lo), min(n, hi)
    if hi <= lo or (lo == 0 and hi == n):
        return mask.fill_(hi > lo)
    found = _bits(flat, counted)
    if found is None or not replay_matches_torch():
        return _positions(mask, torch.sort(_exact(flat), descending=descending).indices[lo:hi])
    bits, hist = found
    cuts = [b for b in (lo, hi) if 0 < b < n]
    at_cut = dict(zip(cuts, _cut_keys(bits, hist, cuts, descending)))
    replayed = {b: key for b, (key, first, same) in at_cut.items() if first < b < first + same}  # ties straddle b
    flip = _flip(bits, descending)
    every = 1 << (8 * bits.itemsize)  # one past the largest key
    # keys below a bound sit before its cut; a cut's own key too unless its ties straddle it (then: replayed)
    bound = {b: key + (b not in replayed) for b, (key, _, _) in at_cut.items()}
    bounds = np.array([bound.get(lo, 0), bound.get(hi, every)], np.int64)
    if replayed:  # the pack writes the range mask too
        end, tied = max(replayed), sorted(set(replayed.values()))
        width = max(0, int(bounds[1] - bounds[0]))  # may be every key (a lo cut's tied key is the smallest)
        packed, classes = _packed_replay(bits, flip, tied, mask.numpy(), bounds[0] if width else 0, width)
        if not _introsort(packed, np.array(sorted(replayed), np.int64), False, classes):  # libstdc++ heapsorts
            return _positions(mask, torch.sort(_exact(flat), descending=descending).indices[lo:hi])
        # an entry of tied key t is before cut b by its position when b's ties straddle it, else by its key
        before = {b: {t: (b if replayed.get(b) == t else (n + 1 if t < bound_key else 0)) for t in tied}
                  for b, bound_key in ((lo, bounds[0]), (hi, bounds[1]))}
        starts = np.array([before[lo][t] for t in tied] + [0] * (2 - len(tied)), np.int64)
        ends = np.array([before[hi][t] for t in tied] + [0] * (2 - len(tied)), np.int64)
        # tied entries before the last replayed cut: all of a smaller tied key, and that cut's own share
        key_end, first_end, _ = at_cut[end]
        count = end - first_end + sum(same for key, _, same in {at_cut[b] for b in replayed} if key != key_end)
        _mark_replayed(packed, end, count, classes, starts, ends, mask.numpy())
    elif bounds[0] >= bounds[1] or bounds[1] - bounds[0] >= every:  # no key in range, or every key
        mask.fill_(bool(bounds[0] < bounds[1]))
    else:
        _range_mask(bits, flip, np.uint32(bounds[0]), np.uint32(bounds[1] - bounds[0]), mask.numpy())
    return mask


def sorted_prefix_mask(score: Tensor, k: int, descending: bool = True, out: Tensor | None = None,
                       counted=None) -> Tensor:
    """Mask of the first ``k`` entries of ``torch.sort(score, descending)`` (MergeKit's top-k)."""
    return sorted_range_mask(score, 0, k, descending, out, counted)


def row_ranks(rows: Tensor, out: Tensor | None = None) -> Tensor:
    """int64 ranks of each row's entries in ``torch.argsort(rows, dim=1)`` (ascending, unstable), into ``out``
    (a contiguous int64 tensor of rows' shape) when given.

    A fast sort gives the ranks of distinct values; the std::sort replay, bounded by the tie groups,
    orders equal ones. Rows with NaN, or past the depth limit, use torch itself.
    """
    r, m = rows.shape
    ranks = torch.empty((r, m), dtype=torch.int64) if out is None else out
    if rows.numel() == 0:
        return ranks
    if torch.isnan(rows).any() or not replay_matches_torch():
        return _torch_ranks(rows)
    return _replayed_ranks(rows, ranks)


def _row_values(rows: Tensor) -> np.ndarray:
    """The rows' values as one contiguous array, half rows as float32 (exact): they and strided float32 rows are
    copied into this thread's reused buffer. Why: a fresh copy per della block (2 MB) cost ~460 page faults
    (bf16 della on 4 x 0.54 GB: 818 k faults, ~0.9 s of system time)."""
    rows = rows.detach()
    if rows.dtype in (torch.bfloat16, torch.float16) or (rows.dtype == torch.float32 and not rows.is_contiguous()):
        return scratch.tensor("select.rows", rows.numel(), torch.float32).view(rows.shape).copy_(rows).numpy()
    return rows.contiguous().numpy()


def _replayed_ranks(rows: Tensor, ranks: Tensor) -> Tensor:
    r = rows.shape[0]
    values = _row_values(rows)
    ok = np.empty(r, np.bool_)
    if values.dtype == np.float32:  # numpy's SIMD sort of packed (key, column) beats its argsort 2x
        order = _packed_keys(values, scratch.array("select.packed", values.size, np.uint64).reshape(values.shape))
        order.sort(axis=1)
    else:
        order = np.argsort(values, axis=1)
    bits = max(1, (values.shape[1] - 1).bit_length())  # a column's
    dtype = np.uint32 if values.shape[1] << bits < 2**32 else np.uint64
    _row_ranks(values, order, ranks.numpy(), ok, np.empty(values.shape[1], dtype), _classes(dtype, (1 << bits) - 1))
    for i in np.flatnonzero(~ok):
        ranks[i : i + 1] = _torch_ranks(rows[i : i + 1])
    return ranks


# ----------------------------------------------------------------------------- rank-dependent draws (DELLA)


@jit
def _first_above(probs, u, scale):
    """The smallest rank whose keep probability exceeds ``u`` (probs non-decreasing, probs[0] <= u < probs[-1]):
    the linear guess (probs is nearly linear in the rank), then a walk, rarely more than a step."""
    q = min(max(np.int64((u - probs[0]) * scale) + 1, 1), probs.shape[0] - 1)  # np.int64: int() is ~5x slower
    while probs[q] <= u:
        q += 1
    while probs[q - 1] > u:
        q -= 1
    return q


_BUCKETS_PER_ENTRY = 2  # rank buckets per row entry: more leave fewer draws open, at more work per row
_OCTAVES = 16  # keys more than this many octaves below a row's largest share its lowest bucket


@jit
def _row_keys(row, keys):
    """Order-preserving uint32 keys of a float32 row (-0.0 as 0.0, so equal values share a key) into ``keys``;
    the smallest key that still gets its own buckets, the largest, whether the row holds a NaN, whether keys
    below that smallest were clamped into the lowest bucket, and the bits in which the keys differ (set in some,
    clear in another: :func:`_common_low_bits`)."""
    low, high, nan = np.uint32(0xFFFFFFFF), np.uint32(0), False
    some, every = np.uint32(0), np.uint32(0xFFFFFFFF)  # bits set in some key / in every key
    for j in range(row.shape[0]):
        u = np.uint32(np.float32(row[j] + np.float32(0.0)).view(np.uint32))
        key = ~u if u >> 31 else u | np.uint32(0x80000000)
        keys[j] = key
        low, high, nan = min(low, key), max(high, key), nan | (row[j] != row[j])
        some, every = some | key, every & key
    span = np.uint32(_OCTAVES << 23)  # 2^23 keys per octave of positive floats
    bottom = max(low, high - span) if high >= span else low
    return bottom, high, nan, low < bottom, some ^ every


@jit
def _common_low_bits(differ):
    """How many low bits all keys share, from the bits in which they differ (its trailing zeros: all keys then
    differ by multiples of 2^that, float32 keys of bf16 values by 2^16, of fp16 ones by 2^13); 32 when all keys
    are equal."""
    width = np.uint32(0)
    while width < np.uint32(32) and (differ >> width) & np.uint32(1) == 0:
        width += np.uint32(1)
    return width


@jit
def _bucket_starts(keys, low, high, shift, starts):
    """starts[b]: how many keys fall in buckets below b (bucket of a key: (max(key, low) - low) >> shift), so the
    entries of bucket b hold the ranks [starts[b], starts[b + 1])."""
    used = ((high - low) >> shift) + 2
    starts[:used] = 0
    for j in range(keys.shape[0]):
        starts[_u(((max(keys[j], low) - low) >> shift) + 1)] += 1
    for b in range(1, used):
        starts[b] += starts[b - 1]


@jit
def _exact_keep(keys, j, u, probs, scale, less, equal):
    """For a draw whose bucket leaves it open: kept (1), dropped (0), or -1 when the entry's equals straddle
    the rank where its draw's outcome flips (then kept iff the std::sort replay puts it at or past that rank).
    The second value is that rank (the smallest whose keep probability exceeds ``u``) when the first is -1; the
    caller reads it only then. ``less``/``equal``: how many keys are smaller than / equal to entry j's, or -1
    when its bucket does not tell (then counted here, one pass over the row)."""
    if less < 0:
        key, less, equal = keys[j], 0, 0
        for x in range(keys.shape[0]):
            less += keys[x] < key
            equal += keys[x] == key
    if equal == 1:
        return int(u < probs[less]), less
    q = _first_above(probs, u, scale)
    if q <= less or q >= less + equal:
        return int(q <= less), q
    return -1, q


@jit
def _replayed_keep(keys, tied, cuts, n_tied, row_keep, classes):
    """Decides the draws of entries tied across their cut rank (kept iff ranked at or past it: probs is
    non-decreasing) from the std::sort replay bounded by those cuts only: the replay fixes which entries lie
    on each side of a cut, which is all a draw needs (not every tied entry's rank). False: depth limit, nothing
    decided. The replay's ints: key << 32 | column (``classes``: :func:`_index_packed`'s)."""
    m = keys.shape[0]
    v = np.empty(m, np.uint64)
    for j in range(m):
        v[j] = (np.uint64(keys[j]) << np.uint64(32)) | np.uint64(j)
    if not _introsort(v, np.unique(cuts[:n_tied]), False, classes):
        return False
    position = np.empty(m, np.int64)
    for p in range(m):
        position[v[p] & classes[1]] = p
    for h in range(n_tied):
        row_keep[tied[h]] = position[tied[h]] >= cuts[h]
    return True


@jit
def _draw_rank_mask(block, draws, probs, above, keep, ok, classes, starts):
    """Per row: ``keep[j] = draws[j] < probs[rank of block[j]]``, ranks as ``torch.argsort(dim=1)`` gives them.

    No sort: a histogram of the keys' top bits (about 2 buckets per entry, over the row's key span) bounds
    each entry's rank to its bucket's [first, last] ranks, and probs is non-decreasing, so u < probs[first]
    keeps and u >= probs[last] drops; the few draws left open count the smaller keys exactly (equals
    straddling the cut: the std::sort replay). ``ok[r]`` False (NaN, depth limit): the caller uses torch.
    ``above``: probs as the draws' dtype compares them (:func:`_float32_above` for float32 draws: the same
    outcomes in float32); ``starts``: 2 m + 2 ints (int32 where m allows: half the cache of int64).
    """
    m = block.shape[1]
    buckets = _BUCKETS_PER_ENTRY * m
    scale = (m - 1) / (probs[m - 1] - probs[0]) if probs[m - 1] > probs[0] else 0.0
    keys = np.empty(m, np.uint32)
    open_draws = np.empty(m + 1, np.int64)
    tied = np.empty(m, np.int64)
    cuts = np.empty(m, np.int64)
    for r in range(block.shape[0]):
        row_draws, row_keep = draws[r], keep[r]
        low, high, nan, clamped, differ = _row_keys(block[r], keys)
        ok[r] = not nan  # a row with NaN: torch's own ranks
        if nan:
            continue
        shift = np.uint32(0)
        while ((high - low) >> shift) >= buckets:
            shift += np.uint32(1)
        _bucket_starts(keys, low, high, shift, starts)
        n_open = 0
        for j in range(m):  # branch-free: the draws are random, branches on them mispredict
            b = (max(keys[j], low) - low) >> shift
            u = row_draws[j]
            sure = u < above[_u(starts[b])]
            row_keep[j] = sure
            open_draws[_u(n_open)] = j  # one store per entry, read back only below n_open
            n_open += (not sure) & (u < above[_u(starts[_u(b + 1)] - 1)])
        # a bucket narrower than the keys' spacing holds one key (half rows: float32 keys of bf16 values differ
        # by multiples of 2^16, of fp16 ones 2^13), so its counts are that key's, except the lowest bucket's
        # when keys below ``low`` were clamped into it; else each open draw counts its row (one pass). bf16
        # della's masks of a 1024 x 2816 |delta| (~8 draws a row open): 30.8-32.2 -> 28.1-28.4 ms
        single = shift <= _common_low_bits(differ)
        n_tied = 0
        for h in range(n_open):
            j = open_draws[h]
            b = (max(keys[j], low) - low) >> shift
            known = single and (b > 0 or not clamped)
            less = starts[_u(b)] if known else -1
            equal = starts[_u(b + 1)] - starts[_u(b)] if known else -1
            kept, cut = _exact_keep(keys, j, np.float64(row_draws[j]), probs, scale, less, equal)
            row_keep[j] = kept == 1
            if kept < 0:
                tied[n_tied], cuts[n_tied] = j, cut
                n_tied += 1
        ok[r] = n_tied == 0 or _replayed_keep(keys, tied, cuts, n_tied, row_keep, classes)


def draw_rank_mask(rows: Tensor, draws: np.ndarray, probs: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[i, j] = draws[i, j] < probs[rank]``, rank that of ``rows[i, j]`` in ``torch.argsort(rows, dim=1)``.

    Why: DELLA keeps an entry with a probability set by its rank in its row. Ranking every entry (a sort of
    (value, column) keys and a rank scatter) cost ~4x the rest; here a histogram of each row bounds every
    rank and decides all but a few draws (float32, bf16 and fp16 rows; float64 ones are ranked). ``probs``
    (float64, one per rank) must be non-decreasing; ``draws`` float32 (r, m); the comparison is exact in
    float64 (as torch's promotion of float32 draws against float32/bf16/fp16/float64 probabilities).
    """
    values = _row_values(rows)
    if values.size == 0:
        return out
    if values.dtype != np.float32 or not replay_matches_torch() or np.any(np.diff(probs) < 0):
        return _mask_from_ranks(row_ranks(rows), draws, probs, out)
    ok = np.empty(values.shape[0], np.bool_)
    m = values.shape[1]
    starts = np.empty(_BUCKETS_PER_ENTRY * m + 2, np.int32 if m < 2**31 else np.int64)
    above = _float32_above(probs) if draws.dtype == np.float32 else probs  # float64 draws: compared as they are
    _draw_rank_mask(values, draws, probs, above, out, ok, _classes(np.uint64, 0xFFFFFFFF), starts)
    for i in np.flatnonzero(~ok):
        _mask_from_ranks(_torch_ranks(rows[i : i + 1]), draws[i : i + 1], probs, out[i : i + 1])
    return out


def _float32_above(probs: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each float64 probability: for a float32 draw u, u < p exactly when u < that
    float32 (no float32 lies between p and it)."""
    nearest = probs.astype(np.float32)
    return np.where(nearest.astype(np.float64) >= probs, nearest, np.nextafter(nearest, np.float32(np.inf)))


def _mask_from_ranks(ranks: Tensor, draws: np.ndarray, probs: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.less(draws.astype(np.float64), probs[ranks.numpy()], out=out)
    return out


def _torch_ranks(rows: Tensor) -> Tensor:
    order = torch.argsort(rows, dim=1)
    return torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order).contiguous())
