"""AdaMerging on the digits label-subset fine-tunes (the study's directedness family, small widths):
learned coefficients lower the val entropy and (task-wise) do not lose joint val accuracy against task
arithmetic at the paper's init; the merge is task arithmetic at the learned coefficients; Adam's first
step moves each coefficient against the finite-difference gradient of the entropy; CLI end to end."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import mergescope as ms
from mergescope.cli import main
from mergescope.errors import MergescopeError
from mergescope.merge.adamerging import adamerge
from mergescope.tasks import digits
from mergescope.tasks.checkpoints import model_metadata
from mergescope.tasks.train import train

MLP = {"width": 64, "depth": 2}
SUBSETS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


@pytest.fixture(scope="module")
def family():
    """(module, parent state, [subset fine-tune states], joint digits task), as study/stages.py builds them."""
    torch.set_num_threads(1)
    task = digits(seed=0)
    torch.manual_seed(0)
    parent = ms.tasks.build("mlp", **MLP)
    train(parent, task, epochs=3, seed=0)
    fts = []
    for i, classes in enumerate(SUBSETS):
        ft = copy.deepcopy(parent)
        train(ft, digits(seed=0, classes=classes), epochs=10, seed=200 + i)
        fts.append({k: v.detach().clone() for k, v in ft.state_dict().items()})
    base = {k: v.detach().clone() for k, v in parent.state_dict().items()}
    return parent, base, fts, task


def _accuracy(module, state, task, split="val"):
    m = copy.deepcopy(module)
    m.load_state_dict(state)
    return task.evaluate(m, split)["accuracy"]


def _numpy_entropy(logits: np.ndarray) -> float:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return float(-(p * np.log(p)).sum(1).mean())


def _task_arithmetic(base, fts, coefficients):
    ta = ms.methods.get("task_arithmetic")
    return {k: ta([f[k] for f in fts], base[k], weight=list(coefficients)) for k in base}


def _val_entropy(module, state, task):
    m = copy.deepcopy(module)
    m.load_state_dict(state)
    x = torch.cat([x for x, _ in task.batches("val")])
    with torch.no_grad():
        return _numpy_entropy(m(x).double().numpy())


def test_task_wise_lowers_entropy_and_keeps_accuracy(family):
    module, base, fts, task = family
    r = adamerge(module, base, fts, task, steps=500, lr=1e-3, seed=0)
    assert r.coefficients.shape == (2,) and not r.layer_wise
    ta = _task_arithmetic(base, fts, [0.3, 0.3])
    # entropies against an independent numpy computation on the whole val split
    assert r.entropy_before == pytest.approx(_val_entropy(module, ta, task), rel=1e-5)
    assert r.entropy_after == pytest.approx(_val_entropy(module, r.state, task), rel=1e-5)
    assert r.entropy_after < r.entropy_before - 0.1
    # the merge is task arithmetic at the learned coefficients
    again = _task_arithmetic(base, fts, r.coefficients.tolist())
    for k in base:
        torch.testing.assert_close(r.state[k], again[k], rtol=1e-5, atol=1e-6)
    acc, acc_ta = _accuracy(module, r.state, task), _accuracy(module, ta, task)
    print(f"task-wise: coefficients {r.coefficients.tolist()}, val entropy {r.entropy_before:.4f} -> "
          f"{r.entropy_after:.4f}, val acc {acc:.4f} vs task arithmetic 0.3 {acc_ta:.4f}")
    assert acc >= acc_ta


def test_layer_wise_shapes_entropy_and_determinism(family):
    module, base, fts, task = family
    a = adamerge(module, base, fts, task, layer_wise=True, steps=60, lr=1e-3, seed=3)
    b = adamerge(module, base, fts, task, layer_wise=True, steps=60, lr=1e-3, seed=3)
    c = adamerge(module, base, fts, task, layer_wise=True, steps=60, lr=1e-3, seed=4)
    names = [n for n, _ in module.named_parameters()]
    assert a.coefficients.shape == (2, len(names)) and list(a.layers) == names
    assert torch.equal(a.coefficients, b.coefficients) and a.entropy_curve == b.entropy_curve
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not torch.equal(a.coefficients, c.coefficients)  # the seed chooses the input order
    assert a.entropy_after < a.entropy_before
    assert len(set(a.coefficients.flatten().tolist())) > 2  # the layers moved apart


def test_first_adam_step_follows_entropy_gradient(family):
    """Adam's first step is -lr * g / (|g| + eps): each coefficient moves by lr against the sign of the
    gradient, here a central finite difference of the numpy entropy (whole val split as one batch)."""
    module, base, fts, task = family
    lr, h = 1e-3, 1e-3
    r = adamerge(module, base, fts, task, steps=1, lr=lr, batch_size=10_000, seed=0)
    for i in range(2):
        up, down = [0.3, 0.3], [0.3, 0.3]
        up[i] += h
        down[i] -= h
        g = (_val_entropy(module, _task_arithmetic(base, fts, up), task)
             - _val_entropy(module, _task_arithmetic(base, fts, down), task)) / (2 * h)
        assert abs(g) > 1e-3
        assert float(r.coefficients[i]) == pytest.approx(0.3 - lr * np.sign(g), abs=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": -1}, "steps"), ({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"batch_size": 0}, "batch_size"),
    ({"lr": 1e30}, "entropy became"),
])
def test_bad_parameters_one_line(family, kwargs, message):
    module, base, fts, task = family
    with pytest.raises(MergescopeError, match=message):
        adamerge(module, base, fts, task, **kwargs)


def test_mismatched_model_names_the_tensor(family):
    module, base, fts, task = family
    bad = dict(fts[1])
    bad["layers.0.weight" if "layers.0.weight" in bad else next(iter(bad))] = torch.zeros(3, 3)
    with pytest.raises(MergescopeError, match="shape"):
        adamerge(module, base, [fts[0], bad], task)
    with pytest.raises(MergescopeError, match="at least one"):
        adamerge(module, base, [], task)


def test_cli_adamerge(family, tmp_path, capsys):
    _, base, fts, _ = family
    paths = []
    for name, state in [("base", base), ("ft_a", fts[0]), ("ft_b", fts[1])]:
        paths.append(tmp_path / f"{name}.safetensors")
        ms.save(state, paths[-1], metadata=model_metadata("mlp", MLP))
    out, js = tmp_path / "ada.safetensors", tmp_path / "ada.json"
    argv = [*map(str, paths), "--task", "digits", "-o", str(out), "--steps", "40", "--json", str(js)]
    assert main(["adamerge", *argv]) == 0
    printed = capsys.readouterr().out
    assert "adamerging" in printed and "task arithmetic (0.3)" in printed and "ft_a" in printed
    result = json.loads(js.read_text())
    merged = ms.load(out)
    again = _task_arithmetic(base, fts, result["coefficients"])
    for k in base:
        torch.testing.assert_close(merged[k], again[k], rtol=1e-5, atol=1e-6)
    assert set(result["accuracy"]) == {"task arithmetic (0.3)", "adamerging"}
    # bad input: one line, exit 2, the output left alone
    assert main(["adamerge", *map(str, paths), "-o", str(out), "--lr", "-1"]) == 2
    assert main(["adamerge", str(paths[0]), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "at least one fine-tuned" in capsys.readouterr().err
