"""merge/scratch.py: reused per-thread buffers, and the methods that draw on them keep their bits."""

import threading

import numpy as np
import pytest
import torch

from mergescope.merge import methods as M
from mergescope.merge import scratch, select

torch.set_num_threads(1)


def test_a_purpose_reuses_its_memory_and_grows_to_the_largest_request():
    scratch.release()
    a = scratch.array("t.a", 1000, np.float32)
    assert scratch.array("t.a", 500, np.float32).ctypes.data == a.ctypes.data  # smaller: same memory
    assert scratch.array("t.b", 1000, np.float32).ctypes.data != a.ctypes.data  # another purpose: its own
    assert scratch.array("t.a", 1000, np.int32).ctypes.data != a.ctypes.data  # another dtype: its own
    big = scratch.array("t.a", 5000, np.float32)
    assert big.size == 5000 and scratch.array("t.a", 10, np.float32).ctypes.data == big.ctypes.data
    t = scratch.tensor("t.a", 7, torch.float32)
    assert t.dtype == torch.float32 and t.shape == (7,) and t.data_ptr() == big.ctypes.data
    assert scratch.held_bytes() == 5000 * 4 + 1000 * 4 + 1000 * 4
    scratch.release()
    assert scratch.held_bytes() == 0


def test_threads_have_their_own_buffers_and_theirs_go_with_them():
    scratch.release()
    mine = scratch.array("t.x", 100, np.float32).ctypes.data
    seen = {}

    def worker():
        seen["ptr"] = scratch.array("t.x", 100, np.float32).ctypes.data
        seen["held"] = scratch.held_bytes()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["ptr"] != mine and seen["held"] == 400
    assert scratch.held_bytes() == 400  # the worker's buffer was never this thread's
    scratch.release()


def _old_bernoulli(n, density, generator):  # the pre-scratch implementation: one fresh draw of n
    return torch.from_numpy(generator.random(n, dtype=np.float32)) < density


@pytest.mark.parametrize("density", [0.1, 1 / 3, 0.5, 0.9, 0.3])
def test_dare_masks_are_one_fresh_draw_compared_by_torch(density):
    """Chunked draws into a reused buffer continue numpy's PCG64 float32 stream exactly (odd sizes split its
    spare 32 bits across calls), call after call on the same generator."""
    sizes = [1, 3, M.CHUNK - 1, M.CHUNK + 3, 3 * M.CHUNK + 17, 5]
    ours, ref = M.random_stream(11), M.random_stream(11)
    out = torch.empty(max(sizes), dtype=torch.bool)
    for i, n in enumerate(sizes):
        mag = torch.empty(n)
        got = M.bernoulli_mask(mag, density, ours, out=out[:n]) if i % 2 else M.bernoulli_mask(mag, density, ours)
        want = _old_bernoulli(n, density, ref)
        assert torch.equal(got, want), (density, n)
        assert 0 < want.float().mean() < 1 or n < 10


@pytest.mark.parametrize("density", [0.3, 0.7, 1e-8, 0.999999999])
def test_dare_compare_rounds_density_as_torch_does(density):
    """Uniforms at and around float32(density): the kept set is torch's ``u < density`` (float32(0.7) < 0.7,
    so a float64 compare would keep u = float32(0.7); torch's float32 compare does not)."""
    d32 = np.float32(density)
    u = np.array([np.nextafter(d32, 0, dtype=np.float32), d32, np.nextafter(d32, 1, dtype=np.float32), 0.0],
                 np.float32)

    class Fixed:  # a generator whose stream is u
        def random(self, n=None, dtype=np.float64, out=None):
            out[:] = u[:out.size]
            return out

    got = M.bernoulli_mask(torch.empty(4), density, Fixed())
    want = torch.from_numpy(u) < density
    assert got.tolist() == want.tolist()
    if density == 0.7:
        assert want.tolist() != (u.astype(np.float64) < density).tolist()  # the case tells the two apart


def _old_della(magnitude, density, generator, epsilon):
    """DELLA as MergeKit ranks it (torch.argsort along dim 1) with the draws taken in the rows' order."""
    rows = magnitude if magnitude.dim() >= 2 else magnitude.reshape(1, -1)
    rows = rows.reshape(rows.shape[0], rows.shape[1], -1).movedim(2, 1)
    m = rows.shape[-1]
    order = torch.argsort(rows, dim=-1)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(m).expand_as(order).contiguous())
    probs = (density - epsilon) + ranks.to(magnitude.dtype) / (m - 1) * (2 * epsilon)
    u = torch.from_numpy(generator.random(rows.numel(), dtype=np.float32)).view(rows.shape)
    return (u < probs).movedim(1, 2).reshape(-1)


@pytest.mark.parametrize("shape", [(300, 700), (1000,), (6, 40, 3, 3), (2, 50000)])
def test_della_masks_match_the_argsort_reference(shape):
    g = torch.Generator().manual_seed(3)
    magnitude = torch.randn(shape, generator=g).abs()
    ours, ref = M.random_stream(5), M.random_stream(5)
    out = torch.empty(magnitude.numel(), dtype=torch.bool)
    for _ in range(2):  # the second call reuses every buffer
        got = M.della_mask(magnitude, 0.4, ours, epsilon=0.2, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got, _old_della(magnitude, 0.4, ref, 0.2))


def test_masks_without_out_are_fresh_and_results_never_alias_scratch():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 300, generator=g)
    tensors = [base + 0.1 * torch.randn(400, 300, generator=g) for _ in range(3)]
    a = M.bernoulli_mask(base, 0.5, M.random_stream(1))
    b = M.bernoulli_mask(base, 0.5, M.random_stream(2))
    assert a.data_ptr() != b.data_ptr() and not torch.equal(a, b)
    for name in ("dare_ties", "ties", "breadcrumbs", "della"):
        method = M.get(name)
        params = {"weight": [0.5, 0.3, 0.2], "density": [0.5] * 3, "seed": 4}
        first = method(tensors, base, **params)
        kept = first.clone()
        second = method([t.flip(0) for t in tensors], base.flip(0), **params)  # same buffers, other values
        assert torch.equal(first, kept), name  # the first result was not a reused buffer
        held = {a.ctypes.data for a in scratch._buffers().values()}
        assert first.data_ptr() not in held and second.data_ptr() not in held


def test_arena_holds_what_one_job_uses():
    """The documented bound: |delta| (4n), one mask per model (n each); DARE draws straight into its masks
    (kernels.pcg64_float32), or CHUNK float32 at a time without it."""
    scratch.release()
    n, models = 3 * M.CHUNK + 5, 3
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g)
    tensors = [base + torch.randn(n, generator=g) for _ in range(models)]
    for _ in range(2):
        M.get("dare_ties")(tensors, base, weight=[1.0] * models, density=[0.5] * models, seed=0)
    assert scratch.held_bytes() == 4 * n + models * n
    scratch.release()


def test_dare_without_the_fused_draw_is_the_same(monkeypatch):
    """The numpy fallback (no numba): CHUNK draws into a reused buffer, numpy's compare: the same masks."""
    n = 2 * M.CHUNK + 11
    fused = [M.bernoulli_mask(torch.empty(n), 0.7, g) for g in [M.random_stream(3)] for _ in range(3)]
    monkeypatch.setattr(M, "_pcg", lambda generator, **fill: False)
    plain = [M.bernoulli_mask(torch.empty(n), 0.7, g) for g in [M.random_stream(3)] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))
    assert scratch._buffers()[("methods.uniforms", np.dtype(np.float32))].size == M.CHUNK  # the fallback's buffer


def test_threads_merging_at_once_give_the_serial_bits():
    g = torch.Generator().manual_seed(1)
    jobs = []
    for k in range(6):
        base = torch.randn(257, 130 + k, generator=g)
        jobs.append((base, [base + torch.randn(base.shape, generator=g) for _ in range(3)]))

    def run(job, name):
        return M.get(name)(job[1], job[0], weight=[0.5, 0.3, 0.2], density=[0.4] * 3, seed=9)

    for name in ("dare_ties", "ties", "della"):
        serial = [run(job, name) for job in jobs]
        results = {}

        def worker(idx, name=name, results=results):
            for i in idx:
                results[i] = run(jobs[i], name)

        threads = [threading.Thread(target=worker, args=(range(j, 6, 2),)) for j in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(torch.equal(results[i], serial[i]) for i in range(6)), name


def test_select_writes_into_out():
    g = torch.Generator().manual_seed(2)
    score = torch.randint(0, 50, (20000,), generator=g).float()  # ties at every cut
    out = torch.empty(20000, dtype=torch.bool)
    for lo, hi, desc in ((0, 7000, True), (300, 15000, False), (0, 20000, True), (5, 5, False)):
        want = select.sorted_range_mask(score, lo, hi, desc)
        got = select.sorted_range_mask(score, lo, hi, desc, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, want)
        order = torch.sort(score, descending=desc).indices[lo:hi]
        ref = torch.zeros(20000, dtype=torch.bool)
        ref[order] = True
        assert torch.equal(got, ref)


def test_a_wrong_mask_buffer_is_refused_in_one_line():
    with pytest.raises(M.MergescopeError, match="mask out"):
        M.bernoulli_mask(torch.empty(10), 0.5, M.random_stream(0), out=torch.empty(9, dtype=torch.bool))


def test_a_finished_threads_buffers_are_freed():
    """The engine's workers are a per-merge pool: their buffers must go when the threads end."""
    import gc
    import weakref

    refs = []

    def worker():
        scratch.array("t.gone", 1000, np.float32)
        refs.append(weakref.ref(scratch._buffers()[("t.gone", np.dtype(np.float32))].base))  # the owner

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    gc.collect()
    assert refs and refs[0]() is None


def test_half_precision_buffers_are_reused_views():
    """bf16/fp16 buffers (numpy has no bf16) are int16 arrays seen as the dtype: reused like the others."""
    scratch.release()
    first = scratch.tensor("t.half", 1000, torch.bfloat16)
    again = scratch.tensor("t.half", 500, torch.float16)
    assert first.dtype == torch.bfloat16 and again.dtype == torch.float16 and again.numel() == 500
    assert again.data_ptr() == first.data_ptr() and scratch.held_bytes() == 2000
    assert scratch.holds(torch.bfloat16) and scratch.holds(torch.float32) and not scratch.holds(torch.complex64)
    scratch.release()


def test_trimmed_buffers_park_for_the_next_large_request_on_any_thread():
    """trim(park=True) hands a large buffer to the next request that fits, on any thread (the engine's LM head
    job after the embedding's): the same memory, not a fresh mapping; one parked per purpose, the largest."""
    scratch.clear_parked()
    seen = {}

    def first():
        seen["big"] = scratch.array("t.park", 5000, np.float32).ctypes.data
        scratch.array("t.kept", 10, np.float32)
        scratch.trim(1000, park=True)
        seen["held"] = scratch.held_bytes()

    def second():
        seen["tiny"] = scratch.array("t.park", 100, np.float32).ctypes.data  # far smaller: its own buffer
        seen["small"] = scratch.array("t.park", 2600, np.float32).ctypes.data  # over half the parked one: taken
        seen["again"] = scratch.array("t.park", 4000, np.float32).ctypes.data  # this thread's own now

    for fn in (first, second):
        thread = threading.Thread(target=fn)
        thread.start()
        thread.join()
    assert seen["held"] == 40 and seen["small"] == seen["big"] == seen["again"] != seen["tiny"]
    assert scratch.parked_bytes() == 0
    scratch.release()
    small = scratch.array("t.park", 3000, np.float32)
    scratch.trim(100, park=True)
    large = scratch.array("t.park", 6000, np.float32)  # more than the parked one holds: a fresh buffer
    assert large.ctypes.data != small.ctypes.data and scratch.parked_bytes() == 3000 * 4
    scratch.trim(100, park=True)  # the larger one replaces it
    assert scratch.parked_bytes() == 6000 * 4 and scratch.held_bytes() == 0
    scratch.trim(100, park=False)
    scratch.clear_parked()
    assert scratch.parked_bytes() == 0


def test_the_engine_parks_scratch_only_until_its_last_larger_job(tmp_path, monkeypatch):
    """Jobs over the kept size park their buffers for the next such job; the last one's go, and nothing is
    parked once the merge returns (two workers, and one)."""
    import mergescope as ms
    from mergescope.io import save
    from mergescope.merge import engine

    g = torch.Generator().manual_seed(3)
    for name in ("base", "a", "b"):
        state = {"embed.weight": torch.randn(300, 64, generator=g), "head.weight": torch.randn(300, 64, generator=g)}
        state.update({f"layers.{i}.w": torch.randn(64, 64, generator=g) for i in range(20)})  # the typical job
        save(state, tmp_path / name)
    recipe = (f"merge_method: ties\nbase_model: {tmp_path}/base\nmodels:\n"
              f"  - {{model: {tmp_path}/a, parameters: {{weight: 1.0, density: 0.5}}}}\n"
              f"  - {{model: {tmp_path}/b, parameters: {{weight: 0.5, density: 0.3}}}}\n")
    calls = []
    trim = scratch.trim

    def recording_trim(max_entries, park=False):
        calls.append((max((h.size for h in scratch._buffers().values()), default=0) > max_entries, park))
        trim(max_entries, park)

    monkeypatch.setattr(engine.scratch, "trim", recording_trim)
    for threads in (1, 2):
        calls.clear()
        ms.merge(recipe, tmp_path / f"out{threads}", threads=threads)
        larger = [park for over, park in calls if over]
        assert larger == [True, False] and scratch.parked_bytes() == 0  # embed parks, head (the last) does not
    assert torch.equal(load_merged(tmp_path / "out1"), load_merged(tmp_path / "out2"))


def test_larger_jobs_give_their_inputs_pages_back_between_passes(tmp_path, monkeypatch):
    """The engine runs jobs over the typical job's size under pages.resident_up_to(0) (their inputs' pages go
    back behind each pass, whatever their size) and the others under RESIDENT; the merged bits are the same."""
    import contextlib

    import mergescope as ms
    from mergescope.io import save
    from mergescope.merge import engine, pages

    g = torch.Generator().manual_seed(5)
    for name in ("base", "a", "b"):
        state = {"embed.weight": torch.randn(300, 64, generator=g)}
        state.update({f"layers.{i}.w": torch.randn(64, 64, generator=g) for i in range(20)})  # the typical job
        save(state, tmp_path / name)
    recipe = (f"merge_method: ties\nbase_model: {tmp_path}/base\nmodels:\n"
              f"  - {{model: {tmp_path}/a, parameters: {{weight: 1.0, density: 0.5}}}}\n"
              f"  - {{model: {tmp_path}/b, parameters: {{weight: 0.5, density: 0.3}}}}\n")
    bounds, run_job = {}, engine.run_job

    def recording(job, *args, **kwargs):
        bounds[job.name] = getattr(pages._local, "resident", pages.RESIDENT)
        return run_job(job, *args, **kwargs)

    monkeypatch.setattr(engine, "run_job", recording)
    ms.merge(recipe, tmp_path / "out", threads=2)
    assert bounds.pop("embed.weight") == 0 and set(bounds.values()) == {pages.RESIDENT} and len(bounds) == 20
    monkeypatch.setattr(engine, "run_job", run_job)
    monkeypatch.setattr(pages, "resident_up_to", lambda nbytes: contextlib.nullcontext())  # RESIDENT for every job
    ms.merge(recipe, tmp_path / "kept", threads=2)
    assert torch.equal(load_merged(tmp_path / "out"), load_merged(tmp_path / "kept"))


def load_merged(folder):
    from mergescope.io import load

    return torch.cat([t.reshape(-1) for _, t in sorted(load(folder).items())])
