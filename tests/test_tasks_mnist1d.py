"""The MNIST-1D task (generated offline by the mnist1d package) and the 1-D zoo models."""

from __future__ import annotations

import importlib
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import mergescope as ms
from modelutil import randomize_buffers
from mergescope.align import apply, permutation_spec, random_permutation
from mergescope.errors import MergescopeError
from mergescope.tasks.checkpoints import TASK_PATTERN, model_metadata, passed_metadata, task_for

m1d = importlib.import_module("mergescope.tasks.mnist1d")  # the module (ms.tasks.mnist1d is the function)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference():
    """The package's own generator, called as its README does (independent of our args copy)."""
    from mnist1d.data import get_dataset_args, make_dataset

    return make_dataset(get_dataset_args())


def _rows(x: torch.Tensor) -> list[bytes]:
    return [r.tobytes() for r in x.numpy()]


def test_args_are_the_packages_defaults():
    from mnist1d.data import get_dataset_args

    expected = get_dataset_args(as_dict=True)
    expected.pop("url")
    assert m1d.MNIST1D_ARGS == expected


def test_data_equals_the_packages_make_dataset(reference):
    task = ms.tasks.mnist1d()
    x_test, y_test = task.splits["test"]
    assert torch.equal(x_test, torch.from_numpy(reference["x_test"].astype(np.float32)))
    assert torch.equal(y_test, torch.from_numpy(reference["y_test"]))
    # train + val is exactly the package's training split, split into disjoint parts
    train, val = task.splits["train"], task.splits["val"]
    ref = sorted(zip(_rows(torch.from_numpy(reference["x"].astype(np.float32))), reference["y"].tolist()))
    ours = sorted(zip(_rows(train[0]) + _rows(val[0]), train[1].tolist() + val[1].tolist()))
    assert ours == ref
    assert not set(_rows(train[0])) & set(_rows(val[0]))
    assert not set(_rows(train[0]) + _rows(val[0])) & set(_rows(x_test))


def test_split_sizes_shapes_labels_and_stratified_val():
    task = ms.tasks.get_task("mnist1d")
    assert task.name == "mnist1d" and task.input_shape == (40,) and task.num_classes == 10
    assert {s: task.size(s) for s in ("train", "val", "test")} == {"train": 3500, "val": 500, "test": 1000}
    for split in ("train", "val", "test"):
        x, y = task.splits[split]
        assert x.dtype == torch.float32 and x.shape == (len(y), 40) and torch.isfinite(x).all()
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9
        assert len(torch.unique(y)) == 10
    counts = torch.bincount(task.splits["val"][1], minlength=10)
    assert counts.sum() == 500 and counts.min() >= 48 and counts.max() <= 52


def test_deterministic_and_seed_only_moves_val():
    a, b, c = ms.tasks.mnist1d(), ms.tasks.mnist1d(), ms.tasks.mnist1d(seed=1)
    for split in ("train", "val", "test"):
        assert all(torch.equal(u, v) for u, v in zip(a.splits[split], b.splits[split]))
    assert torch.equal(a.splits["test"][0], c.splits["test"][0])
    assert not torch.equal(a.splits["val"][0], c.splits["val"][0])
    assert set(_rows(a.splits["train"][0]) + _rows(a.splits["val"][0])) == \
        set(_rows(c.splits["train"][0]) + _rows(c.splits["val"][0]))
    a.splits["train"][0][0, 0] = 123.0  # a task's tensors are its own copies
    assert ms.tasks.mnist1d().splits["train"][0][0, 0] != 123.0


def test_class_subsets_keep_labels_and_name():
    sub = ms.tasks.mnist1d(classes=(0, 1, 2))
    assert sub.name == "mnist1d[0,1,2]" and sub.num_classes == 10
    for split in ("train", "val", "test"):
        assert set(sub.splits[split][1].tolist()) == {0, 1, 2}
    full = ms.tasks.mnist1d()
    assert sub.size("test") == int(torch.isin(full.splits["test"][1], torch.tensor([0, 1, 2])).sum())


def test_generation_restores_the_global_random_generators():
    np.random.seed(7)
    random.seed(7)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    m1d.generate()
    assert np.array_equal(np.random.get_state()[1], before_np) and random.getstate() == before_py


def test_disk_cache_roundtrip_and_damaged_files_are_ignored(tmp_path, monkeypatch, reference):
    arrays = {k: np.ascontiguousarray(reference[k]) for k in ("x", "y", "x_test", "y_test")}
    key = m1d._key("test-version")
    path = tmp_path / "c.bin"
    m1d._write_cache(path, key, arrays)
    assert [p.name for p in tmp_path.iterdir()] == ["c.bin"]  # no temp file left behind
    got = m1d._read_cache(path, key)
    assert got is not None and all(np.array_equal(got[k], arrays[k]) for k in arrays)
    assert m1d._read_cache(path, m1d._key("other-version")) is None
    raw = path.read_bytes()
    for damaged in (raw[:-1], raw + b"\0", raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:], b"", b"garbage\n" * 10):
        path.write_bytes(damaged)
        assert m1d._read_cache(path, key) is None
    os.remove(path)
    os.mkfifo(path)  # never blocks on a FIFO
    assert m1d._read_cache(path, key) is None
    assert m1d._read_cache(tmp_path / "absent.bin", key) is None

    # end to end: a damaged cache file is regenerated and replaced by a good one
    monkeypatch.setenv("MERGESCOPE_CACHE", str(tmp_path / "cache"))
    m1d.mnist1d_arrays.cache_clear()
    try:
        first = m1d.mnist1d_arrays()
        (file,) = (tmp_path / "cache").iterdir()
        file.write_bytes(file.read_bytes()[:1000])
        m1d.mnist1d_arrays.cache_clear()
        again = m1d.mnist1d_arrays()
        assert all(np.array_equal(first[k], again[k]) and np.array_equal(again[k], arrays[k]) for k in arrays)
        assert m1d._read_cache(file, m1d._key(m1d._package_version())) is not None
    finally:
        m1d.mnist1d_arrays.cache_clear()


def test_checkpoints_may_record_mnist1d_tasks():
    for name in ("mnist1d", "mnist1d[0,1,2]", "digits", "digits[3,4]"):
        assert TASK_PATTERN.fullmatch(name)
    for name in ("mnist1d[]", "mnist1dx", "mnist1d[10]", "pkg.mod:f"):
        assert not TASK_PATTERN.fullmatch(name)

    class Ckpt:
        path = "x.safetensors"

        def __init__(self, task):
            self.metadata = model_metadata("cnn1d", {}, task=task)

    assert task_for(Ckpt("mnist1d")).name == "mnist1d"
    sub = task_for(Ckpt("mnist1d[1,3]"))
    assert sub.name == "mnist1d[1,3]" and set(sub.splits["test"][1].tolist()) == {1, 3}
    assert task_for(Ckpt("digits[0,1]")).name == "digits[0,1]"
    assert passed_metadata(Ckpt("mnist1d[2]").metadata)["task"] == "mnist1d[2]"


def test_mlp_in_features_option_keeps_the_digits_mlp_unchanged():
    assert ms.tasks.model_options("mlp") == {"width": 512, "depth": 2}
    digits_mlp = ms.tasks.build("mlp", seed=0)
    assert digits_mlp.layers[0].weight.shape == (512, 64)
    same = ms.tasks.build("mlp", seed=0, in_features=64)
    assert all(torch.equal(a, b) for a, b in zip(digits_mlp.state_dict().values(), same.state_dict().values()))
    m = ms.tasks.build("mlp", seed=0, in_features=40, width=32)
    assert list(m.state_dict()) == list(digits_mlp.state_dict()) and m(torch.randn(3, 40)).shape == (3, 10)
    for bad in (0, 10**6, 4.0, True):
        with pytest.raises(MergescopeError, match="in_features"):
            ms.tasks.build("mlp", in_features=bad)
    with pytest.raises(MergescopeError, match="unknown option.*in_features"):
        ms.tasks.build("cnn1d", in_features=40)


def test_cnn1d_shapes_options_and_bounds():
    x = ms.tasks.mnist1d().splits["test"][0][:5]
    for bn in (True, False):
        m = ms.tasks.build("cnn1d", seed=0, width=8, batchnorm=bn)
        assert m(x).shape == (5, 10) and m(torch.randn(5, 64)).shape == (5, 10)  # any length
        assert any(isinstance(u, nn.BatchNorm1d) for u in m.modules()) == bn
        convs = [u for u in m.modules() if isinstance(u, nn.Conv1d)]
        assert len(convs) == 4 and all((c.bias is not None) != bn for c in convs)
    with pytest.raises(MergescopeError, match="width"):
        ms.tasks.build("cnn1d", width=0)


@pytest.mark.parametrize("name, options", [("cnn1d", {}), ("cnn1d", {"batchnorm": False}),
                                           ("mlp", {"in_features": 40, "width": 64})])
def test_1d_models_are_invariant_under_random_permutations(name, options):
    model = randomize_buffers(ms.tasks.build(name, seed=0, **options), seed=1)
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(2))
    spec = permutation_spec(model, x)
    assert spec.perms, "no permutable groups found"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    perm = random_permutation(spec, generator=torch.Generator().manual_seed(0))
    permuted = apply(spec, perm, state)
    assert any(not torch.equal(permuted[k], state[k]) for k in state), "the permutation moved nothing"
    model.load_state_dict(permuted)
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max().item() <= 1e-5
    head = [k for k in state if k.startswith("head.")]
    assert not any(axis == 0 for entries in spec.perms.values() for t, axis in entries if t in head)
    if name == "cnn1d":  # every conv's output channels are permuted
        convs = {f"features.{i}.0.weight" for i in (0, 1, 3, 5)}
        assert convs <= {t for entries in spec.perms.values() for t, axis in entries if axis == 0}


def test_a_short_cnn1d_run_beats_chance_clearly():
    task = ms.tasks.mnist1d()
    model = ms.tasks.build("cnn1d", seed=0, width=8)
    ms.tasks.train(model, task, epochs=2, lr=1e-2, batch_size=128, seed=0)
    assert task.evaluate(model, "test")["accuracy"] > 0.5  # chance is 0.1
