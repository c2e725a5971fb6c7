"""Linear paths and barriers, checked against models loaded by hand and evaluated by the task itself."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergescope as ms
from mergescope.landscape import accuracy_barrier, loss_barrier
from mergescope.tasks import digits
from test_landscape_toys import RegressionTask, linear_model, template, trained

torch.set_num_threads(1)
TASK = digits()


def lerp_numpy(a, b, t):
    """Independent reference: interpolate float tensors in numpy, keep integer buffers of A."""
    return {k: torch.from_numpy((1 - t) * a[k].numpy() + t * b[k].numpy()) if a[k].is_floating_point() else a[k]
            for k in a}


def reset_bn_reference(model, task=TASK):
    """Exact per-layer BN statistics (mergescope.state.reset_batchnorm's statistic), written directly:
    BN by BN in forward order, eval mode, mean and population variance of its input on the whole
    train split with the BNs before it already reset."""
    x = torch.cat([xb for xb, _ in task.batches("train")])
    model.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            seen = []
            handle = m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].double()))
            with torch.no_grad():
                model(x)
            handle.remove()
            h = seen[0]
            m.running_mean.copy_(h.mean((0, 2, 3)))
            m.running_var.copy_(h.var((0, 2, 3), unbiased=False))
    return model


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=3, max_size=12))
def test_barriers_match_a_direct_loop(values):
    ts = np.linspace(0, 1, len(values))
    expect_loss = max(v - ((1 - t) * values[0] + t * values[-1]) for t, v in zip(ts, values))
    expect_acc = max(((1 - t) * values[0] + t * values[-1]) - v for t, v in zip(ts, values))
    assert loss_barrier(ts, values) == pytest.approx(expect_loss, abs=1e-12)
    assert accuracy_barrier(ts, values) == pytest.approx(expect_acc, abs=1e-12)
    assert loss_barrier(ts, values) >= 0 and accuracy_barrier(ts, values) >= 0


def test_path_points_match_task_evaluate_on_hand_interpolated_models():
    a, b = trained("mlp", 0, width=32), trained("mlp", 1, width=32)
    path = ms.landscape.interpolate(template("mlp", width=32), a, b, TASK, n=5)
    for i, t in enumerate(path.t):
        ref = template("mlp", width=32)
        ref.load_state_dict(lerp_numpy(a, b, t))
        test, tr = TASK.evaluate(ref, "test"), TASK.evaluate(ref, "train")
        assert path.loss[i] == pytest.approx(test["loss"], rel=1e-5)
        assert path.accuracy[i] == pytest.approx(test["accuracy"], abs=1e-9)
        assert path.train_loss[i] == pytest.approx(tr["loss"], rel=1e-5)
    assert path.naive_loss is None  # no BatchNorm
    manual = max(path.loss[i] - ((1 - t) * path.loss[0] + t * path.loss[-1]) for i, t in enumerate(path.t))
    assert path.barrier_loss == pytest.approx(manual)
    assert path.barrier_loss > 0.05  # independently trained MLPs are not linearly connected
    assert path.to_dict()["barrier_acc"] == path.barrier_acc


def test_batchnorm_reset_matches_exact_per_layer_statistics_and_naive_is_reported():
    a, b = trained("cnn", 0, width=4, epochs=2), trained("cnn", 1, width=4, epochs=2)
    path = ms.landscape.interpolate(template("cnn", width=4), a, b, TASK, n=3)
    ref = template("cnn", width=4)
    ref.load_state_dict(lerp_numpy(a, b, 0.5))
    naive = TASK.evaluate(ref, "test")
    assert path.naive_loss[1] == pytest.approx(naive["loss"], rel=1e-4)
    reset = TASK.evaluate(reset_bn_reference(ref), "test")
    assert path.loss[1] == pytest.approx(reset["loss"], rel=1e-4)
    assert path.accuracy[1] == pytest.approx(reset["accuracy"], abs=1e-9)
    assert path.loss[1] != pytest.approx(naive["loss"], rel=1e-3)  # the reset matters
    small = dataclasses.replace(TASK, eval_batch_size=300)  # five train batches: the same statistic
    multi = ms.landscape.interpolate(template("cnn", width=4), a, b, small, n=3)
    assert multi.loss[1] == pytest.approx(path.loss[1], rel=1e-5)
    off = ms.landscape.interpolate(template("cnn", width=4), a, b, TASK, n=3, bn_reset=False)
    assert off.loss[1] == pytest.approx(naive["loss"], rel=1e-4) and off.naive_loss is None


def test_identical_endpoints_and_convex_loss_have_zero_barrier():
    toy = RegressionTask()
    model = linear_model()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v + 1.0 for k, v in a.items()}
    # L(t) is a convex quadratic in t for a linear model under squared error: always below the chord.
    path = ms.landscape.interpolate(model, a, b, toy, n=9, split="train")
    assert path.barrier_loss == 0.0
    same = ms.landscape.interpolate(model, a, a, toy, n=5, split="train")
    assert np.ptp(same.loss) < 1e-6 and same.barrier_loss == pytest.approx(0.0, abs=1e-6)


def test_caller_model_is_untouched():
    model = template("cnn", width=4)
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy(model.state_dict())
    a, b = trained("cnn", 0, width=4, epochs=2), trained("cnn", 1, width=4, epochs=2)
    ms.landscape.interpolate(model, a, b, TASK, n=3)
    assert model.training
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_barrier_matrix_is_symmetric_and_equals_pairwise_paths():
    states = [trained("mlp", s, width=32) for s in (0, 1, 2)]
    calls = []
    m = ms.landscape.barrier_matrix(template("mlp", width=32), states, TASK, n=5,
                                    on_pair=lambda done, total: calls.append(done))
    assert calls == [1, 2, 3]  # each unordered pair once
    loss = np.asarray(m.loss)
    assert np.allclose(loss, loss.T) and np.all(np.diag(loss) == 0)
    p02 = ms.landscape.interpolate(template("mlp", width=32), states[0], states[2], TASK, n=5)
    assert m.loss[0][2] == pytest.approx(p02.barrier_loss) and m.accuracy[2][0] == pytest.approx(p02.barrier_acc)


def test_bad_state_is_a_one_line_error():
    a = trained("mlp", 0, width=32)
    with pytest.raises(ms.MergescopeError, match="state_b"):
        ms.landscape.interpolate(template("mlp", width=32), a, {k: v for k, v in list(a.items())[:-1]}, TASK)


@pytest.mark.parametrize("name,options", [("mlp", {"width": 32}), ("cnn", {"width": 4})])
def test_vmap_and_loop_evaluation_agree(name, options):
    from mergescope.landscape.evaluation import as_state, evaluate_points, lerp

    model = template(name, **options)
    a = as_state(model, trained(name, 0, epochs=2, **options))
    b = as_state(model, trained(name, 1, epochs=2, **options))
    points = lerp(a, b, [0.0, 0.3, 0.6, 1.0])
    by_loop = evaluate_points(model, points, TASK, ("test", "train"), chunk_size=3, vectorize=False)
    by_vmap = evaluate_points(model, points, TASK, ("test", "train"), chunk_size=3, vectorize=True)
    for split in ("test", "train"):
        np.testing.assert_allclose(by_loop[split].loss, by_vmap[split].loss, rtol=1e-4)
        np.testing.assert_allclose(by_loop[split].accuracy, by_vmap[split].accuracy, atol=1e-3)
