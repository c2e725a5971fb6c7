"""`mergescope align` end to end: aligned checkpoint reproduces the API, barrier drops, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import mergescope as ms
from mergescope.cli import main
from mergescope.io import load, save
from mergescope.tasks.checkpoints import model_metadata

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("align_cli")
    task = ms.tasks.digits()
    paths = []
    for seed in (0, 1):
        model = ms.tasks.build("mlp", seed=seed, width=64)
        ms.tasks.train(model, task, epochs=10, seed=seed)
        path = folder / f"m{seed}.safetensors"
        save(model.state_dict(), path, metadata=model_metadata("mlp", {"width": 64, "depth": 2}))
        paths.append(path)
    return paths


def _midpoint_loss(sa, sb):
    m = ms.tasks.build("mlp", width=64)
    m.load_state_dict({k: (sa[k] + sb[k]) / 2 for k in sa})
    return ms.tasks.digits().evaluate(m)["loss"]


def test_align_weight_matches_the_api_and_lowers_the_barrier(ckpts, tmp_path, capsys):
    out = tmp_path / "b_aligned.safetensors"
    spec_json = tmp_path / "spec.json"
    assert main(["align", str(ckpts[0]), str(ckpts[1]), "-o", str(out), "--method", "weight",
                 "--spec-out", str(spec_json)]) == 0
    assert "layers.0.weight:0" in capsys.readouterr().out
    sa, sb, aligned = dict(load(ckpts[0])), dict(load(ckpts[1])), dict(load(out))
    spec = ms.align.permutation_spec(ms.tasks.build("mlp", width=64), torch.zeros(2, 64))
    expected = ms.align.apply(spec, ms.align.weight_matching(spec, sa, sb, seed=0), sb)
    assert all(torch.equal(aligned[k], expected[k]) for k in sa)
    assert _midpoint_loss(sa, aligned) < 0.5 * _midpoint_loss(sa, sb)
    assert json.loads(load(out).metadata["model"])["name"] == "mlp"  # later commands need no --model
    assert ms.align.PermutationSpec.from_dict(json.loads(spec_json.read_text())).perms == spec.perms


@pytest.mark.parametrize("method", ["activation", "ot"])
def test_other_methods_write_a_permuted_b(ckpts, tmp_path, method):
    out = tmp_path / f"{method}.safetensors"
    assert main(["-q", "align", str(ckpts[0]), str(ckpts[1]), "-o", str(out), "--method", method]) == 0
    sb, aligned = dict(load(ckpts[1])), dict(load(out))
    assert sorted(aligned["head.bias"].tolist()) == sorted(sb["head.bias"].tolist())
    assert torch.equal(torch.sort(aligned["layers.0.bias"]).values, torch.sort(sb["layers.0.bias"]).values)


def test_repair_writes_the_midpoint(ckpts, tmp_path):
    out = tmp_path / "merged.safetensors"
    assert main(["-q", "align", str(ckpts[0]), str(ckpts[1]), "-o", str(out), "--repair"]) == 0
    assert json.loads(load(out).metadata["align"])["repair"] is True
    merged = ms.tasks.build("mlp", width=64)
    merged.load_state_dict(dict(load(out)))
    assert ms.tasks.digits().evaluate(merged)["accuracy"] > 0.8


def test_bad_method_and_unsupported_model_fail_in_one_line(ckpts, tmp_path, capsys):
    assert main(["align", str(ckpts[0]), str(ckpts[1]), "-o", str(tmp_path / "x.safetensors"), "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err
    assert main(["align", str(ckpts[0]), str(ckpts[1]), "-o", str(tmp_path / "y.safetensors"), "--model", "cnn"]) == 2
    assert "Traceback" not in capsys.readouterr().err
