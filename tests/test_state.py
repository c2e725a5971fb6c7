"""The state core (mergescope.state): averaging, interpolation, the example input, the BatchNorm reset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mergescope as ms
from mergescope import state as core
from mergescope.errors import MergescopeError

torch.set_num_threads(1)


def test_average_is_the_weighted_mean_and_keeps_integer_buffers():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    mean = core.average([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and int(mean["n"]) == 4
    weighted = core.average([a, b], [3, 1])
    assert torch.allclose(weighted["w"], torch.tensor([1.5, 3.5]))
    with pytest.raises(MergescopeError):
        core.average([])
    with pytest.raises(MergescopeError):
        core.average([a, b], [1, -1])


def test_interpolate_is_lerp_and_its_endpoints_are_exact():
    a, b = {"w": torch.randn(5), "n": torch.tensor(1)}, {"w": torch.randn(5), "n": torch.tensor(2)}
    assert torch.equal(core.interpolate(a, b, 0.0)["w"], a["w"])
    assert torch.equal(core.interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.equal(core.interpolate(a, b, 0.3)["w"], torch.lerp(a["w"], b["w"], 0.3))
    assert int(core.interpolate(a, b, 0.7)["n"]) == 1


def test_old_averaging_names_are_the_core():
    from mergescope.align.many import mean_state
    states = [{"w": torch.randn(7)} for _ in range(3)]
    assert torch.equal(mean_state(states)["w"], core.average(states)["w"])
    assert torch.equal(ms.ensemble.average_states(states)["w"], core.average(states)["w"])
    assert torch.equal(ms.align.interpolate_states(states[0], states[1], 0.25)["w"],
                       core.interpolate(states[0], states[1], 0.25)["w"])


def test_example_input_is_the_first_train_examples():
    task = ms.tasks.get_task("digits")
    x = core.example_input(task)
    first = next(iter(task.batches("train")))[0]
    assert x.shape[0] == core.EXAMPLES and torch.equal(x, first[:core.EXAMPLES])


def test_with_state_copies_and_leaves_the_template():
    template = ms.tasks.build("mlp", seed=0, width=8)
    other = ms.tasks.build("mlp", seed=1, width=8).state_dict()
    net = core.with_state(template, other)
    assert not net.training and all(torch.equal(net.state_dict()[k], other[k]) for k in other)
    assert not torch.equal(next(iter(template.parameters())), next(iter(net.parameters())))
    partial = core.with_state(template, {k: v for k, v in other.items() if k.endswith("bias")}, partial=True)
    assert all(torch.equal(partial.state_dict()[k], (other if k.endswith("bias") else template.state_dict())[k])
               for k in other)


def test_reset_batchnorm_is_exact_per_layer_and_batch_independent():
    """Each BN's running stats are the mean / population variance of its input when the layers before
    it are already reset: a direct eval-mode computation, and the same for any batching of the data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4))
    x = torch.randn(300, 5) * 3 + 1
    one = core.reset_batchnorm(model, model.state_dict(), [x])
    split = core.reset_batchnorm(model, model.state_dict(), [x[:7], x[7:150], (x[150:], None)])
    for k in one:
        assert torch.allclose(one[k].float(), split[k].float(), atol=1e-6)
    net = core.with_state(model, one)
    with torch.no_grad():
        h0 = net[0](x).double()
        h1 = net[3](net[2](net[1](net[0](x)))).double()
    np.testing.assert_allclose(one["1.running_mean"].numpy(), h0.mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(one["1.running_var"].numpy(), h0.var(0, unbiased=False).numpy(), rtol=1e-5)
    np.testing.assert_allclose(one["4.running_mean"].numpy(), h1.mean(0).numpy(), atol=1e-5)
    np.testing.assert_allclose(one["4.running_var"].numpy(), h1.var(0, unbiased=False).numpy(), rtol=1e-5)
    assert torch.equal(model.state_dict()["1.running_mean"], torch.zeros(6))  # template untouched


def test_every_bn_reset_is_the_core_one():
    """ensemble, landscape and align/repair give the same statistics on the same data."""
    from mergescope.align.repair import reset_bn_stats
    from mergescope.landscape.evaluation import recompute_batchnorm, working_copy

    task = ms.tasks.get_task("digits")
    model = ms.tasks.build("cnn", seed=0, width=4)
    state = model.state_dict()
    xs = [x for x, _ in task.batches("train")]
    ref = core.reset_batchnorm(model, state, xs)
    ens = ms.ensemble.reset_batchnorm(model, state, torch.cat(xs))
    rep = reset_bn_stats(core.with_state(model, state), xs).state_dict()
    floats = {k: v[None].float() for k, v in state.items() if v.is_floating_point()}
    land = recompute_batchnorm(working_copy(model), floats, task)
    keys = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert keys
    for k in keys:
        assert torch.equal(rep[k], ref[k])
        assert torch.allclose(ens[k], ref[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(land[k][0], ref[k])


def test_reset_batchnorm_without_batchnorm_is_a_copy():
    model = ms.tasks.build("mlp", seed=0, width=8)
    same = core.reset_batchnorm(model, model.state_dict(), [torch.randn(4, 64)])
    assert all(torch.equal(same[k], v) for k, v in model.state_dict().items())
    with pytest.raises(MergescopeError):
        core.reset_batchnorm(model, model.state_dict(), [])
