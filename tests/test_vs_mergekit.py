"""mergescope vs MergeKit 0.1.5 on the same recipes: every output tensor bit-identical (fp32, and bf16 inputs).

Tiny Llama checkpoints are built once per session with transformers (random init, a seed,
``save_pretrained``; nothing downloaded); MergeKit runs in-process through its Python API
(``run_merge`` with ``random_seed=0, lazy_unpickle=True``), the same code ``mergekit-yaml`` runs.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

pytest.importorskip("mergekit")
pytest.importorskip("transformers")

from safetensors.torch import load_file

import mergescope as ms
from mergescope.errors import MergescopeError

LAYERS = 4


@pytest.fixture(scope="session")
def llamas(tmp_path_factory):
    """base + three fine-tunes (base + small seeded noise) of a 4-layer Llama, hidden 32, vocab 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    for i, name in enumerate(["base", "a", "b", "c"]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
    return root


RECIPES = {
    "linear": """
        models:
          - {model: D/a, parameters: {weight: 1.0}}
          - {model: D/b, parameters: {weight: 0.5}}
          - {model: D/c, parameters: {weight: [0.1, 0.9]}}
        merge_method: linear
    """,
    "linear_unnormalized_bf16": """
        models:
          - {model: D/a, parameters: {weight: 0.3}}
          - {model: D/b, parameters: {weight: 0.5}}
        merge_method: linear
        parameters: {normalize: false}
        dtype: bfloat16
        out_dtype: float32
    """,
    "task_arithmetic_negation": """
        models:
          - {model: D/a, parameters: {weight: 1.0}}
          - {model: D/b, parameters: {weight: -0.5}}
        base_model: D/base
        merge_method: task_arithmetic
        parameters: {lambda: 0.8}
    """,
    "ties": """
        models:
          - model: D/a
            parameters: {weight: 1.0, density: 0.5}
          - model: D/b
            parameters: {weight: [0.2, 0.8], density: 0.7}
          - model: D/c
            parameters:
              weight:
                - {filter: self_attn, value: 0.3}
                - value: 0.6
              density: 0.4
        merge_method: ties
        base_model: D/base
        parameters: {normalize: true, int8_mask: true}
        dtype: float32
    """,
    "breadcrumbs_ties": """
        models:
          - {model: D/a, parameters: {weight: 1.0, density: 0.6, gamma: 0.05}}
          - {model: D/b, parameters: {weight: 0.7, density: 0.8, gamma: 0.02}}
        merge_method: breadcrumbs_ties
        base_model: D/base
    """,
    "breadcrumbs": """
        models:
          - {model: D/a, parameters: {weight: 1.0, density: 0.6}}
          - {model: D/b, parameters: {weight: 0.7, density: 0.8}}
        merge_method: breadcrumbs
        base_model: D/base
        parameters: {rescale: true}
    """,
    "slerp_gradient": """
        slices:
          - sources:
              - {model: D/base, layer_range: [0, 4]}
              - {model: D/a, layer_range: [0, 4]}
        merge_method: slerp
        base_model: D/base
        parameters:
          t:
            - {filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}
            - {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}
            - value: 0.5
        dtype: float32
    """,
    "passthrough_stack": """
        slices:
          - sources: [{model: D/a, layer_range: [0, 3]}]
          - sources: [{model: D/b, layer_range: [1, 4]}]
        merge_method: passthrough
        dtype: float32
    """,
    "model_stock": """
        models: [{model: D/a}, {model: D/b}, {model: D/c}]
        merge_method: model_stock
        base_model: D/base
    """,
    "nuslerp_base": """
        models:
          - {model: D/a, parameters: {weight: 0.3}}
          - {model: D/b, parameters: {weight: 0.7}}
        merge_method: nuslerp
        base_model: D/base
    """,
    "multislerp": """
        models:
          - {model: D/a, parameters: {weight: 0.3}}
          - {model: D/b, parameters: {weight: 0.5}}
          - {model: D/c, parameters: {weight: 0.2}}
        merge_method: multislerp
    """,
    "karcher": """
        models: [{model: D/a}, {model: D/b}, {model: D/c}]
        merge_method: karcher
    """,
    "nearswap": """
        models: [{model: D/a}]
        base_model: D/base
        merge_method: nearswap
        parameters: {t: 0.01}
    """,
    "sce": """
        models: [{model: D/a}, {model: D/b}, {model: D/c}]
        base_model: D/base
        merge_method: sce
        parameters: {select_topk: 0.5}
    """,
    "dare_ties_density1": """
        models:
          - {model: D/a, parameters: {weight: 0.6, density: 1.0}}
          - {model: D/b, parameters: {weight: 0.4, density: 1.0}}
        base_model: D/base
        merge_method: dare_ties
    """,
}


def _recipe(name: str, root) -> str:
    return textwrap.dedent(RECIPES[name]).replace("D/", f"{root}/")


def _mergekit(text: str, out) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(random_seed=0, lazy_unpickle=True, quiet=True, copy_tokenizer=False,
                           write_model_card=False)
    run_merge(config, str(out), options=options)


def _state(folder) -> dict[str, torch.Tensor]:
    return dict(ms.load(folder).items())


def _outcome(run, *args):
    """What ``run(*args)`` returned, or the exception it raised (a refusal is an outcome to compare)."""
    try:
        return run(*args)
    except Exception as e:  # noqa: BLE001 - MergeKit's own refusals count as outcomes
        return e


def _mergekit_folder(text: str, out):
    _mergekit(text, out)
    return out


def _mergescope_folder(text: str, out):
    ms.merge(text, out, seed=0)
    return out


def run_both(texts: dict[str, str], root) -> dict[str, tuple]:
    """Every recipe through MergeKit and mergescope once (one torch thread): name -> (MergeKit's output
    folder or the exception it raised, mergescope's folder or its exception)."""
    torch.set_num_threads(1)
    return {name: (_outcome(_mergekit_folder, text, root / f"mk-{name}"),
                   _outcome(_mergescope_folder, text, root / f"ms-{name}")) for name, text in texts.items()}


@pytest.fixture(scope="module")
def outputs(llamas, tmp_path_factory):
    """Run every recipe through both tools once; returns name -> (mergekit folder, mergescope folder)."""
    done = run_both({name: _recipe(name, llamas) for name in RECIPES}, tmp_path_factory.mktemp("outputs"))
    for name, pair in done.items():
        assert not any(isinstance(x, Exception) for x in pair), f"{name}: {pair}"
    return done


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_same_tensors_as_mergekit(outputs, name):
    mk_dir, ms_dir = outputs[name]
    theirs, ours = load_file(mk_dir / "model.safetensors"), _state(ms_dir)
    assert sorted(theirs) == sorted(ours)
    for key, expected in theirs.items():
        assert ours[key].dtype == expected.dtype, key
        assert ours[key].shape == expected.shape, key
        diff = (ours[key].double() - expected.double()).abs().max().item()
        assert torch.equal(ours[key], expected), f"{name}: {key} differs by {diff}"


def test_merge_is_not_trivial(outputs, llamas):
    """Guard against comparing two copies of an input: merged tensors differ from every input."""
    ours = _state(outputs["ties"][1])
    for model in ("base", "a", "b", "c"):
        other = _state(llamas / model)
        assert (ours["model.layers.1.mlp.up_proj.weight"] - other["model.layers.1.mlp.up_proj.weight"]).abs().max() > 1e-4


def test_passthrough_stacking_rewrites_layer_count(outputs, llamas):
    mk_dir, ms_dir = outputs["passthrough_stack"]
    assert json.loads((ms_dir / "config.json").read_text())["num_hidden_layers"] == 6
    assert json.loads((mk_dir / "config.json").read_text())["num_hidden_layers"] == 6
    stacked, b = _state(ms_dir), _state(llamas / "b")
    assert torch.equal(stacked["model.layers.5.self_attn.q_proj.weight"], b["model.layers.3.self_attn.q_proj.weight"])


def test_vocabulary_mismatch_is_refused(llamas, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=130, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    text = f"models: [{{model: {llamas}/a}}, {{model: {tmp_path}/wide}}]\nmerge_method: karcher\n"
    with pytest.raises(MergescopeError, match="(embed_tokens|lm_head).*vocabulary sizes differ"):
        ms.merge(text, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [(40, 100), (500,), (3, 50, 4)])
def test_della_keep_probabilities_match_mergekit(shape):
    """DELLA masks cannot match bit for bit (see docs/merge.md); their per-entry keep rates must."""
    from mergekit.sparsify import della_magprune

    from mergescope.merge.methods import della_mask, random_stream

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    trials = 300
    ours = sum(della_mask(x.abs(), 0.5, random_stream(s), epsilon=0.3).reshape(shape).float()
               for s in range(trials)) / trials
    torch.manual_seed(0)
    theirs = sum((della_magprune(x, 0.5, 0.3) != 0).float() for _ in range(trials)) / trials
    assert abs(float(ours.mean()) - float(theirs.mean())) < 0.01
    assert float(torch.corrcoef(torch.stack([ours.reshape(-1), theirs.reshape(-1)]))[0, 1]) > 0.95
