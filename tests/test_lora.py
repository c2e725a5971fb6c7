"""LoRA / PEFT adapters against PEFT itself, MergeKit and dense merges of the full fine-tuned weights.

A tiny Llama (hidden 32, 2 layers) and three real PEFT adapters (``get_peft_model`` + ``LoraConfig``,
seeded non-zero B, ``save_pretrained``; one with rsLoRA, one of rank 2) are built once. References:
``merge_and_unload`` (PEFT's own merged weights), ``add_weighted_adapter`` (svd, ties_svd),
MergeKit's ``base+adapter`` merge, mergescope's merge of the dense fine-tuned models, and a float64
numpy truncated SVD (Eckart-Young) for extraction.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from hostile import assert_refused, attack, run_inprocess

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.lora import Adapter, extract_lora, merge_adapters

ADAPTERS = {  # name: (LoraConfig options, seed)
    "ad1": ({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}, 1),
    "ad2": ({"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "up_proj"]}, 2),
    "ad3": ({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"]}, 3),
}


def _config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def _base_model(root):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(root / "base")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base/, adapters ad1..ad3/ (PEFT save_pretrained) and ft1..ft3/ (PEFT merge_and_unload, saved)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).save_pretrained(root / "base")
    for i, (name, (options, seed)) in enumerate(ADAPTERS.items(), start=1):
        model = get_peft_model(_base_model(root), LoraConfig(**options))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
        model.merge_and_unload().save_pretrained(root / f"ft{i}")
    return root


def _state(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ms.load(path).items()}


def _assert_states_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert sorted(a) == sorted(b)
    for k, v in a.items():
        torch.testing.assert_close(v.float(), b[k].float(), atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def _adapter_deltas(path) -> dict[str, torch.Tensor]:
    a = Adapter(path)
    try:
        return {name: a.delta(name) for name in a.targets}
    finally:
        a.close()


# ------------------------------------------------------------------ (1) reading: our delta = PEFT's merge


def test_delta_equals_peft_merge_and_unload(family):
    base = _state(family / "base")
    for i, name in enumerate(ADAPTERS, start=1):
        merged, deltas = _state(family / f"ft{i}"), _adapter_deltas(family / name)
        changed = {k for k in base if not torch.equal(base[k], merged[k])}
        assert changed == set(deltas)  # PEFT changed exactly the targets we found
        for k, d in deltas.items():
            assert d.abs().max() > 1e-3  # a real, non-zero update
            torch.testing.assert_close(d, merged[k] - base[k], atol=1e-6, rtol=0)
    # rsLoRA: alpha / sqrt(r), not alpha / r (a factor 2 at r = 4 would fail the comparison above)
    assert {t.scale for t in Adapter(family / "ad2").targets.values()} == {16 / 2.0}


def test_inspect_adapter(family, capsys):
    from mergescope.cli import main

    assert main(["inspect", str(family / "ad2"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rank"] == 4 and info["lora_alpha"] == 16 and info["use_rslora"] is True
    assert info["target_modules"] == ["k_proj", "q_proj", "up_proj"] and info["targets"] == 6
    assert info["parameters"] == 2 * (4 * (32 + 32) + 4 * (32 + 16) + 4 * (32 + 64))  # A [r,in] + B [out,r]


def test_gpt2_conv1d_and_embedding_adapters_round_trip_through_peft(tmp_path):
    """GPT-2's Conv1D (fan_in_fan_out: the update is transposed) and an embedding LoRA (lora_embedding_A/B)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=32)).save_pretrained(
        tmp_path / "base")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], fan_in_fan_out=True))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "ad")
    model.merge_and_unload().save_pretrained(tmp_path / "ft")
    kinds = {t.kind for t in Adapter(tmp_path / "ad").targets.values()}
    assert kinds == {"conv1d", "embedding"}
    base, ft = _state(tmp_path / "base"), _state(tmp_path / "ft")
    deltas = _adapter_deltas(tmp_path / "ad")
    for k, d in deltas.items():
        torch.testing.assert_close(d, ft[k] - base[k], atol=1e-6, rtol=0)
    # re-factored at rank 8 (>= 4: exact) and loaded by PEFT: the same fine-tuned weights
    merge_adapters(tmp_path / "base", [tmp_path / "ad"], tmp_path / "r8", method="task_arithmetic", rank=8)
    config = json.loads((tmp_path / "r8" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    again = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "r8")
    merged = {k: v.detach() for k, v in again.merge_and_unload().state_dict().items()}
    _assert_states_close({k: merged[k] for k in ft}, ft, atol=1e-5)


def test_modules_to_save_replace_the_base_tensor_and_survive_a_refactor(family, tmp_path):
    """``modules_to_save`` (a whole trained copy of lm_head) next to LoRA factors: applied as PEFT does."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = get_peft_model(_base_model(family), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                           modules_to_save=["lm_head"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "ad")
    model.merge_and_unload().save_pretrained(tmp_path / "ft")
    assert sorted(Adapter(tmp_path / "ad").replaced) == ["lm_head.weight"]
    ms.merge({"merge_method": "linear", "models": [{"model": f"{family / 'base'}+{tmp_path / 'ad'}",
                                                    "parameters": {"weight": 1.0}}]}, tmp_path / "ours")
    ft = _state(tmp_path / "ft")
    _assert_states_close(_state(tmp_path / "ours"), ft)
    # an adapter output keeps lm_head whole (no low-rank form) and PEFT applies it again
    merge_adapters(family / "base", [tmp_path / "ad"], tmp_path / "r4", method="task_arithmetic", rank=4)
    assert json.loads((tmp_path / "r4" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    again = PeftModel.from_pretrained(_base_model(family), tmp_path / "r4").merge_and_unload()
    _assert_states_close({k: v.detach() for k, v in again.state_dict().items() if k in ft}, ft, atol=1e-5)


def test_reads_mergekit_extract_lora_output(family, tmp_path):
    """mergekit-extract-lora (in-process) writes norms/embeddings as modules_to_save: read, applied, and its
    LoRA updates equal ours (both the best rank-4 approximation of a rank-4 update: the update itself)."""
    pytest.importorskip("mergekit")
    from mergekit.scripts.extract_lora import main as mergekit_extract

    mergekit_extract.main(["--base-model", str(family / "base"), "--model", str(family / "ft1"), "--out-path",
                           str(tmp_path / "mk"), "--max-rank", "4"], standalone_mode=False)
    theirs = Adapter(tmp_path / "mk")
    assert theirs.replaced  # embeddings, norms, lm_head saved whole
    extract_lora(family / "ft1", family / "base", tmp_path / "ours", rank=4)
    ours = _adapter_deltas(tmp_path / "ours")
    for name in theirs.targets:
        expected = ours.get(name, torch.zeros(theirs.delta_shape(name)))
        torch.testing.assert_close(theirs.delta(name), expected, atol=1e-5, rtol=0)
    ms.merge({"merge_method": "linear", "models": [{"model": f"{family / 'base'}+{tmp_path / 'mk'}",
                                                    "parameters": {"weight": 1.0}}]}, tmp_path / "applied")
    _assert_states_close(_state(tmp_path / "applied"), _state(family / "ft1"), atol=1e-5)


# ------------------------------------------------------------------ (2) recipes with base+adapter


def test_recipe_base_plus_adapter_equals_peft_and_mergekit(family, tmp_path):
    recipe = f"""
models:
  - model: {family / 'base'}+{family / 'ad1'}
    parameters: {{weight: 1.0}}
merge_method: linear
dtype: float32
"""
    ms.merge(recipe, tmp_path / "ours", seed=0)
    ours = _state(tmp_path / "ours")
    _assert_states_close(ours, _state(family / "ft1"))
    assert (tmp_path / "ours" / "config.json").is_file()  # the base's config: a loadable HF folder
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(random_seed=0, lazy_unpickle=True, quiet=True, copy_tokenizer=False,
                           write_model_card=False, lora_merge_cache=str(tmp_path / "cache"))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe)), str(tmp_path / "mk"), options=options)
    _assert_states_close(ours, _state(tmp_path / "mk"))


def test_recipe_base_plus_adapter_fingerprints_and_guards_the_adapter(family, tmp_path, capsys):
    """Both folders of BASE+ADAPTER are inputs: the adapter is fingerprinted in the output's metadata,
    and an output inside the adapter folder is refused before anything is written."""
    import json

    from mergescope.cli import main

    recipe = tmp_path / "r.yml"
    recipe.write_text(f"models:\n  - model: {family / 'base'}+{family / 'ad1'}\n    parameters: {{weight: 1.0}}\n"
                      "merge_method: linear\n")
    assert main(["-q", "merge", str(recipe), str(tmp_path / "out.safetensors")]) == 0
    inputs = json.loads(ms.load(tmp_path / "out.safetensors").metadata["inputs"])
    assert [i["name"] for i in inputs] == ["base", "ad1"]
    before = sorted(p.name for p in (family / "ad1").iterdir())
    capsys.readouterr()
    assert main(["merge", str(recipe), str(family / "ad1" / "merged")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(p.name for p in (family / "ad1").iterdir()) == before


def test_bf16_base_plus_adapter_is_bit_identical_to_peft(family, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(family / "base", dtype=torch.bfloat16).save_pretrained(tmp_path / "base")
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16),
                                     family / "ad2").merge_and_unload()
    ref = {k: v.detach() for k, v in peft.state_dict().items()}
    ms.merge({"merge_method": "linear", "models": [{"model": f"{tmp_path / 'base'}+{family / 'ad2'}",
                                                    "parameters": {"weight": 1.0}}]}, tmp_path / "ours")
    ours = _state(tmp_path / "ours")
    assert {v.dtype for v in ours.values()} == {torch.bfloat16}
    assert all(torch.equal(v, ref[k]) for k, v in ours.items())


# ------------------------------------------------------------------ (3) adapters merged = dense merge


@pytest.mark.parametrize("method,params", [("linear", {}), ("ties", {"density": 0.5}),
                                           ("dare_ties", {"density": 0.6}), ("task_arithmetic", {"lambda": 0.7})])
def test_adapter_merge_equals_dense_merge(family, tmp_path, method, params):
    weights = [1.0, 0.5, 0.8]
    adapters = [family / n for n in ADAPTERS]
    merge_adapters(family / "base", adapters, tmp_path / "from_adapters", method=method, weights=weights,
                   parameters=params, seed=3)
    dense = {"merge_method": method, "models": [{"model": str(family / f"ft{i}"), "parameters": {"weight": w}}
                                                for i, w in enumerate(weights, start=1)]}
    if method != "linear":
        dense["base_model"] = str(family / "base")
    if params:
        dense["parameters"] = params
    ms.merge(dense, tmp_path / "dense", seed=3)
    ours, ref = _state(tmp_path / "from_adapters"), _state(tmp_path / "dense")
    _assert_states_close(ours, ref)
    # not the factor-wise average: averaging A's and B's gives another update
    if method == "linear":
        base, a1, a2 = _state(family / "base"), Adapter(family / "ad1"), Adapter(family / "ad2")
        k = "model.layers.0.self_attn.q_proj.weight"
        t1, t2 = a1.targets[k], a2.targets[k]
        factorwise = ((a1.weights[t1.b] + a2.weights[t2.b]) / 2) @ ((a1.weights[t1.a] + a2.weights[t2.a]) / 2)
        assert not torch.allclose(base[k] + factorwise * t1.scale, ours[k], atol=1e-3)

    # the rank-r adapter of the same merge: exact at full rank (64 >= every update's rank)
    merge_adapters(family / "base", adapters, tmp_path / "adapter", method=method, weights=weights,
                   parameters=params, seed=3, rank=64)
    base = _state(family / "base")
    deltas = _adapter_deltas(tmp_path / "adapter")
    for k in base:
        expected = ref[k] - base[k]
        got = deltas.get(k, torch.zeros_like(expected))
        tol = 1e-6 + 1e-5 * float(expected.abs().max())  # float32 SVD round-off, relative to the update's size
        torch.testing.assert_close(got, expected, atol=tol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    if method == "ties":  # PEFT loads it (narrow modules get rank_pattern entries) and applies the same update
        from peft import PeftModel

        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 16  # k_proj is [16, 32]: rank 16 < 64
        model = PeftModel.from_pretrained(_base_model(family), tmp_path / "adapter").merge_and_unload()
        merged = {k: v.detach() for k, v in model.state_dict().items()}
        _assert_states_close({k: merged[k] for k in ref}, ref, atol=2e-5)


# ------------------------------------------------------------------ (4) rank-r adapters = PEFT add_weighted_adapter


def _peft_weighted(family, combination: str, weights, rank: int, **kw) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base_model(family), family / "ad1", adapter_name="ad1")
    for name in ("ad2", "ad3"):
        model.load_adapter(family / name, adapter_name=name)
    model.add_weighted_adapter(list(ADAPTERS), weights, "merged", combination_type=combination, svd_rank=rank, **kw)
    out = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            key = module_name.removeprefix("base_model.model.") + ".weight"
            out[key] = module.get_delta_weight("merged").detach().float()
    return out


@pytest.mark.parametrize("combination,method,weights,rank,params", [
    ("svd", "task_arithmetic", [0.7, 0.5, 1.2], 16, {}),  # 16 >= the true rank (4+4+2): exact
    ("svd", "task_arithmetic", [0.7, 0.5, 1.2], 3, {}),  # truncated: the same best rank-3 update
    ("ties_svd", "ties", [1.0, 1.0, 1.0], 6, {"density": 0.5}),
])
def test_svd_adapter_equals_peft_add_weighted_adapter(family, tmp_path, combination, method, weights, rank, params):
    peft_kw = {"density": params["density"]} if "density" in params else {}
    ref = _peft_weighted(family, combination, weights, rank, **peft_kw)
    merge_adapters(family / "base", [family / n for n in ADAPTERS], tmp_path / "out", method=method,
                   weights=weights, parameters=params or None, rank=rank)
    ours = _adapter_deltas(tmp_path / "out")
    assert sorted(ours) == sorted(ref)
    for k in ref:
        scale = float(ref[k].abs().max())
        torch.testing.assert_close(ours[k], ref[k], atol=2e-5 * scale, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == rank and config["peft_type"] == "LORA"


def test_merge_adapters_cli_matches_api_and_refuses_output_inside_an_input(family, tmp_path, capsys):
    from mergescope.cli import main

    adapters = [str(family / n) for n in ("ad1", "ad2")]
    args = ["merge-adapters", str(family / "base"), *adapters, "--method", "ties", "--density", "0.5",
            "-w", "0.6", "-w", "0.9", "--rank", "8"]
    assert main([*args, "-o", str(tmp_path / "cli")]) == 0
    merge_adapters(family / "base", adapters, tmp_path / "api", method="ties", weights=[0.6, 0.9],
                   parameters={"density": 0.5}, rank=8)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
    for extra in (["--rank", "8"], []):
        out = run_inprocess([*args[:-2], *extra, "-o", str(family / "ad1" / "merged")], tmp_path, capsys)
        assert out.code == 2 and "overlaps input" in out.stderr and not (family / "ad1" / "merged").exists(), out.stderr


# ------------------------------------------------------------------ (5) extract-lora


def test_extract_lora_cli_loads_in_peft_and_is_eckart_young(family, tmp_path, capsys):
    from peft import PeftModel

    from mergescope.cli import main

    assert main(["extract-lora", str(family / "ft1"), str(family / "base"), "-o", str(tmp_path / "r4"),
                 "--rank", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["targets"] == 6 and result["not_extracted"] == [] and result["worst_residual"] < 1e-5
    # PEFT loads it, and applying it gives the fine-tuned weights back (rank 4 = the true rank)
    model = PeftModel.from_pretrained(_base_model(family), tmp_path / "r4")
    merged = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    _assert_states_close({k: merged[k] for k in _state(family / "ft1")}, _state(family / "ft1"), atol=1e-5)

    # rank 2 < 4: the best rank-2 approximation, checked against a float64 numpy SVD
    extract_lora(family / "ft1", family / "base", tmp_path / "r2", rank=2)
    base, ft = _state(family / "base"), _state(family / "ft1")
    deltas = _adapter_deltas(tmp_path / "r2")
    assert len(deltas) == 6
    for k, got in deltas.items():
        d = (ft[k].double() - base[k].double()).numpy()
        u, s, vh = np.linalg.svd(d, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        np.testing.assert_allclose(got.double().numpy(), best, atol=1e-5 * np.abs(d).max())
        assert np.linalg.norm(d - got.double().numpy()) <= np.linalg.norm(d - best) * (1 + 1e-4)


# ------------------------------------------------------------------ (6) hostile adapter folders


def _copy_adapter(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _hostile_cases(family, root):
    from safetensors.torch import load_file, save_file

    cases = {}
    missing = _copy_adapter(family / "ad1", root / "missing")
    (missing / "adapter_config.json").unlink()
    cases["missing"] = (missing, "adapter_config.json: missing")
    garbage = _copy_adapter(family / "ad1", root / "garbage")
    (garbage / "adapter_config.json").write_text("{not json")
    cases["garbage"] = (garbage, "not valid JSON")
    rank0 = _copy_adapter(family / "ad1", root / "rank0")
    _rewrite_config(rank0, r=0)
    cases["rank0"] = (rank0, "'r' must be an integer in 1..")
    huge = _copy_adapter(family / "ad1", root / "huge")
    _rewrite_config(huge, r=10**40)
    cases["huge"] = (huge, "'r' must be an integer in 1..")
    wrong_rank = _copy_adapter(family / "ad1", root / "wrong_rank")
    _rewrite_config(wrong_rank, r=8)
    cases["wrong_rank"] = (wrong_rank, "do not have rank r=8")
    tensors = load_file(family / "ad1" / "adapter_model.safetensors")
    shapes = _copy_adapter(family / "ad1", root / "shapes")  # factors of a wider model: do not fit the base
    wide = {k: torch.zeros(v.shape[0], 48) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(wide, shapes / "adapter_model.safetensors", metadata={"format": "pt"})
    cases["shapes"] = (shapes, "but the base tensor is")
    absent = _copy_adapter(family / "ad1", root / "absent")
    save_file({k.replace("q_proj", "zz_proj"): v for k, v in tensors.items()}, absent / "adapter_model.safetensors",
              metadata={"format": "pt"})
    cases["absent"] = (absent, "is not a tensor of the base model")
    regex = _copy_adapter(family / "ad1", root / "regex")
    _rewrite_config(regex, rank_pattern={"(a+)+$": 2})
    cases["regex"] = (regex, "regular expressions are not supported")
    dora = _copy_adapter(family / "ad1", root / "dora")
    _rewrite_config(dora, use_dora=True)
    cases["dora"] = (dora, "DoRA adapters are not supported")
    return cases


def test_hostile_adapters_are_one_line_errors(family, tmp_path, capsys):
    cases = _hostile_cases(family, tmp_path)
    base = family / "base"
    for label, (folder, message) in cases.items():
        for args in (["merge-adapters", str(base), str(folder), "-o", str(tmp_path / f"o_{label}"), "--rank", "2"],
                     ["merge-adapters", str(base), str(folder), "-o", str(tmp_path / f"full_{label}")]):
            out = run_inprocess(args, tmp_path, capsys)
            assert out.code == 2, (label, out.stderr)
            lines = [line for line in out.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and "Traceback" not in out.stderr, (label, out.stderr)
            assert str(folder.name) in lines[0] and message in lines[0], (label, lines[0])
            assert out.changed == [], (label, out.changed)
    # the real CLI in a subprocess: exit 2, one line, bounded time and memory, nothing changed
    assert_refused(attack(["inspect", str(cases["huge"][0])], tmp_path), "huge", "'r' must be an integer")
    # a recipe naming a missing adapter, and a reference with two '+'
    with pytest.raises(MergescopeError, match="no such local file"):
        ms.merge({"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'nope'}",
                                                        "parameters": {"weight": 1.0}}]}, tmp_path / "x")
    with pytest.raises(MergescopeError, match="one '\\+'"):
        ms.merge({"merge_method": "linear", "models": [{"model": f"{base}+a+b", "parameters": {"weight": 1.0}}]},
                 tmp_path / "y")


def test_adapter_output_refuses_methods_that_do_not_act_on_updates(family, tmp_path):
    with pytest.raises(MergescopeError, match="does not act on updates"):
        merge_adapters(family / "base", [family / "ad1"], tmp_path / "o", method="karcher", rank=4)
    assert not (tmp_path / "o").exists()
