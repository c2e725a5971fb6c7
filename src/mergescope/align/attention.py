"""Attention modules as leaves of the trace: heads permute, Q/K share and V/O share within-head orders.

Per head h, attention is softmax(q_h k_h^T / sqrt(d)) v_h. Reordering the dimensions of q_h and
k_h the same way keeps q_h k_h^T; reordering v_h's dimensions and o's matching input columns
keeps the output; moving whole heads (all four together) keeps the sum over heads. Rotary
embeddings (Llama) rotate fixed pairs of q/k dimensions, so there only whole heads move; with
grouped K/V heads nothing inside attention moves (the inputs and outputs still do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .labels import FIXED, fixed_dim, flat


@dataclass(frozen=True)
class AttentionRule:
    """Names of the projections and how to read the head count from the module."""

    q: str
    k: str
    v: str
    o: str | None
    heads: str  # attribute path giving the number of heads
    kv_heads: str | None = None
    rope: bool = False

    def matches(self, module: nn.Module) -> bool:
        names = [self.q, self.k, self.v] + ([self.o] if self.o else [])
        return all(isinstance(getattr(module, n, None), nn.Linear) for n in names) and self._read(module, self.heads)

    @staticmethod
    def _read(module, path):
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj

    def apply(self, tr, qname, module, args, kwargs, out) -> None:
        x = next((a for a in flat(list(args)) if isinstance(a, torch.Tensor)), None)
        if x is None:
            x = kwargs.get("hidden_states")
        lx = tr.label_of(x)
        q, k, v = (getattr(module, n) for n in (self.q, self.k, self.v))
        for proj in (q, k, v):
            tr.tie(proj.weight, 1, lx[-1])
        n_heads = int(self._read(module, self.heads))
        n_kv = int(self._read(module, self.kv_heads) or n_heads) if self.kv_heads else n_heads
        dq, dv = q.weight.shape[0], v.weight.shape[0]
        if n_kv != n_heads:
            qk, vo, head = fixed_dim(dq), fixed_dim(dv), None
            qk_k, vo_o = fixed_dim(k.weight.shape[0]), fixed_dim(module_o_in(module, self.o, dv))
        else:
            head = tr.groups.new(n_heads, f"{qname}.heads")
            vo_g = tr.groups.new(dv, f"{qname}.vo")
            vo = vo_o = (((vo_g, dv),),)
            if self.rope:
                qk = qk_k = (((head, n_heads), (FIXED, dq // n_heads)),)
                tr.heads.append((head, n_heads, (vo_g,)))
            else:
                qk_g = tr.groups.new(dq, f"{qname}.qk")
                qk = qk_k = (((qk_g, dq),),)
                tr.heads.append((head, n_heads, (qk_g, vo_g)))
        for proj, lab in ((q, qk), (k, qk_k), (v, vo)):
            tr.tie(proj.weight, 0, lab)
            tr.tie(proj.bias, 0, lab)
        if self.o:
            o = getattr(module, self.o)
            tr.tie(o.weight, 1, vo_o)
            out_label = tr.axis_label(o.weight, 0)
            tr.tie(o.bias, 0, out_label)
        else:
            out_label = vo
        tensors = [t for t in flat([out]) if isinstance(t, torch.Tensor)]
        tr.set_label(tensors[0], tuple(lx[:-1]) + (out_label,))
        for t in tensors[1:]:  # attention weights [batch, heads, query, key]
            lab = [fixed_dim(s) for s in t.shape]
            if head is not None and t.dim() == 4 and t.shape[1] == n_heads:
                lab[1] = (((head, n_heads),),)
            tr.set_label(t, tuple(lab))


def module_o_in(module, o, default):
    return getattr(module, o).weight.shape[1] if o else default


ATTENTION_RULES = (
    AttentionRule("q", "k", "v", "o", "heads"),  # mergescope.tasks.zoo.MultiHeadSelfAttention
    AttentionRule("query", "key", "value", None, "num_attention_heads"),  # HF BERT-style self-attention
    AttentionRule("q_proj", "k_proj", "v_proj", "o_proj", "config.num_attention_heads",
                  "config.num_key_value_heads", rope=True),  # HF Llama-style
)
