"""The streaming engine: same results as the pure methods, deterministic bytes, sharding, provenance,
atomic outputs, CLI errors, and resident memory bounded by a few tensors (measured)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import mergescope as ms
from mergescope.cli import main
from mergescope.errors import MergescopeError
from mergescope.io import load, save
from mergescope.merge import methods as M


def _toy(folder, seed, layers=3, extra_files=True):
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g)}
    for i in range(layers):
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(12, 8, generator=g)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(8, generator=g)
    state["model.norm.weight"] = torch.randn(8, generator=g)
    save(state, folder)
    if extra_files:
        (folder / "config.json").write_text(json.dumps({"num_hidden_layers": layers, "torch_dtype": "float32"}))
        (folder / "tokenizer.json").write_text("{}")
        (folder / "tokenizer_config.json").write_text("{}")
    return state


@pytest.fixture
def models(tmp_path):
    return {name: _toy(tmp_path / name, seed) for seed, name in enumerate(["base", "a", "b"])}


def _dare(d, density=0.5):
    return textwrap.dedent(f"""
        models:
          - {{model: {d}/a, parameters: {{weight: 0.7, density: {density}}}}}
          - {{model: {d}/b, parameters: {{weight: 0.4, density: {density}}}}}
        base_model: {d}/base
        merge_method: dare_ties
    """)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_engine_equals_pure_method_per_tensor(models, tmp_path):
    text = (f"merge_method: ties\nbase_model: {tmp_path}/base\nmodels:\n"
            f"  - {{model: {tmp_path}/a, parameters: {{weight: 1.0, density: 0.5}}}}\n"
            f"  - {{model: {tmp_path}/b, parameters: {{weight: 0.5, density: 0.3}}}}\n")
    result = ms.merge(text, tmp_path / "out")
    merged = load(tmp_path / "out")
    assert result.tensors == len(models["base"]) == len(merged)
    for name, base in models["base"].items():
        expected = M.get("ties")([models["a"][name], models["b"][name]], base, weight=[1.0, 0.5], density=[0.5, 0.3])
        assert torch.equal(merged[name], expected), name


def test_same_seed_same_bytes_whatever_the_threads(models, tmp_path):
    ms.merge(_dare(tmp_path), tmp_path / "one", seed=5, threads=1)
    ms.merge(_dare(tmp_path), tmp_path / "two", seed=5, threads=2)
    ms.merge(_dare(tmp_path), tmp_path / "other", seed=6, threads=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert _files(tmp_path / "one")["model.safetensors"] != _files(tmp_path / "other")["model.safetensors"]


def test_sharded_output_with_index_and_provenance(models, tmp_path):
    ms.merge(_dare(tmp_path), tmp_path / "out", seed=3, max_shard_size="1KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    merged = load(out)
    meta = merged.metadata
    assert meta["seed"] == "3" and meta["merge_method"] == "dare_ties"
    assert meta["recipe_sha256"] and len(json.loads(meta["inputs"])) == 3
    single = tmp_path / "single"
    ms.merge(_dare(tmp_path), single, seed=3)
    one = load(single)
    assert all(torch.equal(one[n], merged[n]) for n in one)


def test_copies_config_and_tokenizer_from_base(models, tmp_path):
    ms.merge(_dare(tmp_path), tmp_path / "with")
    assert json.loads((tmp_path / "with" / "config.json").read_text())["num_hidden_layers"] == 3
    assert (tmp_path / "with" / "tokenizer.json").exists()
    assert (tmp_path / "with" / "mergescope_recipe.yml").read_text() == _dare(tmp_path)
    ms.merge(_dare(tmp_path), tmp_path / "without", copy_tokenizer=False)
    assert (tmp_path / "without" / "config.json").exists() and not (tmp_path / "without" / "tokenizer.json").exists()


def test_out_dtype_and_config(models, tmp_path):
    ms.merge(_dare(tmp_path) + "out_dtype: bfloat16\n", tmp_path / "out")
    assert {load(tmp_path / "out").info(n).dtype for n in models["base"]} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_failure_during_merge_leaves_no_output(models, tmp_path):
    text = _dare(tmp_path).replace("dare_ties", "della") + "parameters: {epsilon: 0.6}\n"
    with pytest.raises(MergescopeError, match="epsilon"):
        ms.merge(text, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_existing_output_needs_force(models, tmp_path):
    ms.merge(_dare(tmp_path), tmp_path / "out", seed=1)
    with pytest.raises(MergescopeError, match="already exists"):
        ms.merge(_dare(tmp_path), tmp_path / "out")
    ms.merge(_dare(tmp_path, density=1.0), tmp_path / "out", force=True)
    with pytest.raises(MergescopeError, match="overlaps input"):
        ms.merge(_dare(tmp_path), tmp_path / "a", force=True)


def test_zoo_checkpoints_merge_into_a_file_and_rebuild(tmp_path):
    from mergescope.tasks import build
    from mergescope.tasks.checkpoints import load_state_into, model_for, model_metadata

    states = []
    for seed in (0, 1):
        module = build("cnn", seed=seed)
        states.append(module.state_dict())
        save(module.state_dict(), tmp_path / f"m{seed}.safetensors", metadata=model_metadata("cnn", {"width": 32}))
    text = (f"merge_method: linear\nmodels:\n  - {{model: {tmp_path}/m0.safetensors, parameters: {{weight: 1}}}}\n"
            f"  - {{model: {tmp_path}/m1.safetensors, parameters: {{weight: 3}}}}\n")
    ms.merge(text, tmp_path / "avg.safetensors")
    merged = load(tmp_path / "avg.safetensors")
    for name, a in states[0].items():
        b = states[1][name]
        expected = (a + 3 * b) / 4 if a.is_floating_point() else a
        assert torch.allclose(merged[name], expected, atol=1e-6), name
    module, name, _ = model_for(merged)
    load_state_into(module, merged)
    assert name == "cnn"


@pytest.mark.parametrize("recipe, message", [
    ("merge_method: tiez\nmodels: [{{model: {d}/a}}]\n", "unknown merge method 'tiez'"),
    ("merge_method: linear\nmodels: [{{model: {d}/missing, parameters: {{weight: 1}}}}]\n", "no such local file"),
    ("merge_method: linear\nmodels: [{{model: {d}/a, parameters: {{weight: one}}}}]\n", "'weight' must be float"),
    ("merge_method: linear\nmodels:\n  - {{model: {d}/a, parameters: {{weight: 1}}}}\n"
     "  - {{model: {d}/wide, parameters: {{weight: 1}}}}\n", "model.layers.0.mlp.up_proj.weight': shapes differ"),
])
def test_cli_bad_recipes_exit_2_with_one_line(models, tmp_path, capsys, recipe, message):
    wide = dict(models["a"])
    wide["model.layers.0.mlp.up_proj.weight"] = torch.zeros(13, 8)
    save(wide, tmp_path / "wide")
    path = tmp_path / "r.yml"
    path.write_text(recipe.format(d=tmp_path))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err.replace("\n", " ") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_merge_writes_output(models, tmp_path, capsys):
    path = tmp_path / "r.yml"
    path.write_text(_dare(tmp_path))
    assert main(["merge", str(path), str(tmp_path / "out"), "--random-seed", "4", "--threads", "2",
                 "--max-shard-size", "1KB", "--no-copy-tokenizer"]) == 0
    assert load(tmp_path / "out").metadata["seed"] == "4"
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1


MEMORY_PROBE = """
import resource, sys, torch
import mergescope as ms
from mergescope.merge import engine
engine.release_freed_memory()
torch.zeros(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ms.merge(sys.argv[1], sys.argv[2], threads=2)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_resident_memory_is_bounded_by_a_few_tensors(tmp_path):
    """3 models x 24 tensors of 4 MB (288 MB of input): the merge adds far less than one model."""
    g = torch.Generator().manual_seed(0)
    for m in ("base", "a", "b"):
        state = {f"model.layers.{i}.w": torch.randn(1024, 1024, generator=g) for i in range(24)}
        save(state, tmp_path / m, max_shard_size="40MB")
        del state
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: {tmp_path}/base\nmodels:\n"
                      f"  - {{model: {tmp_path}/a, parameters: {{weight: 1, density: 0.5}}}}\n"
                      f"  - {{model: {tmp_path}/b, parameters: {{weight: 1, density: 0.5}}}}\n")
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(recipe), str(tmp_path / "out")],
                          capture_output=True, text=True, check=True)
    growth = int(proc.stdout.strip().splitlines()[-1])
    model_bytes = 24 * 4 * 2**20
    # two jobs in flight, each 3 inputs + output + masks/scratch of ~4 MB tensors
    assert growth < 0.75 * model_bytes, f"peak RSS grew by {growth / 1e6:.0f} MB for {model_bytes / 1e6:.0f} MB models"
    assert len(load(tmp_path / "out")) == 24


def test_ms_merge_is_the_callable_package_from_the_first_access():
    """``ms.merge`` is one object (callable, with ``.methods``) whether or not a merge module was imported."""
    code = ("import mergescope as ms; m = ms.merge; assert callable(m) and m.methods.get('ties').name == 'ties'; "
            "import mergescope.merge.plan; assert ms.merge is m and ms.merge.engine.merge")
    subprocess.run([sys.executable, "-c", code], check=True)
