"""Spawning: a fork continues the run exactly; children differ only by data order; barrier vs k."""

from __future__ import annotations

import torch

import mergescope as ms
from mergescope.landscape.stability import _start, _train_epoch
from mergescope.tasks import digits
from test_landscape_toys import template

torch.set_num_threads(1)
TASK = digits()


def test_fork_continues_the_parent_run_bit_for_bit():
    model = template("mlp", width=16)
    straight = _start(model, TASK, epochs=3, lr=3e-3, weight_decay=1e-4, batch_size=64)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        _train_epoch(straight, TASK, 64, g)
    parent = _start(model, TASK, epochs=3, lr=3e-3, weight_decay=1e-4, batch_size=64)
    g2 = torch.Generator().manual_seed(5)
    _train_epoch(parent, TASK, 64, g2)
    child = parent.fork()
    for _ in range(2):
        _train_epoch(child, TASK, 64, g2)
    assert all(torch.equal(a, b) for a, b in zip(straight.module.state_dict().values(), child.module.state_dict().values()))
    assert parent.epoch == 1 and child.epoch == 3  # forking left the parent where it was


def test_spawn_stability_barriers_match_interpolating_the_children():
    model = template("mlp", width=16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    labels = []
    r = ms.landscape.spawn_stability(model, TASK, ks=[2, 0], epochs=3, lr=3e-3, batch_size=64, n=5,
                                     on_epoch=labels.append)
    assert r.ks == (0, 2) and len(r.barrier_loss) == 2
    assert labels.count("parent") == 2 and len(labels) == 2 + 2 * 3 + 2 * 1
    for path, loss, acc in zip(r.paths, r.barrier_loss, r.barrier_acc):
        assert loss == path.barrier_loss and acc == path.barrier_acc and loss >= 0
    # Children spawned from initialization diverge more than children spawned late in the run.
    assert r.barrier_loss[0] > r.barrier_loss[1]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    d = r.to_dict()
    assert d["ks"] == [0, 2] and len(d["child_accuracy"]) == 2


def test_bad_spawn_points_are_rejected():
    import pytest

    with pytest.raises(ms.MergescopeError, match="spawn points"):
        ms.landscape.spawn_stability(template("mlp", width=16), TASK, ks=[5], epochs=3)
