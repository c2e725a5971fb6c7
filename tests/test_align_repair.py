"""REPAIR on networks without BatchNorm, checked against forward passes written independently of repair.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mergescope as ms
from mergescope.align import repair
from mergescope.align.repair import repair_points

torch.set_num_threads(1)


class ConvNoBN(nn.Module):
    """conv-ReLU, conv-ReLU, maxpool, linear head: every conv output is a REPAIR point (no BN to reset)."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width * 16, 10)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x.reshape(-1, 1, 8, 8)))))
        return self.head(torch.flatten(F.max_pool2d(h, 2), 1))


def _trained(factory, seed, task, epochs=3):
    torch.manual_seed(seed)
    model = factory()
    ms.tasks.train(model, task, epochs=epochs, lr=2e-3, weight_decay=1e-4, seed=seed)
    return model.eval()


def _lerp(model_a, model_b, alpha, factory):
    merged = factory()
    sa, sb = model_a.state_dict(), model_b.state_dict()
    merged.load_state_dict({k: torch.lerp(sa[k], sb[k], alpha) for k in sa})
    return merged.eval()


def _mlp_preactivations(state, x):
    """Pre-ReLU activations of both hidden layers of the zoo MLP, in numpy from the raw weights."""
    s = {k: v.double().numpy() for k, v in state.items()}
    h, out = x, []
    for i in range(2):
        z = h @ s[f"layers.{i}.weight"].T + s[f"layers.{i}.bias"]
        out.append(z)
        h = np.maximum(z, 0)
    return out


def _conv_preactivations(state, x):
    """Pre-ReLU conv outputs of ConvNoBN, per channel as rows [C, N*H*W], from the raw weights (functional ops)."""
    s = {k: v.double() for k, v in state.items()}
    z1 = F.conv2d(x.double().reshape(-1, 1, 8, 8), s["c1.weight"], s["c1.bias"], padding=1)
    z2 = F.conv2d(torch.relu(z1), s["c2.weight"], s["c2.bias"], padding=1)
    return [z.transpose(0, 1).reshape(z.shape[1], -1).T.numpy() for z in (z1, z2)]


def _check_interpolated_stats(pre, model_a, model_b, merged, x, alpha):
    for za, zb, zm in zip(pre(model_a.state_dict(), x), pre(model_b.state_dict(), x), pre(merged.state_dict(), x)):
        np.testing.assert_allclose(zm.mean(0), (1 - alpha) * za.mean(0) + alpha * zb.mean(0), atol=1e-4)
        np.testing.assert_allclose(zm.std(0), (1 - alpha) * za.std(0) + alpha * zb.std(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_repair_sets_mlp_preactivation_stats_to_the_interpolated_endpoint_stats(task, alpha):
    factory = lambda: ms.tasks.build("mlp", width=16)  # noqa: E731
    ma, mb = _trained(factory, 0, task), _trained(factory, 1, task)
    x = next(task.batches("train", batch_size=400))[0]
    merged = repair(_lerp(ma, mb, alpha, factory), ma, mb, [x[:200], x[200:]], alpha=alpha)
    _check_interpolated_stats(_mlp_preactivations, ma, mb, merged, x.double().numpy(), alpha)


def test_repair_sets_conv_channel_stats_without_batchnorm(task):
    ma, mb = _trained(ConvNoBN, 0, task), _trained(ConvNoBN, 1, task)
    x = next(task.batches("train", batch_size=300))[0]
    merged = _lerp(ma, mb, 0.5, ConvNoBN)
    assert repair_points(merged, x) == ["c1", "c2"]  # both convs; the output layer is left alone
    repair(merged, ma, mb, [x], alpha=0.5)
    _check_interpolated_stats(_conv_preactivations, ma, mb, merged, x, 0.5)


def test_repair_lowers_the_midpoint_loss_of_a_collapsed_mlp(task):
    """Unaligned midpoints lose most of their variance; restoring it must lower the test loss."""
    factory = lambda: ms.tasks.build("mlp", width=16)  # noqa: E731
    ma, mb = _trained(factory, 2, task), _trained(factory, 3, task)
    batches = [x for x, _ in task.batches("train", batch_size=512)]
    plain = task.evaluate(_lerp(ma, mb, 0.5, factory))["loss"]
    repaired = task.evaluate(repair(_lerp(ma, mb, 0.5, factory), ma, mb, batches, alpha=0.5))["loss"]
    assert repaired < plain
