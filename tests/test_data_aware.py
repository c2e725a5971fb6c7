"""Fisher merging and RegMean against closed forms and independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergescope import tasks
from mergescope.merge.data_aware import (diagonal_fisher, fisher_merge, fisher_weighted_average, input_grams,
                                         regmean_merge)
from mergescope.tasks import TensorClassificationTask


class OneLinear(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc = nn.Linear(6, 3, bias=bias)

    def forward(self, x):
        return self.fc(x)


def linear_task(n: int, seed: int) -> TensorClassificationTask:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * (1 + seed) + seed
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorClassificationTask("lin", {"train": (x, y)}, num_classes=3, input_shape=(6,))


def random_state(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("bias", [True, False])
def test_regmean_one_linear_layer_is_least_squares_on_concatenated_data(bias):
    """min_W sum_i ||X_i W^T - X_i W_i^T||^2 is ordinary least squares on the stacked (X_i, X_i W_i^T)."""
    model = OneLinear(bias)
    states = [random_state(model, s) for s in range(3)]
    per_task = [linear_task(n, s) for n, s in zip((40, 25, 60), range(3))]
    merged = regmean_merge(model, states, per_task[0], alpha=1.0, tasks=per_task)
    xs, targets = [], []
    for st, t in zip(states, per_task):
        x = t.splits["train"][0].double().numpy()
        w = st["fc.weight"].double().numpy()
        b = st["fc.bias"].double().numpy() if bias else 0.0
        xs.append(np.hstack([x, np.ones((len(x), 1))]) if bias else x)
        targets.append(x @ w.T + b)
    solution, *_ = np.linalg.lstsq(np.vstack(xs), np.vstack(targets), rcond=None)
    np.testing.assert_allclose(merged["fc.weight"].double().numpy(), solution[:6].T, rtol=1e-4, atol=1e-5)
    if bias:
        np.testing.assert_allclose(merged["fc.bias"].double().numpy(), solution[6], rtol=1e-4, atol=1e-5)


def test_regmean_alpha_scales_off_diagonal_grams():
    """W*^T = (sum_i G~_i)^-1 sum_i G~_i W_i^T with G~ = a G + (1 - a) diag(G), in numpy."""
    model, alpha = OneLinear(False), 0.3
    states = [random_state(model, s) for s in range(2)]
    per_task = [linear_task(30, s) for s in range(2)]
    merged = regmean_merge(model, states, per_task[0], alpha=alpha, tasks=per_task)
    grams = []
    for t in per_task:
        x = t.splits["train"][0].double().numpy()
        g = x.T @ x
        grams.append(alpha * g + (1 - alpha) * np.diag(np.diag(g)))
    rhs = sum(g @ s["fc.weight"].double().numpy().T for g, s in zip(grams, states))
    np.testing.assert_allclose(merged["fc.weight"].double().numpy(), np.linalg.solve(sum(grams), rhs).T,
                               rtol=1e-4, atol=1e-5)


def test_regmean_alpha_zero_with_diagonal_grams_is_input_energy_weighted_mean():
    """alpha = 0 leaves diag(G): each input column j is a mean of W_i[:, j] weighted by sum_n x_ij^2."""
    model = OneLinear(False)
    states = [random_state(model, s) for s in range(2)]
    per_task = [linear_task(30, s) for s in range(2)]
    merged = regmean_merge(model, states, per_task[0], alpha=0.0, tasks=per_task)
    energy = [t.splits["train"][0].double().pow(2).sum(0).numpy() for t in per_task]
    ws = [s["fc.weight"].double().numpy() for s in states]
    expected = (energy[0] * ws[0] + energy[1] * ws[1]) / (energy[0] + energy[1])
    np.testing.assert_allclose(merged["fc.weight"].double().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_input_grams_match_hand_computed():
    model = OneLinear(True)
    t = linear_task(17, 0)
    g = input_grams(model, model.state_dict(), t)["fc"].numpy()
    x = np.hstack([t.splits["train"][0].double().numpy(), np.ones((17, 1))])
    np.testing.assert_allclose(g, x.T @ x, rtol=1e-10)


@pytest.mark.parametrize("name", ["transformer", "cnn"])
def test_regmean_of_identical_models_is_that_model(name):
    """Merging copies changes nothing (covers token-shaped Linear inputs and averaged non-Linear tensors)."""
    torch.set_num_threads(1)
    task = tasks.digits()
    model = tasks.build(name, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = regmean_merge(model, [state, state], task, n_examples=64)
    for k, v in state.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-4, atol=1e-5)


def test_regmean_non_linear_tensors_are_averaged():
    task = tasks.digits()
    model = tasks.build("cnn", seed=0, width=4)
    states = [tasks.build("cnn", seed=s, width=4).state_dict() for s in range(2)]
    merged = regmean_merge(model, states, task, n_examples=32)
    for k in states[0]:
        if not k.startswith("head.") and torch.is_floating_point(states[0][k]):
            torch.testing.assert_close(merged[k], (states[0][k] + states[1][k]) / 2)


def per_example_fisher_reference(model, state, x, y):
    """Loop over examples with plain autograd (no vmap): mean of squared gradients of the NLL."""
    model.load_state_dict(state)
    model.eval()
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            total[n] += g.double() ** 2
    return {n: v / len(y) for n, v in total.items()}


@pytest.mark.parametrize("name,options", [("mlp", {"width": 16}), ("cnn", {"width": 4})])
def test_diagonal_fisher_matches_per_example_loop(name, options):
    task = tasks.digits()
    model = tasks.build(name, seed=1, **options)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fisher = diagonal_fisher(model, state, task, n_examples=20, batch_size=8)
    x, y = next(task.batches("train", batch_size=20))
    reference = per_example_fisher_reference(model, state, x, y)
    assert set(fisher) == set(reference)
    for k in reference:
        torch.testing.assert_close(fisher[k].double(), reference[k], rtol=1e-4, atol=1e-9)


def test_equal_fishers_give_the_average():
    model = OneLinear(True)
    states = [random_state(model, s) for s in range(3)]
    fisher = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(9)) for k, v in states[0].items()}
    merged = fisher_weighted_average(states, [fisher] * 3)
    for k in states[0]:
        np.testing.assert_allclose(merged[k].numpy(), np.mean([s[k].numpy() for s in states], 0), rtol=1e-5, atol=1e-6)


def test_fisher_weighted_average_is_elementwise_formula():
    model = OneLinear(True)
    states = [random_state(model, s) for s in range(2)]
    fishers = [{k: torch.rand(v.shape, generator=torch.Generator().manual_seed(s + 5)) for k, v in states[0].items()}
               for s in range(2)]
    lam = [0.25, 0.75]
    merged = fisher_weighted_average(states, fishers, lam, floor=0.0)
    for k in states[0]:
        f = [fi[k].double().numpy() for fi in fishers]
        th = [s[k].double().numpy() for s in states]
        expected = (lam[0] * f[0] * th[0] + lam[1] * f[1] * th[1]) / (lam[0] * f[0] + lam[1] * f[1])
        np.testing.assert_allclose(merged[k].double().numpy(), expected, rtol=1e-5)


def test_fisher_merge_end_to_end_keeps_buffers_averaged():
    task = tasks.digits()
    model = tasks.build("cnn", seed=0, width=4)
    states = [{k: v.clone() for k, v in tasks.build("cnn", seed=s, width=4).state_dict().items()} for s in range(2)]
    states[1]["features.0.1.running_mean"] += 1.0
    merged = fisher_merge(model, states, task, n_examples=16)
    torch.testing.assert_close(merged["features.0.1.running_mean"],
                               (states[0]["features.0.1.running_mean"] + states[1]["features.0.1.running_mean"]) / 2)
    same = fisher_merge(model, [states[0], states[0]], task, n_examples=16)
    for k, v in states[0].items():
        torch.testing.assert_close(same[k], v)
