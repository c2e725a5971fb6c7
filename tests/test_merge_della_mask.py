"""DELLA's rank-dependent draws (select.draw_rank_mask) against MergeKit's own torch expression.

The reference ranks each row with ``torch.argsort(dim=1)``, evaluates MergeKit's probability expression on
the whole tensor in the magnitude's dtype and compares torch's float32 draws (numpy's PCG64 stream, drawn at
once) with ``<``: nothing of it comes from the code under test.
"""

import numpy as np
import pytest
import torch

from mergescope.merge import methods as M
from mergescope.merge import select as S


def _reference(magnitude, density, epsilon, seed):
    """MergeKit 0.1.5's della magprune: per row (dim 1, the rest flattened behind it) argsort ranks."""
    shaped = magnitude.reshape(1, -1) if magnitude.dim() < 2 else magnitude
    rows = shaped.flatten(2).transpose(1, 2) if shaped.dim() > 2 else shaped.unsqueeze(1)
    m = rows.shape[-1]
    ranks = torch.argsort(torch.argsort(rows, dim=-1), dim=-1)  # a permutation's inverse: any sort of it
    rank_norm = ranks.to(magnitude.dtype) / (m - 1) if m > 1 else torch.zeros(rows.shape, dtype=magnitude.dtype)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    draws = torch.from_numpy(M.random_stream(seed).random(rows.numel(), dtype=np.float32)).view(rows.shape)
    return (draws < probs).transpose(1, 2).reshape(-1)


def _values(kind: str, shape, rng) -> torch.Tensor:
    n = int(np.prod(shape))
    if kind == "normal":
        v = np.abs(rng.standard_normal(n)).astype(np.float32)
    elif kind == "ints":  # heavy ties: every cut falls inside a group of equal values
        v = rng.integers(0, 6, n).astype(np.float32)
    elif kind == "bf16":  # the value grid of bf16 deltas
        v = torch.from_numpy(np.abs(rng.standard_normal(n)).astype(np.float32)).bfloat16().float().numpy()
    elif kind == "wide":  # 40 octaves and zeros: the lowest bucket holds many ranks
        v = (np.abs(rng.standard_normal(n)) * 10.0 ** rng.uniform(-12, 0, n) * (rng.random(n) > 0.05)).astype(np.float32)
    elif kind == "signed_zeros":  # -0.0 and 0.0 rank as equals; negatives too
        v = rng.choice(np.array([-0.0, 0.0, 1.0, -2.0, 3e-3], np.float32), n)
    elif kind == "denormals":
        v = (rng.integers(0, 40, n) * np.float32(1e-45)).astype(np.float32)
    else:  # one value everywhere
        v = np.full(n, 0.25, np.float32)
    return torch.from_numpy(v).reshape(shape)


SHAPES = [(1,), (7,), (5000,), (9, 1), (11, 2), (13, 3), (33, 17), (40, 1024), (6, 2816), (6, 4, 3, 3)]
KINDS = ["normal", "ints", "bf16", "wide", "signed_zeros", "denormals", "constant"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_della_mask_is_the_argsort_expression(shape, kind):
    rng = np.random.default_rng(abs(hash((shape, kind))) % 2**32)
    magnitude = _values(kind, shape, rng)
    for density, epsilon, seed in [(0.5, 0.1, 0), (0.4, 0.2, 1), (0.66, 0.05, 2), (0.2, 0.15, 3)]:
        got = M.della_mask(magnitude, density, M.random_stream(seed), epsilon=epsilon)
        assert torch.equal(got, _reference(magnitude, density, epsilon, seed)), (density, epsilon)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ints", "bf16"])
def test_della_mask_in_other_dtypes(dtype, kind):
    """The probabilities round in the magnitude's dtype (bf16 ranks above 256 round too), as MergeKit's."""
    magnitude = _values(kind, (24, 700), np.random.default_rng(7)).to(dtype)
    for density, epsilon in [(0.5, 0.1), (0.3, 0.25)]:
        got = M.della_mask(magnitude, density, M.random_stream(4), epsilon=epsilon)
        assert torch.equal(got, _reference(magnitude, density, epsilon, 4))


@pytest.mark.parametrize("rows", ["clamped", "two_keys_a_bucket"])
def test_bucket_counts_stand_for_a_key_only_where_a_bucket_holds_one_key(rows):
    """An open draw takes its bucket's counts as its key's where keys differ by at least a bucket's width (half
    values: float32 keys 2^16 or 2^13 apart), except in the lowest bucket when keys more than 16 octaves down
    were clamped into it ("clamped": bf16 values, a third of them tiny and distinct), and not where a bucket
    is wider than the keys' spacing ("two_keys_a_bucket": fp16 values 1-2 steps apart, buckets 2 steps wide).
    (A bucket's counts bound its keys' ranks either way: taken for a bucket of several keys they would only
    send more draws to the replay, so these masks check the bits, :func:`test_common_low_bits_and_clamping`
    the rule.)"""
    rng = np.random.default_rng(15)
    if rows == "clamped":
        big = np.abs(rng.standard_normal((200, 2816)))
        tiny = 2.0 ** rng.uniform(-40, -24, (200, 2816))
        values = torch.from_numpy(np.where(rng.random((200, 2816)) < 0.35, tiny, big).astype(np.float32)).bfloat16()
    else:  # 100 entries a row on 300 fp16 steps of [1, 1.3): key span 2^13 * 300, 200 buckets of 2^14
        values = (1 + torch.from_numpy(rng.integers(0, 300, (3000, 100))).float() * 2.0**-10).half()
    for density, epsilon, seed in [(0.5, 0.1, 0), (0.3, 0.25, 1), (0.7, 0.2, 2)]:
        got = M.della_mask(values, density, M.random_stream(seed), epsilon=epsilon)
        assert torch.equal(got, _reference(values, density, epsilon, seed)), (density, epsilon)


def test_common_low_bits_and_clamping():
    """select._row_keys' clamping flag (some key below the lowest bucket's) and the bits in which the keys differ,
    and select._common_low_bits of those: the low bits every key shares with the first (numpy: trailing zeros of
    their xor with it)."""
    rng = np.random.default_rng(16)
    clamps = set()
    for values in (rng.standard_normal(500).astype(np.float32), torch.randn(500).bfloat16().float().numpy(),
                   torch.randn(500).half().float().numpy(), np.full(500, 0.5, np.float32),
                   np.abs(rng.standard_normal(500)).astype(np.float32)):
        keys = np.empty(values.size, np.uint32)
        low, _, _, clamped, differ = S._row_keys(values, keys)
        want_differ = np.bitwise_or.reduce(keys ^ keys[0])
        want = 32 if want_differ == 0 else (int(want_differ) & -int(want_differ)).bit_length() - 1
        assert differ == want_differ and S._common_low_bits(differ) == want
        assert clamped == bool(keys.min() < low)
        clamps.add(bool(clamped))
    assert clamps == {False, True}


def test_rows_with_nan_use_torch_ranks():
    magnitude = _values("ints", (20, 300), np.random.default_rng(8))
    magnitude[3, 7] = float("nan")
    got = M.della_mask(magnitude, 0.5, M.random_stream(9), epsilon=0.1)
    assert torch.equal(got, _reference(magnitude, 0.5, 0.1, 9))


def test_rows_past_the_depth_limit_are_redone_with_torch(monkeypatch):
    """A row the replay gives up on (libstdc++ heapsorts there) is redone from torch's own ranks."""
    kernel = S._draw_rank_mask

    def give_up_on_odd_rows(block, draws, probs, above, keep, ok, classes, starts):
        kernel(block, draws, probs, above, keep, ok, classes, starts)
        ok[1::2] = False
        keep[1::2] = ~keep[1::2]  # whatever the kernel wrote there must not survive

    monkeypatch.setattr(S, "_draw_rank_mask", give_up_on_odd_rows)
    magnitude = _values("ints", (30, 500), np.random.default_rng(10))
    got = M.della_mask(magnitude, 0.5, M.random_stream(11), epsilon=0.1)
    assert torch.equal(got, _reference(magnitude, 0.5, 0.1, 11))


@pytest.mark.parametrize("kind", ["normal", "ints"])
def test_draw_rank_mask_is_a_lookup_by_rank(kind):
    """Any non-decreasing probabilities (plateaus included); decreasing ones go through explicit ranks."""
    rng = np.random.default_rng(12)
    rows = _values(kind, (50, 400), rng)
    draws = rng.random(rows.shape, dtype=np.float32)
    order = torch.argsort(rows, dim=1)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(400).expand_as(order).contiguous()).numpy()
    for probs in (np.sort(rng.random(400)), np.round(np.linspace(0.1, 0.9, 400), 2), np.linspace(0.9, 0.1, 400)):
        want = draws.astype(np.float64) < probs[ranks]
        out = np.empty(rows.shape, np.bool_)
        assert np.array_equal(S.draw_rank_mask(rows, draws, probs, out), want)


def test_della_mask_over_several_row_blocks():
    """Blocks of rows draw in turn from one stream: the draws stay in the rows' order across blocks."""
    magnitude = _values("bf16", (1500, 800), np.random.default_rng(13))
    assert 1500 * 800 > 2 * M._DELLA_BLOCK
    got = M.della_mask(magnitude, 0.45, M.random_stream(14), epsilon=0.15)
    assert torch.equal(got, _reference(magnitude, 0.45, 0.15, 14))


def test_float32_thresholds_decide_float32_draws_as_the_float64_probabilities():
    """u < p (float32 u against float64 p, as torch promotes) is u < _float32_above(p), at every float32 next to p:
    probabilities exactly float32, between two float32s, and MergeKit's own della ones."""
    rng = np.random.default_rng(12)
    probs = np.sort(np.concatenate([rng.random(500), rng.random(200).astype(np.float32).astype(np.float64),
                                    M._della_probabilities(1000, 0.4, 0.15, torch.float32), [0.0, 1.0]]))
    above = S._float32_above(probs)
    assert above.dtype == np.float32
    nearest = probs.astype(np.float32)
    for u in (nearest, np.nextafter(nearest, np.float32(-1)), np.nextafter(nearest, np.float32(2)),
              np.nextafter(np.nextafter(nearest, np.float32(2)), np.float32(2))):
        assert np.array_equal(u < above, u.astype(np.float64) < probs)
