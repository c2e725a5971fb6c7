"""Ensembles and soups against a direct numpy computation (numpy MLP forward, softmax, ECE, votes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergescope import MergescopeError, ensemble, tasks
from mergescope.analysis.soups import soup

WIDTH = 32


@pytest.fixture(scope="module")
def zoo(task):
    """Three small MLPs from different seeds, briefly trained (diverse, not identical)."""
    states = []
    for seed in range(3):
        model = tasks.build("mlp", seed=seed, width=WIDTH)
        tasks.train(model, task, epochs=2 + seed, lr=1e-3, seed=seed)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return tasks.build("mlp", width=WIDTH), states


def np_state(state):
    return {k: v.double().numpy() for k, v in state.items()}


def np_hidden(s, x):
    h = x
    for i in range(2):
        h = np.maximum(h @ s[f"layers.{i}.weight"].T + s[f"layers.{i}.bias"], 0)
    return h


def np_logits(s, x):
    return np_hidden(s, x) @ s["head.weight"].T + s["head.bias"]


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_ece(p, y, pred, bins=15):
    conf = p[np.arange(len(y)), pred]
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        mask = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if mask.any():
            total += mask.mean() * abs((pred[mask] == y[mask]).mean() - conf[mask].mean())
    return total


def data(task, split):
    x, y = zip(*task.batches(split))
    return torch.cat(x).double().numpy(), torch.cat(y).numpy()


def check(result, p, y, vote=False, pred=None):
    pred = p.argmax(-1) if pred is None else pred
    assert result.accuracy == pytest.approx((pred == y).mean(), abs=1e-12)
    p_true = p[np.arange(len(y)), y]
    nll = -np.log(np.maximum(p_true, 1e-6)) if vote else -np.log(p_true)
    assert result.loss == pytest.approx(nll.mean(), rel=1e-5, abs=1e-6)
    assert result.ece == pytest.approx(np_ece(p, y, pred), abs=1e-6)


def test_probs_logits_weighted_match_numpy(task, zoo):
    model, states = zoo
    x, y = data(task, "test")
    z = np.stack([np_logits(np_state(s), x) for s in states])
    check(ensemble.evaluate(model, states, task, method="probs"), np_softmax(z).mean(0), y)
    check(ensemble.evaluate(model, states, task, method="logits"), np_softmax(z.mean(0)), y)
    w = np.array([0.5, 0.3, 0.2])
    check(ensemble.evaluate(model, states, task, method="weighted", weights=w.tolist()),
          np.einsum("m,mnc->nc", w, np_softmax(z)), y)
    xv, yv = data(task, "val")
    val_acc = np.array([(np_logits(np_state(s), xv).argmax(-1) == yv).mean() for s in states])
    check(ensemble.evaluate(model, states, task, method="weighted"),
          np.einsum("m,mnc->nc", val_acc / val_acc.sum(), np_softmax(z)), y)


def test_vote_is_majority_with_probability_tiebreak(task, zoo):
    model, states = zoo
    x, y = data(task, "test")
    z = np.stack([np_logits(np_state(s), x) for s in states])
    votes = np.stack([np.bincount(row, minlength=10) for row in z.argmax(-1).T]).astype(float)
    mean_p = np_softmax(z).mean(0)
    pred = np.array([max(range(10), key=lambda c: (votes[n, c], mean_p[n, c])) for n in range(len(y))])
    check(ensemble.evaluate(model, states, task, method="vote"), votes / len(states), y, vote=True, pred=pred)


def test_feature_averaging_and_weight_average_match_numpy(task, zoo):
    model, states = zoo
    x, y = data(task, "test")
    ns = [np_state(s) for s in states]
    feats = np.mean([np_hidden(s, x) for s in ns], 0)
    head_w = np.mean([s["head.weight"] for s in ns], 0)
    head_b = np.mean([s["head.bias"] for s in ns], 0)
    check(ensemble.evaluate(model, states, task, method="features"), np_softmax(feats @ head_w.T + head_b), y)
    avg = {k: np.mean([s[k] for s in ns], 0) for k in ns[0]}
    check(ensemble.evaluate_weight_average(model, states, task), np_softmax(np_logits(avg, x)), y)


def test_single_member_is_the_model_itself(task, zoo):
    model, states = zoo
    model.load_state_dict(states[0])
    direct = task.evaluate(model, "test")
    for method in ("probs", "logits", "vote", "features"):
        result = ensemble.evaluate(model, states[:1], task, method=method)
        assert result.accuracy == pytest.approx(direct["accuracy"], abs=1e-12)
    assert ensemble.evaluate(model, states[:1], task, "probs").loss == pytest.approx(direct["loss"], rel=1e-5)


def test_feature_refit_head_matches_sklearn_logistic_regression(task, zoo):
    """The refitted head minimises mean CE + 1e-4 ||W||^2, i.e. sklearn's multinomial logistic
    regression with C = 1 / (2 N 1e-4) on the same averaged train features (a convex problem)."""
    from sklearn.linear_model import LogisticRegression

    model, states = zoo
    ns = [np_state(s) for s in states]
    xt, yt = data(task, "train")
    xe, _ = data(task, "test")
    train_feats = np.mean([np_hidden(s, xt) for s in ns], 0)
    test_feats = np.mean([np_hidden(s, xe) for s in ns], 0)
    reference = LogisticRegression(C=1 / (2 * len(yt) * 1e-4), max_iter=10000, tol=1e-12).fit(train_feats, yt)
    probs = ensemble.feature_average_probs(model, states, task, "test", refit=True).double().numpy()
    np.testing.assert_allclose(probs, reference.predict_proba(test_feats), atol=1e-2)
    assert (probs.argmax(1) == reference.predict_proba(test_feats).argmax(1)).mean() >= 0.99


def test_feature_refit_head_fits_averaged_features(task, zoo):
    """The refitted head is at least as good on train features as the averaged head."""
    model, states = zoo
    refit = ensemble.evaluate(model, states, task, method="features-refit", split="train")
    shared = ensemble.evaluate(model, states, task, method="features", split="train")
    assert refit.loss <= shared.loss + 1e-6


def test_cost_is_closed_form(task, zoo):
    model, states = zoo
    params = 64 * WIDTH + WIDTH + WIDTH * WIDTH + WIDTH + WIDTH * 10 + 10
    flops = 2 * (64 * WIDTH + WIDTH * WIDTH + WIDTH * 10)
    probs = ensemble.evaluate(model, states, task, method="probs")
    assert (probs.params, probs.flops) == (3 * params, 3 * flops)
    feats = ensemble.evaluate(model, states, task, method="features")
    head_params, head_flops = WIDTH * 10 + 10, 2 * WIDTH * 10
    assert feats.params == 3 * (params - head_params) + head_params
    assert feats.flops == 3 * (flops - head_flops) + head_flops
    avg = ensemble.evaluate_weight_average(model, states, task)
    assert (avg.params, avg.flops) == (params, flops)


def test_ece_closed_forms():
    y = torch.tensor([0, 1, 2, 3])
    confident_right = torch.eye(4)
    assert ensemble.expected_calibration_error(confident_right, y) == pytest.approx(0.0)
    # every prediction at confidence 0.7, half right -> |0.5 - 0.7| = 0.2
    p = torch.full((4, 4), 0.1)
    p[torch.arange(4), torch.tensor([0, 1, 0, 0])] = 0.7
    assert ensemble.expected_calibration_error(p, y) == pytest.approx(0.2)


def test_bad_method_and_to_dict(task, zoo):
    model, states = zoo
    with pytest.raises(MergescopeError, match="unknown ensemble method"):
        ensemble.evaluate(model, states, task, method="median")
    d = ensemble.evaluate(model, states, task).to_dict()
    assert set(d) >= {"method", "accuracy", "loss", "ece", "params", "flops", "member_accuracy"}


def test_uniform_soup_is_numpy_mean(task, zoo):
    model, states = zoo
    result = soup(model, states, task, kind="uniform")
    for k in states[0]:
        np.testing.assert_allclose(result.state[k].numpy(), np.mean([s[k].numpy() for s in states], 0),
                                   rtol=1e-6, atol=1e-7)
    x, y = data(task, "test")
    avg = {k: v.double().numpy() for k, v in result.state.items()}
    assert result.test_accuracy == pytest.approx((np_logits(avg, x).argmax(-1) == y).mean())


def test_greedy_soup_matches_reference_loop(task, zoo):
    model, states = zoo
    states = [*states, states[0]]  # a repeated member exercises the ">=" (ties are added) rule
    xv, yv = data(task, "val")
    ns = [np_state(s) for s in states]
    val = [(np_logits(s, xv).argmax(-1) == yv).mean() for s in ns]
    order = sorted(range(len(ns)), key=lambda i: -val[i])
    chosen, best = [order[0]], val[order[0]]
    for i in order[1:]:
        avg = {k: np.mean([ns[j][k] for j in chosen + [i]], 0) for k in ns[0]}
        acc = (np_logits(avg, xv).argmax(-1) == yv).mean()
        if acc >= best:
            chosen, best = chosen + [i], acc
    result = soup(model, states, task, kind="greedy")
    assert list(result.included) == chosen
    assert result.val_accuracy == pytest.approx(best)
    assert result.val_accuracy >= max(result.member_val_accuracy)


def test_reset_batchnorm_stores_the_statistics_of_the_data(task):
    """Running mean/var of the first BN become the per-channel mean and population variance of its
    input over the train split, computed here directly from the first convolution."""
    model = tasks.build("cnn", seed=0, width=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, _ = zip(*task.batches("train"))
    x = torch.cat(x)
    reset = ensemble.reset_batchnorm(model, state, x)
    with torch.no_grad():
        conv = torch.nn.functional.conv2d(x.reshape(-1, 1, 8, 8), state["features.0.0.weight"], padding=1)
    c = conv.double().numpy().transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(reset["features.0.1.running_mean"].numpy(), c.mean(1), atol=1e-6)
    np.testing.assert_allclose(reset["features.0.1.running_var"].numpy(), c.var(1, ddof=0), rtol=1e-5)
    assert torch.equal(state["features.0.1.running_mean"], model.state_dict()["features.0.1.running_mean"])  # input untouched
    mlp = tasks.build("mlp", width=8)
    same = ensemble.reset_batchnorm(mlp, mlp.state_dict(), x)
    assert all(torch.equal(same[k], v) for k, v in mlp.state_dict().items())


def test_member_rows_carry_loss_and_ece_like_numpy(task, zoo):
    """Each member's accuracy, NLL and ECE, measured as the combinations are (the CLI's member rows)."""
    model, states = zoo
    result = ensemble.evaluate(model, states, task, method="logits")
    x, y = data(task, "test")
    for i, s in enumerate(states):
        p = np_softmax(np_logits({k: v.double().numpy() for k, v in s.items()}, x))
        assert result.member_accuracy[i] == pytest.approx((p.argmax(-1) == y).mean())
        assert result.member_loss[i] == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-5)
        assert result.member_ece[i] == pytest.approx(
            ensemble.expected_calibration_error(torch.tensor(p), torch.tensor(y)), abs=1e-6)
    assert len(result.to_dict()["member_ece"]) == len(states)
