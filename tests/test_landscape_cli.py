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


def _read(out, name):
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    return json.loads((out / f"{name}.json").read_text())


def test_curve_with_activation_alignment(ckpts, tmp_path, capsys):
    out = tmp_path / "curve"
    assert main(["landscape", "curve", str(ckpts[0]), str(ckpts[1]), "--align", "activation", "--epochs", "1",
                 "--n", "5", "--out", str(out)]) == 0
    data = _read(out, "curve")
    assert data["align"] == "activation" and data["aligned_line"] is not None
    assert data["barrier_loss"] < data["line"]["barrier_loss"]
    assert "line after activation alignment" in capsys.readouterr().out


def test_plane_one_and_three_checkpoints(ckpts, tmp_path):
    out = tmp_path / "plane"
    assert main(["-q", "landscape", "plane", str(ckpts[0]), "--grid", "4", "--out", str(out)]) == 0
    data = _read(out, "plane")
    assert data["kind"] == "filter-normalized" and len(data["loss"]) == 4
    assert main(["-q", "landscape", "plane", *map(str, ckpts), "--grid", "3", "--out", str(out)]) == 0
    data = _read(out, "plane")
    assert [a["name"] for a in data["anchors"]] == ["m0", "m1", "m2"]
    assert main(["landscape", "plane", str(ckpts[0]), str(ckpts[1]), "--out", str(out)]) == 2


def test_sharpness_matches_the_api(ckpts, tmp_path, capsys):
    from mergescope.landscape import hessian_eigenvalues

    out = tmp_path / "sharp"
    assert main(["landscape", "sharpness", str(ckpts[0]), "--k", "2", "--samples", "8", "--out", str(out)]) == 0
    data = _read(out, "sharpness")
    module, _, _ = model_for(load(ckpts[0]))
    api = hessian_eigenvalues(module, load(ckpts[0]), digits(), k=2)
    assert data["eigenvalues"]["eigenvalues"] == pytest.approx(list(api.eigenvalues), rel=1e-6)
    printed = capsys.readouterr().out
    assert data["trace"]["samples"] == 8 and "eigenvalue 1" in printed and "residual" in printed
    assert data["eigenvalues"]["converged"] is True and len(data["eigenvalues"]["residuals"]) == 2
    tight = tmp_path / "tight"
    assert main(["-q", "landscape", "sharpness", str(ckpts[0]), "--k", "2", "--samples", "0", "--tol", "1e-9",
                 "--out", str(tight)]) == 0
    values = _read(tight, "sharpness")["eigenvalues"]
    assert values["tol"] == 1e-9 and all(r <= 1e-9 * abs(v) for v, r in zip(values["eigenvalues"], values["residuals"]))
    assert main(["landscape", "sharpness", str(ckpts[0]), "--tol", "nan", "--out", str(tight)]) == 2


def test_stability_and_bad_ks(tmp_path):
    out = tmp_path / "stab"
    assert main(["-q", "landscape", "stability", "--width", "16", "--ks", "0,1", "--epochs", "2", "--n", "3",
                 "--out", str(out)]) == 0
    assert _read(out, "stability")["ks"] == [0, 1]
    assert main(["landscape", "stability", "--ks", "a,b", "--out", str(out)]) == 2


def test_taskvec_reads_tasks_from_checkpoints(ckpts, tmp_path, capsys):
    from mergescope.tasks import train

    folder = tmp_path / "ft"
    paths = []
    for classes in ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)):
        model, _, _ = model_for(load(ckpts[0]))
        model.load_state_dict(dict(load(ckpts[0]).items()))
        task = digits(classes=classes)
        train(model, task, epochs=1, lr=3e-3, seed=1)
        path = folder / f"d{classes[0]}.safetensors"
        save(model.state_dict(), path, metadata=model_metadata("mlp", {"width": 32, "depth": 2}, task=task.name))
        paths.append(path)
    out = tmp_path / "tv"
    assert main(["landscape", "taskvec", str(ckpts[0]), *map(str, paths), "--scales", "0,0.5,1", "--out", str(out)]) == 0
    data = _read(out, "taskvec")
    assert data["tasks"] == {"d0": "digits[0,1,2,3,4]", "d5": "digits[5,6,7,8,9]"}
    assert data["scales"] == [0.0, 0.5, 1.0] and "negation" in capsys.readouterr().out


def test_line_with_robust_path(ckpts, tmp_path, capsys):
    out = tmp_path / "robust"
    assert main(["landscape", "line", str(ckpts[0]), str(ckpts[1]), "--n", "3", "--robust-eps", "0.1",
                 "--robust-steps", "2", "--out", str(out)]) == 0
    data = _read(out, "line")
    assert data["robust"]["eps"] == 0.1 and all(r >= p for r, p in zip(data["robust"]["loss"], data["loss"]))
    assert "PGD eps=0.1" in capsys.readouterr().out


def test_curve_midpoint_checkpoint_feeds_a_three_model_plane(ckpts, tmp_path):
    mid = tmp_path / "mid.safetensors"
    out = tmp_path / "c"
    assert main(["-q", "landscape", "curve", str(ckpts[0]), str(ckpts[1]), "--epochs", "1", "--n", "3",
                 "--save-midpoint", str(mid), "--out", str(out)]) == 0
    data = _read(out, "curve")
    # The curve's middle point (t = 1/2) is the saved checkpoint, evaluated by the plain path code.
    module, _, _ = model_for(load(mid))
    path = interpolate(module, load(mid), load(mid), digits(), n=2)
    assert path.loss[0] == pytest.approx(data["curve"]["loss"][1], rel=1e-5)
    assert main(["-q", "landscape", "plane", str(ckpts[0]), str(ckpts[1]), str(mid), "--grid", "3",
                 "--out", str(out)]) == 0
    assert [a["name"] for a in _read(out, "plane")["anchors"]] == ["m0", "m1", "mid"]


def test_stability_seeds_a_user_factory_like_train(tmp_path, monkeypatch):
    """A package.module:factory model is initialised from --seed (tasks.seeded_model), so runs repeat."""
    (tmp_path / "stabzoo.py").write_text("import mergescope as ms\n"
                                         "def small(**kw):\n"
                                         "    return ms.tasks.build('mlp', width=8, **kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        assert main(["-q", "landscape", "stability", "--model", "stabzoo:small", "--ks", "0,1", "--epochs", "2",
                     "--n", "3", "--out", str(out)]) == 0
        runs.append((out / "stability.json").read_text())
    assert runs[0] == runs[1]


def test_one_training_fallback_for_models_outside_the_zoo():
    from mergescope.tasks import TRAIN_DEFAULTS, train_defaults
    from mergescope.tasks.zoo import FALLBACK_TRAIN

    assert train_defaults("mlp") == TRAIN_DEFAULTS["mlp"]
    assert train_defaults("mypkg.models:net") == FALLBACK_TRAIN
    train_defaults("mypkg.models:net")["epochs"] = 1  # a copy: the fallback itself never changes
    assert FALLBACK_TRAIN["epochs"] == 30
