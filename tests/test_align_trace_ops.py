"""The tracer's op table: one rule per op name, no import cycle, every op routed or refused by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import mergescope.align as align_pkg
from mergescope.align import apply, permutation_spec, random_permutation, rules
from mergescope.errors import MergescopeError

ALIGN = Path(align_pkg.__file__).parent


class _LikeAfterLinear(nn.Module):
    """Linear -> h + torch.<op>(h) -> ReLU -> Linear (the *_like ops once fell through the table)."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x):
        h = self.a(x)
        h = h + self.op(h)
        return self.b(torch.relu(h))


def _assert_permutation_keeps_outputs(model, x, seed=0):
    spec = permutation_spec(model, x)
    assert spec.perms, "a permutable hidden layer must give a non-empty spec"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
        perm = random_permutation(spec, generator=torch.Generator().manual_seed(seed))
        permuted = apply(spec, perm, state)
        assert any(not torch.equal(permuted[k], state[k]) for k in state)
        model.load_state_dict(permuted)
        after = model(x)
        model.load_state_dict(state)
    assert (after - before).abs().max().item() <= 1e-6
    return spec


def test_zeros_like_after_linear_keeps_the_hidden_permutation():
    torch.manual_seed(0)
    model = _LikeAfterLinear(torch.zeros_like).eval()
    spec = _assert_permutation_keeps_outputs(model, torch.randn(4, 5))
    assert list(spec.perms.values()) == [(("a.weight", 0), ("a.bias", 0), ("b.weight", 1))]


@pytest.mark.parametrize("op", [torch.ones_like, lambda h: torch.empty_like(h).fill_(2.0), lambda h: torch.full_like(h, 0.5),
                                lambda h: torch.zeros_like(h).add_(1.0)])
def test_other_constant_like_ops_are_routed(op):
    torch.manual_seed(1)
    _assert_permutation_keeps_outputs(_LikeAfterLinear(op).eval(), torch.randn(4, 5))


@pytest.mark.parametrize("op, name", [(lambda h: torch.cumsum(h, dim=-1), "cumsum"),
                                      (lambda h: torch.flip(h, dims=[-1]), "flip"),
                                      (lambda h: torch.roll(h, 1, dims=-1), "roll")])
def test_an_op_the_table_lacks_is_refused_by_name(op, name):
    """Before: the unknown op's output was FIXED, ``h + op(h)`` pinned h, and the spec came back
    silently empty. Now a one-line error names the op; ``on_unsupported='fix'`` still pins."""
    model = _LikeAfterLinear(op).eval()
    assert name not in rules.OPS
    with pytest.raises(MergescopeError, match=rf"unsupported operation '{name}' in <model>") as err:
        permutation_spec(model, torch.randn(4, 5))
    assert "\n" not in str(err.value)
    assert permutation_spec(model, torch.randn(4, 5), on_unsupported="fix").perms == {}


def test_an_unknown_op_whose_inputs_end_up_fixed_is_not_an_error():
    """An op on axes that are fixed anyway (here: the model's output) changes nothing: no error."""

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

        def forward(self, x):
            return torch.cumsum(self.b(torch.relu(self.a(x))), dim=0) + self.b(torch.relu(self.a(x)))

    spec = permutation_spec(Tail(), torch.randn(4, 5))
    assert list(spec.perms.values()) == [(("a.weight", 0), ("a.bias", 0), ("b.weight", 1))]


def test_every_op_name_has_exactly_one_rule():
    families = [set(rules.SPECIFIC), rules.UNARY, rules.ELEMENTWISE, rules.REDUCTIONS, rules.POOLING,
                rules.RESHAPES, rules.TRANSPOSES, rules.IGNORED]
    assert sum(len(f) for f in families) == len(rules.OPS)
    assert all(callable(rule) for rule in rules.OPS.values())
    for like in ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like"):
        assert rules.OPS[like] is rules.unary


def _imports(path: Path) -> set[str]:
    """Sibling modules of ``align`` that ``path`` imports, at any depth (function bodies too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out


def test_tracer_modules_import_no_cycle():
    tracer = ["trace", "rules", "attention", "labels"]
    graph = {m: _imports(ALIGN / f"{m}.py") & set(tracer) for m in tracer}
    assert graph["labels"] == set() and graph["rules"] == {"labels"} and graph["attention"] == {"labels"}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph[a])

    assert not any(reaches(m, m) for m in tracer)


def test_dispatch_imports_nothing_per_op():
    """Routing is one dict lookup in ``__torch_function__``: no import statement inside the tracer class."""
    tree = ast.parse((ALIGN / "trace.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LabelTracer"]
    assert not [n for n in ast.walk(cls) if isinstance(n, (ast.Import, ast.ImportFrom))]
