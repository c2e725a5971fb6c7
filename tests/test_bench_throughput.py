"""bench/merge_throughput.py's paired ratios: the per-repeat durable walls of a method over linear's (issue 20's
1.5x-linear target is read from their spread, not from a ratio of medians)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def _bench_module(name: str):
    """A bench/ script loaded as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench_module("merge_throughput")


def _run(wall: float, sync: float) -> dict:
    return {"wall_s": wall, "sync_s": sync, "peak_rss_gb": 1.0}


def test_paired_ratios_divide_within_each_repeat(bench):
    # repeat 1: linear slow (machine busy), ties too; repeat 2: both fast. Pairing cancels the drift.
    runs = {"mergescope:linear": [_run(3.9, 0.1), _run(1.9, 0.1)],
            "mergescope:ties": [_run(5.8, 0.2), _run(2.9, 0.1)]}
    assert bench.paired_ratios(runs, "ties") == [1.5, 1.5]
    # each repeat's own pair: ties fast where linear was slow reads 0.75, not a blend of the two repeats
    runs["mergescope:ties"] = [_run(2.9, 0.1), _run(5.8, 0.2)]
    assert bench.paired_ratios(runs, "ties") == [0.75, 3.0]


def test_paired_ratios_are_sorted_and_missing_runs_give_none(bench):
    runs = {"mergescope:linear": [_run(2.0, 0.0), _run(2.0, 0.0), _run(2.0, 0.0)],
            "mergescope:dare_ties": [_run(3.2, 0.0), _run(2.6, 0.0), _run(3.0, 0.0)]}
    assert bench.paired_ratios(runs, "dare_ties") == [1.3, 1.5, 1.6]
    assert bench.paired_ratios(runs, "della") == []
    assert bench.paired_text([1.3, 1.5, 1.6]) == "1.50 (1.30-1.60)"
    assert bench.paired_text([]) == "-"


def test_vs_linear_figure_plots_and_saves_the_paired_ratios(bench, tmp_path):
    runs = {"mergescope:linear": [_run(2.0, 0.0), _run(4.0, 0.0)],
            "mergescope:ties": [_run(3.0, 0.0), _run(5.0, 0.0)]}
    results = {"dtype": "bfloat16", "out_bytes": 540_000_000, "runs": runs}
    figure, values = tmp_path / "fig.png", tmp_path / "values.json"
    bench.plot_vs_linear([("pass", results)], figure, values)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(values.read_text())["pass"]
    assert saved["fixture"] == "4 x 0.54 GB bf16" and saved["ties"] == [1.25, 1.5] and saved["della"] == []


@pytest.fixture(scope="module")
def ab():
    return _bench_module("ab_compare")


def test_paired_interval_finds_a_shift_the_rounds_share(ab):
    # each round's machine speed differs (1.0 .. 1.7 s) but B is 0.1 s faster in every round
    a = [1.0, 1.7, 1.2, 1.5, 1.1, 1.6, 1.3, 1.4]
    b = [x - 0.1 for x in a]
    mid, low, high = ab.paired_interval(a, b)
    assert mid == pytest.approx(-0.1) and low == pytest.approx(-0.1) and high == pytest.approx(-0.1)
    assert ab.verdict(low, high, larger_is_better=False) == "B better"
    assert ab.verdict(low, high, larger_is_better=True) == "B worse"


def test_paired_interval_calls_a_tie_when_the_differences_straddle_zero(ab):
    a = [2.0, 2.1, 2.2, 2.3, 2.0, 2.1, 2.2, 2.3]
    b = [2.05, 2.0, 2.3, 2.25, 2.1, 2.0, 2.25, 2.35]  # differences +0.05, -0.1, +0.1, -0.05, +0.1, -0.1, +0.05, +0.05
    mid, low, high = ab.paired_interval(a, b)
    assert mid == pytest.approx(0.05)  # the median of the eight differences, by hand
    assert low < 0 < high and ab.verdict(low, high, larger_is_better=False) == "tie within noise"
    with pytest.raises(ValueError):
        ab.paired_interval(a, b[:-1])


def test_paired_interval_is_the_sign_tests(ab):
    """Order statistics of the differences: with 8 pairs [d_(1), d_(8)] (coverage 1 - 2/256 = 99.2 %; [d_(2), d_(7)]
    covers only 1 - 18/256 = 93 %), with 20 pairs [d_(6), d_(15)] (1 - 2 P(Bin(20, 1/2) <= 5) = 95.9 %; [d_(7),
    d_(14)] 88.5 %); with 4 pairs no interval reaches 95 %: the whole range."""
    diffs = [0.5, -0.3, 0.2, 0.1, -0.2, 0.4, 0.3, 0.0]
    mid, low, high = ab.paired_interval([0.0] * 8, diffs)
    assert (low, high) == (-0.3, 0.5) and mid == pytest.approx(0.15)
    twenty = [i / 10 for i in range(20)]
    assert ab.paired_interval([0.0] * 20, twenty[::-1])[1:] == (0.5, 1.4)
    assert ab.paired_interval([0.0] * 4, [0.4, 0.1, 0.3, 0.2])[1:] == (0.1, 0.4)


def test_too_few_rounds_give_no_verdict(ab):
    """Under 6 pairs even the whole range covers the median with less than 95 % (5 pairs: 1 - 2/32 = 93.75 %):
    identical code run twice, both differences of one sign by chance, must not read as 'B better'."""
    assert ab.sign_test_rank(5)[1] == pytest.approx(0.9375) and ab.sign_test_rank(6)[1] == pytest.approx(0.96875)
    runs = {side: [{"wall_s": w, "cpu_s": w, "first_tensor_s": 0.3, "steady_bytes_per_s": 1e9} for w in walls]
            for side, walls in (("a", [2.4, 2.1]), ("b", [2.1, 2.0]))}
    assert ab.compare(runs)["wall_s"]["verdict"] == "too few rounds (2) for a 95 % interval"
    runs = {side: [dict(r) for r in rows * 3] for side, rows in runs.items()}  # 6 pairs, all B - A < 0
    assert ab.compare(runs)["wall_s"]["verdict"] == "B better"
