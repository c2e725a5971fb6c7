"""Helpers for tests that check models computed the same function: non-trivial normalisation state."""

from __future__ import annotations

import torch
from torch import nn


def randomize_buffers(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm non-trivial running statistics and affine, and other norms a non-trivial affine,
    so eval mode exercises them (a permutation that forgets a buffer then changes the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) and m.weight is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()
