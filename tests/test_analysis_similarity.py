"""Linear CKA: numpy formula, 1 on the diagonal, invariance to permuting units; heatmap from JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergescope import tasks
from mergescope.analysis import similarity


def np_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


@pytest.mark.parametrize("p,q", [(5, 7), (80, 120)])  # feature form and example-Gram form
def test_linear_cka_matches_numpy(p, q):
    g = torch.Generator().manual_seed(p)
    x = torch.randn(40, p, generator=g)
    y = x[:, :1] @ torch.randn(1, q, generator=g) + torch.randn(40, q, generator=g)
    assert similarity.linear_cka(x, y) == pytest.approx(np_cka(x.double().numpy(), y.double().numpy()), rel=1e-9)


def test_linear_cka_invariances():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 6, generator=g), torch.randn(50, 9, generator=g)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=g))
    base = similarity.linear_cka(x, y)
    assert similarity.linear_cka(x, 3.5 * y @ q + 2.0) == pytest.approx(base, rel=1e-6)
    assert similarity.linear_cka(x, x) == pytest.approx(1.0)


def permute_mlp_hidden(state, perms):
    """Relabel the hidden units of a 2-layer MLP: the same function, different unit order."""
    s = {k: v.clone() for k, v in state.items()}
    p0, p1 = perms
    s["layers.0.weight"], s["layers.0.bias"] = s["layers.0.weight"][p0], s["layers.0.bias"][p0]
    s["layers.1.weight"] = s["layers.1.weight"][p1][:, p0]
    s["layers.1.bias"] = s["layers.1.bias"][p1]
    s["head.weight"] = s["head.weight"][:, p1]
    return s


def test_cka_with_itself_is_one_on_diagonal_and_permutation_invariant(task):
    torch.manual_seed(0)
    model = tasks.build("mlp", seed=3, width=48)
    state = model.state_dict()
    g = torch.Generator().manual_seed(1)
    permuted = permute_mlp_hidden(state, (torch.randperm(48, generator=g), torch.randperm(48, generator=g)))
    x = next(task.batches("test"))[0]
    model.load_state_dict(permuted)
    permuted_out = model(x)
    model.load_state_dict(state)
    torch.testing.assert_close(permuted_out, model(x), rtol=1e-5, atol=1e-5)  # functional equivalence

    itself = similarity.compare(model, state, state, task)
    against_permuted = similarity.compare(model, state, permuted, task)
    assert itself.layers == ("layers.0", "layers.1", "head")
    np.testing.assert_allclose(np.diag(itself.cka), 1.0, atol=1e-9)
    np.testing.assert_allclose(against_permuted.cka, itself.cka, atol=1e-9)
    m = np.array(itself.cka)
    np.testing.assert_allclose(m, m.T, atol=1e-12)


def test_cka_diagonal_one_for_conv_and_transformer(task):
    for name in ("cnn", "transformer"):
        model = tasks.build(name, seed=0, **({"width": 4} if name == "cnn" else {}))
        result = similarity.compare(model, model.state_dict(), model.state_dict(), task, n_examples=100)
        np.testing.assert_allclose(np.diag(result.cka), 1.0, atol=1e-9)


def test_representation_layers_of_the_zoo():
    assert similarity.representation_layers(tasks.build("resnet")) == [
        "stem", "stage1.0", "stage1.1", "stage2.0", "stage2.1", "head"]
    assert similarity.representation_layers(tasks.build("transformer")) == [
        "embed", "blocks.0", "blocks.1", "norm", "head"]
    assert similarity.representation_layers(tasks.build("cnn"))[-1] == "head"


def test_heatmap_is_drawn_from_saved_json(task, tmp_path):
    model = tasks.build("mlp", seed=0, width=16)
    other = tasks.build("mlp", seed=1, width=16)
    result = similarity.compare(model, model.state_dict(), other.state_dict(), task,
                                state_b_aligned=model.state_dict())
    (tmp_path / "cka.json").write_text(json.dumps(result.to_dict()))
    loaded = json.loads((tmp_path / "cka.json").read_text())
    assert loaded["cka"] == [list(r) for r in result.cka]
    similarity.plot(loaded, tmp_path / "cka.png")
    assert (tmp_path / "cka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unit_correlation_sees_permutations_that_cka_ignores(task):
    model = tasks.build("mlp", seed=3, width=48)
    state = model.state_dict()
    g = torch.Generator().manual_seed(2)
    permuted = permute_mlp_hidden(state, (torch.randperm(48, generator=g), torch.randperm(48, generator=g)))
    result = similarity.compare(model, state, permuted, task, state_b_aligned=state)
    # head outputs are not permuted: correlation 1 there; hidden layers lose it until aligned back
    assert result.unit_correlation[2] == pytest.approx(1.0)
    assert max(result.unit_correlation[:2]) < 0.5
    assert result.aligned_unit_correlation == pytest.approx((1.0, 1.0, 1.0))
    x = next(task.batches("test"))[0]
    h = x @ state["layers.0.weight"].T + state["layers.0.bias"]
    hp = x @ permuted["layers.0.weight"].T + permuted["layers.0.bias"]
    corr = np.mean([np.corrcoef(h[:, j].numpy(), hp[:, j].numpy())[0, 1] for j in range(48)])
    assert result.unit_correlation[0] == pytest.approx(corr, abs=1e-5)
