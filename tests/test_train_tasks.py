"""`mergescope train --task`: built-in tasks and data files; the zoo model fits the task's inputs and classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergescope.cli import main
from mergescope.io import load
from mergescope.tasks import get_task
from mergescope.tasks.checkpoints import model_for, model_spec_of
from mergescope.tasks.zoo import options_for_task


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """12 features, 3 classes decided by a fixed rule (learnable)."""
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1)
    np.savez(path, x=x, y=y)
    return path


def test_data_file_sizes_the_mlp_and_records_it(npz, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["train", "--task", str(npz), "--epochs", "3", "--width", "16", "-o", str(out)]) == 0
    ckpt = load(out)
    name, options = model_spec_of(ckpt)
    assert name == "mlp" and options["in_features"] == 12 and options["num_classes"] == 3
    assert ckpt["head.weight"].shape == (3, 16) and ckpt["layers.0.weight"].shape == (16, 12)
    module, _, _ = model_for(ckpt)
    module.load_state_dict({k: ckpt[k] for k in ckpt})
    task = get_task(str(npz))
    x, y = (torch.cat(t) for t in zip(*task.batches("test")))
    with torch.no_grad():
        accuracy = (module.eval()(x).argmax(-1) == y).double().mean().item()
    assert f"test accuracy {accuracy:.4f}" in capsys.readouterr().out
    assert json.loads(ckpt.metadata["train"])["epochs"] == 3 and ckpt.metadata["task"] == "d.npz"  # a file name, never a path (no host paths in checkpoints)


def test_builtin_tasks_keep_their_records(tmp_path):
    """digits checkpoints record exactly what they always did (no new options); an mnist1d mlp reads 40 inputs."""
    assert options_for_task("mlp", get_task("digits"), {}) == {}
    assert options_for_task("mlp", get_task("mnist1d"), {}) == {"in_features": 40}
    assert options_for_task("mlp", get_task("mnist1d"), {"in_features": 40}) == {}
    assert options_for_task("cnn1d", get_task("mnist1d"), {}) == {}
    out = tmp_path / "d.safetensors"
    assert main(["-q", "train", "--epochs", "1", "--width", "8", "-o", str(out)]) == 0
    assert json.loads(load(out).metadata["model"]) == {"name": "mlp", "options": {"depth": 2, "width": 8}}
    out = tmp_path / "m1.safetensors"
    assert main(["-q", "train", "--task", "mnist1d", "--classes", "0,1,2", "--epochs", "1", "--width", "8",
                 "-o", str(out)]) == 0
    ckpt = load(out)
    assert ckpt.metadata["task"] == "mnist1d[0,1,2]" and model_spec_of(ckpt)[1]["in_features"] == 40


def test_tasks_a_model_cannot_take_are_one_line(npz, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "x.safetensors"
    assert main(["train", "--task", str(npz), "--model", "cnn", "-o", str(out)]) == 2
    assert main(["train", "--task", str(npz), "--classes", "0,1", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "cannot take this file's inputs" in err[0] and "--classes works with" in err[1]
    assert not out.exists()


def test_analyse_weights_on_a_task_that_is_not_8x8_images(npz, tmp_path):
    """Unit templates and class directions of 12-feature inputs: drawn as 1 x 12 strips, no traceback."""
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"m{seed}.safetensors")
        assert main(["-q", "train", "--task", str(npz), "--epochs", "2", "--width", "16", "--seed", str(seed),
                     "-o", str(paths[-1])]) == 0
    out = tmp_path / "weights"
    assert main(["-q", "analyse", "weights", *map(str, paths), "--task", str(npz), "-o", str(out)]) == 0
    data = json.loads((out / "weights.json").read_text())
    assert all(len(row) == 12 for row in data["class_templates"]["average"])  # one value per input feature
    assert len(data["class_templates"]["average"]) == 3 and (out / "weights.png").stat().st_size > 0
