"""Robust (PGD) path loss against the closed-form worst case of a binary linear classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergescope as ms
from mergescope.landscape.robust import robust_interpolate
from mergescope.tasks import digits
from test_landscape_toys import template, trained

torch.set_num_threads(1)
BINARY = digits(classes=(0, 1))  # labels stay 0 and 1: a two-logit linear model fits


def linear(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 2)
    with torch.no_grad():
        model.weight.mul_(0.3)
    return model


def worst_case_loss(state, eps, split="test"):
    """max over |delta|_inf <= eps of the 2-class cross-entropy: the margin drops by eps |w_y - w_o|_1."""
    x, y = (t.double().numpy() for t in BINARY.splits[split])
    w, b = state["weight"].double().numpy(), state["bias"].double().numpy()
    y = y.astype(int)
    dw = w[y] - w[1 - y]
    margin = np.sum(dw * x, axis=1) + b[y] - b[1 - y] - eps * np.abs(dw).sum(1)
    return float(np.mean(np.logaddexp(0, -margin))), float(np.mean(margin > 0))


def test_one_pgd_step_reaches_the_closed_form_worst_case_along_the_path():
    a, b = linear(0).state_dict(), linear(1).state_dict()
    eps = 0.05
    path = robust_interpolate(linear(2), a, b, BINARY, n=4, eps=eps, steps=1, step_size=eps)
    for i, t in enumerate(path.t):
        point = {k: (1 - t) * a[k] + t * b[k] for k in a}
        loss, acc = worst_case_loss(point, eps)
        assert path.loss[i] == pytest.approx(loss, rel=1e-4)
        assert path.accuracy[i] == pytest.approx(acc, abs=1e-9)
    # More steps cannot do better than the exact worst case (it is already reached).
    more = robust_interpolate(linear(2), a, b, BINARY, n=4, eps=eps, steps=4)
    np.testing.assert_allclose(more.loss, path.loss, rtol=1e-4)


def test_zero_radius_is_the_plain_path_and_attacks_only_raise_the_loss():
    a, b = trained("mlp", 0, width=32), trained("mlp", 1, width=32)
    model = template("mlp", width=32)
    plain = ms.landscape.interpolate(model, a, b, digits(), n=3)
    zero = robust_interpolate(model, a, b, digits(), n=3, eps=0.0)
    np.testing.assert_allclose(zero.loss, plain.loss, rtol=1e-5)
    attacked = robust_interpolate(model, a, b, digits(), n=3, eps=0.1, steps=3)
    assert all(r > p for r, p in zip(attacked.loss, plain.loss))
    assert attacked.barrier_loss >= 0 and attacked.to_dict()["barrier_loss"] == attacked.barrier_loss


def test_robust_curve_matches_robust_path_on_its_points():
    a, b = trained("mlp", 0, width=32), trained("mlp", 1, width=32)
    model = template("mlp", width=32)
    r = ms.landscape.fit_curve(model, a, b, digits(), epochs=0, n=3, robust_eps=0.05, robust_steps=2)
    # An untrained Bezier is the line, so its robust values equal the robust line's.
    np.testing.assert_allclose(r.robust_curve.loss, r.robust_line.loss, rtol=1e-5)
    direct = robust_interpolate(model, a, b, digits(), n=3, eps=0.05, steps=2)
    np.testing.assert_allclose(r.robust_line.loss, direct.loss, rtol=1e-5)
    assert all(x > y for x, y in zip(r.robust_curve.loss, r.curve.loss))
