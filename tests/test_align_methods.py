"""OT alignment/fusion and merging many models, against closed forms and functional equivalence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergescope as ms
from mergescope.align import apply, permutation_spec, random_permutation
from mergescope.align.many import align_to_reference, merge_many, mean_state
from mergescope.align.ot import ot_alignment, ot_fusion, transport_along

torch.set_num_threads(1)
ZOO = [("mlp", {"width": 20}), ("cnn", {"width": 6}), ("transformer", {"dim": 16, "heads": 4, "depth": 1})]


def _shuffled(spec, state, seed):
    return apply(spec, random_permutation(spec, generator=torch.Generator().manual_seed(seed)), state)


@pytest.mark.parametrize("name,options", ZOO)
def test_hard_ot_undoes_a_random_permutation(name, options):
    model = ms.tasks.build(name, seed=0, **options)
    spec = permutation_spec(model, torch.randn(2, 64))
    state = model.state_dict()
    shuffled = _shuffled(spec, state, 1)
    back = apply(spec, ot_alignment(spec, state, shuffled), shuffled)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_soft_transport_with_a_permutation_matrix_equals_gather():
    """transport_along with the matrix of a permutation is exactly index_select (closed form)."""
    model = ms.tasks.build("cnn", seed=0, width=6)
    spec = permutation_spec(model, torch.randn(2, 64))
    state = model.state_dict()
    perm = random_permutation(spec, generator=torch.Generator().manual_seed(3))
    mats = {p: torch.eye(len(idx))[idx] for p, idx in perm.perms.items()}
    gathered = apply(spec, perm, state)
    for k, v in state.items():
        if v.is_floating_point():
            torch.testing.assert_close(transport_along(spec, mats, k, v), gathered[k])


def test_ot_fusion_of_a_permuted_copy_returns_the_model():
    model = ms.tasks.build("mlp", seed=0, width=16)
    spec = permutation_spec(model, torch.randn(2, 64))
    state = model.state_dict()
    fused = ot_fusion(spec, state, _shuffled(spec, state, 2), alpha=0.5, reg=None)
    assert all(torch.allclose(fused.state[k], state[k], atol=1e-6) for k in state)
    soft = ot_fusion(spec, state, _shuffled(spec, state, 2), alpha=0.5, reg=0.05)
    rows = [m.sum(1) for m in soft.transports.values()]
    assert all(torch.allclose(r, torch.ones_like(r), atol=1e-3) for r in rows)  # n T has uniform marginals


def test_merge_many_puts_permuted_copies_in_one_basis():
    model = ms.tasks.build("mlp", seed=0, width=16)
    spec = permutation_spec(model, torch.randn(2, 64))
    state = model.state_dict()
    copies = [_shuffled(spec, state, s) for s in range(4)]
    result = merge_many(spec, copies, seed=0)
    for aligned in result.states[1:]:
        assert all(torch.equal(aligned[k], result.states[0][k]) for k in state)
    x = torch.randn(5, 64)
    merged = ms.tasks.build("mlp", width=16).eval()
    merged.load_state_dict(result.mean)
    assert torch.allclose(merged(x), model.eval()(x), atol=1e-5)


def test_align_to_reference_keeps_the_reference():
    model = ms.tasks.build("mlp", seed=0, width=16)
    spec = permutation_spec(model, torch.randn(2, 64))
    state = model.state_dict()
    copies = [_shuffled(spec, state, s) for s in range(3)]
    result = align_to_reference(spec, copies, reference=1)
    for aligned in result.states:
        assert all(torch.equal(aligned[k], copies[1][k]) for k in state)
    mean = mean_state([{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 5.0])}])
    assert np.allclose(mean["w"].numpy(), [2.0, 4.0])
