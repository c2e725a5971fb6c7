"""The study's intervals and verdicts against independent references (scipy, closed forms)."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from mergescope.study.stats import compare, interval


def test_interval_matches_scipy_t_interval():
    values = [0.12, 0.31, 0.18, 0.25, 0.09]
    got = interval(values)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert got.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert got.low == pytest.approx(low, rel=1e-12) and got.high == pytest.approx(high, rel=1e-12)
    assert got.n == 5 and got.values == tuple(values)


def test_two_replicates_use_the_wide_t_quantile():
    got = interval([1.0, 3.0])  # sd = sqrt(2), sem = 1, t(0.975, 1) = 12.706
    assert got.half == pytest.approx(12.7062047, rel=1e-6)


def test_single_replicate_has_no_interval():
    got = interval([0.5])
    assert got.half is None and got.low is None and not got.excludes_zero()
    assert got.text() == "0.500"


def test_constant_values_have_zero_width():
    got = interval([0.25, 0.25, 0.25])
    assert got.half == 0.0 and got.excludes_zero()


def test_compare_is_paired_not_independent():
    # A is always exactly 0.01 above B while both vary a lot: paired, the gap is certain.
    b = [0.50, 0.80, 0.65]
    a = [x + 0.01 for x in b]
    c = compare("A", a, "B", b)
    assert c.winner == "A"
    assert "A beats B" in c.sentence("test accuracy")
    # the unpaired intervals overlap almost entirely, which a two-sample view would call a tie
    assert interval(a).low < interval(b).high


def test_compare_ties_within_noise_when_the_interval_holds_zero():
    c = compare("A", [0.90, 0.91, 0.89], "B", [0.91, 0.89, 0.90])
    assert c.winner is None
    text = c.sentence("test accuracy")
    assert "tie within noise" in text and "n=3" in text


def test_lower_is_better_flips_the_winner():
    c = compare("aligned", [0.01, 0.02, 0.015], "naive", [0.5, 0.6, 0.55], higher_is_better=False)
    assert c.winner == "aligned"


def test_compare_refuses_unpaired_counts():
    with pytest.raises(ValueError):
        compare("A", [1, 2], "B", [1, 2, 3])


def test_interval_dict_keeps_every_replicate():
    d = interval([1.0, 2.0, 4.0]).to_dict()
    assert d["values"] == [1.0, 2.0, 4.0] and d["n"] == 3
    assert math.isclose(d["low"] + d["high"], 2 * d["mean"])


def test_a_win_is_reported_as_a_positive_gap_with_its_interval():
    c = compare("aligned", [0.1, 0.12, 0.11], "naive", [0.9, 1.0, 0.95], higher_is_better=False)
    text = c.sentence("the barrier")
    gap = interval([0.8, 0.88, 0.84])
    assert text.startswith(f"aligned beats naive on the barrier by {gap.mean:.3f} (95% CI [{gap.low:.3f}, {gap.high:.3f}]")
