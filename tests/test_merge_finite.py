"""merge/finite.py: kernels that write a whole result vouch for it when every stored entry is finite, and the
engine then skips its own check; anything else, or a vouch gone stale, is checked as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.io import save
from mergescope.merge import engine, finite, kernels

DTYPES = [torch.float32, torch.bfloat16]
BIG = {torch.float32: 3e38, torch.bfloat16: 3e38}  # near the top of both ranges: two of them overflow


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_vouch_names_the_result_and_goes_stale(dtype):
    out = torch.empty(5000, dtype=dtype)
    a, b = torch.randn(5000).to(dtype), torch.randn(5000).to(dtype)
    assert kernels.lerp(out, a, b, 0.25, 0.75) is out
    assert finite.vouched(out) and finite.vouched(out.view(50, 100))  # the same memory, any shape
    assert not finite.vouched(out[1:]) and not finite.vouched(out.clone())
    out.add_(1)  # a torch write: the version counter moves
    assert not finite.vouched(out)
    kernels.lerp(out, a, b, 0.25, 0.75)
    kernels.lerp(torch.empty_like(out), a, b, 0.5, 0.5)  # any later kernel call on the thread drops it
    assert not finite.vouched(out)
    kernels.lerp(out, a, b, 0.25, 0.75)
    finite.forget()
    assert not finite.vouched(out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", ["nan", "inf", "overflow"])
def test_kernels_vouch_only_for_finite_results(dtype, bad):
    """The slerp mix and model_stock's mix count what they store: a NaN or Inf input, or finite inputs whose mix
    overflows the dtype, leave no vouch (numpy's isfinite over the stored values agrees)."""
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(10_000, generator=g).to(dtype) for _ in range(3))
    if bad == "overflow":
        a[7], b[7], c[7] = BIG[dtype], BIG[dtype], BIG[dtype]
    else:
        b[9_999] = float(bad)
    out = torch.empty_like(a)
    finite.forget()
    kernels.lerp(out, a, b, 1.0, 1.0)
    assert not torch.isfinite(out).all() and not finite.vouched(out)
    ratio, keep = torch.tensor(0.9, dtype=dtype), torch.tensor(0.1, dtype=dtype)
    kernels.stock_mix(out, [b, c], a, ratio if bad != "overflow" else torch.tensor(2.0, dtype=dtype), keep)
    assert not torch.isfinite(out).all() and not finite.vouched(out)
    a[7], b[7], c[7], b[9_999] = 0.5, 0.5, 0.5, 0.5
    kernels.stock_mix(out, [b, c], a, ratio, keep)
    assert torch.isfinite(out).all() and finite.vouched(out)


def _models(tmp_path, dtype, poison=None):
    g = torch.Generator().manual_seed(3)
    for name in ("base", "a", "b", "c"):
        state = {f"layers.{i}.w": torch.randn(64, 96, generator=g).to(dtype) for i in range(3)}
        if name == poison:
            state["layers.1.w"][5, 5] = float("nan")
        save(state, tmp_path / name)


def _recipe(tmp_path, method):
    models = ["a"] if method == "slerp" else ["a", "b", "c"]
    params = "parameters: {t: 0.3}\n" if method == "slerp" else ""
    return (f"merge_method: {method}\nbase_model: {tmp_path}/base\n{params}models:\n"
            + "".join(f"  - model: {tmp_path}/{m}\n" for m in models))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_engine_skips_its_check_for_vouched_results_and_refuses_a_nan(tmp_path, monkeypatch, dtype, method):
    checked = []
    real = engine.check_finite
    monkeypatch.setattr(engine, "check_finite", lambda name, t, *a, **k: checked.append(name) or real(name, t, *a, **k))
    _models(tmp_path / "clean", dtype)
    result = ms.merge(_recipe(tmp_path / "clean", method), tmp_path / "out", threads=2)
    assert result.tensors == 3 and checked == []  # every result vouched by the kernel that wrote it
    merged = ms.load(tmp_path / "out")
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())
    _models(tmp_path / "poisoned", dtype, poison="a")
    with pytest.raises(MergescopeError, match=r"tensor 'layers\.1\.w': merged result has \d+ NaN/Inf"):
        ms.merge(_recipe(tmp_path / "poisoned", method), tmp_path / "out2", threads=2)
    assert not (tmp_path / "out2").exists()
    assert "layers.1.w" in checked


def test_a_method_without_a_vouching_kernel_is_still_checked(tmp_path, monkeypatch):
    checked = []
    real = engine.check_finite
    monkeypatch.setattr(engine, "check_finite", lambda name, t, *a, **k: checked.append(name) or real(name, t, *a, **k))
    _models(tmp_path, torch.float32)
    ms.merge(_recipe(tmp_path, "model_stock").replace("model_stock", "nearswap\nparameters: {t: 0.1}")
             .replace(f"  - model: {tmp_path}/b\n  - model: {tmp_path}/c\n", ""), tmp_path / "out", threads=1)
    assert sorted(checked) == [f"layers.{i}.w" for i in range(3)]
    assert np.isfinite(ms.load(tmp_path / "out")["layers.0.w"].numpy()).all()
