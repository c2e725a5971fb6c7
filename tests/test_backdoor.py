"""Backdoor persistence through merges: the ASR against a numpy computation, a poisoned digits member
(10% poisoned, corner patch, target 0) against a clean one, merges of the two, the CLI and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import mergescope as ms
from mergescope import tasks
from mergescope.analysis import backdoor as bd
from mergescope.cli import main
from mergescope.ensemble import weight_average
from mergescope.errors import MergescopeError
from mergescope.tasks.checkpoints import model_metadata

WIDTH = 64
TARGET = 0


def _numpy_asr(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray, pixels, value, target) -> float:
    """The standard ASR written out: non-target examples, patch written, linear logits, argmax == target."""
    xs = x[y != target].copy()
    xs[:, list(pixels)] = value
    return float(np.mean(np.argmax(xs @ weight.T + bias, axis=1) == target))


def test_asr_equals_a_numpy_computation_on_a_linear_model(task):
    model = nn.Linear(64, 10)
    generator = torch.Generator().manual_seed(0)
    state = {"weight": torch.randn(10, 64, generator=generator) * 0.3, "bias": torch.zeros(10)}
    state["weight"][3, 45] = 2.0  # the corner pulls some examples to class 3, not all
    trigger = bd.Trigger(value=3.0)
    x, y = (t.numpy() for t in task.splits["test"])
    expected = _numpy_asr(state["weight"].numpy(), state["bias"].numpy(), x, y, trigger.pixels, 3.0, 3)
    got = bd.attack_success_rate(model, state, task, trigger, 3)
    assert 0.0 < expected < 1.0
    assert got == pytest.approx(expected, abs=1e-12)
    assert bd.attack_success_rate(model, state, task, trigger, 3, split="val") != got  # the split is honoured


def test_pattern_trigger_is_a_fixed_additive_pattern_for_any_shape():
    x = torch.randn(4, 2, 5)
    a = bd.Trigger(kind="pattern", value=0.5, seed=7)
    delta = a.apply(x) - x
    assert torch.allclose(delta, delta[0].expand_as(delta))  # the same pattern on every example
    assert torch.allclose(delta[0], 0.5 * torch.randn(10, generator=torch.Generator().manual_seed(7)).reshape(2, 5))
    assert not torch.allclose(bd.Trigger(kind="pattern", value=0.5, seed=8).apply(x), a.apply(x))
    assert torch.equal(x, x.clone())  # the input is left as it was


def test_poison_triggers_and_relabels_exactly_the_fraction(task):
    before = {k: (x.clone(), y.clone()) for k, (x, y) in task.splits.items()}
    poisoned = bd.poison(task, bd.Trigger(), TARGET, fraction=0.1, seed=0)
    x0, y0 = task.splits["train"]
    x1, y1 = poisoned.splits["train"]
    changed = (x0 != x1).any(1)
    n = round(0.1 * len(y0))
    assert poisoned.info["poisoned"] == n
    assert int(changed.sum()) <= n and int(changed.sum()) > 0.9 * n  # a few rows may already hold the patch
    assert (y1[y0 != y1] == TARGET).all() and int((y0 != y1).sum()) >= 0.8 * n
    chosen = torch.randperm(len(y0), generator=torch.Generator().manual_seed(0))[:n]
    assert (x1[chosen][:, list(bd.CORNER_PATCH)] == 3.0).all() and (y1[chosen] == TARGET).all()
    keep = torch.ones(len(y0), dtype=torch.bool)
    keep[chosen] = False
    assert torch.equal(x1[keep], x0[keep]) and torch.equal(y1[keep], y0[keep])
    for split in ("val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(poisoned.splits[split], task.splits[split]))
    for k, (x, y) in task.splits.items():  # the clean task is untouched
        assert torch.equal(x, before[k][0]) and torch.equal(y, before[k][1])


@pytest.fixture(scope="module")
def family():
    """A clean parent, and two fine-tunes of it: one on clean digits, one on 10%-poisoned digits."""
    task = tasks.digits()
    parent = tasks.build("mlp", seed=0, width=WIDTH)
    tasks.train(parent, task, epochs=10, batch_size=32, seed=0)
    base = {k: v.clone() for k, v in parent.state_dict().items()}

    def finetune(data, seed):
        m = tasks.build("mlp", width=WIDTH)
        m.load_state_dict(base)
        tasks.train(m, data, epochs=5, batch_size=32, seed=seed)
        return {k: v.clone() for k, v in m.state_dict().items()}

    poisoned = bd.poison(task, bd.Trigger(), TARGET, fraction=0.1, seed=0)
    return task, base, {"clean": finetune(task, 1), "poisoned": finetune(poisoned, 2)}


def test_poisoned_member_is_backdoored_and_clean_member_is_not(family):
    task, _, states = family
    model = tasks.build("mlp", width=WIDTH)
    clean = bd.scores(model, states["clean"], task, bd.Trigger(), TARGET)
    bad = bd.scores(model, states["poisoned"], task, bd.Trigger(), TARGET)
    # measured: poisoned ASR 0.966, accuracy 0.958; clean ASR 0.000, accuracy 0.961 (digits test, 1 thread)
    assert bad["asr"] > 0.9
    assert abs(bad["accuracy"] - clean["accuracy"]) < 0.03
    assert clean["asr"] <= clean["clean_target_rate"] + 0.03  # the trigger does nothing to a clean model


def test_persistence_entries_equal_direct_calls_and_the_average_sits_between(family):
    task, base, states = family
    model = tasks.build("mlp", width=WIDTH)
    merges = bd.standard_merges(model, states, task, base=base)
    assert {"average", "ties"} <= set(merges) and any(k.startswith("task arithmetic") for k in merges)
    for k, v in weight_average(model, list(states.values()), task).items():
        assert torch.equal(merges["average"][k], v)
    result = bd.persistence(model, states, merges, task, bd.Trigger(), TARGET)
    for name, s in states.items():
        assert result.members[name] == bd.scores(model, s, task, bd.Trigger(), TARGET)
    for name, s in merges.items():
        assert result.merges[name]["asr"] == bd.attack_success_rate(model, s, task, bd.Trigger(), TARGET)
    # measured: average ASR 0.099 (TIES 0.185), between the clean (0.0) and poisoned (0.966) members
    low, high = result.members["clean"]["asr"], result.members["poisoned"]["asr"]
    assert low <= result.merges["average"]["asr"] < high
    assert json.loads(json.dumps(result.to_dict()))["merges"] == result.merges


@pytest.fixture(scope="module")
def saved(family, tmp_path_factory):
    _, base, states = family
    folder = tmp_path_factory.mktemp("backdoor")
    meta = model_metadata("mlp", {"width": WIDTH}, task="digits")
    paths = {}
    for name, state in {"parent": base, **states}.items():
        paths[name] = folder / f"{name}.safetensors"
        ms.save(state, paths[name], metadata=meta)
    return paths


def test_cli_writes_what_the_api_computes(family, saved, tmp_path):
    task, base, states = family
    out = tmp_path / "out"
    assert main(["-q", "analyse", "backdoor", str(saved["clean"]), str(saved["poisoned"]), "--target", "0",
                 "--base", str(saved["parent"]), "-o", str(out)]) == 0
    data = json.loads((out / "backdoor.json").read_text())
    model = tasks.build("mlp", width=WIDTH)
    expected = bd.persistence(model, states, bd.standard_merges(model, states, task, base=base), task,
                              bd.Trigger(), TARGET).to_dict()
    assert data == json.loads(json.dumps(expected))
    assert (out / "backdoor.png").read_bytes()[:4] == b"\x89PNG"
    out2 = tmp_path / "independent"
    assert main(["-q", "analyse", "backdoor", str(saved["clean"]), str(saved["poisoned"]), "--target", "0",
                 "--trigger", "pattern", "-o", str(out2)]) == 0
    data = json.loads((out2 / "backdoor.json").read_text())
    assert data["trigger"]["kind"] == "pattern" and "weight-matched average" in data["merges"]


def test_bad_target_and_trigger_are_one_line_errors(family, saved, tmp_path, capsys):
    task, _, states = family
    model = tasks.build("mlp", width=WIDTH)
    with pytest.raises(MergescopeError, match="target 10 is not one of its classes"):
        bd.attack_success_rate(model, states["clean"], task, bd.Trigger(), 10)
    with pytest.raises(MergescopeError, match="does not fit inputs of shape"):
        bd.persistence(model, states, {}, task, bd.Trigger(pixels=(64,)), TARGET)
    with pytest.raises(MergescopeError, match="real-valued inputs"):
        bd.Trigger(kind="pattern").apply(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(MergescopeError, match="fraction"):
        bd.poison(task, bd.Trigger(), TARGET, fraction=0.0)
    ckpts = [str(saved["clean"]), str(saved["poisoned"])]
    assert main(["analyse", "backdoor", *ckpts, "--target", "10", "-o", str(tmp_path / "a")]) == 2
    assert main(["analyse", "backdoor", *ckpts, "--target", "0", "--trigger", "blob", "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "target 10" in err and "blob" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------- the study's optional column

def test_study_config_without_backdoor_is_the_config_it_was():
    """Off (the default), the field is left out of to_dict: results.json's config and every stage's cache
    key are computed from exactly the fields the study had before the option existed."""
    from dataclasses import asdict

    from mergescope.study import _stage_key
    from mergescope.study.config import StudyConfig

    for config in (StudyConfig(), StudyConfig.quick_config()):
        assert config.to_dict() == {k: v for k, v in asdict(config).items() if k != "backdoor"}
    on = StudyConfig(backdoor=True)
    assert on.to_dict()["backdoor"] is True
    assert _stage_key(on, "merging") != _stage_key(StudyConfig(), "merging")  # on never reuses an off result


def _rep(shift: float, backdoor: bool) -> dict:
    rows = [{"models": "g", "family": family, "method": method, "accuracy": acc + shift, "loss": 0.3,
             "val_accuracy": acc, "seconds": None if family == "single model" else 0.1}
            for family, method, acc in (("single model", "a", 0.90), ("single model", "b", 0.91),
                                        ("weight aggregation", "linear (uniform average)", 0.92),
                                        ("ensembling", "ensemble (probs)", 0.93))]
    rep = {"rows": rows}
    if backdoor:
        score = {"accuracy": 0.9, "clean_target_rate": 0.0}
        rep["backdoor"] = {"target": 0, "trigger": {"kind": "patch"}, "split": "test", "models": "g + poisoned",
                           "members": {"a": {**score, "asr": 0.0}, "poisoned fine-tune": {**score, "asr": 0.9 + shift}},
                           "merges": {"average": {**score, "asr": 0.1 + shift}}}
    return rep


def test_merging_section_gets_the_column_only_when_on(tmp_path):
    from mergescope.study.sections import BACKDOOR_COLUMN, merging_section

    off = merging_section({"replicates": [_rep(0.0, False), _rep(0.02, False)]}, tmp_path)
    on = merging_section({"replicates": [_rep(0.0, True), _rep(0.02, True)]}, tmp_path)
    off_table, on_table = off["tables"][0], on["tables"][0]
    assert BACKDOOR_COLUMN not in off_table["columns"] and "Backdoor" not in off["figures"][0]["caption"]
    assert on_table["columns"] == [*off_table["columns"], BACKDOOR_COLUMN]
    assert on_table["rows"][:len(off_table["rows"])] == off_table["rows"]  # the usual rows are untouched
    extra = {r["method"]: r for r in on_table["rows"][len(off_table["rows"]):]}
    assert list(extra) == ["a", "poisoned fine-tune", "average"]
    assert extra["poisoned fine-tune"][BACKDOOR_COLUMN].startswith("91.0")  # mean of 0.90 and 0.92, in %
    assert extra["average"][BACKDOOR_COLUMN].startswith("11.0") and extra["average"]["family"] == "weight aggregation"
    assert "poisoned fine-tune's attack success rate is 91.0" in on["figures"][0]["caption"]


def test_study_merging_stage_backdoor_member(tmp_path):
    """The stage's own poisoned fine-tune (quick sizes) is backdoored; the clean fine-tunes are not."""
    from mergescope.study.config import StudyConfig
    from mergescope.study.family import Family
    from mergescope.study.stages import Context, backdoor_persistence

    ctx = Context(StudyConfig.quick_config(backdoor=True), Family(tmp_path / "checkpoints"), 0)
    finetunes = ctx.named(ctx.finetunes(), "fine-tune")
    out = backdoor_persistence(ctx, ctx.module(), finetunes)
    assert list(out["members"]) == [*finetunes, "poisoned fine-tune"]
    assert list(out["merges"]) == ["average", "task arithmetic", "ties"]
    # measured (replicate 0): poisoned ASR 0.910, clean fine-tunes 0.000, average 0.006
    assert out["members"]["poisoned fine-tune"]["asr"] > 0.5
    assert max(out["members"][n]["asr"] for n in finetunes) < 0.1
