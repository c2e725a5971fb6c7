"""Weight matching with restarts, checked against numpy: objective, coordinate-wise optimality, monotonicity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import mergescope as ms
from mergescope.align import permutation_spec, weight_matching
from mergescope.errors import MergescopeError

torch.set_num_threads(1)
WIDTH = 24


@pytest.fixture(scope="module")
def pairs():
    """Two pairs of briefly trained MLPs (64 -> 24 -> 24 -> 10); few epochs leave many local optima."""
    task = ms.tasks.digits()
    states = []
    for seed in range(4):
        model = ms.tasks.build("mlp", seed=seed, width=WIDTH)
        ms.tasks.train(model, task, epochs=3, lr=1e-3, weight_decay=1e-4, seed=seed)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return [(states[0], states[1]), (states[2], states[3])]


@pytest.fixture(scope="module")
def spec():
    return permutation_spec(ms.tasks.build("mlp", width=WIDTH), torch.randn(2, 64))


def _np(state):
    return {k: v.double().numpy() for k, v in state.items()}


def _perms(perm):
    return perm["layers.0.weight:0"].numpy(), perm["layers.1.weight:0"].numpy()


def _objective(a, b, p0, p1):
    """sum <W_A, P(W_B)> over the permuted tensors, written out for this MLP with numpy."""
    return float((a["layers.0.weight"] * b["layers.0.weight"][p0]).sum() + (a["layers.0.bias"] * b["layers.0.bias"][p0]).sum()
                 + (a["layers.1.weight"] * b["layers.1.weight"][p1][:, p0]).sum()
                 + (a["layers.1.bias"] * b["layers.1.bias"][p1]).sum() + (a["head.weight"] * b["head.weight"][:, p1]).sum())


def _costs(a, b, p0, p1):
    """Git Re-Basin's cost matrices of P0 (P1 held) and P1 (P0 held)."""
    c0 = (a["layers.0.weight"] @ b["layers.0.weight"].T + np.outer(a["layers.0.bias"], b["layers.0.bias"])
          + a["layers.1.weight"].T @ b["layers.1.weight"][p1])
    c1 = (a["layers.1.weight"] @ b["layers.1.weight"][:, p0].T + np.outer(a["layers.1.bias"], b["layers.1.bias"])
          + a["head.weight"].T @ b["head.weight"])
    return c0, c1


def test_the_objective_is_the_numpy_inner_product(pairs, spec):
    for sa, sb in pairs:
        perm = weight_matching(spec, sa, sb, seed=0, restarts=4)
        assert perm.info["objective"] == pytest.approx(_objective(_np(sa), _np(sb), *_perms(perm)), rel=1e-12)
        assert perm.info["objective"] == max(perm.info["objectives"])
        assert perm.info["objectives"][perm.info["start"]] == perm.info["objective"]


def test_more_restarts_never_lower_the_objective(pairs, spec):
    for sa, sb in pairs:
        values = [_objective(_np(sa), _np(sb), *_perms(weight_matching(spec, sa, sb, seed=3, restarts=r)))
                  for r in range(1, 7)]
        assert all(later >= earlier - 1e-9 for earlier, later in zip(values, values[1:]))


def test_restarts_find_a_higher_objective_somewhere(pairs, spec):
    """Not a tautology: on these nets at least one random start beats the identity start (else restarts are idle)."""
    gains = [weight_matching(spec, sa, sb, seed=s, restarts=6).info for sa, sb in pairs for s in range(2)]
    assert any(info["objective"] > info["objectives"][0] + 1e-9 for info in gains)


def test_every_result_is_coordinatewise_optimal(pairs, spec):
    """Converged: no single permutation can be improved with the other held (numpy costs, scipy LSA)."""
    for sa, sb in pairs:
        a, b = _np(sa), _np(sb)
        p0, p1 = _perms(weight_matching(spec, sa, sb, seed=1, restarts=3))
        for cost, p in zip(_costs(a, b, p0, p1), (p0, p1)):
            rows, cols = linear_sum_assignment(cost, maximize=True)
            assert cost[np.arange(len(p)), p].sum() >= cost[rows, cols].sum() - 1e-9 * abs(cost[rows, cols].sum())


def test_the_first_start_is_the_single_descent(pairs, spec):
    sa, sb = pairs[0]
    single = weight_matching(spec, sa, sb, seed=2, restarts=1)
    several = weight_matching(spec, sa, sb, seed=2, restarts=5)
    assert several.info["objectives"][0] == single.info["objective"]
    assert several.info["objective"] >= single.info["objective"]


def test_a_warm_start_is_refined_not_restarted(pairs, spec):
    sa, sb = pairs[0]
    init = weight_matching(spec, sa, sb, seed=0, restarts=1)
    again = weight_matching(spec, sa, sb, seed=0, init=init, restarts=5)
    assert len(again.info["objectives"]) == 1
    assert all(torch.equal(again[p], init[p]) for p in init.perms)  # already a local optimum


def test_restarts_must_be_positive(pairs, spec):
    with pytest.raises(MergescopeError, match="restarts"):
        weight_matching(spec, *pairs[0], restarts=0)
