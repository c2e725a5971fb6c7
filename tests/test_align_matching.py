"""Weight/activation matching and REPAIR against independent references (numpy, brute force, closed forms)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import mergescope as ms
from mergescope.align import activation_matching, apply, permutation_spec, random_permutation, weight_matching
from mergescope.align.matching import assign
from mergescope.align.repair import repair, reset_bn_stats

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained(task, tmp_path_factory):
    """Trained digits models cached as checkpoints for the session: (name, width, seed) -> state."""
    cache = tmp_path_factory.mktemp("align_ckpt")
    states = {}

    def get(name, seed, epochs, **options):
        key = (name, seed, epochs, tuple(sorted(options.items())))
        if key not in states:
            path = cache / f"{name}_{seed}_{epochs}_{'_'.join(map(str, options.values()))}.safetensors"
            model = ms.tasks.build(name, seed=seed, **options)
            defaults = ms.tasks.TRAIN_DEFAULTS[name]
            ms.tasks.train(model, task, epochs=epochs, lr=defaults["lr"], weight_decay=defaults["weight_decay"], seed=seed)
            ms.save(model.state_dict(), path)
            states[key] = dict(ms.load(path))
        return states[key]

    return get


def _model(name, state, **options):
    m = ms.tasks.build(name, **options)
    m.load_state_dict(state)
    return m.eval()


def _midpoint_loss(name, sa, sb, task, **options):
    """Test loss at t=0.5 minus the mean of the endpoints' (the barrier's usual location)."""
    ends = [task.evaluate(_model(name, s, **options))["loss"] for s in (sa, sb)]
    mid = {k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa}
    return task.evaluate(_model(name, mid, **options))["loss"] - sum(ends) / 2


def test_assignment_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(5):
        cost = rng.normal(size=(5, 5))
        best = max(itertools.permutations(range(5)), key=lambda p: sum(cost[i, p[i]] for i in range(5)))
        perm, value = assign(cost)
        assert tuple(perm) == best
        assert value == pytest.approx(sum(cost[i, best[i]] for i in range(5)))


@pytest.mark.parametrize("name,options", [("mlp", {"width": 24}), ("cnn", {"width": 6}), ("resnet", {"width": 4}),
                                          ("transformer", {"dim": 16, "heads": 4, "depth": 1})])
def test_weight_matching_undoes_a_random_permutation(name, options):
    model = ms.tasks.build(name, seed=3, **options)
    spec = permutation_spec(model, torch.randn(2, 64))
    state = model.state_dict()
    shuffled = apply(spec, random_permutation(spec, generator=torch.Generator().manual_seed(5)), state)
    back = apply(spec, weight_matching(spec, state, shuffled, seed=1), shuffled)
    assert all(torch.equal(back[k], state[k]) for k in state)


def _reference_weight_matching(wa, ba, wb, bb, seed, max_iter=100):
    """Git Re-Basin for an MLP x -> W0 -> W1 -> W2, written directly with numpy (hidden perms P0, P1)."""
    perms = [np.arange(wa[0].shape[0]), np.arange(wa[1].shape[0])]
    rng = np.random.default_rng(seed)

    def cost(l):
        prev = perms[l - 1] if l > 0 else np.arange(wa[0].shape[1])
        c = wa[l] @ wb[l][:, prev].T + np.outer(ba[l], bb[l])
        nxt = perms[l + 1] if l + 1 < 2 else np.arange(wa[2].shape[0])
        return c + wa[l + 1].T @ wb[l + 1][nxt, :]

    for _ in range(max_iter):
        improved = False
        for l in rng.permutation(2):
            c = cost(l)
            rows, cols = linear_sum_assignment(c, maximize=True)
            old, new = c[np.arange(len(perms[l])), perms[l]].sum(), c[rows, cols].sum()
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[l] = cols
                improved = True
        if not improved:
            break
    return perms


def test_weight_matching_agrees_with_a_numpy_reference(trained):
    sa, sb = trained("mlp", 0, 8, width=48), trained("mlp", 1, 8, width=48)
    spec = permutation_spec(ms.tasks.build("mlp", width=48), torch.randn(2, 64))
    ours = weight_matching(spec, sa, sb, seed=4, restarts=1)  # the reference is one descent from the identity
    w = lambda s: [s[f"layers.{i}.weight"].double().numpy() for i in range(2)] + [s["head.weight"].double().numpy()]  # noqa: E731
    b = lambda s: [s[f"layers.{i}.bias"].double().numpy() for i in range(2)]  # noqa: E731
    ref = _reference_weight_matching(w(sa), b(sa), w(sb), b(sb), seed=4)
    assert np.array_equal(ours["layers.0.weight:0"].numpy(), ref[0])
    assert np.array_equal(ours["layers.1.weight:0"].numpy(), ref[1])


def test_activation_matching_agrees_with_a_numpy_reference(trained, task):
    sa, sb = trained("mlp", 0, 8, width=48), trained("mlp", 1, 8, width=48)
    ma, mb = _model("mlp", sa, width=48), _model("mlp", sb, width=48)
    spec = permutation_spec(ma, torch.randn(2, 64))
    ours = activation_matching(spec, ma, mb, task.batches("train", batch_size=300))
    x = next(task.batches("train"))[0].double().numpy()

    def hidden(s):
        h, out = x, []
        for i in range(2):
            h = np.maximum(h @ s[f"layers.{i}.weight"].double().numpy().T + s[f"layers.{i}.bias"].double().numpy(), 0)
            out.append(h)
        return out

    for i, (ha, hb) in enumerate(zip(hidden(sa), hidden(sb))):
        n = ha.shape[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.nan_to_num(np.corrcoef(ha.T, hb.T)[:n, n:])
        expected = linear_sum_assignment(corr, maximize=True)[1]
        agree = np.mean(ours[f"layers.{i}.weight:0"].numpy() == expected)
        assert agree >= 0.95  # dead units (zero variance) may tie arbitrarily


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_alignment_cuts_the_mlp_barrier(method, trained, task):
    sa, sb = trained("mlp", 0, 15, width=128), trained("mlp", 1, 15, width=128)
    spec = permutation_spec(ms.tasks.build("mlp", width=128), torch.randn(2, 64))
    if method == "weight":
        perm = weight_matching(spec, sa, sb)
    else:
        perm = activation_matching(spec, _model("mlp", sa, width=128), _model("mlp", sb, width=128),
                                   task.batches("train", batch_size=512))
    naive = _midpoint_loss("mlp", sa, sb, task, width=128)
    aligned = _midpoint_loss("mlp", sa, apply(spec, perm, sb), task, width=128)
    assert naive > 0.05
    assert aligned < 0.3 * naive


def test_reset_bn_stats_equals_the_data_statistics(trained, task):
    state = trained("cnn", 0, 2, width=6)
    model = _model("cnn", state, width=6)
    batches = [x for x, _ in task.batches("train", batch_size=400)]
    reset_bn_stats(model, batches)
    captured = []
    conv = model.features[0][0]
    hook = conv.register_forward_hook(lambda m, a, out: captured.append(out.detach().double()))
    with torch.no_grad():
        for x in batches:
            model(x)
    hook.remove()
    acts = torch.cat(captured).transpose(0, 1).reshape(6, -1).numpy()
    bn = model.features[0][1]
    np.testing.assert_allclose(bn.running_mean.numpy(), acts.mean(1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), acts.var(1), rtol=1e-4, atol=1e-6)
    # exact: the same as train mode normalizing one batch that holds all the data
    whole = torch.cat(batches)
    with torch.no_grad():
        eval_out = model(whole)
        model.train()
        train_out = model(whole)
    assert (eval_out - train_out).abs().max().item() < 1e-4


def _unit_stats(model, module, x, channel_dim):
    out = []
    hook = module.register_forward_hook(lambda m, a, y: out.append(y.detach().double()))
    with torch.no_grad():
        model(x)
    hook.remove()
    y = out[0].movedim(channel_dim, -1).reshape(-1, out[0].shape[channel_dim]).numpy()
    return y.mean(0), y.std(0)


@pytest.mark.parametrize("name,options,points", [
    ("cnn", {"width": 6}, [("features.0.1", 1), ("features.1.1", 1), ("features.3.1", 1)]),
    ("mlp", {"width": 32}, [("layers.0", 1), ("layers.1", 1)]),
])
def test_repair_restores_interpolated_unit_statistics(name, options, points, trained, task):
    sa, sb = trained(name, 0, 3, **options), trained(name, 1, 3, **options)
    ma, mb = _model(name, sa, **options), _model(name, sb, **options)
    alpha = 0.3
    merged = _model(name, {k: torch.lerp(sa[k], sb[k], alpha) if sa[k].is_floating_point() else sa[k] for k in sa},
                    **options)
    x = next(task.batches("train"))[0]
    repair(merged, ma, mb, [x], alpha=alpha)
    modules_a, modules_b, modules_m = (dict(m.named_modules()) for m in (ma, mb, merged))
    for point, dim in points:
        mean_a, std_a = _unit_stats(ma, modules_a[point], x, dim)
        mean_b, std_b = _unit_stats(mb, modules_b[point], x, dim)
        mean_m, std_m = _unit_stats(merged, modules_m[point], x, dim)
        np.testing.assert_allclose(mean_m, (1 - alpha) * mean_a + alpha * mean_b, atol=1e-4)
        np.testing.assert_allclose(std_m, (1 - alpha) * std_a + alpha * std_b, atol=1e-4)


def test_repair_helps_the_aligned_cnn(trained, task):
    sa, sb = trained("cnn", 0, 6, width=8), trained("cnn", 1, 6, width=8)
    ma = _model("cnn", sa, width=8)
    spec = permutation_spec(ma, torch.randn(2, 64))
    sb_aligned = apply(spec, weight_matching(spec, sa, sb), sb)
    mb_aligned = _model("cnn", sb_aligned, width=8)
    mid = {k: (sa[k] + sb_aligned[k]) / 2 if sa[k].is_floating_point() else sa[k] for k in sa}
    batches = [x for x, _ in task.batches("train")]
    plain = task.evaluate(_model("cnn", mid, width=8))["accuracy"]
    reset = task.evaluate(reset_bn_stats(_model("cnn", mid, width=8), batches))["accuracy"]
    repaired = task.evaluate(repair(_model("cnn", mid, width=8), ma, mb_aligned, batches))["accuracy"]
    assert repaired >= reset - 0.01 and repaired > plain
