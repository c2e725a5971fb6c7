"""The one sharded writer (``io.writer``): ``ms.save``, ``ShardedWriter`` and the merge engine write the
bytes that the safetensors format and the Hugging Face sharding convention give, computed here
independently (header JSON, 8-byte padding, greedy split in order, ``model-0000i-of-0000n`` names,
index JSON), and stream without the merge engine's resume log."""

from __future__ import annotations

import json
import struct
import textwrap

import pytest
import torch
from safetensors import safe_open

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.io import ShardedWriter, provenance

DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.bool: "BOOL"}


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(20, 30, generator=g), "h": torch.randn(64, generator=g).to(torch.bfloat16),
            "i": torch.arange(50), "b": torch.rand(33, generator=g) > 0.5, "nc": torch.randn(8, 6, generator=g).t(),
            "e": torch.empty(0, 4), "s": torch.tensor(3.5, dtype=torch.float16), "big": torch.randn(600, generator=g)}


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file per the format: u64 header length, JSON header padded with spaces to 8 bytes, data."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        n = len(_raw(t))
        header[name] = {"dtype": DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(_raw(t) for t in tensors.values())


def _folder(tensors: dict[str, torch.Tensor], limit: int, metadata: dict[str, str]) -> dict[str, bytes]:
    """A Hugging Face sharded folder: greedy split in order, HF shard names, index (metadata + weight_map)."""
    shards: list[dict] = [{}]
    for name, t in tensors.items():
        size = sum(len(_raw(x)) for x in shards[-1].values())
        if shards[-1] and size + len(_raw(t)) > limit:
            shards.append({})
        shards[-1][name] = t
    meta = {"format": "pt", **metadata}
    if len(shards) == 1:
        return {"model.safetensors": _file(shards[0], meta)}
    n = len(shards)
    files = {f"model-{i:05d}-of-{n:05d}.safetensors": _file(s, meta) for i, s in enumerate(shards, 1)}
    weight_map = {name: file for file, s in zip(files, shards) for name in s}
    total = sum(len(_raw(t)) for t in tensors.values())
    index = {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = (json.dumps(index, indent=2) + "\n").encode()
    return files


def _read(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("limit", [1, 1000, "2KB", "2GB"])
def test_save_writes_the_hf_sharded_layout_byte_for_byte(tmp_path, limit):
    state = _state()
    ms.save(state, tmp_path / "out", max_shard_size=limit, metadata={"note": "n"})
    expected = _folder(state, ms.io.parse_size(limit), {**provenance(), "note": "n"})
    assert _read(tmp_path / "out") == expected
    if limit == 1:
        assert len(expected) == len(state) + 1  # every tensor its own shard, plus the index


def test_save_single_file_and_empty_states(tmp_path):
    state = _state()
    ms.save(state, tmp_path / "one.safetensors", max_shard_size="not a size", metadata={"format": "x"})
    assert (tmp_path / "one.safetensors").read_bytes() == _file(state, {"format": "x", **provenance()})
    ms.save({}, tmp_path / "empty.safetensors")
    assert (tmp_path / "empty.safetensors").read_bytes() == _file({}, {"format": "pt", **provenance()})
    ms.save({}, tmp_path / "empty")
    assert _read(tmp_path / "empty") == _folder({}, 1, provenance())
    with safe_open(tmp_path / "one.safetensors", "pt") as ref:  # the reference reader agrees
        assert ref.metadata()["format"] == "x"
        for name, t in state.items():
            assert torch.equal(ref.get_tensor(name), t)


def test_save_copies_aux_files_and_reads_lazy_checkpoints(tmp_path):
    state = _state()
    ms.save(state, tmp_path / "src", max_shard_size=700)
    (tmp_path / "src" / "config.json").write_text("{}")
    (tmp_path / "src" / "sub").mkdir()
    (tmp_path / "src" / "sub" / "x.txt").write_text("aux")
    ms.save(ms.load(tmp_path / "src"), tmp_path / "copy", max_shard_size=300, copy_files_from=tmp_path / "src")
    expected = _folder(state, 300, provenance())
    assert _read(tmp_path / "copy") == {**expected, "config.json": b"{}", "sub/x.txt": b"aux"}


def test_sharded_writer_matches_save(tmp_path):
    state = _state()
    meta = {**provenance(), "k": "v"}
    ms.save(state, tmp_path / "saved", max_shard_size="1KB", metadata={"k": "v"})
    (tmp_path / "sw").mkdir()
    writer = ShardedWriter(tmp_path / "sw", "1KB", meta)
    for name, t in state.items():
        writer.add(name, t)
    writer.close()
    assert _read(tmp_path / "sw") == _read(tmp_path / "saved") == _folder(state, 1000, meta)


def test_save_keeps_no_resume_log_and_refuses_bad_values(tmp_path, monkeypatch):
    from mergescope.io import writer

    def no_hashing(*a, **k):
        raise AssertionError("ms.save hashed a shard for a resume log")

    monkeypatch.setattr(writer, "part_hash", no_hashing)
    monkeypatch.setattr(writer, "record_done", no_hashing)
    ms.save(_state(), tmp_path / "out", max_shard_size=100)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())
    with pytest.raises(MergescopeError, match="tensor 'x': expected a torch.Tensor, got list"):
        ms.save({"a": torch.ones(2), "x": [1.0]}, tmp_path / "bad", max_shard_size=1)
    with pytest.raises(MergescopeError, match="tensor 'c': dtype torch.complex64 cannot be stored"):
        ms.save({"c": torch.ones(2, dtype=torch.complex64)}, tmp_path / "bad.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_merge_output_is_the_same_layout(tmp_path):
    """The engine's planned writer gives what the format gives for the merged tensors (any completion order)."""
    for seed, name in enumerate(["base", "a", "b"]):
        g = torch.Generator().manual_seed(seed)
        ms.save({f"layer.{i}.weight": torch.randn(12, 8, generator=g) for i in range(5)}, tmp_path / name)
    recipe = textwrap.dedent(f"""
        models:
          - {{model: {tmp_path}/a, parameters: {{weight: 0.7, density: 0.5}}}}
          - {{model: {tmp_path}/b, parameters: {{weight: 0.4, density: 0.5}}}}
        base_model: {tmp_path}/base
        merge_method: dare_ties
    """)
    ms.merge(recipe, tmp_path / "out", seed=3, max_shard_size=800, threads=2)
    merged = ms.load(tmp_path / "out")
    state = {name: merged[name].clone() for name in merged}
    meta = dict(merged.metadata)
    assert meta["format"] == "pt" and next(iter(meta)) == "format"
    files = _folder(state, 800, {k: v for k, v in meta.items() if k != "format"})
    assert len(files) == 4  # 3 shards + index
    assert _read(tmp_path / "out") == {**files, "mergescope_recipe.yml": (tmp_path / "out" / "mergescope_recipe.yml").read_bytes()}
