"""`mergescope study --config`: the same stages on a user's own checkpoints."""

import json
import re
import subprocess
import sys

import pytest
import torch

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.study.custom import read_config


@pytest.fixture(scope="module")
def user_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    task = ms.tasks.digits()
    parent = ms.tasks.build("mlp", width=32, seed=0)
    ms.tasks.train(parent, task, epochs=4, lr=5e-3, seed=0)
    ms.save(parent.state_dict(), root / "parent.safetensors")
    for i in range(3):
        child = ms.tasks.build("mlp", width=32)
        child.load_state_dict(parent.state_dict())
        ms.tasks.train(child, task, epochs=2, lr=2e-3, seed=10 + i)
        ms.save(child.state_dict(), root / f"ft{i}.safetensors")
    (root / "study.yaml").write_text(
        "model: mlp\nmodel_options: {width: 32}\ntask: digits\n"
        "checkpoints: [ft0.safetensors, ft1.safetensors, ft2.safetensors]\nbase: parent.safetensors\n"
        "path_points: 5\ncurve_epochs: 1\n")
    return root


def test_custom_study_runs_every_measurement_on_given_models(user_models):
    out = user_models / "report"
    result = subprocess.run([sys.executable, "-m", "mergescope", "study", "--config", str(user_models / "study.yaml"),
                             "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    one = {stage: results[stage]["replicates"][0] for stage in ("convexity", "connectivity", "merging")}
    assert results["replicates"] == 1 and len(results["merging"]["replicates"]) == 1
    assert set(one["convexity"]["paths"]) == {"ft0 - ft1", "ft0 - ft2", "ft1 - ft2"}
    assert one["connectivity"]["matrices"]["naive"]["names"] == ["ft0", "ft1", "ft2"]
    assert "skipped" in results["determinism"]
    methods = {r["method"] for r in one["merging"]["rows"]}
    assert {"ft0", "linear (uniform average)", "ties (density 0.5)", "ensemble (probs)", "ZipIt!"} <= methods
    # the uniform average row is the accuracy of the actual average of the three files
    states = [ms.load(user_models / f"ft{i}.safetensors") for i in range(3)]
    model = ms.tasks.build("mlp", width=32)
    model.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
    expected = ms.tasks.digits().evaluate(model)["accuracy"]
    row = next(r for r in one["merging"]["rows"] if r["method"] == "linear (uniform average)")
    assert row["accuracy"] == pytest.approx(expected)
    html = (out / "report.html").read_text()
    assert 'id="determinism"' in html and "training function" in html
    assert "your mlp models" in html and "digits model zoo" not in html
    assert re.findall(r"<h2>(\d+)\. ", html) == [str(i) for i in range(1, 7)]  # numbered consecutively


def test_custom_study_on_one_dimensional_inputs_honours_stages_and_seed(tmp_path):
    """A task whose inputs are not 8x8 images (MNIST-1D signals of length 40) gets a full report."""
    task = ms.tasks.get_task("mnist1d")
    for i in range(2):
        net = ms.tasks.build("mlp", width=16, in_features=40, seed=i)
        ms.tasks.train(net, task, epochs=1, lr=5e-3, seed=i)
        ms.save(net.state_dict(), tmp_path / f"m{i}.safetensors")
    (tmp_path / "s.yaml").write_text("model: mlp\nmodel_options: {width: 16, in_features: 40}\ntask: mnist1d\n"
                                     "checkpoints: [m0.safetensors, m1.safetensors]\npath_points: 3\ncurve_epochs: 1\n")
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "mergescope", "study", "--config", str(tmp_path / "s.yaml"),
                             "--out", str(out), "--stages", "why,merging", "--seed", "7"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seed"] == 7
    assert [s for s in ("convexity", "connectivity", "determinism", "directedness", "merging", "why")
            if s in results] == ["merging", "why"]
    templates = results["why"]["replicates"][0]["weights"]
    assert len(next(iter(templates.values()))["class_templates"]["m0"][0]) == 40
    html = (out / "report.html").read_text()
    assert re.findall(r"<h2>(\d+)\. ", html) == ["1", "2"] and (out / "figures" / "why_weights.png").exists()


def test_bad_study_configs_are_one_line_errors(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("model: mlp\ncheckpoints: [a.safetensors]\n")
    with pytest.raises(MergescopeError, match="at least 2"):
        read_config(bad)
    bad.write_text("model: mlp\ncheckpoints: [a, b]\ncolour: red\n")
    with pytest.raises(MergescopeError, match="colour"):
        read_config(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(MergescopeError, match="cannot read"):
        read_config(bad)
    bad.write_text("model: mlp\ncheckpoints: [missing1.safetensors, missing2.safetensors]\n")
    result = subprocess.run([sys.executable, "-m", "mergescope", "study", "--config", str(bad), "--out",
                             str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "missing1.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
