"""The aligner registry: one signature, one result type, and the old entry points routed through it."""

from __future__ import annotations

import pytest
import torch

import mergescope as ms
from mergescope.align import AlignResult, apply, permutation_spec, random_permutation
from mergescope.errors import MergescopeError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task():
    return ms.tasks.get_task("digits")


def _pair(name="mlp", **options):
    a = ms.tasks.build(name, seed=0, **options)
    spec = permutation_spec(a, torch.randn(2, 64))
    b = ms.tasks.build(name, seed=0, **options)
    b.load_state_dict(apply(spec, random_permutation(spec, generator=torch.Generator().manual_seed(1)), a.state_dict()))
    return spec, a, b


def test_registry_lists_every_method_and_refuses_unknown_names():
    assert set(ms.align.names()) >= {"weight", "activation", "ste", "ot", "ot_fusion", "zipit"}
    assert ms.align.get("weight").name == "weight"
    with pytest.raises(MergescopeError, match="unknown method"):
        ms.align.get("no_such_method")


@pytest.mark.parametrize("method", ["weight", "activation", "ot", "zipit", "ot_fusion"])
def test_every_aligner_returns_an_align_result_and_undoes_a_permutation(method, task):
    spec, a, b = _pair()
    result = ms.align.get(method)(spec, a, b, task=task, seed=0)
    assert isinstance(result, AlignResult) and result.method == method
    assert result.merged == ms.align.get(method).merges
    sa = a.state_dict()
    for k in sa:  # B is a permutation of A: aligning (or merging) gives A back
        assert torch.allclose(result.state[k].float(), sa[k].float(), atol=1e-4), (method, k)


def test_states_with_a_template_equal_models(task):
    spec, a, b = _pair()
    by_model = ms.align.get("activation")(spec, a, b, task=task)
    by_state = ms.align.get("activation")(spec, a.state_dict(), b.state_dict(), task=task, template=a)
    assert all(torch.equal(by_model.state[k], by_state.state[k]) for k in by_model.state)
    with pytest.raises(MergescopeError, match="template"):
        ms.align.get("activation")(spec, a.state_dict(), b.state_dict(), task=task)


def test_parameters_and_data_are_checked():
    spec, a, b = _pair()
    with pytest.raises(MergescopeError, match="needs data"):
        ms.align.get("zipit")(spec, a, b)
    with pytest.raises(MergescopeError, match="unmerged"):
        ms.align.get("weight")(spec, a, b, unmerged=1)
    with pytest.raises(MergescopeError, match="unmerged"):
        ms.align.align_models(spec, a, b, "ot", unmerged=2)
    with pytest.raises(MergescopeError, match="alpha"):
        ms.align.align_models(spec, a, b, "weight", alpha=1.5)


def test_align_models_is_the_registry_entry(task):
    spec, a, b = _pair("cnn", width=4)
    b = ms.tasks.build("cnn", seed=3, width=4)
    direct = ms.align.get("weight")(spec, a, b, seed=2)
    api = ms.align.align_models(spec, a, b, "weight", seed=2)
    assert all(torch.equal(direct.state[k], api.state[k]) for k in api.state)
    assert all(torch.equal(direct.perms[p], api.perms[p]) for p in api.perms)


def test_repair_in_the_api_is_the_repaired_interpolation(task):
    """align_models(repair=True) equals REPAIR run by hand on the interpolated aligned pair."""
    from mergescope.state import interpolate, with_state

    spec = permutation_spec(ms.tasks.build("mlp", seed=0, width=16), torch.randn(2, 64))
    a, b = ms.tasks.build("mlp", seed=0, width=16), ms.tasks.build("mlp", seed=1, width=16)
    aligned = ms.align.align_models(spec, a, b, "weight")
    repaired = ms.align.align_models(spec, a, b, "weight", repair=True, task=task, alpha=0.3)
    assert repaired.merged and repaired.info["repair"]
    net = with_state(a, interpolate(a.state_dict(), aligned.state, 0.3))
    ms.align.repair(net, a, with_state(a, aligned.state), [x for x, _ in task.batches("train")], alpha=0.3)
    assert all(torch.equal(net.state_dict()[k], repaired.state[k]) for k in repaired.state)


def test_curves_and_study_use_the_registry(task):
    from mergescope.landscape.curves import align_endpoint
    from mergescope.study.measure import align_to_first

    model = ms.tasks.build("mlp", seed=0, width=8)
    sa = {k: v.float() for k, v in model.state_dict().items()}
    sb = {k: v.float() for k, v in ms.tasks.build("mlp", seed=1, width=8).state_dict().items()}
    spec = permutation_spec(model, torch.randn(2, 64))
    expected = ms.align.get("weight")(spec, sa, sb, seed=0).state
    assert all(torch.equal(align_endpoint(model, sa, sb, task, "weight")[k], expected[k]) for k in sb)
    assert all(torch.equal(align_to_first(model, [sa, sb], task, "weight")[1][k], expected[k]) for k in sb)
    with pytest.raises(MergescopeError):
        align_endpoint(model, sa, sb, task, "zipit")
