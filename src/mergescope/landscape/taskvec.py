"""Task vectors (directedness): their geometry, arithmetic and negation.

Ilharco et al. 2023 ("Editing Models with Task Arithmetic"): tau_i = theta_i - theta_base.
Adding lambda * sum_i tau_i to the base multitasks; subtracting lambda * tau_i forgets task i.
Near-orthogonal task vectors (cosine ~ 0) interfere little. lambda is chosen on the validation
split and the chosen model is reported on test. All scales are evaluated at once (vmap).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import MergescopeError
from .evaluation import as_state, evaluate_points, stack

DEFAULT_SCALES = tuple(round(x, 2) for x in np.linspace(0.0, 2.0, 21))


@dataclass(frozen=True)
class TaskVectorResult:
    """Cosine geometry of task vectors, the task-arithmetic curve and task negation.

    ``arithmetic_val[name][s]`` / ``arithmetic_test[name][s]``: accuracy on task ``name`` of
    base + scales[s] * sum(tau). ``chosen_scale`` maximizes the mean validation accuracy.
    ``negation[name]``: accuracy on the task itself ("target") and on the other tasks
    ("control") of base - scale * tau_name, per scale, with the scale chosen on validation.
    """

    names: tuple[str, ...]
    norms: tuple[float, ...]
    cosine: tuple[tuple[float, ...], ...]
    layer_cosine: dict
    scales: tuple[float, ...]
    arithmetic_val: dict
    arithmetic_test: dict
    chosen_scale: float
    chosen_test: dict
    individual_test: dict
    base_test: dict
    negation: dict

    def to_dict(self) -> dict:
        return {"names": list(self.names), "norms": list(self.norms), "cosine": [list(r) for r in self.cosine],
                "layer_cosine": {k: [list(r) for r in v] for k, v in self.layer_cosine.items()},
                "scales": list(self.scales), "arithmetic_val": self.arithmetic_val,
                "arithmetic_test": self.arithmetic_test, "chosen_scale": self.chosen_scale,
                "chosen_test": self.chosen_test, "individual_test": self.individual_test, "base_test": self.base_test,
                "negation": self.negation}


def task_vector(base: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], keys: Sequence[str]
                ) -> dict[str, torch.Tensor]:
    """tau = theta - theta_base on the given (parameter) keys."""
    return {k: state[k] - base[k] for k in keys}


def cosine_matrix(vectors: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str]) -> np.ndarray:
    """Pairwise cosine similarity of the vectors restricted to ``keys``, flattened together (float64)."""
    flat = torch.stack([torch.cat([v[k].double().reshape(-1) for k in keys]) for v in vectors])
    norms = flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
    unit = flat / norms
    return (unit @ unit.T).numpy()


def _rows(m: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(x) for x in r) for r in m)


def _scaled(base: Mapping, direction: Mapping, scales: Sequence[float]) -> dict[str, torch.Tensor]:
    """Stack of base + s * direction for each s (keys not in direction stay at base)."""
    points = [{k: base[k] + s * direction[k] if k in direction else base[k] for k in base} for s in scales]
    return stack(points)


def _accuracy(model, points, task, splits, bn_reset) -> dict[str, list[float]]:
    metrics = evaluate_points(model, points, task, splits, bn_reset=bn_reset)
    return {s: [float(a) for a in metrics[s].accuracy] for s in splits}


def _choose_negation(target_val: list[float], control_val: list[float], floor: float) -> int:
    """Index of the scale with the lowest target accuracy whose control accuracy stays >= floor."""
    ok = [i for i, c in enumerate(control_val) if c >= floor]
    return min(ok, key=lambda i: (target_val[i], i)) if ok else 0


def _checked_names(states: Mapping, tasks: Mapping) -> tuple[str, ...]:
    names = tuple(states)
    if not names:
        raise MergescopeError("task vectors: give at least one fine-tuned state")
    missing = [n for n in names if n not in tasks]
    if missing:
        raise MergescopeError(f"task vectors: no task for {', '.join(missing)}")
    return names


def _negation(model: nn.Module, theta0, tau, name: str, names, tasks, scales, bn_reset: bool,
              control_floor: float) -> dict:
    """base - lambda * tau for one task: accuracy on it and on the others, lambda chosen on validation."""
    points = _scaled(theta0, tau, [-s for s in scales])
    target = _accuracy(model, points, tasks[name], ("val", "test"), bn_reset)
    others = [_accuracy(model, points, tasks[m], ("val", "test"), bn_reset) for m in names if m != name]
    control = {s: list(np.mean([o[s] for o in others], axis=0)) for s in ("val", "test")}
    pick = _choose_negation(target["val"], control["val"], control_floor * control["val"][0])
    return {"target_val": target["val"], "target_test": target["test"], "control_val": control["val"],
            "control_test": control["test"], "chosen_scale": scales[pick],
            "chosen_target_test": target["test"][pick], "chosen_control_test": control["test"][pick]}


def task_vectors(model: nn.Module, base: Mapping[str, torch.Tensor], states: Mapping[str, Mapping[str, torch.Tensor]],
                 tasks: Mapping[str, object], scales: Sequence[float] = DEFAULT_SCALES, bn_reset: bool = True,
                 control_floor: float = 0.95) -> TaskVectorResult:
    """Cosines (global and per parameter tensor), task arithmetic and negation for fine-tunes of ``base``.

    ``states[name]`` was fine-tuned from ``base`` on ``tasks[name]``. Arithmetic: base +
    lambda * sum(tau), lambda picked by mean validation accuracy over the tasks, reported on test.
    Negation (needs >= 2 tasks): base - lambda * tau_i; lambda picked on validation as the largest
    forgetting of task i that keeps accuracy on the other tasks >= ``control_floor`` x the base's
    (Ilharco et al.'s criterion).
    """
    names = _checked_names(states, tasks)
    scales = tuple(float(s) for s in scales)
    theta0 = as_state(model, base, "base")
    thetas = {n: as_state(model, states[n], n) for n in names}
    keys = [k for k, _ in model.named_parameters()]
    taus = [task_vector(theta0, thetas[n], keys) for n in names]
    cos = cosine_matrix(taus, keys)
    layer_cos = {k: _rows(cosine_matrix(taus, [k])) for k in keys}
    norms = tuple(float(torch.cat([t[k].double().reshape(-1) for k in keys]).norm()) for t in taus)

    total = {k: sum(t[k] for t in taus) for k in keys}
    summed = _scaled(theta0, total, scales)
    arith = {n: _accuracy(model, summed, tasks[n], ("val", "test"), bn_reset) for n in names}
    mean_val = np.mean([arith[n]["val"] for n in names], axis=0)
    best = int(np.argmax(mean_val))
    one = stack([theta0, *thetas.values()])
    single = {n: _accuracy(model, one, tasks[n], ("test",), bn_reset)["test"] for n in names}

    negation = {n: _negation(model, theta0, taus[i], n, names, tasks, scales, bn_reset, control_floor)
                for i, n in enumerate(names)} if len(names) >= 2 else {}
    return TaskVectorResult(
        names=names, norms=norms, cosine=_rows(cos), layer_cosine=layer_cos, scales=scales,
        arithmetic_val={n: arith[n]["val"] for n in names}, arithmetic_test={n: arith[n]["test"] for n in names},
        chosen_scale=scales[best], chosen_test={n: arith[n]["test"][best] for n in names},
        individual_test={n: single[n][1 + i] for i, n in enumerate(names)}, base_test={n: single[n][0] for n in names},
        negation=negation)
