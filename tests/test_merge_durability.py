"""Durable merge outputs and the engine's timestamps: one fsync per finished shard (counted by
wrapping os.fsync and naming each synced fd through /proc), the folders synced around the rename,
the same bytes with or without syncing and with 1 or 2 threads, and ordered timestamps whose
steady-state byte count is checked against the input sizes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mergeutil import base_and_two

import mergescope as ms
from mergescope.cli import main
from mergescope.errors import MergescopeError
from mergescope.io import save

LAYERS = 4
EMBED = (32, 16)


def _model(folder: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(*EMBED, generator=g)}
    for i in range(LAYERS):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(16, 16, generator=g)
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.randn(16, generator=g)
    save(state, folder)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": LAYERS}))


@pytest.fixture
def recipe(tmp_path):
    return base_and_two(tmp_path, _model, "dare_ties", density=0.5)


@pytest.fixture
def syncs(monkeypatch):
    """Every os.fsync as (path of the fd, whether it is a folder), in call order; the real sync still runs."""
    calls: list[tuple[str, bool]] = []
    real = os.fsync

    def recording(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append((path, os.path.isdir(path)))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_one_fsync_per_shard_then_small_files_and_folders(recipe, tmp_path, syncs):
    out = tmp_path / "out"
    result = ms.merge(recipe, out, max_shard_size="1KB", threads=2)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and result.fsync
    synced_shards = [Path(p).name for p, _ in syncs if Path(p).name.startswith("model-")]
    assert sorted(synced_shards) == shards  # each shard once, no per-tensor syncs
    assert all(".out.partial" in p for p, _ in syncs if Path(p).name in shards)  # before the rename
    files = {Path(p).name for p, is_dir in syncs if not is_dir}
    assert {"config.json", "model.safetensors.index.json"} <= files
    folders = [p for p, is_dir in syncs if is_dir]
    assert folders[-1] == str(tmp_path.resolve())  # the parent, last: makes the rename durable
    assert str((tmp_path / ".out.partial").resolve()) in folders[:-1]


def test_no_fsync_syncs_nothing(recipe, tmp_path, syncs):
    result = ms.merge(recipe, tmp_path / "out", max_shard_size="1KB", fsync=False)
    assert syncs == [] and not result.fsync


def test_single_file_output_synced_once_then_its_folder(recipe, tmp_path, syncs):
    ms.merge(recipe, tmp_path / "m.safetensors")
    assert [Path(p).name for p, _ in syncs] == [".m.safetensors.partial", tmp_path.name]


def test_same_bytes_with_and_without_fsync_and_threads(recipe, tmp_path):
    outputs = []
    for fsync in (True, False):
        for threads in (1, 2):
            out = tmp_path / f"out-{fsync}-{threads}"
            ms.merge(recipe, out, seed=3, threads=threads, max_shard_size="1KB", fsync=fsync)
            outputs.append(_bytes(out))
    assert len(outputs[0]) > 3 and all(o == outputs[0] for o in outputs[1:])


def test_timestamps_ordered_and_steady_bytes_leave_out_the_first_tensor(recipe, tmp_path):
    result = ms.merge(recipe, tmp_path / "out", threads=1, max_shard_size="1KB")
    n_shards = len(list((tmp_path / "out").glob("model-*.safetensors")))
    assert 0 < result.first_tensor_s <= result.last_tensor_s <= result.seconds
    assert len(result.shards_s) == n_shards and list(result.shards_s) == sorted(result.shards_s)
    assert 0 < result.shards_s[0] and result.shards_s[-1] <= result.last_tensor_s
    first_inputs = 3 * EMBED[0] * EMBED[1] * 4  # one thread: the plan's first tensor, from three fp32 models
    assert result.bytes_read - result.steady_bytes_read == first_inputs
    assert result.steady_bytes_per_s == pytest.approx(
        result.steady_bytes_read / (result.last_tensor_s - result.first_tensor_s))
    assert result.to_dict()["steady_bytes_per_s"] == result.steady_bytes_per_s


def test_failure_with_syncs_pending_leaves_no_output(recipe, tmp_path, monkeypatch):
    from mergescope.merge import engine

    real = engine.run_job

    def failing(job, *args, **kwargs):
        if job.name.endswith("layers.3.self_attn.q_proj.weight"):
            raise MergescopeError("tensor: boom")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(engine, "run_job", failing)
    with pytest.raises(MergescopeError, match="boom"):
        ms.merge(recipe, tmp_path / "out", max_shard_size="1KB", threads=2)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_cli_no_fsync_json_and_summary(recipe, tmp_path, capsys, syncs):
    cfg = tmp_path / "r.yml"
    cfg.write_text(recipe)
    code = main(["merge", str(cfg), str(tmp_path / "out"), "--no-fsync", "--json", str(tmp_path / "r.json")])
    assert code in (0, None)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["fsync"] is False and data["first_tensor_s"] <= data["last_tensor_s"] and syncs == []
    printed = capsys.readouterr().out
    assert "first tensor" in printed and "steady state" in printed and "off" in printed


@pytest.mark.parametrize("threads", [1, 2])
def test_every_tensor_starts_its_write_back_once_and_only_when_syncing(tmp_path, recipe, monkeypatch, threads):
    """Each merged tensor's byte range (as the output's own safetensors headers place it) is handed to
    sync_file_range once, on the shard it lies in; none with fsync off."""
    from mergescope.merge import engine

    starts: list[tuple[str, int, int]] = []
    real = engine._start_writeback

    def recording(fd, offset, nbytes):
        starts.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, nbytes))
        return real(fd, offset, nbytes)

    monkeypatch.setattr(engine, "_start_writeback", recording)
    ms.merge(recipe, tmp_path / "quiet", max_shard_size="2KB", threads=threads, fsync=False)
    assert starts == []
    out = tmp_path / "out"
    ms.merge(recipe, out, max_shard_size="2KB", threads=threads)
    expected = set()
    for shard in sorted(out.glob("*.safetensors")):
        raw = shard.read_bytes()
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + size])
        expected |= {(shard.name, 8 + size + begin, end - begin)
                     for name, entry in header.items() if name != "__metadata__"
                     for begin, end in [entry["data_offsets"]]}
    assert len(expected) > 3 and sorted(starts) == sorted(expected)
