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
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MergescopeError
from .spec import PermutationSpec

FIXED = 0

ELEMENTWISE = {
    "add", "sub", "mul", "div", "true_divide", "rsub", "pow", "neg", "abs", "relu", "relu6", "gelu", "silu",
    "sigmoid", "tanh", "elu", "selu", "celu", "leaky_relu", "hardtanh", "hardswish", "hardsigmoid", "softplus",
    "mish", "exp", "log", "sqrt", "rsqrt", "square", "clamp", "clip", "where", "masked_fill", "dropout",
    "alpha_dropout", "feature_alpha_dropout", "to", "float", "half", "double", "bfloat16", "type_as", "type",
    "contiguous", "clone", "detach", "requires_grad", "erf", "sin", "cos", "reciprocal", "maximum", "minimum",
    "lerp", "addcmul", "addcdiv", "sign", "floor", "ceil", "round", "eq", "ne", "lt", "gt", "le", "ge",
    "logical_not", "logical_and", "logical_or", "and", "or", "xor", "invert", "bool", "int", "long", "fill",
    "zero", "copy", "cpu", "cuda", "softmax", "log_softmax", "identity", "floordiv", "mod", "remainder",
    "nan_to_num", "expm1", "log1p", "sinh", "cosh", "logsigmoid", "data",
}
REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "nansum", "nanmean"}
POOLING = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
           "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "max_pool2d_with_indices",
           "lp_pool2d", "interpolate", "upsample"}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze"}
TRANSPOSES = {"permute", "transpose", "t", "T", "mT", "swapaxes", "swapdims", "movedim", "moveaxis"}
IGNORED = {"dim", "size", "numel", "get", "len", "is_floating_point", "is_contiguous", "data_ptr", "element_size",
           "stride", "storage_offset", "is_complex", "nelement", "ndimension", "item", "tolist", "has_torch_function",
           "requires_grad_", "retain_grad", "register_hook", "is_nonzero", "is_leaf", "format", "repr", "bool_",
           "set_", "apply_", "dtype", "device", "shape", "grad_fn", "names"}


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


class UnitGroups:
    """Union-find over unit groups; group 0 is FIXED and absorbs anything joined to it."""

    def __init__(self):
        self.parent = [0]
        self.size = [0]
        self.name: list[str | None] = [None]

    def new(self, size: int, name: str | None = None) -> int:
        if size <= 1:  # a single unit has nothing to permute
            return FIXED
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.name.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] == 1 or self.size[rb] == 1:  # a single unit has nothing to permute
            self.parent[ra] = self.parent[rb] = FIXED
            return
        if ra == FIXED or rb == FIXED or self.size[ra] != self.size[rb]:
            for r in (ra, rb):
                self.parent[r] = FIXED
            return
        keep, drop = (ra, rb) if ra < rb else (rb, ra)
        self.parent[drop] = keep
        self.name[keep] = self.name[keep] or self.name[drop]

    def is_fixed(self, g: int) -> bool:
        return self.find(g) == FIXED


def fixed_dim(size: int) -> tuple:
    return (((FIXED, size),),)


def dim_size(label: tuple) -> int:
    return sum(math.prod(s for _, s in seg) for seg in label)


def _canonical(factors) -> tuple:
    """Drop size-1 factors and merge neighbouring FIXED ones, so equal layouts compare equal."""
    out = []
    for g, s in factors:
        if s == 1:
            continue
        if g == FIXED and out and out[-1][0] == FIXED:
            out[-1] = (FIXED, out[-1][1] * s)
        else:
            out.append((g, s))
    return tuple(out) or ((FIXED, 1),)


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
        self.leaf_rules = list(leaf_rules or []) + default_leaf_rules()

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
        return tuple(fixed_dim(s) for s in t.shape)

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
            label = tuple(fixed_dim(s) for s in t.shape)
        if id(t) not in self.labels:
            self.keep.append(t)
        self.labels[id(t)] = label
        self.values.append((t, label))

    def unify(self, a: tuple, b: tuple) -> None:
        """Constrain two dimension labels to hold the same units in the same order."""
        if a is b:
            return
        ca = [_canonical(seg) for seg in a]
        cb = [_canonical(seg) for seg in b]
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
        factors = _canonical(label[0])
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
        name, inplace = _base_name(func)
        if name in IGNORED:
            return out
        tensors_in = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        tensors_out = [t for t in _flat([out]) if isinstance(t, torch.Tensor)]
        if name == "setitem":
            tensors_out = [args[0]]
        if not tensors_out:
            return out
        if all(self.tensor_fixed(t) for t in tensors_in):
            for t in tensors_out:
                self.set_label(t, tuple(fixed_dim(s) for s in t.shape))
            return out
        self.dispatch(name, func, args, kwargs, out, tensors_in, tensors_out)
        return out

    def dispatch(self, name, func, args, kwargs, out, tensors_in, tensors_out) -> None:
        from . import rules

        rule = rules.RULES.get(name)
        if rule is None and name in ELEMENTWISE:
            rule = rules.elementwise
        elif rule is None and name in REDUCTIONS:
            rule = rules.reduction
        elif rule is None and name in POOLING:
            rule = rules.pooling
        elif rule is None and name in RESHAPES:
            rule = rules.reshape
        elif rule is None and name in TRANSPOSES:
            rule = rules.transpose
        if rule is None or rule(self, name, args, kwargs, out) is False:
            self.unsupported_op(name, tensors_in, tensors_out)

    def unsupported_op(self, name: str, tensors_in, tensors_out) -> None:
        """Pin everything the op touches; remember it so ``finish`` can name it if that mattered."""
        involved = [g for t in tensors_in for lab in self.label_of(t) for seg in lab for g, _ in seg
                    if not self.groups.is_fixed(g)]
        where = self.module_stack[-1] if self.module_stack else "<model>"
        shapes = [tuple(t.shape) for t in tensors_in]
        self.unsupported.append((name, f"{where} (inputs {shapes})", involved))
        if self.on_unsupported == "fix":
            for t in tensors_in:
                for lab in self.label_of(t):
                    self.fix(lab)
        for t in tensors_out:
            self.set_label(t, tuple(fixed_dim(s) for s in t.shape))

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
        for t in _flat([out]):
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
        for name, where, involved in self.unsupported:
            if self.on_unsupported == "error" and any(not self.groups.is_fixed(g) for g in involved):
                raise MergescopeError(
                    f"permutation_spec: unsupported operation {name!r} in {where} acts on a permutable axis; "
                    "write the spec by hand or pass on_unsupported='fix' to keep those axes in place")
        for head, _, coupled in self.heads:
            if any(self.groups.is_fixed(g) for g in coupled):
                self.groups.union(head, FIXED)
        names: dict[int, str] = {}

        def perm_name(g: int, hint: str) -> str:
            root = self.groups.find(g)
            if root not in names:
                names[root] = self.groups.name[root] or hint
            return names[root]

        perms: dict[str, list] = {}
        sizes: dict[str, int] = {}
        layouts: dict = {}
        for tensor, t in self.state.items():
            for axis in range(t.dim()):
                label = self.bound.get((tensor, axis))
                if label is None or self.is_fixed(label):
                    continue
                hint = f"{tensor}:{axis}"
                segs = tuple(tuple((None if self.groups.is_fixed(g) else perm_name(g, hint), s) for g, s in seg)
                             for seg in label)
                segs = tuple(_canonical_named(seg) for seg in segs)
                used = [f[0] for seg in segs for f in seg if f[0] is not None]
                if not used:
                    continue
                used = [f[0] for seg in segs for f in seg if f[0] is not None]
                for p in dict.fromkeys(used):
                    perms.setdefault(p, []).append((tensor, axis))
                if len(segs) == 1 and len(segs[0]) == 1:
                    sizes[segs[0][0][0]] = segs[0][0][1]
                else:
                    layouts[(tensor, axis)] = segs
                    for seg in segs:
                        for p, s in seg:
                            if p is not None:
                                sizes[p] = s
        blocks, heads = {}, {}
        for head, n_heads, coupled in self.heads:
            cnames = [names.get(self.groups.find(g)) for g in coupled]
            cnames = [c for c in cnames if c is not None]
            for c in cnames:
                blocks[c] = n_heads
            if not self.groups.is_fixed(head) and cnames:
                hname = perm_name(head, f"heads{len(heads)}")
                heads[hname] = tuple(cnames)
                sizes[hname] = n_heads
        return PermutationSpec({p: tuple(e) for p, e in perms.items()}, sizes, layouts, blocks, heads)


def _canonical_named(seg) -> tuple:
    out = []
    for p, s in seg:
        if s == 1:
            continue
        if p is None and out and out[-1][0] is None:
            out[-1] = (None, out[-1][1] * s)
        else:
            out.append((p, s))
    return tuple(out)


def _flat(items) -> list:
    out = []
    for x in items:
        if isinstance(x, (list, tuple)):
            out.extend(_flat(list(x)))
        elif isinstance(x, Mapping):
            out.extend(_flat(list(x.values())))
        elif hasattr(x, "to_tuple") and callable(x.to_tuple):  # Hugging Face ModelOutput
            out.extend(_flat(list(x.to_tuple())))
        else:
            out.append(x)
    return out


def default_leaf_rules() -> list:
    from .attention import ATTENTION_RULES

    return list(ATTENTION_RULES)


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
