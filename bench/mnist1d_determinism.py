"""EXPERIMENT (not a test): where does Frankle et al.'s instability effect show on the embedded data?

Frankle et al. 2020: two children spawned from one parent after k epochs, differing only in data
order, end in one linearly connected basin once k is large enough; at k = 0 (same init, different
data order) they may not. On the digits MLP the barrier is 0.000 at every k. This script runs
``ms.landscape.spawn_stability`` over replicate seeds (seed r: init r, parent data order r,
children's orders derived from r) for several settings and reports, per k, the mean test loss
barrier with a 95% t-interval, plus the paired fall from k = 0 to the largest k.

    .venv/bin/python bench/mnist1d_determinism.py                     # the two recommended settings
    .venv/bin/python bench/mnist1d_determinism.py --configs all       # every preset (slow)
    .venv/bin/python bench/mnist1d_determinism.py --configs cnn1d16-lr3e-3 --replicates 5
    .venv/bin/python bench/mnist1d_determinism.py --accuracy            # plain-training accuracy table
    .venv/bin/python bench/mnist1d_determinism.py --table               # tables of the saved results

Runs on one thread (``torch.set_num_threads(1)``). Writes bench/results/mnist1d_determinism.json
(every replicate's barriers, child accuracies and seconds; merged with earlier runs by config name)
and prints a table per config. A setting "shows the effect" when the k = 0 interval excludes 0 and
the paired fall k = 0 -> k_max has an interval above 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import mergescope as ms

RESULTS = Path(__file__).resolve().parent / "results" / "mnist1d_determinism.json"

# name -> task, model, options, training (epochs, lr, weight_decay, batch_size), spawn points ks, and the
# replicates behind docs/mnist1d.md (3 unless given; --replicates overrides).
KS = [0, 1, 2, 4, 8]
_T = {"epochs": 10, "weight_decay": 1e-4}
PRESETS: dict[str, dict] = {
    # MLPs on MNIST-1D (in_features=40); epochs 10, batch 32
    "mlp512-lr1e-3": {"task": "mnist1d", "model": "mlp", "options": {"in_features": 40},
                      "train": {**_T, "lr": 1e-3, "batch_size": 32}, "ks": KS},
    "mlp128-lr1e-2": {"task": "mnist1d", "model": "mlp", "options": {"in_features": 40, "width": 128},
                      "train": {**_T, "lr": 1e-2, "batch_size": 32}, "ks": KS, "replicates": 5},
    "mlp128-lr2e-2": {"task": "mnist1d", "model": "mlp", "options": {"in_features": 40, "width": 128},
                      "train": {**_T, "lr": 2e-2, "batch_size": 32}, "ks": KS, "replicates": 5},
    "mlp128-lr2e-2-e20": {"task": "mnist1d", "model": "mlp", "options": {"in_features": 40, "width": 128},
                          "train": {**_T, "epochs": 20, "lr": 2e-2, "batch_size": 32}, "ks": KS, "replicates": 5},
    "mlp256-lr2e-2": {"task": "mnist1d", "model": "mlp", "options": {"in_features": 40, "width": 256},
                      "train": {**_T, "lr": 2e-2, "batch_size": 32}, "ks": KS, "replicates": 5},
    "mlp256-lr1e-2": {"task": "mnist1d", "model": "mlp", "options": {"in_features": 40, "width": 256},
                      "train": {**_T, "lr": 1e-2, "batch_size": 32}, "ks": KS, "replicates": 5},
    # 1-D CNNs on MNIST-1D; epochs 10, batch 64
    "cnn1d16-lr3e-3": {"task": "mnist1d", "model": "cnn1d", "options": {"width": 16},
                       "train": {**_T, "lr": 3e-3, "batch_size": 64}, "ks": KS},
    "cnn1d16-lr1e-2": {"task": "mnist1d", "model": "cnn1d", "options": {"width": 16},
                       "train": {**_T, "lr": 1e-2, "batch_size": 64}, "ks": KS},
    "cnn1d16-lr3e-2": {"task": "mnist1d", "model": "cnn1d", "options": {"width": 16},
                       "train": {**_T, "lr": 3e-2, "batch_size": 64}, "ks": KS, "replicates": 5},
    "cnn1d16-nobn-lr3e-3": {"task": "mnist1d", "model": "cnn1d", "options": {"width": 16, "batchnorm": False},
                            "train": {**_T, "lr": 3e-3, "batch_size": 64}, "ks": KS},
}
DEFAULT = ["cnn1d16-lr3e-2", "mlp256-lr1e-2"]  # the recommended settings (docs/mnist1d.md)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean (a point when there is one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def run_config(name: str, cfg: dict, replicates: int, n_points: int) -> dict:
    task = ms.tasks.get_task(cfg["task"])
    runs = []
    for r in range(replicates):
        start = time.perf_counter()
        model = ms.tasks.build(cfg["model"], seed=r, **cfg["options"])
        res = ms.landscape.spawn_stability(model, task, ks=cfg["ks"], seed=r, n=n_points, split="test", **cfg["train"])
        seconds = time.perf_counter() - start
        runs.append({"seed": r, "seconds": seconds, "barrier_loss": list(res.barrier_loss),
                     "barrier_acc": list(res.barrier_acc), "child_accuracy": [list(c) for c in res.child_accuracy]})
        print(f"  {name} replicate {r}: " + " ".join(f"k={k}:{b:.3f}" for k, b in zip(res.ks, res.barrier_loss))
              + f"  ({seconds:.1f} s)", flush=True)
    return summarize(name, cfg, runs)


def summarize(name: str, cfg: dict, runs: list[dict]) -> dict:
    ks = cfg["ks"]
    rows = []
    for i, k in enumerate(ks):
        loss = [run["barrier_loss"][i] for run in runs]
        acc = [run["barrier_acc"][i] for run in runs]
        child = [sum(run["child_accuracy"][i]) / 2 for run in runs]
        mean, lo, hi = t_interval(loss)
        amean, alo, ahi = t_interval(acc)
        rows.append({"k": k, "barrier_loss": {"mean": mean, "ci95": [lo, hi]},
                     "barrier_acc": {"mean": amean, "ci95": [alo, ahi]},
                     "child_accuracy_mean": sum(child) / len(child)})
    fall = [run["barrier_loss"][0] - run["barrier_loss"][-1] for run in runs]
    fmean, flo, fhi = t_interval(fall)
    shows = bool(rows[0]["barrier_loss"]["ci95"][0] > 0 and flo > 0)
    # robustness at the study's default of 3 replicates: how many 3-seed subsets have a k = 0 interval above 0
    k0 = [run["barrier_loss"][0] for run in runs]
    triples = list(itertools.combinations(k0, 3)) if len(k0) > 3 else []
    return {"config": cfg, "replicates": len(runs), "runs": runs, "table": rows,
            "fall_k0_to_kmax": {"mean": fmean, "ci95": [flo, fhi]},
            "seconds_per_replicate": sum(run["seconds"] for run in runs) / len(runs),
            "shows_effect": shows,
            "k0_triples_excluding_0": [sum(t_interval(list(t))[1] > 0 for t in triples), len(triples)]}


def print_table(name: str, summary: dict) -> None:
    cfg = summary["config"]
    print(f"\n{name}: {cfg['task']} {cfg['model']} {cfg['options']} {cfg['train']}  "
          f"({summary['replicates']} replicates, {summary['seconds_per_replicate']:.1f} s each)")
    print("   k  barrier(loss) mean [95% CI]        barrier(acc) mean   child acc")
    for row in summary["table"]:
        b, a = row["barrier_loss"], row["barrier_acc"]
        print(f"  {row['k']:2d}  {b['mean']:.4f} [{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}]   "
              f"{a['mean']:.4f}            {row['child_accuracy_mean']:.4f}")
    f = summary["fall_k0_to_kmax"]
    print(f"  fall k=0 -> k={cfg['ks'][-1]}: {f['mean']:.4f} [{f['ci95'][0]:+.4f}, {f['ci95'][1]:+.4f}]"
          f"  -> {'shows the effect' if summary['shows_effect'] else 'does not show the effect'}")
    good, total = summary["k0_triples_excluding_0"]
    if total:
        print(f"  3-seed subsets whose k=0 interval excludes 0: {good}/{total}")


# Plain training on MNIST-1D for the accuracy table (zoo TRAIN_DEFAULTS unless stated).
ACCURACY = {
    "cnn1d": ("cnn1d", {}, None),
    "cnn1d-nobn": ("cnn1d", {"batchnorm": False}, None),
    "cnn1d16": ("cnn1d", {"width": 16}, None),
    "mlp": ("mlp", {"in_features": 40}, None),
    "mlp128-lr1e-2": ("mlp", {"in_features": 40, "width": 128},
                      {"epochs": 10, "lr": 1e-2, "weight_decay": 1e-4, "batch_size": 32}),
    "mlp256-lr1e-2": ("mlp", {"in_features": 40, "width": 256},
                      {"epochs": 10, "lr": 1e-2, "weight_decay": 1e-4, "batch_size": 32}),
    "cnn1d16-lr3e-2": ("cnn1d", {"width": 16}, {"epochs": 10, "lr": 3e-2, "weight_decay": 1e-4, "batch_size": 64}),
}


def accuracy_table(seeds: int, out: Path) -> dict:
    """Test/val accuracy of plain training over ``seeds`` seeds (init and data order = seed)."""
    task = ms.tasks.get_task("mnist1d")
    table = {}
    for name, (model_name, options, hp) in ACCURACY.items():
        hp = hp or ms.tasks.TRAIN_DEFAULTS[model_name]
        runs = []
        for seed in range(seeds):
            start = time.perf_counter()
            model = ms.tasks.build(model_name, seed=seed, **options)
            ms.tasks.train(model, task, seed=seed, **hp)
            seconds = time.perf_counter() - start
            runs.append({"seed": seed, "seconds": seconds, "test": task.evaluate(model, "test")["accuracy"],
                         "val": task.evaluate(model, "val")["accuracy"]})
        mean, lo, hi = t_interval([r["test"] for r in runs])
        table[name] = {"model": model_name, "options": options, "train": hp, "runs": runs,
                       "test_accuracy": {"mean": mean, "ci95": [lo, hi]},
                       "seconds_mean": sum(r["seconds"] for r in runs) / len(runs)}
        per_seed = ", ".join(f"{100 * r['test']:.1f}" for r in runs)
        print(f"{name:14s} {model_name} {options} {hp}: test {100 * mean:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] "
              f"(seeds: {per_seed}; {table[name]['seconds_mean']:.1f} s each)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1))
    print(f"wrote {out}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(DEFAULT), help="comma-separated preset names, or 'all'")
    parser.add_argument("--replicates", type=int, default=None,
                        help="replicate seeds 0..N-1 (default: the preset's, 3 for --accuracy)")
    parser.add_argument("--n", type=int, default=11, help="points on each linear path")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--accuracy", action="store_true",
                        help="instead: plain-training test accuracy of the 1-D models over --replicates seeds "
                             "(writes bench/results/mnist1d_accuracy.json)")
    parser.add_argument("--table", action="store_true", help="instead: print the tables of the saved results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.table:
        for name, saved in json.loads(args.out.read_text()).items():
            print_table(name, summarize(name, saved["config"], saved["runs"]))
        return 0
    if args.accuracy:
        accuracy_table(args.replicates or 3, RESULTS.with_name("mnist1d_accuracy.json"))
        return 0
    names = list(PRESETS) if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; presets: {', '.join(PRESETS)}")
    results = {}
    if args.out.exists():
        try:
            results = json.loads(args.out.read_text())
        except ValueError:
            results = {}
    for name in names:
        print(f"{name} ...", flush=True)
        cfg = {k: v for k, v in PRESETS[name].items() if k != "replicates"}
        results[name] = run_config(name, cfg, args.replicates or PRESETS[name].get("replicates", 3), args.n)
        print_table(name, results[name])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
