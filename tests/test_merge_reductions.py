"""merge/reductions.py against torch itself: the norms and pair sums of model offsets with the bits of torch's
single-threaded ``vector_norm(dim=-1)`` and ``sum(dim=-1)`` (MergeKit's model_stock calls), every size class."""

import numpy as np
import pytest
import torch

from mergescope.merge import kernels, methods, reductions

torch.set_num_threads(1)


def torch_reference(w0, ws):
    """What MergeKit 0.1.5's model_stock reduces: torch's own ops on the offset tensors."""
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in offsets]
    sums = [(offsets[i] * offsets[j]).sum(dim=-1) for i in range(len(ws)) for j in range(i + 1, len(ws))]
    return torch.stack(norms).numpy(), torch.stack(sums).numpy()


def models(n, count, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, generator=g)
    return w0, [w0 + scale * torch.randn(n, generator=g) for _ in range(count)]


def assert_bits(got, want):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == np.float32
        assert np.array_equal(a.view(np.int32), b.view(np.int32))


@pytest.fixture(scope="module")
def layout():
    found = reductions.torch_layout()
    assert found is not None, "no lane layout reproduces torch's reductions on this machine"
    return found


@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("n", [4096, 4099, 4096 + 8 * 3 + 5, 4096 + 16 * 3 + 15, 100_003, 1_000_007])
def test_norms_and_pair_sums_are_torchs_bits(layout, n, count):
    """Sizes with no tail, a short tail, leftover vectors (< 4) and tails at 8 and 16 lanes, cascades of 1-3
    levels; 2-4 models (1-6 pairs)."""
    w0, ws = models(n, count, seed=n + count)
    assert_bits(reductions.offset_reductions(w0, ws, *layout), torch_reference(w0, ws))


@pytest.mark.parametrize("n", [4096, 4099, 4096 + 16 * 3 + 15, 100_003, 1_000_007])
def test_bf16_norms_and_pair_sums_are_torchs_bits(layout, n):
    """bf16 offsets (torch's bf16 sub), norms and sums of bf16-rounded products: vectors of 2 x lanes entries
    (two halves), the float results rounded once to bf16 as torch stores them."""
    g = torch.Generator().manual_seed(n)
    w0 = torch.randn(n, generator=g).bfloat16()
    ws = [(w0.float() + 0.1 * torch.randn(n, generator=g)).bfloat16() for _ in range(3)]
    w0[:5] = -0.0
    offsets = [w - w0 for w in ws]
    want_norms = torch.stack([torch.linalg.vector_norm(d, dim=-1) for d in offsets])
    want_sums = torch.stack([(offsets[i] * offsets[j]).sum(dim=-1) for i in range(3) for j in range(i + 1, 3)])
    norms, sums = reductions.offset_reductions(w0, ws, *layout)
    assert torch.equal(torch.from_numpy(norms).bfloat16().view(torch.int16), want_norms.view(torch.int16))
    assert torch.equal(torch.from_numpy(sums).bfloat16().view(torch.int16), want_sums.view(torch.int16))


def test_the_cascades_wider_levels_are_torchs_bits(layout):
    """More than 2**19 rows: libtorch's level step grows from 2**4 to 2**5 rows (~17 M entries at 8 lanes)."""
    lanes = layout[0]
    n = (2**19 + 3) * 4 * lanes + 11
    w0, ws = models(n, 2, seed=5)
    assert reductions._level_power(n // lanes // 4) == 5
    assert_bits(reductions.offset_reductions(w0, ws, *layout), torch_reference(w0, ws))


def test_signed_zeros_and_equal_models(layout):
    """Offsets of equal models are +0.0 (sums and norms +0.0, as torch's output starts at 0); -0.0 entries."""
    w0, ws = models(50_001, 3, seed=2)
    w0[:7] = -0.0
    ws[1][:5] = -0.0
    ws[0] = w0.clone()
    got = reductions.offset_reductions(w0, ws, *layout)
    assert_bits(got, torch_reference(w0, ws))
    assert got[0][0] == 0 and not np.signbit(got[0][0]) and got[1][0] == 0 and not np.signbit(got[1][0])


def test_windows_give_the_bits_of_one_pass(layout, monkeypatch):
    """The inputs' pages are released window by window; windows of a few rows (not a multiple of the level
    step) carry the cascade across calls."""
    w0, ws = models(70_001, 3, seed=3)
    want = torch_reference(w0, ws)
    monkeypatch.setattr(kernels, "WINDOW", 4 * layout[0] * 7)
    assert_bits(reductions.offset_reductions(w0, ws, *layout), want)


def test_fits_only_where_torch_reduces_on_one_thread():
    w0, ws = models(reductions._GRAIN + 1, 2, seed=4)
    assert reductions.fits(w0, ws)
    assert not reductions.fits(w0.double(), [w.double() for w in ws])
    assert not reductions.fits(w0, ws[:1])  # no pair
    assert not reductions.fits(w0[:100], [w[:100] for w in ws])  # too small to pay
    assert not reductions.fits(w0.view(1, -1), ws)  # a row, not flat
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not reductions.fits(w0, ws)  # torch would split the sums between threads
        assert reductions.fits(w0[:reductions._GRAIN - 1], [w[:reductions._GRAIN - 1] for w in ws])
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 1001), (50_003,)])
def test_model_stock_takes_the_fused_pass_with_the_old_bits(shape, dtype, monkeypatch):
    """model_stock (flat cosines) through the fused pass gives the bits of its torch path (the buffer fills and
    torch's reductions), and uses no tensor-sized buffer."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(shape, generator=g).to(dtype)
    ws = [(base.float() + 0.05 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]
    assert reductions.torch_layout() and reductions.bf16_matches()  # their probes run before the count
    calls = []
    real = reductions.offset_reductions
    monkeypatch.setattr(reductions, "offset_reductions", lambda *a: calls.append(1) or real(*a))
    fused = methods.model_stock(ws, base)
    assert calls == [1]
    monkeypatch.setattr(reductions, "fits", lambda *a, **k: False)
    old = methods.model_stock(ws, base)
    assert calls == [1]
    assert torch.equal(fused, old) and torch.equal(fused.signbit(), old.signbit())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096,), (4099,), (4125,), (4159,), (1000, 1003), (5, 200_003), (3, 3, 33_333)])
def test_masked_abs_sums_are_torchs_bits(layout, shape, dtype):
    """DARE's L1 rescale sums: ``|t - base|.sum()`` and ``(|t - base| * mask).sum()`` of float32 or bf16 tensors
    (bf16: each op rounded, vectors loaded as the sum of two halves) of any shape (torch reduces the contiguous
    whole as one row): tails, leftover vectors, several cascade levels."""
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g).to(dtype)
    t = (base.float() + 0.01 * torch.randn(shape, generator=g)).to(dtype)
    t.view(-1)[:9] = base.view(-1)[:9]  # zero deltas
    mask = torch.rand(shape, generator=g) < 0.3
    magnitude = (t - base).abs()
    want = (magnitude.sum(), (magnitude * mask).sum())
    got = reductions.masked_abs_sums(t, base, mask, layout[0])
    assert all(a.dtype == b.dtype == dtype and torch.equal(a, b) for a, b in zip(got, want))


def test_bf16_sums_give_way_to_torch_on_a_non_finite_delta(layout):
    """A bf16 |t - base| that is inf or NaN: None (the caller's torch path keeps torch's NaN bits)."""
    base = torch.zeros(10_000, dtype=torch.bfloat16)
    t = base.clone()
    t[-1] = float("inf")
    assert reductions.masked_abs_sums(t, base, torch.ones(10_000, dtype=torch.bool), layout[0]) is None
    assert reductions.bf16_matches()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_rescale_from_one_pass_keeps_the_old_bits(method, dtype, monkeypatch):
    """DARE's rescale from the fused sums (no |delta| tensor) gives the bits of the torch path."""
    g = torch.Generator().manual_seed(12)
    base = torch.randn(300, 1001, generator=g).to(dtype)
    ws = [(base.float() + 0.05 * torch.randn(300, 1001, generator=g)).to(dtype) for _ in range(3)]
    calls = []
    real = reductions.masked_abs_sums
    monkeypatch.setattr(reductions, "masked_abs_sums", lambda *a: calls.append(1) or real(*a))
    merge = methods.get(method)
    fused = merge(ws, base, weight=[0.5, 0.3, 0.2], density=[0.4] * 3, seed=3)
    assert len(calls) == 3
    monkeypatch.setattr(reductions, "fits", lambda *a, **k: False)
    old = merge(ws, base, weight=[0.5, 0.3, 0.2], density=[0.4] * 3, seed=3)
    assert len(calls) == 3
    assert torch.equal(fused, old) and torch.equal(fused.signbit(), old.signbit())


def test_bf16_dare_with_an_infinite_delta_takes_torchs_path_whole(monkeypatch):
    """The fused sums decline (inf |delta|): the factor comes from torch's |delta| tensor, the same bits as with
    the fused path switched off."""
    g = torch.Generator().manual_seed(13)
    base = torch.randn(50_000, generator=g).bfloat16()
    ws = [(base.float() + 0.05 * torch.randn(50_000, generator=g)).bfloat16() for _ in range(2)]
    ws[0][7] = float("inf")
    merge = methods.get("dare_linear")
    fused = merge(ws, base, weight=[0.5, 0.5], density=[0.5] * 2, seed=1)
    monkeypatch.setattr(reductions, "fits", lambda *a, **k: False)
    old = merge(ws, base, weight=[0.5, 0.5], density=[0.5] * 2, seed=1)
    assert torch.equal(fused.view(torch.int16), old.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [4096, 4099, 4125, 100_003, 1 << 20])
def test_quotient_product_sum_is_torchs_bits(layout, n, dtype):
    """slerp's per-chunk dot: ``(a / |a| * b / |b|).sum()`` with torch's div, div, mul and cascade sum (sizes with
    and without a tail or leftover vectors: a float64 tail once made the lanes' adds float64); bf16 chunks as
    slerp reduces them, their float32 copies."""
    g = torch.Generator().manual_seed(n)
    a = (1.0 + 0.02 * torch.randn(n, generator=g)).to(dtype)
    b = (a.float() + 0.1 * torch.randn(n, generator=g)).to(dtype)
    norm_a, norm_b = torch.linalg.vector_norm(a.float()), torch.linalg.vector_norm(b.float())
    want = (torch.div(a.float(), norm_a) * torch.div(b.float(), norm_b)).sum()
    got = reductions.quotient_product_sum(a, b, float(norm_a), float(norm_b), layout[0])
    assert np.float32(got).view(np.int32) == want.numpy().view(np.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [4096, 4099, 4111, 100_003, 1 << 20])
def test_two_norms_are_torchs_bits(layout, n, dtype):
    """slerp's per-chunk norms of both models in one pass: torch's float32 ``vector_norm`` bits (of bf16 chunks'
    float32 copies), with and without tail entries, signed zeros and a zero chunk."""
    g = torch.Generator().manual_seed(n + 1)
    a = (0.02 * torch.randn(n, generator=g)).to(dtype)
    b = (a.float() + 0.1 * torch.randn(n, generator=g)).to(dtype)
    a[:5] = -0.0
    for x, y in ((a, b), (b, a), (a, torch.zeros_like(a))):
        got = reductions.two_norms(x, y, *layout)
        want = [torch.linalg.vector_norm(t.float().reshape(1, -1), dim=1, keepdim=True).reshape(()) for t in (x, y)]
        assert got.dtype == np.float32
        assert [v.view(np.int32) for v in got] == [w.numpy().view(np.int32) for w in want]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slerp_takes_the_fused_norms_and_dot_with_mergekits_bits(monkeypatch, dtype):
    """Each 1 M-entry chunk's dot (and a bf16 chunk's norms) from the fused passes, the short last chunk too:
    MergeKit's slerp bits."""
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    g = torch.Generator().manual_seed(21)
    a = (1.0 + 0.02 * torch.randn(2 * (1 << 20) + 40_001, generator=g)).to(dtype)
    b = (a.float() + 0.1 * torch.randn(a.numel(), generator=g)).to(dtype)
    calls = []
    for name in ("quotient_product_sum", "two_norms"):
        real = getattr(reductions, name)
        monkeypatch.setattr(reductions, name, lambda *x, _f=real, _n=name: calls.append(_n) or _f(*x))
    expected = mergekit_slerp(torch.tensor([0.3]), a.reshape(1, -1), b.reshape(1, -1)).reshape(-1).to(dtype)
    assert torch.equal(methods.get("slerp")([b], a, t=0.3), expected)
    assert sorted(calls) == ["quotient_product_sum"] * 3 + ["two_norms"] * (3 if dtype == torch.bfloat16 else 0)
