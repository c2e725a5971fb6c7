"""How each torch operation moves unit labels: the tracer's one op table, ``OPS`` (see ``trace.py``).

A rule reads the op's inputs' labels, adds constraints, labels the outputs, and returns None;
returning False means "cannot follow this call" (the tracer reports or pins it). ``OPS`` maps
every op name the tracer follows to exactly one rule (``ignore`` for calls that make no values);
a name missing from it is refused like a rule returning False: with ``on_unsupported="error"``
``permutation_spec`` raises a one-line error naming the op when it touches a permutable axis.
"""

from __future__ import annotations

import torch

from .labels import FIXED, canonical, fixed_dim, flat

# ---- op families (each name in exactly one; ``OPS`` below is built from them) ----------------
UNARY = {  # one tensor in, same shape out, same units in the same order
    "to", "type_as", "float", "half", "double", "bfloat16", "type", "contiguous", "clone", "detach", "dropout",
    "alpha_dropout", "feature_alpha_dropout", "softmax", "log_softmax", "gelu", "relu", "relu6", "silu", "sigmoid",
    "tanh", "elu", "selu", "celu", "leaky_relu", "hardtanh", "hardswish", "hardsigmoid", "softplus", "mish", "exp",
    "log", "sqrt", "rsqrt", "square", "neg", "abs", "erf", "sin", "cos", "reciprocal", "sign", "floor", "ceil",
    "round", "logical_not", "invert", "bool", "int", "long", "cpu", "cuda", "nan_to_num", "expm1", "log1p", "sinh",
    "cosh", "logsigmoid", "identity", "requires_grad", "data", "zero",
    # constants shaped like their input: any order of units is the same constant
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
}
ELEMENTWISE = {  # several operands tied by broadcasting
    "add", "sub", "mul", "div", "true_divide", "rsub", "pow", "clamp", "clip", "where", "masked_fill", "maximum",
    "minimum", "lerp", "addcmul", "addcdiv", "eq", "ne", "lt", "gt", "le", "ge", "logical_and", "logical_or", "and",
    "or", "xor", "fill", "copy", "floordiv", "mod", "remainder",
}
REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "nansum", "nanmean"}
POOLING = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
           "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "max_pool2d_with_indices",
           "lp_pool2d", "interpolate", "upsample"}
RESHAPES = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze"}
TRANSPOSES = {"permute", "transpose", "t", "T", "mT", "swapaxes", "swapdims", "movedim", "moveaxis"}
IGNORED = {  # queries and hooks: no tensor values to label
    "dim", "size", "numel", "get", "len", "is_floating_point", "is_contiguous", "data_ptr", "element_size",
    "stride", "storage_offset", "is_complex", "nelement", "ndimension", "item", "tolist", "has_torch_function",
    "requires_grad_", "retain_grad", "register_hook", "is_nonzero", "is_leaf", "format", "repr", "bool_", "set_",
    "apply_", "dtype", "device", "shape", "grad_fn", "names",
}


def _arg(args, kwargs, i, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _label_outputs(tr, out, label) -> None:
    for t in flat([out]):
        if isinstance(t, torch.Tensor):
            tr.set_label(t, label if len(label) == t.dim() else tuple(fixed_dim(s) for s in t.shape))


def ignore(tr, name, args, kwargs, out):
    """Queries (``size``, ``dim``, ...): the tracer skips them before looking at their values."""
    return None


def unary(tr, name, args, kwargs, out):
    """Same units in, same units out; with another shape out, as ``elementwise``."""
    outs = [t for t in flat([out]) if isinstance(t, torch.Tensor)]
    if not outs:
        return None
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is not None and tuple(x.shape) == tuple(outs[0].shape):
        _label_outputs(tr, out, tr.label_of(x))
        return None
    return elementwise(tr, name, args, kwargs, out)


def elementwise(tr, name, args, kwargs, out):
    """Several tensor operands are tied by broadcasting; the output takes their labels."""
    outs = [t for t in flat([out]) if isinstance(t, torch.Tensor)]
    if not outs:
        return None
    tensors = [a for a in flat(list(args) + list(kwargs.values())) if isinstance(a, torch.Tensor)]
    _label_outputs(tr, out, tr.broadcast(tensors, outs[0].shape))
    return None


def _dims(dim, ndim) -> list[int]:
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        return [dim % ndim]
    return [d % ndim for d in dim]


def reduction(tr, name, args, kwargs, out):
    """Sums, means, norms over an axis are unchanged by reordering it: the axis just disappears."""
    x = args[0]
    dim = _arg(args, kwargs, 2, "dim") if name == "norm" else _arg(args, kwargs, 1, "dim")
    if name == "norm" and dim is None and not isinstance(_arg(args, kwargs, 1, "p"), (int, float, str, type(None))):
        return False
    if not (dim is None or isinstance(dim, int) or (isinstance(dim, (tuple, list)) and all(isinstance(d, int) for d in dim))):
        return False
    reduced = set(_dims(dim, x.dim())) if x.dim() else set()
    lab = tr.label_of(x)
    y = next(t for t in flat([out]) if isinstance(t, torch.Tensor))
    keepdim = y.dim() == x.dim() and x.dim() > 0
    label = tuple(fixed_dim(1) if i in reduced else lab[i] for i in range(x.dim()) if keepdim or i not in reduced)
    _label_outputs(tr, out, label)
    return None


def maxmin(tr, name, args, kwargs, out):
    """max/min: element-wise with two tensors, a reduction without indices otherwise."""
    if len([a for a in args if isinstance(a, torch.Tensor)]) > 1:
        return elementwise(tr, name, args, kwargs, out)
    if isinstance(out, torch.Tensor):
        return reduction(tr, name, args, kwargs, out)
    x, dim = args[0], _arg(args, kwargs, 1, "dim")
    if not tr.is_fixed(tr.label_of(x)[dim % x.dim()]):
        return False  # the indices output depends on the order
    return reduction(tr, name, args, kwargs, out)


def pooling(tr, name, args, kwargs, out):
    """Pooling mixes only spatial positions: channel labels pass, spatial ones must be fixed."""
    x = args[0]
    k = int(name[-2]) if name[-1] == "d" and name[-2].isdigit() else x.dim() - 2
    if "with_indices" in name:
        k = 2
    lab = tr.label_of(x)
    for d in lab[x.dim() - k:]:
        tr.fix(d)
    y = next(t for t in flat([out]) if isinstance(t, torch.Tensor))
    label = tuple(lab[:x.dim() - k]) + tuple(fixed_dim(s) for s in y.shape[x.dim() - k:])
    _label_outputs(tr, out, label)
    return None


def _reshape_groups(in_shape, out_shape):
    """Pair runs of input dims with runs of output dims of equal product (size-1 dims left out)."""
    ins = [i for i, s in enumerate(in_shape) if s != 1]
    outs = [j for j, s in enumerate(out_shape) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ins) and j < len(outs):
        gi, go = [ins[i]], [outs[j]]
        pi, po = in_shape[ins[i]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                gi.append(ins[i])
                pi *= in_shape[ins[i]]
                i += 1
            else:
                go.append(outs[j])
                po *= out_shape[outs[j]]
                j += 1
        groups.append((gi, go))
    return groups


def reshape(tr, name, args, kwargs, out):
    """view/reshape/flatten: merged dims concatenate factors; a split must fall on factor edges."""
    x = args[0]
    lab = tr.label_of(x)
    out_shape = tuple(out.shape)
    result = [fixed_dim(s) for s in out_shape]
    for gi, go in _reshape_groups(tuple(x.shape), out_shape):
        pieces = _reshape_run(tr, lab, gi, [out_shape[j] for j in go])
        if pieces is None:
            for i in gi:
                tr.fix(lab[i])
            continue
        for j, piece in zip(go, pieces):
            result[j] = piece
    _label_outputs(tr, out, tuple(result))
    return None


def _reshape_run(tr, lab, gi, out_sizes):
    """Labels of the output dims made from input dims ``gi`` (sizes ``out_sizes``), or None to pin them."""
    if len(gi) == 1 and len(out_sizes) == 1:
        return [lab[gi[0]]]
    if len(out_sizes) == 1 and len(lab[gi[0]]) > 1 and all(len(lab[i]) == 1 for i in gi[1:]):
        inner = [f for i in gi[1:] for f in lab[i][0]]  # concatenated channels x space: segments stay contiguous
        return [tuple(canonical(list(seg) + inner) for seg in lab[gi[0]])]
    if any(len(lab[i]) != 1 for i in gi):
        return None
    factors = canonical([f for i in gi for f in lab[i][0]])
    if len(out_sizes) == 1:
        return [(factors,)]
    pieces = _split_factors(factors, out_sizes)
    return None if pieces is None else [(piece,) for piece in pieces]


def _split_factors(factors, sizes):
    """Cut a factor list into consecutive pieces of the given sizes; FIXED factors may be cut anywhere."""
    pieces, rest = [], list(factors)
    for size in sizes:
        piece, prod = [], 1
        while prod < size and rest:
            g, s = rest.pop(0)
            if prod * s <= size:
                piece.append((g, s))
                prod *= s
            elif g == FIXED and s % (size // prod) == 0:
                take = size // prod
                piece.append((FIXED, take))
                prod *= take
                rest.insert(0, (FIXED, s // take))
            else:
                return None
        if prod != size:
            return None
        pieces.append(tuple(piece) or ((FIXED, 1),))
    return pieces if not rest else None


def transpose(tr, name, args, kwargs, out):
    """Reordering dims reorders their labels."""
    x = args[0]
    n = x.dim()
    lab = list(tr.label_of(x))
    if name == "permute":
        dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else _arg(args, kwargs, 1, "dims")
        order = [d % n for d in dims]
    elif name in ("t", "T"):
        order = list(range(n))[::-1]
    elif name == "mT":
        order = list(range(n - 2)) + [n - 1, n - 2]
    elif name in ("transpose", "swapaxes", "swapdims"):
        a, b = (_arg(args, kwargs, 1, "dim0") % n, _arg(args, kwargs, 2, "dim1") % n)
        order = list(range(n))
        order[a], order[b] = order[b], order[a]
    else:  # movedim
        src, dst = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
        src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
        src, dst = [s % n for s in src], [d % n for d in dst]
        rest = [i for i in range(n) if i not in src]
        order = [None] * n
        for s, d in zip(src, dst):
            order[d] = s
        it = iter(rest)
        order = [o if o is not None else next(it) for o in order]
    _label_outputs(tr, out, tuple(lab[i] for i in order))
    return None


def linear(tr, name, args, kwargs, out):
    """y = x W^T + b: x's last axis is W's axis 1; W's axis 0 (and b) define the output units."""
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    tr.tie(w, 1, tr.label_of(x)[-1])
    w0 = tr.axis_label(w, 0)
    tr.tie(b, 0, w0)
    _label_outputs(tr, out, tuple(tr.label_of(x)[:-1]) + (w0,))
    return None


def conv(tr, name, args, kwargs, out):
    """Convolution: channels as in ``linear``; depthwise keeps the channel order; space is fixed."""
    x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    groups = _arg(args, kwargs, 6, "groups", 1)
    k = w.dim() - 2
    c = x.dim() - k - 1
    lab = tr.label_of(x)
    for d in lab[c + 1:]:
        tr.fix(d)
    if groups == 1:
        tr.tie(w, 1, lab[c])
        ch = tr.axis_label(w, 0)
    elif groups == x.shape[c] == w.shape[0]:
        tr.tie(w, 0, lab[c])
        ch = lab[c]
    else:
        return False
    tr.tie(b, 0, ch)
    y = out
    _label_outputs(tr, out, tuple(lab[:c]) + (ch,) + tuple(fixed_dim(s) for s in y.shape[c + 1:]))
    return None


def batch_norm(tr, name, args, kwargs, out):
    """Per-channel statistics and affine (axis 1): running mean/var move with the channels."""
    x = args[0]
    ch = tr.label_of(x)[1 if x.dim() > 1 else 0]
    for t in flat(list(args[1:]) + list(kwargs.values())):
        if isinstance(t, torch.Tensor) and t.dim() == 1:
            tr.tie(t, 0, ch)
    _label_outputs(tr, out, tr.label_of(x))
    return None


def layer_norm(tr, name, args, kwargs, out):
    """Statistics over the last axes do not depend on their order; the affine moves with them."""
    x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    lab = tr.label_of(x)
    weights = [_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")] if name == "layer_norm" else \
        [_arg(args, kwargs, 2, "weight")]
    for t in weights:
        if isinstance(t, torch.Tensor):
            for i in range(k):
                tr.tie(t, i, lab[x.dim() - k + i])
    _label_outputs(tr, out, lab)
    return None


def group_norm(tr, name, args, kwargs, out):
    """GroupNorm with one group or one group per channel is order-free; other groupings pin channels."""
    x, groups = args[0], _arg(args, kwargs, 1, "num_groups")
    lab = tr.label_of(x)
    if groups not in (1, x.shape[1]):
        tr.fix(lab[1])
    for t in (_arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")):
        if isinstance(t, torch.Tensor):
            tr.tie(t, 0, lab[1])
    _label_outputs(tr, out, lab)
    return None


def embedding(tr, name, args, kwargs, out):
    """Embedding tables stay fixed: their output axis is FIXED (so a stream fed by them is too)."""
    ids, w = args[0], _arg(args, kwargs, 1, "weight")
    for axis in range(w.dim()):
        tr.tie(w, axis, fixed_dim(w.shape[axis]))
    _label_outputs(tr, out, tuple(tr.label_of(ids)) + (fixed_dim(w.shape[-1]),))
    return None


def matmul(tr, name, args, kwargs, out):
    """a @ b contracts a's last axis with b's second-to-last: tie them; batch axes broadcast."""
    a, b = args[0], args[1]
    if a.dim() < 2 or b.dim() < 2:
        return False
    la, lb = tr.label_of(a), tr.label_of(b)
    tr.unify(la[-1], lb[-2])
    batch_shape = tuple(out.shape[:-2])
    batch = tr.broadcast_labels([(la[:-2], a.shape[:-2]), (lb[:-2], b.shape[:-2])], batch_shape)
    _label_outputs(tr, out, batch + (la[-2], lb[-1]))
    return None


def addmm(tr, name, args, kwargs, out):
    """bias + x @ W (GPT-2's Conv1D keeps W as [in, out]): x's last axis is W's axis 0."""
    bias, x, w = args[0], args[1], args[2]
    tr.tie(w, 0, tr.label_of(x)[-1])
    w1 = tr.axis_label(w, 1)
    if isinstance(bias, torch.Tensor):
        tr.tie(bias, bias.dim() - 1, w1)
    _label_outputs(tr, out, (tr.label_of(x)[0], w1))
    return None


def sdpa(tr, name, args, kwargs, out):
    """softmax(q k^T) v: q and k share their last axis, k and v their sequence axis."""
    q, k, v = args[0], _arg(args, kwargs, 1, "key"), _arg(args, kwargs, 2, "value")
    lq, lk, lv = tr.label_of(q), tr.label_of(k), tr.label_of(v)
    tr.unify(lq[-1], lk[-1])
    tr.unify(lk[-2], lv[-2])
    batch = tr.broadcast_labels([(lq[:-2], q.shape[:-2]), (lk[:-2], k.shape[:-2]), (lv[:-2], v.shape[:-2])],
                              tuple(out.shape[:-2]))
    _label_outputs(tr, out, batch + (lq[-2], lv[-1]))
    return None


def cat(tr, name, args, kwargs, out):
    """Concatenation: the joined axis becomes segments (one per input); other axes are tied."""
    tensors = [t for t in _arg(args, kwargs, 0, "tensors") if t.numel() or t.dim() > 1]
    dim = _arg(args, kwargs, 1, "dim", 0) % out.dim()
    labs = [tr.label_of(t) for t in tensors]
    other = [None] * out.dim()
    for lab in labs:
        for i in range(out.dim()):
            if i == dim:
                continue
            if other[i] is None:
                other[i] = lab[i]
            else:
                tr.unify(other[i], lab[i])
    joined = tuple(seg for lab in labs for seg in lab[dim])
    _label_outputs(tr, out, tuple(joined if i == dim else other[i] for i in range(out.dim())))
    return None


def stack(tr, name, args, kwargs, out):
    tensors = list(_arg(args, kwargs, 0, "tensors"))
    dim = _arg(args, kwargs, 1, "dim", 0) % out.dim()
    base = tr.label_of(tensors[0])
    for t in tensors[1:]:
        for a, b in zip(base, tr.label_of(t)):
            tr.unify(a, b)
    label = list(base)
    label.insert(dim, fixed_dim(len(tensors)))
    _label_outputs(tr, out, tuple(label))
    return None


def split(tr, name, args, kwargs, out):
    """chunk/split/unbind along a FIXED axis keep the other labels; along a permuted axis: unsupported."""
    x = args[0]
    default = 0
    dim = _arg(args, kwargs, 2 if name in ("chunk", "split", "tensor_split", "split_with_sizes") else 1, "dim", default)
    dim %= x.dim()
    lab = tr.label_of(x)
    if not tr.is_fixed(lab[dim]):
        return False
    for t in flat([out]):
        if isinstance(t, torch.Tensor):
            if t.dim() == x.dim():
                tr.set_label(t, tuple(fixed_dim(t.shape[i]) if i == dim else lab[i] for i in range(x.dim())))
            else:
                tr.set_label(t, tuple(lab[i] for i in range(x.dim()) if i != dim))
    return None


def _expand_index(idx, ndim) -> list:
    """A basic index as one entry per output position: ``None`` (new axis), an int or a slice."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (ndim - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (ndim - sum(1 for i in expanded if i is not None)))
    return expanded


def getitem(tr, name, args, kwargs, out):
    """Basic indexing: full slices keep labels; picking or cutting a permuted axis is unsupported."""
    x, idx = args[0], args[1]
    if any(isinstance(i, (torch.Tensor, list)) for i in (idx if isinstance(idx, tuple) else (idx,))):
        if all(tr.is_fixed(d) for d in tr.label_of(x)):
            return None
        return False
    lab = tr.label_of(x)
    label, d = [], 0
    for i in _expand_index(idx, x.dim()):
        if i is None:
            label.append(fixed_dim(1))
            continue
        full = isinstance(i, slice) and i == slice(None)
        if not full and not tr.is_fixed(lab[d]):
            return False
        if isinstance(i, slice):
            label.append(lab[d] if full else fixed_dim(len(range(*i.indices(x.shape[d])))))
        d += 1
    _label_outputs(tr, out, tuple(label))
    return None


def expand(tr, name, args, kwargs, out):
    x = args[0]
    lab = tr.label_of(x)
    label = [fixed_dim(s) for s in out.shape]
    for i in range(1, x.dim() + 1):
        if x.shape[-i] == out.shape[-i]:
            label[-i] = lab[-i]
    _label_outputs(tr, out, tuple(label))
    return None


def pad(tr, name, args, kwargs, out):
    x, widths = args[0], _arg(args, kwargs, 1, "pad")
    k = len(widths) // 2
    lab = tr.label_of(x)
    padded = [x.dim() - 1 - i for i in range(k) if widths[2 * i] or widths[2 * i + 1]]
    if any(not tr.is_fixed(lab[d]) for d in padded):
        return False
    _label_outputs(tr, out, tuple(fixed_dim(out.shape[d]) if d in padded else lab[d] for d in range(x.dim())))
    return None


def new_tensor(tr, name, args, kwargs, out):
    """``x.new_zeros(shape)`` and friends: fresh constants, order-free."""
    _label_outputs(tr, out, tuple(fixed_dim(s) for s in out.shape))
    return None


SPECIFIC = {
    "linear": linear, "conv1d": conv, "conv2d": conv, "conv3d": conv, "batch_norm": batch_norm,
    "instance_norm": batch_norm, "layer_norm": layer_norm, "rms_norm": layer_norm, "group_norm": group_norm,
    "embedding": embedding, "matmul": matmul, "addmm": addmm, "mm": matmul, "bmm": matmul, "scaled_dot_product_attention": sdpa,
    "cat": cat, "stack": stack, "chunk": split, "split": split, "unbind": split, "tensor_split": split,
    "split_with_sizes": split, "getitem": getitem, "expand": expand, "expand_as": expand, "broadcast_to": expand,
    "pad": pad, "max": maxmin, "min": maxmin, "new_zeros": new_tensor, "new_ones": new_tensor,
    "new_empty": new_tensor, "new_full": new_tensor, "new_tensor": new_tensor,
}


def _build_table() -> dict:
    """One rule per op name; a name claimed twice is a bug in this module."""
    table: dict = {}
    families = [(SPECIFIC.items()), ((n, unary) for n in UNARY), ((n, elementwise) for n in ELEMENTWISE),
                ((n, reduction) for n in REDUCTIONS), ((n, pooling) for n in POOLING),
                ((n, reshape) for n in RESHAPES), ((n, transpose) for n in TRANSPOSES), ((n, ignore) for n in IGNORED)]
    for family in families:
        for name, rule in family:
            if name in table:
                raise AssertionError(f"op {name!r} has two rules")
            table[name] = rule
    return table


OPS: dict = _build_table()
"""Op name (as ``trace.op_name`` normalises it) -> rule. The tracer routes by this table alone."""
