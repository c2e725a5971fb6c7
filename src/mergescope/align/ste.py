"""Straight-through estimator matching (Ainsworth et al. 2023, "Git Re-Basin", Alg. 2).

Learn free weights W~ (started at A) whose nearest permutation of B, P = WM(W~, B), makes the
midpoint (A + P(B)) / 2 have low training loss. The forward pass uses the projected P(B); the
backward pass treats the projection as the identity (P(B) + W~ - stopgrad(W~)), so gradients of
the midpoint loss reach W~. The final permutation is WM(W~, B) after training. A data-driven
refinement of weight matching: it optimizes the merge itself rather than a weight similarity.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .matching import weight_matching
from .permute import Permutation, apply
from .spec import as_spec


def ste_matching(spec, model_a: nn.Module, model_b: nn.Module, task, epochs: int = 2, lr: float = 1e-3,
                 batch_size: int = 128, seed: int = 0) -> Permutation:
    """Permutation of B found by straight-through optimization of the midpoint's training loss."""
    sa = {k: v.detach() for k, v in model_a.state_dict().items()}
    sb = {k: v.detach() for k, v in model_b.state_dict().items()}
    spec = as_spec(spec).with_sizes(sa)
    names = [n for n, _ in model_a.named_parameters()]
    free = {n: sa[n].clone().float().requires_grad_(True) for n in names}
    opt = torch.optim.Adam(free.values(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    perm = weight_matching(spec, sa, sb, seed=seed)
    was_training = model_a.training
    model_a.train()
    steps = 0
    try:
        for _ in range(epochs):
            for x, y in task.batches("train", batch_size=batch_size, shuffle=True, generator=generator):
                current = {**sa, **{n: t.detach() for n, t in free.items()}}
                perm = weight_matching(spec, current, sb, seed=seed, init=perm)
                projected = apply(spec, perm, sb)
                mid = {}
                for k in sa:
                    if k in free:
                        mid[k] = 0.5 * (sa[k] + projected[k] + free[k] - free[k].detach())
                    elif sa[k].is_floating_point():
                        mid[k] = 0.5 * (sa[k] + projected[k])  # BN buffers: copies, batch statistics are used
                    else:
                        mid[k] = sa[k].clone()
                loss = task.loss(functional_call(model_a, mid, (x,)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
    finally:
        model_a.train(was_training)
    final = weight_matching(spec, {**sa, **{n: t.detach() for n, t in free.items()}}, sb, seed=seed, init=perm)
    return Permutation(final.perms, method="ste", info={"steps": steps, "epochs": epochs, "lr": lr, "seed": seed})
