"""Fisher merging and RegMean from recipes (CLI and ms.merge) and sweeps.

References: the API (``merge.data_aware``) on the same models and data; RegMean's closed form on the
first Linear layer recomputed in numpy from the raw digits inputs; the Fisher recomputed with a plain
per-example autograd loop (no vmap) and the weighted average in numpy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import mergescope as ms
from mergescope import sweep
from mergescope.cli import main
from mergescope.errors import MergescopeError
from mergescope.io import load, save
from mergescope.merge.data_aware import fisher_merge, regmean_merge
from mergescope.tasks import build, digits
from mergescope.tasks.checkpoints import model_metadata

OPTS = {"width": 16, "depth": 1}
N = 96  # calibration examples


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Two small MLP checkpoints from different seeds that record their zoo model."""
    root = tmp_path_factory.mktemp("zoo")
    for seed in range(2):
        model = build("mlp", seed=seed, **OPTS)
        save(model.state_dict(), root / f"m{seed}.safetensors", metadata=model_metadata("mlp", OPTS))
    return root


def states(zoo):
    return [{k: v.clone() for k, v in load(zoo / f"m{i}.safetensors").items()} for i in range(2)]


def recipe(zoo, method, **extra):
    data = {"merge_method": method, "task": "digits",
            "models": [{"model": str(zoo / "m0.safetensors")}, {"model": str(zoo / "m1.safetensors")}], **extra}
    path = zoo / f"{method}-{abs(hash(json.dumps(extra, sort_keys=True)))}.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args) -> int:
    return main(["-q", *map(str, args)])


def test_regmean_recipe_cli_equals_api_and_numpy_closed_form(zoo, tmp_path):
    path = recipe(zoo, "regmean", parameters={"alpha": 0.7, "examples": N})
    assert cli("merge", path, tmp_path / "out.safetensors") == 0
    merged = load(tmp_path / "out.safetensors")
    api = regmean_merge(build("mlp", **OPTS), states(zoo), digits(), alpha=0.7, n_examples=N)
    assert set(merged) == set(api)
    for k in api:
        torch.testing.assert_close(merged[k], api[k], rtol=0, atol=0)
    assert merged.metadata["merge_method"] == "regmean"
    assert json.loads(merged.metadata["model"]) == {"name": "mlp", "options": OPTS}  # the zoo record passed on

    # closed form for the head, in numpy: its inputs are each model's own hidden activations
    x = np.concatenate([b[0].double().numpy() for b in digits().batches("train")])[:N]
    grams, ws = [], []
    for s in states(zoo):
        sd = {k: v.double().numpy() for k, v in s.items()}
        h = np.maximum(x @ sd["layers.0.weight"].T + sd["layers.0.bias"], 0)
        ha = np.hstack([h, np.ones((N, 1))])
        g = ha.T @ ha
        grams.append(0.7 * g + 0.3 * np.diag(np.diag(g)))
        ws.append(np.hstack([sd["head.weight"], sd["head.bias"][:, None]]))
    lhs = sum(grams)
    eps = 1e-6 * np.diag(lhs).mean()
    rhs = sum(g @ w.T for g, w in zip(grams, ws)) + eps * np.mean(ws, 0).T
    solution = np.linalg.solve(lhs + eps * np.eye(len(lhs)), rhs).T
    np.testing.assert_allclose(merged["head.weight"].double().numpy(), solution[:, :-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(merged["head.bias"].double().numpy(), solution[:, -1], rtol=1e-4, atol=1e-5)
    assert np.abs(solution[:, :-1] - np.mean(ws, 0)[:, :-1]).max() > 1e-3  # not just the average: the test can fail


def test_fisher_recipe_api_equals_api_and_per_example_autograd(zoo, tmp_path):
    path = recipe(zoo, "fisher", parameters={"examples": 24, "batch_size": 10},
                  models=[{"model": str(zoo / "m0.safetensors"), "parameters": {"weight": 1.0}},
                          {"model": str(zoo / "m1.safetensors"), "parameters": {"weight": 3.0}}])
    result = ms.merge(path, tmp_path / "fisher")
    assert result.method == "fisher"
    merged = load(tmp_path / "fisher")
    model = build("mlp", **OPTS)
    api = fisher_merge(model, states(zoo), digits(), weights=[1.0, 3.0], n_examples=24, batch_size=10)
    for k in api:
        torch.testing.assert_close(merged[k], api[k], rtol=0, atol=0)
    # independent: Fisher by a plain autograd loop, one example at a time, and the formula in numpy
    x, y = next(iter(digits().batches("train", batch_size=24)))
    fishers = []
    for s in states(zoo):
        model.load_state_dict(s)
        model.eval()
        acc = {k: np.zeros(v.shape) for k, v in model.named_parameters()}
        for i in range(24):
            model.zero_grad()
            F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            for k, p in model.named_parameters():
                acc[k] += p.grad.double().numpy() ** 2
        fishers.append({k: v / 24 for k, v in acc.items()})
    lam = [0.25, 0.75]
    for k in fishers[0]:
        f = [fi[k] + 1e-6 for fi in fishers]
        th = [s[k].double().numpy() for s in states(zoo)]
        ref = (lam[0] * f[0] * th[0] + lam[1] * f[1] * th[1]) / (lam[0] * f[0] + lam[1] * f[1])
        np.testing.assert_allclose(merged[k].double().numpy(), ref, rtol=1e-4, atol=1e-6)


def test_per_model_calibration_tasks_equal_the_api(zoo, tmp_path):
    """Each model's Fisher on its own data (the paper's setting): models[i].parameters.task."""
    path = recipe(zoo, "fisher", parameters={"examples": 40},
                  models=[{"model": str(zoo / "m0.safetensors"), "parameters": {"task": "digits[0,1,2,3,4]"}},
                          {"model": str(zoo / "m1.safetensors"), "parameters": {"task": "digits[5,6,7,8,9]"}}])
    assert cli("merge", path, tmp_path / "own.safetensors") == 0
    own = load(tmp_path / "own.safetensors")
    tasks = [digits(classes=(0, 1, 2, 3, 4)), digits(classes=(5, 6, 7, 8, 9))]
    api = fisher_merge(build("mlp", **OPTS), states(zoo), None, n_examples=40, tasks=tasks)
    shared = fisher_merge(build("mlp", **OPTS), states(zoo), digits(), n_examples=40)
    for k in api:
        torch.testing.assert_close(own[k], api[k], rtol=0, atol=0)
    assert max(float((api[k] - shared[k]).abs().max()) for k in api) > 1e-4  # the tasks were used


@pytest.mark.parametrize("key,value,words", [
    ("task", "os:system", "cannot choose code"),
    ("task", "mergescope.tasks:digits", "cannot choose code"),
    ("model", "subprocess:run", "cannot choose code"),
    ("model", "not-a-zoo-model", "not a zoo model"),
])
def test_recipe_naming_a_factory_is_refused_in_one_line(zoo, tmp_path, capsys, key, value, words):
    path = recipe(zoo, "regmean", **{key: value})
    capsys.readouterr()
    assert cli("merge", path, tmp_path / "out.safetensors") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and value in err[0], err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("extra,words", [
    ({"task": None}, "needs calibration data"),
    ({"parameters": {"alpha": 1.5}}, "'alpha' must be in [0, 1]"),
    ({"parameters": {"density": 0.5}}, "not used by regmean"),
    ({"base_model": "x.safetensors"}, "no base_model"),
    ({"models": [{"model": "m.safetensors", "parameters": {"task": "os:system"}}]}, "cannot choose code"),
    ({"parameters": {"task": "digits"}}, "top-level key 'task'"),
])
def test_bad_data_aware_recipes_are_one_line(zoo, extra, words):
    data = {"merge_method": "regmean", "task": "digits", "models": [{"model": str(zoo / "m0.safetensors")}], **extra}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(MergescopeError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ms.merge(data, zoo / "never.safetensors")
    assert not (zoo / "never.safetensors").exists()


def test_task_key_is_refused_for_streamed_methods(zoo):
    with pytest.raises(MergescopeError, match="data-aware"):
        ms.merge({"merge_method": "linear", "task": "digits", "models": [{"model": str(zoo / "m0.safetensors")}]},
                 zoo / "never.safetensors")


def test_sweep_merge_grid_runs_regmean(zoo, tmp_path):
    spec = {"kind": "merge_grid", "checkpoints": [str(zoo / "m0.safetensors"), str(zoo / "m1.safetensors")],
            "methods": [{"method": "regmean", "grid": {"alpha": [0.5, 0.9], "examples": [N]}}]}
    path = tmp_path / "sweep.yml"
    path.write_text(yaml.safe_dump(spec))
    rows = sorted(sweep.run(path, tmp_path / "rows.jsonl", sweep.LocalExecutor(workers=1)).rows,
                  key=lambda r: r["params"]["alpha"])
    assert [r["params"]["alpha"] for r in rows] == [0.5, 0.9]
    for row in rows:  # the row's accuracy is the API merge's, evaluated here
        merged = regmean_merge(build("mlp", **OPTS), states(zoo), digits(), alpha=row["params"]["alpha"], n_examples=N)
        model = build("mlp", **OPTS)
        model.load_state_dict(merged)
        assert row["test_accuracy"] == pytest.approx(digits().evaluate(model, "test")["accuracy"], abs=1e-6)


def test_sweep_refuses_a_bad_regmean_grid(zoo, tmp_path):
    spec = {"kind": "merge_grid", "checkpoints": [str(zoo / "m0.safetensors")],
            "methods": [{"method": "regmean", "grid": {"alpha": [2.0]}}]}
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MergescopeError, match="alpha"):
        sweep.run(path, tmp_path / "rows.jsonl", sweep.LocalExecutor(workers=1))


@pytest.fixture(scope="module")
def hf_pair(minilm_dir, tmp_path_factory):
    """Two short MiniLM fine-tunes as Hugging Face folders and their CSV task (tests/hfutil.py)."""
    pytest.importorskip("transformers")
    from hfutil import build_family

    return build_family(tmp_path_factory.mktemp("hf_pair"), minilm_dir, seeds=(1, 2), steps=2)


def test_regmean_recipe_on_hugging_face_folders_with_a_data_file(hf_pair, tmp_path):
    """No 'model' key: the folders' config.json builds the model; the CSV is tokenized by the first folder."""
    from mergescope.tasks.checkpoints import fitted_state, model_for, task_for

    data = {"merge_method": "regmean", "task": str(hf_pair.csv), "parameters": {"examples": 8, "batch_size": 8},
            "models": [{"model": str(f)} for f in hf_pair.variants]}
    ms.merge(data, tmp_path / "out")
    merged = load(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    ckpts = [load(f) for f in hf_pair.variants]
    module = model_for(ckpts[0])[0]
    api = regmean_merge(module, [fitted_state(module, dict(c), "c") for c in ckpts], task_for(ckpts[0], str(hf_pair.csv)),
                        n_examples=8, batch_size=8)
    name = "bert.encoder.layer.4.attention.output.dense.weight"  # fine-tuned (the first layers are frozen)
    torch.testing.assert_close(merged[name], api[name], rtol=0, atol=0)
    torch.testing.assert_close(merged["classifier.weight"], api["classifier.weight"], rtol=0, atol=0)
    assert (merged[name] - (ckpts[0][name] + ckpts[1][name]) / 2).abs().max() > 1e-6  # solved, not averaged


def test_fisher_on_a_model_vmap_cannot_run_is_one_line(hf_pair, tmp_path, capsys):
    path = tmp_path / "fisher.yml"
    path.write_text(yaml.safe_dump({"merge_method": "fisher", "task": str(hf_pair.csv), "parameters": {"examples": 2},
                                    "models": [{"model": str(f)} for f in hf_pair.variants]}))
    capsys.readouterr()
    assert cli("merge", path, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vmap" in err[0], err
    assert not (tmp_path / "out").exists()


def test_regmean_stage_of_a_multistage_recipe_is_merged_then_reused(zoo, tmp_path, capsys):
    m0, m1 = (str(zoo / f"m{i}.safetensors") for i in range(2))
    text = (f"name: rm\nmerge_method: regmean\ntask: digits\nparameters: {{examples: {N}}}\n"
            f"models: [{{model: {m0}}}, {{model: {m1}}}]\n---\nmerge_method: linear\n"
            f"models: [{{model: rm, parameters: {{weight: 1.0}}}}, {{model: {m0}, parameters: {{weight: 1.0}}}}]\n")
    (tmp_path / "two.yml").write_text(text)
    assert cli("merge", tmp_path / "two.yml", tmp_path / "out") == 0
    api = regmean_merge(build("mlp", **OPTS), states(zoo), digits(), n_examples=N)
    final = load(tmp_path / "out")
    for k in api:
        torch.testing.assert_close(final[k], (api[k] + states(zoo)[0][k]) / 2)
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "two.yml"), str(tmp_path / "out")]) == 0
    assert "0 of 2 stages merged, 2 reused" in capsys.readouterr().out
