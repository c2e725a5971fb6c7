"""Two versions of mergescope's code on one merge, alternating, with paired differences and their interval.

Why: on a shared machine a change worth 3-7 % is inside the run-to-run spread of single timings, and two runs
minutes apart see different machines. Here version A and version B (two source trees, e.g. ``src`` of two git
worktrees) run the same CLI merge back to back, in the order A B then B A (so a drift within a round favours
neither), for ``--rounds`` rounds. Each round gives one paired difference B - A per measure (durable wall, CPU,
the engine's time to its first tensor and steady-state bytes/s); the report is the median difference and the
sign test's interval for it over rounds, and a verdict: B faster / slower, or a tie within noise when the interval holds
0. The outputs of the two versions must be byte-identical (a digest per run): a speed-up that changes the bytes
is not one.

    .venv/bin/python bench/ab_compare.py --a /work/main/src --b /work/dev/src --recipe r.yml --rounds 8

Writes bench/results/ab_TAG.json (every run, the differences, the intervals).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_throughput
import merge_vs_mergekit as mvm

RESULTS = mvm.ROOT / "bench" / "results" / "ab_{tag}.json"
MEASURES = {  # name -> (how a run gives it, whether larger is better)
    "wall_s": (lambda r: r["wall_s"], False),
    "cpu_s": (lambda r: r["cpu_s"], False),
    "first_tensor_s": (lambda r: r["first_tensor_s"], False),
    "steady_gbps": (lambda r: (r["steady_bytes_per_s"] or 0) / 1e9, True),
}


def paired_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(median of b - a, low, high): the median paired difference and the sign test's interval for it (order
    statistics of the differences, exact for any distribution: with n pairs, [d_(k), d_(n+1-k)] holds the
    median with probability 1 - 2 P(Binomial(n, 1/2) < k); the widest k reaching ``level``, else the whole
    range). Why not a bootstrap: with 4-8 rounds it gave intervals too narrow (identical code in A and B came
    out "B worse" over 4 rounds)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_interval needs two equally long, non-empty lists")
    diffs = sorted(y - x for x, y in zip(a, b))
    n = len(diffs)
    k = sign_test_rank(n, level)[0]
    return statistics.median(diffs), diffs[k - 1], diffs[n - k]


def sign_test_rank(n: int, level: float = 0.95) -> tuple[int, float]:
    """(k, coverage): the largest k whose interval [d_(k), d_(n+1-k)] still holds the median with probability
    >= ``level`` (1 when none does), and that interval's coverage. Below ``level`` (fewer than 6 pairs at 95 %)
    no verdict may be drawn from it."""
    k = 1
    while k + 1 <= (n + 1) // 2 and 1 - 2 * _binomial_below(n, k + 1) >= level:
        k += 1
    return k, 1 - 2 * _binomial_below(n, k)


def _binomial_below(n: int, k: int) -> float:
    """P(Binomial(n, 1/2) < k)."""
    return sum(math.comb(n, i) for i in range(k)) / 2 ** n


def verdict(low: float, high: float, larger_is_better: bool) -> str:
    """'B better', 'B worse' or 'tie within noise' from the interval of B - A."""
    if low <= 0 <= high:
        return "tie within noise"
    better = low > 0 if larger_is_better else high < 0
    return "B better" if better else "B worse"


def run(src: Path, recipe: Path, out: Path, threads: int, shard: str) -> dict:
    """One CLI merge with ``src`` first on the path (merge_throughput.run_mergescope: fsync on, its output's sync
    timed too): durable wall, CPU of the process, the engine's report and a digest of the output's bytes."""
    shutil.rmtree(out, ignore_errors=True)
    before = os.times()
    row = merge_throughput.run_mergescope(recipe, out, threads, shard, True, {"PYTHONPATH": str(src)})
    after = os.times()
    result = {"wall_s": round(row["wall_s"] + row["sync_s"], 3),
              "cpu_s": round((after.children_user - before.children_user)
                             + (after.children_system - before.children_system), 3),
              "first_tensor_s": row["first_tensor_s"], "steady_bytes_per_s": row["steady_bytes_per_s"],
              "digest": digest(out)}
    shutil.rmtree(out, ignore_errors=True)
    return result


def digest(folder: Path) -> str:
    """XXH3-128 over the output's safetensors files, in name order."""
    import xxhash

    h = xxhash.xxh3_128()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def compare(runs: dict) -> dict:
    """Per measure: medians of A and B, the paired difference's median and interval, the verdict."""
    out = {}
    n = len(runs["a"])
    coverage = sign_test_rank(n)[1]
    for name, (get, larger_is_better) in MEASURES.items():
        a, b = [get(r) for r in runs["a"]], [get(r) for r in runs["b"]]
        mid, low, high = paired_interval(a, b)
        call = (verdict(low, high, larger_is_better) if coverage >= 0.95
                else f"too few rounds ({n}) for a 95 % interval")
        out[name] = {"a": statistics.median(a), "b": statistics.median(b), "b_minus_a": round(mid, 4),
                     "interval": [round(low, 4), round(high, 4)], "coverage": round(coverage, 4), "verdict": call}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="Version A's source tree (the folder holding mergescope/).")
    parser.add_argument("--b", type=Path, required=True, help="Version B's source tree.")
    parser.add_argument("--recipe", type=Path, required=True, help="A merge recipe (local paths).")
    parser.add_argument("--rounds", type=int, default=8, help="Pairs; at least 6 for a verdict at 95 %%.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-shard-size", default="500MB")
    parser.add_argument("--warm-up", type=int, default=1, help="Untimed runs of each version first (numba caches).")
    parser.add_argument("--tag", default="latest")
    args = parser.parse_args(argv)
    out = mvm.OUT / "ab-out"
    for _ in range(args.warm_up):
        for src in (args.a, args.b):
            run(src, args.recipe, out, args.threads, args.max_shard_size)
    runs: dict[str, list] = {"a": [], "b": []}
    for i in range(args.rounds):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        for side in order:
            runs[side].append(run(getattr(args, side), args.recipe, out, args.threads, args.max_shard_size))
        print(f"round {i + 1}: " + ", ".join(f"{s} {runs[s][-1]['wall_s']:.2f} s" for s in ("a", "b")), flush=True)
    digests = {r["digest"] for side in runs.values() for r in side}
    result = {"a": str(args.a), "b": str(args.b), "recipe": str(args.recipe), "rounds": args.rounds,
              "same_bytes": len(digests) == 1, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "measures": compare(runs), "runs": runs}
    for name, m in result["measures"].items():
        print(f"{name:15s} A {m['a']:.3f}  B {m['b']:.3f}  B - A {m['b_minus_a']:+.3f} "
              f"[{m['interval'][0]:+.3f}, {m['interval'][1]:+.3f}]  {m['verdict']}")
    print("outputs byte-identical" if result["same_bytes"] else f"OUTPUTS DIFFER: {len(digests)} digests")
    path = Path(str(RESULTS).format(tag=args.tag))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["same_bytes"] else 1


if __name__ == "__main__":
    sys.exit(main())
