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


def test_greedy_pairs_takes_the_most_correlated_first():
    corr = np.array([[1.0, 0.9, 0.1, 0.2],
                     [0.9, 1.0, 0.3, 0.8],
                     [0.1, 0.3, 1.0, 0.7],
                     [0.2, 0.8, 0.7, 1.0]])
    np.fill_diagonal(corr, -np.inf)
    from mergescope.align.zipit import greedy_pairs

    assert greedy_pairs(corr) == [(0, 1), (2, 3)]  # 0.9 first (a within-model pair), then 0.7
    assert greedy_pairs(corr, allow_within=False) == [(1, 3), (0, 2)]  # cross pairs only: 0.8, then what is left


@pytest.mark.parametrize("name,options", [("mlp", {"width": 12}), ("cnn", {"width": 4})])
def test_zipit_of_a_permuted_copy_is_the_model(name, options):
    from mergescope.align.zipit import zipit

    model = ms.tasks.build(name, seed=0, **options).eval()
    spec = permutation_spec(model, torch.randn(2, 64))
    copy = ms.tasks.build(name, **options).eval()
    copy.load_state_dict(_shuffled(spec, model.state_dict(), 4))
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(0))
    merged = zipit(spec, model, copy, [x], allow_within=False, reset_bn=False)
    out = ms.tasks.build(name, **options).eval()
    out.load_state_dict(merged.state)
    assert torch.allclose(out(x), model(x), atol=1e-5)


def test_zipit_matrices_average_pairs_and_copy_back():
    from mergescope.align.zipit import merge_unmerge

    merge, unmerge_t = merge_unmerge([(0, 3), (1, 2)], n=2, alpha=0.25)
    # pair (0 from A, 3 -> B's unit 1): weights 0.75 / 0.25; pair (1, 2): A's unit 1 with B's unit 0
    assert torch.equal(merge, torch.tensor([[0.75, 0, 0, 0.25], [0, 0.75, 0.25, 0]], dtype=torch.float64))
    assert torch.equal(unmerge_t, torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.float64))


def test_ste_matching_returns_a_valid_permutation_that_merges_well():
    from mergescope.align.ste import ste_matching

    task = ms.tasks.digits()
    models = []
    for seed in (0, 1):
        m = ms.tasks.build("mlp", seed=seed, width=32)
        ms.tasks.train(m, task, epochs=6, seed=seed)
        models.append(m.eval())
    spec = permutation_spec(models[0], torch.randn(2, 64))
    perm = ste_matching(spec, models[0], models[1], task, epochs=1, seed=0)
    for p, idx in perm.perms.items():
        assert sorted(idx.tolist()) == list(range(spec.sizes[p]))
    sa, sb = models[0].state_dict(), models[1].state_dict()

    def mid_loss(b):
        m = ms.tasks.build("mlp", width=32)
        m.load_state_dict({k: (sa[k] + b[k]) / 2 for k in sa})
        return task.evaluate(m)["loss"]

    assert mid_loss(apply(spec, perm, sb)) < mid_loss(sb)
