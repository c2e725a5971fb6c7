"""Scaling analysis against closed forms: ReLU nets without biases are positively homogeneous."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergescope import tasks
from mergescope.analysis import scaling
from mergescope.ensemble import run, split_tensors


def np_kl_of_scaled_logits(z, c):
    """mean KL(softmax(z) || softmax(c z))."""
    def log_softmax(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))
    lp, lq = log_softmax(z), log_softmax(c * z)
    return (np.exp(lp) * (lp - lq)).sum(-1).mean()


def bias_free_mlp(seed):
    model = tasks.build("mlp", seed=seed, width=16)
    state = {k: (torch.zeros_like(v) if k.endswith("bias") else v.clone()) for k, v in model.state_dict().items()}
    return model, state


def test_global_scaling_of_bias_free_relu_mlp_scales_logits_by_c_cubed(task):
    model, state = bias_free_mlp(0)
    factors = (0.5, 1.0, 1.3)
    result = scaling.analyse(model, {"a": state}, task, factors=factors)
    x, y = split_tensors(task, "test")
    z = run(model, state, x).double().numpy()
    expected = [np_kl_of_scaled_logits(z, c ** 3) for c in factors]
    np.testing.assert_allclose(result.global_scaling["a"]["kl"], expected, rtol=1e-6, atol=1e-12)
    # positive scaling never changes an argmax of a homogeneous net
    assert result.global_scaling["a"]["agreement"] == [1.0, 1.0, 1.0]
    # scaling only the head scales logits by c
    np.testing.assert_allclose(result.per_layer["a"]["head"]["kl"], [np_kl_of_scaled_logits(z, c) for c in factors],
                               rtol=1e-6, atol=1e-12)


def test_unit_factor_is_the_model_itself(task):
    model = tasks.build("mlp", seed=1, width=16)
    states = {"a": model.state_dict(), "b": tasks.build("mlp", seed=2, width=16).state_dict()}
    result = scaling.analyse(model, states, task, factors=(0.9, 1.0))
    assert result.names == ("a", "b", "average")
    assert result.global_scaling["a"]["kl"][1] == pytest.approx(0.0, abs=1e-12)
    assert result.global_scaling["a"]["agreement"][1] == 1.0
    assert result.global_scaling["a"]["accuracy"][1] == pytest.approx(task.evaluate(model)["accuracy"])
    assert result.layers == ("layers.0", "layers.1", "head")
    norm_a = np.sqrt(sum((p.double() ** 2).sum().item() for p in model.parameters()))
    assert result.norms["a"] == pytest.approx(norm_a)
    assert result.norms["average"] <= max(result.norms["a"], result.norms["b"])  # triangle inequality


def test_batchnorm_buffers_are_not_scaled():
    state = {"w": torch.ones(2), "bn.running_var": torch.ones(2)}
    out = scaling.scaled(state, 2.0, {"w"})
    assert out["w"].tolist() == [2.0, 2.0] and out["bn.running_var"].tolist() == [1.0, 1.0]


def test_figure_is_drawn_from_saved_json(task, tmp_path):
    model = tasks.build("mlp", width=16)
    states = {"a": model.state_dict(), "b": tasks.build("mlp", seed=2, width=16).state_dict()}
    (tmp_path / "scaling.json").write_text(json.dumps(scaling.analyse(model, states, task).to_dict()))
    scaling.plot(json.loads((tmp_path / "scaling.json").read_text()), tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
