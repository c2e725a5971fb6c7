"""merge.select against torch itself: the masks are torch.sort's positions, the ranks torch.argsort's.

The reference is torch's own (unstable) CPU sort, which MergeKit uses; the module replays it, so
every test here compares with ``torch.sort``/``torch.argsort``/``torch.kthvalue`` run on the same
scores, on inputs full of ties (where an index rule or a stable sort would differ).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mergescope.merge import methods as M
from mergescope.merge import select as S


def _torch_range(score, lo, hi, descending):
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.sort(score, descending=descending).indices[lo:hi]] = True
    return mask


def _torch_ranks(rows):
    order = torch.argsort(rows, dim=1)
    return torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order).contiguous())


def _scores(kind, n, rng):
    """Non-negative float32 scores with heavy ties of several kinds."""
    if kind == "ints":
        return torch.from_numpy(rng.integers(0, 1 + int(rng.integers(1, 12)), n).astype(np.float32))
    if kind == "bf16":
        return torch.from_numpy(np.abs(rng.standard_normal(n, dtype=np.float32) * 1e-3)).bfloat16().float()
    if kind == "fp16":
        return torch.from_numpy(np.abs(rng.standard_normal(n).astype(np.float16)).astype(np.float32))
    if kind == "equal":
        return torch.full((n,), 0.25)
    if kind == "one_tie":  # distinct values except one repeated value sitting at the middle
        x = torch.from_numpy(rng.permutation(n).astype(np.float32))
        x[x.argsort()[n // 3 : 2 * n // 3]] = float(n // 2)
        return x
    if kind == "sorted":  # runs and reversed runs: the partition's scans cross in every way
        return torch.from_numpy(np.sort(rng.integers(0, max(2, n // 8), n)).astype(np.float32))
    if kind == "reversed":
        return torch.from_numpy(np.sort(rng.integers(0, max(2, n // 8), n))[::-1].astype(np.float32))
    if kind == "sawtooth":
        return torch.from_numpy((np.arange(n) % 7).astype(np.float32))
    if kind == "zeros_inf":
        return torch.from_numpy(rng.choice(np.array([0.0, 1.0, np.inf], np.float32), n))
    raise AssertionError(kind)


KINDS = ["ints", "bf16", "fp16", "equal", "one_tie", "sorted", "reversed", "sawtooth", "zeros_inf"]


def _watch_replays(monkeypatch, verdict=None):
    """Records (packed dtype, result) of every replay of sorted_range_mask; ``verdict`` (when given) replaces
    the kernel."""
    seen, kernel = [], S._introsort

    def wrapped(v, bounds, full, classes):
        result = kernel(v, bounds, full, classes) if verdict is None else verdict()
        seen.append((v.dtype, result))
        return result

    monkeypatch.setattr(S, "_introsort", wrapped)
    return seen


def _edges(score, rng, descending):
    """Cuts worth checking: both ends, 1 and n-1, a tie group filled exactly, and random ones."""
    n = score.numel()
    key = score[int(rng.integers(n))]
    exact = int((score >= key).sum()) if descending else int((score <= key).sum())
    return sorted({0, 1, n - 1, n, exact, max(0, exact - 1), *rng.integers(0, n + 1, 4).tolist()} & set(range(n + 1)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("descending", [True, False])
def test_prefix_and_range_masks_are_torch_sort_positions(kind, descending):
    rng = np.random.default_rng(2 * KINDS.index(kind) + descending)
    for n in (1, 2, 3, 15, 16, 17, 18, 33, 100, 1000, 4097, 60_000):
        score = _scores(kind, n, rng)
        cuts = _edges(score, rng, descending)
        for k in cuts:
            assert torch.equal(S.sorted_prefix_mask(score, k, descending), _torch_range(score, 0, k, descending)), (n, k)
        for lo, hi in zip(cuts, cuts[2:] + [n]):
            got = S.sorted_range_mask(score, lo, hi, descending)
            assert torch.equal(got, _torch_range(score, lo, hi, descending)), (n, lo, hi)


HALF_KINDS = ["ints", "bf16", "fp16", "equal", "one_tie", "sorted", "reversed", "zeros_inf"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("descending", [True, False])
def test_half_scores_rank_as_their_float32_values(dtype, descending, monkeypatch):
    """bf16/fp16 scores are ranked by their 16-bit patterns: the positions of torch's sort of ``score.float()``
    (what MergeKit sorts), decided by the replay itself (no float32 copy, no fallback to torch's sort)."""
    assert S.replay_matches_torch()  # computed before torch's sort goes
    rng = np.random.default_rng(31 + descending)
    wants = []
    for kind in HALF_KINDS:
        for n in (1, 2, 17, 18, 100, 4097, 60_000):
            score = _scores(kind, n, rng).to(dtype)
            order = torch.sort(score.float(), descending=descending).indices
            cuts = _edges(score.float(), rng, descending)
            for lo, hi in [(0, k) for k in cuts] + list(zip(cuts, cuts[2:] + [n])):
                want = torch.zeros(n, dtype=torch.bool)
                want[order[lo:hi]] = True
                wants.append((score, lo, hi, want))
    replays = _watch_replays(monkeypatch)
    monkeypatch.setattr(torch, "sort", None)  # any fallback would fail
    for score, lo, hi, want in wants:
        assert torch.equal(S.sorted_range_mask(score, lo, hi, descending), want), (score.numel(), lo, hi)
    assert replays and all(ok and dtype == np.uint32 for dtype, ok in replays)


@pytest.mark.parametrize("special", ["negative", "nan"])
def test_half_scores_outside_the_radix_order_take_torch_on_float32(special):
    rng = np.random.default_rng(32)
    score = _scores("ints", 3000, rng).bfloat16()
    if special == "negative":
        score = score - 4
    else:
        score[rng.integers(0, 3000, 50)] = float("nan")
    for lo, hi, descending in ((0, 1000, True), (300, 2900, False)):
        assert torch.equal(S.sorted_range_mask(score, lo, hi, descending), _torch_range(score.float(), lo, hi, descending))


@pytest.mark.parametrize("kind", ["ints", "bf16", "one_tie"])
def test_millions_of_entries(kind, monkeypatch):
    assert S.replay_matches_torch()
    replays = _watch_replays(monkeypatch)  # the replay itself decides here, not a fallback to torch
    rng = np.random.default_rng(7)
    score = _scores(kind, 2_500_000, rng)
    order_desc = torch.sort(score, descending=True).indices
    order_asc = torch.sort(score, descending=False).indices
    for k in (1, 1_000_003, 1_250_000, 2_499_999):
        want = torch.zeros(score.numel(), dtype=torch.bool)
        want[order_desc[:k]] = True
        assert torch.equal(S.sorted_prefix_mask(score, k), want), k
    lo, hi = 600_000, 2_400_000  # breadcrumbs: two cuts in ascending order
    want = torch.zeros(score.numel(), dtype=torch.bool)
    want[order_asc[lo:hi]] = True
    assert torch.equal(S.sorted_range_mask(score, lo, hi, descending=False), want)
    assert replays and all(ok for _, ok in replays)


def test_tied_cuts_differ_from_any_index_rule():
    """The inputs above do exercise the replay: torch's choice among ties is not lowest/highest index."""
    score = _scores("ints", 100_000, np.random.default_rng(1))
    k = int((score > 3).sum()) + 500
    got = S.sorted_prefix_mask(score, k)
    tied = torch.nonzero(score == 3).reshape(-1)
    low, high = (score > 3), (score > 3)
    low[tied[:500]] = True
    high[tied[-500:]] = True
    assert int(got.sum()) == k and not torch.equal(got, low) and not torch.equal(got, high)


def test_untied_cuts_do_not_replay_the_sort(monkeypatch):
    assert S.replay_matches_torch()  # computed before the kernels are patched
    def boom(*_):
        raise AssertionError("replayed although nothing ties at the cut")

    monkeypatch.setattr(S, "_introsort", boom)
    score = torch.randperm(50_000).float()
    assert torch.equal(S.sorted_prefix_mask(score, 1234), _torch_range(score, 0, 1234, True))
    assert torch.equal(S.sorted_range_mask(score, 77, 40_000, False), _torch_range(score, 77, 40_000, False))
    tied = torch.tensor([5.0, 1.0, 5.0, 3.0, 5.0])  # ties exactly filling the cut: no replay either
    assert torch.equal(S.sorted_prefix_mask(tied, 3), tied == 5)


def test_depth_limit_falls_back_to_torch(monkeypatch):
    """libstdc++ heapsorts a segment past 2 floor(log2 n) partitions; then torch's sort decides."""
    assert S.replay_matches_torch()  # computed before the kernels are patched
    calls = _watch_replays(monkeypatch, verdict=lambda: False)
    score = _scores("ints", 5000, np.random.default_rng(3))
    for lo, hi, descending in ((0, 2500, True), (1000, 3999, False)):
        assert torch.equal(S.sorted_range_mask(score, lo, hi, descending), _torch_range(score, lo, hi, descending))
    assert len(calls) == 2


def test_depth_limit_is_detected_and_falls_back(monkeypatch):
    """A median-of-three adversary (McIlroy's antiqsort against the replay) drives a segment to the
    depth limit, where libstdc++ heapsorts: the kernel says so and torch's sort decides the mask."""
    assert S.replay_matches_torch()
    n = 64
    score = torch.from_numpy(_adversary(n))
    ties = int((score == score.max()).sum())  # the adversary's never-frozen items tie at the top
    assert ties > 1
    packed, classes = S._index_packed(score.numpy().view(np.uint32))
    assert not S._introsort(packed, np.empty(0, np.int64), True, classes)
    seen = _watch_replays(monkeypatch)
    for lo, hi in ((0, n - ties // 2), (3, n - 1)):
        assert torch.equal(S.sorted_range_mask(score, lo, hi, False), _torch_range(score, lo, hi, False))
    assert seen and not any(ok for _, ok in seen)


def _adversary(n):
    """Values McIlroy's gas comparator freezes against the replayed introsort (ascending).

    Runs a pure-Python copy of the partition steps along the larger segment on gas/solid items; the
    frozen ranks keep the median-of-three pivot near an end. Items still gas were never compared
    with each other, so they all keep the value ``n`` (ties) without changing any comparison.
    """
    gas = n
    val = [gas] * n
    frozen = [0]
    cand = [0]

    def less(x, y):
        if val[x] == gas and val[y] == gas:
            if x == cand[0]:
                val[x] = frozen[0]
            else:
                val[y] = frozen[0]
            frozen[0] += 1
        if val[x] == gas:
            cand[0] = x
        elif val[y] == gas:
            cand[0] = y
        return val[x] < val[y]

    items = list(range(n))

    def lt(i, j):
        return less(items[i], items[j])

    def swap(i, j):
        items[i], items[j] = items[j], items[i]

    def median(result, a, b, c):
        if lt(a, b):
            swap(result, b if lt(b, c) else (c if lt(a, c) else a))
        elif lt(a, c):
            swap(result, a)
        else:
            swap(result, c if lt(b, c) else b)

    first, last = 0, n
    for _ in range(2 * int(np.log2(n))):  # descend the left segment (it holds the middle)
        if last - first <= 16:
            break
        median(first, first + 1, first + (last - first) // 2, last - 1)
        i, j = first + 1, last
        while True:
            while lt(i, first):
                i += 1
            j -= 1
            while lt(first, j):
                j -= 1
            if not i < j:
                break
            swap(i, j)
            i += 1
        first, last = (first, i) if i - first > last - i else (i, last)
    return np.array(val, np.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_kth_largest_equals_kthvalue(dtype):
    rng = np.random.default_rng(5)
    for kind in ("ints", "bf16", "zeros_inf", "signed"):
        for n in (1, 2, 17, 1000, 300_001):
            score = (torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if kind == "signed"
                     else _scores(kind, n, rng)).to(dtype)
            for k in {1, n, (n + 1) // 2, int(rng.integers(1, n + 1))}:
                got = M.kth_largest(score, k)
                assert got.dtype == dtype and got == torch.kthvalue(score, n - k + 1).values, (kind, n, k)


@pytest.mark.parametrize("special", ["negative", "minus_zero", "nan", "float64"])
def test_scores_outside_the_radix_order_take_torch(special):
    """-0.0 == 0.0 for torch but not as bits; NaN and negatives do not order like uint32: torch decides."""
    rng = np.random.default_rng(11)
    score = _scores("ints", 3000, rng)
    if special == "negative":
        score = score - 4
    elif special == "minus_zero":
        score[rng.integers(0, 3000, 700)] = -0.0
        score[rng.integers(0, 3000, 700)] = 0.0
    elif special == "nan":
        score[rng.integers(0, 3000, 50)] = float("nan")
    else:
        score = score.double()
    for lo, hi, descending in ((0, 1000, True), (0, 1700, False), (300, 2900, False), (10, 2000, True)):
        assert torch.equal(S.sorted_range_mask(score, lo, hi, descending), _torch_range(score, lo, hi, descending))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_row_ranks_are_argsort_ranks(dtype):
    rng = np.random.default_rng(2)
    for r, m in ((1, 1), (3, 2), (5, 17), (7, 100), (64, 1024)):
        rows = torch.from_numpy(np.abs(rng.standard_normal((r, m))) * 1e-3).to(dtype)
        rows[:, : m // 3] = rows[:, m // 3 : 2 * (m // 3)]  # plenty of ties in every row
        assert torch.equal(S.row_ranks(rows), _torch_ranks(rows)), (r, m)
    rows = torch.from_numpy(rng.integers(-3, 3, (4, 500)).astype(np.float32)).to(dtype)
    rows[1, 7] = -0.0
    assert torch.equal(S.row_ranks(rows), _torch_ranks(rows))


def test_row_ranks_fallbacks(monkeypatch):
    assert S.replay_matches_torch()  # computed before the kernels are patched
    rows = torch.from_numpy(np.random.default_rng(4).integers(0, 5, (6, 300)).astype(np.float32))
    with_nan = rows.clone()
    with_nan[2, 5] = float("nan")
    assert torch.equal(S.row_ranks(with_nan), _torch_ranks(with_nan))
    kernel = S._row_ranks

    def depth_hit_on_odd_rows(block, order, ranks, ok, v, classes):
        kernel(block, order, ranks, ok, v, classes)
        ranks[1::2] = -1  # what the kernel leaves there must not survive
        ok[1::2] = False

    monkeypatch.setattr(S, "_row_ranks", depth_hit_on_odd_rows)
    assert torch.equal(S.row_ranks(rows), _torch_ranks(rows))


def test_two_threads_give_the_same_masks():
    """The merge engine calls methods from two worker threads: kernels share no state."""
    rng = np.random.default_rng(9)
    scores = [_scores("bf16", 400_000, rng) for _ in range(4)]
    want = [_torch_range(s, 0, 150_000, True) for s in scores]
    want_rows = [_torch_ranks(s.reshape(400, 1000)) for s in scores]
    results: dict[tuple[int, int], tuple] = {}

    def work(t):
        for rep in range(3):
            for i, s in enumerate(scores):
                results[(t, rep, i)] = (S.sorted_prefix_mask(s, 150_000), S.row_ranks(s.reshape(400, 1000)))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 * 3 * 4
    for (_, _, i), (mask, ranks) in results.items():
        assert torch.equal(mask, want[i]) and torch.equal(ranks, want_rows[i])


def test_methods_masks_are_torch_sort_masks():
    """magnitude_mask / outlier_mask / della ranks are the positions of MergeKit's own torch calls."""
    rng = np.random.default_rng(12)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        delta = _scores("bf16", 90_000, rng).reshape(300, 300).to(dtype)
        n, density, gamma = delta.numel(), 0.4, 0.05
        flat = delta.reshape(-1).float()  # MergeKit ranks w.float()
        assert torch.equal(M.magnitude_mask(delta, density), _torch_range(flat, 0, int(density * n), True))
        keep, n_top = int(density * n), int(gamma * n)
        n_bot = n - keep - n_top
        assert torch.equal(M.outlier_mask(delta, density, gamma), _torch_range(flat, n_bot, n_bot + keep, False))


def test_kernels_compile_without_a_cache_folder(monkeypatch):
    """A read-only install without a writable home: numba finds no cache folder; compile per process."""
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])

    def twice(x):
        return 2 * x

    with pytest.raises(RuntimeError, match="no locator"):
        caching.FunctionCache(twice)
    assert S.jit(twice)(21) == 42


def test_a_torch_sorting_otherwise_gets_its_own_sort(monkeypatch):
    """torch built on another C++ library (libc++) orders ties its own way: the self-check sends
    every mask and rank to torch's sort, as MergeKit's would be on that machine."""
    def boom(*_):
        raise AssertionError("replayed although this torch sorts otherwise")

    monkeypatch.setattr(S, "replay_matches_torch", lambda: False)
    monkeypatch.setattr(S, "_introsort", boom)
    monkeypatch.setattr(S, "_row_ranks", boom)
    score = _scores("ints", 20_000, np.random.default_rng(13))
    assert torch.equal(S.sorted_prefix_mask(score, 7000), _torch_range(score, 0, 7000, True))
    assert torch.equal(S.sorted_range_mask(score, 3000, 15000, False), _torch_range(score, 3000, 15000, False))
    rows = score.reshape(20, 1000)
    assert torch.equal(S.row_ranks(rows), _torch_ranks(rows))


@pytest.mark.parametrize("descending", [True, False])
def test_every_range_of_small_tied_scores(descending):
    """All [lo, hi) of short scores with few distinct values: each cut straddling a tie group or not, the
    two cuts in one group or in two, the replayed cut's ties placed by position and the other's by key."""
    rng = np.random.default_rng(21 + descending)
    for n, values in [(40, 3), (70, 4), (300, 5)]:
        score = torch.from_numpy(rng.integers(0, values, n).astype(np.float32))
        order = torch.sort(score, descending=descending).indices
        for lo in range(0, n + 1, 1 if n < 100 else 7):
            for hi in range(lo, n + 1, 1 if n < 100 else 5):
                want = torch.zeros(n, dtype=torch.bool)
                want[order[lo:hi]] = True
                assert torch.equal(S.sorted_range_mask(score, lo, hi, descending), want), (n, lo, hi)


@pytest.mark.parametrize("two", [False, True])
def test_packed_ties_order_like_the_keys_and_carry_the_tied_indices(two):
    """The replay's packed ints: one class per key, in the keys' order; a tied key's entries hold their index.
    n is passed larger than the keys (a 2^31-entry score in uint64) as well as equal to them (uint32)."""
    rng = np.random.default_rng(3 + two)
    bits = rng.integers(0, 40, 5000).astype(np.uint32)
    for flip, base in ((np.uint32(0), 0), (np.uint32(0xFFFFFFFF), 0xFFFFFFFF - 39)):
        keys = (bits ^ flip).astype(np.int64) - base  # 0..39, ascending in sort order
        tied = sorted(rng.choice(40, 2 if two else 1, replace=False).tolist())
        for n, dtype in ((bits.size, np.uint32), (2**31, np.uint64)):
            k1, k2 = tied[0], (tied[1] if two else -1)
            ranges = [(k1, k1 + n - 1)] + ([(k2 + n, k2 + 2 * n - 1)] if two else [])
            mask, start, width = np.empty(bits.size, np.bool_), (int(flip) ^ 7) - 3, 20  # 20 keys from start
            packed = S._pack_ties(bits, flip, base, k1, k2, n, np.empty(bits.size, dtype), mask, np.uint64(start),
                                  np.uint64(width))
            assert np.array_equal(mask, (bits ^ flip).astype(np.uint64) - np.uint64(start) < width)  # wraps below
            classes = S._classes(dtype, 0, ranges)
            lo = np.array([S._lo(x, classes) for x in packed])
            hi = np.array([S._hi(x, classes) for x in packed])
            order = np.argsort(keys, kind="stable")
            assert np.array_equal(np.argsort(lo, kind="stable"), order) and np.all(lo <= hi)
            assert np.all((lo[:, None] == lo[None, :]) == (keys[:, None] == keys[None, :]))
            step = np.diff(keys[order]) > 0  # neighbouring classes do not overlap
            assert np.all(hi[order][:-1][step] < lo[order][1:][step])
            for (start, _), key in zip(ranges, tied):
                at = np.flatnonzero(keys == key)
                assert np.array_equal(packed[at] - start, at)


@pytest.mark.parametrize("skim", [False, True])
def test_two_bin_low_histograms_count_what_numpy_counts(skim):
    """Breadcrumbs' two cuts: both passes (every entry counted, or only the 64-entry blocks a vectorised compare
    finds a hit in) give numpy's counts of each bin's low 16 bits, with hits at both ends of a bin, in adjacent
    blocks and in the partial last block."""
    rng = np.random.default_rng(5 + skim)
    n = 64 * 301 + 37
    bits = rng.integers(0x3A000000, 0x3F000000, n, dtype=np.uint32)
    starts = (0x3C120000, 0x3D7F0000)
    for start in starts:
        where = rng.choice(n, 40, replace=False)
        bits[where] = start + rng.integers(0, 1 << 16, 40, dtype=np.uint32)
        bits[where[:2]] = [start, start + 0xFFFF]
    bits[[63, 64, n - 1]] = [starts[0] + 1, starts[1] + 2, starts[1] + 5]
    low_hist = np.zeros((2, 1 << 16), np.int64)
    S._low_histograms(bits, np.uint32(starts[0]), np.uint32(starts[1]), low_hist, skim)
    for t, start in enumerate(starts):
        inside = bits[(bits >= start) & (bits <= start + 0xFFFF)]
        assert np.array_equal(low_hist[t], np.bincount(inside - start, minlength=1 << 16))


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_block_scans_find_the_stops_a_scalar_scan_finds(dtype):
    """The partition's block scans (16 entries per compressed step where the CPU has AVX-512, the rest one by one):
    the offsets, in order, of the entries >= the pivot's low end scanning right, <= its high end scanning left,
    as a numpy reference finds them, for every width 0-70 and the partition's 256, values at and around the bounds
    included, whatever the compiled path (S._COMPRESS)."""
    rng = np.random.default_rng(11)
    v = rng.integers(0, 64, 2000).astype(dtype)
    off = np.full(256 + 16, -1, np.int32)
    for width in [*range(71), 256]:
        for base in (300, 301, 1317):
            low, high = dtype(rng.integers(0, 64)), dtype(rng.integers(0, 64))
            count = S._scan_left(v, base, width, low, off)
            want = np.flatnonzero(v[base:base + width] >= low)
            assert count == want.size and np.array_equal(off[:count], want)
            count = S._scan_right(v, base, width, high, off)
            want = np.flatnonzero(v[base - width + 1:base + 1][::-1] <= high) if width else np.empty(0, np.int64)
            assert count == want.size and np.array_equal(off[:count], want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_values_are_the_rows_as_float32_in_a_reused_buffer(dtype):
    """della's rows (half ones as float32, exact; strided ones made contiguous) equal torch's conversion, call after
    call of different sizes on one thread (the buffer is reused, its contents replaced)."""
    rng = np.random.default_rng(3)
    for shape in [(40, 1024), (6, 7), (64, 2816)]:
        full = torch.from_numpy(rng.standard_normal((shape[0], 2 * shape[1])).astype(np.float32)).to(dtype)
        for rows in (full[:, :shape[1]].contiguous(), full[:, ::2]):
            values = S._row_values(rows)
            assert values.flags.c_contiguous and values.shape == shape
            assert np.array_equal(values, rows.float().numpy())
