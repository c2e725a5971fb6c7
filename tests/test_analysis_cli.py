"""The ensemble/soup/analyse commands as a new user runs them on digits checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mergescope import ensemble, tasks
from mergescope.analysis.soups import soup
from mergescope.cli import main


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    paths = []
    for seed in range(3):
        path = folder / f"m{seed}.safetensors"
        assert main(["-q", "train", "--model", "mlp", "--width", "16", "--epochs", "2", "--seed", str(seed),
                     "-o", str(path)]) == 0
        paths.append(path)
    return paths


def states_of(paths):
    return [load_file(p) for p in paths]


def test_ensemble_command_reports_what_the_api_computes(checkpoints, tmp_path, capsys):
    out = tmp_path / "ens.json"
    assert main(["ensemble", *map(str, checkpoints), "--method", "probs", "--method", "vote", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "probs" in printed and "weight-average" in printed
    saved = json.loads(out.read_text())
    model, task = tasks.build("mlp", width=16), tasks.digits()
    direct = ensemble.evaluate(model, states_of(checkpoints), task, method="probs").to_dict()
    assert saved["results"][0] == direct
    assert [r["method"] for r in saved["results"]] == ["probs", "vote", "weight-average"]


def test_soup_command_writes_the_soup(checkpoints, tmp_path):
    out = tmp_path / "soup.safetensors"
    assert main(["-q", "soup", *map(str, checkpoints), "--kind", "uniform", "-o", str(out)]) == 0
    written = load_file(out)
    expected = soup(tasks.build("mlp", width=16), states_of(checkpoints), tasks.digits(), kind="uniform").state
    for k, v in expected.items():
        assert torch.equal(written[k], v)
    assert main(["-q", "ensemble", str(out), str(checkpoints[0])]) == 0  # the soup is a usable checkpoint


@pytest.mark.parametrize("args", [["weights"], ["scaling", "--factors", "0.9,1,1.1"], ["stitch", "--epochs", "1"],
                                  ["cka"], ["spaces"]])
def test_analyses_write_json_and_png(checkpoints, tmp_path, args):
    name, *options = args
    paths = checkpoints if name in ("weights", "spaces", "scaling") else checkpoints[:2]
    assert main(["-q", "analyse", name, *map(str, paths), "-o", str(tmp_path), *options]) == 0
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data and (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_user_errors_are_one_line_and_exit_2(checkpoints, tmp_path, capsys):
    assert main(["analyse", "cka", str(checkpoints[0]), str(tmp_path / "missing.safetensors")]) == 2
    assert main(["ensemble", str(checkpoints[0]), "--method", "median"]) == 2
    assert main(["analyse", "spaces", str(checkpoints[0]), "-o", str(tmp_path)]) == 2
    assert main(["analyse", "scaling", str(checkpoints[0]), "--factors", "a,b"]) == 2
    err = capsys.readouterr().err
    assert "missing.safetensors" in err and "median" in err and "Traceback" not in err
