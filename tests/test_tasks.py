"""The digits task and the model zoo: splits, determinism, shapes, user factories."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.tasks.checkpoints import load_state_into, model_for, model_metadata


def test_digits_splits_are_disjoint_stratified_and_standardized():
    task = ms.tasks.digits()
    sizes = {s: task.size(s) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 360
    x_train, y_train = task.splits["train"]
    assert torch.allclose(x_train.mean(0), torch.zeros(64), atol=1e-5)
    raw = load_digits()
    for split in sizes:
        counts = torch.bincount(task.splits[split][1], minlength=10).float()
        expected = torch.tensor(np.bincount(raw.target, minlength=10) / 1797 * sizes[split], dtype=torch.float32)
        assert torch.all((counts - expected).abs() <= 2)


def test_digits_is_deterministic_and_subsets_keep_labels():
    a, b = ms.tasks.digits(), ms.tasks.digits()
    assert torch.equal(a.splits["test"][0], b.splits["test"][0])
    sub = ms.tasks.digits(classes=(0, 1, 2))
    assert set(sub.splits["train"][1].tolist()) == {0, 1, 2}
    assert sub.name == "digits[0,1,2]"


def test_batches_cover_the_split_once_and_shuffle_with_a_generator():
    task = ms.tasks.digits()
    ys = torch.cat([y for _, y in task.batches("train", batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(1))])
    assert torch.equal(ys.sort().values, task.splits["train"][1].sort().values)
    again = torch.cat([y for _, y in task.batches("train", batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(1))])
    assert torch.equal(ys, again)


@pytest.mark.parametrize("name", list(ms.tasks.ZOO))
def test_zoo_models_map_digits_to_logits_and_init_is_seeded(name):
    x = ms.tasks.digits().splits["test"][0][:5]
    a, b, c = ms.tasks.build(name, seed=1), ms.tasks.build(name, seed=1), ms.tasks.build(name, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert a(x).shape == (5, 10)


def test_training_is_bitwise_deterministic_and_learns():
    task = ms.tasks.digits()
    states = []
    for _ in range(2):
        model = ms.tasks.build("mlp", width=64, seed=3)
        ms.tasks.train(model, task, epochs=4, lr=5e-3, seed=3)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert task.evaluate(model)["accuracy"] > 0.85


def test_evaluate_matches_a_direct_computation_and_restores_mode():
    task = ms.tasks.digits()
    model = ms.tasks.build("cnn", width=4, seed=0).train()
    got = task.evaluate(model, "val")
    assert model.training
    model.eval()
    x, y = task.splits["val"]
    with torch.no_grad():
        logits = model(x).double().numpy()
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    assert got["loss"] == pytest.approx(-logp[np.arange(len(y)), y.numpy()].mean(), rel=1e-5)
    assert got["accuracy"] == pytest.approx((logits.argmax(1) == y.numpy()).mean())


def test_unknown_models_and_options_are_clear_errors():
    with pytest.raises(MergescopeError, match="unknown model 'vgg'"):
        ms.tasks.build("vgg")
    with pytest.raises(MergescopeError, match="unknown option.*heads"):
        ms.tasks.build("mlp", heads=3)


def test_user_factories_plug_in_by_import_string():
    model = ms.tasks.make_model("torch.nn:Linear", in_features=64, out_features=10)
    assert isinstance(model, torch.nn.Linear)
    task = ms.tasks.get_task("mergescope.tasks:digits", classes=(1, 2))
    assert task.size("test") < 100
    for bad, msg in (("nomodule_xyz:f", "cannot import"), ("torch.nn:Nope", "no attribute"), ("torch.nn", "expected")):
        with pytest.raises(MergescopeError, match=msg):
            ms.tasks.make_model(bad) if ":" in bad else ms.tasks.resolve(bad)


def test_checkpoint_metadata_rebuilds_the_model(tmp_path):
    model = ms.tasks.build("transformer", dim=16, heads=2, seed=0)
    ms.save(model.state_dict(), tmp_path / "t.safetensors", metadata=model_metadata("transformer", {"dim": 16, "heads": 2}))
    ckpt = ms.load(tmp_path / "t.safetensors")
    rebuilt, name, options = model_for(ckpt)
    assert name == "transformer" and options == {"dim": 16, "heads": 2}
    load_state_into(rebuilt, ckpt, "t")
    x = torch.randn(3, 64)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))
    with pytest.raises(MergescopeError, match="tensor '.*' has shape .*the model needs"):
        load_state_into(ms.tasks.build("transformer", dim=32), ckpt, "t.safetensors")


def test_model_for_ignores_unset_cli_options_and_keeps_recorded_ones(tmp_path):
    """`--model mlp --width 512` passes dim=None, heads=None from the CLI; those must not reach the factory,
    and options recorded for the same model fill in what the command line left unset."""
    ms.save(ms.tasks.build("mlp", width=24, seed=0).state_dict(), tmp_path / "m.safetensors",
            metadata=model_metadata("mlp", {"width": 24}))
    ckpt = ms.load(tmp_path / "m.safetensors")
    _, name, options = model_for(ckpt, "mlp", width=None, depth=None, dim=None, heads=None)
    assert name == "mlp" and options == {"width": 24}
    _, _, options = model_for(ckpt, "mlp", width=32, dim=None)
    assert options == {"width": 32}
    _, _, options = model_for(ckpt, "cnn", width=None)  # another model: recorded options do not apply
    assert options == {}


def test_cnn_without_batchnorm_has_biased_convs_and_no_norm_layers():
    plain, normed = ms.tasks.build("cnn", seed=0, batchnorm=False), ms.tasks.build("cnn", seed=0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(c.bias is not None for c in convs)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in normed.modules())
    assert plain(torch.randn(5, 64)).shape == (5, 10)
