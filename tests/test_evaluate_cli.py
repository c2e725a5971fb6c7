"""`mergescope evaluate`: each checkpoint's loss/accuracy, checked against a plain forward pass."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mergescope import tasks
from mergescope.cli import main
from mergescope.io import save
from mergescope.tasks.checkpoints import model_metadata


def _reference(model, task, split):
    """Mean cross-entropy and accuracy by one forward pass over the split (no Task.evaluate)."""
    x, y = (torch.cat(t) for t in zip(*task.batches(split)))
    with torch.no_grad():
        out = model.eval()(x)
    return F.cross_entropy(out, y).item(), (out.argmax(-1) == y).double().mean().item()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, task):
    root = tmp_path_factory.mktemp("evaluate")
    paths, models = [], []
    for seed, (name, opts) in enumerate([("mlp", {"width": 32}), ("cnn", {"width": 8})]):
        model = tasks.build(name, seed=seed, **opts)
        tasks.train(model, task, epochs=1, lr=1e-3, seed=seed)
        path = root / f"{name}.safetensors"
        save(model.state_dict(), path, metadata=model_metadata(name, opts))
        paths.append(path)
        models.append(model)
    return paths, models


def test_each_checkpoint_with_its_own_model_on_every_split(two_models, task, tmp_path, capsys):
    paths, models = two_models
    out = tmp_path / "eval.json"
    assert main(["evaluate", *map(str, paths), "--split", "all", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["splits"] == ["train", "val", "test"] and [r["model"] for r in data["rows"]] == ["mlp", "cnn"]
    for row, model in zip(data["rows"], models):
        for split in data["splits"]:
            loss, acc = _reference(model, task, split)
            assert row[split]["loss"] == pytest.approx(loss, rel=1e-5)
            assert row[split]["accuracy"] == pytest.approx(acc)
    printed = capsys.readouterr().out
    assert "mlp.safetensors" in printed and "test accuracy" in printed


def test_bad_split_missing_file_and_wrong_model_are_one_line(two_models, tmp_path, capsys):
    paths, _ = two_models
    capsys.readouterr()
    assert main(["evaluate", str(paths[0]), "--split", "dev"]) == 2
    assert main(["evaluate", str(tmp_path / "nope.safetensors")]) == 2
    assert main(["evaluate", str(paths[1]), "--model", "mlp"]) == 2  # a cnn's tensors do not fit an mlp
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--split 'dev'" in err[0] and "nope.safetensors" in err[1] and "does not fit" in err[2]


def test_hugging_face_folder_with_a_csv_task(hf_family, capsys):
    """No --model: the folder's config.json builds the model; the CSV is tokenized by its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from mergescope.tasks.checkpoints import task_for
    from mergescope.io import load

    folder = hf_family.variants[0]
    assert main(["-q", "evaluate", str(folder), "--task", str(hf_family.csv), "--json", str(folder.parent / "e.json")]) == 0
    row = json.loads((folder.parent / "e.json").read_text())["rows"][0]
    task = task_for(load(folder), str(hf_family.csv))
    hf = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    x, y = (torch.cat(t) for t in zip(*task.batches("test")))
    with torch.no_grad():
        logits = hf(input_ids=x[:, 0], attention_mask=x[:, 1]).logits
    assert row["test"]["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-4)
    assert row["test"]["accuracy"] == pytest.approx((logits.argmax(-1) == y).double().mean().item())
