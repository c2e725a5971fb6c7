"""Results written on the background write thread while their workers compute the next job: the bytes are
those of writes made inline (references: the same merge with every write slowed down, so that a buffer
reused too early would show, and the merge's own bytes with one thread), a failed write is the merge's
error and leaves no output, and every write is done before the merge returns."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from mergeutil import base_and_two

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.io import save
from mergescope.io.writer import PlannedWriter
from mergescope.merge import engine

LAYERS = 12


def _model(folder: Path, seed: int) -> None:
    """An embedding and head larger than the typical (median-byte) job, so their buffers are let go and parked."""
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(2000, 700, generator=g),  # 5.6 MB
             "lm_head.weight": torch.randn(2000, 700, generator=g)}
    for i in range(6):  # more jobs larger than the typical one: more buffers parked and taken by the other worker
        state[f"model.extra.{i}.weight"] = torch.randn(2000 + 7 * i, 700, generator=g)
    for i in range(LAYERS):
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(600, 700, generator=g)  # 1.7 MB
        state[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(700, 600, generator=g)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(700, generator=g)
    save(state, folder)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": LAYERS}))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return base_and_two(tmp_path_factory.mktemp("models"), _model, "task_arithmetic")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("threads", [1, 2])
def test_slow_writes_give_the_same_bytes(recipe, tmp_path, monkeypatch, threads):
    """Each write waits 50 ms before it starts: a worker that reused a buffer (its own, or one parked by the
    other worker) before its write was done would change the bytes."""
    ms.merge(recipe, tmp_path / "inline", threads=1, max_shard_size="8MB")
    real_write = PlannedWriter.write
    started = []

    def slow(self, name, tensor):
        started.append(name)
        time.sleep(0.05)
        return real_write(self, name, tensor)

    monkeypatch.setattr(PlannedWriter, "write", slow)
    monkeypatch.setenv(engine.WRITE_ENV, "pwrite")  # every result through the write thread
    result = ms.merge(recipe, tmp_path / "slow", threads=threads, max_shard_size="8MB")
    assert _files(tmp_path / "slow") == _files(tmp_path / "inline")
    assert len(started) == result.tensors and result.bytes_written == sum(
        p.stat().st_size for p in (tmp_path / "slow").glob("*.safetensors")) - sum(
        8 + int.from_bytes(p.read_bytes()[:8], "little") for p in (tmp_path / "slow").glob("*.safetensors"))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_failed_write_is_the_merges_error_and_leaves_no_output(recipe, tmp_path, monkeypatch, threads):
    real_write = PlannedWriter.write

    def failing(self, name, tensor):
        if name == "model.layers.1.mlp.up_proj.weight":
            raise MergescopeError(f"tensor {name!r}: no space left on device")
        return real_write(self, name, tensor)

    monkeypatch.setattr(PlannedWriter, "write", failing)
    monkeypatch.setenv(engine.WRITE_ENV, "pwrite")
    with pytest.raises(MergescopeError, match="no space left on device"):
        ms.merge(recipe, tmp_path / "out", threads=threads, max_shard_size="8MB")
    assert not (tmp_path / "out").exists() and not any(tmp_path.glob(".out*"))
