"""CCA Merge (align/cca.py): CCA vs closed-form numpy/scipy and sklearn, exact recovery of permuted
and (for a linear network) linearly transformed copies, trained digits MLPs (2 and 3 models),
the registry and the CLI, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import mergescope as ms
from mergescope.align import (
    apply,
    permutation_spec,
    random_permutation,
    weight_matching,
)
from mergescope.align.cca import canonical, cca_merge, cca_merge_many, cca_transform
from mergescope.errors import MergescopeError
from mergescope.state import average, with_state

torch.set_num_threads(1)


def _correlated(n=4000, d=5, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    y = x @ rng.normal(size=(d, d)) + noise * rng.normal(size=(n, d))
    return x, y


def _covs(x, y):
    joint = np.cov(np.hstack([x, y]).T, bias=True)
    d = x.shape[1]
    return joint[:d, :d], joint[d:, d:], joint[:d, d:]


def test_canonical_correlations_equal_the_scipy_closed_form_and_sklearn():
    x, y = _correlated()
    s_aa, s_bb, s_ab = _covs(x, y)
    p_a, p_b, rho = canonical(s_aa, s_bb, s_ab)
    # independent closed form: scipy matrix square roots, singular values of the whitened cross-covariance
    ref = np.linalg.svd(np.linalg.inv(scipy.linalg.sqrtm(s_aa)) @ s_ab @ np.linalg.inv(scipy.linalg.sqrtm(s_bb)),
                        compute_uv=False)
    np.testing.assert_allclose(rho, ref.real, atol=1e-10)
    # the definition: canonical variables are white and pairwise correlated by rho only
    u, v = (x - x.mean(0)) @ p_a, (y - y.mean(0)) @ p_b
    np.testing.assert_allclose(u.T @ u / len(x), np.eye(5), atol=1e-9)
    np.testing.assert_allclose(v.T @ v / len(x), np.eye(5), atol=1e-9)
    np.testing.assert_allclose(u.T @ v / len(x), np.diag(rho), atol=1e-9)
    from sklearn.cross_decomposition import CCA

    xs, ys = CCA(n_components=5, max_iter=20000, tol=1e-12, scale=False).fit(x, y).transform(x, y)
    sk = [abs(np.corrcoef(xs[:, k], ys[:, k])[0, 1]) for k in range(5)]
    np.testing.assert_allclose(sk[:3], rho[:3], atol=1e-4)  # NIPALS: the leading pairs are tight


def test_transform_maps_b_onto_a_and_inverse_is_exact():
    x, _ = _correlated(noise=0.0)
    lin = np.random.default_rng(1).normal(size=(5, 5))
    y = x @ lin  # B's features are an invertible mix of A's
    t, t_inv, rho = cca_transform(*_covs(x, y))
    np.testing.assert_allclose(t, np.linalg.inv(lin), atol=1e-6)
    np.testing.assert_allclose(t @ t_inv, np.eye(5), atol=1e-8)
    np.testing.assert_allclose(rho, 1.0, atol=1e-8)
    # with noise, T is the least-squares-free CCA map: T = P_B P_A^{-1}
    x, y = _correlated()
    p_a, p_b, _ = canonical(*_covs(x, y), reg=0.1)
    t, t_inv, _ = cca_transform(*_covs(x, y), reg=0.1)
    np.testing.assert_allclose(t, p_b @ np.linalg.inv(p_a), atol=1e-8)
    np.testing.assert_allclose(t_inv, np.linalg.inv(t), atol=1e-8)


def _permuted_copy(model, spec, seed):
    copy = ms.tasks.build("mlp", width=32, depth=2, seed=99)
    copy.load_state_dict(apply(spec, random_permutation(spec, generator=torch.Generator().manual_seed(seed)),
                               model.state_dict()))
    return copy


def test_permuted_copies_merge_back_to_the_model(task):
    a = ms.tasks.build("mlp", width=32, depth=2, seed=0)
    ms.tasks.train(a, task, epochs=2, seed=0)
    spec = permutation_spec(a, torch.randn(2, 64))
    b, c = _permuted_copy(a, spec, 1), _permuted_copy(a, spec, 2)
    assert not torch.allclose(b.state_dict()["layers.0.weight"], a.state_dict()["layers.0.weight"])
    for merged in (cca_merge(spec, a, b, task.batches("train")).state,
                   cca_merge_many(spec, [a, b, c], task.batches("train")).state,
                   ms.align.get("cca")(spec, a, b, task=task).state):
        for k, v in a.state_dict().items():
            torch.testing.assert_close(merged[k], v, atol=1e-5, rtol=1e-5)
    x, _ = next(iter(task.batches("test")))
    torch.testing.assert_close(with_state(a, merged)(x), a(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, options", [("cnn", {}), ("resnet", {}), ("transformer", {})])
def test_permuted_zoo_copies_merge_back(task, name, options):
    """Conv channels through BatchNorm, residual streams, and attention heads (weight-matching fallback)."""
    a = ms.tasks.build(name, seed=0, **options)
    spec = permutation_spec(a, next(iter(task.batches("train")))[0][:8])
    b = ms.tasks.build(name, seed=5, **options)
    b.load_state_dict(apply(spec, random_permutation(spec, generator=torch.Generator().manual_seed(1)), a.state_dict()))
    result = ms.align.get("cca")(spec, a, b, task=task, reset_bn=False)
    assert result.info["aligned_by_cca"]
    assert bool(result.info["aligned_by_weights"]) == (name == "transformer")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(result.state[k], v, atol=1e-5, rtol=1e-5)


def _linear_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.Linear(16, 12), nn.Linear(12, 10))


def _mixed_copy(net, seed):
    """The same function with both hidden layers mixed by random invertible matrices (not permutations)."""
    g = torch.Generator().manual_seed(seed)
    m1 = torch.randn(16, 16, generator=g, dtype=torch.float64) + 4 * torch.eye(16, dtype=torch.float64)
    m2 = torch.randn(12, 12, generator=g, dtype=torch.float64) + 4 * torch.eye(12, dtype=torch.float64)
    s = {k: v.to(torch.float64) for k, v in net.state_dict().items()}
    new = {"0.weight": m1 @ s["0.weight"], "0.bias": m1 @ s["0.bias"],
           "1.weight": m2 @ s["1.weight"] @ torch.linalg.inv(m1), "1.bias": m2 @ s["1.bias"],
           "2.weight": s["2.weight"] @ torch.linalg.inv(m2), "2.bias": s["2.bias"]}
    copy = _linear_net(seed + 1)
    copy.load_state_dict({k: v.float() for k, v in new.items()})
    return copy


def test_linearly_mixed_copy_of_a_linear_network_merges_back(task):
    a = _linear_net(0)
    b = _mixed_copy(a, 1)
    x, _ = next(iter(task.batches("test")))
    torch.testing.assert_close(b(x), a(x), atol=1e-4, rtol=1e-4)  # same function, other basis
    spec = permutation_spec(a, torch.randn(2, 64))
    merged = cca_merge(spec, a, b, task.batches("train"), reg=0.0).state
    for k, v in a.state_dict().items():
        torch.testing.assert_close(merged[k], v, atol=1e-4, rtol=1e-4)
    # a permutation cannot undo the mix: weight matching's average is far from A (the test can fail)
    wm = average([a.state_dict(), apply(spec, weight_matching(spec, a.state_dict(), b.state_dict()), b.state_dict())])
    assert (wm["0.weight"] - a.state_dict()["0.weight"]).abs().max() > 0.1


@pytest.fixture(scope="module")
def trained(task):
    models = []
    for seed in (0, 1, 2):
        m = ms.tasks.build("mlp", width=64, depth=3, seed=seed)
        ms.tasks.train(m, task, epochs=20, seed=seed)
        models.append(m)
    return models


def _acc(task, template, state):
    return 100 * task.evaluate(with_state(template, state))["accuracy"]


def test_cca_merge_of_independent_mlps_beats_the_naive_average(task, trained):
    a, b = trained[:2]
    spec = permutation_spec(a, torch.randn(2, 64))
    sa, sb = a.state_dict(), b.state_dict()
    naive = _acc(task, a, average([sa, sb]))
    wm = _acc(task, a, average([sa, apply(spec, weight_matching(spec, sa, sb), sb)]))
    cca = _acc(task, a, ms.align.get("cca")(spec, a, b, task=task).state)
    ends = min(_acc(task, a, sa), _acc(task, b, sb))
    assert cca >= naive + 30, (naive, wm, cca)
    assert cca >= wm - 0.3, (wm, cca)  # at least weight matching, up to one test example (0.28 points)
    assert cca >= ends - 3.0, (ends, cca)


def test_three_models_all_to_one(task, trained):
    spec = permutation_spec(trained[0], torch.randn(2, 64))
    states = [m.state_dict() for m in trained]
    naive = _acc(task, trained[0], average(states))
    many = _acc(task, trained[0], ms.align.merge_many(spec, states).mean)
    result = cca_merge_many(spec, trained, task.batches("train", batch_size=512))
    cca = _acc(task, trained[0], result.state)
    assert cca >= naive + 40, (naive, cca)
    assert cca >= many - 2.0, (many, cca)
    assert len(result.states) == 3 and result.states[0] is not None
    assert set(result.info["aligned_by_cca"]) == set(spec.perms)
    # the reference choice changes the basis, not the quality
    other = _acc(task, trained[0], cca_merge_many(spec, trained, task.batches("train", batch_size=512),
                                                  reference=2).state)
    assert other >= naive + 40


def test_bad_inputs_are_one_line_errors(task):
    a = ms.tasks.build("mlp", width=32, depth=2, seed=0)
    spec = permutation_spec(a, torch.randn(2, 64))
    batches = list(task.batches("train"))
    cases = [
        (lambda: ms.align.get("cca")(spec, a, a), "needs data"),
        (lambda: ms.align.get("cca")(spec, a, a, task=task, gamma=1), "not gamma"),
        (lambda: cca_merge_many(spec, [a], batches), "at least 2 models"),
        (lambda: cca_merge_many(spec, [a, a], batches, reference=2), "reference=2"),
        (lambda: cca_merge_many(spec, [a, a], batches, reg=-1.0), "reg=-1.0"),
        (lambda: cca_merge_many(spec, [a, a], batches, reg=float("nan")), "reg=nan"),
        (lambda: cca_merge_many(spec, [a, a], batches, weights=[1.0]), "1 weights for 2 models"),
        (lambda: cca_merge_many(spec, [a, a.state_dict()], batches), "model 1 must be an nn.Module"),
        (lambda: cca_merge(spec, a, a, batches, alpha=1.5), "alpha=1.5"),
        (lambda: cca_merge(spec, a, a, []), "no batches"),
        (lambda: cca_merge(spec, a, ms.tasks.build("mlp", width=16, depth=2), batches), "size"),
    ]
    for call, message in cases:
        with pytest.raises(MergescopeError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_cli_align_method_cca_writes_the_api_merge(task, trained, tmp_path, capsys):
    from mergescope.cli import main
    from mergescope.io import load, save
    from mergescope.tasks.checkpoints import model_metadata

    paths = []
    for k, m in enumerate(trained[:2]):
        paths.append(tmp_path / f"m{k}.safetensors")
        save(m.state_dict(), paths[-1], metadata=model_metadata("mlp", {"width": 64, "depth": 3}))
    out = tmp_path / "merged.safetensors"
    assert main(["-q", "align", str(paths[0]), str(paths[1]), "-o", str(out), "--method", "cca"]) == 0
    spec = permutation_spec(trained[0], torch.randn(2, 64))
    expected = ms.align.get("cca")(spec, trained[0], trained[1], task=task).state
    got = dict(load(out))
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-6)
    assert main(["align", str(paths[0]), str(paths[1]), "-o", str(tmp_path / "x.safetensors"), "--method", "cca",
                 "--alpha", "2"]) == 2
    assert "Traceback" not in capsys.readouterr().err
