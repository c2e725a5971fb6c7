"""Bezier / polychain curves: closed-form geometry, training lowers the path loss, alignment helps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergescope as ms
from mergescope.landscape.curves import curve_points, curve_weights
from mergescope.tasks import digits
from test_landscape_toys import RegressionTask, linear_model, template, trained

torch.set_num_threads(1)
TASK = digits()


def test_curve_geometry_matches_closed_forms():
    g = torch.Generator().manual_seed(0)
    a, th, b = ({"w": torch.randn(3, 2, generator=g)} for _ in range(3))
    ts = [0.0, 0.25, 0.5, 0.8, 1.0]
    bez = curve_points("bezier", a, th, b, ts)["w"].numpy()
    poly = curve_points("polychain", a, th, b, ts)["w"].numpy()
    A, T, B = a["w"].numpy(), th["w"].numpy(), b["w"].numpy()
    for i, t in enumerate(ts):
        np.testing.assert_allclose(bez[i], (1 - t) ** 2 * A + 2 * t * (1 - t) * T + t ** 2 * B, atol=1e-6)
        expect = A + 2 * t * (T - A) if t < 0.5 else T + (2 * t - 1) * (B - T)
        np.testing.assert_allclose(poly[i], expect, atol=1e-6)
    assert torch.allclose(curve_weights("bezier", torch.linspace(0, 1, 9)).sum(1), torch.ones(9))
    with pytest.raises(ms.MergescopeError, match="kind"):
        curve_weights("spline", torch.zeros(1))


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_untrained_curve_is_the_line(kind):
    # With the bend at the midpoint both parametrizations trace the segment A-B.
    a, b = trained("mlp", 0, width=32), trained("mlp", 1, width=32)
    r = ms.landscape.fit_curve(template("mlp", width=32), a, b, TASK, kind=kind, epochs=0, n=5)
    np.testing.assert_allclose(r.curve.loss, r.line.loss, rtol=1e-5)
    assert r.to_dict()["barrier_loss"] == pytest.approx(r.line.barrier_loss, rel=1e-5)


def test_training_the_bend_on_a_quadratic_finds_the_closed_form_optimum():
    # For L(w) = (w - w*)^T H (w - w*) + const, E_t L(phi(t)) with t ~ U(0,1) is minimized by
    # theta* = w* - (E[c0 c1] a + E[c1 c2] b) / E[c1^2] with a = A - w*, b = B - w*;
    # E[c0 c1] = E[c1 c2] = 1/10 and E[c1^2] = 2/15, so theta* = w* - 0.75 (a + b).
    toy, model = RegressionTask(), linear_model()
    w_star = toy.minimum()
    a_off, b_off = np.full(7, 1.0), np.zeros(7)
    b_off[:3] = -0.5
    state = lambda w: {"0.weight": torch.tensor(w[None, :-1], dtype=torch.float32),  # noqa: E731
                       "0.bias": torch.tensor(w[-1:], dtype=torch.float32)}
    r = ms.landscape.fit_curve(model, state(w_star + a_off), state(w_star + b_off), toy, epochs=400, lr=2e-2,
                               batch_size=96, split="train", n=5)
    theta_star = w_star - 0.75 * (a_off + b_off)
    start = w_star + (a_off + b_off) / 2
    bend = np.concatenate([r.bend["0.weight"].numpy().ravel(), r.bend["0.bias"].numpy()])
    assert np.linalg.norm(bend - theta_star) < 0.1 * np.linalg.norm(start - theta_star)
    assert r.curve.loss[2] < r.line.loss[2]


def toy_mse(toy, w):
    x, y = toy.x.double().numpy(), toy.y.double().numpy()
    return float(np.mean((x @ w[:-1] + w[-1] - y) ** 2))


def test_aligned_curve_beats_unaligned_curve_and_line():
    a, b = trained("mlp", 0, width=64, epochs=8), trained("mlp", 1, width=64, epochs=8)
    model = template("mlp", width=64)
    plain = ms.landscape.fit_curve(model, a, b, TASK, epochs=1, n=11)
    assert plain.barrier_loss < plain.line.barrier_loss  # training helps at all
    for how in ("weight", "activation"):
        aligned = ms.landscape.fit_curve(model, a, b, TASK, epochs=1, n=11, align=how)
        assert aligned.barrier_loss < plain.line.barrier_loss / 5
        assert aligned.barrier_loss < plain.barrier_loss
        # Alignment permutes neurons only: the aligned B computes the same function as B.
        assert aligned.aligned_line.loss[-1] == pytest.approx(plain.line.loss[-1], rel=1e-5)
        assert aligned.aligned_line.loss[0] == pytest.approx(plain.line.loss[0], rel=1e-6)


def test_curve_with_batchnorm_reports_naive_variant_and_leaves_model_alone():
    a, b = trained("cnn", 0, width=4, epochs=2), trained("cnn", 1, width=4, epochs=2)
    model = template("cnn", width=4)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = ms.landscape.fit_curve(model, a, b, TASK, epochs=1, n=3)
    assert r.curve.naive_loss is not None and len(r.train_loss) == 1
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_pam_with_zero_step_is_weight_alignment_and_large_steps_keep_function():
    # eta = 0: the PAM target is B' itself, whose best permutation is the current one.
    a, b = trained("mlp", 0, width=64, epochs=8), trained("mlp", 1, width=64, epochs=8)
    model = template("mlp", width=64)
    weight = ms.landscape.fit_curve(model, a, b, TASK, epochs=2, n=5, align="weight")
    still = ms.landscape.fit_curve(model, a, b, TASK, epochs=2, n=5, align="pam", pam_step=0.0)
    np.testing.assert_allclose(still.curve.loss, weight.curve.loss, rtol=1e-6)
    moved = ms.landscape.fit_curve(model, a, b, TASK, epochs=3, n=5, align="pam", pam_step=10.0)
    assert any(not torch.equal(moved.aligned_b[k], weight.aligned_b[k]) for k in weight.aligned_b)
    # Whatever permutation PAM settles on, B keeps computing the same function.
    assert moved.curve.loss[-1] == pytest.approx(weight.line.loss[-1], rel=1e-5)
