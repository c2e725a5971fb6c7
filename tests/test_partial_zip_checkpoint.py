"""Partial-zip checkpoints (`align --method zipit --unmerged K`) rebuild their widened model from the record.

Reference: the API (``align_models(..., unmerged=K)`` + ``zipped_model``) evaluated here with plain torch,
against ``mergescope evaluate`` reading only the file. Tampered records are one line, exit 2.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mergescope import align as al
from mergescope.align import zipped_model
from mergescope.cli import main
from mergescope.io import load, save
from mergescope.state import example_input
from mergescope.tasks import build, digits, train
from mergescope.tasks.checkpoints import model_for, model_metadata

OPTS = {"width": 16, "depth": 2}


@pytest.fixture(scope="module")
def zipped(tmp_path_factory):
    """Two trained MLPs and their partial zip (both hidden groups unmerged) written by the CLI."""
    root = tmp_path_factory.mktemp("pz")
    task = digits()
    for seed in range(2):
        m = build("mlp", seed=seed, **OPTS)
        train(m, task, epochs=3, lr=1e-2, weight_decay=0.0, seed=seed)
        save(m.state_dict(), root / f"m{seed}.safetensors", metadata=model_metadata("mlp", OPTS))
    assert main(["-q", "align", str(root / "m0.safetensors"), str(root / "m1.safetensors"), "--method", "zipit",
                 "--unmerged", "2", "-o", str(root / "zip.safetensors")]) == 0
    return root


def api_logits(root, unmerged: int, alpha: float = 0.5):
    """(test logits, labels, state) of the API's partial zip, computed with plain torch."""
    task = digits()
    a, b = build("mlp", **OPTS), build("mlp", **OPTS)
    a.load_state_dict(dict(load(root / "m0.safetensors")))
    b.load_state_dict(dict(load(root / "m1.safetensors")))
    spec = al.permutation_spec(a, example_input(task))
    state = al.align_models(spec, a, b, method="zipit", task=task, alpha=alpha, unmerged=unmerged).state
    model = zipped_model(a, state).eval()
    x, y = (torch.cat(t) for t in zip(*task.batches("test")))
    with torch.no_grad():
        return model(x), y, state


def api_reference(root, unmerged: int):
    """(loss, accuracy, state) on test of the API's partial zip."""
    logits, y, state = api_logits(root, unmerged)
    return float(F.cross_entropy(logits, y)), int((logits.argmax(1) == y).sum()) / len(y), state


def test_evaluate_rebuilds_the_widened_model_with_the_api_accuracy(zipped, tmp_path):
    loss, acc, state = api_reference(zipped, 2)
    assert state["layers.0.weight"].shape == (32, 64)  # widened: the test would fail on the base model
    out = tmp_path / "e.json"
    assert main(["-q", "evaluate", str(zipped / "zip.safetensors"), "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["model"] == "mlp"
    assert row["test"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert row["test"]["loss"] == pytest.approx(loss, rel=1e-5)


def test_ensemble_of_partial_zips_matches_the_api(zipped, tmp_path):
    """Two partial zips (alpha 0.5 and 0.3) ensembled from the files alone = the API's models' mean probabilities."""
    other = tmp_path / "zip03.safetensors"
    assert main(["-q", "align", str(zipped / "m0.safetensors"), str(zipped / "m1.safetensors"), "--method", "zipit",
                 "--unmerged", "2", "--alpha", "0.3", "-o", str(other)]) == 0
    out = tmp_path / "ens.json"
    assert main(["-q", "ensemble", str(zipped / "zip.safetensors"), str(other), "--json", str(out)]) == 0
    row = next(r for r in json.loads(out.read_text())["results"] if r["method"] == "probs")
    (la, y, _), (lb, _, _) = api_logits(zipped, 2), api_logits(zipped, 2, alpha=0.3)
    probs = (la.double().softmax(1) + lb.double().softmax(1)) / 2
    assert row["member_accuracy"] == pytest.approx([int((lg.argmax(1) == y).sum()) / len(y) for lg in (la, lb)])
    assert row["accuracy"] == pytest.approx(int((probs.argmax(1) == y).sum()) / len(y))
    assert row["loss"] == pytest.approx(float(-probs[torch.arange(len(y)), y].log().mean()), rel=1e-5)


def test_ensemble_of_a_plain_model_and_its_partial_zip(zipped, tmp_path, capsys):
    """The issue's own command, `ensemble m0 zip.safetensors`: members of different architectures, each
    rebuilt from its record; output ensembles only (no weight average), costs summed."""
    out = tmp_path / "mixed.json"
    assert main(["-q", "ensemble", str(zipped / "m0.safetensors"), str(zipped / "zip.safetensors"), "-m", "probs",
                 "-m", "vote", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["method"] for r in results] == ["probs", "vote"]
    m0 = build("mlp", **OPTS).eval()
    m0.load_state_dict(dict(load(zipped / "m0.safetensors")))
    lz, y, _ = api_logits(zipped, 2)
    with torch.no_grad():
        l0 = m0(torch.cat([x for x, _ in digits().batches("test")]))
    probs = (l0.double().softmax(1) + lz.double().softmax(1)) / 2
    row = results[0]
    assert row["member_accuracy"] == pytest.approx([int((lg.argmax(1) == y).sum()) / len(y) for lg in (l0, lz)])
    assert row["accuracy"] == pytest.approx(int((probs.argmax(1) == y).sum()) / len(y))
    assert row["params"] == sum(p.numel() for p in m0.parameters()) + sum(
        t.numel() for t in load(zipped / "zip.safetensors").values())
    capsys.readouterr()
    assert main(["ensemble", str(zipped / "m0.safetensors"), str(zipped / "zip.safetensors"), "-m", "features"]) == 2
    assert "one architecture" in capsys.readouterr().err


def test_model_for_gives_the_widened_module(zipped):
    ckpt = load(zipped / "zip.safetensors")
    module, name, options = model_for(ckpt)
    assert (name, options) == ("mlp", OPTS)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {k: tuple(v.shape) for k, v in ckpt.items()}


def tampered(zipped, tmp_path, change) -> str:
    ckpt = load(zipped / "zip.safetensors")
    meta = dict(ckpt.metadata)
    record = json.loads(meta["partial_zip"])
    change(record)
    meta["partial_zip"] = json.dumps(record) if not isinstance(record, str) else record
    path = tmp_path / "bad.safetensors"
    save({k: ckpt[k] for k in ckpt}, path, metadata=meta)
    return str(path)


@pytest.mark.parametrize("change,words", [
    (lambda r: r.update(unmerged=["layers.0.weight:0", "layers.1.weight:0", "x"]), "unmerged=3 must be an integer"),
    (lambda r: r.update(unmerged=["layers.1.weight:0", "layers.0.weight:0"]), "names unmerged groups"),
    (lambda r: r.update(unmerged=[]), "non-empty list"),
    (lambda r: r.update(unmerged=5), "non-empty list"),
    (lambda r: r["model"].update(name="os:system"), "not a zoo model"),
    (lambda r: r["model"].update(name="nosuchmodel"), "not a zoo model"),
    (lambda r: r["model"]["options"].update(width=10**12), "option 'width'"),
    (lambda r: r.pop("model"), "model record"),
])
def test_tampered_record_is_one_line_exit_2(zipped, tmp_path, capsys, change, words):
    path = tampered(zipped, tmp_path, change)
    capsys.readouterr()
    assert main(["-q", "evaluate", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "bad.safetensors" in err[0], err


def test_record_with_fewer_groups_than_the_file_does_not_fit(zipped, tmp_path, capsys):
    """K=1 names a real last group, but the file's first layer is widened too: the shapes are refused."""
    path = tampered(zipped, tmp_path, lambda r: r.update(unmerged=["layers.1.weight:0"]))
    capsys.readouterr()
    assert main(["-q", "evaluate", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shape" in err[0], err
