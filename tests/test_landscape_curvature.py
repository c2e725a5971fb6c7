"""Curvature against closed forms (quadratic toy) and a finite-difference Hessian of a real MLP."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import mergescope as ms
from mergescope.landscape.curvature import HessianOperator
from mergescope.tasks import digits
from test_landscape_toys import RegressionTask, linear_model, template, trained, trained_tanh

torch.set_num_threads(1)


def gradient64(model, params: np.ndarray, task) -> np.ndarray:
    """Gradient of the mean task loss in float64 at flat ``params`` (reference for finite differences)."""
    net = copy.deepcopy(model).double().eval()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(params), net.parameters())
    x, y = next(task.batches("train"))
    loss = task.loss(net(x.double()), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))]).numpy()


def fd_hessian(model, state, task, eps=1e-4) -> np.ndarray:
    """Central finite differences of float64 gradients, column by column; symmetrized."""
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    w = torch.nn.utils.parameters_to_vector(net.parameters()).double().detach().numpy()
    cols = []
    for i in range(len(w)):
        e = np.zeros_like(w)
        e[i] = eps
        cols.append((gradient64(net, w + e, task) - gradient64(net, w - e, task)) / (2 * eps))
    h = np.stack(cols, 1)
    return (h + h.T) / 2


def test_quadratic_toy_eigenvalues_match_closed_form():
    toy, model = RegressionTask(), linear_model()
    exact = np.linalg.eigvalsh(toy.hessian())[::-1]
    lz = ms.landscape.hessian_eigenvalues(model, model.state_dict(), toy, k=3)
    assert np.allclose(lz.eigenvalues, exact[:3], rtol=1e-5)
    pw = ms.landscape.hessian_eigenvalues(model, model.state_dict(), toy, k=2, method="power", tol=1e-9, iters=2000)
    assert np.allclose(pw.eigenvalues, exact[:2], rtol=1e-3)


def test_quadratic_hessian_is_the_same_everywhere_including_the_known_minimum():
    toy, model = RegressionTask(batch_size=40), linear_model()  # three uneven batches
    w_star = toy.minimum()
    at_min = {"0.weight": torch.tensor(w_star[:-1][None], dtype=torch.float32),
              "0.bias": torch.tensor(w_star[-1:], dtype=torch.float32)}
    op = HessianOperator(model, at_min, toy)
    full = op.matvec(torch.eye(op.dim)).numpy()
    assert np.allclose(full, toy.hessian(), rtol=1e-5, atol=1e-5)
    x, y = toy.x, toy.y
    net = copy.deepcopy(model)
    net.load_state_dict(at_min)
    loss = toy.loss(net(x), y)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    assert max(float(g.abs().max()) for g in grads) < 1e-4  # it is the minimum


def test_hutchinson_trace_is_within_its_standard_error():
    toy, model = RegressionTask(), linear_model()
    exact = np.trace(toy.hessian())
    tr = ms.landscape.hessian_trace(model, model.state_dict(), toy, samples=400, seed=3)
    assert abs(tr.trace - exact) < 4 * tr.stderr
    assert abs(tr.trace - exact) / exact < 0.05
    # Rademacher variance is 2 * sum_{i != j} H_ij^2 per probe.
    h = toy.hessian()
    expected_se = np.sqrt(2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2)) / 400)
    assert tr.stderr == pytest.approx(expected_se, rel=0.25)


def test_smooth_mlp_top_eigenvalues_match_finite_difference_hessian():
    task = digits()
    model, state = template("tanh"), trained_tanh(0)
    exact = np.linalg.eigvalsh(fd_hessian(model, state, task))[::-1]
    lz = ms.landscape.hessian_eigenvalues(model, state, task, k=3)
    assert np.allclose(lz.eigenvalues, exact[:3], rtol=2e-3)
    tight = ms.landscape.hessian_eigenvalues(model, state, task, k=3, tol=1e-8)
    assert np.allclose(tight.eigenvalues, exact[:3], rtol=1e-5)
    pw = ms.landscape.hessian_eigenvalues(model, state, task, k=1, method="power", tol=1e-7)
    assert pw.eigenvalues[0] == pytest.approx(exact[0], rel=5e-3)
    tr = ms.landscape.hessian_trace(model, state, task, samples=256)
    assert abs(tr.trace - exact.sum()) < 4 * tr.stderr


def test_default_tolerance_bounds_every_one_of_five_eigenvalues():
    """The default stop (residual <= tol |value|) is a guaranteed bound, also for interior eigenvalues
    (the old sqrt(tol) rule stopped early and was off by 5% on a clustered 5th one)."""
    task = digits()
    model, state = template("tanh"), trained_tanh(0)
    exact = np.linalg.eigvalsh(fd_hessian(model, state, task))[::-1][:5]
    lz = ms.landscape.hessian_eigenvalues(model, state, task, k=5)
    assert lz.converged and lz.tol == 1e-3
    values, residuals = np.array(lz.eigenvalues), np.array(lz.residuals)
    assert np.all(residuals <= 1e-3 * np.abs(values))
    assert np.allclose(values, exact, rtol=1.5e-3)  # 1e-3 bound + the finite-difference reference's own error
    capped = ms.landscape.hessian_eigenvalues(model, state, task, k=5, tol=1e-12, iters=6)
    assert not capped.converged and capped.to_dict()["converged"] is False


def test_hvp_matches_finite_difference_of_gradients_and_batches_limit_data():
    task = digits()
    model, state = template("tanh"), trained_tanh(1)
    op = HessianOperator(model, state, task)
    recompute = HessianOperator(model, state, task, retain_graph=False)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    w = torch.nn.utils.parameters_to_vector(net.parameters()).double().detach().numpy()
    eps = 1e-4
    fd = (gradient64(net, w + eps * v.numpy(), task) - gradient64(net, w - eps * v.numpy(), task)) / (2 * eps)
    assert np.allclose(op.matvec(v[None])[0].numpy(), fd, rtol=1e-3, atol=1e-4)
    assert np.allclose(recompute.matvec(v[None])[0].numpy(), fd, rtol=1e-3, atol=1e-4)
    block = torch.stack([v, -2 * v, v.flip(0)])  # several vectors at once (batched double-backward)
    np.testing.assert_allclose(op.matvec(block).numpy(), recompute.matvec(block).numpy(), rtol=1e-4, atol=1e-6)
    small = dataclass_replace(task, eval_batch_size=100)
    assert ms.landscape.hessian_eigenvalues(model, state, small, batches=2).examples == 200


def dataclass_replace(task, **kw):
    import dataclasses

    return dataclasses.replace(task, **kw)


def test_curvature_leaves_caller_model_alone():
    model = template("mlp", width=8)
    model.train()
    before = copy.deepcopy(model.state_dict())
    ms.landscape.hessian_eigenvalues(model, trained("mlp", 0, width=8), digits(), k=1)
    ms.landscape.hessian_trace(model, trained("mlp", 0, width=8), digits(), samples=4)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
