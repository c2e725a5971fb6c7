"""Curvature of the loss at a state: top Hessian eigenvalues (Lanczos / power) and trace (Hutchinson).

Flat minima merge better (the "flatness" characteristic; Keskar et al. 2017, Yao et al. 2020
"PyHessian"). The Hessian is never formed: everything uses Hessian-vector products
H v = d/de grad L(theta + e v), computed forward-over-reverse with torch.func (one jvp of grad),
vmapped over several vectors at once. The model runs in eval mode (BatchNorm uses its running
statistics, dropout is off), so L is a deterministic function of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ..errors import MergescopeError
from .evaluation import as_state, working_copy

Vector = torch.Tensor


@dataclass(frozen=True)
class EigenResult:
    """Top Hessian eigenvalues (descending), with how they were obtained."""

    eigenvalues: tuple[float, ...]
    method: str
    iterations: int
    hvps: int
    examples: int
    parameters: int
    residuals: tuple[float, ...] = ()
    tol: float | None = None
    converged: bool = True

    def to_dict(self) -> dict:
        return {"eigenvalues": list(self.eigenvalues), "method": self.method, "iterations": self.iterations,
                "hvps": self.hvps, "examples": self.examples, "parameters": self.parameters,
                "residuals": list(self.residuals), "tol": self.tol, "converged": self.converged}


@dataclass(frozen=True)
class TraceResult:
    """Hutchinson estimate of tr(H): mean of v^T H v over Rademacher v, with its standard error."""

    trace: float
    stderr: float
    samples: int
    examples: int
    parameters: int
    running: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        return {"trace": self.trace, "stderr": self.stderr, "samples": self.samples, "examples": self.examples,
                "parameters": self.parameters, "running_mean": list(self.running)}


class HessianOperator:
    """v -> H v for the task loss at fixed weights, over a fixed list of batches (flat vectors).

    The loss is the example-weighted mean over the batches, so H is the Hessian of the mean loss
    over all the examples used. With ``retain_graph`` (default) each batch's gradient graph is
    built once (create_graph=True) and every product is one double-backward through it, as
    PyHessian does for one batch; memory is then that of one differentiable pass over the data.
    Without it, each product recomputes forward-over-reverse (torch.func.jvp of grad) per batch.
    """

    def __init__(self, model: nn.Module, state: Mapping[str, torch.Tensor], task, split: str = "train",
                 batches: int | None = None, retain_graph: bool = True):
        self.net = working_copy(model)
        full = as_state(model, state)
        self.names = [n for n, _ in self.net.named_parameters()]
        self.params = {n: full[n] for n in self.names}
        self.buffers = {k: v for k, v in full.items() if k not in self.params}
        self.shapes = [self.params[n].shape for n in self.names]
        self.sizes = [self.params[n].numel() for n in self.names]
        self.data = [xy for i, xy in enumerate(task.batches(split)) if batches is None or i < batches]
        self.examples = sum(len(y) for _, y in self.data)
        if self.examples == 0:
            raise MergescopeError(f"task {getattr(task, 'name', task)}: no examples in split {split!r}")
        self.task = task
        self.dim = sum(self.sizes)
        self.graphs = self._gradient_graphs() if retain_graph else None

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> Vector:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Vector) -> dict[str, torch.Tensor]:
        return {n: p.reshape(s) for n, p, s in zip(self.names, torch.split(flat, self.sizes), self.shapes)}

    def _loss(self, params, x, y):
        return self.task.loss(functional_call(self.net, {**params, **self.buffers}, (x,)), y)

    def _gradient_graphs(self) -> tuple[dict[str, torch.Tensor], list[Vector]]:
        leaves = {n: p.clone().requires_grad_(True) for n, p in self.params.items()}
        graphs = []
        for x, y in self.data:
            loss = self._loss(leaves, x, y) * (len(y) / self.examples)
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            graphs.append(torch.cat([g.reshape(-1) for g in grads]))
        return leaves, graphs

    def matvec(self, vectors: Vector) -> Vector:
        """H V for a [m, dim] block of vectors, summed over batches weighted by size (float64 out)."""
        if self.graphs is not None:
            return self._matvec_cached(vectors)
        out = torch.zeros(vectors.shape, dtype=torch.float64)
        for x, y in self.data:
            grad_fn = grad(lambda p: self._loss(p, x, y))

            def hvp(v):
                return self.flatten(jvp(grad_fn, (self.params,), (self.unflatten(v),))[1])

            out += vmap(hvp)(vectors.float()).double() * (len(y) / self.examples)
        return out

    def _matvec_cached(self, vectors: Vector) -> Vector:
        leaves, graphs = self.graphs
        v = vectors.float()
        out = torch.zeros(vectors.shape, dtype=torch.float64)
        for g in graphs:
            if len(v) == 1:
                hv = torch.autograd.grad(g, list(leaves.values()), grad_outputs=v[0], retain_graph=True)
                out[0] += torch.cat([h.reshape(-1) for h in hv]).double()
            else:
                hv = torch.autograd.grad(g, list(leaves.values()), grad_outputs=v, retain_graph=True,
                                         is_grads_batched=True)
                out += torch.cat([h.reshape(len(v), -1) for h in hv], dim=1).double()
        return out


def lanczos(matvec: Callable[[Vector], Vector], dim: int, k: int, iters: int, seed: int, tol: float = 1e-3
            ) -> tuple[np.ndarray, np.ndarray, int]:
    """Largest-k Ritz values of a symmetric operator by Lanczos with full re-orthogonalization.

    Builds the Krylov basis Q and tridiagonal T = Q^T H Q (Lanczos 1950; Golub & Van Loan 10.1);
    re-orthogonalizing against all of Q keeps the Ritz values free of ghost copies. Stops when every
    wanted Ritz residual |H y - theta y| = |beta_j s_j| is below ``tol`` |theta|: for a symmetric H an
    eigenvalue lies within the residual of each Ritz value, so that is a guaranteed relative error
    bound. (The old test, residual <= sqrt(tol) |theta|, assumed error ~ residual^2 / gap and stopped
    too early on clustered interior eigenvalues.) Returns (values descending, residuals, iterations).
    """
    steps = min(iters, dim)
    g = torch.Generator().manual_seed(seed)
    basis = torch.empty(steps + 1, dim, dtype=torch.float64)
    q = torch.randn(dim, generator=g, dtype=torch.float64)
    basis[0] = q / q.norm()
    alphas, betas = [], []
    values, residuals = np.zeros(0), np.zeros(0)
    for j in range(steps):
        w = matvec(basis[j][None])[0]
        alphas.append(float(w @ basis[j]))
        done = basis[:j + 1]
        for _ in range(2):  # twice is enough (Kahan, "twice is enough")
            w = w - done.T @ (done @ w)
        beta = float(w.norm())
        values, vectors = np.linalg.eigh(_tridiagonal(alphas, betas))
        order = np.argsort(values)[::-1][:k]
        values, residuals = values[order], np.abs(beta * vectors[-1, order])
        scale = np.maximum(np.abs(values), 1e-12)
        if len(values) == k and np.all(residuals <= tol * scale):
            break
        if beta < 1e-10:  # invariant subspace found: the Ritz values are exact
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    return values, residuals, len(alphas)


def _tridiagonal(alphas: list[float], betas: list[float]) -> np.ndarray:
    t = np.diag(alphas)
    off = np.asarray(betas[:len(alphas) - 1])
    idx = np.arange(len(off))
    t[idx, idx + 1] = t[idx + 1, idx] = off
    return t


def power_iteration(matvec: Callable[[Vector], Vector], dim: int, k: int, iters: int, seed: int, tol: float = 1e-6
                    ) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """Top-k eigenvalues of largest magnitude by power iteration with deflation (as in PyHessian).

    Each eigenvector is iterated v <- H v / |H v| in the complement of the ones already found,
    until the Rayleigh quotient changes by less than ``tol`` relatively. Returns (values,
    residuals, matrix-vector products, whether every value converged within ``iters``).
    """
    g = torch.Generator().manual_seed(seed)
    found: list[Vector] = []
    values, residuals, total, all_converged = [], [], 0, True
    for _ in range(min(k, dim)):
        v = torch.randn(dim, generator=g, dtype=torch.float64)
        value = 0.0
        for _ in range(iters):
            for u in found:
                v = v - (u @ v) * u
            v = v / v.norm()
            hv = matvec(v[None])[0]
            total += 1
            new = float(v @ hv)
            converged = abs(new - value) <= tol * max(abs(new), 1e-12)
            value, v = new, hv
            if converged:
                break
        all_converged = all_converged and converged
        for u in found:
            v = v - (u @ v) * u
        v = v / v.norm()
        residuals.append(float((matvec(v[None])[0] - value * v).norm()))
        found.append(v)
        values.append(value)
    return np.asarray(values), np.asarray(residuals), total, all_converged


def hessian_eigenvalues(model: nn.Module, state: Mapping[str, torch.Tensor], task, k: int = 1,
                        split: str = "train", batches: int | None = None, method: str = "lanczos",
                        iters: int | None = None, tol: float = 1e-3, seed: int = 0, retain_graph: bool = True
                        ) -> EigenResult:
    """Top-k eigenvalues of the Hessian of the mean task loss over ``split`` (all of it by default).

    ``method="lanczos"`` gives the k largest (algebraic) eigenvalues, ``"power"`` the k largest in
    magnitude by deflated power iteration. ``tol``: Lanczos stops when every residual is below
    ``tol`` |value| (a guaranteed relative error bound, see ``lanczos``); power iteration when the
    estimates change by less than ``tol`` relatively. ``converged`` says whether ``iters`` sufficed. ``batches`` limits the data to the first batches;
    ``retain_graph=False`` trades speed for memory (see ``HessianOperator``).
    """
    if k < 1:
        raise MergescopeError(f"k={k}: ask for at least one eigenvalue")
    op = HessianOperator(model, state, task, split, batches, retain_graph)
    if method == "lanczos":
        iters = iters or max(10 * k + 50, 100)
        values, residuals, steps = lanczos(op.matvec, op.dim, k, iters, seed, tol)
        hvps = steps
        converged = bool(np.all(residuals <= tol * np.maximum(np.abs(values), 1e-12))) or steps >= op.dim
    elif method == "power":
        iters = iters or 200
        values, residuals, hvps, converged = power_iteration(op.matvec, op.dim, k, iters, seed, tol)
        steps = hvps
    else:
        raise MergescopeError(f"method {method!r}: expected 'lanczos' or 'power'")
    return EigenResult(tuple(map(float, values)), method, steps, hvps, op.examples, op.dim, tuple(map(float, residuals)),
                       tol, converged)


def hessian_trace(model: nn.Module, state: Mapping[str, torch.Tensor], task, samples: int = 64,
                  split: str = "train", batches: int | None = None, block: int = 16, seed: int = 0,
                  retain_graph: bool = True) -> TraceResult:
    """Hutchinson's estimator tr(H) ~ mean_i v_i^T H v_i with Rademacher v_i (Hutchinson 1990).

    Unbiased; the standard error is reported. Vectors are processed ``block`` at a time (vmapped).
    """
    if samples < 2:
        raise MergescopeError(f"samples={samples}: Hutchinson needs at least 2 probe vectors")
    op = HessianOperator(model, state, task, split, batches, retain_graph)
    g = torch.Generator().manual_seed(seed)
    quads: list[float] = []
    while len(quads) < samples:
        m = min(block, samples - len(quads))
        v = torch.randint(0, 2, (m, op.dim), generator=g, dtype=torch.float64) * 2 - 1
        quads.extend((v * op.matvec(v)).sum(1).tolist())
    q = np.asarray(quads)
    running = np.cumsum(q) / np.arange(1, len(q) + 1)
    return TraceResult(float(q.mean()), float(q.std(ddof=1) / np.sqrt(len(q))), len(q), op.examples, op.dim,
                       tuple(map(float, running)))
