"""Planes against closed forms (quadratic toy) and against models built and evaluated by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergescope as ms
from mergescope.landscape.plane import filter_normalized_direction, plane_through
from mergescope.tasks import digits
from test_landscape_toys import RegressionTask, linear_model, template, trained

torch.set_num_threads(1)


def toy_loss_numpy(toy, w: np.ndarray) -> float:
    """Mean squared error of the linear model with flat weights w = (weight..., bias)."""
    x, y = toy.x.double().numpy(), toy.y.double().numpy()
    return float(np.mean((x @ w[:-1] + w[-1] - y) ** 2))


def flat(state) -> np.ndarray:
    return np.concatenate([state["0.weight"].double().numpy().ravel(), state["0.bias"].double().numpy()])


def test_filter_normalized_directions_have_the_weights_filter_norms():
    model = template("cnn", width=4)
    state = trained("cnn", 0, width=4, epochs=1)
    d = filter_normalized_direction(model, state, torch.Generator().manual_seed(0))
    conv = "features.0.0.weight"
    np.testing.assert_allclose(d[conv].flatten(1).norm(dim=1).numpy(), state[conv].flatten(1).norm(dim=1).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(d["head.weight"].norm(dim=1).numpy(), state["head.weight"].norm(dim=1).numpy(), rtol=1e-5)
    assert torch.all(d["head.bias"] == 0) and torch.all(d["features.0.1.weight"] == 0)
    assert torch.all(d["features.0.1.running_mean"] == 0)
    again = filter_normalized_direction(model, state, torch.Generator().manual_seed(0))
    assert all(torch.equal(d[k], again[k]) for k in d)


def test_random_plane_on_quadratic_matches_closed_form():
    toy, model = RegressionTask(), linear_model()
    g = torch.Generator().manual_seed(1)
    state = model.state_dict()
    d1 = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    d2 = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    pl = ms.landscape.plane(model, state, toy, grid=7, span=0.5, directions=(d1, d2), chunk_size=5)
    w0, u, v = flat(state), flat(d1), flat(d2)
    for i, a in enumerate(pl.alphas):
        for j, b in enumerate(pl.betas):
            assert pl.loss[i][j] == pytest.approx(toy_loss_numpy(toy, w0 + a * u + b * v), rel=1e-5)
    assert pl.alphas[0] == -0.5 and pl.alphas[-1] == 0.5 and len(pl.loss) == 7


def test_plane_grid_points_match_hand_built_models():
    task = digits()
    model, state = template("mlp", width=32), trained("mlp", 0, width=32)
    pl = ms.landscape.plane(model, state, task, grid=5, span=1.0, seed=3, split="test")
    g = torch.Generator().manual_seed(3)
    d1 = filter_normalized_direction(model, {k: v.float() for k, v in state.items()}, g)
    d2 = filter_normalized_direction(model, {k: v.float() for k, v in state.items()}, g)
    for i, j in [(0, 0), (2, 2), (4, 1), (1, 3)]:
        a, b = pl.alphas[i], pl.betas[j]
        ref = template("mlp", width=32)
        ref.load_state_dict({k: state[k] + a * d1[k] + b * d2[k] for k in state})
        expect = task.evaluate(ref, "test")
        assert pl.loss[i][j] == pytest.approx(expect["loss"], rel=1e-5)
        assert pl.accuracy[i][j] == pytest.approx(expect["accuracy"])
    assert pl.loss[2][2] == min(min(r) for r in pl.loss) or pl.loss[2][2] < np.mean(pl.loss)


def test_three_model_plane_matches_numpy_gram_schmidt():
    toy, model = RegressionTask(), linear_model()
    g = torch.Generator().manual_seed(2)
    states = [{k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()} for _ in range(3)]
    pl = plane_through(model, states, toy, grid=6, margin=0.1, split="train")
    a, b, c = (flat(s) for s in states)
    e1 = (b - a) / np.linalg.norm(b - a)
    v = (c - a) - ((c - a) @ e1) * e1
    e2 = v / np.linalg.norm(v)
    coords = {n: (x, y) for n, x, y in pl.anchors}
    assert coords["B"] == pytest.approx((np.linalg.norm(b - a), 0.0), abs=1e-5)
    assert coords["C"] == pytest.approx(((c - a) @ e1, np.linalg.norm(v)), abs=1e-5)
    for i, x in enumerate(pl.alphas):
        for j, y in enumerate(pl.betas):
            assert pl.loss[i][j] == pytest.approx(toy_loss_numpy(toy, a + x * e1 + y * e2), rel=1e-4)
    with pytest.raises(ms.MergescopeError, match="collinear"):
        plane_through(model, [states[0], states[1], {k: 2 * states[1][k] - states[0][k] for k in states[0]}], toy)
