"""Merging straight into mapped, preallocated output shards (issue 20).

The reference is the engine's pwrite path (``MERGESCOPE_WRITE=pwrite``): every output must have
the same files and bytes both ways, with 1 and 2 threads, fsync on and off, sharded and single-file,
resumed or not. A method taking ``out=`` is simulated by wrapping ``linear`` (its result copied into
``out``), since the registry's functions gain ``out=`` separately; the registry's own methods are
compared both ways too, whichever path they take. Which path ran is checked from the outside:
``os.pwrite`` calls carrying tensor bytes, and ``/proc/self/maps`` entries of the output shards.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mergescope as ms
from mergescope.cli import main
from mergescope.errors import MergescopeError
from mergescope.io import save
from mergescope.io.checkpoint import SAFE_INDEX
from mergescope.merge import engine, methods, pages

LAYERS = 4


def _model(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(40, 16, generator=g),
             "model.position_ids": torch.arange(12, dtype=torch.int64)}  # not floating point: copied
    for i in range(LAYERS):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(24, 16, generator=g)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(16, generator=g)
    save(state, folder)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": LAYERS}))
    return state


@pytest.fixture
def models(tmp_path):
    return {name: _model(tmp_path / name, seed) for seed, name in enumerate(("base", "a", "b"))}


def _recipe(tmp_path: Path, method: str = "linear", extra: str = "") -> str:
    base = f"base_model: {tmp_path}/base\n" if method != "linear" else ""
    density = ", density: 0.6" if method == "ties" else ""
    return (f"merge_method: {method}\n{base}{extra}models:\n"
            f"  - {{model: {tmp_path}/base, parameters: {{weight: 0.2{density}}}}}\n"
            f"  - {{model: {tmp_path}/a, parameters: {{weight: 0.5{density}}}}}\n"
            f"  - {{model: {tmp_path}/b, parameters: {{weight: 0.3{density}}}}}\n")


@pytest.fixture(autouse=True)
def mapped_path(monkeypatch):
    """The mapped path whatever the thread count (by default 1 thread writes with pwrite)."""
    monkeypatch.setenv(engine.WRITE_ENV, "mapped")


@pytest.fixture
def in_place(monkeypatch):
    """``linear`` with an ``out=`` keyword (result copied into it); records whether each call got ``out``."""
    calls: list[bool] = []
    real = methods.linear

    def linear_out(tensors, base=None, *, weight, normalize=True, out=None, **kw):
        calls.append(out is not None)
        result = real(tensors, base, weight=weight, normalize=normalize, **kw)
        return result if out is None else out.copy_(result)

    monkeypatch.setitem(methods.REGISTRY, "linear", dataclasses.replace(methods.REGISTRY["linear"], fn=linear_out))
    assert engine.takes_out(linear_out)
    return calls


@pytest.fixture
def pwrites(monkeypatch):
    """Sizes of the ``os.pwrite`` calls (headers are small; a tensor's bytes are its nbytes)."""
    sizes: list[int] = []
    real = os.pwrite

    def recording(fd, data, offset):
        sizes.append(len(memoryview(data).cast("B")))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording)
    return sizes


def _bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _jobs(tmp_path: Path, *names: str) -> list:
    """The planned jobs of ``names`` in this module's linear recipe."""
    from mergescope.merge import plan
    from mergescope.recipe import read

    recipe = read(_recipe(tmp_path))
    jobs = {j.name: j for j in plan.build(recipe, plan.open_models(recipe)).jobs}
    return [jobs[n] for n in names]


def _both(monkeypatch, recipe: str, out: Path, **kw) -> tuple[dict, dict]:
    """The output's bytes from the mapped path and from the pwrite path (same arguments)."""
    ms.merge(recipe, out, **kw)
    with monkeypatch.context() as m:
        m.setenv(engine.WRITE_ENV, "pwrite")
        ms.merge(recipe, out.with_name("pw-" + out.name), **kw)
    return _bytes(out), _bytes(out.with_name("pw-" + out.name))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fsync", [True, False])
def test_in_place_method_writes_through_the_map_same_bytes_as_pwrite(models, tmp_path, monkeypatch, in_place,
                                                                     pwrites, threads, fsync):
    out = tmp_path / "out"
    ms.merge(_recipe(tmp_path), out, threads=threads, max_shard_size="1KB", fsync=fsync)
    assert len(in_place) == 1 + 2 * LAYERS and all(in_place)  # every float tensor got out=
    headers = [8 + int.from_bytes(p.read_bytes()[:8], "little") for p in out.glob("model-*")]
    assert sorted(pwrites) == sorted(headers)  # only the headers went through pwrite
    pwrites.clear()
    with monkeypatch.context() as m:
        m.setenv(engine.WRITE_ENV, "pwrite")
        ms.merge(_recipe(tmp_path), tmp_path / "ref", threads=threads, max_shard_size="1KB", fsync=fsync)
    assert sum(pwrites) > 40 * 16 * 4  # the tensors went through pwrite
    assert len(_bytes(out)) > 5 and _bytes(out) == _bytes(tmp_path / "ref")
    # the values against an independent weighted average (numpy, float64)
    merged = ms.load(out)
    w = np.array([0.2, 0.5, 0.3])
    for name, t in merged.items():
        stack = np.stack([models[m][name].double().numpy() for m in ("base", "a", "b")])
        expect = np.tensordot(w / w.sum(), stack, axes=1)
        if t.is_floating_point():
            np.testing.assert_allclose(t.numpy(), expect, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(t, models["base"][name])


def test_default_maps_large_results_with_two_threads_and_pwrites_with_one(models, tmp_path, monkeypatch, in_place,
                                                                          pwrites):
    """By default (2 threads) only results over pages.RESIDENT bytes or the typical job's size go through the map
    (here the embedding, 2560 bytes, and q_proj, 1536); the layernorms (64 bytes) and the copied position ids (96)
    are pwritten from the worker's buffer; with 1 thread everything is; the bytes are the same. A result over the
    typical job's size under RESIDENT goes through the map too."""
    monkeypatch.delenv(engine.WRITE_ENV)
    monkeypatch.setattr(pages, "RESIDENT", 1024)
    ms.merge(_recipe(tmp_path), tmp_path / "two", threads=2, max_shard_size="1KB")
    headers = [8 + int.from_bytes(p.read_bytes()[:8], "little") for p in (tmp_path / "two").glob("model-*")]
    assert all(in_place) and sorted(pwrites) == sorted(headers + [16 * 4] * LAYERS + [12 * 8])
    embed, ids = _jobs(tmp_path, "model.embed_tokens.weight", "model.position_ids")
    assert [engine.through_slot(j, 10**6) for j in (embed, ids)] == [True, False]
    monkeypatch.setattr(pages, "RESIDENT", 10**6)
    assert [engine.through_slot(j, 12) for j in (embed, ids)] == [True, False]  # 640 and 12 entries
    in_place.clear()
    ms.merge(_recipe(tmp_path), tmp_path / "one", threads=1, max_shard_size="1KB")
    # one thread: out= is the worker's reused result buffer, whose bytes then go out by pwrite
    assert in_place and all(in_place) and sum(pwrites) > 2 * 40 * 16 * 4
    assert _bytes(tmp_path / "one") == _bytes(tmp_path / "two")


def test_pwrite_path_reuses_one_result_buffer_per_worker(models, tmp_path, monkeypatch):
    """Same-shaped results on the pwrite path land in the same memory (no fresh pages per tensor), and
    each is written out before the buffer is reused (the bytes equal the mapped path's)."""
    addresses: list[int] = []
    real = methods.linear

    def linear_out(tensors, base=None, *, weight, normalize=True, out=None, **kw):
        addresses.append(out.data_ptr())
        return out.copy_(real(tensors, base, weight=weight, normalize=normalize, **kw))

    monkeypatch.setitem(methods.REGISTRY, "linear", dataclasses.replace(methods.REGISTRY["linear"], fn=linear_out))
    mapped, written = _both(monkeypatch, _recipe(tmp_path), tmp_path / "out", threads=1, max_shard_size="1KB")
    assert mapped == written
    pwrite_calls = addresses[len(addresses) // 2:]
    assert len(pwrite_calls) == 1 + 2 * LAYERS and len(set(pwrite_calls)) < len(pwrite_calls) // 2


def test_single_file_and_cast_output_same_bytes_as_pwrite(models, tmp_path, monkeypatch, in_place):
    mapped, ref = _both(monkeypatch, _recipe(tmp_path), tmp_path / "m.safetensors", threads=2)
    assert len(mapped[""]) > 40 * 16 * 4 and mapped == ref
    in_place.clear()  # bfloat16 output of float32 work: cast into the map, not handed to out=
    recipe = _recipe(tmp_path, extra="out_dtype: bfloat16\n")
    mapped, ref = _both(monkeypatch, recipe, tmp_path / "bf", threads=2, max_shard_size="1KB")
    assert in_place and not any(in_place)
    assert ms.load(tmp_path / "bf")["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert mapped == ref


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp"])
def test_registry_methods_same_bytes_both_paths(models, tmp_path, monkeypatch, method):
    recipe = _recipe(tmp_path, method)
    if method == "slerp":
        recipe = (f"merge_method: slerp\nbase_model: {tmp_path}/base\nparameters: {{t: 0.3}}\n"
                  f"models:\n  - model: {tmp_path}/base\n  - model: {tmp_path}/a\n")
    mapped, ref = _both(monkeypatch, recipe, tmp_path / "out", threads=2, max_shard_size="1KB", seed=5)
    assert len(mapped) > 5 and mapped == ref


def _output_maps(tmp_path: Path) -> list[str]:
    """Lines of /proc/self/maps naming a file under ``tmp_path`` that a merge writes."""
    root = str(tmp_path.resolve())
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if root in line and ("partial" in line or line.rstrip().endswith(".safetensors"))
            and "/base/" not in line and "/a/" not in line and "/b/" not in line]


def test_maps_bounded_by_jobs_in_flight_and_none_left(models, tmp_path, in_place):
    seen = []
    out = tmp_path / "out"
    ms.merge(_recipe(tmp_path), out, threads=2, max_shard_size="1KB",
             on_tensor=lambda name, n: seen.append(len(_output_maps(tmp_path))))
    assert len(seen) == 2 + 2 * LAYERS and max(seen) <= 1  # the other worker's slot at most
    assert _output_maps(tmp_path) == []


def test_error_inside_an_in_place_job_leaves_no_output_no_map_no_fd(models, tmp_path, monkeypatch, in_place):
    real = methods.REGISTRY["linear"].fn

    def half_then_fail(tensors, base=None, *, out=None, **kw):
        if out is not None and out.shape == (24, 16):
            out.view(-1)[:100] = 7.0  # half-written into the mapped shard
            raise MergescopeError("boom")
        return real(tensors, base, out=out, **kw)

    monkeypatch.setitem(methods.REGISTRY, "linear", dataclasses.replace(methods.REGISTRY["linear"], fn=half_then_fail))
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(MergescopeError, match="boom") as info:
        ms.merge(_recipe(tmp_path), tmp_path / "out", threads=2, max_shard_size="1KB")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    del info  # its traceback's frames hold the job's views (their maps, each with a dup'ed fd, stay valid)
    gc.collect()
    assert _output_maps(tmp_path) == [] and len(os.listdir("/proc/self/fd")) == fds


def test_nonfinite_result_in_the_map_refused(models, tmp_path, monkeypatch, in_place):
    save({**models["b"], "model.layers.2.input_layernorm.weight": torch.full((16,), float("nan"))}, tmp_path / "nan")
    with pytest.raises(MergescopeError, match="input_layernorm.*NaN") as info:
        ms.merge(_recipe(tmp_path).replace(f"{tmp_path}/b,", f"{tmp_path}/nan,"), tmp_path / "out", max_shard_size="1KB")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    del info
    gc.collect()
    assert _output_maps(tmp_path) == []


def test_no_fallocate_support_falls_back_to_pwrite(models, tmp_path, monkeypatch, in_place, pwrites):
    def unsupported(fd, offset, size):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    mapped, ref = _both(monkeypatch, _recipe(tmp_path), tmp_path / "out", max_shard_size="1KB")
    assert mapped == ref and in_place and all(in_place)  # no slot: out= is the worker's reused buffer,
    assert sum(pwrites) > 2 * 40 * 16 * 4  # and the tensors went through pwrite (both runs)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO])
def test_full_disk_named_before_any_work(models, tmp_path, monkeypatch, in_place, capsys, code):
    reserved = []

    def full(fd, offset, size):
        reserved.append(size)
        if len(reserved) == 3:
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", full)
    pattern = rf"model-00003-of-\d+\.safetensors: cannot reserve \d+ bytes.*{os.strerror(code)}"
    with pytest.raises(MergescopeError, match=pattern):
        ms.merge(_recipe(tmp_path), tmp_path / "out", max_shard_size="1KB")
    assert in_place == [] and not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()
    reserved.clear()
    (tmp_path / "r.yml").write_text(_recipe(tmp_path))
    assert main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "out"), "--max-shard-size", "1KB"]) == 2
    err = capsys.readouterr().err
    assert "cannot reserve" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "base", "r.yml"]


def test_shards_reserved_at_full_size(models, tmp_path, monkeypatch, in_place):
    sizes = {}
    real = os.posix_fallocate

    def recording(fd, offset, size):
        sizes[os.readlink(f"/proc/self/fd/{fd}")] = (offset, size)
        return real(fd, offset, size)

    monkeypatch.setattr(os, "posix_fallocate", recording)
    ms.merge(_recipe(tmp_path), tmp_path / "out", max_shard_size="1KB")
    final = {p.name: p.stat().st_size for p in (tmp_path / "out").glob("model-*")}
    assert {Path(p).name: s for p, (_, s) in sizes.items()} == final and all(o == 0 for o, _ in sizes.values())


@pytest.fixture
def events(monkeypatch):
    """(what, shard file name, thread name) of each shard fsync and done-log entry, in order."""
    from mergescope.io import writer

    seen: list[tuple[str, str, str]] = []
    real_fsync, real_record = os.fsync, writer.record_done

    def fsync(fd):
        seen.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name, threading.current_thread().name))
        return real_fsync(fd)

    def record(folder, path, digest=None):
        seen.append(("log", Path(path).name, threading.current_thread().name))
        return real_record(folder, path, digest)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(writer, "record_done", record)
    return seen


@pytest.mark.parametrize("fsync", [True, False])
def test_done_log_written_off_the_workers_after_the_shards_sync(models, tmp_path, events, fsync):
    ms.merge(_recipe(tmp_path), tmp_path / "out", threads=2, max_shard_size="1KB", fsync=fsync)
    logs = [(name, thread) for what, name, thread in events if what == "log"]
    shards = len(list((tmp_path / "out").glob("model-*")))
    assert len(logs) == shards - 1  # all but the last to finish
    assert all(thread.startswith("fsync") for _, thread in logs)  # the background thread, not a merge worker
    if fsync:
        for name, _ in logs:
            order = [what for what, n, _ in events if n == name]
            assert order == ["fsync", "log"]


def test_resume_after_an_interruption_following_log_entries(models, tmp_path, monkeypatch, in_place, events):
    """Ctrl-C once two shards are logged: the resumed run reuses exactly the logged shards (their
    hashes checked against the files) and writes the bytes of an uninterrupted run."""
    from mergescope.io.atomic import verified_done

    recipe = _recipe(tmp_path)
    with monkeypatch.context() as m:
        m.setenv(engine.WRITE_ENV, "pwrite")
        ms.merge(recipe, tmp_path / "ref", threads=2, max_shard_size="1KB")
    events.clear()
    real = engine.run_job

    def interrupted(job, *args, **kwargs):
        if job.name == "model.layers.3.input_layernorm.weight":
            deadline = time.monotonic() + 20
            while sum(what == "log" for what, _, _ in events) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            raise KeyboardInterrupt
        return real(job, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(engine, "run_job", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ms.merge(recipe, tmp_path / "out", threads=2, max_shard_size="1KB")
    partial = tmp_path / ".out.partial"
    logged = {name for what, name, _ in events if what == "log"}
    assert len(logged) >= 2 and set(verified_done(partial)) == logged
    index = json.loads((tmp_path / "ref" / SAFE_INDEX).read_text())["weight_map"]
    result = ms.merge(recipe, tmp_path / "out", threads=2, max_shard_size="1KB", resume=True)
    assert result.reused == sum(file in logged for file in index.values()) > 0
    assert _bytes(tmp_path / "out") == _bytes(tmp_path / "ref")
