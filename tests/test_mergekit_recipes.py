"""MergeKit's own recipes through both tools: its test recipes (tests/test_basic_merges.py) and its
examples/ folder, written out here as YAML (the recipe texts are the compatibility contract; model
names point at tiny models built below, layer ranges scaled to them).

Each recipe runs through MergeKit 0.1.5 in-process (``run_merge``, what ``mergekit-yaml`` runs) and
through ``ms.merge``. Expected, per recipe: the same tensor names and dtypes, and

* ``exact``: the same bytes;
* ``promoted``: MergeKit 0.1.5 writes float32 tensors although the recipe says bfloat16 (a float32
  factor inside ramplus_tl / arcee_fusion promotes its result); mergescope writes bfloat16: the bytes
  of MergeKit's values rounded to bfloat16;
* ``random``: DARE/DELLA masks come from different generators: only names, shapes, dtypes;
* ``refused``: both tools refuse it (mergescope in one line).

Nothing is downloaded: models are built with transformers from a seed.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

pytest.importorskip("mergekit")
pytest.importorskip("transformers")

from safetensors.torch import load_file
from test_vs_mergekit import (  # MergeKit in-process, as mergekit-yaml runs it
    _mergekit,
    run_both,
)

import mergescope as ms
from mergescope.errors import MergescopeError


def _perturbed(model, seed: int, scale: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """MergeKit's test models, tiny: three Llamas (its make_picollama sizes), two Granites, a GPT-2."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mk_zoo")
    llama = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                        num_hidden_layers=2)
    granite = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                            num_key_value_heads=2, num_hidden_layers=2)
    gpt2 = GPT2Config(n_embd=32, n_head=4, n_layer=4, n_positions=64, vocab_size=64)
    for i, name in enumerate(["model_a", "model_b", "model_c", "model_d"]):
        torch.manual_seed(0)  # one init, each model a seeded perturbation of it (fine-tunes of one base)
        model = _perturbed(LlamaForCausalLM(llama), 100 + i)
        model.save_pretrained(root / name)
    for i, name in enumerate(["granite_a", "granite_b"]):
        torch.manual_seed(1)
        _perturbed(GraniteForCausalLM(granite), 200 + i).save_pretrained(root / name)
    torch.manual_seed(2)
    GPT2LMHeadModel(gpt2).save_pretrained(root / "gpt2_like")
    return root


TWO = """
    models:
      - {model: M/model_a, parameters: {weight: 0.6}}
      - {model: M/model_b, parameters: {weight: 0.4}}
    dtype: bfloat16
"""


def _two(method: str, base: str | None = None, params: str | None = None, a: str = "model_a",
         b: str = "model_b", weights=(0.6, 0.4)) -> str:
    """MergeKit's ``two_model_config``: models a (weight 0.6) and b (0.4), bfloat16."""
    text = (f"merge_method: {method}\nmodels:\n  - {{model: M/{a}, parameters: {{weight: {weights[0]}}}}}\n"
            f"  - {{model: M/{b}, parameters: {{weight: {weights[1]}}}}}\ndtype: bfloat16\n")
    if base:
        text += f"base_model: M/{base}\n"
    if params:
        text += f"parameters: {params}\n"
    return text


# name -> (recipe, expectation). From MergeKit's tests/test_basic_merges.py (TestBasicMerges,
# TestGraniteMerges) and examples/*.yml.
RECIPES: dict[str, tuple[str, str]] = {
    "granite_copy": ("merge_method: passthrough\nmodels: [{model: M/granite_a}]\ndtype: bfloat16\n", "exact"),
    "granite_linear": (_two("linear", a="granite_a", b="granite_b"), "exact"),
    "granite_slerp": (("merge_method: slerp\nbase_model: M/granite_a\nmodels: [{model: M/granite_a}, "
                      "{model: M/granite_b}]\nparameters: {t: 0.5}\ndtype: bfloat16\n"), "exact"),
    "gpt2_copy": ("merge_method: passthrough\nmodels: [{model: M/gpt2_like}]\ndtype: bfloat16\n", "exact"),
    "gpt2_stack": (("merge_method: passthrough\nslices:\n  - sources: [{model: M/gpt2_like, layer_range: [0, 4]}]\n"
                   "  - sources: [{model: M/gpt2_like, layer_range: [0, 4]}]\ndtype: bfloat16\n"), "exact"),
    "passthrough_scale": (("merge_method: passthrough\nmodels:\n  - model: M/model_a\n    parameters:\n"
                          "      scale:\n        - {filter: o_proj, value: 0}\n        - {value: 1}\n"), "exact"),
    "linear": (_two("linear"), "exact"),
    "slerp": (_two("slerp", base="model_a", params="{t: 0.35}"), "exact"),
    **{f"nuslerp_{base or 'nobase'}_{rw}_{fl}": (
        _two("nuslerp", base=base, params=f"{{nuslerp_row_wise: {rw}, nuslerp_flatten: {fl}}}"), "exact")
       for base in (None, "model_c") for rw in ("false", "true") for fl in ("false", "true")},
    "nuslerp_zero_sum": (_two("nuslerp", base="model_c", params="{nuslerp_row_wise: false, nuslerp_flatten: false}",
                              weights=(-0.5, 0.5)), "exact"),
    "task_arithmetic": (_two("task_arithmetic", base="model_c"), "exact"),
    "breadcrumbs": (_two("breadcrumbs", base="model_c"), "exact"),
    "ties": (_two("ties", base="model_c", params="{density: 0.3}"), "exact"),
    "sce": (_two("sce", base="model_c", params="{select_topk: 0.5}"), "exact"),
    "ram": (_two("ram", base="model_c"), "exact"),
    "ramplus_tl": (_two("ramplus_tl", base="model_c", params="{r: 0.05, alpha: 1.0}"), "promoted"),
    "multislerp": (_two("multislerp", base="model_c"), "exact"),
    "dare_ties": (_two("dare_ties", base="model_c", params="{density: 0.66}"), "random"),
    "model_stock": (_two("model_stock", base="model_a", a="model_b", b="model_c"), "exact"),
    "model_stock_filterwise": (_two("model_stock", base="model_a", a="model_b", b="model_c",
                                    params="{filter_wise: true}"), "exact"),
    "arcee_fusion": (_two("arcee_fusion", base="model_a"), "promoted"),
    "nearswap": (_two("nearswap", base="model_a", params="{t: 0.0001}"), "exact"),
    "della": (_two("della", base="model_c", params="{density: 0.66, epsilon: 0.05, lambda: 0.5}"), "random"),
    "della_invalid_epsilon": (_two("della", base="model_c", params="{density: 0.66, epsilon: 1.35, lambda: 0.5}"),
                              "refused"),
    "karcher": (_two("karcher", base="model_c", params="{max_iter: 5, tol: 1.0e-5}"), "exact"),
    # examples/
    "example_arcee_fusion": (("models:\n  - model: M/model_a\n  - model: M/model_b\nmerge_method: arcee_fusion\n"
                             "base_model: M/model_a\ndtype: bfloat16\n"), "promoted"),
    "example_bio_merge": ("""
        models:
          - model: M/model_a
            parameters:
              density: 0.5
              weight: 0.5
          - model: M/model_b
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: M/model_c
        parameters:
          normalize: false
          int8_mask: true
        dtype: float16
    """, "exact"),
    "example_gradient_slerp": ("""
        slices:
          - sources:
              - model: M/model_a
                layer_range: [0, 2]
              - model: M/model_b
                layer_range: [0, 2]
        merge_method: slerp
        base_model: M/model_a
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5 # fallback for rest of tensors
        dtype: float16
    """, "exact"),
    "example_linear": ("""
        models:
          - model: M/model_a
            parameters:
              weight: 1.0
          - model: M/model_b
            parameters:
              weight: 0.3
          - model: M/model_c
            parameters:
              weight: 0.5
        merge_method: linear
        dtype: float16
    """, "exact"),
    "example_orcamini_platy_stack": ("""
        slices:
          - sources:
            - model: M/model_a
              layer_range: [0, 2]
          - sources:
            - model: M/model_b
              layer_range: [1, 2]
        merge_method: passthrough
        dtype: float16
    """, "exact"),
    "example_ties": ("""
        models:
          - model: M/model_a
            parameters:
              density: [1, 0.7, 0.1] # density gradient
              weight: 1.0
          - model: M/model_b
            parameters:
              density: 0.5
              weight: [0, 0.3, 0.7, 1] # weight gradient
          - model: M/model_c
            parameters:
              density: 0.33
              weight:
                - filter: mlp
                  value: 0.5
                - value: 0
        merge_method: ties
        base_model: M/model_d
        parameters:
          normalize: true
          int8_mask: true
        dtype: float16
    """, "exact"),
}


def _text(name: str, root) -> str:
    return textwrap.dedent(RECIPES[name][0]).replace("M/", f"{root}/")


def _tensors(folder) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def results(zoo, tmp_path_factory):
    """Every recipe through both tools: name -> (MergeKit tensors or its error, ours or our error, our folder)."""
    root = tmp_path_factory.mktemp("mk_recipes")
    done = {}
    for name, (theirs, ours) in run_both({n: _text(n, zoo) for n in RECIPES}, root).items():
        assert not isinstance(ours, Exception) or isinstance(ours, MergescopeError), ours  # never a traceback
        done[name] = tuple(x if isinstance(x, Exception) else _tensors(x) for x in (theirs, ours)) + (root / f"ms-{name}",)
    return done


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe_agrees_with_mergekit(results, name):
    theirs, ours, _ = results[name]
    expect = RECIPES[name][1]
    if expect == "refused":
        assert isinstance(theirs, Exception) and isinstance(ours, MergescopeError)
        assert "\n" not in str(ours)
        return
    assert not isinstance(theirs, Exception), f"MergeKit failed: {theirs}"
    assert not isinstance(ours, Exception), f"mergescope failed: {ours}"
    assert sorted(ours) == sorted(theirs)
    for key, expected in theirs.items():
        got = ours[key]
        if expect == "promoted":
            assert (expected.dtype, got.dtype) == (torch.float32, torch.bfloat16), key
            expected = expected.to(got.dtype)
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), key
        if expect != "random":
            assert torch.equal(got, expected), f"{key}: max diff {(got.double() - expected.double()).abs().max()}"


def test_gpt2_stack_loads_with_the_stacked_layer_count(results):
    """The 4 + 4 GPT-2 stack: config n_layer rewritten (not only num_hidden_layers), so transformers loads
    all 8 layers and no stacked tensor is ignored (MergeKit's own test checks n_layer == 24 for 12 + 12)."""
    from transformers import AutoModelForCausalLM

    folder = results["gpt2_stack"][2]
    assert json.loads((folder / "config.json").read_text())["n_layer"] == 8
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert model.config.n_layer == 8 and len(model.transformer.h) == 8
    assert not info["unexpected_keys"] and not info["missing_keys"]
    state = _tensors(folder)
    assert torch.equal(model.transformer.h[7].mlp.c_fc.weight.detach(), state["h.3.mlp.c_fc.weight"].float()
                       if "h.3.mlp.c_fc.weight" in state else state["transformer.h.7.mlp.c_fc.weight"].float())


def test_weight_on_methods_without_weight_is_ignored_with_one_warning(zoo, tmp_path, caplog):
    """MergeKit's test recipes give every model a weight, also for slerp/nearswap/karcher/model_stock/sce."""
    with caplog.at_level("WARNING", logger="mergescope.merge"):
        result = ms.merge(_text("slerp", zoo), tmp_path / "out")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "parameter 'weight' is not used by slerp; ignored" in lines[0]
    assert "models[0].parameters" in lines[0] and result.warnings == tuple(lines)


def test_model_card_states_the_recipe_not_the_bases(results, zoo, tmp_path):
    folder = results["ties"][2]
    card = (folder / "README.md").read_text()
    assert "`ties`" in card and "arXiv:2306.01708" in card and "density: 0.3" in card
    assert "model_c` (base)" in card
    base = tmp_path / "base_with_card"
    base.mkdir()
    for f in (zoo / "model_c").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    (base / "README.md").write_text("# model_c\nThe base model's own card.\n")
    ms.merge(_text("ties", zoo).replace(f"{zoo}/model_c", str(base)), tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "own card" not in card and "`ties`" in card


def test_inspect_counts_buffers_apart_from_parameters(zoo, tmp_path, capsys):
    """BERT-style ``position_ids`` (int64) and GPT-2's causal ``attn.bias`` are buffers, not parameters:
    the parameter count equals what transformers' ``model.parameters()`` reports."""
    from safetensors.torch import save_file
    from transformers import GPT2LMHeadModel

    from mergescope.cli import main

    model = GPT2LMHeadModel.from_pretrained(zoo / "gpt2_like")
    state = {k: v.contiguous() for k, v in model.transformer.state_dict().items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))  # as older transformers saved it
    state["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    save_file(state, tmp_path / "m.safetensors")
    assert main(["inspect", str(tmp_path / "m.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in model.transformer.parameters())
    assert info["buffers"] == 64 * 64 + 64


# docs/multimerge.md's example (mergekit-multi), the final merge made deterministic (ties, not dare_ties).
MULTI = """
name: first-merge
merge_method: linear
models:
  - model: M/model_a
  - model: M/model_b
parameters:
  weight: 0.5
---
name: second-merge
merge_method: slerp
base_model: first-merge  # Reference previous merge
models:
  - model: M/model_c
parameters:
  t: 0.5
---
# Final merge (no name)
merge_method: ties
base_model: M/model_d
models:
  - model: second-merge
    parameters:
      density: 0.6
      weight: 0.5
  - model: M/model_a
    parameters:
      density: 0.8
      weight: 0.5
"""


def test_multistage_recipe_matches_mergekit_multi_and_resumes_per_stage(zoo, tmp_path, capsys):
    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main as mergekit_multi

    from mergescope.cli import main

    recipe = tmp_path / "multi.yml"
    recipe.write_text(textwrap.dedent(MULTI).replace("M/", f"{zoo}/"))
    run = CliRunner().invoke(mergekit_multi, [str(recipe), "-I", str(tmp_path / "mk-stages"), "--out-path",
                                              str(tmp_path / "mk-out"), "--random-seed", "0", "--lazy-unpickle"])
    assert run.exit_code == 0, run.output
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    for mk, ours in ((tmp_path / "mk-stages" / "first-merge", tmp_path / "out.stages" / "first-merge"),
                     (tmp_path / "mk-stages" / "second-merge", tmp_path / "out.stages" / "second-merge"),
                     (tmp_path / "mk-out", tmp_path / "out")):
        theirs, mine = _tensors(mk), _tensors(ours)
        assert sorted(theirs) == sorted(mine)
        assert all(torch.equal(theirs[k], mine[k]) for k in theirs), ours
    capsys.readouterr()
    # a rerun reuses every stage; editing the second stage reruns it and the final one, not the first
    before = (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.count("reused (same recipe") == 3
    assert (tmp_path / "out" / "model.safetensors").stat().st_mtime_ns == before
    recipe.write_text(recipe.read_text().replace("t: 0.5", "t: 0.25"))
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2  # out exists, from another recipe
    assert "not this stage's merge" in capsys.readouterr().err
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--force"]) == 0
    printed = capsys.readouterr().out
    assert "first-merge: merging" in printed and "second-merge: merging" in printed  # --force reruns all


@pytest.mark.parametrize("text, message", [
    ("name: a\nmerge_method: linear\nmodels: [{model: x}]\n---\nname: a\nmerge_method: linear\nmodels: [{model: x}]\n",
     "stage name 'a' is used twice"),
    ("merge_method: linear\nmodels: [{model: x}]\n---\nname: b\nmerge_method: linear\nmodels: [{model: x}]\n",
     "only the last stage may be unnamed"),
    ("name: ../up\nmerge_method: linear\nmodels: [{model: x}]\n---\nmerge_method: linear\nmodels: [{model: x}]\n",
     "stage name must be"),
    ("- 1\n---\nmerge_method: linear\n", "document 1 must be a YAML mapping"),
])
def test_bad_multistage_recipes_are_one_line(tmp_path, capsys, text, message):
    from mergescope.cli import main

    (tmp_path / "multi.yml").write_text(text)
    assert main(["merge", str(tmp_path / "multi.yml"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.stages").exists()


@pytest.fixture(scope="module")
def partial_zoo(zoo, tmp_path_factory):
    """Tensors only some models have: a RoBERTa base saved with the ``position_ids`` buffer and two
    fine-tunes without it (newer transformers do not save it); a Llama fine-tune with its lm_head left
    out (tied embeddings: MergeKit reads ``model.embed_tokens.weight`` instead)."""
    from safetensors.torch import save_file
    from transformers import RobertaConfig, RobertaForMaskedLM

    root = tmp_path_factory.mktemp("partial")
    cfg = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40)
    for i, name in enumerate(["rb_base", "rb_ft1", "rb_ft2"]):
        torch.manual_seed(3)
        model = RobertaForMaskedLM(cfg)
        if i:
            _perturbed(model, 300 + i)
        model.save_pretrained(root / name)
        state = load_file(root / name / "model.safetensors")
        state.pop("roberta.embeddings.position_ids", None)
        if not i:
            state["roberta.embeddings.position_ids"] = torch.arange(40).unsqueeze(0)
        save_file(state, root / name / "model.safetensors", metadata={"format": "pt"})
    (root / "llama_tied").mkdir()
    for f in (zoo / "model_b").iterdir():
        (root / "llama_tied" / f.name).write_bytes(f.read_bytes())
    state = load_file(root / "llama_tied" / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, root / "llama_tied" / "model.safetensors", metadata={"format": "pt"})
    return root


PARTIAL = {
    "linear_base_last": "merge_method: linear\nmodels: [{model: P/rb_ft1, parameters: {weight: 1}}, "
                        "{model: P/rb_base, parameters: {weight: 1}}]\n",
    "slerp_base_second": "merge_method: slerp\nbase_model: P/rb_base\nmodels: [{model: P/rb_ft1}, {model: P/rb_base}]\n"
                         "parameters: {t: 0.5}\n",
    "ties": "merge_method: ties\nbase_model: P/rb_base\nmodels: [{model: P/rb_ft1, parameters: {weight: 1, density: 0.5}},"
            " {model: P/rb_ft2, parameters: {weight: 1, density: 0.5}}]\n",
    "model_stock": "merge_method: model_stock\nbase_model: P/rb_base\nmodels: [{model: P/rb_ft1}, {model: P/rb_ft2}]\n",
    "nearswap": "merge_method: nearswap\nbase_model: P/rb_base\nmodels: [{model: P/rb_ft1}]\nparameters: {t: 0.001}\n",
    "tied_linear": "merge_method: linear\nmodels: [{model: M/model_a, parameters: {weight: 0.6}}, "
                   "{model: P/llama_tied, parameters: {weight: 0.4}}]\n",
    "tied_slerp": "merge_method: slerp\nbase_model: P/llama_tied\nmodels: [{model: M/model_a}, {model: P/llama_tied}]\n"
                  "parameters: {t: 0.3}\n",
}


@pytest.mark.parametrize("name", list(PARTIAL))
def test_tensor_only_some_models_have_follows_mergekit(zoo, partial_zoo, tmp_path, name):
    """The base's position_ids are kept whether or not the base is listed first (they used to be dropped
    or refused); a tied head reads the embedding. Same bytes as MergeKit; the one explained difference:
    MergeKit leaves out RoBERTa's ``lm_head.decoder.bias`` (its architecture file omits it although
    every input has it), mergescope keeps every tensor all inputs have."""
    text = PARTIAL[name].replace("P/", f"{partial_zoo}/").replace("M/", f"{zoo}/")
    _mergekit(text, tmp_path / "mk")
    ms.merge(text, tmp_path / "ms")
    theirs, ours = _tensors(tmp_path / "mk"), _tensors(tmp_path / "ms")
    assert set(ours) - set(theirs) <= {"lm_head.decoder.bias"} and set(theirs) <= set(ours)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    if name.startswith("tied"):
        assert "lm_head.weight" in ours
    else:
        assert torch.equal(ours["roberta.embeddings.position_ids"], torch.arange(40).unsqueeze(0))
