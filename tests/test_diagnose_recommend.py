"""The recommendation rule on synthetic signal dicts: every branch, the numbers in its reasons, None-safety."""

from __future__ import annotations

import json
import math

import pytest

from mergescope.diagnose.recommend import (
    ALIGNMENT_GAP_LARGE,
    SIGN_CONFLICT_HIGH,
    TASK_VECTOR_SIMILAR,
    recommend,
)

KEYS = {"family", "method", "expected_change", "metric", "reasons"}
SHARED = {"relative_distance": 0.05, "alignment_gap": 0.01, "task_vector_cosine": None, "sign_conflict": None,
          "norm_ratio": 1.02, "n_models": 2, "n_parameters": 1000}
INDEPENDENT = {**SHARED, "relative_distance": 1.3, "alignment_gap": 0.34}


def measured(**figures) -> dict:
    base = {"barrier_loss": 0.01, "barrier_accuracy": 0.0, "members_accuracy": 0.90, "average_accuracy": None,
            "ensemble_accuracy": None, "split": "val", "sample_size": 500}
    return {**base, **figures}


def se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


def text(result: dict) -> str:
    return " | ".join(result["reasons"])


def check_shape(result: dict) -> None:
    assert set(result) == KEYS
    assert result["reasons"] and all(isinstance(r, str) and "\n" not in r for r in result["reasons"])
    json.dumps(result, allow_nan=False)


# --- data-free (no task) -----------------------------------------------------------------------
@pytest.mark.parametrize("signals, family, method, cited", [
    (SHARED, "average", "linear", ["0.010", "0.050"]),
    (INDEPENDENT, "ensemble", "probs", ["0.340", "1.300"]),
    ({**SHARED, "task_vector_cosine": 0.93, "sign_conflict": 0.05}, "average", "linear", ["0.930"]),
    ({**SHARED, "task_vector_cosine": 0.12, "sign_conflict": 0.08}, "task_vectors", "task_arithmetic",
     ["0.120", "0.080"]),
    ({**SHARED, "task_vector_cosine": 0.12, "sign_conflict": 0.41}, "task_vectors", "ties", ["0.120", "0.410"]),
    # a large alignment gap wins over a shared base: the units do not correspond
    ({**INDEPENDENT, "task_vector_cosine": 0.02, "sign_conflict": 0.45}, "ensemble", "probs", ["0.340"]),
])
def test_data_free_branches(signals, family, method, cited):
    result = recommend(signals, None)
    check_shape(result)
    assert (result["family"], result["method"]) == (family, method)
    assert result["expected_change"] is None
    assert "no task" in text(result)
    for number in cited:
        assert number in text(result)


def test_thresholds_are_inclusive_at_the_boundary():
    at_gap = recommend({"alignment_gap": ALIGNMENT_GAP_LARGE}, None)
    below_gap = recommend({"alignment_gap": math.nextafter(ALIGNMENT_GAP_LARGE, 0)}, None)
    assert (at_gap["family"], below_gap["family"]) == ("ensemble", "average")
    at_cos = recommend({"task_vector_cosine": TASK_VECTOR_SIMILAR, "sign_conflict": 0.9}, None)
    assert at_cos["family"] == "average"
    at_sign = recommend({"task_vector_cosine": 0.0, "sign_conflict": SIGN_CONFLICT_HIGH}, None)
    assert at_sign["method"] == "ties"


@pytest.mark.parametrize("signals", [{}, None, {k: None for k in SHARED},
                                     {"alignment_gap": float("nan"), "task_vector_cosine": float("inf")},
                                     {"alignment_gap": "0.5", "task_vector_cosine": [0.1], "sign_conflict": True}])
def test_missing_or_odd_signals_fall_back_to_the_average(signals):
    result = recommend(signals, None)
    check_shape(result)
    assert (result["family"], result["expected_change"]) == ("average", None)


@pytest.mark.parametrize("empty", [None, {}, {"split": "val", "sample_size": 512},
                                   {k: None for k in measured()}])
def test_no_measured_figures_means_no_expected_number(empty):
    result = recommend(INDEPENDENT, empty)
    assert result["expected_change"] is None and result["family"] == "ensemble"
    assert "align first and measure" in text(result)


# --- with measurements ------------------------------------------------------------------------
def test_prior_kept_when_within_noise_of_the_best_merge():
    n = 500
    noise = se(0.95, n)
    m = measured(members_accuracy=0.93, average_accuracy=0.95 - 0.9 * noise, task_arithmetic_accuracy=0.95,
                 ties_accuracy=0.94, ensemble_accuracy=0.95, sample_size=n)
    result = recommend({**SHARED, "task_vector_cosine": 0.9, "sign_conflict": 0.1}, m)
    check_shape(result)
    assert (result["family"], result["method"]) == ("average", "linear")
    assert result["expected_change"] == pytest.approx(m["average_accuracy"] - 0.93)
    assert f"{m['average_accuracy']:.3f}" in text(result) and f"{noise:.3f}" in text(result)


def test_prior_replaced_when_a_measured_merge_beats_it_beyond_noise():
    n = 500
    noise = se(0.95, n)
    m = measured(members_accuracy=0.90, average_accuracy=0.95 - 1.5 * noise, task_arithmetic_accuracy=0.95,
                 ties_accuracy=0.93, ensemble_accuracy=0.94, sample_size=n)
    result = recommend({**SHARED, "task_vector_cosine": 0.9}, m)
    assert (result["family"], result["method"]) == ("task_vectors", "task_arithmetic")
    assert result["expected_change"] == pytest.approx(0.05)
    assert "beats the weight signals' choice" in text(result)


def test_ensemble_when_it_beats_every_single_model_and_says_the_cost():
    m = measured(members_accuracy=[0.90, 0.92], average_accuracy=0.55, ensemble_accuracy=0.95,
                 barrier_accuracy=0.37, barrier_loss=1.21)
    result = recommend(INDEPENDENT, m)
    check_shape(result)
    assert (result["family"], result["method"]) == ("ensemble", "probs")
    assert result["expected_change"] == pytest.approx(0.95 - 0.91)
    assert "0.370" in text(result) and "k forward passes" in text(result)


def test_aligned_merge_chosen_over_ensemble_within_noise():
    m = measured(members_accuracy=[0.90, 0.92], average_accuracy=0.55, aligned_accuracy=0.935, ensemble_accuracy=0.94)
    result = recommend(INDEPENDENT, m)
    assert (result["family"], result["method"]) == ("align", "weight+linear")
    assert result["expected_change"] == pytest.approx(0.935 - 0.91)


def test_do_not_merge_when_nothing_reaches_the_best_member():
    m = measured(members_accuracy=[0.80, 0.95], average_accuracy=0.70, ensemble_accuracy=0.93)
    result = recommend(INDEPENDENT, m)
    check_shape(result)
    assert (result["family"], result["method"]) == ("none", "best_member")
    assert result["expected_change"] == pytest.approx(0.95 - 0.875)  # keeping the best member vs the mean
    assert "0.700" in text(result) and "0.950" in text(result)


def test_do_not_merge_against_the_members_mean_when_only_the_mean_is_known():
    m = measured(members_accuracy=0.90, average_accuracy=0.40, ensemble_accuracy=0.905)
    result = recommend(INDEPENDENT, m)
    assert result["family"] == "none" and result["expected_change"] == pytest.approx(0.0)


def test_no_sample_size_means_no_noise_margin():
    m = measured(members_accuracy=0.90, average_accuracy=0.901, ensemble_accuracy=0.902, sample_size=None)
    assert recommend(SHARED, m)["family"] == "ensemble"


def test_binomial_noise_decides_exactly_at_one_standard_error():
    n, p = 200, 0.9
    for factor, family in ((0.99, "average"), (1.01, "ensemble")):
        delta = 0.0
        for _ in range(50):  # the noise is taken at the best figure (p + delta): a fixed point
            delta = factor * se(p + delta, n)
        m = measured(members_accuracy=[0.85, p - 0.01], average_accuracy=p, ensemble_accuracy=p + delta, sample_size=n)
        assert recommend(SHARED, m)["family"] == family


def test_loss_metric_when_only_losses_are_measured():
    m = {"members_loss": 2.0, "average_loss": 1.8, "ensemble_loss": 1.79, "barrier_loss": 0.02, "split": "val",
         "sample_size": 64}
    result = recommend(SHARED, m)
    check_shape(result)
    assert (result["family"], result["metric"]) == ("average", "loss")
    assert result["expected_change"] == pytest.approx(-0.2)  # lower loss is better: a negative change
    worse = recommend(SHARED, {**m, "average_loss": 2.5, "ensemble_loss": 2.4})
    assert worse["family"] == "none"


def test_only_an_ensemble_figure_keeps_the_data_free_choice():
    result = recommend(INDEPENDENT, {"ensemble_accuracy": 0.9, "sample_size": 100})
    assert result["family"] == "ensemble" and result["expected_change"] is None
    assert "no comparison" in text(result)


def test_inputs_are_not_modified():
    signals = dict(INDEPENDENT)
    m = measured(members_accuracy=[0.9, 0.92], average_accuracy=0.5, ensemble_accuracy=0.95)
    before = (json.dumps(signals), json.dumps(m))
    recommend(signals, m)
    assert (json.dumps(signals), json.dumps(m)) == before


def test_best_member_read_from_the_member_accuracies_list():
    m = measured(members_accuracy=0.875, member_accuracies=[0.80, 0.95], average_accuracy=0.90, ensemble_accuracy=0.90)
    result = recommend(SHARED, m)
    assert result["family"] == "none" and result["expected_change"] == pytest.approx(0.95 - 0.875)
