"""`mergescope landscape ...` end to end: tables, JSON and PNG outputs, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from mergescope.cli import main
from mergescope.io import load, save
from mergescope.landscape import interpolate
from mergescope.tasks import digits
from mergescope.tasks.checkpoints import model_for, model_metadata
from test_landscape_toys import trained

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in (0, 1, 2):
        path = folder / f"m{seed}.safetensors"
        save(trained("mlp", seed, width=32), path, metadata=model_metadata("mlp", {"width": 32, "depth": 2}))
        paths.append(path)
    return paths


def test_line_writes_json_and_png_matching_the_api(ckpts, tmp_path, capsys):
    out = tmp_path / "line"
    assert main(["landscape", "line", str(ckpts[0]), str(ckpts[1]), "--n", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loss barrier" in printed
    data = json.loads((out / "line.json").read_text())
    assert (out / "line.png").read_bytes()[:4] == b"\x89PNG"
    module, _, _ = model_for(load(ckpts[0]))
    api = interpolate(module, load(ckpts[0]), load(ckpts[1]), digits(), n=5)
    assert data["barrier_loss"] == pytest.approx(api.barrier_loss)
    assert f"{api.barrier_loss:.4f}" in printed


def test_matrix_writes_symmetric_matrix(ckpts, tmp_path):
    out = tmp_path / "matrix"
    assert main(["-q", "landscape", "matrix", *map(str, ckpts), "--n", "3", "--out", str(out)]) == 0
    data = json.loads((out / "matrix.json").read_text())
    assert data["names"] == ["m0", "m1", "m2"]
    loss = data["barrier_loss"]
    assert loss[0][1] == loss[1][0] and loss[2][2] == 0
    assert (out / "matrix.png").exists()


def test_mismatched_checkpoint_exits_2_with_one_line(ckpts, tmp_path, capsys):
    other = tmp_path / "wide.safetensors"
    save(trained("mlp", 0, width=32) | {"head.bias": torch.zeros(3)}, other,
         metadata=model_metadata("mlp", {"width": 32, "depth": 2}))
    assert main(["landscape", "line", str(ckpts[0]), str(other), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "head.bias" in err and "Traceback" not in err
