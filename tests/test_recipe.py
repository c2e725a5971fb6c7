"""Recipes: MergeKit YAML read unchanged, one-line errors, parameter filters and gradients."""

from __future__ import annotations

import pytest
import torch

from mergescope import recipe as R
from mergescope.errors import MergescopeError
from mergescope.io import save
from mergescope.merge import plan as P

TIES = """
models:
  - model: {d}/a
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {d}/b
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: {d}/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


@pytest.fixture
def folder(tmp_path):
    """Three 3-layer toy checkpoints with Llama-like names."""
    g = torch.Generator().manual_seed(0)
    for name in ("base", "a", "b"):
        state = {"model.embed_tokens.weight": torch.randn(8, 4, generator=g)}
        for i in range(3):
            state[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(4, 4, generator=g)
            state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(6, 4, generator=g)
        state["model.norm.weight"] = torch.randn(4, generator=g)
        save(state, tmp_path / name)
    return tmp_path


def test_reads_mergekit_yaml_file_text_and_mapping(folder):
    path = folder / "r.yml"
    path.write_text(TIES.format(d=folder))
    from_file, from_text = R.read(path), R.read(TIES.format(d=folder))
    assert from_file.merge_method == from_text.merge_method == "ties"
    assert from_file.models[1].parameters["weight"] == [0, 0.3, 0.7, 1]
    assert from_file.dtype == "float16" and from_file.parameters == {"normalize": True, "int8_mask": True}
    assert R.read(str(path)).text == path.read_text()
    assert R.read({"merge_method": "linear", "models": [{"model": "x"}]}).models[0].model == "x"


@pytest.mark.parametrize("text, message", [
    ("merge_method: linear\nmodels: [{model: a}]\nmodle: 1\n", r"unknown key 'modle' at modle; valid keys: merge_method, models"),
    ("merge_method: linear\nmodels: [{model: a, paramters: {weight: 1}}]\n", r"unknown key 'paramters' at models.0.paramters; valid keys: model, parameters"),
    ("models: [{model: a}]\n", r"missing key 'merge_method'"),
    ("merge_method: linear\n", "exactly one of 'models' or 'slices'"),
    ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: union\ntokenizer: {source: base}\n",
     "either tokenizer_source or tokenizer"),
    ("merge_method: linear\nmodels: [{model: a}]\ndtype: float8\n", "dtype 'float8'"),
    ("merge_method: linear\nmodules: {text: {}}\n", "'modules'"),
    ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]\n",
     "same number of layers"),
    ("merge_method: linear\nmodels: [{model: a+b+lora}]\n", "LoRA adapter applied to a base: one"),
    ("merge_method: [linear\n", "not valid YAML"),
    ("- 1\n- 2\n", "must be a YAML mapping"),
])
def test_bad_recipes_give_one_line_errors(text, message):
    with pytest.raises(MergescopeError, match=message) as info:
        R.read(text)
    assert "\n" not in str(info.value)


def test_gradient_interpolates_over_t():
    convert = R.converter("w", float, "x")
    assert R.evaluate([0.0, 1.0], "t", 0.25, convert) == 0.25
    assert R.evaluate([0.0, 0.5, 0.3, 0.7, 1.0], "t", 0.5, convert) == pytest.approx(0.3)
    assert R.evaluate([0.0, 0.5, 0.3, 0.7, 1.0], "t", 0.6, convert) == pytest.approx(0.3 + 0.4 * 0.4)
    assert R.evaluate([2.0, 4.0], "t", 1.0, convert) == 4.0
    assert R.evaluate(["1e-1", "3e-1"], "t", 0.5, convert) == pytest.approx(0.2)  # numeric strings interpolate
    assert R.evaluate([True, False], "t", 0.4, R.converter("b", bool, "x")) is True  # booleans pick


def test_filters_match_substrings_first_wins():
    setting = R.Recipe.model_validate({"merge_method": "x", "models": [{"model": "a"}], "parameters": {
        "t": [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]}}).parameters["t"]
    convert = R.converter("t", float, "x")
    assert R.evaluate(setting, "model.layers.0.self_attn.q_proj.weight", 0.5, convert) == 0.1
    assert R.evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0.5, convert) == 0.5
    assert R.evaluate(setting, "model.norm.weight", 0.0, convert) == 0.5
    only = R.Recipe.model_validate({"merge_method": "x", "models": [{"model": "a"}],
                                    "parameters": {"t": [{"filter": "mlp", "value": 1.0}]}}).parameters["t"]
    assert R.evaluate(only, "model.norm.weight", 0.0, convert) is None  # falls through to the next scope


def test_weights_that_do_not_parse_name_the_parameter(folder):
    text = f"merge_method: linear\nmodels:\n  - {{model: {folder}/a, parameters: {{weight: abc}}}}\n"
    with pytest.raises(MergescopeError, match="parameter 'weight' must be float, got 'abc'"):
        P.build(R.read(text))


def test_plan_resolves_per_model_gradients_and_precedence(folder):
    plan = P.build(R.read(TIES.format(d=folder)))
    jobs = {j.name: j for j in plan.jobs}
    q2 = jobs["model.layers.2.self_attn.q_proj.weight"]  # t = 1
    q1 = jobs["model.layers.1.self_attn.q_proj.weight"]  # t = 0.5
    embed = jobs["model.embed_tokens.weight"]  # outside the layers: t = 0
    assert [p.get("weight") for p in q2.per_input] == [1.0, 1.0, None]
    assert q1.per_input[1]["weight"] == pytest.approx(0.5) and q1.per_input[0]["density"] == pytest.approx(0.7)
    assert embed.per_input[1]["weight"] == 0.0 and embed.per_input[0]["density"] == 1.0
    assert q1.base == 2 and q1.shared == {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": True}
    assert q1.dtype == torch.float16


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nmodels: [{{model: {d}/a, parameters: {{weight: 1}}}}]\n", "needs a base_model"),
    ("merge_method: ties\nbase_model: {d}/base\nmodels: [{{model: {d}/a}}]\n", "needs parameter 'weight'"),
    ("merge_method: linear\nmodels: [{{model: {d}/a, parameters: {{weight: 1, t: 2}}}}]\n",
     "parameter 't' is not used by linear; valid: weight, normalize"),
    ("merge_method: slerp\nbase_model: {d}/base\nmodels: [{{model: {d}/a}}, {{model: {d}/b}}]\nparameters: {{t: 0.5}}\n",
     "takes exactly 2 models, got 3"),
    ("merge_method: linear\nmodels: [{{model: org/some-model}}]\n", "nothing is downloaded"),
])
def test_plan_errors(folder, text, message):
    with pytest.raises(MergescopeError, match=message):
        P.build(R.read(text.format(d=folder)))


def test_slices_renumber_layers(folder):
    text = (f"merge_method: passthrough\nslices:\n  - sources: [{{model: {folder}/a, layer_range: [0, 2]}}]\n"
            f"  - sources: [{{model: {folder}/b, layer_range: [1, 3]}}]\n")
    plan = P.build(R.read(text))
    names = [j.name for j in plan.jobs]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "model.norm.weight"
    by_name = {j.name: j for j in plan.jobs}
    assert by_name["model.layers.3.mlp.up_proj.weight"].inputs == ((plan.models.index(f"{folder}/b"), "model.layers.2.mlp.up_proj.weight"),)
    assert plan.num_layers == 4 and plan.stacked


@pytest.mark.parametrize("name,vocab", [("output.weight", True), ("model.output.weight", True),
                                        ("lm_head.weight", True), ("model.embed_tokens.weight", True),
                                        ("blk.0.attn_output.weight", False), ("model.layers.0.mlp.up_proj.weight", False),
                                        ("output.weight.bias", False)])
def test_vocabulary_tensor_names(name, vocab):
    """``output.weight`` (the GGUF-style head) counts as a vocabulary tensor; a layer's ``attn_output`` does not."""
    assert bool(P.VOCAB.search(name)) is vocab


def test_a_multistage_file_given_as_one_recipe_says_how_to_run_it(tmp_path):
    path = tmp_path / "multi.yml"
    path.write_text("name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\nmerge_method: linear\nmodels: [{model: a}]\n")
    with pytest.raises(MergescopeError, match="holds 2 YAML documents, a multi-stage recipe") as e:
        R.read(path)
    assert "\n" not in str(e.value)
