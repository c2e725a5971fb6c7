"""Derive a PermutationSpec by running a model once and following its channel axes.

Why a runtime trace instead of ``torch.fx.symbolic_trace``: Hugging Face models (kwargs-only
wrappers, mask helpers, Python control flow) do not trace symbolically, but every model runs.
A ``TorchFunctionMode`` sees each torch call with its real tensors; we give every dimension of
every value a *label* and let operations constrain labels (a union-find over unit groups):

- a label is a tuple of segments (``cat``), each a tuple of factors ``(group, size)``
  (``flatten`` of channels x space); group 0 is FIXED (must not move);
- ``linear``/``conv`` tie the input channel axis to weight axis 1 and start a new group at
  weight axis 0; norms and element-wise ops tie the axes they combine (residual additions share
  one permutation); reductions drop axes; reshapes merge or split factors;
- the model's inputs and outputs are FIXED, and so are embedding tables;
- known attention modules are leaves with a rule (heads, within-head Q/K and V/O).

Anything it cannot follow on a permutable axis is either an error naming the operation and the
module (default) or, with ``on_unsupported="fix"``, pins those axes (always safe).

Where things live (imports go one way: trace -> rules, attention -> labels):
``labels.py`` the label model (unit groups, labels, flattening); ``rules.py`` the one op table
``OPS`` (op name -> rule; a name not in it is unsupported); ``attention.py`` the leaf rules for
attention modules; this module the mode that routes each call through ``OPS`` and ``finish``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MergescopeError
from .attention import ATTENTION_RULES
from .labels import FIXED, UnitGroups, canonical, canonical_named, dim_size, fixed_dim, fixed_label, flat
from .rules import OPS, ignore
from .spec import PermutationSpec


def _base_name(func) -> tuple[str, bool]:
    """Normalized op name and whether it writes in place (``add_``, ``__iadd__``)."""
    name = getattr(func, "__name__", "") or type(func).__name__
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return getattr(owner, "__name__", "get"), False
    inplace = name.startswith("__i") and name.endswith("__") and name not in ("__index__", "__int__", "__invert__")
    name = name.strip("_")
    if inplace:
        name = name[1:]
    if name.startswith("r") and name[1:] in ("add", "sub", "mul", "truediv", "matmul", "pow", "and", "or", "xor"):
        name = name[1:]
    if name.endswith("_") and not name.endswith("__"):
        name, inplace = name[:-1], True
    return {"truediv": "div", "floordiv": "floordiv", "concat": "cat", "concatenate": "cat"}.get(name, name), inplace


class LabelTracer(TorchFunctionMode):
    """Runs a model, labelling every dimension of every value, and collects the constraints."""

    def __init__(self, model: nn.Module, on_unsupported: str = "error", leaf_rules=None):
        super().__init__()
        if on_unsupported not in ("error", "fix"):
            raise MergescopeError(f"permutation_spec: on_unsupported must be 'error' or 'fix', not {on_unsupported!r}")
        self.model = model
        self.on_unsupported = on_unsupported
        self.groups = UnitGroups()
        self.labels: dict[int, tuple] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids unique while tracing
        self.values: list[tuple[torch.Tensor, tuple]] = []  # op outputs in call order (activation capture)
        self.state = model.state_dict(keep_vars=True)
        self.param_names: dict[int, list[str]] = {}
        for name, t in self.state.items():
            self.param_names.setdefault(id(t), []).append(name)
        self.bound: dict[tuple[str, int], tuple] = {}  # (tensor, axis) -> label
        self.heads: list[tuple[int, int, tuple[int, ...]]] = []  # (head group, n_heads, coupled groups)
        self.unsupported: list[tuple[str, str, list[int]]] = []
        self.module_stack: list[str] = []
        self.suspended = 0
        self.leaf_rules = list(leaf_rules or []) + list(ATTENTION_RULES)

    # ---- labels -------------------------------------------------------------------------
    def param_label(self, name: str, axis: int, size: int, default=None) -> tuple:
        """A parameter axis's label, bound on first use (to ``default`` or a fresh group)."""
        key = (name, axis)
        if key not in self.bound:
            self.bound[key] = default if default is not None else (((self.groups.new(size), size),),)
        return self.bound[key]

    def tie_param(self, t: torch.Tensor, axis: int, label: tuple) -> None:
        """Tie axis ``axis`` of parameter ``t`` to ``label`` (adopting it if unbound)."""
        for name in self.param_names.get(id(t), []):
            key = (name, axis % t.dim())
            if key not in self.bound:
                self.bound[key] = label
            else:
                self.unify(self.bound[key], label)

    def label_of(self, t: torch.Tensor) -> tuple:
        if id(t) in self.labels:
            return self.labels[id(t)]
        names = self.param_names.get(id(t))
        if names:
            lab = tuple(self.param_label(names[0], a, s) for a, s in enumerate(t.shape))
            for other in names[1:]:
                for a, s in enumerate(t.shape):
                    self.unify(self.param_label(other, a, s), lab[a])
            return lab
        return fixed_label(t.shape)

    def tensor_fixed(self, t: torch.Tensor) -> bool:
        """All dims FIXED (an unbound parameter axis counts as free); binds nothing."""
        names = self.param_names.get(id(t))
        if names and id(t) not in self.labels:
            return all((n, a) in self.bound and self.is_fixed(self.bound[(n, a)]) for n in names for a in range(t.dim()))
        return all(self.is_fixed(lab) for lab in self.label_of(t))

    def axis_label(self, t: torch.Tensor, axis: int) -> tuple:
        """Label of one axis of ``t``; an unbound parameter axis gets a fresh group."""
        names = self.param_names.get(id(t))
        if names and id(t) not in self.labels:
            axis %= t.dim()
            lab = self.param_label(names[0], axis, t.shape[axis])
            for other in names[1:]:
                self.tie_param(t, axis, lab)
            return lab
        return self.label_of(t)[axis]

    def tie(self, t: torch.Tensor | None, axis: int, label: tuple) -> None:
        """Constrain axis ``axis`` of ``t`` to ``label``; parameters adopt it on first use."""
        if t is None:
            return
        if self.param_names.get(id(t)) and id(t) not in self.labels:
            self.tie_param(t, axis, label)
        else:
            self.unify(self.label_of(t)[axis], label)

    def set_label(self, t: torch.Tensor, label: tuple) -> None:
        if tuple(dim_size(d) for d in label) != tuple(t.shape):
            label = fixed_label(t.shape)
        if id(t) not in self.labels:
            self.keep.append(t)
        self.labels[id(t)] = label
        self.values.append((t, label))

    def unify(self, a: tuple, b: tuple) -> None:
        """Constrain two dimension labels to hold the same units in the same order."""
        if a is b:
            return
        ca = [canonical(seg) for seg in a]
        cb = [canonical(seg) for seg in b]
        if len(ca) == len(cb) and all(len(x) == len(y) and all(fx[1] == fy[1] for fx, fy in zip(x, y))
                                      for x, y in zip(ca, cb)):
            for x, y in zip(ca, cb):
                for fx, fy in zip(x, y):
                    self.groups.union(fx[0], fy[0])
            return
        self.fix(a)
        self.fix(b)

    def fix(self, label: tuple) -> None:
        for seg in label:
            for g, _ in seg:
                self.groups.union(g, FIXED)

    def is_fixed(self, label: tuple) -> bool:
        return all(self.groups.is_fixed(g) for seg in label for g, _ in seg)

    def single_group(self, label: tuple) -> int | None:
        """The group if the label is exactly one permutable factor, else None."""
        if len(label) != 1:
            return None
        factors = canonical(label[0])
        return factors[0][0] if len(factors) == 1 and factors[0][0] != FIXED else None

    def broadcast(self, tensors: list[torch.Tensor], out_shape) -> tuple:
        """Right-aligned broadcasting of tensors' labels (see ``broadcast_labels``)."""
        return self.broadcast_labels([(self.label_of(t), t.shape) for t in tensors], out_shape)

    def broadcast_labels(self, labelled, out_shape) -> tuple:
        """Right-aligned broadcasting of (label, shape) pairs: tie dims of equal size > 1; the
        output takes their label."""
        out = [None] * len(out_shape)
        for lab, shape in labelled:
            for i in range(1, len(shape) + 1):
                if shape[-i] == 1:
                    continue
                j = len(out_shape) - i
                if out[j] is None:
                    out[j] = lab[-i]
                else:
                    self.unify(out[j], lab[-i])
        return tuple(o if o is not None else fixed_dim(s) for o, s in zip(out, out_shape))

    # ---- the mode ----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suspended:
            return out
        name, _ = _base_name(func)
        rule = OPS.get(name)
        if rule is ignore:
            return out
        tensors_in = [a for a in flat(list(args) + list(kwargs.values())) if isinstance(a, torch.Tensor)]
        tensors_out = [args[0]] if name == "setitem" else [t for t in flat([out]) if isinstance(t, torch.Tensor)]
        if not tensors_out:
            return out
        if all(self.tensor_fixed(t) for t in tensors_in):
            for t in tensors_out:
                self.set_label(t, fixed_label(t.shape))
        elif rule is None or rule(self, name, args, kwargs, out) is False:
            self.unsupported_op(name, tensors_in, tensors_out)
        return out

    def unsupported_op(self, name: str, tensors_in, tensors_out) -> None:
        """An op the table does not follow here. With ``on_unsupported="fix"`` pin everything it
        touches. Otherwise its outputs get fresh groups, so that nothing downstream pins the inputs
        silently (``h + f(h)``); ``finish`` names the op if any group it touched is still free."""
        involved = [g for t in tensors_in for g in self.free_groups(t)]
        where = (self.module_stack[-1] if self.module_stack else "") or "<model>"  # the root module is ""
        shapes = [tuple(t.shape) for t in tensors_in]
        if self.on_unsupported == "fix":
            for t in tensors_in:
                for lab in self.label_of(t):
                    self.fix(lab)
            for t in tensors_out:
                self.set_label(t, fixed_label(t.shape))
        else:
            for t in tensors_out:
                fresh = tuple((((self.groups.new(s), s),),) for s in t.shape)
                self.set_label(t, fresh)
                involved += [g for lab in fresh for seg in lab for g, _ in seg if g != FIXED]
        self.unsupported.append((name, f"{where} (inputs {shapes})", involved))

    def free_groups(self, t: torch.Tensor) -> list[int]:
        return [g for lab in self.label_of(t) for seg in lab for g, _ in seg if not self.groups.is_fixed(g)]

    # ---- running ---------------------------------------------------------------------
    def run(self, *inputs, **kw_inputs):
        """Run the model on the example input under the mode; outputs are FIXED."""
        hooks = []
        for qname, module in self.model.named_modules():
            rule = next((r for r in self.leaf_rules if r.matches(module)), None)
            hooks.append(module.register_forward_pre_hook(self._enter(qname, rule), with_kwargs=True))
            hooks.append(module.register_forward_hook(self._leave(qname, module, rule), with_kwargs=True))
        try:
            with torch.no_grad(), self:
                out = self.model(*inputs, **kw_inputs)
        finally:
            for h in hooks:
                h.remove()
        for t in flat([out]):
            if isinstance(t, torch.Tensor):
                for lab in self.label_of(t):
                    self.fix(lab)
        return out

    def _enter(self, qname, rule):
        def hook(module, args, kwargs):
            if self.suspended:
                return None
            self.module_stack.append(qname)
            if rule is not None:
                self.suspended += 1
            return None
        return hook

    def _leave(self, qname, module, rule):
        def hook(mod, args, kwargs, out):
            if not self.module_stack or self.module_stack[-1] != qname:
                return None
            self.module_stack.pop()
            if rule is not None:
                self.suspended -= 1
                if not self.suspended:
                    rule.apply(self, qname, module, args, kwargs, out)
            return None
        return hook

    # ---- result ----------------------------------------------------------------------
    def finish(self) -> PermutationSpec:
        """Turn the surviving (non-FIXED) groups into a PermutationSpec."""
        self.check_unsupported()
        self.pin_broken_heads()
        names: dict[int, str] = {}
        perms, sizes, layouts = self.collect_axes(names)
        blocks, heads = self.collect_heads(names, sizes)
        return PermutationSpec({p: tuple(e) for p, e in perms.items()}, sizes, layouts, blocks, heads)

    def check_unsupported(self) -> None:
        """Step 1: an op the table could not follow that touched a still-free group is an error."""
        if self.on_unsupported != "error":
            return
        for name, where, involved in self.unsupported:
            if any(not self.groups.is_fixed(g) for g in involved):
                raise MergescopeError(
                    f"permutation_spec: unsupported operation {name!r} in {where} acts on a permutable axis; "
                    "write the spec by hand or pass on_unsupported='fix' to keep those axes in place")

    def pin_broken_heads(self) -> None:
        """Step 2: heads move only while every within-head group they couple may move."""
        for head, _, coupled in self.heads:
            if any(self.groups.is_fixed(g) for g in coupled):
                self.groups.union(head, FIXED)

    def perm_name(self, names: dict[int, str], g: int, hint: str) -> str:
        """The permutation's name for group ``g``: the group's own name, else the first hint seen."""
        root = self.groups.find(g)
        if root not in names:
            names[root] = self.groups.name[root] or hint
        return names[root]

    def named_label(self, names: dict[int, str], tensor: str, axis: int, label: tuple) -> tuple:
        """A label as segments of ``(perm name or None, size)`` factors (None: FIXED)."""
        hint = f"{tensor}:{axis}"
        return tuple(canonical_named(tuple((None if self.groups.is_fixed(g) else self.perm_name(names, g, hint), s)
                                           for g, s in seg)) for seg in label)

    def collect_axes(self, names: dict[int, str]) -> tuple[dict, dict, dict]:
        """Step 3: every parameter/buffer axis with a free group -> perms, sizes, layouts."""
        perms: dict[str, list] = {}
        sizes: dict[str, int] = {}
        layouts: dict = {}
        for tensor, t in self.state.items():
            for axis in range(t.dim()):
                label = self.bound.get((tensor, axis))
                if label is None or self.is_fixed(label):
                    continue
                segs = self.named_label(names, tensor, axis, label)
                used = [p for seg in segs for p, _ in seg if p is not None]
                if not used:
                    continue
                for p in dict.fromkeys(used):
                    perms.setdefault(p, []).append((tensor, axis))
                if len(segs) == 1 and len(segs[0]) == 1:
                    sizes[segs[0][0][0]] = segs[0][0][1]
                else:
                    layouts[(tensor, axis)] = segs
                    sizes.update((p, s) for seg in segs for p, s in seg if p is not None)
        return perms, sizes, layouts

    def collect_heads(self, names: dict[int, str], sizes: dict[str, int]) -> tuple[dict, dict]:
        """Step 4: head groups and the within-head groups they move in blocks (adds head sizes)."""
        blocks, heads = {}, {}
        for head, n_heads, coupled in self.heads:
            cnames = [names.get(self.groups.find(g)) for g in coupled]
            cnames = [c for c in cnames if c is not None]
            for c in cnames:
                blocks[c] = n_heads
            if not self.groups.is_fixed(head) and cnames:
                hname = self.perm_name(names, head, f"heads{len(heads)}")
                heads[hname] = tuple(cnames)
                sizes[hname] = n_heads
        return blocks, heads


def trace_model(model: nn.Module, example_input, on_unsupported: str = "error", leaf_rules=None) -> LabelTracer:
    """Run ``model`` on ``example_input`` (a tensor, tuple of args, or dict of kwargs) under the tracer."""
    tracer = LabelTracer(model, on_unsupported=on_unsupported, leaf_rules=leaf_rules)
    was_training = model.training
    model.eval()
    try:
        if isinstance(example_input, Mapping):
            tracer.run(**example_input)
        elif isinstance(example_input, (tuple, list)):
            tracer.run(*example_input)
        else:
            tracer.run(example_input)
    finally:
        model.train(was_training)
    return tracer


def permutation_spec(model: nn.Module, example_input, on_unsupported: str = "error", leaf_rules=None
                     ) -> PermutationSpec:
    """Which axes of ``model``'s parameters and buffers may be permuted together, found by running it once.

    ``example_input``: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    ``leaf_rules``: extra rules for custom modules (see ``align.attention.AttentionRule``).
    """
    return trace_model(model, example_input, on_unsupported, leaf_rules).finish()
