"""Results written past the page cache (O_DIRECT): the whole pages of a tensor whose buffer lines up with
its place in the file go through a second, O_DIRECT descriptor, the partial pages at its ends through the
page cache. References: the bytes of the same writes with direct writing off (and safetensors reading the
values back), the spans from a closed form, and a file system that refuses O_DIRECT (EINVAL) simulated."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mergeutil import base_and_two
from safetensors.torch import load_file

import mergescope as ms
from mergescope.io import save
from mergescope.io import writer as io_writer
from mergescope.io.writer import DIRECT_ALIGN, DIRECT_MIN, PlannedWriter, direct_span
from mergescope.merge import engine

PAGE = DIRECT_ALIGN


def test_direct_span_is_the_whole_pages_when_memory_lines_up_with_the_file():
    big = DIRECT_MIN + 3 * PAGE
    # offset 100 into a page, memory at the same place: from the next page to the last whole one
    assert direct_span(10 * PAGE + 100, 5 * PAGE + 100, big) == (PAGE - 100, big - (5 * PAGE + 100 + big) % PAGE)
    assert direct_span(7 * PAGE, 2 * PAGE, big) == (0, big - big % PAGE)  # page-aligned start
    assert direct_span(7 * PAGE + 8, 2 * PAGE + 100, big) is None  # memory and file not at the same place
    assert direct_span(7 * PAGE, 2 * PAGE, DIRECT_MIN - 1) is None  # too small: the page cache takes it whole
    first, last = direct_span(3 * PAGE + 12, 9 * PAGE + 12, big)
    assert (9 * PAGE + 12 + first) % PAGE == 0 and (9 * PAGE + 12 + last) % PAGE == 0 and last - first >= DIRECT_MIN


def _layout():
    """Mixed dtypes and odd sizes, so that offsets fall anywhere in a page."""
    g = torch.Generator().manual_seed(0)
    return {"a.small": torch.randn(3, 5, generator=g).to(torch.bfloat16),  # 30 bytes: later offsets are odd pages
            "b.big": torch.randn(1200, 1001, generator=g),  # 4.8 MB float32
            "c.odd": torch.randn(701, 999, generator=g).to(torch.bfloat16),  # 1.4 MB, odd byte count / 2
            "d.norm": torch.randn(17, generator=g),
            "e.big": torch.randn(999, 1003, generator=g)}


def _lined_up(t: torch.Tensor, offset: int) -> torch.Tensor:
    """``t`` copied into a buffer placed as the engine places a result for the file ``offset``."""
    into = engine.reused_result(SimpleNamespace(shape=tuple(t.shape), dtype=t.dtype), offset)
    return into.copy_(t)


def _write(folder: Path, tensors: dict, direct: bool, lined_up: bool) -> PlannedWriter:
    folder.mkdir()
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = PlannedWriter(folder, layout, 4 * 10**6, {"k": "v"}, direct=direct, mapped=False)
    for name, t in reversed(tensors.items()):  # any order
        offset = writer.extent(name)[1]
        writer.write(name, _lined_up(t, offset) if lined_up else t)
    writer.close()
    return writer


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _open_in(folder: Path) -> list[str]:
    """This process's open descriptors of files in ``folder``."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, gone
            continue
    return [t for t in targets if t.startswith(str(folder))]


def _direct_supported(folder: Path) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"")
    fd = io_writer._open_direct(probe)
    if fd is not None:
        os.close(fd)
    return fd is not None


def test_direct_writes_give_the_same_bytes_as_the_page_cache(tmp_path):
    tensors = _layout()
    plain = _write(tmp_path / "plain", tensors, direct=False, lined_up=True)
    direct = _write(tmp_path / "direct", tensors, direct=True, lined_up=True)
    assert plain.direct_bytes == 0 and _files(tmp_path / "plain") == _files(tmp_path / "direct")
    assert _direct_supported(tmp_path), "the test folder's file system takes O_DIRECT here (ext4); say so if not"
    # every tensor of at least DIRECT_MIN whole pages went past the page cache: its pages, from the closed form
    spans = []
    for shard in sorted((tmp_path / "direct").glob("*.safetensors")):
        header_len = int.from_bytes(shard.read_bytes()[:8], "little")
        header = json.loads(shard.read_bytes()[8:8 + header_len])
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            span = direct_span(8 + header_len + start, 8 + header_len + start, end - start)
            spans.append(0 if span is None else span[1] - span[0])
    assert direct.direct_bytes == sum(spans) > 3 * DIRECT_MIN
    loaded = {}
    for shard in (tmp_path / "direct").glob("*.safetensors"):
        loaded.update(load_file(shard))
    assert all(torch.equal(loaded[name], t) for name, t in tensors.items())


def test_buffers_not_lined_up_go_through_the_page_cache(tmp_path):
    tensors = _layout()
    _write(tmp_path / "plain", tensors, direct=False, lined_up=False)
    direct = _write(tmp_path / "direct", tensors, direct=True, lined_up=False)
    assert _files(tmp_path / "plain") == _files(tmp_path / "direct")
    assert direct.direct_bytes % PAGE == 0  # only whole pages ever go direct


def test_a_refused_direct_write_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    """A file system wanting a larger alignment answers EINVAL: the bytes go through the page cache instead."""
    tensors = _layout()
    _write(tmp_path / "plain", tensors, direct=False, lined_up=True)
    twins: set[int] = set()
    real_open, real_pwrite = io_writer._open_direct, os.pwrite

    def recording_open(path):
        fd = real_open(path)
        twins.add(fd)
        return fd

    def refusing(fd, data, offset):
        if fd in twins:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(io_writer, "_open_direct", recording_open)
    monkeypatch.setattr(os, "pwrite", refusing)
    direct = _write(tmp_path / "direct", tensors, direct=True, lined_up=True)
    assert direct.direct_bytes == 0 and _files(tmp_path / "plain") == _files(tmp_path / "direct")
    assert twins and not _open_in(tmp_path / "direct")  # the twins closed with the writer, though they took nothing


def test_no_direct_descriptor_where_the_file_system_refuses_one(tmp_path, monkeypatch):
    def refusing(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    real_open = os.open
    monkeypatch.setattr(os, "open", refusing)
    writer = PlannedWriter(tmp_path / "x.safetensors", [("w", torch.float32, (4,))], 10**9, None, single_file=True,
                           direct=True)
    assert not writer.writes_direct
    writer.write("w", torch.ones(4))
    writer.close()


# --- the engine -----------------------------------------------------------------------------------------------
def _model(folder: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    save({"model.embed_tokens.weight": torch.randn(700, 1001, generator=g),  # 2.8 MB
          "model.layers.0.mlp.up_proj.weight": torch.randn(1024, 1023, generator=g),  # 4.2 MB
          "model.layers.0.input_layernorm.weight": torch.randn(13, generator=g),
          "model.norm.weight": torch.randn(1001, generator=g)}, folder)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return base_and_two(tmp_path_factory.mktemp("models"), _model, "ties", density=0.5)


@pytest.fixture
def direct_bytes(monkeypatch):
    """The bytes each merge's writer sent past the page cache, in merge order."""
    seen: list[int] = []
    real_close = PlannedWriter.close

    def recording(self):
        seen.append(self.direct_bytes)
        return real_close(self)

    monkeypatch.setattr(PlannedWriter, "close", recording)
    return seen


@pytest.mark.parametrize("threads", [1, 2])
def test_merge_writes_past_the_page_cache_unless_told_not_to_and_the_bytes_do_not_change(recipe, tmp_path, monkeypatch,
                                                                                          direct_bytes, threads):
    assert _direct_supported(tmp_path), "the test folder's file system takes O_DIRECT here (ext4); say so if not"
    ms.merge(recipe, tmp_path / "direct", threads=threads, max_shard_size="5MB")
    ms.merge(recipe, tmp_path / "no-fsync", threads=threads, max_shard_size="5MB", fsync=False)
    monkeypatch.setenv(engine.DIRECT_ENV, "0")
    ms.merge(recipe, tmp_path / "cached", threads=threads, max_shard_size="5MB")
    assert _files(tmp_path / "direct") == _files(tmp_path / "cached") == _files(tmp_path / "no-fsync")
    assert direct_bytes[0] == direct_bytes[1] > 2 * DIRECT_MIN and direct_bytes[2] == 0  # durable or not, the same
