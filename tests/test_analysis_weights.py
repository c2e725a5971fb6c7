"""Weight-structure analysis: templates against the weights themselves and finite differences."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mergescope import tasks
from mergescope.analysis import weights


def test_effective_rank_closed_forms():
    assert weights.effective_rank(torch.eye(7)) == pytest.approx(7.0)
    assert weights.effective_rank(torch.ones(5, 3)) == pytest.approx(1.0)
    m = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    s = np.linalg.svd(m.double().numpy(), compute_uv=False)
    p = s / s.sum()
    assert weights.effective_rank(m) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)


class Linear64(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x)


def test_class_directions_of_a_linear_model_are_its_weight_rows(task):
    model = Linear64()
    x = next(task.batches("test"))[0]
    directions = weights.class_directions(model, model.state_dict(), x)
    torch.testing.assert_close(directions, model.fc.weight.detach())


def test_class_directions_match_finite_differences(task):
    model = tasks.build("mlp", seed=0, width=16).double()
    state = model.state_dict()
    x = next(task.batches("test"))[0][:50].double()
    directions = weights.class_directions(model, state, x)
    eps = 1e-6
    for pixel in (10, 27, 44):
        bump = torch.zeros(64, dtype=torch.float64)
        bump[pixel] = eps
        with torch.no_grad():
            fd = (model(x + bump) - model(x - bump)).mean(0) / (2 * eps)
        torch.testing.assert_close(directions[:, pixel], fd, rtol=1e-5, atol=1e-7)


def test_analyse_templates_and_statistics(task):
    model = tasks.build("mlp", width=16)
    states = {f"s{i}": tasks.build("mlp", seed=i, width=16).state_dict() for i in range(2)}
    result = weights.analyse(model, states, task)
    assert result.names == ("s0", "s1", "average") and result.unit_layer == "layers.0"
    avg = np.mean([s["layers.0.weight"].numpy() for s in states.values()], 0)
    np.testing.assert_allclose(result.unit_templates["average"], avg[:12], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.unit_templates["s1"], states["s1"]["layers.0.weight"][:12].numpy())
    w = states["s0"]["head.weight"].double().numpy()
    wa = np.mean([s["head.weight"].double().numpy() for s in states.values()], 0)
    head = result.stats["s0"]["head.weight"]
    assert head["norm"] == pytest.approx(np.linalg.norm(w))
    assert head["distance_to_average"] == pytest.approx(np.linalg.norm(w - wa) / np.linalg.norm(wa), rel=1e-6)
    assert result.stats["average"]["head.weight"]["distance_to_average"] == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(head["spectrum"], np.linalg.svd(w, compute_uv=False)[:16], rtol=1e-9)


def test_no_unit_templates_for_conv_models(task):
    model = tasks.build("cnn", width=4)
    result = weights.analyse(model, {"a": model.state_dict()}, task)
    assert result.unit_templates is None and len(result.class_templates["a"]) == 10


def test_figure_is_drawn_from_saved_json(task, tmp_path):
    model = tasks.build("mlp", width=16)
    states = {f"s{i}": tasks.build("mlp", seed=i, width=16).state_dict() for i in range(2)}
    (tmp_path / "weights.json").write_text(json.dumps(weights.analyse(model, states, task).to_dict()))
    weights.plot(json.loads((tmp_path / "weights.json").read_text()), tmp_path / "weights.png")
    assert (tmp_path / "weights.png").read_bytes()[:4] == b"\x89PNG"
