"""CLI gaps of issue 19: method options of align (ste --epochs/--lr, cca --reg), curve --pam-step,
matrix --align, --model-option, --json of merge/align/train; each checked against the API."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch

import mergescope as ms
from mergescope.cli import main
from mergescope.cli.options import model_options, option_value
from mergescope.errors import MergescopeError
from mergescope.io import load, save
from mergescope.tasks.checkpoints import model_metadata

torch.set_num_threads(1)
WIDTH = 32


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gaps")
    task = ms.tasks.digits()
    paths = []
    for seed in (0, 1, 2):
        model = ms.tasks.build("mlp", seed=seed, width=WIDTH)
        ms.tasks.train(model, task, epochs=10, seed=seed)
        path = folder / f"m{seed}.safetensors"
        save(model.state_dict(), path, metadata=model_metadata("mlp", {"width": WIDTH, "depth": 2}))
        paths.append(path)
    return paths


def _module(path):
    model = ms.tasks.build("mlp", width=WIDTH)
    model.load_state_dict(dict(load(path)))
    return model


def _api_align(ckpts, method, **params):
    a, b = _module(ckpts[0]), _module(ckpts[1])
    task = ms.tasks.digits()
    spec = ms.align.permutation_spec(a, torch.zeros(2, 64))
    return ms.align.align_models(spec, a, b, method=method, task=task, seed=0, **params)


def _strict(path):
    """Parse a file as strict JSON (NaN/Infinity refused)."""
    def refuse(token):
        raise ValueError(f"non-strict JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_align_ste_epochs_lr_reach_the_method_and_json_reports_it(ckpts, tmp_path, capsys):
    out, report = tmp_path / "ste.safetensors", tmp_path / "ste.json"
    assert main(["align", str(ckpts[0]), str(ckpts[1]), "-o", str(out), "--method", "ste", "--epochs", "2",
                 "--lr", "0.01", "--batch-size", "64", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    aligned = dict(load(out))
    api = _api_align(ckpts, "ste", epochs=2, lr=0.01, batch_size=64)
    assert all(torch.equal(aligned[k], api.state[k]) for k in aligned)
    weight = _api_align(ckpts, "weight")
    assert any(not torch.equal(aligned[k], weight.state[k]) for k in aligned)  # the issue: it was weight matching
    for other in ({"epochs": 1, "lr": 0.01}, {"epochs": 2, "lr": 1e-4}):  # both options reached the method
        moved = _api_align(ckpts, "ste", batch_size=64, **other).state
        assert any(not torch.equal(aligned[k], moved[k]) for k in aligned), other
    data = _strict(report)
    assert data["method"] == "ste" and data["params"] == {"epochs": 2, "lr": 0.01, "batch_size": 64} and data["out"] == str(out)
    assert data["model"] == "mlp" and data["model_options"]["width"] == WIDTH
    moved = {p: int((idx != torch.arange(len(idx))).sum()) for p, idx in api.perms.items()}
    assert {p: r["moved"] for p, r in data["permutations"].items()} == moved
    assert {p: r["units"] for p, r in data["permutations"].items()} == {p: len(i) for p, i in api.perms.items()}
    for p, r in data["permutations"].items():  # the table printed the same numbers
        assert re.search(rf"{re.escape(p)}\s+\S?\s*{r['units']}\s+\S?\s*{r['moved']}", printed), p
    assert data["seconds"] > 0 and f"({data['seconds']:.2f}s)" in printed


def test_align_cca_reg_equals_the_api_and_matters(ckpts, tmp_path):
    out = tmp_path / "cca.safetensors"
    assert main(["-q", "align", str(ckpts[0]), str(ckpts[1]), "-o", str(out), "--method", "cca", "--reg", "0.1"]) == 0
    merged = dict(load(out))
    api = _api_align(ckpts, "cca", reg=0.1).state
    default = _api_align(ckpts, "cca").state
    assert all(torch.equal(merged[k], api[k].to(merged[k].dtype)) for k in merged)
    assert any(not torch.allclose(merged[k], default[k].to(merged[k].dtype)) for k in merged)


def test_align_refuses_an_option_the_method_lacks(ckpts, tmp_path, capsys):
    code = main(["align", str(ckpts[0]), str(ckpts[1]), "-o", str(tmp_path / "x.safetensors"), "--epochs", "3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--epochs" in err and "weight" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_curve_pam_step_equals_the_api(ckpts, tmp_path):
    out = tmp_path / "curve"
    assert main(["-q", "landscape", "curve", str(ckpts[0]), str(ckpts[1]), "--align", "pam", "--pam-step", "200",
                 "--epochs", "3", "--n", "5", "-o", str(out)]) == 0
    data = json.loads((out / "curve.json").read_text())
    task, model = ms.tasks.digits(), ms.tasks.build("mlp", width=WIDTH)
    api = ms.landscape.fit_curve(model, load(ckpts[0]), load(ckpts[1]), task, align="pam", pam_step=200.0, epochs=3,
                                 n=5)
    default = ms.landscape.fit_curve(model, load(ckpts[0]), load(ckpts[1]), task, align="pam", epochs=3, n=5)
    assert data["curve"]["loss"] == list(api.curve.loss) != list(default.curve.loss)  # the step reached PAM
    assert data["aligned_line"]["loss"] == list(api.aligned_line.loss)
    assert main(["-q", "landscape", "curve", str(ckpts[0]), str(ckpts[1]), "--pam-step", "200", "-o", str(out)]) == 2


def test_matrix_align_weight_equals_aligning_each_pair_then_interpolating(ckpts, tmp_path):
    out = tmp_path / "matrix"
    assert main(["-q", "landscape", "matrix", *map(str, ckpts), "--align", "weight", "--n", "5", "-o", str(out)]) == 0
    data = json.loads((out / "matrix.json").read_text())
    assert data["align"] == "weight"
    task, model = ms.tasks.digits(), ms.tasks.build("mlp", width=WIDTH)
    spec = ms.align.permutation_spec(model, torch.zeros(2, 64))
    states = [dict(load(p)) for p in ckpts]
    plain = ms.landscape.barrier_matrix(model, states, task, n=5)
    for i in range(3):
        for j in range(i + 1, 3):
            aligned = ms.align.apply(spec, ms.align.weight_matching(spec, states[i], states[j], seed=0), states[j])
            path = ms.landscape.interpolate(model, states[i], aligned, task, n=5)
            assert data["barrier_loss"][i][j] == pytest.approx(path.barrier_loss, abs=1e-6)
            assert data["barrier_acc"][j][i] == pytest.approx(path.barrier_acc, abs=1e-6)
            assert path.barrier_loss < plain.loss[i][j]  # alignment did something
    assert main(["-q", "landscape", "matrix", *map(str, ckpts), "--align", "zipit", "-o", str(out)]) == 2


FACTORY = textwrap.dedent("""
    from torch import nn

    SEEN = []

    def make(width=16, act="relu", bias=True, scale=1.0):
        SEEN.append({"width": width, "act": act, "bias": bias, "scale": scale})
        return nn.Sequential(nn.Linear(64, width, bias=bias), nn.Tanh() if act == "tanh" else nn.ReLU(),
                             nn.Linear(width, 10))
""")


def test_model_option_reaches_a_user_factory_and_train_json(tmp_path, monkeypatch, capsys):
    (tmp_path / "gapsfactory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import gapsfactory

    out, report = tmp_path / "f.safetensors", tmp_path / "train.json"
    assert main(["train", "--model", "gapsfactory:make", "--model-option", "width=24", "--model-option", "act=tanh",
                 "--model-option", "bias=false", "--model-option", "scale=0.5", "--epochs", "1", "-o", str(out),
                 "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert gapsfactory.SEEN[-1] == {"width": 24, "act": "tanh", "bias": False, "scale": 0.5}
    state = dict(load(out))
    assert state["0.weight"].shape == (24, 64) and "0.bias" not in state
    data = _strict(report)
    assert data["options"] == {"width": 24, "act": "tanh", "bias": False, "scale": 0.5}
    assert data["model"] == "gapsfactory:make" and data["parameters"] == sum(t.numel() for t in state.values())
    model = gapsfactory.make(width=24, act="tanh", bias=False)
    model.load_state_dict(state)
    metrics = ms.tasks.digits().evaluate(model, "test")
    assert data["metrics"]["test"]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-12)
    assert f"test accuracy {data['metrics']['test']['accuracy']:.4f}" in printed
    # the same options reach the factory from align and landscape (one path: model_for)
    gapsfactory.SEEN.clear()
    assert main(["-q", "align", str(out), str(out), "-o", str(tmp_path / "al.safetensors"), "--model",
                 "gapsfactory:make", "--model-option", "width=24", "--model-option", "bias=false",
                 "--model-option", "act=tanh"]) == 0
    assert gapsfactory.SEEN and all(s["width"] == 24 and s["bias"] is False for s in gapsfactory.SEEN)
    gapsfactory.SEEN.clear()
    assert main(["-q", "landscape", "line", str(out), str(tmp_path / "al.safetensors"), "--n", "3", "--model",
                 "gapsfactory:make", "--model-option", "width=24", "--model-option", "bias=false",
                 "-o", str(tmp_path / "line")]) == 0
    assert gapsfactory.SEEN[0]["width"] == 24 and gapsfactory.SEEN[0]["bias"] is False
    # ... and from evaluate, ensemble/soup/analyse and diagnose
    for argv in (["evaluate", str(out)], ["ensemble", str(out), str(tmp_path / "al.safetensors")],
                 ["analyse", "scaling", str(out), str(tmp_path / "al.safetensors"), "-o", str(tmp_path / "sc")],
                 ["diagnose", str(out), str(tmp_path / "al.safetensors"), "--task", "digits", "--sample", "64",
                  "--points", "3", "-o", str(tmp_path / "dg")]):
        gapsfactory.SEEN.clear()
        assert main(["-q", *argv, "--model", "gapsfactory:make", "--model-option", "width=24",
                     "--model-option", "bias=false", "--model-option", "act=tanh"]) == 0, argv
        assert gapsfactory.SEEN and all(s["width"] == 24 and s["bias"] is False for s in gapsfactory.SEEN), argv


@pytest.mark.parametrize("argv, word", [
    (["align", "{a}", "{b}", "-o", "{t}/x.safetensors", "--model-option", "colour=3"], "colour"),
    (["landscape", "line", "{a}", "{b}", "-o", "{t}/l", "--model-option", "colour=3"], "colour"),
    (["align", "{a}", "{b}", "-o", "{t}/x.safetensors", "--model-option", "width"], "key=value"),
    (["align", "{a}", "{b}", "-o", "{t}/x.safetensors", "--width", "8", "--model-option", "width=9"], "once"),
    (["train", "-o", "{t}/x.safetensors", "--model-option", "depth=nan"], "finite"),
])
def test_bad_model_options_are_one_line_exit_2(ckpts, tmp_path, capsys, argv, word):
    argv = [s.format(a=ckpts[0], b=ckpts[1], t=tmp_path) for s in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert word in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_option_values_parse_like_json():
    assert [option_value(v) for v in ("3", "-2", "0.25", "1e-3", "true", "False", "null", "relu", "[1, 2]",
                                      '{"a": 1}')] == [3, -2, 0.25, 1e-3, True, False, None, "relu", [1, 2], {"a": 1}]
    assert model_options(["depth=3"], width=8, dim=None) == {"width": 8, "depth": 3}
    for bad in ("inf", "[1, NaN]", "[1,"):
        with pytest.raises(MergescopeError):
            option_value(bad)


def test_merge_json_equals_the_api_result(ckpts, tmp_path, capsys):
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - {{model: {ckpts[0]}, parameters: {{weight: 1}}}}\n"
                      f"  - {{model: {ckpts[1]}, parameters: {{weight: 3}}}}\n")
    out, report = tmp_path / "m.safetensors", tmp_path / "merge.json"
    assert main(["merge", str(recipe), str(out), "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    data = _strict(report)
    api = ms.merge(recipe, tmp_path / "api.safetensors").to_dict()
    for key in ("method", "tensors", "bytes_read", "bytes_written", "seed", "reused", "warnings"):
        assert data[key] == api[key], key
    assert data["out"] == str(out) and [p.split("/")[-1] for p in data["files"]] == ["m.safetensors"]
    assert f"{data['tensors']:,}" in printed and f"{data['seconds']:.2f} s" in printed
    before = ckpts[0].read_bytes()
    assert main(["merge", str(recipe), str(tmp_path / "n.safetensors"), "--json", str(ckpts[0])]) == 2
    assert ckpts[0].read_bytes() == before and not (tmp_path / "n.safetensors").exists()
