"""bench/merge_throughput.py's paired ratios: the per-repeat durable walls of a method over linear's (issue 20's
1.5x-linear target is read from their spread, not from a ratio of medians)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "merge_throughput.py"
    spec = importlib.util.spec_from_file_location("merge_throughput_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
