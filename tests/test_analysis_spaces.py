"""Weight space vs feature/output space: every curve against a numpy computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergescope import tasks
from mergescope.analysis import spaces
from mergescope.ensemble import run, split_tensors


@pytest.fixture(scope="module")
def family(task):
    return spaces.train_family("seeds", "mlp", 3, task, {"width": 16}, epochs=2)


def np_forward(s, x):
    h = x
    for i in range(2):
        h = np.maximum(h @ s[f"layers.{i}.weight"].T + s[f"layers.{i}.bias"], 0)
    return h, h @ s["head.weight"].T + s["head.bias"]


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_curves_match_numpy(task, family):
    model = tasks.build("mlp", width=16)
    result = spaces.compare(model, {"seeds": family}, task)
    assert result.sizes == (2, 3)
    x, y = (t.numpy() for t in split_tensors(task, "test"))
    ns = [{k: v.double().numpy() for k, v in s.items()} for s in family]
    curves = result.families["seeds"]
    for i, k in enumerate(result.sizes):
        members = [np_forward(s, x) for s in ns[:k]]
        avg = {key: np.mean([s[key] for s in ns[:k]], 0) for key in ns[0]}
        feats = np.mean([h for h, _ in members], 0)
        acc = lambda z: (z.argmax(-1) == y).mean()  # noqa: E731
        assert curves["weight_average"][i] == pytest.approx(acc(np_forward(avg, x)[1]))
        assert curves["features"][i] == pytest.approx(acc(feats @ avg["head.weight"].T + avg["head.bias"]))
        assert curves["probs"][i] == pytest.approx(acc(np.mean([np_softmax(z) for _, z in members], 0)))
        assert curves["logits"][i] == pytest.approx(acc(np.mean([z for _, z in members], 0)))
        assert curves["best_member"][i] == pytest.approx(max(acc(z) for _, z in members))


def test_identical_models_agree_in_every_space(task, family):
    model = tasks.build("mlp", width=16)
    result = spaces.compare(model, {"copies": [family[0]] * 3}, task)
    model.load_state_dict(family[0])
    single = task.evaluate(model)["accuracy"]
    for space in spaces.SPACES:
        assert result.families["copies"][space] == pytest.approx([single, single])


def test_batchnorm_statistics_of_the_average_are_recomputed(task):
    """Averaging a CNN with itself must give the model back, BatchNorm statistics included:
    recomputed statistics on train data equal the train-data statistics of the model."""
    model = tasks.build("cnn", seed=0, width=4)
    tasks.train(model, task, epochs=1, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = spaces.compare(model, {"copies": [state, state]}, task, sizes=[2])
    from mergescope.ensemble import reset_batchnorm

    reset = reset_batchnorm(model, state, split_tensors(task, "train")[0])
    x, y = split_tensors(task, "test")
    assert result.families["copies"]["weight_average"][0] == pytest.approx(
        (run(model, reset, x).argmax(-1) == y).double().mean().item())


def test_families_are_deterministic_and_finetunes_stay_close(task, family):
    again = spaces.train_family("seeds", "mlp", 3, task, {"width": 16}, epochs=2)
    for a, b in zip(family, again):
        for k in a:
            assert torch.equal(a[k], b[k])
    tunes = spaces.train_family("finetunes", "mlp", 2, task, {"width": 16}, epochs=2)
    dist = lambda a, b: sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()  # noqa: E731
    assert dist(tunes[0], tunes[1]) < 0.5 * dist(family[0], family[1])


def test_aligned_family_is_functionally_unchanged(task, family):
    if not spaces.alignment_available():
        pytest.skip("mergescope.align has no weight_matching in this checkout")
    model = tasks.build("mlp", width=16)
    x, _ = split_tensors(task, "test")
    aligned = spaces.align_family(model, family, x[:4])
    for original, permuted in zip(family, aligned):
        torch.testing.assert_close(run(model, permuted, x), run(model, original, x), rtol=1e-4, atol=1e-4)


def test_figure_is_drawn_from_saved_json(task, family, tmp_path):
    model = tasks.build("mlp", width=16)
    result = spaces.compare(model, {"seeds": family, "copies": [family[0]] * 3}, task, model_name="mlp")
    (tmp_path / "spaces.json").write_text(json.dumps(result.to_dict()))
    spaces.plot(json.loads((tmp_path / "spaces.json").read_text()), tmp_path / "spaces.png")
    assert (tmp_path / "spaces.png").read_bytes()[:4] == b"\x89PNG"
