"""ZipIt! partial zipping (``zipit(..., unmerged=K)``) against closed forms and a numpy reference.

- every group unmerged: the widened model *is* the output ensemble (1 - alpha) f_A + alpha f_B;
- any cut, B a permuted copy of A: the zipped trunk recovers A and both tails compute A, so the
  widened model is A (functional equivalence);
- a 2-hidden-layer MLP: widened weights equal a numpy re-implementation (numpy activations,
  Pearson correlation, greedy pairing, M/U matrices, block-diagonal tails);
- parameter counts follow the closed form of the widened MLP;
- layers that fix their unit count (attention heads, LayerNorm, GroupNorm groups) are one-line errors.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import mergescope as ms
from mergescope.align import permutation_spec, random_permutation
from mergescope.align.partial import zipped_model
from mergescope.align.repair import reset_bn_stats
from mergescope.align.zipit import zipit
from mergescope.errors import MergescopeError

torch.set_num_threads(1)

X = torch.randn(300, 64, generator=torch.Generator().manual_seed(0))


def _with_bn_stats(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm running statistics (one train-mode pass on shifted data), then eval."""
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
        model(x)
    return model.eval()


def _pair(name: str, **options) -> tuple[nn.Module, nn.Module]:
    a = _with_bn_stats(ms.tasks.build(name, seed=0, **options), 10)
    b = _with_bn_stats(ms.tasks.build(name, seed=1, **options), 11)
    return a, b


def _groups(spec) -> int:
    return len(spec.perms)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_all_groups_unmerged_is_the_output_ensemble_mlp(alpha):
    a, b = _pair("mlp", width=12)
    spec = permutation_spec(a, X[:2])
    result = zipit(spec, a, b, [X], alpha=alpha, unmerged=_groups(spec))
    with torch.no_grad():
        out = zipped_model(a, result.state).eval()(X)
        expected = (1 - alpha) * a(X) + alpha * b(X)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("name,options", [("cnn", {"width": 4}), ("resnet", {"width": 4})])
def test_all_groups_unmerged_is_the_ensemble_with_batchnorm(name, options):
    a, b = _pair(name, **options)
    spec = permutation_spec(a, X[:2])
    k = _groups(spec)
    kept = zipit(spec, a, b, [X], unmerged=k, reset_bn=False)
    with torch.no_grad():
        assert torch.allclose(zipped_model(a, kept.state).eval()(X), (a(X) + b(X)) / 2, atol=1e-5)
    # with a BatchNorm reset, each half sees exactly its own model's data statistics
    reset = zipit(spec, a, b, [X], unmerged=k, reset_bn=True)
    ra, rb = reset_bn_stats(copy.deepcopy(a), [X]), reset_bn_stats(copy.deepcopy(b), [X])
    with torch.no_grad():
        assert torch.allclose(zipped_model(a, reset.state).eval()(X), (ra(X) + rb(X)) / 2, atol=1e-4)


@pytest.mark.parametrize("name,options", [("mlp", {"width": 10}), ("cnn", {"width": 4}), ("resnet", {"width": 4})])
def test_every_cut_of_a_permuted_copy_is_the_model(name, options):
    a, _ = _pair(name, **options)
    spec = permutation_spec(a, X[:2])
    perm = random_permutation(spec, generator=torch.Generator().manual_seed(3), state=a.state_dict())
    b = copy.deepcopy(a)
    b.load_state_dict(ms.align.apply(spec, perm, a.state_dict()))
    with torch.no_grad():
        ref = a(X)
    for k in range(_groups(spec) + 1):
        result = zipit(spec, a, b, [X], allow_within=False, reset_bn=False, unmerged=k)
        with torch.no_grad():
            out = zipped_model(a, result.state).eval()(X)
        assert torch.allclose(out, ref, atol=1e-4), k


def test_unmerged_zero_is_the_full_zip():
    a, b = _pair("cnn", width=4)
    spec = permutation_spec(a, X[:2])
    full, zero = zipit(spec, a, b, [X]), zipit(spec, a, b, [X], unmerged=0)
    assert full.info == zero.info
    assert all(torch.equal(full.state[k], zero.state[k]) for k in full.state)
    assert all(zero.state[k].shape == t.shape for k, t in a.state_dict().items())


# ---- numpy reference for a 2-hidden-layer MLP ----------------------------------------------

def _np_greedy(corr: np.ndarray) -> list[tuple[int, int]]:
    """Repeatedly take the most correlated remaining pair (i < j)."""
    score = np.where(np.triu(np.ones_like(corr, dtype=bool), k=1), corr, -np.inf)
    pairs = []
    for _ in range(len(corr) // 2):
        i, j = np.unravel_index(np.argmax(score), score.shape)
        pairs.append((int(i), int(j)))
        score[[i, j], :] = -np.inf
        score[:, [i, j]] = -np.inf
    return sorted(pairs)


def _np_merge_unmerge(pairs, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """M (n x 2n): cross pairs (1-alpha) A + alpha B, same-model pairs their mean; U (2n x n) copies back."""
    m, u = np.zeros((n, 2 * n)), np.zeros((2 * n, n))
    for k, (i, j) in enumerate(pairs):
        if (i < n) != (j < n):
            m[k, i], m[k, j] = (1 - alpha, alpha) if i < n else (alpha, 1 - alpha)
        else:
            m[k, i] = m[k, j] = 0.5
        u[i, k] = u[j, k] = 1.0
    return m, u


def _np_reference(sa: dict, sb: dict, x: np.ndarray, unmerged: int, alpha: float) -> dict[str, np.ndarray]:
    w = {k: (sa[k].double().numpy(), sb[k].double().numpy()) for k in sa}
    relu = lambda t: np.maximum(t, 0)  # noqa: E731
    acts = []
    for model in (0, 1):
        h0 = relu(x @ w["layers.0.weight"][model].T + w["layers.0.bias"][model])
        h1 = relu(h0 @ w["layers.1.weight"][model].T + w["layers.1.bias"][model])
        acts.append((h0, h1))
    n = w["layers.0.bias"][0].shape[0]
    mats = []
    for layer in (0, 1):
        if layer >= 2 - unmerged:
            mats.append((np.eye(2 * n), np.eye(2 * n)))
            continue
        corr = np.corrcoef(np.concatenate([acts[0][layer], acts[1][layer]], axis=1), rowvar=False)
        np.fill_diagonal(corr, -np.inf)
        mats.append(_np_merge_unmerge(_np_greedy(corr), n, alpha))
    (m0, u0), (m1, u1) = mats
    stack = lambda k: np.concatenate(w[k], axis=0)  # noqa: E731
    blockdiag = np.block([[w["layers.1.weight"][0], np.zeros((n, n))], [np.zeros((n, n)), w["layers.1.weight"][1]]])
    head = np.concatenate([(1 - alpha) * w["head.weight"][0], alpha * w["head.weight"][1]], axis=1)
    return {"layers.0.weight": m0 @ stack("layers.0.weight"), "layers.0.bias": m0 @ stack("layers.0.bias"),
            "layers.1.weight": m1 @ blockdiag @ u0, "layers.1.bias": m1 @ stack("layers.1.bias"),
            "head.weight": head @ u1, "head.bias": (1 - alpha) * w["head.bias"][0] + alpha * w["head.bias"][1]}


@pytest.mark.parametrize("unmerged", [0, 1, 2])
def test_widened_mlp_weights_equal_a_numpy_reference(unmerged):
    a, b = ms.tasks.build("mlp", seed=0, width=8).eval(), ms.tasks.build("mlp", seed=1, width=8).eval()
    spec = permutation_spec(a, X[:2])
    result = zipit(spec, a, b, [X], alpha=0.4, unmerged=unmerged)
    ref = _np_reference(a.state_dict(), b.state_dict(), X.double().numpy(), unmerged, alpha=0.4)
    for k, expected in ref.items():
        got = result.state[k].double().numpy()
        assert got.shape == expected.shape, k
        assert np.allclose(got, expected, atol=1e-5), k


@pytest.mark.parametrize("unmerged", [0, 1, 2])
def test_parameter_count_follows_the_widened_closed_form(unmerged):
    n, d, c = 8, 64, 10
    a, b = ms.tasks.build("mlp", seed=0, width=n), ms.tasks.build("mlp", seed=1, width=n)
    spec = permutation_spec(a, X[:2])
    result = zipit(spec, a, b, [X], unmerged=unmerged)
    w0, w1 = (2 * n if unmerged == 2 else n), (2 * n if unmerged >= 1 else n)  # widths of the two hidden layers
    stored = w0 * d + w0 + w1 * w0 + w1 + c * w1 + c
    assert result.info.get("parameters", stored) == stored
    model = zipped_model(a, result.state)
    assert sum(p.numel() for p in model.parameters()) == stored
    if unmerged == 2:  # layers.1 is block-diagonal (2 n^2 structural zeros): two whole models, one head bias
        one = sum(p.numel() for p in a.parameters())
        assert result.info["two_branch_parameters"] == stored - 2 * n * n == 2 * one - c
        assert int((result.state["layers.1.weight"] == 0).sum()) >= 2 * n * n
    elif unmerged == 1:
        assert result.info["two_branch_parameters"] == stored
    assert model.layers[1].in_features == w0 and model.layers[1].out_features == w1


def test_unmerged_grows_the_model_monotonically_with_k():
    a, b = _pair("resnet", width=4)
    spec = permutation_spec(a, X[:2])
    counts = [sum(t.numel() for t in zipit(spec, a, b, [X], unmerged=k, reset_bn=False).state.values()
                  if t.is_floating_point()) for k in range(_groups(spec) + 1)]
    assert counts == sorted(counts) and counts[0] < counts[-1]


# ---- errors ------------------------------------------------------------------------------------

def test_attention_groups_cannot_be_widened():
    a, b = (ms.tasks.build("transformer", seed=s, dim=8, heads=2).eval() for s in (0, 1))
    spec = permutation_spec(a, X[:2])
    zipit(spec, a, b, [X[:64]], unmerged=1)  # the last FFN hidden group is plain Linear layers
    with pytest.raises(MergescopeError, match=r"attention unit group 'blocks\.1\.attn\.\w+'.*unmerged <= 1"):
        zipit(spec, a, b, [X[:64]], unmerged=2)


class _LayerNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(64, 6), nn.LayerNorm(6), nn.Linear(6, 10)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.fc(x))))


class _GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(4, 4), nn.Linear(4 * 64, 10)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.norm(self.conv(x.reshape(-1, 1, 8, 8)))), 1))


def test_layernorm_in_the_tail_is_an_error_naming_the_layer():
    torch.manual_seed(0)
    a, b = _LayerNormNet().eval(), _LayerNormNet().eval()
    spec = permutation_spec(a, X[:2])
    with pytest.raises(MergescopeError, match=r"layer 'norm' \(LayerNorm\)"):
        zipit(spec, a, b, [X], unmerged=1)


def test_groupnorm_that_would_silently_change_is_an_error():
    torch.manual_seed(0)
    a, b = _GroupNormNet().eval(), _GroupNormNet().eval()
    spec = permutation_spec(a, X[:2])
    with pytest.raises(MergescopeError, match="does not compute the same function"):
        zipit(spec, a, b, [X], unmerged=1)


def test_unmerged_out_of_range_names_the_groups():
    a, b = ms.tasks.build("mlp", seed=0, width=8), ms.tasks.build("mlp", seed=1, width=8)
    spec = permutation_spec(a, X[:2])
    with pytest.raises(MergescopeError, match=r"from 0 to 2 .*layers\.1\.weight:0"):
        zipit(spec, a, b, [X], unmerged=3)


# ---- CLI ---------------------------------------------------------------------------------------

def test_cli_writes_the_widened_checkpoint(tmp_path, capsys):
    from mergescope.cli import main
    from mergescope.io import load, save
    from mergescope.tasks.checkpoints import model_metadata

    paths = []
    for seed in (0, 1):
        m = ms.tasks.build("mlp", seed=seed, width=8)
        paths.append(tmp_path / f"m{seed}.safetensors")
        save(m.state_dict(), paths[-1], metadata=model_metadata("mlp", {"width": 8, "depth": 2}))
    out = tmp_path / "zip.safetensors"
    assert main(["align", str(paths[0]), str(paths[1]), "-o", str(out), "--method", "zipit", "--unmerged", "1"]) == 0
    assert "unmerged" in capsys.readouterr().out
    a, b = (ms.tasks.build("mlp", width=8) for _ in range(2))
    a.load_state_dict(dict(load(paths[0])))
    b.load_state_dict(dict(load(paths[1])))
    spec = permutation_spec(a, X[:2])
    expected = zipit(spec, a, b, ms.tasks.digits().batches("train", batch_size=512), unmerged=1).state
    written = load(out)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    record = json.loads(written.metadata["partial_zip"])
    assert record["model"]["name"] == "mlp" and record["unmerged"] == ["layers.1.weight:0"]
    assert "model" not in written.metadata  # the widened state no longer fits the recorded architecture
    rebuilt = zipped_model(ms.tasks.make_model(record["model"]["name"], **record["model"]["options"]), written).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(X), zipped_model(a, expected).eval()(X))
    assert main(["align", str(paths[0]), str(paths[1]), "-o", str(tmp_path / "w.safetensors"),
                 "--method", "weight", "--unmerged", "1"]) == 2
