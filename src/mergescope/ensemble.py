"""Output ensembles of N models, and the weight average they are compared with.

Ensembling is the first family of merging: keep every model and combine what they *output*
(Lakshminarayanan et al. 2017; Ganaie et al. 2022 survey). It costs N forward passes, where a
weight average (Wortsman et al. 2022, "model soups") costs one. Methods:

- ``probs``: mean of softmax probabilities, p = (1/N) sum_i softmax(z_i).
- ``logits``: softmax of the mean logits, p = softmax((1/N) sum_i z_i).
- ``vote``: majority vote of argmaxes (ties broken by mean probability); p = vote fractions
  (its NLL clips p at 1e-6: a vote gives no likelihood, so compare votes by accuracy).
- ``weighted``: probabilities averaged with weights proportional to validation accuracy.
- ``features``: average the penultimate features (input of the head), apply the averaged head.
- ``features-refit``: average the penultimate features, fit a new linear head on train features.

``evaluate`` reports accuracy, loss (mean NLL of p), expected calibration error (ECE, 15 equal
bins; Guo et al. 2017) and the inference cost (parameters, FLOPs per example).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import MergescopeError
from .state import average, normalized_weights
from .state import reset_batchnorm as _reset

METHODS = ("probs", "logits", "vote", "weighted", "features", "features-refit")
ECE_BINS = 15
VOTE_FLOOR = 1e-6  # a vote gives no likelihood: its NLL uses vote fractions clipped here


@dataclass(frozen=True)
class EnsembleResult:
    """Metrics of one combination of models on one split, with its inference cost."""

    method: str
    n_models: int
    split: str
    accuracy: float
    loss: float
    ece: float
    params: int
    flops: int
    member_accuracy: tuple[float, ...]
    member_loss: tuple[float, ...] = ()
    member_ece: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("member_accuracy", "member_loss", "member_ece"):
            d[key] = list(getattr(self, key))
        return d


# ---------------------------------------------------------------- states and forward passes

def as_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain dict of tensors (reads a lazy checkpoint once)."""
    return {k: state[k] for k in state}


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Weighted mean of floating tensors, sum_i w_i theta_i with sum w = 1 (``mergescope.state.average``)."""
    return average(states, weights)


@torch.no_grad()
def run(model: nn.Module, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Outputs of ``model`` with ``state`` substituted (eval mode, model's own tensors untouched)."""
    was_training = model.training
    model.eval()
    try:
        return functional_call(model, dict(state), (x,), strict=False)
    finally:
        model.train(was_training)


def reset_batchnorm(model: nn.Module, state: Mapping[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose BatchNorm running statistics are those of its activations on ``x``
    (``mergescope.state.reset_batchnorm``: exact per-layer mean and population variance). States
    of models without BatchNorm come back unchanged."""
    return _reset(model, state, [x])


def weight_average(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], task) -> dict[str, torch.Tensor]:
    """The uniform weight average, with BatchNorm statistics recomputed on the train split."""
    return reset_batchnorm(model, average_states([as_state(s) for s in states]), split_tensors(task, "train")[0])


def split_tensors(task, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) of a split, concatenated (classification: ensembles, soups and analyses compare class
    probabilities per example; a language-model task is refused in one line)."""
    if hasattr(task, "token_sums"):
        raise MergescopeError(f"{task.name}: a language-model task (per-token loss); ensembles, soups and analyses "
                              "need a classification task (.csv/.jsonl/.npz); landscape and evaluate take it")
    xs, ys = zip(*task.batches(split))
    return torch.cat(xs), torch.cat(ys)


def head_module(model: nn.Module, head: str | None = None) -> tuple[str, nn.Linear]:
    """The classifier head: the named module, else the last ``nn.Linear`` registered."""
    modules = dict(model.named_modules())
    if head is not None:
        if head not in modules:
            raise MergescopeError(f"model has no module {head!r} to use as the head")
        return head, modules[head]
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise MergescopeError("model has no nn.Linear head; feature averaging needs one (pass head=NAME)")
    return linears[-1]


@torch.no_grad()
def penultimate(model: nn.Module, state: Mapping[str, torch.Tensor], x: torch.Tensor, head: str | None = None
                ) -> torch.Tensor:
    """The head's input features for ``x`` under ``state`` (captured with a forward pre-hook)."""
    _, module = head_module(model, head)
    captured = []
    hook = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    try:
        run(model, state, x)
    finally:
        hook.remove()
    return captured[0]


# ---------------------------------------------------------------- combination rules (pure)

def combine(logits: torch.Tensor, method: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Ensemble probabilities [N, C] from member logits [M, N, C] by an output rule."""
    if method == "probs":
        return logits.softmax(-1).mean(0)
    if method == "logits":
        return logits.mean(0).softmax(-1)
    if method == "weighted":
        w = weights if weights is not None else torch.ones(logits.shape[0])
        w = (w / w.sum()).to(logits.dtype)
        return torch.einsum("m,mnc->nc", w, logits.softmax(-1))
    if method == "vote":
        return vote_fractions(logits)
    raise MergescopeError(f"unknown ensemble method {method!r} (choose from {', '.join(METHODS)})")


def vote_fractions(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of the M members whose argmax is each class, [N, C]."""
    counts = F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(0)
    return counts.to(logits.dtype) / logits.shape[0]


def vote_predictions(logits: torch.Tensor) -> torch.Tensor:
    """Majority class; ties between equally voted classes go to the higher mean probability."""
    fractions = vote_fractions(logits)
    tied = fractions == fractions.max(-1, keepdim=True).values
    return torch.where(tied, logits.softmax(-1).mean(0), torch.tensor(-1.0, dtype=logits.dtype)).argmax(-1)


def metrics(probs: torch.Tensor, y: torch.Tensor, floor: float = 0.0, pred: torch.Tensor | None = None
            ) -> tuple[float, float, float]:
    """(accuracy, mean NLL, ECE) of probabilities [N, C] against labels [N]; ``pred`` overrides argmax."""
    pred = probs.argmax(-1) if pred is None else pred
    acc = (pred == y).double().mean().item()
    p_true = probs.gather(1, y[:, None]).squeeze(1).double()
    nll = (-p_true.clamp_min(floor).log()).mean().item() if floor else (-p_true.log()).mean().item()
    return acc, nll, expected_calibration_error(probs, y, pred=pred)


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS,
                               pred: torch.Tensor | None = None) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins (Guo et al. 2017);
    confidence is the probability of the predicted class."""
    pred = probs.argmax(-1) if pred is None else pred
    conf = probs.double().gather(1, pred[:, None]).squeeze(1)
    correct = (pred == y).double()
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.double().mean().item() * abs(correct[mask].mean().item() - conf[mask].mean().item())
    return total


# ---------------------------------------------------------------- cost

def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_example(model: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs for one example, counted by torch's FlopCounterMode (matmuls and convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example[:1])
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def ensemble_cost(model: nn.Module, example: torch.Tensor, n: int, method: str, head: str | None = None
                  ) -> tuple[int, int]:
    """(params, FLOPs/example): n full models for output ensembles; shared head for feature averaging."""
    params, flops = count_params(model), flops_per_example(model, example)
    if method == "weight-average":
        return params, flops
    if method.startswith("features"):
        _, h = head_module(model, head)
        head_params, head_flops = sum(p.numel() for p in h.parameters()), 2 * h.in_features * h.out_features
        return n * (params - head_params) + head_params, n * (flops - head_flops) + head_flops
    return n * params, n * flops


# ---------------------------------------------------------------- feature averaging

def refit_head(features: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0, steps: int = 200,
               weight_decay: float = 1e-4) -> nn.Linear:
    """A linear head fitted by full-batch L-BFGS on cross-entropy (+ L2), deterministic given ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(features.shape[1], num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(features), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head.eval()


def feature_average_probs(model: nn.Module, states: Sequence[Mapping], task, split: str, refit: bool,
                          head: str | None = None, seed: int = 0) -> torch.Tensor:
    """Probabilities from averaged penultimate features, through the averaged or a re-fitted head."""
    x, _ = split_tensors(task, split)
    feats = torch.stack([penultimate(model, s, x, head) for s in states]).mean(0)
    if refit:
        xt, yt = split_tensors(task, "train")
        train_feats = torch.stack([penultimate(model, s, xt, head) for s in states]).mean(0)
        classes = getattr(task, "num_classes", int(yt.max()) + 1)
        with torch.no_grad():
            return refit_head(train_feats.flatten(1), yt, classes, seed=seed)(feats.flatten(1)).softmax(-1)
    name, _ = head_module(model, head)
    w = torch.stack([s[f"{name}.weight"] for s in states]).mean(0)
    b = torch.stack([s[f"{name}.bias"] for s in states]).mean(0) if f"{name}.bias" in states[0] else None
    return F.linear(feats, w, b).softmax(-1)


# ---------------------------------------------------------------- public entry points

def members(model: nn.Module | Sequence[nn.Module], n: int) -> list[nn.Module]:
    """One module per member: ``model`` for all of them, or a list of modules, one per state (members of
    different architectures, e.g. a partial-zip checkpoint next to a plain one, in an output ensemble)."""
    if isinstance(model, nn.Module):
        return [model] * n
    modules = list(model)
    if len(modules) != n:
        raise MergescopeError(f"ensemble: {len(modules)} modules for {n} states; give one module per state")
    return modules


def single(model, what: str) -> nn.Module:
    """The one architecture a weight-space method needs (a list of different modules is refused)."""
    if isinstance(model, nn.Module):
        return model
    raise MergescopeError(f"{what} needs every member in one architecture; output ensembles (probs, logits, vote, "
                          "weighted) take members of different architectures")


def member_logits(model: nn.Module | Sequence[nn.Module], states: Sequence[Mapping], task, split: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [M, N, C] of every member on a split, and the labels [N]."""
    x, y = split_tensors(task, split)
    return torch.stack([run(m, s, x) for m, s in zip(members(model, len(states)), states)]), y


def member_metrics(logits: torch.Tensor, y: torch.Tensor) -> tuple[tuple[float, ...], ...]:
    """(accuracies, losses, ECEs) of each member from its logits [M, N, C]: a member is a row of the
    table too, measured exactly like the combinations."""
    rows = [metrics(member.softmax(-1), y) for member in logits]
    return tuple(tuple(r[i] for r in rows) for i in range(3))


def evaluate(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], task, method: str = "probs",
             split: str = "test", weights: Sequence[float] | None = None, head: str | None = None,
             seed: int = 0) -> EnsembleResult:
    """Evaluate an output ensemble of ``states`` (all fitting ``model``) on ``split`` of ``task``.

    ``weights`` (method "weighted") default to each member's validation accuracy.
    """
    if method not in METHODS:
        raise MergescopeError(f"unknown ensemble method {method!r} (choose from {', '.join(METHODS)})")
    if not states:
        raise MergescopeError("ensemble: no models given")
    states = [as_state(s) for s in states]
    logits, y = member_logits(model, states, task, split)
    scores = member_metrics(logits, y)
    if method.startswith("features"):
        probs = feature_average_probs(single(model, f"method {method!r}"), states, task, split,
                                      refit=method == "features-refit", head=head, seed=seed)
    else:
        w = None
        if method == "weighted":
            w = normalized_weights(weights, len(states)).float() if weights is not None else validation_accuracies(
                model, states, task)
        probs = combine(logits, method, w)
    vote = method == "vote"
    acc, loss, ece = metrics(probs, y, floor=VOTE_FLOOR if vote else 0.0, pred=vote_predictions(logits) if vote else None)
    example = next(iter(task.batches(split)))[0]
    if isinstance(model, nn.Module):
        params, flops = ensemble_cost(model, example, len(states), method, head)
    else:  # members of different architectures: the sum of their costs
        params = sum(count_params(m) for m in model)
        flops = sum(flops_per_example(m, example) for m in model)
    return EnsembleResult(method, len(states), split, acc, loss, ece, params, flops, *scores)


def validation_accuracies(model: nn.Module, states: Sequence[Mapping], task, split: str = "val") -> torch.Tensor:
    """Each member's accuracy on ``split`` (the default weights of the "weighted" method)."""
    logits, y = member_logits(model, states, task, split)
    return (logits.argmax(-1) == y).float().mean(-1)


def evaluate_weight_average(model: nn.Module, states: Sequence[Mapping[str, torch.Tensor]], task,
                            split: str = "test", reset_bn: bool = True) -> EnsembleResult:
    """The single uniformly weight-averaged model, reported like an ensemble (cost of one model);
    BatchNorm statistics are recomputed on train data unless ``reset_bn`` is False."""
    model = single(model, "the weight average")
    states = [as_state(s) for s in states]
    logits, y = member_logits(model, states, task, split)
    scores = member_metrics(logits, y)
    avg = weight_average(model, states, task) if reset_bn else average_states(states)
    avg_logits, _ = member_logits(model, [avg], task, split)
    acc, loss, ece = metrics(avg_logits[0].softmax(-1), y)
    params, flops = ensemble_cost(model, next(iter(task.batches(split)))[0], 1, "weight-average")
    return EnsembleResult("weight-average", len(states), split, acc, loss, ece, params, flops, *scores)
