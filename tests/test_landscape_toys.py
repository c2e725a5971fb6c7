"""Shared fixtures for the landscape tests: toy tasks with closed-form landscapes, small trained models.

(No tests here; the other test_landscape_* files import from it.)
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from mergescope.tasks import build, digits, train


class RegressionTask:
    """Least squares y ~ f(x) with mean squared error: for a linear f the Hessian is (2/N) X^T X."""

    name = "toy-regression"

    def __init__(self, n: int = 96, d: int = 6, seed: int = 0, batch_size: int | None = None):
        g = np.random.default_rng(seed)
        scales = np.linspace(0.3, 2.0, d)
        self.x = torch.tensor(g.normal(size=(n, d)) * scales, dtype=torch.float32)
        self.w_true = torch.tensor(g.normal(size=(d,)), dtype=torch.float32)
        self.y = self.x @ self.w_true + 0.1 * torch.tensor(g.normal(size=n), dtype=torch.float32)
        self.batch_size = batch_size

    def batches(self, split="train", batch_size=None, shuffle=False, generator=None):
        step = batch_size or self.batch_size or len(self.y)
        order = torch.randperm(len(self.y), generator=generator) if shuffle else torch.arange(len(self.y))
        for s in range(0, len(self.y), step):
            idx = order[s:s + step]
            yield self.x[idx], self.y[idx]

    def loss(self, out, y):
        return ((out.reshape(y.shape) - y) ** 2).mean()

    def evaluate(self, model, split="test"):
        with torch.no_grad():
            return {"loss": float(self.loss(model(self.x), self.y)), "accuracy": float("nan")}

    def hessian(self) -> np.ndarray:
        """Exact Hessian of the mean squared error w.r.t. (w, b) of a linear model: (2/N) Z^T Z."""
        z = np.concatenate([self.x.double().numpy(), np.ones((len(self.y), 1))], axis=1)
        return 2.0 * z.T @ z / len(self.y)

    def minimum(self) -> np.ndarray:
        """The least-squares solution (w*, b*): the known minimum of the quadratic."""
        z = np.concatenate([self.x.double().numpy(), np.ones((len(self.y), 1))], axis=1)
        return np.linalg.lstsq(z, self.y.double().numpy(), rcond=None)[0]


def linear_model(d: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 1), nn.Flatten(0, -1))


@functools.lru_cache(maxsize=None)
def trained(name: str, seed: int, epochs: int = 4, **options) -> dict[str, torch.Tensor]:
    """A small zoo model trained briefly on digits (cached per test session); returns its state."""
    torch.set_num_threads(1)
    model = build(name, seed=seed, **options)
    train(model, digits(), epochs=epochs, lr=3e-3, seed=seed)
    return {k: v.clone() for k, v in model.state_dict().items()}


def template(name: str, **options) -> nn.Module:
    if name == "tanh":
        torch.manual_seed(123)
        return nn.Sequential(nn.Linear(64, options.get("width", 8)), nn.Tanh(), nn.Linear(options.get("width", 8), 10))
    return build(name, seed=123, **options)


@functools.lru_cache(maxsize=None)
def trained_tanh(seed: int, width: int = 8, epochs: int = 4) -> dict[str, torch.Tensor]:
    """A smooth (tanh) MLP, so finite differences of its gradient see the true Hessian (ReLU kinks add spikes)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = template("tanh", width=width)
    model.load_state_dict({k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()})
    train(model, digits(), epochs=epochs, lr=3e-3, seed=seed)
    return {k: v.clone() for k, v in model.state_dict().items()}
