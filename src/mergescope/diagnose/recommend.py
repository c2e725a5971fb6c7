"""Which merge to run, from the diagnosis: a family, a method, the expected change and the reasons.

``recommend(signals, measured)`` is a small, documented decision rule (docs/diagnose.md, "Does the
diagnosis predict?"); each branch follows a finding of the merging literature (the survey of
Khan et al. 2024 and "Rethinking Weight-Averaged Model-merging", both in docs/):

1. Data-free prior (weights only). Models that share a basin (shared parent: small alignment
   gap) are averaged (model soups). With a base, dissimilar task vectors (label-subset or other-task
   fine-tunes) call for task arithmetic, and TIES when many of their signs conflict. Independently
   trained models (large alignment gap: their units are permuted) are aligned first (weight
   matching + average, BatchNorm statistics reset / REPAIR) when a task can check the result;
   without one the output ensemble is recommended (whether alignment closes the barrier cannot be
   read from the weights).
2. With measurements on a validation sample, the prior's merge is kept when it is within noise of
   the best measured single-model merge, else the best measured one replaces it; an output
   ensemble is chosen only when it beats every single model by more than noise (it costs k forward
   passes); when no merge reaches the best member, do not merge.

"Noise" is one standard error of an accuracy on the sample, sqrt(p (1 - p) / n) (at least 1/n),
or, for a loss, ``LOSS_NOISE`` relative. Thresholds were chosen on the digits families only
(bench/diagnose_predicts.py); MNIST-1D is held out. Without a task there is no expected number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# Data-free thresholds (chosen on digits families, bench/diagnose_predicts.py; MNIST-1D held out).
ALIGNMENT_GAP_LARGE = 0.10   # increase of mean row cosine under the best permutation: independent training
TASK_VECTOR_SIMILAR = 0.50   # mean task-vector cosine above which fine-tunes move one way: average them
SIGN_CONFLICT_HIGH = 0.20    # fraction of TIES sign disagreements above which TIES beats plain task arithmetic
LOSS_NOISE = 0.02            # relative loss difference treated as noise when only losses are measured

# (family, method, measured key stem): the single-model merges a diagnosis can measure.
MERGES = (("average", "linear", "average"), ("task_vectors", "task_arithmetic", "task_arithmetic"),
          ("task_vectors", "ties", "ties"), ("align", "weight+linear", "aligned"))
LABELS = {"linear": "uniform average", "task_arithmetic": "task arithmetic", "ties": "TIES",
          "weight+linear": "weight matching + average", "probs": "output ensemble (probabilities)"}


def _num(value) -> float | None:
    """A finite float, or None (missing, None, NaN, a list)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _members(value) -> tuple[float | None, float | None]:
    """(mean, best) of the members' figure: a number is their mean (best unknown), a list gives both."""
    if isinstance(value, (list, tuple)):
        xs = [x for x in map(_num, value) if x is not None]
        return (sum(xs) / len(xs), max(xs)) if xs else (None, None)
    return _num(value), None


def prior(signals: Mapping) -> tuple[str, str, list[str]]:
    """The data-free choice (family, method, reasons) from the weight signals alone."""
    gap, cos = _num(signals.get("alignment_gap")), _num(signals.get("task_vector_cosine"))
    conflict, dist = _num(signals.get("sign_conflict")), _num(signals.get("relative_distance"))
    reasons = [] if dist is None else [f"relative distance {dist:.3f} between the models"]
    if gap is not None and gap >= ALIGNMENT_GAP_LARGE:
        reasons.append(f"alignment gap {gap:.3f} >= {ALIGNMENT_GAP_LARGE}: units are permuted "
                       "(independent training), so align first (weight matching, then average; BN reset / REPAIR)")
        return "align", "weight+linear", reasons
    if gap is not None:
        reasons.append(f"alignment gap {gap:.3f} < {ALIGNMENT_GAP_LARGE}: units already correspond (shared origin)")
    if cos is not None and cos < TASK_VECTOR_SIMILAR:
        reasons.append(f"task-vector cosine {cos:.3f} < {TASK_VECTOR_SIMILAR}: the fine-tunes learned different things")
        if conflict is not None and conflict >= SIGN_CONFLICT_HIGH:
            reasons.append(f"sign conflict {conflict:.3f} >= {SIGN_CONFLICT_HIGH}: TIES resolves the disagreeing signs")
            return "task_vectors", "ties", reasons
        if conflict is not None:
            reasons.append(f"sign conflict {conflict:.3f} < {SIGN_CONFLICT_HIGH}: plain task arithmetic suffices")
        return "task_vectors", "task_arithmetic", reasons
    if cos is not None:
        reasons.append(f"task-vector cosine {cos:.3f} >= {TASK_VECTOR_SIMILAR}: the fine-tunes moved the same way")
    reasons.append("one basin: a uniform average (model soup) keeps it")
    return "average", "linear", reasons


def _metric(measured: Mapping) -> str | None:
    """'accuracy' when any accuracy was measured, else 'loss' when losses were, else None."""
    stems = [stem for *_, stem in MERGES] + ["ensemble"]
    for metric in ("accuracy", "loss"):
        if any(_num(measured.get(f"{stem}_{metric}")) is not None for stem in stems):
            return metric
    return None


def _noise(measured: Mapping, metric: str, value: float) -> float:
    """One standard error of the metric on the sample (accuracy: binomial, at least 1/n)."""
    if metric == "loss":
        return LOSS_NOISE * abs(value)
    n = _num(measured.get("sample_size")) or 0
    if n < 1:
        return 0.0
    return max(math.sqrt(max(value * (1 - value), 0.0) / n), 1.0 / n)


def _context(measured: Mapping, metric: str) -> str:
    n = _num(measured.get("sample_size"))
    size = f" of {int(n)}" if n else ""
    return f"{measured.get('split') or 'val'} sample{size}"


def recommend(signals: Mapping, measured: Mapping | None = None) -> dict:
    """The recommendation: {"family", "method", "expected_change", "metric", "reasons"}.

    ``signals``: the data-free global signals (``diagnose.signals.data_free``); any may be None.
    ``measured``: the with-task figures on a validation sample, or None. ``expected_change`` is the
    measured figure of the recommended choice minus the members' mean (accuracy: higher is better;
    loss: lower), None without measurements.
    """
    family, method, reasons = prior(signals or {})
    metric = _metric(measured) if measured else None
    if metric is None:
        return _data_free(family, method, reasons)
    return _measured_choice(family, method, reasons, measured, metric)


def _data_free(family: str, method: str, reasons: list[str]) -> dict:
    """Without measurements: the prior, except that permuted (independent) models get the ensemble.

    Whether alignment removes the barrier is not visible in the weights: on digits it did for the
    MLP and not for the narrow CNN, ResNet and transformer (bench/diagnose_predicts.py, Ainsworth et
    al.: only wide enough models become linearly connected after matching), where the aligned average
    lost 5-77 points; the ensemble was within noise of the best family in every independent digits set.
    """
    if family == "align":
        reasons.append("without a task it is unknown whether alignment removes the barrier (on digits it did for "
                       "the MLP, not for the CNN, ResNet or transformer): the output ensemble is the safe choice "
                       "(k forward passes per input); for one model, align first and measure with a task")
        family, method = "ensemble", "probs"
    reasons.append("no task given: no expected change measured (pass a task to measure one)")
    return {"family": family, "method": method, "expected_change": None, "metric": "accuracy", "reasons": reasons}


def _measured_choice(family: str, method: str, reasons: list[str], measured: Mapping, metric: str) -> dict:
    """Keep, replace or overrule the prior with the measured figures (see the module docstring)."""
    sign = 1.0 if metric == "accuracy" else -1.0  # higher is better after multiplying by sign
    where = _context(measured, metric)
    mean, best_member = _members(measured.get(f"members_{metric}"))
    if metric == "accuracy" and best_member is None:  # diagnose.measured lists each member's accuracy apart
        best_member = _members(measured.get("member_accuracies"))[1]
    merges = {(f, m): v for f, m, stem in MERGES if (v := _num(measured.get(f"{stem}_{metric}"))) is not None}
    ensemble = _num(measured.get(f"ensemble_{metric}"))
    barrier = _num(measured.get(f"barrier_{'accuracy' if metric == 'accuracy' else 'loss'}"))
    if barrier is not None:
        reasons.append(f"{metric} barrier {barrier:.3f} on the linear path ({where})")
    figures = [*merges.values(), *(x for x in (ensemble, best_member, mean) if x is not None)]
    noise = _noise(measured, metric, max(figures, key=lambda v: sign * v))
    choice = _best_merge(family, method, merges, sign, noise, reasons, metric, where)
    value = merges.get(choice) if choice else None
    single = max([x for x in (value, best_member, mean) if x is not None], key=lambda v: sign * v, default=None)
    if single is None:  # only an ensemble figure: nothing to compare it with
        reasons.append(f"only the ensemble was measured ({where}): no comparison, the weight signals decide")
        return _data_free(family, method, reasons)
    if ensemble is not None and sign * (ensemble - single) > noise:
        reasons.append(f"output ensemble {metric} {ensemble:.3f} beats every single model by more than noise "
                       f"({noise:.3f}, {where}); it costs k forward passes per input")
        return _result("ensemble", "probs", ensemble, mean, metric, reasons)
    reference = single if value is None else (best_member if best_member is not None else mean)
    if value is None or (reference is not None and sign * (reference - value) > noise):
        what = "the best member" if best_member is not None else "the members' mean"
        shown = "nothing measured" if value is None else f"{LABELS[choice[1]]} {metric} {value:.3f}"
        reasons.append(f"no merge reaches {what} ({shown} vs {reference:.3f}, noise {noise:.3f}): do not merge, "
                       "keep the best member")
        return _result("none", "best_member", reference, mean, metric, reasons)
    return _result(choice[0], choice[1], value, mean, metric, reasons)


def _best_merge(family: str, method: str, merges: dict, sign: float, noise: float, reasons: list[str], metric: str,
                where: str) -> tuple[str, str] | None:
    """The prior's merge when measured and within noise of the best measured merge, else the best one."""
    if not merges:
        return None
    best = max(merges, key=lambda k: sign * merges[k])
    if (family, method) in merges:
        gap = sign * (merges[best] - merges[(family, method)])
        if gap <= noise:
            reasons.append(f"{LABELS[method]} {metric} {merges[(family, method)]:.3f} ({where}), within noise "
                           f"({noise:.3f}) of the best measured merge")
            return family, method
        reasons.append(f"measured {LABELS[best[1]]} {metric} {merges[best]:.3f} beats the weight signals' choice "
                       f"{LABELS[method]} ({merges[(family, method)]:.3f}) by more than noise ({noise:.3f}, {where})")
        return best
    if family != "none":
        reasons.append(f"{LABELS[method]} was not measured; best measured merge: {LABELS[best[1]]} {metric} "
                       f"{merges[best]:.3f} ({where})")
    return best


def _result(family: str, method: str, value: float | None, mean: float | None, metric: str, reasons: list[str]) -> dict:
    change = None if value is None or mean is None else value - mean
    if change is not None:
        reasons.append(f"expected change vs the members' mean: {change:+.3f} {metric}")
    return {"family": family, "method": method, "expected_change": change, "metric": metric, "reasons": reasons}
