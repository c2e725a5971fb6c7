"""Model stitching: feed layer l of model A, through a trained affine map, into layer l+1 of B.

Stitching (Lenc & Vedaldi 2015; Bansal et al. 2021, "Revisiting Model Stitching") asks whether
two networks' representations are interchangeable up to an affine map. The stitched network
A[:l] -> S -> B[l+1:] trains only S (A and B frozen, eval mode); the *stitching penalty*
acc(B) - acc(stitched) per layer shows where representations agree (penalty ~ 0) and where they
do not. S is a 1x1 convolution for feature maps, a Linear map on the last axis otherwise, and
starts at the identity, so ``identity_accuracy`` (S untrained) shows how far the raw
representations are from being plug-compatible (e.g. before neuron alignment).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ensemble import as_state, run, split_tensors
from .similarity import layer_outputs, representation_layers


@dataclass(frozen=True)
class StitchResult:
    """Per stitching layer: accuracy with the identity map, with the trained map, and the penalty."""

    layers: tuple[str, ...]
    accuracy_a: float
    accuracy_b: float
    identity_accuracy: tuple[float, ...]
    stitched_accuracy: tuple[float, ...]
    penalty: tuple[float, ...]
    epochs: int
    split: str

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "accuracy_a": self.accuracy_a, "accuracy_b": self.accuracy_b,
                "identity_accuracy": list(self.identity_accuracy), "stitched_accuracy": list(self.stitched_accuracy),
                "penalty": list(self.penalty), "epochs": self.epochs, "split": self.split}


def stitch_layer(example: torch.Tensor) -> nn.Module:
    """An identity-initialised affine map on the channel axis of a [N, C, H, W] / [N, T, D] / [N, D] output."""
    if example.dim() == 4:
        c = example.shape[1]
        layer = nn.Conv2d(c, c, 1)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(c)[:, :, None, None])
    else:
        d = example.shape[-1]
        layer = nn.Linear(d, d)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(d))
    with torch.no_grad():
        layer.bias.zero_()
    return layer


def stitched_logits(model: nn.Module, state_b: Mapping, layer: str, x: torch.Tensor, features_a: torch.Tensor,
                    stitch: nn.Module) -> torch.Tensor:
    """B's outputs with its ``layer`` output replaced by stitch(A's features at that layer)."""
    module = dict(model.named_modules())[layer]
    hook = module.register_forward_hook(lambda m, a, out: stitch(features_a))
    model.eval()
    try:
        with torch.enable_grad() if stitch.training else torch.no_grad():
            return torch.func.functional_call(model, dict(state_b), (x,), strict=False)
    finally:
        hook.remove()


def _accuracy(model, state_b, layer, x, y, feats, stitch) -> float:
    stitch.eval()
    return (stitched_logits(model, state_b, layer, x, feats, stitch).argmax(-1) == y).double().mean().item()


def train_stitch(model: nn.Module, state_b: Mapping, layer: str, x: torch.Tensor, y: torch.Tensor,
                 feats: torch.Tensor, stitch: nn.Module, epochs: int, lr: float, batch_size: int, seed: int) -> nn.Module:
    """Fit the stitch layer by Adam on cross-entropy of the stitched network (A and B frozen)."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(stitch.parameters(), lr=lr)
    was_training = model.training
    model.eval()
    try:
        for _ in range(epochs):
            stitch.train()
            for idx in torch.randperm(len(y), generator=generator).split(batch_size):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(stitched_logits(model, state_b, layer, x[idx], feats[idx], stitch), y[idx])
                loss.backward()
                opt.step()
    finally:
        model.train(was_training)
    return stitch.eval()


def stitch(model: nn.Module, state_a: Mapping, state_b: Mapping, task, layers: Sequence[str] | None = None,
           epochs: int = 5, lr: float = 1e-2, batch_size: int = 128, seed: int = 0, split: str = "test") -> StitchResult:
    """Stitch A into B after each layer (all representation layers but the last by default)."""
    a, b = as_state(state_a), as_state(state_b)
    layers = tuple(layers or representation_layers(model)[:-1])
    xt, yt = split_tensors(task, "train")
    xe, ye = split_tensors(task, split)
    acc = [(run(model, s, xe).argmax(-1) == ye).double().mean().item() for s in (a, b)]
    identity, stitched = [], []
    for layer in layers:
        train_feats = layer_outputs(model, a, xt, [layer], flatten=False)[layer]
        eval_feats = layer_outputs(model, a, xe, [layer], flatten=False)[layer]
        s = stitch_layer(train_feats[:1])
        identity.append(_accuracy(model, b, layer, xe, ye, eval_feats, s))
        train_stitch(model, b, layer, xt, yt, train_feats, s, epochs, lr, batch_size, seed)
        stitched.append(_accuracy(model, b, layer, xe, ye, eval_feats, s))
    return StitchResult(layers, acc[0], acc[1], tuple(identity), tuple(stitched),
                        tuple(acc[1] - s for s in stitched), epochs, split)


def plot(result: dict, path) -> None:
    """Accuracy of the stitched network per layer (identity and trained map) from a saved result.

    Drawn by ``mergescope.report.analysis_figures.plot_stitching`` (figures live in ``report/``)."""
    from ..report.analysis_figures import plot_stitching

    plot_stitching(result, path)


__all__ = ["StitchResult", "layer_outputs", "plot", "stitch", "stitch_layer", "stitched_logits", "train_stitch"]
