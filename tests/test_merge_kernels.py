"""The fused kernels (merge/kernels.py) against the torch chains they replace: the same bits, every input.

The reference below is a copy of methods.py's float32/float64 torch code as it was before the kernels
(commit 7e3878c), kept here so the comparison does not run the code under test.
"""

import subprocess
import sys
import threading

import numba
import numpy as np
import pytest
import torch

from mergescope.errors import MergescopeError
from mergescope.merge import kernels, methods

torch.set_num_threads(1)
INT = {torch.float32: torch.int32, torch.float64: torch.int64}


# ----------------------------------------------------------------------------- the reference (old torch chain)


def ref_rescale(magnitude, mask, eps=1e-7):
    before = magnitude.sum()
    after = (magnitude.reshape(-1) * mask).sum()
    if before < eps or after < eps:
        return 1.0
    return before / after


def ref_plan(tensors, base, density, sparsify, rescale, seed, extra):
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    generator = methods.random_stream(seed)
    plan = []
    for i, t in enumerate(tensors):
        mask, factor = None, 1.0
        if sparsify is not None:
            magnitude = (t.reshape(-1).to(work) - base.reshape(-1).to(work)).abs_().reshape(base.shape)
            params = {k: v[i] for k, v in extra.items()}
            mask = methods.SPARSIFIERS[sparsify](magnitude, density=density[i], generator=generator, **params)
            if mask is not None and rescale:
                factor = ref_rescale(magnitude, mask)
        plan.append((mask, factor))
    return plan


def ref_combine(tensors, base, plan, weights, consensus, normalize, lam):
    work = base.dtype
    total = float(torch.tensor(weights, dtype=work).sum())
    if abs(total) < 1e-8:
        total = 1.0
    b = base.reshape(-1)
    deltas = []
    for t, (mask, factor), w in zip(tensors, plan, weights):
        d = t.reshape(-1).to(work) - b
        if mask is not None:
            d.mul_(mask.reshape(-1).to(work))
        if not (isinstance(factor, float) and factor == 1.0):
            d.mul_(factor)
        deltas.append(d.mul_(w))
    mixed = deltas[0].clone()
    for p in deltas[1:]:
        mixed.add_(p)
    divisor = total
    if consensus:
        majority = torch.where(mixed >= 0, 1.0, -1.0).to(work)
        mixed, divisor = torch.zeros_like(b), torch.zeros_like(b)
        for d, w in zip(deltas, weights):
            agree = (d * majority > 0).to(work)
            mixed.addcmul_(d, agree)
            divisor.add_(agree, alpha=w)
        divisor[divisor == 0] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (b + mixed).reshape(base.shape)


def ref_gta(tensors, base, *, weight, density=None, sparsify=None, consensus=False, normalize=False, rescale=False,
            lam=1.0, seed=0, **extra):
    density = density if density is not None else [1.0] * len(tensors)
    plan = ref_plan(tensors, base, density, sparsify, rescale, seed, extra)
    return ref_combine(tensors, base, plan, [float(x) for x in weight], consensus, normalize, lam)


def ref_linear(tensors, weight, normalize):
    work = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    w = torch.tensor([float(x) for x in weight], dtype=work)
    acc = torch.zeros(tensors[0].numel(), dtype=work)
    for t, w_i in zip(tensors, w):
        acc.addcmul_(t.reshape(-1), w_i)
    if normalize:
        acc.div_(w.sum())
    return acc.to(tensors[0].dtype).reshape(tensors[0].shape)


# ----------------------------------------------------------------------------- hostile-ish inputs


def models(n, dtype, count=3, seed=0):
    """base + fine-tunes with signed zeros, unchanged entries, exact opposite deltas and exact sums of 0."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=dtype)
    base[::7] = -0.0
    base[3::11] = 0.0
    out = []
    for i in range(count):
        t = base + torch.randn(n, generator=g, dtype=dtype) * 0.01
        t[i::5] = base[i::5]  # delta exactly 0 (t - (-0.0) = +0, -0 - -0 = +0)
        t[::13] = -0.0  # delta -0.0 where base is +0
        out.append(t)
    if count >= 2:  # exact opposites: with equal weights the sum is 0 (majority +), and they disagree
        out[1][1::6] = 2 * base[1::6] - out[0][1::6]
    return base, out


def bits(t):
    return t.view(INT[t.dtype])


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a.contiguous()), bits(b.contiguous()))


SIZES = (1, 17, 1000, methods.CHUNK + 37)
WEIGHTS = ([0.5, 0.3, 0.2], [1.0, -0.7, 0.0], [0.5, -0.5, 0.5], [1e-9, -1e-9, 0.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_combine_bits_with_masks_factors_weights(dtype, consensus, normalize):
    """The kernel alone: masks of density 0 / ~0.5 / 1, factors (0-d tensors) or none, weights with zeros,
    negatives and a ~0 total, lam 1 and not."""
    g = torch.Generator().manual_seed(1)
    for n in SIZES:
        base, tensors = models(n, dtype, seed=n)
        masks = [torch.zeros(n, dtype=torch.bool), torch.rand(n, generator=g) < 0.5, None]
        factors = [torch.tensor(1.37, dtype=dtype), 1.0, torch.tensor(0.9, dtype=dtype)]
        plan = list(zip(masks, factors))
        for weights in WEIGHTS:
            total = float(torch.tensor(weights, dtype=dtype).sum())
            total = 1.0 if abs(total) < 1e-8 else total
            for lam in (1.0, 0.7, -1.5):
                want = ref_combine(tensors, base, plan, weights, consensus, normalize, lam)
                got = kernels.task_vectors(torch.empty_like(base), base, tensors, plan, weights, total, consensus,
                                           normalize, lam)
                assert same_bits(got, want), (n, weights, lam)


def test_all_disagree_and_all_masked_entries_get_divisor_one():
    """Entries where no model agrees (all deltas 0, or agreeing weights summing to 0) divide by 1, as torch."""
    base = torch.tensor([0.0, -0.0, 1.0, 2.0, -0.0])
    tensors = [torch.tensor([0.0, -0.0, 1.5, 2.0, 0.0]), torch.tensor([-0.0, 0.0, 0.5, 2.0, -0.0])]
    plan = [(None, 1.0), (None, 1.0)]
    results = []
    for weights in ([0.5, -0.5], [1.0, 1.0], [0.0, 0.0]):
        want = ref_combine(tensors, base, plan, weights, True, True, 1.0)
        got = kernels.task_vectors(torch.empty(5), base, tensors, plan, weights, 1.0, True, True, 1.0)
        assert same_bits(got, want)
        results.append(got)
    # entry 2: w = (0.5, -0.5): both weighted deltas +0.25 agree, divisor 0.5 - 0.5 = 0 -> 1: 1 + 0.5;
    # w = (1, 1): deltas +0.5 and -0.5 sum to 0 (majority +), only the first is kept: 1 + 0.5 / 1
    assert results[0][2] == 1.5 and results[1][2] == 1.5 and torch.equal(results[2], base)
    assert not torch.signbit(results[0][1])  # -0.0 base + the +0.0 kept sum is +0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"normalize": True, "lam": 0.6}),
    ("ties", {"density": [0.5, 0.0, 1.0]}),
    ("ties", {"density": [0.3, 0.6, 0.9], "rescale": True, "normalize": False, "lam": 1.3}),
    ("dare_ties", {"density": [0.5, 0.5, 1.0], "seed": 3}),
    ("dare_linear", {"density": [0.7, 0.2, 0.5], "seed": 4, "normalize": True}),
    ("breadcrumbs", {"density": [0.8, 0.8, 0.5], "gamma": [0.01, 0.05, 0.0]}),
    ("breadcrumbs_ties", {"density": [0.8, 0.6, 0.5], "gamma": [0.01, 0.05, 0.0], "rescale": True}),
    ("della", {"density": [0.5, 0.4, 0.6], "epsilon": [0.1, 0.2, 0.15], "seed": 5}),
    ("della_linear", {"density": [0.5, 0.4, 0.6], "epsilon": [0.1, 0.2, 0.15], "seed": 6, "lam": 0.5}),
])
def test_methods_bits_vs_old_torch_chain(dtype, method, params):
    """Every task-vector method end to end (masks, L1 rescale, election) equals the old torch chain."""
    spec = dict(params)
    sparsify, consensus = {
        "task_arithmetic": (None, False), "ties": ("magnitude", True), "dare_ties": ("random", True),
        "dare_linear": ("random", False), "breadcrumbs": ("magnitude_outliers", False),
        "breadcrumbs_ties": ("magnitude_outliers", True), "della": ("della_magprune", True),
        "della_linear": ("della_magprune", False)}[method]
    defaults = {"normalize": method in ("ties", "della"), "rescale": method in ("dare_ties", "dare_linear", "della",
                                                                                "della_linear")}
    ref_kw = {**defaults, **spec}
    for n, shape in ((1000, (40, 25)), (methods.CHUNK + 37, (methods.CHUNK + 37,))):
        base, tensors = models(n, dtype, seed=n + 1)
        base, tensors = base.reshape(shape), [t.reshape(shape) for t in tensors]
        for weights in WEIGHTS[:3]:
            want = ref_gta(tensors, base, weight=weights, sparsify=sparsify, consensus=consensus, **ref_kw)
            got = getattr(methods, method)(tensors, base, weight=weights, **spec)
            assert same_bits(got, want), (method, n, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rescale_factor_bits(dtype):
    """The in-place L1 factor equals the one with a temporary product, on many tensors (torch's own sums)."""
    g = torch.Generator().manual_seed(2)
    for n in (1, 15, 16, 17, 1000, 4097, 70001, 300003):
        for density in (0.0, 0.1, 0.5, 0.99):
            magnitude = (torch.randn(n, generator=g, dtype=dtype) * 0.02).abs()
            mask = torch.rand(n, generator=g) < density
            want = ref_rescale(magnitude.clone(), mask)
            got = methods._rescale_factor(magnitude.clone(), mask)
            assert type(got) is type(want)
            if isinstance(want, float):
                assert got == want
            else:
                assert same_bits(got, want), (n, density)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", [False, True])
def test_linear_bits(dtype, normalize):
    """Weighted sums with torch's rounding (its addcmul_ fuses multiply-add on this CPU: the kernel too)."""
    for n in SIZES:
        _, tensors = models(n, dtype, count=4, seed=n + 2)
        for weights in ([0.25, 0.25, 0.25, 0.25], [0.5, -0.3, 0.0, 0.9], [1 / 3, 1 / 7, 0.1, 0.0],
                        [1.0, -1.0, 0.0, 0.0]):  # a zero total: inf / NaN where torch divides by 0
            want = ref_linear(tensors, weights, normalize)
            got = methods.linear(tensors, weight=weights, normalize=normalize)
            assert same_bits(got, want), (n, weights)


def test_fma_probe_matches_torch_and_matters():
    """The probe says what torch does, and the choice changes bits (so the linear test can fail)."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    w = torch.tensor(0.3)
    acc = torch.randn(4096, generator=torch.Generator().manual_seed(4))
    fused = (acc.double() + x.double() * w.double()).float()  # exact product and sum, rounded once
    torch_acc = acc.clone().addcmul_(x, w)
    separate = acc + x * w
    assert kernels.torch_fuses_addcmul(torch.float32) == torch.equal(torch_acc, fused)
    assert not torch.equal(fused, separate)


def test_out_is_filled_and_returned():
    base, tensors = models(3000, torch.float32)
    base, tensors = base.reshape(60, 50), [t.reshape(60, 50) for t in tensors]
    half = {"density": [0.5, 0.4, 0.6]}
    cases = [(methods.task_arithmetic, {}), (methods.ties, half), (methods.dare_ties, {**half, "seed": 1}),
             (methods.dare_linear, half), (methods.breadcrumbs, {"density": [0.8] * 3}),
             (methods.breadcrumbs_ties, {"density": [0.8] * 3}), (methods.della, half), (methods.della_linear, half),
             (methods.generalized_task_arithmetic, {**half, "sparsify": "magnitude", "consensus": True})]
    for fn, kw in cases:
        want = fn(tensors, base, weight=[0.5, 0.3, 0.2], **kw)
        out = torch.full_like(base, float("nan"))
        got = fn(tensors, base, weight=[0.5, 0.3, 0.2], out=out, **kw)
        assert got is out and same_bits(out, want)
    out = torch.empty_like(base)
    assert methods.linear(tensors, weight=[1, 2, 3], out=out) is out
    assert same_bits(out, ref_linear(tensors, [1, 2, 3], True))


def test_out_on_the_torch_paths():
    """Half precision, mixed dtypes, strided inputs and no models keep the torch code; ``out`` still works."""
    base, tensors = models(500, torch.float32)
    half = [t.to(torch.bfloat16) for t in tensors]
    out = torch.empty(500, dtype=torch.bfloat16)
    want = methods.ties(half, base.to(torch.bfloat16), weight=[1, 1, 1], density=[0.5] * 3)
    assert methods.ties(half, base.to(torch.bfloat16), weight=[1, 1, 1], density=[0.5] * 3, out=out) is out
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    mixed = [tensors[0].double(), *tensors[1:]]
    out = torch.empty(500)
    methods.task_arithmetic(mixed, base, weight=[1, 1, 1], out=out)
    assert same_bits(out, ref_gta(mixed, base, weight=[1, 1, 1]))
    kw = {"weight": [1, 1, 1], "density": [0.5] * 3, "rescale": True}
    want = ref_gta(mixed, base, sparsify="magnitude", consensus=True, normalize=True, **kw)
    assert same_bits(methods.ties(mixed, base, **kw), want)
    strided = [torch.stack([t, t], 1)[:, 0] for t in tensors]
    out = torch.empty(500)
    methods.linear(strided, weight=[1, 2, 3], out=out)
    assert same_bits(out, ref_linear(tensors, [1, 2, 3], True))
    out = torch.empty(500)
    assert methods.task_arithmetic([], base, weight=[], out=out) is out and same_bits(out, base)


@pytest.mark.parametrize("bad", [torch.empty(499), torch.empty(500, dtype=torch.float64), torch.empty(1000)[::2],
                                 "not a tensor"])
def test_bad_out_is_refused_in_one_line(bad):
    base, tensors = models(500, torch.float32)
    for call in (lambda: methods.task_arithmetic(tensors, base, weight=[1, 1, 1], out=bad),
                 lambda: methods.linear(tensors, weight=[1, 1, 1], out=bad)):
        with pytest.raises(MergescopeError, match="out: needs a contiguous CPU torch.float32 tensor of shape"):
            call()


def test_two_threads_at_once_give_the_serial_bits():
    """The engine runs methods from two threads; the kernels release the GIL and share nothing."""
    jobs = []
    for seed in range(4):
        base, tensors = models(methods.CHUNK + 5, torch.float32, seed=seed)
        jobs.append((base, tensors, {"density": [0.5, 0.6, 0.7], "seed": seed}))
    serial = [methods.dare_ties(t, b, weight=[0.5, 0.3, 0.2], **kw) for b, t, kw in jobs]
    serial_linear = [methods.linear(t, weight=[0.5, 0.3, 0.2]) for _, t, _ in jobs]
    results = {}

    def work(i):
        for _ in range(3):
            b, t, kw = jobs[i]
            results[i] = (methods.dare_ties(t, b, weight=[0.5, 0.3, 0.2], **kw),
                          methods.linear(t, weight=[0.5, 0.3, 0.2]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i in range(len(jobs)):
        assert same_bits(results[i][0], serial[i]) and same_bits(results[i][1], serial_linear[i])


def test_inputs_are_not_modified():
    base, tensors = models(2000, torch.float64)
    before = [base.clone(), *(t.clone() for t in tensors)]
    methods.della(tensors, base, weight=[0.5, 0.3, 0.2], density=[0.5] * 3, seed=2)
    methods.linear(tensors, weight=[1, 1, 1])
    assert all(same_bits(a, b) for a, b in zip(before, [base, *tensors]))


def test_import_mergescope_does_not_load_numba():
    code = "import sys, mergescope, mergescope.merge.methods; print('numba' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_kernel_refuses_nothing_it_cannot_match():
    """fits(): only same-dtype contiguous float32/float64 tensors and flat bool masks go to the kernels."""
    a = torch.zeros(10)
    assert kernels.fits(torch.float32, [a, a], [torch.zeros(10, dtype=torch.bool)])
    assert not kernels.fits(torch.float32, [a, a.double()])
    assert not kernels.fits(torch.bfloat16, [a.bfloat16()])
    assert not kernels.fits(torch.float32, [a, torch.zeros(20)[::2]])
    assert not kernels.fits(torch.float32, [a], [torch.zeros(10, dtype=torch.uint8)])
    assert not kernels.fits(torch.float32, [a], [torch.zeros(9, dtype=torch.bool)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_and_inf_entries_give_torchs_bits(dtype):
    """A NaN or inf in a fine-tune (or base) propagates exactly as through the torch ops, NaN sign included."""
    base, tensors = models(3000, dtype, seed=9)
    base[5], tensors[0][7], tensors[1][7], tensors[2][9] = float("inf"), float("nan"), float("inf"), float("-inf")
    tensors[0][11], tensors[1][11] = float("inf"), float("inf")
    g = torch.Generator().manual_seed(10)
    specials = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")], dtype=dtype)
    for t in (base, *tensors):  # ~2% specials each, so entries meet several at once
        where = torch.rand(3000, generator=g) < 0.02
        t[where] = specials[torch.randint(0, 4, (int(where.sum()),), generator=g)]
    for method, kw in (("task_arithmetic", {"lam": 0.5}), ("ties", {"density": [1.0, 1.0, 1.0]}),
                       ("ties", {"density": [1.0, 1.0, 1.0], "normalize": False, "lam": 0.3}),
                       ("dare_ties", {"density": [0.5] * 3, "rescale": False}), ("della_linear", {"density": [0.5] * 3,
                                                                                                   "rescale": False})):
        sparsify, consensus = {"task_arithmetic": (None, False), "ties": ("magnitude", True),
                               "dare_ties": ("random", True), "della_linear": ("della_magprune", False)}[method]
        ref_kw = {"normalize": method == "ties", **kw}
        want = ref_gta(tensors, base, weight=[0.5, 0.3, 0.2], sparsify=sparsify, consensus=consensus, **ref_kw)
        got = getattr(methods, method)(tensors, base, weight=[0.5, 0.3, 0.2], **kw)
        assert want.isnan().any() and same_bits(got, want), method
    want = ref_linear(tensors, [0.5, 0.3, 0.2], True)
    assert want.isnan().any() and same_bits(methods.linear(tensors, weight=[0.5, 0.3, 0.2]), want)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.bool_])
def test_prefetch_compiles_to_a_prefetch_and_changes_no_value(dtype):
    """The bf16 task-vector loop's hint is a real prefetch instruction (x86 prefetcht*, arm prfm), and ranges
    reaching or lying past the array's end leave its values as they were (whether the loop stops at the end is
    not observable here: a prefetch never faults)."""
    values = np.arange(1000).astype(dtype)
    before = values.copy()
    kernels._prefetch_range(values, 900, 5000)
    kernels._prefetch_range(values, 2000, 3000)
    assert np.array_equal(values, before)
    fresh = numba.njit(kernels._prefetch_range.py_func)  # compiled here: one loaded from numba's cache has no asm
    fresh(values, 0, 1000)
    asm = fresh.inspect_asm(fresh.signatures[0])
    assert "prefetch" in asm.replace("_prefetch_range", "") or "prfm" in asm


def test_kernels_release_the_gil():
    """While a kernel runs in one thread, Python code runs in another. A long switch interval means the worker
    never hands the GIL over on its own: the main thread advances during the kernel only if it is released.
    (The compiled loop is called directly: torch's own calls in the wrapper release the GIL too.)"""
    n, dtype = 1 << 23, np.float32  # ~10 ms a call: long enough for the main thread to wake
    base, tensors = np.zeros(n, dtype), tuple(np.ones(n, dtype) for _ in range(3))
    args = (np.empty(n, dtype), base, tensors, None, np.ones(3, dtype), np.ones(3, dtype),
            np.array([3, 1, 0, 1, -1], dtype), True, True, False, True)
    kernels._task_vectors(*args)  # compiled / loaded
    steps, during = [0], []
    started = threading.Event()

    def run():
        started.set()
        before = steps[0]
        kernels._task_vectors(*args)
        during.append(steps[0] - before)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.2)
    try:
        worker = threading.Thread(target=run)
        worker.start()
        started.wait()
        while worker.is_alive():
            steps[0] += 1
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    assert during[0] > 100 and args[0][0] == 1  # (3 * 1 / 3)


def test_kernels_compile_without_a_cache_folder(monkeypatch):
    """A read-only install without a writable home: numba finds no cache folder; compile per process."""
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])

    def over_zero(x):
        return x / 0.0

    with pytest.raises(RuntimeError, match="no locator"):
        caching.FunctionCache(over_zero)
    assert kernels._jit(over_zero)(1.0) == float("inf")


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 12345])
def test_pcg64_float32_is_numpys_stream_and_state(seed):
    """Every fill size (odd ones leave numpy's spare 32 bits), after draws that did or did not leave a spare:
    the values, the masks (float32 compare) and the generator's whole state as numpy's own ``random``."""
    for n in (0, 1, 2, 3, 7, 8, 9, 16, 17, 1001, 100_003):
        for before in (0, 1, 2, 5):
            ref, ours, masked = (np.random.Generator(np.random.PCG64(seed)) for _ in range(3))
            for g in (ref, ours, masked):
                g.random(before, dtype=np.float32)
            want = ref.random(n, dtype=np.float32)
            got, mask = np.empty(n, np.float32), np.empty(n, np.bool_)
            assert kernels.pcg64_float32(ours, got) and kernels.pcg64_float32(masked, mask=mask, threshold=0.7)
            assert np.array_equal(got, want), (n, before)
            assert np.array_equal(mask, want < np.float32(0.7)), (n, before)
            assert ours.bit_generator.state == ref.bit_generator.state == masked.bit_generator.state
            assert np.array_equal(ours.random(5, dtype=np.float32), ref.random(5, dtype=np.float32))


def test_pcg64_float32_leaves_other_generators_to_numpy():
    g, ref = np.random.Generator(np.random.Philox(0)), np.random.Generator(np.random.Philox(0))
    assert not kernels.pcg64_float32(g, np.empty(10, np.float32))
    assert np.array_equal(g.random(9, dtype=np.float32), ref.random(9, dtype=np.float32))  # nothing drawn


# ----------------------------------------------------------------------------- bf16 task vectors


def _bf16_models(n, size, seed):
    """bf16 base + n fine-tunes with the values bf16 merges hit: signed zeros, equal deltas, unchanged entries."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(size, generator=g) * 0.02).bfloat16()
    base[:6] = -0.0
    base[6:9] = 0.0
    models = []
    for i in range(n):
        t = (base.float() + 0.002 * torch.randn(size, generator=g)).bfloat16()
        t[: 3 + i] = -0.0  # delta +-0
        t[20:40] = base[20:40]  # unchanged: delta exactly 0
        models.append(t)
    return base, models


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "normalize": False}),
    ("dare_ties", {"density": 0.6}),
    ("dare_linear", {"density": 0.6}),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_bf16_fused_loop_gives_the_torch_chunks_bits(monkeypatch, method, params, n):
    """The numba loop (bf16 rounding emulated after each float32 step) against the torch chunk loop that
    reproduces MergeKit's bf16 arithmetic: the same bits, signed zeros included."""
    base, models = _bf16_models(n, 300_017, seed=n)
    weight = [0.5, -0.3, 0.2, 0.7, 0.1][:n]
    kw = {k: ([v] * n if k in ("density", "gamma", "epsilon") else v) for k, v in params.items()}
    fused = methods.get(method)(models, base, weight=weight, seed=3, **kw)
    with monkeypatch.context() as m:
        m.setattr(methods, "_kernel_module", lambda: None)
        reference = methods.get(method)(models, base, weight=weight, seed=3, **kw)
    assert fused.dtype == torch.bfloat16
    assert torch.equal(fused.view(torch.int16), reference.view(torch.int16))


def test_bf16_round_is_torchs_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100_000, generator=g) * 10.0 ** torch.randint(-40, 39, (100_000,), generator=g),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, -1e-45])])
    rounded = np.array([kernels._bf16_round(np.float32(v)) for v in x.numpy()], np.float32)
    assert np.array_equal(rounded.view(np.uint32), x.bfloat16().float().numpy().view(np.uint32))
    # NaN stays NaN (torch's own NaN bits differ between its vector and scalar conversions: 0xFFFF, 0x7FC0)
    assert np.isnan(kernels._bf16_round(np.float32("nan")))


def test_bf16_round_inner_is_bf16_round_for_values_computed_from_bf16():
    """The select-free rounding of a kernel's intermediates: _bf16_round's bits on every non-NaN float32, and a
    NaN whose low 16 bits are zero (every bf16 NaN, the default NaN of inf - inf) stays that NaN; one with low
    bits set may not (why only values computed from bf16 ones go through it)."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(100_000, generator=g) * 10.0 ** torch.randint(-40, 39, (100_000,), generator=g),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, -1e-45])])
    inner = np.array([kernels._bf16_round_inner(np.float32(v)) for v in x.numpy()], np.float32)
    outer = np.array([kernels._bf16_round(np.float32(v)) for v in x.numpy()], np.float32)
    assert np.array_equal(inner.view(np.uint32), outer.view(np.uint32))
    high = np.concatenate([np.arange(0x7F81, 0x8000), np.arange(0xFF81, 0x10000)]).astype(np.uint32) << 16
    nans = np.concatenate([high, [0xFFC00000, 0x7FC00000]]).astype(np.uint32).view(np.float32)
    kept = np.array([kernels._bf16_round_inner(v) for v in nans], np.float32)
    quieted = nans.view(np.uint32) | np.uint32(0x00400000)  # a signalling NaN arrives quieted, as any op leaves it
    assert np.array_equal(kept.view(np.uint32), quieted)
    assert not np.isnan(kernels._bf16_round_inner(np.array([0x7FFFFFFF], np.uint32).view(np.float32)[0]))


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.5}),
    ("dare_ties", {"density": 0.6}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("model_stock", {}),
])
def test_bf16_kernels_with_nan_and_inf_entries_give_the_torch_paths_values(monkeypatch, method, params):
    """bf16 inputs with NaN and +-inf entries (~2 % each model): the numba kernels (intermediates rounded without
    the NaN select) against the torch ops: NaN where torch has NaN, the same bits everywhere else."""
    from mergescope.merge import reductions

    n, size = 3, 300_017
    base, models = _bf16_models(n, size, seed=4)
    g = torch.Generator().manual_seed(12)
    specials = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")]).bfloat16()
    for t in (base, *models):
        where = torch.rand(size, generator=g) < 0.02
        t[where] = specials[torch.randint(0, 4, (int(where.sum()),), generator=g)]
    kw = {k: [v] * n for k, v in params.items() if k in ("density", "epsilon")}
    kw.update({k: v for k, v in params.items() if k not in ("density", "epsilon")})
    if method != "model_stock":
        kw.update(weight=[0.5, -0.3, 0.2], seed=3)
    fused = methods.get(method)(models, base, **kw)
    with monkeypatch.context() as m:
        m.setattr(methods, "_kernel_module", lambda: None)
        m.setattr(reductions, "fits", lambda *a, **k: False)
        reference = methods.get(method)(models, base, **kw)
    nan = torch.isnan(reference)
    assert nan.any() and torch.equal(torch.isnan(fused), nan)
    assert torch.equal(fused.view(torch.int16)[~nan], reference.view(torch.int16)[~nan])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("size", [1, 2047, 300_017])
def test_bf16_linear_loop_gives_the_torch_chunks_bits(monkeypatch, normalize, size):
    """linear on bf16 models: the numba loop (bf16 inputs into a float32 accumulator, one bf16 rounding) against
    the torch chunk loop, signed zeros, infinities and a zero total (inf / NaN where torch divides by 0)."""
    calls = []
    loop = kernels.bf16_weighted_sum
    monkeypatch.setattr(kernels, "bf16_weighted_sum", lambda *a: calls.append(1) or loop(*a))
    base, models = _bf16_models(4, size, seed=size)
    models[1][-3:] = torch.tensor([float("inf"), -float("inf"), 3.0e38]).bfloat16()[-min(3, size):]
    for weight in ([0.5, 0.3, 0.2, 0.1], [1 / 3, -1 / 7, 0.1, 0.9], [1.0, -1.0, 0.0, 0.0], [0.25, 0.25, 0.25]):
        fused = methods.linear([base, *models][:4], weight=weight, normalize=normalize)
        with monkeypatch.context() as m:
            m.setattr(methods, "_kernel_module", lambda: None)
            reference = methods.linear([base, *models][:4], weight=weight, normalize=normalize)
        assert fused.dtype == torch.bfloat16
        nan = torch.isnan(reference)
        assert torch.equal(torch.isnan(fused), nan), weight
        assert torch.equal(fused.view(torch.int16)[~nan], reference.view(torch.int16)[~nan]), (size, weight)
    assert len(calls) == 4  # the loop ran (not the torch chain twice)


def test_bf16_linear_fma_probe_matches_torch():
    """The probe for bf16 inputs into a float32 accumulator says what torch's mixed-dtype addcmul_ does."""
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(5))).bfloat16()
    w = torch.tensor(0.3)
    acc = torch.randn(4096, generator=torch.Generator().manual_seed(6))
    fused = (acc.double() + x.double() * w.double()).float()
    separate = acc + x.float() * w
    got = acc.clone().addcmul_(x, w)
    assert kernels.torch_fuses_addcmul(torch.float32, torch.bfloat16) == torch.equal(got, fused)
    assert torch.equal(got, fused) != torch.equal(got, separate)


def test_bf16_mask_is_torchs_mul_by_the_mask():
    """Dropped entries become zeros of their sign, dropped Inf/NaN become NaN; kept ones keep their bits."""
    g = torch.Generator().manual_seed(21)
    values = (torch.randn(70_001, generator=g) * 10.0 ** torch.randint(-30, 30, (70_001,), generator=g)).bfloat16()
    values[:8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -1.0, 3.0e38]).bfloat16()
    for mask in (torch.rand(70_001, generator=g) < 0.5, torch.zeros(70_001, dtype=torch.bool),
                 torch.ones(70_001, dtype=torch.bool)):
        mask[:16] = torch.tensor([False, True] * 8)[torch.randperm(16, generator=g)]
        want = values.clone().mul_(mask)
        got = kernels.mask_(values.clone(), mask)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nan", [False, True])
def test_abs_diff_counted_is_torchs_abs_diff_and_selects_histogram(dtype, nan):
    """|t - base| with the histogram merge/select.py would count from it (numpy's bincount here): the same
    bits as torch's ``(t - base).abs_()`` on both sides of a block edge, inf, -0.0 and equal entries; a bf16
    NaN gives torch's own bits and no histogram (torch's NaN payload depends on its loop)."""
    rng = np.random.default_rng(23 + nan)
    for n in (1, 4095, 4097, 100_003):
        t = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
        b = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
        if n > 10:
            t[5], b[7], t[7], t[9] = float("inf"), -0.0, 0.0, b[9]
            if nan:
                t[3] = float("nan")
        got, counted = kernels.abs_diff_counted(torch.empty(n, dtype=dtype), t, b)
        want = (t - b).abs_()
        view = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(got.view(view), want.view(view)), n
        if nan and n > 10 and dtype == torch.bfloat16:
            assert counted is None
            continue
        bits = want.view(view).numpy().astype(np.int64) & (0xFFFF if dtype == torch.bfloat16 else 0xFFFFFFFF)
        hist, top = counted
        assert np.array_equal(hist, np.bincount(bits >> (0 if dtype == torch.bfloat16 else 16), minlength=1 << 16))
        assert int(top) == int(bits.max()), n
