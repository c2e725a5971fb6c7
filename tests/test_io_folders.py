"""Hugging Face folders: the real MiniLM checkpoint, transformers round trips, atomic outputs."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.io import atomic_output


def test_minilm_figures_match_the_reference_reader(minilm_dir):
    ckpt = ms.load(minilm_dir)
    info = ms.io.summarize(ckpt)
    with safe_open(minilm_dir / "model.safetensors", "pt") as ref:
        names = list(ref.keys())
        params = sum(math.prod(ref.get_slice(n).get_shape()) for n in names)
        assert info["tensors"] == len(names)
        assert info["parameters"] == params
        for name in names[:20]:
            assert torch.equal(ckpt[name], ref.get_tensor(name))
    assert info["largest"][0]["name"].endswith("word_embeddings.weight")
    assert info["largest"][0]["shape"] == [30522, 384]


def test_written_folder_loads_in_transformers_with_identical_outputs(minilm_dir, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(minilm_dir).eval()
    state = ms.load(minilm_dir)
    out = ms.save(state, tmp_path / "copy", max_shard_size="20MB", copy_files_from=minilm_dir)
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    assert (out / "tokenizer.json").exists() and (out / "1_Pooling" / "config.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) >= 4
    model = AutoModel.from_pretrained(out).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)


def test_existing_output_needs_force(tmp_path):
    ms.save({"w": torch.ones(2)}, tmp_path / "o.safetensors")
    with pytest.raises(MergescopeError, match="already exists; pass --force"):
        ms.save({"w": torch.zeros(2)}, tmp_path / "o.safetensors")
    assert torch.equal(ms.load(tmp_path / "o.safetensors")["w"], torch.ones(2))
    ms.save({"w": torch.zeros(2)}, tmp_path / "o.safetensors", force=True)
    assert torch.equal(ms.load(tmp_path / "o.safetensors")["w"], torch.zeros(2))


def test_folder_output_replaced_only_with_force(tmp_path):
    ms.save({"w": torch.ones(2)}, tmp_path / "dir")
    ms.save({"v": torch.zeros(3)}, tmp_path / "dir", force=True)
    assert list(ms.load(tmp_path / "dir")) == ["v"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]  # no temp or lock leftovers


def test_output_inside_or_equal_to_an_input_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    for bad in (tmp_path / "model", tmp_path / "model" / "sub"):
        with pytest.raises(MergescopeError, match="overlaps input"):
            ms.save({"w": torch.ones(1)}, bad, inputs=[tmp_path / "model"], force=True)
    with pytest.raises(MergescopeError, match="contains input"):
        ms.save({"w": torch.ones(1)}, tmp_path, inputs=[tmp_path / "model"])


def test_failure_leaves_no_output_and_no_partial(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "out") as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_bad_tensor_in_state_fails_before_anything_appears(tmp_path):
    with pytest.raises(MergescopeError, match="'b': expected a torch.Tensor"):
        ms.save({"a": torch.ones(1), "b": [1, 2]}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writer_is_refused(tmp_path):
    code = (
        "import time, mergescope as ms\n"
        "from mergescope.io import atomic_output\n"
        f"with atomic_output(r'{tmp_path / 'out'}') as t:\n"
        "    print('ready', flush=True); time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(MergescopeError, match="another mergescope run is writing"):
            ms.save({"w": torch.ones(1)}, tmp_path / "out")
    finally:
        proc.kill()
        proc.wait()


def test_stale_partial_from_a_killed_run_is_cleaned(tmp_path):
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "model-00001-of-00009.safetensors").write_bytes(b"junk")
    ms.save({"w": torch.ones(1)}, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]


def test_sharded_index_cannot_escape_the_folder(tmp_path):
    ms.save({"w": torch.ones(1)}, tmp_path / "outside.safetensors")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(MergescopeError, match="leaves the model folder"):
        ms.load(folder)
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "link.safetensors"}}))
    with pytest.raises(MergescopeError, match="outside the model folder"):
        ms.load(folder)


def test_index_listing_a_tensor_missing_from_its_shard(tmp_path):
    ms.save({f"w{i}": torch.ones(100) for i in range(3)}, tmp_path / "m", max_shard_size=400)
    index_path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(MergescopeError, match="'ghost' is listed in shard"):
        ms.load(tmp_path / "m")


def test_a_kill_between_the_two_renames_of_a_forced_replace_loses_nothing(tmp_path):
    ms.save({"w": torch.ones(2)}, tmp_path / "new")
    (tmp_path / "new").rename(tmp_path / ".out.partial")  # the finished new output, not yet renamed
    ms.save({"w": torch.zeros(2)}, tmp_path / "old")
    (tmp_path / "old").rename(tmp_path / ".out.old")  # the old output, already moved aside
    with pytest.raises(MergescopeError, match="already exists"):
        ms.save({"w": torch.full((2,), 5.0)}, tmp_path / "out")  # the next run completes the swap first
    assert torch.equal(ms.load(tmp_path / "out")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
