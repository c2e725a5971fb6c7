"""TSV-M, Iso-C, Iso-CTS against float64 numpy re-implementations of the papers' formulas and their
closed-form properties; through a recipe and `mergescope merge`; one-line errors for bad parameters.
(FusionBench's own code is compared in bench/fusionbench_parity.py: it is not installed here.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergescope as ms
from mergescope.cli import main
from mergescope.errors import MergescopeError
from mergescope.io import load
from mergescope.merge.svd_methods import cts_split

RNG = np.random.default_rng(0)


def _models(shape, n, seed=0, scale=0.1):
    g = np.random.default_rng(seed)
    base = g.standard_normal(shape)
    return base, [base + scale * g.standard_normal(shape) for _ in range(n)]


def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _run(name, base, fts, **params):
    return ms.methods.get(name)([_t(f) for f in fts], _t(base), **params).numpy()


# ------------------------------------------------------------------ numpy references (float64)

def np_polar(a):
    """The orthogonal polar factor by the closed form a (a^T a)^(-1/2) (an eigendecomposition, not an SVD)."""
    w, q = np.linalg.eigh(a.T @ a)
    return a @ (q / np.sqrt(w)) @ q.T


def np_tsv(base, fts, alpha=1.0, weight=None):
    taus = [(1.0 if weight is None else w) * (f - base) for f, w in zip(fts, weight or [1.0] * len(fts))]
    k = min(base.shape) // len(taus)
    svds = [np.linalg.svd(t, full_matrices=False) for t in taus]
    u = np.concatenate([s[0][:, :k] for s in svds], axis=1)
    sig = np.concatenate([s[1][:k] for s in svds])
    vt = np.concatenate([s[2][:k] for s in svds], axis=0)
    return base + alpha * np_polar(u) @ np.diag(sig) @ np_polar(vt.T).T


def np_iso_c(base, fts, alpha=1.0):
    u, s, vt = np.linalg.svd(sum(f - base for f in fts), full_matrices=False)
    return base + alpha * s.mean() * u @ vt


def np_iso_cts(base, fts, fraction, alpha=1.0):
    taus = [f - base for f in fts]
    r, n = min(base.shape), len(taus)
    common = r - round((r - int(r * fraction)) / n) * n
    per = (r - common) // n
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    uc = u[:, :common]
    us, ss, vts = [], [], []
    for t in taus:
        a, b, c = np.linalg.svd(t - uc @ uc.T @ t, full_matrices=False)
        us.append(a[:, :per])
        ss.append(b[:per])
        vts.append(c[:per])
    uu = np_polar(np.concatenate([*us, uc], axis=1))
    vv = np_polar(np.concatenate([*vts, vt[:common]], axis=0).T).T
    return base + alpha * np.concatenate([*ss, s[:common]]).mean() * uu @ vv


# ------------------------------------------------------------------ against the references

@pytest.mark.parametrize("shape, n", [((12, 9), 3), ((7, 16), 2), ((20, 20), 4)])
def test_tsv_matches_numpy(shape, n):
    base, fts = _models(shape, n, seed=sum(shape) + n)
    np.testing.assert_allclose(_run("tsv", base, fts), np_tsv(base, fts), atol=1e-10)
    np.testing.assert_allclose(_run("tsv", base, fts, alpha=0.7, weight=[1.0, 0.5, 2.0, 1.5][:n]),
                               np_tsv(base, fts, 0.7, [1.0, 0.5, 2.0, 1.5][:n]), atol=1e-10)


@pytest.mark.parametrize("shape, n", [((12, 9), 3), ((7, 16), 2)])
def test_iso_c_matches_numpy(shape, n):
    base, fts = _models(shape, n, seed=7)
    np.testing.assert_allclose(_run("iso_c", base, fts, alpha=1.3), np_iso_c(base, fts, 1.3), atol=1e-10)


@pytest.mark.parametrize("shape, n, fraction", [((12, 9), 3, 0.8), ((16, 10), 2, 0.5), ((10, 10), 3, 0.8),
                                                ((9, 14), 4, 0.0)])
def test_iso_cts_matches_numpy(shape, n, fraction):
    base, fts = _models(shape, n, seed=11)
    np.testing.assert_allclose(_run("iso_cts", base, fts, common_space_fraction=fraction, alpha=0.9),
                               np_iso_cts(base, fts, fraction, 0.9), atol=1e-10)


# ------------------------------------------------------------------ closed-form properties

def test_iso_c_flat_spectrum_same_singular_vectors():
    base, fts = _models((15, 11), 3, seed=3)
    delta = _run("iso_c", base, fts) - base
    u, s, vt = np.linalg.svd(sum(f - base for f in fts), full_matrices=False)
    np.testing.assert_allclose(np.linalg.svd(delta, compute_uv=False), np.full(11, s.mean()), rtol=1e-10)
    np.testing.assert_allclose(u.T @ delta @ vt.T, s.mean() * np.eye(11), atol=1e-10)  # same singular vectors


def _orthogonal_tasks(m, n, ranks, seed=0):
    """Task matrices with mutually orthogonal column and row spaces (no interference at all)."""
    g = np.random.default_rng(seed)
    q_left = np.linalg.qr(g.standard_normal((m, m)))[0]
    q_right = np.linalg.qr(g.standard_normal((n, n)))[0]
    taus, at = [], 0
    for r in ranks:
        s = np.sort(g.uniform(0.5, 2.0, r))[::-1]
        taus.append(q_left[:, at:at + r] @ np.diag(s) @ q_right[:, at:at + r].T)
        at += r
    return taus


def test_tsv_is_task_arithmetic_for_orthogonal_low_rank_tasks():
    base = RNG.standard_normal((12, 9))
    # each rank == 9 // 3 (a smaller rank would keep null-space vectors, arbitrary and not orthogonal to the
    # other tasks'): nothing truncated, nothing to orthogonalise
    taus = _orthogonal_tasks(12, 9, [3, 3, 3])
    merged = _run("tsv", base, [base + t for t in taus])
    np.testing.assert_allclose(merged, base + sum(taus), atol=1e-10)


def test_tsv_keeps_top_fraction_and_orthogonal_bases():
    base = np.zeros((10, 8))
    one = _run("tsv", base, [RNG.standard_normal((10, 8))])  # one task: all its triplets, unchanged
    g = np.random.default_rng(5)
    tau = g.standard_normal((10, 8))
    np.testing.assert_allclose(_run("tsv", base, [tau]), tau, atol=1e-10)
    assert one.shape == (10, 8)
    # two tasks: each keeps its top 8 // 2 = 4 triplets; with orthogonal full-rank tasks, that is the sum of
    # each task's rank-4 truncation
    taus = _orthogonal_tasks(10, 8, [4, 4], seed=2)
    noise = [t + 1e-3 * q for t, q in zip(taus, _orthogonal_tasks(10, 8, [4, 4], seed=9))]
    merged = _run("tsv", base, noise)
    trunc = []
    for t in noise:
        u, s, vt = np.linalg.svd(t)
        trunc.append(u[:, :4] @ np.diag(s[:4]) @ vt[:4])
    # the merged matrix's singular values are exactly the kept ones (orthogonalisation keeps S)
    kept = np.sort(np.concatenate([np.linalg.svd(t, compute_uv=False)[:4] for t in noise]))[::-1]
    np.testing.assert_allclose(np.linalg.svd(merged, compute_uv=False), kept, rtol=1e-10)
    assert np.linalg.norm(merged - sum(trunc)) < 0.05 * np.linalg.norm(sum(trunc))


def test_iso_cts_full_common_space_is_iso_c_and_isotropic():
    base, fts = _models((14, 10), 3, seed=4)
    np.testing.assert_allclose(_run("iso_cts", base, fts, common_space_fraction=1.0), _run("iso_c", base, fts),
                               atol=1e-10)
    delta = _run("iso_cts", base, fts, common_space_fraction=0.5) - base
    s = np.linalg.svd(delta, compute_uv=False)
    np.testing.assert_allclose(s, np.full_like(s, s[0]), rtol=1e-10)  # orthogonal bases: a flat spectrum


@pytest.mark.parametrize("rank, n, fraction, expected", [(10, 3, 0.8, (7, 1)), (768, 8, 0.8, (616, 19)),
                                                        (9, 2, 0.0, (1, 4)), (2, 3, 0.0, (2, 0))])
def test_cts_split(rank, n, fraction, expected):
    assert cts_split(rank, n, fraction) == expected
    common, per = expected
    assert common + n * per == rank


def test_non_matrix_tensors_fall_back_to_mean_task_vector():
    base, fts = _models((6,), 3, seed=1)
    mean = np.mean([f - base for f in fts], axis=0)
    for name in ("tsv", "iso_c", "iso_cts"):
        np.testing.assert_allclose(_run(name, base, fts, alpha=2.0), base + 2.0 * mean, atol=1e-12)
    base3, fts3 = _models((2, 3, 4), 2, seed=2)
    np.testing.assert_allclose(_run("iso_c", base3, fts3), base3 + np.mean([f - base3 for f in fts3], 0), atol=1e-12)
    small, tiny = _models((2, 5), 3, seed=3)  # rank 2 < 3 tasks: TSV cannot give each a triplet
    np.testing.assert_allclose(_run("tsv", small, tiny), small + np.mean([f - small for f in tiny], 0), atol=1e-12)


def test_low_precision_inputs_keep_their_dtype():
    base, fts = _models((8, 6), 2, seed=6)
    for name in ("tsv", "iso_c", "iso_cts"):
        out = ms.methods.get(name)([_t(f).to(torch.bfloat16) for f in fts], _t(base).to(torch.bfloat16))
        assert out.dtype == torch.bfloat16
        ref = _run(name, base, fts)
        assert np.abs(out.double().numpy() - ref).max() < 0.05


@pytest.mark.parametrize("name, params, message", [
    ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
    ("tsv", {"alpha": float("nan")}, "alpha"),
    ("iso_c", {"alpha": float("inf")}, "alpha"),
])
def test_bad_parameters(name, params, message):
    base, fts = _models((4, 4), 2)
    with pytest.raises(MergescopeError, match=message):
        _run(name, base, fts, **params)


def test_non_finite_task_matrix_is_one_line():
    base = torch.zeros(4, 3)
    fts = [torch.full((4, 3), 2e38), torch.full((4, 3), 2e38)]  # the sum overflows float32
    for name, params in (("tsv", {"weight": [1.0, 10.0]}), ("iso_c", {}), ("iso_cts", {})):
        with pytest.raises(MergescopeError, match="not finite"):
            ms.methods.get(name)(fts, base, **params)


def test_needs_base_and_same_shapes():
    with pytest.raises(MergescopeError, match="base"):
        ms.methods.get("tsv")([torch.ones(3, 3)], None)
    with pytest.raises(MergescopeError, match="shapes"):
        ms.methods.get("iso_c")([torch.ones(3, 3), torch.ones(3, 4)], torch.ones(3, 3))


# ------------------------------------------------------------------ recipes and the CLI

@pytest.fixture
def checkpoints(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(12, 8, generator=g), "b": torch.randn(8, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    for name, state in [("base", base), ("a", fts[0]), ("b", fts[1])]:
        ms.save(state, tmp_path / f"{name}.safetensors")
    return base, fts


@pytest.mark.parametrize("method, params", [("tsv", {"alpha": 0.8}), ("iso_c", {"alpha": 1.2}),
                                            ("iso_cts", {"alpha": 1.0, "common_space_fraction": 0.5})])
def test_cli_merge_recipe(checkpoints, tmp_path, method, params):
    base, fts = checkpoints
    shown = ", ".join(f"{k}: {v}" for k, v in params.items())
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: {method}\nbase_model: {tmp_path}/base.safetensors\nparameters: {{{shown}}}\n"
                      f"models:\n  - model: {tmp_path}/a.safetensors\n  - model: {tmp_path}/b.safetensors\n")
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(recipe), str(out)]) == 0
    merged = load(out)
    for k in base:
        expected = ms.methods.get(method)([f[k] for f in fts], base[k], **params)
        assert torch.equal(merged[k], expected), k
    ref = {"tsv": lambda b, f: np_tsv(b, f, 0.8), "iso_c": lambda b, f: np_iso_c(b, f, 1.2),
           "iso_cts": lambda b, f: np_iso_cts(b, f, 0.5)}[method]
    w = ref(base["w"].double().numpy(), [f["w"].double().numpy() for f in fts])
    assert np.abs(merged["w"].double().numpy() - w).max() < 1e-5


def test_cli_bad_parameter_is_one_line(checkpoints, tmp_path, capsys):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: iso_cts\nbase_model: {tmp_path}/base.safetensors\n"
                      "parameters: {common_space_fraction: 2.0}\n"
                      f"models:\n  - model: {tmp_path}/a.safetensors\n  - model: {tmp_path}/b.safetensors\n")
    assert main(["merge", str(recipe), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "common_space_fraction" in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()
