"""Model stitching: functional equivalence of exact stitches, training recovers a permuted copy."""

from __future__ import annotations

import json

import pytest
import torch

from mergescope import tasks
from mergescope.analysis import stitching
from mergescope.ensemble import run, split_tensors

WIDTH = 24


@pytest.fixture(scope="module")
def trained(task):
    model = tasks.build("mlp", seed=0, width=WIDTH)
    tasks.train(model, task, epochs=6, lr=2e-3, seed=0)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def permuted_copy(state, perm):
    s = {k: v.clone() for k, v in state.items()}
    s["layers.0.weight"], s["layers.0.bias"] = s["layers.0.weight"][perm], s["layers.0.bias"][perm]
    s["layers.1.weight"] = s["layers.1.weight"][:, perm]
    return s


def test_identity_stitch_into_itself_is_the_model(task, trained):
    model, state = trained
    result = stitching.stitch(model, state, state, task, epochs=0)
    assert result.layers == ("layers.0", "layers.1")
    assert result.identity_accuracy == pytest.approx([result.accuracy_b] * 2, abs=1e-12)
    assert result.penalty == pytest.approx([0.0, 0.0], abs=1e-12)


def test_permutation_stitch_reproduces_the_permuted_model(task, trained):
    """Stitching A's layers.0 into a unit-permuted B with the permutation matrix is exactly B."""
    model, state = trained
    perm = torch.randperm(WIDTH, generator=torch.Generator().manual_seed(0))
    b = permuted_copy(state, perm)
    x, _ = split_tensors(task, "test")
    feats = stitching.layer_outputs(model, state, x, ["layers.0"], flatten=False)["layers.0"]
    s = stitching.stitch_layer(feats[:1])
    with torch.no_grad():
        s.weight.copy_(torch.eye(WIDTH)[perm])
    torch.testing.assert_close(stitching.stitched_logits(model, b, "layers.0", x, feats, s), run(model, b, x),
                               rtol=1e-5, atol=1e-5)


def test_training_the_stitch_recovers_a_permuted_copy(task, trained):
    model, state = trained
    b = permuted_copy(state, torch.randperm(WIDTH, generator=torch.Generator().manual_seed(1)))
    result = stitching.stitch(model, state, b, task, layers=["layers.0"], epochs=15, lr=2e-2)
    assert result.identity_accuracy[0] < result.accuracy_b - 0.2  # raw features are not plug-compatible
    assert result.stitched_accuracy[0] > result.accuracy_b - 0.05
    assert result.penalty[0] == pytest.approx(result.accuracy_b - result.stitched_accuracy[0])


def test_plot_from_saved_json(task, trained, tmp_path):
    model, state = trained
    result = stitching.stitch(model, state, state, task, epochs=1)
    path = tmp_path / "stitch.json"
    path.write_text(json.dumps(result.to_dict()))
    stitching.plot(json.loads(path.read_text()), tmp_path / "stitch.png")
    assert (tmp_path / "stitch.png").read_bytes()[:4] == b"\x89PNG"
