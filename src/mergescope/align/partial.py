"""Partial zipping (Stoica et al. 2024, "ZipIt!", Sec. 4.3): zip the first layers, keep the last ones unmerged.

Zipping a unit group replaces its 2n features (A's n stacked on B's n) by n merged ones with a
merge matrix M (n x 2n) and an unmerge matrix U (2n x n). Leaving a group unmerged is the same
operation with M = U = I_2n: its layers become block-diagonal [W_A (+) W_B], the layer that
reads it from a zipped group becomes [W_A; W_B] U_cut, and the output layer, which only reads
unit axes, becomes (1 - alpha) W_A (+) alpha W_B, i.e. the weighted sum of the two models' logits.
The result is a *widened state* of the same architecture (2n units in every unmerged group):
a shared trunk and two tails whose outputs are averaged. With every group unmerged it is exactly
the output ensemble (1 - alpha) f_A + alpha f_B.

"Last" follows the order in which the run first binds unit groups to parameters (the layer
that creates them), so ``unmerged=K`` is defined for any traced model. Widening works
for layers whose forward reads sizes from their tensors (Linear, Conv, BatchNorm, pooling,
flatten, residual additions); layers that fix a unit count at construction (LayerNorm's
normalized_shape, attention head counts, GroupNorm groups) cannot run widened, which
``check_widening`` turns into an error naming the layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import MergescopeError
from .spec import PermutationSpec

# Layers whose size attributes we keep in step with their widened tensors (only for a truthful repr).
_SIZE_ATTRS = {nn.Linear: ("out_features", "in_features"),
               nn.Conv1d: ("out_channels", "in_channels"), nn.Conv2d: ("out_channels", "in_channels"),
               nn.Conv3d: ("out_channels", "in_channels")}


def unit_order(tracer, spec: PermutationSpec) -> list[str]:
    """Unit groups of ``spec`` in the order the run first binds them to a parameter axis.

    A group is created by the layer whose output channels it is (weight axis 0); every layer that
    reads it runs later, so this is the forward order of the layers that create the groups. It
    also sees groups inside leaf modules (attention), whose inner values the trace does not keep.
    Groups the run never binds (a hand-written spec naming other tensors) come first, so they are
    never counted among the last layers.
    """
    perm_of = {}
    for (tensor, axis), label in tracer.bound.items():
        g = tracer.single_group(label)
        if g is None:
            continue
        for p, entries in spec.perms.items():
            if (tensor, axis) in entries:
                perm_of.setdefault(tracer.groups.find(g), p)
    first: dict[str, int] = {}
    for i, label in enumerate(tracer.bound.values()):
        for seg in label:
            for g, _ in seg:
                p = perm_of.get(tracer.groups.find(g))
                if p is not None:
                    first.setdefault(p, i)
    position = {p: k for k, p in enumerate(spec.perms)}
    return sorted(spec.perms, key=lambda p: (first.get(p, -1), position[p]))


def tail_groups(order: list[str], unmerged: int) -> list[str]:
    """The last ``unmerged`` groups of ``order`` (0 <= unmerged <= len(order))."""
    if isinstance(unmerged, bool) or not isinstance(unmerged, int) or not 0 <= unmerged <= len(order):
        raise MergescopeError(f"zipit: unmerged={unmerged!r} must be an integer from 0 to {len(order)} "
                              f"(the model has {len(order)} unit groups: {', '.join(order)})")
    return order[len(order) - unmerged:]


def check_attention(spec: PermutationSpec, order: list[str], tail: list[str]) -> None:
    """Attention unit groups cannot be widened: the module splits its features into a fixed head count."""
    coupled = {p for group in spec.heads.values() for p in group}
    bad = [p for p in tail if spec.blocks.get(p, 1) > 1 or p in coupled or p in spec.heads]
    if not bad:
        return
    last_bad = max(order.index(p) for p in bad)
    tensors = ", ".join(repr(t) for t, _ in spec.perms[bad[-1]][:2])
    raise MergescopeError(
        f"zipit: unmerged={len(tail)} would widen attention unit group {bad[-1]!r} ({tensors}); an attention "
        f"module splits its features into a head count fixed at construction; use unmerged <= {len(order) - 1 - last_bad}")


def zipped_model(template: nn.Module, state) -> nn.Module:
    """A copy of ``template`` holding ``state``'s tensors whatever their shapes (the widened model).

    Why a copy and not ``torch.func.functional_call``: the copy owns its tensors, so BatchNorm
    statistics can be reset in place, ``state_dict()`` returns the widened state, and
    ``task.evaluate(model)`` works unchanged.
    """
    model = copy.deepcopy(template)
    expected = set(model.state_dict())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise MergescopeError(f"zipped_model: the state does not fit {type(template).__name__} "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, t in state.items():
        path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(path)
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            owner._parameters[leaf] = nn.Parameter(t.detach().clone(), requires_grad=old.requires_grad)
        else:
            owner._buffers[leaf] = t.detach().clone()
    for module in model.modules():
        _sync_sizes(module)
    return model


def _sync_sizes(module: nn.Module) -> None:
    attrs = next((a for cls, a in _SIZE_ATTRS.items() if type(module) is cls), None)
    if attrs is not None and getattr(module, "groups", 1) == 1:
        setattr(module, attrs[0], module.weight.shape[0])
        setattr(module, attrs[1], module.weight.shape[1] * getattr(module, "groups", 1))
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
        module.num_features = module.running_mean.shape[0]


def parameter_counts(template: nn.Module, state, spec: PermutationSpec, tail: list[str]) -> dict[str, int]:
    """Stored parameters of the widened state, and what a trunk + two-tails implementation stores.

    A tensor whose output axis (axis 0) and an input axis both carry unmerged groups is
    block-diagonal [W_A (+) W_B]: half of its entries are structural zeros a two-branch model
    does not store.
    """
    unmerged_axes: dict[str, set[int]] = {}
    for p in tail:
        for tensor, axis in spec.perms[p]:
            unmerged_axes.setdefault(tensor, set()).add(axis)
    stored = branches = 0
    for name, _ in template.named_parameters():
        n, axes = state[name].numel(), unmerged_axes.get(name, set())
        stored += n
        branches += n // 2 if 0 in axes and len(axes) > 1 else n
    return {"parameters": stored, "two_branch_parameters": branches}


@torch.no_grad()
def check_widening(template: nn.Module, widened_state, x: torch.Tensor, tail: list[str]) -> None:
    """Run the widened model built from (A, A) and require A's outputs; otherwise name the layer.

    Zipping a model with itself along the identity pairing gives back the model at every cut, so
    a mismatch or a failure means some layer in the tail depends on the unit count.
    """
    model = zipped_model(template, widened_state).eval()
    stack: list[str] = []
    failed: list[str] = []
    hooks = []

    def leave(module, args, out) -> None:
        stack.pop()

    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))
        hooks.append(module.register_forward_hook(leave))
    try:
        out = model(x)
    except (RuntimeError, ValueError, IndexError) as err:
        failed = list(stack)
        where = failed[-1] if failed else "<model>"
        kind = type(model.get_submodule(where)).__name__ if failed else type(model).__name__
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MergescopeError(f"zipit: unmerged={len(tail)} widens layer {where!r} ({kind}), which cannot run "
                              f"with 2x units ({reason}); use a smaller unmerged") from None
    finally:
        for h in hooks:
            h.remove()
    was_training = template.training
    template.eval()
    try:
        ref = template(x)
    finally:
        template.train(was_training)
    scale = 1e-4 * max(1.0, float(ref.abs().max()))
    if out.shape != ref.shape or float((out - ref).abs().max()) > scale:
        raise MergescopeError(f"zipit: unmerged={len(tail)} widens unit group(s) {', '.join(tail)}, but the widened "
                              "model does not compute the same function (an operation fixes the unit count, e.g. "
                              "GroupNorm groups or a reshape into heads); use a smaller unmerged")


def widened_template(template: nn.Module, x: torch.Tensor, unmerged: int) -> tuple[nn.Module, list[str]]:
    """(the module a partial zip of ``template`` with its last ``unmerged`` unit groups fits, those groups).

    Why: a partial-zip checkpoint's tensors are wider than its base model's, so rebuilding it from a
    record needs the widths. They follow from the architecture alone: ``template`` zipped with itself
    (identity pairing, the tail unmerged) has them; its values are replaced when the file is loaded.
    An ``unmerged`` the model cannot take (too many groups, attention, a fixed unit count) is one line.
    """
    from .trace import permutation_spec, trace_model
    from .zipit import merge_unmerge, zip_state

    state = template.state_dict()
    spec = permutation_spec(template, x).with_sizes(state)
    order = unit_order(trace_model(template, x, on_unsupported="fix"), spec)
    tail = tail_groups(order, unmerged)
    check_attention(spec, order, tail)
    ops = {p: None if p in tail else merge_unmerge([(i, n + i) for i in range(n)], n, 0.5) for p, n in spec.sizes.items()}
    widened = zip_state(spec, state, state, ops, 0.5)
    check_widening(template, widened, x, tail)
    return zipped_model(template, widened), tail
