"""Bounded resident memory for the streaming merge (issue 20): merge/pages.py's page release, the kernels'
windowed passes, check_finite's windows, the scratch trim between jobs, and the output slot's map errors.

Residency is read from the outside (``/proc/self/smaps``: the Rss of the mapping holding a tensor); the
bits are checked against the unwindowed kernel call (one window: the code path before windows) and the
torch expressions the kernels replace.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_merge_methods import (
    _model_stock_whole_tensor,  # MergeKit's expression, whole tensors
)

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.io import save
from mergescope.io import writer as io_writer
from mergescope.io.writer import PlannedWriter, map_tensor
from mergescope.merge import engine, kernels, methods, pages, scratch
from mergescope.merge import plan as planning

torch.set_num_threads(1)
PAGE = mmap.PAGESIZE


def _file(path: Path, values: torch.Tensor) -> Path:
    path.write_bytes(values.numpy().tobytes())
    return path


def _mapped(path: Path, n: int, shared: bool = False) -> tuple[torch.Tensor, mmap.mmap]:
    fd = os.open(path, os.O_RDWR if shared else os.O_RDONLY)
    try:
        return map_tensor(fd, 0, torch.float32, (n,), shared=shared)
    finally:
        os.close(fd)


def _rss_kb(tensor: torch.Tensor) -> int:
    """Resident kB of the mapping that holds ``tensor``'s first byte (/proc/self/smaps)."""
    address, inside = tensor.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("no mapping holds the tensor")


@pytest.fixture
def values():
    return torch.randn(64 * PAGE // 4, generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- pages.release


def test_released_input_pages_leave_the_resident_set_and_read_back_the_same(tmp_path, values):
    tensor, mapped = _mapped(_file(tmp_path / "in.bin", values), values.numel())
    pages.track(mapped)
    try:
        assert torch.equal(tensor, values) and _rss_kb(tensor) >= 64 * PAGE // 1024
        pages.release(tensor, 0, tensor.numel())
        assert _rss_kb(tensor) == 0
        assert torch.equal(tensor, values)  # faulted back in from the page cache
    finally:
        pages.forget(mapped)
    assert pages.tracked() == 0


def test_released_output_pages_keep_what_was_written(tmp_path, values):
    path = _file(tmp_path / "out.bin", torch.zeros_like(values))
    tensor, mapped = _mapped(path, values.numel(), shared=True)
    pages.track(mapped)
    try:
        tensor.copy_(values)
        pages.release(tensor, 0, tensor.numel())
        assert _rss_kb(tensor) == 0 and torch.equal(tensor, values)
    finally:
        pages.forget(mapped)
    del tensor, mapped
    assert np.array_equal(np.fromfile(path, np.float32), values.numpy())


def test_only_whole_pages_inside_the_range_are_released(tmp_path, values):
    """A private map's written page reverts to the file's bytes when released: the pages around the range
    keep their writes, so nothing outside it was touched."""
    tensor, mapped = _mapped(_file(tmp_path / "in.bin", values), values.numel())
    per_page = PAGE // 4
    assert torch.equal(tensor, values)  # every page resident
    tensor[per_page - 1] = tensor[3 * per_page] = 123.0  # the last entry before, the first after
    pages.track(mapped)
    try:
        pages.release(tensor, per_page - 1, 3 * per_page + 1)  # one entry into the pages on both sides
        assert tensor[per_page - 1] == 123.0 and tensor[3 * per_page] == 123.0
        assert _rss_kb(tensor) == (64 - 2) * PAGE // 1024  # pages 1 and 2 gone, the rest resident
    finally:
        pages.forget(mapped)


def test_anonymous_and_forgotten_memory_is_never_released(tmp_path, values):
    anonymous = values.clone()
    pages.release(anonymous, 0, anonymous.numel())
    assert torch.equal(anonymous, values)
    tensor, mapped = _mapped(_file(tmp_path / "in.bin", values), values.numel())
    tensor[0] = 5.0  # a private write: released, it would read the file's value again
    pages.track(mapped)
    pages.forget(mapped)
    pages.release(tensor, 0, tensor.numel())
    assert tensor[0] == 5.0 and pages.tracked() == 0


def test_only_inputs_over_the_resident_size_are_given_back_between_passes(monkeypatch):
    """pages.reread: a first pass over inputs a later pass reads again gives back only those over RESIDENT
    bytes (the rest stay resident for the later pass instead of being faulted in twice)."""
    small, large = torch.empty(16), torch.empty(17)
    monkeypatch.setattr(pages, "RESIDENT", 64)
    kept = pages.reread(small, large)
    assert len(kept) == 1 and kept[0] is large
    assert pages.reread(small.bfloat16(), torch.empty(32, dtype=torch.bfloat16)) == ()  # 64 bytes: not over


# ----------------------------------------------------------------------------- the kernels' windows


def _windowed(monkeypatch, window, fn):
    with monkeypatch.context() as m:
        m.setattr(kernels, "WINDOW", window)
        return fn()


@pytest.mark.parametrize("consensus", [False, True])
def test_windowed_kernels_give_the_unwindowed_bits(monkeypatch, consensus):
    g = torch.Generator().manual_seed(1)
    n = 7 * kernels.BLOCK + 5  # windows of 2 blocks, the last one short
    base = torch.randn(n, generator=g)
    tensors = [base + torch.randn(n, generator=g) for _ in range(3)]
    plan = [(torch.rand(n, generator=g) < 0.5, 1.0), (None, 1.25), (torch.rand(n, generator=g) < 0.3, 2.0)]
    weights = [0.5, 0.3, 0.2]

    def run():
        merged = kernels.task_vectors(torch.empty(n), base, tensors, plan, weights, 1.0, consensus, True, 0.7)
        summed = kernels.weighted_sum(torch.empty(n), tensors, torch.tensor(weights), torch.tensor(1.0), True)
        return merged, summed, kernels.abs_diff(torch.empty(n), tensors[0], base)

    whole = _windowed(monkeypatch, 1 << 40, run)
    windowed = _windowed(monkeypatch, 2 * kernels.BLOCK, run)
    for a, b in zip(whole, windowed):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert torch.equal(whole[2], (tensors[0] - base).abs_())  # torch's expression, too


def test_kernel_passes_keep_one_window_of_mapped_inputs_and_output_resident(tmp_path, monkeypatch):
    n = 256 * PAGE // 4  # 1 MB float32
    window = 16 * PAGE // 4
    g = torch.Generator().manual_seed(2)
    inputs = [_mapped(_file(tmp_path / f"in{i}.bin", torch.randn(n, generator=g)), n) for i in range(3)]
    out, out_map = _mapped(_file(tmp_path / "out.bin", torch.zeros(n)), n, shared=True)
    for _, mapped in [*inputs, (out, out_map)]:
        pages.track(mapped)
    base, a, b = (t for t, _ in inputs)
    try:
        with monkeypatch.context() as m:
            m.setattr(kernels, "WINDOW", window)
            magnitude = kernels.abs_diff(torch.empty(n), a, base)
            kernels.task_vectors(out, base, [a, b], [(None, 1.0), (None, 1.0)], [0.6, 0.4], 1.0, False, False, 1.0)
        for t in (base, a, b, out):
            assert _rss_kb(t) <= window * 4 // 1024  # whole tensors were touched: only window edges may stay
        assert torch.equal(out, base + ((a - base) * 0.6 + (b - base) * 0.4))  # read back through the page cache
        assert torch.equal(magnitude, (a - base).abs_())
    finally:
        for _, mapped in [*inputs, (out, out_map)]:
            pages.forget(mapped)


def test_reread_keeps_inputs_up_to_the_threads_bound(tmp_path):
    """pages.reread gives back inputs over RESIDENT bytes, or over the bound a thread set (resident_up_to, restored
    on leaving, nested, not seen by other threads); under 0 a |delta| pass leaves only its last window of a
    small mapped input resident, by default all of it."""
    import threading

    small, large = torch.zeros(8), torch.zeros(pages.RESIDENT // 4 + 1)
    assert pages.reread(small, large) == (large,)
    with pages.resident_up_to(0):
        assert len(pages.reread(small, large)) == 2
        with pages.resident_up_to(pages.RESIDENT):
            assert pages.reread(small, large) == (large,)
        seen = []
        thread = threading.Thread(target=lambda: seen.append(len(pages.reread(small, large))))
        thread.start()
        thread.join()
        assert seen == [1] and len(pages.reread(small)) == 1
    assert pages.reread(small, large) == (large,) and not hasattr(pages._local, "resident")
    n, window = 256 * PAGE // 4, 16 * PAGE // 4
    g = torch.Generator().manual_seed(4)
    inputs = [_mapped(_file(tmp_path / f"in{i}.bin", torch.randn(n, generator=g)), n) for i in range(2)]
    for _, mapped in inputs:
        pages.track(mapped)
    (t, _), (base, _) = inputs
    try:
        for bound, most in ((pages.RESIDENT, n * 4 // 1024), (0, window * 4 // 1024)):
            for _, mapped in inputs:
                mapped.madvise(mmap.MADV_DONTNEED)
            with pages.resident_up_to(bound):
                for start, stop in pages.windows(n, window, *pages.reread(t, base)):
                    t[start:stop].sum() + base[start:stop].sum()
            assert _rss_kb(t) <= most and _rss_kb(base) <= most and (bound == 0 or _rss_kb(t) == most)
    finally:
        for _, mapped in inputs:
            pages.forget(mapped)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_in_windows_keeps_mergekits_bits_and_few_mapped_pages(tmp_path, monkeypatch, filter_wise):
    """Windows of 16 pages (the last one short, rows split across windows when flat): the whole-tensor bits,
    and only about a window (and the kernel's 16-page fault-around) of the 4 mapped inputs and the mapped
    output stays resident."""
    rows, width = 64, 8 * PAGE // 4 + 7
    n = rows * width
    g = torch.Generator().manual_seed(6)
    base_values = torch.randn(n, generator=g)
    inputs = [_mapped(_file(tmp_path / "base.bin", base_values), n)]
    inputs += [_mapped(_file(tmp_path / f"in{i}.bin", base_values + 0.1 * torch.randn(n, generator=g)), n)
               for i in range(3)]
    out, out_map = _mapped(_file(tmp_path / "out.bin", torch.zeros(n)), n, shared=True)
    maps = [m for _, m in inputs] + [out_map]
    for mapped in maps:
        pages.track(mapped)
    base, *models = (t.view(rows, width) for t, _ in inputs)
    try:
        with monkeypatch.context() as m:
            m.setattr(methods, "STOCK_WINDOW", 16 * PAGE // 4)  # the torch path (no numba)
            m.setattr(methods, "CHUNK", 2 * PAGE // 4)
            m.setattr(kernels, "WINDOW", 16 * PAGE // 4)  # the fused kernels' path
            merged = methods.model_stock(models, base, filter_wise=filter_wise, out=out.view(rows, width))
        for t in (*(t for t, _ in inputs), out):
            assert _rss_kb(t) <= 3 * 16 * PAGE // 1024  # of 129 pages each
        expected = _model_stock_whole_tensor(models, base) if filter_wise else \
            _model_stock_whole_tensor([t.reshape(-1) for t in models], base.reshape(-1)).view(rows, width)
        assert torch.equal(merged.view(torch.int32), expected.view(torch.int32))
    finally:
        for mapped in maps:
            pages.forget(mapped)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_kernels_in_windows_of_many_rows_give_mergekits_bits(monkeypatch, dtype, filter_wise):
    """Windows of 76 rows of 13 (988 entries; 1000 when flat), the last one short: each window's rows take
    their own ratios; the whole-tensor expression's bits, signed zeros included."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(700, 13, generator=g, dtype=dtype)
    base.view(-1)[:5] = -0.0
    models = [base + 0.1 * torch.randn(700, 13, generator=g, dtype=dtype) for _ in range(3)]
    models[1].view(-1)[:3] = -0.0
    expected = _model_stock_whole_tensor(models, base) if filter_wise else \
        _model_stock_whole_tensor([t.reshape(-1) for t in models], base.reshape(-1)).view(700, 13)
    merged = _windowed(monkeypatch, 1000, lambda: methods.model_stock(models, base, filter_wise=filter_wise))
    assert torch.equal(merged, expected) and torch.equal(merged.signbit(), expected.signbit())


# ----------------------------------------------------------------------------- the engine


def test_check_finite_finds_a_nan_in_the_last_window():
    values = torch.zeros(10_000)
    engine.check_finite("w", values, window=1000)
    values[-1] = float("nan")
    with pytest.raises(MergescopeError, match="1 NaN/Inf value"):
        engine.check_finite("w", values, window=1000)
    engine.check_finite("w", torch.full((3, 4), 3e38).t())  # non-contiguous, sum overflows: no bad entry


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_check_finite_of_every_dtype_finds_each_kind_of_bad_entry(dtype):
    """Half dtypes are checked by their extremes, wider ones by their sum: each finds a NaN, +Inf or -Inf
    anywhere (windows, tails, a transposed view) and passes the dtype's largest finite values."""
    big = torch.finfo(dtype).max
    engine.check_finite("w", torch.full((5000,), big, dtype=dtype), window=1000)
    engine.check_finite("w", torch.full((5000,), -big, dtype=dtype), window=1000)
    engine.check_finite("w", torch.empty(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 999, 1000, 4999):
            values = torch.randn(5000, generator=torch.Generator().manual_seed(where)).to(dtype)
            values[where] = bad
            with pytest.raises(MergescopeError, match="1 NaN/Inf value"):
                engine.check_finite("w", values, window=1000)
            with pytest.raises(MergescopeError, match="1 NaN/Inf value"):
                engine.check_finite("w", values.reshape(50, 100).t())


def test_copy_into_a_slot_by_windows_is_torchs_copy():
    source = torch.randn(3, 1001, generator=torch.Generator().manual_seed(4))
    into = torch.empty(3, 1001, dtype=torch.float64)
    assert engine._copy_into(into, source, window=1000) is into and torch.equal(into, source.to(torch.float64))
    strided = torch.empty(1001, 3).t()
    assert torch.equal(engine._copy_into(strided, source, window=1000), source)


def test_scratch_trim_frees_only_the_larger_buffers():
    scratch.release()
    scratch.array("t.big", 5000, np.float32)
    small = scratch.array("t.small", 100, np.float64).ctypes.data
    scratch.trim(1000)
    assert scratch.held_bytes() == 800 and scratch.array("t.small", 100, np.float64).ctypes.data == small
    scratch.release()


def test_typical_entries_is_the_job_holding_the_median_byte():
    def job(shape, nbytes):
        return planning.Job(name="x", inputs=(), base=None, shared={}, per_input=(), shape=shape,
                            dtype=torch.float32, nbytes_in=nbytes)

    jobs = [job((10,), 40), job((1000, 10), 40_000), job((20, 10), 800), job((20, 10), 800),
            job((300, 100), 40_000)]
    assert engine.typical_entries(jobs) == 10_000  # half the bytes are in jobs of up to 10,000 entries
    assert engine.typical_entries([]) == 0


def test_in_flight_limit_is_the_largest_job_plus_a_typical_one(monkeypatch):
    def job(shape, nbytes):
        return planning.Job(name="x", inputs=(), base=None, shared={}, per_input=(), shape=shape,
                            dtype=torch.float32, nbytes_in=nbytes)

    jobs = [job((1000, 10), 40_000), job((20, 10), 800), job((300, 100), 120_000), job((10,), 40),
            job((1000, 10), 40_000), job((1000, 10), 40_000)]  # the median input byte is in a (1000, 10) job
    monkeypatch.setattr(engine, "MIN_BUDGET", 1)
    assert engine.in_flight_limit(jobs) == (120_000 + 120_000) + (40_000 + 40_000)  # ins + out of each
    monkeypatch.setattr(engine, "MIN_BUDGET", 10**9)
    assert engine.in_flight_limit(jobs) == engine.in_flight_limit([]) == 10**9


def test_large_jobs_dispatch_first_and_small_ones_fill_around_them():
    def job(name, entries):
        return planning.Job(name=name, inputs=(), base=None, shared={}, per_input=(), shape=(entries,),
                            dtype=torch.float32, nbytes_in=12 * entries)  # 3 inputs + out: 16 bytes per entry

    jobs = [job("embed", 1000), *(job(f"layer{i}", 10) for i in range(5)), job("head", 1000)]
    limit = 16 * 1000 + 16 * 10  # the largest + a typical job
    order = engine.dispatch_order(jobs, limit)
    assert [j.name for j in order] == ["embed", "head", *(f"layer{i}" for i in range(5))]
    budget = engine._Budget(limit)
    assert engine._next_fitting(order, budget).name == "embed"
    budget.used = 16 * 1000  # the embedding in flight: the head must wait, a layer may go
    assert engine._next_fitting(order, budget).name == "layer0" and order[0].name == "head"
    budget.used = 16 * 1000 + 16 * 10
    assert engine._next_fitting(order, budget) is None and len(order) == 5
    budget.used = 16 * 10
    assert engine._next_fitting(order, budget).name == "head"


def test_a_typical_job_runs_beside_the_largest(tmp_path, monkeypatch):
    """The embedding (the largest job) and the norm are in flight together: each waits for the other at a
    barrier, which times out if the limit admits the embedding alone (as it did)."""
    import threading

    monkeypatch.setattr(engine, "MIN_BUDGET", 1)
    together = threading.Barrier(2, timeout=10)
    real = engine.run_job

    def meeting(job, *args, **kwargs):
        together.wait()
        return real(job, *args, **kwargs)

    monkeypatch.setattr(engine, "run_job", meeting)
    ms.merge(_models(tmp_path), tmp_path / "out.safetensors", threads=2)
    assert not together.broken


def _models(tmp_path: Path) -> str:
    g = torch.Generator().manual_seed(3)
    base = {"embed.weight": torch.randn(300, 64, generator=g), "norm.weight": torch.randn(64, generator=g)}
    save(base, tmp_path / "base")
    for i in range(2):
        save({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / f"m{i}")
    return (f"merge_method: ties\nbase_model: {tmp_path}/base\nmodels:\n"
            + "".join(f"  - {{model: {tmp_path}/m{i}, parameters: {{weight: 0.5, density: 0.5}}}}\n" for i in range(2)))


def test_merge_in_small_windows_gives_the_same_bytes_and_leaves_nothing_tracked(tmp_path, monkeypatch):
    recipe = _models(tmp_path)
    trims = []
    real_trim = scratch.trim
    monkeypatch.setattr(scratch, "trim", lambda n, park=False: trims.append(n) or real_trim(n, park))
    monkeypatch.setenv(engine.WRITE_ENV, "mapped")
    ms.merge(recipe, tmp_path / "windows.safetensors", threads=2)
    # the embedding's job holds the median byte (+ the result's alignment pad)
    assert pages.tracked() == 0 and trims == [300 * 64 + io_writer.DIRECT_ALIGN] * 2
    with monkeypatch.context() as m:
        m.setattr(kernels, "WINDOW", 1 << 40)
        m.setattr(pages, "release", lambda *a: None)
        m.setenv(engine.WRITE_ENV, "pwrite")
        ms.merge(recipe, tmp_path / "whole.safetensors", threads=2)
    assert (tmp_path / "windows.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_output_slot_that_cannot_be_mapped_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    writer = PlannedWriter(tmp_path / "out", [("w", torch.float32, (4, 4))], 10**9, None)

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(io_writer, "map_tensor", no_memory)
    with pytest.raises(MergescopeError, match=r"out/model\.safetensors: tensor 'w': cannot map its output slot "
                                              r"\(Cannot allocate memory\)"):
        writer.slot("w")
    writer.abort()


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5)])
def test_model_stock_of_empty_tensors_is_empty(shape):
    base, models = torch.zeros(shape), [torch.zeros(shape) for _ in range(3)]
    for filter_wise in (False, True):
        assert methods.model_stock(models, base, filter_wise=filter_wise).shape == shape


def _maps(tmp_path, values, shared_last: bool):
    """Each tensor written to a file and mapped (the last one shared, as an output slot), tracked."""
    maps = []
    for i, v in enumerate(values):
        path = tmp_path / f"t{i}.bin"
        path.write_bytes(v.view(torch.uint8).numpy().tobytes())
        shared = shared_last and i == len(values) - 1
        fd = os.open(path, os.O_RDWR if shared else os.O_RDONLY)
        try:
            maps.append(map_tensor(fd, 0, v.dtype, (v.numel(),), shared=shared))
        finally:
            os.close(fd)
    for _, mapped in maps:
        pages.track(mapped)
    return maps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_slerp_gives_back_mapped_pages_with_the_same_bits(tmp_path, monkeypatch, dtype):
    """slerp over mapped inputs: its norm and dot chunks and its mix's windows (bf16: the numba loop; float32:
    torch's chunks) give the pages back (about a window of each stays resident), with the bits of the same
    slerp on unmapped tensors."""
    size = torch.finfo(dtype).bits // 8
    n = 256 * PAGE // size + 5
    g = torch.Generator().manual_seed(13)
    a = (1 + 0.02 * torch.randn(n, generator=g)).to(dtype)
    b = (a.float() + 0.1 * torch.randn(n, generator=g)).to(dtype)
    maps = _maps(tmp_path, [a, b, torch.zeros(n, dtype=dtype)], shared_last=True)
    mapped_a, mapped_b, out = (t for t, _ in maps)
    try:
        with monkeypatch.context() as m:
            m.setattr(methods, "SLERP_CHUNK", 16 * PAGE // size)
            m.setattr(methods, "CHUNK", 4 * PAGE // size)
            m.setattr(pages, "WINDOW", 16 * PAGE // size)
            m.setattr(kernels, "WINDOW", 16 * PAGE // size)
            whole = methods.slerp([b], a, t=0.3)
            assert methods.slerp([mapped_b], mapped_a, t=0.3, out=out) is out
        for t in (mapped_a, mapped_b, out):
            assert _rss_kb(t) <= 3 * 16 * PAGE // 1024  # of 257 pages each
        assert torch.equal(out.view(torch.uint8), whole.view(torch.uint8))
    finally:
        for _, mapped in maps:
            pages.forget(mapped)


def test_bf16_linear_gives_back_mapped_pages_with_the_same_bits(tmp_path, monkeypatch):
    """bf16 linear (the numba loop over bf16 bits; torch's chunks where numba is missing) in windows of 16
    pages: the bits of one window, and only about a window of the mapped inputs and output resident after."""
    n = 256 * PAGE // 2  # 512 KB of bf16
    g = torch.Generator().manual_seed(11)
    values = [torch.randn(n, generator=g).bfloat16() for _ in range(3)]
    maps = []
    for i, v in enumerate(values + [torch.zeros(n, dtype=torch.bfloat16)]):
        path = tmp_path / f"t{i}.bin"
        path.write_bytes(v.view(torch.int16).numpy().tobytes())
        fd = os.open(path, os.O_RDWR if i == 3 else os.O_RDONLY)
        try:
            maps.append(map_tensor(fd, 0, torch.bfloat16, (n,), shared=i == 3))
        finally:
            os.close(fd)
    for _, mapped in maps:
        pages.track(mapped)
    *inputs, out = (t for t, _ in maps)
    try:
        whole = methods.linear(values, weight=[0.5, 0.3, 0.2])
        for numba_loop in (True, False):
            with monkeypatch.context() as m:
                m.setattr(pages, "WINDOW", 16 * PAGE // 2)
                m.setattr(kernels, "WINDOW", 16 * PAGE // 2)
                if not numba_loop:
                    m.setattr(methods, "_kernel_module", lambda: None)
                out.zero_()
                assert methods.linear(inputs, weight=[0.5, 0.3, 0.2], out=out) is out
            for t in (*inputs, out):
                assert _rss_kb(t) <= 3 * 16 * PAGE // 1024  # of 256 pages each
            assert torch.equal(out.view(torch.int16), whole.view(torch.int16))
    finally:
        for _, mapped in maps:
            pages.forget(mapped)


@pytest.mark.parametrize("large", [True, False])
def test_bf16_masks_give_back_mapped_pages_of_large_inputs(tmp_path, monkeypatch, large):
    """bf16 TIES/DARE masks read |delta| window by window: afterwards about a window of each mapped input is
    resident when the inputs are over pages.RESIDENT bytes (the whole-tensor subtraction kept all of them),
    every page when not (the merge's own pass reads them next: pages.reread), with the masks and rescale
    factors of the unwindowed expressions (MergeKit's: |t - base| in bf16, its float32 ranking, sums of bf16
    values)."""
    n = 256 * PAGE // 2  # 512 KB of bf16
    g = torch.Generator().manual_seed(12)
    base_values = torch.randn(n, generator=g).bfloat16()
    values = [base_values] + [(base_values.float() + 0.01 * torch.randn(n, generator=g)).bfloat16() for _ in range(3)]
    maps = []
    for i, v in enumerate(values):
        path = tmp_path / f"t{i}.bin"
        path.write_bytes(v.view(torch.int16).numpy().tobytes())
        fd = os.open(path, os.O_RDONLY)
        try:
            maps.append(map_tensor(fd, 0, torch.bfloat16, (n,)))
        finally:
            os.close(fd)
    for _, mapped in maps:
        pages.track(mapped)
    base, *models = (t for t, _ in maps)
    try:
        for sparsify, rescale in (("magnitude", False), ("random", True)):
            with monkeypatch.context() as m:
                m.setattr(pages, "WINDOW", 16 * PAGE // 2)
                m.setattr(pages, "RESIDENT", n * 2 - 1 if large else n * 2)
                plan = methods._half_masks(models, base, [0.4] * 3, sparsify, rescale, 0, {})
            for t in (base, *models):
                rss = _rss_kb(t)
                assert rss <= 3 * 16 * PAGE // 1024 if large else rss == 256 * PAGE // 1024  # of 256 pages each
                pages.release(t, 0, n)
            generator = methods.random_stream(0)
            for (mask, factor), t in zip(plan, values[1:]):
                magnitude = (t - base_values).abs()
                if sparsify == "magnitude":  # MergeKit's: the first k of torch's sort of the float32 scores
                    want = torch.zeros(n, dtype=torch.bool)
                    want[torch.sort(magnitude.float(), descending=True).indices[: int(0.4 * n)]] = True
                else:  # DARE's draws do not depend on the magnitudes
                    want = methods.bernoulli_mask(magnitude, 0.4, generator)
                assert torch.equal(mask, want)
                if rescale:
                    assert factor == magnitude.sum() / (magnitude * want).sum()
                else:
                    assert factor is None
    finally:
        for _, mapped in maps:
            pages.forget(mapped)
