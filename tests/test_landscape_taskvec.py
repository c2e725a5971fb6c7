"""Task vectors on label-subset fine-tunes of one digits parent, checked against numpy and hand-built models."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import mergescope as ms
from mergescope.tasks import digits, train
from test_landscape_toys import template, trained

torch.set_num_threads(1)
SUBSETS = {"low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9)}
TASKS = {n: digits(classes=c) for n, c in SUBSETS.items()}


@functools.lru_cache(maxsize=1)
def finetunes():
    base = trained("mlp", 0, width=32, epochs=2)
    out = {}
    for i, (name, task) in enumerate(TASKS.items()):
        model = template("mlp", width=32)
        model.load_state_dict(base)
        train(model, task, epochs=3, lr=3e-3, seed=10 + i)
        out[name] = {k: v.clone() for k, v in model.state_dict().items()}
    return base, out


@functools.lru_cache(maxsize=1)
def result():
    base, fts = finetunes()
    return ms.landscape.task_vectors(template("mlp", width=32), base, fts, TASKS, scales=[0.0, 0.5, 1.0, 1.5])


def numpy_vector(base, state):
    return np.concatenate([(state[k] - base[k]).double().numpy().ravel() for k in base])


def test_cosines_and_norms_match_numpy():
    base, fts = finetunes()
    r = result()
    u, v = numpy_vector(base, fts["low"]), numpy_vector(base, fts["high"])
    assert r.cosine[0][1] == pytest.approx(u @ v / np.linalg.norm(u) / np.linalg.norm(v), abs=1e-9)
    assert r.cosine[0][0] == pytest.approx(1.0) and r.norms[1] == pytest.approx(np.linalg.norm(v), rel=1e-9)
    hu, hv = ((fts[n]["head.weight"] - base["head.weight"]).double().numpy().ravel() for n in ("low", "high"))
    assert r.layer_cosine["head.weight"][1][0] == pytest.approx(hu @ hv / np.linalg.norm(hu) / np.linalg.norm(hv))


def test_arithmetic_curve_matches_hand_built_models_and_choice_uses_validation():
    base, fts = finetunes()
    r = result()
    for s_index in (1, 3):
        lam = r.scales[s_index]
        ref = template("mlp", width=32)
        ref.load_state_dict({k: base[k] + lam * ((fts["low"][k] - base[k]) + (fts["high"][k] - base[k])) for k in base})
        for name, task in TASKS.items():
            assert r.arithmetic_test[name][s_index] == pytest.approx(task.evaluate(ref, "test")["accuracy"])
            assert r.arithmetic_val[name][s_index] == pytest.approx(task.evaluate(ref, "val")["accuracy"])
    mean_val = [(a + b) / 2 for a, b in zip(r.arithmetic_val["low"], r.arithmetic_val["high"])]
    assert r.chosen_scale == r.scales[int(np.argmax(mean_val))]
    ref = template("mlp", width=32)
    ref.load_state_dict(fts["high"])
    assert r.individual_test["high"] == pytest.approx(TASKS["high"].evaluate(ref, "test")["accuracy"])
    assert r.arithmetic_test["low"][0] == pytest.approx(r.base_test["low"])  # scale 0 is the base


def test_negation_forgets_the_task_and_reports_the_base_at_scale_zero():
    r = result()
    neg = r.negation["low"]
    assert neg["target_test"][0] == pytest.approx(r.base_test["low"])
    assert neg["control_test"][0] == pytest.approx(r.base_test["high"])
    assert neg["target_test"][-1] < neg["target_test"][0]  # subtracting tau_low hurts digits 0-4
    assert neg["chosen_scale"] in r.scales
    assert set(r.to_dict()) >= {"cosine", "layer_cosine", "arithmetic_test", "negation", "chosen_scale"}


def test_missing_task_is_an_error():
    base, fts = finetunes()
    with pytest.raises(ms.MergescopeError, match="no task for"):
        ms.landscape.task_vectors(template("mlp", width=32), base, fts, {"low": TASKS["low"]})
