"""Merge methods against independent numpy re-implementations, closed forms and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.merge import methods as M

ISSUE_METHODS = ["linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_linear",
                 "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock",
                 "nearswap", "passthrough"]


def _models(n=3, shape=(40, 30), seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def _np(t):
    return t.double().numpy()


def _np_topk_mask(a, k):
    """Keep the k largest entries of a flat array, ties to the lower index (stable sort)."""
    order = np.argsort(-a, kind="stable")
    mask = np.zeros(a.size, dtype=bool)
    mask[order[:k]] = True
    return mask


def _np_ties(base, models, weights, densities, normalize=True):
    deltas = []
    for m, w, d in zip(models, weights, densities):
        delta = (m - base).ravel()
        keep = _np_topk_mask(np.abs(delta), max(1, int(d * delta.size))) if d < 1 else np.ones(delta.size, bool)
        deltas.append(w * delta * keep)
    deltas = np.stack(deltas)
    sign = np.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(deltas) == sign
    mixed = (deltas * agree).sum(0)
    divisor = (np.array(weights)[:, None] * agree).sum(0)
    divisor[divisor == 0] = 1
    return base + (mixed / divisor if normalize else mixed).reshape(base.shape)


def test_registry_has_every_method_of_the_issue():
    assert set(ISSUE_METHODS) <= set(M.names())
    assert ms.methods.get("ties") is M.REGISTRY["ties"]
    with pytest.raises(MergescopeError, match="unknown merge method 'tiez'.*ties"):
        M.get("tiez")


def test_linear_is_normalized_weighted_mean():
    base, models = _models()
    tensors = [base, *models]
    w = [1.0, 2.0, 0.5, 0.25]
    expected = sum(wi * _np(t) for wi, t in zip(w, tensors)) / sum(w)
    np.testing.assert_allclose(_np(M.get("linear")(tensors, weight=w)), expected, atol=1e-6)
    raw = M.get("linear")(tensors, weight=w, normalize=False)
    np.testing.assert_allclose(_np(raw), expected * sum(w), atol=1e-5)


def test_task_arithmetic_and_negation():
    base, models = _models()
    out = M.get("task_arithmetic")(models[:2], base, weight=[1.0, -0.5], **{"lambda": 0.8})
    expected = _np(base) + 0.8 * (_np(models[0]) - _np(base) - 0.5 * (_np(models[1]) - _np(base)))
    np.testing.assert_allclose(_np(out), expected, atol=1e-6)
    negated = M.get("task_arithmetic")([models[0]], base, weight=[-1.0])
    np.testing.assert_allclose(_np(negated), 2 * _np(base) - _np(models[0]), atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_numpy(normalize):
    base, models = _models(seed=3)
    w, d = [1.0, 0.6, 0.3], [0.5, 0.2, 0.9]
    out = M.get("ties")(models, base, weight=w, density=d, normalize=normalize)
    np.testing.assert_allclose(_np(out), _np_ties(_np(base), [_np(m) for m in models], w, d, normalize), atol=1e-6)


def test_ties_sign_election_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -1.0, 2.0, 0.0])
    b = torch.tensor([-3.0, -1.0, 1.0, 0.0])
    out = M.get("ties")([a, b], base, weight=[1.0, 1.0], density=[1.0, 1.0])
    # entry 0: sum -2 -> negative wins, only b; 1: both agree; 2: both agree; 3: nothing -> 0
    assert out.tolist() == [-3.0, -1.0, 1.5, 0.0]


def test_breadcrumbs_drops_outliers_and_small():
    base = torch.zeros(100)
    delta = torch.arange(1, 101, dtype=torch.float32)  # |delta| ranks are the values
    out = M.get("breadcrumbs")([delta], base, weight=[1.0], density=[0.5], gamma=[0.1])
    kept = (out != 0).nonzero().reshape(-1) + 1
    assert kept.tolist() == list(range(41, 91))  # top 10 dropped, bottom 40 dropped, 50 kept


def test_dare_is_seeded_and_rescales_l1():
    base, models = _models(n=1, shape=(200, 100))
    fn = M.get("dare_linear")
    a = fn(models, base, weight=[1.0], density=[0.3], seed=7)
    assert torch.equal(a, fn(models, base, weight=[1.0], density=[0.3], seed=7))
    assert not torch.equal(a, fn(models, base, weight=[1.0], density=[0.3], seed=8))
    delta, kept = _np(models[0] - base), _np(a - base)
    assert abs((kept != 0).mean() - 0.3) < 0.02
    np.testing.assert_allclose(np.abs(kept).sum(), np.abs(delta).sum(), rtol=1e-5)  # L1 norm restored
    nz = kept != 0
    factor = np.abs(delta).sum() / np.abs(delta[nz]).sum()  # one factor per tensor
    np.testing.assert_allclose(kept, delta * nz * factor, atol=2e-5)
    assert torch.equal(fn(models, base, weight=[1.0], density=[1.0]), M.get("task_arithmetic")(models, base, weight=[1.0]))


def test_della_keeps_large_entries_more_often():
    base = torch.zeros(50, 400)
    delta = torch.arange(400, dtype=torch.float32).repeat(50, 1) + 1
    out = M.get("della_linear")([delta], base, weight=[1.0], density=[0.5], epsilon=[0.3], rescale=False, seed=0)
    kept = (out != 0).float().mean(0)
    assert kept[:100].mean() < 0.35 and kept[-100:].mean() > 0.65  # p goes 0.2 -> 0.8 with rank
    with pytest.raises(MergescopeError, match="epsilon"):
        M.get("della")([delta], base, weight=[1.0], density=[0.9], epsilon=[0.2])


def test_slerp_closed_form_on_orthogonal_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = M.get("slerp")([b], a, t=1 / 3)
    np.testing.assert_allclose(out.numpy(), [np.cos(np.pi / 6), np.sin(np.pi / 6)], atol=1e-6)
    near = torch.tensor([1.0, 1e-3])  # |cos| > 0.9995: plain lerp
    np.testing.assert_allclose(M.get("slerp")([near], a, t=0.5).numpy(), [1.0, 5e-4], atol=1e-7)


def test_nuslerp_and_multislerp_reduce_to_slerp_of_two():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    out = M.get("nuslerp")([a, b], None, weight=[1.0, 1.0])
    np.testing.assert_allclose(out.numpy(), [np.sqrt(2), np.sqrt(2)], atol=1e-6)
    multi = M.get("multislerp")([a, b], None, weight=[1.0, 1.0])
    np.testing.assert_allclose(multi.numpy(), [np.sqrt(2), np.sqrt(2)], atol=1e-5)


def test_karcher_mean_of_symmetric_directions():
    u = [torch.tensor([np.cos(x), np.sin(x)], dtype=torch.float32) * r for x, r in ((0.3, 1.0), (-0.3, 3.0))]
    out = M.get("karcher")(u)
    np.testing.assert_allclose(out.numpy(), [2.0, 0.0], atol=1e-5)  # mean direction (1, 0), mean norm 2


def test_model_stock_closed_form():
    base, models = _models(n=3, seed=5)
    out = M.get("model_stock")(models, base)
    offsets = [(_np(m) - _np(base)).ravel() for m in models]
    cos = np.mean([o1 @ o2 / np.linalg.norm(o1) / np.linalg.norm(o2)
                   for i, o1 in enumerate(offsets) for o2 in offsets[i + 1:]])
    t = 3 * cos / (1 + 2 * cos)
    expected = t * np.mean([_np(m) for m in models], 0) + (1 - t) * _np(base)
    np.testing.assert_allclose(_np(out), expected, atol=1e-6)


def _model_stock_whole_tensor(ws, w0):
    """MergeKit 0.1.5's model_stock expression on whole tensors (the blocked version must give its bits)."""
    offsets = [w - w0 for w in ws]
    cos = torch.stack([((a * b).sum(-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
                       for i, a in enumerate(offsets) for b in offsets[i + 1:]]).mean(0).unsqueeze(-1)
    denom = 1 + (len(ws) - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), len(ws) * cos / torch.where(singular, torch.ones_like(denom), denom))
    return t * (sum(ws) / len(ws)) + (1 - t) * w0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(300_001,), (700, 513), (2, 3, 40_000), (40_000, 3)])
def test_model_stock_blocks_give_the_whole_tensor_bits(shape, dtype):
    g = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=g).to(dtype)
    base.view(-1)[:4] = -0.0  # signed zeros survive the same roundings
    models = [base + 0.1 * torch.randn(shape, generator=g).to(dtype) for _ in range(3)]
    models[0].view(-1)[:2] = -0.0
    flat = _model_stock_whole_tensor([m.reshape(-1) for m in models], base.reshape(-1)).reshape(shape)
    rows = _model_stock_whole_tensor(models, base)
    for filter_wise, expected in ((False, flat), (True, rows)):
        out = M.get("model_stock")(models, base, filter_wise=filter_wise)
        assert out.dtype == expected.dtype
        assert torch.equal(out, expected) and torch.equal(out.signbit(), expected.signbit())


@pytest.mark.parametrize("filter_wise", [False, True])
def test_bf16_model_stock_runs_the_bf16_loops(filter_wise, monkeypatch):
    """bf16 model_stock's operands and mix are the numba loops with torch's bf16 roundings (the bits: the test
    above), not torch's own bf16 ops."""
    from mergescope.merge import kernels

    calls = []
    for name in ("_bf16_offsets", "_bf16_stock_mix"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _k=kernel, _n=name: calls.append(_n) or _k(*a))
    monkeypatch.setattr(M, "_stock_fill", None)  # torch's operand path would fail
    from mergescope.merge import reductions

    monkeypatch.setattr(reductions, "fits", lambda *a, **k: False)  # the operand loops, not the fused cosines
    g = torch.Generator().manual_seed(4)
    base = torch.randn(300, 77, generator=g).bfloat16()
    models = [(base.float() + 0.1 * torch.randn(300, 77, generator=g)).bfloat16() for _ in range(3)]
    expected = _model_stock_whole_tensor(models if filter_wise else [m.reshape(-1) for m in models],
                                         base if filter_wise else base.reshape(-1)).reshape(base.shape)
    assert torch.equal(M.get("model_stock")(models, base, filter_wise=filter_wise).view(torch.int16),
                       expected.view(torch.int16))
    assert set(calls) == {"_bf16_offsets", "_bf16_stock_mix"}


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_writes_the_same_bits_into_out(filter_wise):
    """Into ``out`` (the engine's mapped output slot), twice on one thread (reused offset buffers): the same bits."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(700, 513, generator=g)
    models = [base + 0.1 * torch.randn(700, 513, generator=g) for _ in range(3)]
    expected = _model_stock_whole_tensor(models if filter_wise else [m.reshape(-1) for m in models],
                                         base if filter_wise else base.reshape(-1)).reshape(base.shape)
    for _ in range(2):
        out = torch.full_like(base, float("nan"))
        assert M.get("model_stock")(models, base, filter_wise=filter_wise, out=out) is out
        assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [7, 1_048_576, 2_500_003])
def test_slerp_gives_mergekit_bits(n, dtype):
    """MergeKit 0.1.5's own slerp (1 M-entry chunks for norms and dot) is the reference, one chunk and several."""
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    g = torch.Generator().manual_seed(n)
    a = (1.0 + 0.02 * torch.randn(n, generator=g)).to(dtype)
    b = (a.double() + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    expected = mergekit_slerp(torch.tensor([0.4]), a.reshape(1, -1), b.reshape(1, -1)).reshape(-1).to(dtype)
    assert torch.equal(M.get("slerp")([b], a, t=0.4), expected)
    out = torch.full_like(a, float("nan"))
    assert M.get("slerp")([b], a, t=0.4, out=out) is out and torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_slerp_mixes_in_the_fused_loop_with_mergekits_bits(dtype, monkeypatch):
    """The mix runs as one numba loop for float32/float64 (and bf16), signed zeros and a near-linear pair
    included; MergeKit's own slerp is the reference."""
    from mergekit.merge_methods.slerp import slerp as mergekit_slerp

    from mergescope.merge import kernels

    calls = []
    monkeypatch.setattr(kernels, "lerp", lambda *a, _f=kernels.lerp: calls.append(1) or _f(*a))
    g = torch.Generator().manual_seed(11)
    a = torch.randn(30_011, generator=g).to(dtype)
    a[:3] = -0.0
    for b in ((a.double() + 0.3 * torch.randn(30_011, generator=g, dtype=torch.float64)).to(dtype), a * 1.0001):
        b[:2] = -0.0
        expected = mergekit_slerp(torch.tensor([0.3]), a.reshape(1, -1), b.reshape(1, -1)).reshape(-1).to(dtype)
        got = M.get("slerp")([b], a, t=0.3)
        assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())
    assert len(calls) == 2


def test_nearswap_formula():
    a, b = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.05, 0.5, -2.0])
    out = M.get("nearswap")([b], a, t=0.1)
    w = np.clip(0.1 / np.abs(b.numpy()), 0, 1)
    np.testing.assert_allclose(out.numpy(), w * b.numpy(), atol=1e-7)


def test_sce_weights_by_energy():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, -2.0, 2.0])
    out = M.get("sce")([a, b], base)
    # weights mean(d^2): 1 and 4 -> 0.2, 0.8; entry 2 sum = -1 -> only b
    np.testing.assert_allclose(out.numpy(), [1.8, 1.8, -2.0, 1.8], atol=1e-6)


def test_passthrough_copies_or_scales():
    x = torch.randn(3, 3)
    assert torch.equal(M.get("passthrough")([x]), x)
    assert torch.equal(M.get("passthrough")([x], scale=[2.0]), 2 * x)


@pytest.mark.parametrize("name", ISSUE_METHODS)
def test_methods_do_not_modify_inputs(name):
    base, models = _models(n=3)
    before = [base.clone()] + [m.clone() for m in models]
    method = M.get(name)
    params = {"weight": [0.5] * 4, "density": [0.5] * 3, "t": 0.3, "scale": [1.5]}
    if name in ("slerp", "nearswap"):
        method(models[:1], base, t=0.3)
    elif name == "nuslerp":
        method(models[:2], base, weight=[0.5, 0.5])
    elif name == "passthrough":
        method([base], scale=[1.5])
    elif method.base == "ignored":
        method([base, *models], **{k: v for k, v in params.items() if k == "weight"})
    else:
        keep = {p.name for p in method.params} & {"weight", "density"}
        method(models, base, **{k: params[k][:3] for k in keep})
    for a, b in zip(before, [base, *models]):
        assert torch.equal(a, b), name


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.integers(0, 6), min_size=1, max_size=300), frac=st.floats(0, 1))
def test_top_k_mask_exact_count_and_ties_to_lower_index(values, frac):
    score = torch.tensor(values, dtype=torch.float32)
    k = int(frac * len(values))
    mask = M.top_k_mask(score, k)
    assert int(mask.sum()) == k
    assert np.array_equal(mask.numpy(), _np_topk_mask(score.numpy(), k))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300_000), seed=st.integers(0, 10_000), frac=st.floats(0, 1), ints=st.booleans())
def test_kth_largest_equals_kthvalue(n, seed, frac, ints):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 9, (n,), generator=g).float() if ints else torch.rand(n, generator=g)
    k = max(1, int(frac * n))
    assert M.kth_largest(score, k) == torch.kthvalue(score, n - k + 1).values


def test_bf16_inputs_give_bf16_output():
    base, models = _models()
    out = M.get("ties")([m.bfloat16() for m in models], base.bfloat16(), weight=[1, 1, 1], density=[0.5] * 3)
    assert out.dtype == torch.bfloat16


def test_slerp_is_accurate_on_large_tensors():
    """Norms and dot accumulate in float64: a float32 reduction over millions of entries is not enough."""
    g = torch.Generator().manual_seed(0)
    a = 1.0 + 0.02 * torch.randn(4_000_000, generator=g)
    b = a + 0.1 * torch.randn(4_000_000, generator=g)
    out = M.get("slerp")([b], a, t=0.4)
    x, y = _np(a), _np(b)
    theta = np.arccos(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    expected = (np.sin(0.6 * theta) * x + np.sin(0.4 * theta) * y) / np.sin(theta)
    np.testing.assert_allclose(_np(out), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["della", "della_linear", "dare_ties", "ties", "breadcrumbs"])
def test_zero_size_tensors_merge_to_zero_size(method):
    """A [0, 4] tensor (an empty buffer some checkpoints carry) merges without ranking anything."""
    ts = [torch.zeros(0, 4), torch.zeros(0, 4)]
    out = M.get(method)(ts, torch.zeros(0, 4), weight=[1.0, 1.0], density=[0.5, 0.5], seed=0)
    assert out.shape == (0, 4)


def _tied(n: int, seed: int, levels: int) -> torch.Tensor:
    """A float32 delta whose magnitudes take only ``levels`` values (exact ties everywhere), both signs."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(1, levels + 1, (n,), generator=g).float() * 2.0**-10
    return torch.where(torch.rand(n, generator=g) < 0.5, -values, values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [7, 100, 5_000, 300_000])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.9])
def test_tied_magnitude_masks_match_mergekit_bit_for_bit(n, density, dtype):
    """Exact ties at the TIES / breadcrumbs cut-off: the same entries kept as MergeKit's own sparsify
    (torch's unstable sort decides, not a lower/higher index rule: both occur on these tensors); half
    deltas as MergeKit ranks them (their float32 values), here from their 16-bit patterns."""
    mk = pytest.importorskip("mergekit.sparsify")
    delta = _tied(n, n, levels=5).to(dtype)
    ours = M.magnitude_mask(delta.abs(), density)
    theirs = mk.magnitude(delta, density) != 0
    assert torch.equal(ours, theirs)
    ours = M.outlier_mask(delta.abs(), density, gamma=0.05)
    theirs = mk.magnitude_outliers(delta, density, gamma=0.05) != 0
    assert torch.equal(ours, theirs)


def test_tie_order_is_not_a_simple_index_rule():
    """Why the exact sort is replayed: on large tensors torch's sort keeps neither always the lower nor
    always the higher of two tied indices (the docs used to say one or the other)."""
    delta = _tied(300_000, 0, levels=5)
    k = int(0.5 * delta.numel())
    theirs = torch.argsort(delta.abs(), descending=True)[:k]
    lower = torch.tensor(_np_topk_mask(delta.abs().numpy(), k))
    higher = torch.tensor(_np_topk_mask(delta.abs().flip(0).numpy(), k)).flip(0)
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[theirs] = True
    assert not torch.equal(mask, lower) and not torch.equal(mask, higher)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sce_variance_mask_matches_mergekit_under_ties(dtype):
    mk = pytest.importorskip("mergekit.merge_methods.sce")
    deltas = torch.stack([_tied(20_000, s, levels=3) for s in range(3)]).to(dtype)
    for density in (0.25, 0.5, 0.8):
        theirs = mk.sce_mask(deltas, density, torch.bool)
        assert torch.equal(M._variance_mask(deltas, density), theirs)


def test_untied_masks_do_not_sort():
    """Without ties at the cut the O(n) selection is used: ``tie_order`` is never called."""
    score = torch.randperm(10_000).float()

    def boom():
        raise AssertionError("sorted although nothing ties")

    assert int(M.top_k_mask(score, 1234, boom).sum()) == 1234
