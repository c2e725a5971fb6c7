"""Curves of low loss between two models (connectivity), optionally after neuron alignment.

Garipov et al. 2018 ("Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs"): a
quadratic Bezier curve phi(t) = (1-t)^2 A + 2t(1-t) theta + t^2 B, or a polygonal chain
A -> theta -> B, whose bend theta is trained by minimizing E_{t~U(0,1)} L(phi(t)) with one t drawn
per batch. Tatro et al. 2020 ("Optimizing Mode Connectivity via Neuron Alignment"): aligning B's
neurons to A's first (weight or activation matching) makes the curve much easier to fit; their
proximal alternating minimization (PAM) also re-optimizes the permutation while the curve trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..errors import MergescopeError
from .evaluation import Stack, as_state, lerp, working_copy
from .paths import PathResult, evaluate_path, path_points

KINDS = ("bezier", "polychain")
ALIGNS = (None, "weight", "activation", "pam")


def curve_weights(kind: str, t: torch.Tensor) -> torch.Tensor:
    """Coefficients [len(t), 3] of (A, bend, B) at each t: phi(t) = c0 A + c1 theta + c2 B."""
    t = t.reshape(-1).double()
    if kind == "bezier":
        return torch.stack([(1 - t) ** 2, 2 * t * (1 - t), t ** 2], 1).float()
    if kind == "polychain":
        first = t < 0.5
        s = torch.where(first, 2 * t, 2 * t - 1)
        zero = torch.zeros_like(t)
        return torch.stack([torch.where(first, 1 - s, zero), torch.where(first, s, 1 - s), torch.where(first, zero, s)],
                           1).float()
    raise MergescopeError(f"curve kind {kind!r}: expected one of {', '.join(KINDS)}")


def curve_points(kind: str, a: Mapping, bend: Mapping, b: Mapping, ts) -> Stack:
    """States phi(t) for each t, stacked along a leading axis."""
    c = curve_weights(kind, torch.as_tensor(np.asarray(ts, dtype=np.float64)))
    out = {}
    for k in a:
        shape = (-1, *([1] * a[k].dim()))
        out[k] = (c[:, 0].reshape(shape) * a[k][None] + c[:, 1].reshape(shape) * bend[k][None]
                  + c[:, 2].reshape(shape) * b[k][None])
    return out


@dataclass(frozen=True)
class CurveResult:
    """A fitted curve evaluated along t, with the straight lines for comparison.

    ``line`` is the linear path between the original endpoints; ``aligned_line`` the one between A
    and the aligned B (present when ``align`` is set). Barriers are those of the curve.
    """

    kind: str
    align: str | None
    epochs: int
    curve: PathResult
    line: PathResult
    aligned_line: PathResult | None
    train_loss: tuple[float, ...]
    bend: dict = field(default=None, repr=False, compare=False)
    aligned_b: dict | None = field(default=None, repr=False, compare=False)
    endpoints: tuple[dict, dict] | None = field(default=None, repr=False, compare=False)
    robust_curve: PathResult | None = None
    robust_line: PathResult | None = None

    def state_at(self, t: float) -> dict[str, torch.Tensor]:
        """phi(t): the (float) state on the fitted curve, e.g. its midpoint for a three-model plane."""
        a, b = self.endpoints
        return {k: v[0] for k, v in curve_points(self.kind, a, self.bend, b, [t]).items()}

    @property
    def barrier_loss(self) -> float:
        return self.curve.barrier_loss

    @property
    def barrier_acc(self) -> float:
        return self.curve.barrier_acc

    def to_dict(self) -> dict:
        return {"kind": self.kind, "align": self.align, "epochs": self.epochs, "barrier_loss": self.barrier_loss,
                "barrier_acc": self.barrier_acc, "curve": self.curve.to_dict(), "line": self.line.to_dict(),
                "aligned_line": None if self.aligned_line is None else self.aligned_line.to_dict(),
                "robust_curve": None if self.robust_curve is None else self.robust_curve.to_dict(),
                "robust_line": None if self.robust_line is None else self.robust_line.to_dict(),
                "train_loss_per_epoch": list(self.train_loss)}


def _spec(model: nn.Module, task):
    from .. import align  # the alignment package; imported here so landscape works without it
    from ..state import example_input

    return align.permutation_spec(working_copy(model), example_input(task))


def align_endpoint(model: nn.Module, a: dict, b: dict, task, how: str, seed: int = 0) -> dict:
    """B with its neurons permuted to match A (a ``mergescope.align`` registry method that permutes:
    weight, activation, ...; activation matching reads the train split in whole-split batches)."""
    from .. import align

    aligner = align.get(how)
    if aligner.merges:
        raise MergescopeError(f"align {how!r}: merges the models instead of permuting B; choose a permuting method")
    params = {"batch_size": None} if "batch_size" in aligner.params else {}
    permuted = aligner(_spec(model, task), a, b, task=task, seed=seed, template=model, **params).state
    return {k: permuted[k].float() for k in b}


class PamStep:
    """The permutation step of PAM (Tatro et al. 2020), as a weight-matching problem.

    Linearizing the curve objective F in the aligned endpoint B' = P B and adding the proximal
    term ||P B - B'||^2 / (2 eta) gives argmin_P <grad F, P B> + ||P B - B'||^2 / (2 eta), and since
    ||P B|| does not depend on P this is argmax_P <P B, B' - eta grad F>: weight matching of B
    onto the target B' - eta grad F (started from the current P). ``step`` is eta relative to
    |B'| / |grad F|, so it is scale-free.
    """

    def __init__(self, model: nn.Module, b: dict, task, step: float, seed: int, batches: int = 4):
        from .. import align

        self.align, self.spec, self.b, self.task = align, _spec(model, task), b, task
        self.step, self.batches, self.seed = step, batches, seed
        self.perm = None

    def start(self, a: dict) -> dict:
        """The first permutation: plain weight matching of B onto A."""
        self.perm = self.align.weight_matching(self.spec, a, self.b, seed=self.seed)
        permuted = self.align.apply(self.spec, self.perm, self.b)
        return {k: permuted[k].float() for k in self.b}

    def __call__(self, net: nn.Module, a: dict, theta: dict, buffers: dict, b_aligned: dict, kind: str,
                 epoch: int) -> dict:
        grad_b = self._gradient(net, a, theta, buffers, b_aligned, kind, epoch)
        g_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grad_b.values())))
        b_norm = float(torch.sqrt(sum((b_aligned[k].double() ** 2).sum() for k in grad_b)))
        eta = self.step * b_norm / max(g_norm, 1e-30)
        target = {k: b_aligned[k] - eta * grad_b[k] if k in grad_b else b_aligned[k] for k in b_aligned}
        self.perm = self.align.weight_matching(self.spec, target, self.b, seed=self.seed, init=self.perm)
        permuted = self.align.apply(self.spec, self.perm, self.b)
        return {k: permuted[k].float() for k in self.b}

    def _gradient(self, net, a, theta, buffers, b_aligned, kind, epoch) -> dict:
        """grad of the curve loss E_t L(phi(t)) w.r.t. B's parameters on a few train batches."""
        b_var = {k: b_aligned[k].clone().requires_grad_(True) for k in theta}
        gen = torch.Generator().manual_seed(7919 * (self.seed + 1) + epoch)
        for i, (x, y) in enumerate(self.task.batches("train", batch_size=256, shuffle=True, generator=gen)):
            if i >= self.batches:
                break
            c = curve_weights(kind, torch.rand(1, generator=gen))[0]
            weights = {k: c[0] * a[k] + c[1] * theta[k].detach() + c[2] * b_var[k] for k in theta}
            out = functional_call(net, {**weights, **{k: v.clone() for k, v in buffers.items()}}, (x,))
            (self.task.loss(out, y) / self.batches).backward()
        return {k: v.grad for k, v in b_var.items()}


def train_bend(model: nn.Module, a: dict, b: dict, task, kind: str, epochs: int, lr: float, weight_decay: float,
               batch_size: int, seed: int, on_epoch: Callable[[int, float], None] | None = None,
               pam: PamStep | None = None) -> tuple[dict, list[float], dict]:
    """Fit the bend theta by SGD on L(phi_theta(t)), t ~ U(0,1) drawn once per batch (Garipov et al.).

    Starts from the midpoint (A + B) / 2 (the curve is then the line); Adam with a cosine decay.
    Parameters only: BatchNorm runs in train mode on batch statistics and is recomputed at
    evaluation. With ``pam`` the endpoint B is re-permuted after every epoch but the last (PAM).
    Returns (bend state, mean train loss per epoch, final B).
    """
    net = working_copy(model)
    param_names = {n for n, _ in net.named_parameters()}
    bend = {k: ((a[k] + b[k]) / 2).clone() for k in a}
    theta = {k: bend[k].requires_grad_(True) for k in a if k in param_names}
    buffers = {k: v for k, v in bend.items() if k not in param_names}
    opt = torch.optim.Adam(theta.values(), lr=lr, weight_decay=weight_decay)
    steps = max(1, epochs * math.ceil(_train_size(task) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for x, y in task.batches("train", batch_size=batch_size, shuffle=True, generator=gen):
            t = torch.rand(1, generator=gen)
            c = curve_weights(kind, t)[0]
            weights = {k: c[0] * a[k] + c[1] * theta[k] + c[2] * b[k] for k in theta}
            out = functional_call(net, {**weights, **{k: v.clone() for k, v in buffers.items()}}, (x,))
            loss = task.loss(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        history.append(total / max(count, 1))
        if pam is not None and epoch < epochs - 1:
            b = pam(net, a, theta, buffers, b, kind, epoch)
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return {k: v.detach().clone() for k, v in bend.items()}, history, b


def _train_size(task) -> int:
    return sum(len(y) for _, y in task.batches("train"))


def fit_curve(model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], task,
              kind: str = "bezier", align: str | None = None, epochs: int = 20, seed: int = 0, n: int = 25,
              split: str = "test", bn_reset: bool = True, lr: float = 1e-3, weight_decay: float = 0.0,
              batch_size: int = 64, on_epoch: Callable[[int, float], None] | None = None,
              pam_step: float = 0.1, robust_eps: float = 0.0, robust_steps: int = 5) -> CurveResult:
    """Fit a Bezier / polychain curve between A and B (optionally aligning B to A first) and evaluate it.

    The curve is trained on the train split and reported at ``n`` points on ``split`` (and train),
    next to the straight line(s), with BatchNorm statistics recomputed per point when ``bn_reset``.
    ``align="pam"`` starts from weight matching and re-solves the permutation after each epoch
    (see ``PamStep``; ``pam_step`` is its relative proximal step). ``robust_eps`` > 0 also
    measures the curve and the (aligned) line on PGD adversarial inputs (``robust``).
    """
    if kind not in KINDS:
        raise MergescopeError(f"curve kind {kind!r}: expected one of {', '.join(KINDS)}")
    if align not in ALIGNS:
        raise MergescopeError(f"align {align!r}: expected weight, activation, pam or None")
    if epochs < 0:
        raise MergescopeError(f"epochs={epochs}: must be >= 0")
    a, b0 = as_state(model, state_a, "state_a"), as_state(model, state_b, "state_b")
    pam = PamStep(model, b0, task, pam_step, seed) if align == "pam" else None
    if pam is not None:
        b = pam.start(a)
    else:
        b = align_endpoint(model, a, b0, task, align, seed) if align else b0
    bend, history, b = train_bend(model, a, b, task, kind, epochs, lr, weight_decay, batch_size, seed, on_epoch, pam)
    ts = path_points(n)
    curve = evaluate_path(model, curve_points(kind, a, bend, b, ts), ts, task, split, bn_reset)
    line = evaluate_path(model, lerp(a, b0, ts), ts, task, split, bn_reset)
    aligned_line = evaluate_path(model, lerp(a, b, ts), ts, task, split, bn_reset) if align else None
    robust_curve = robust_line = None
    if robust_eps > 0:
        from .robust import robust_path

        robust_curve = robust_path(model, curve_points(kind, a, bend, b, ts), ts, task, split, robust_eps, robust_steps,
                                   bn_reset=bn_reset)
        robust_line = robust_path(model, lerp(a, b, ts), ts, task, split, robust_eps, robust_steps, bn_reset=bn_reset)
    return CurveResult(kind, align, epochs, curve, line, aligned_line, tuple(history), bend, b if align else None,
                       (a, b), robust_curve, robust_line)
