"""EXPERIMENT (not a test): does the diagnosis predict the outcome of a merge? (issue 17, item 4)

For model sets of the embedded families (digits: tuning; MNIST-1D: held out) -- fine-tunes of a
parent, independent seeds, label-subset fine-tunes, children spawned after k epochs, every zoo
architecture -- with several replicates (disjoint seeds), this script computes:

- the diagnosis (``ms.diagnose`` with the task: data-free signals + the val-sample measurements),
  hence its recommendation and expected accuracy change, and the data-free recommendation
  (``recommend(signals, None)``, no task);
- the actual outcome of every merge family on the full val split (which family is best) and the
  test split (the reported change): uniform average, task arithmetic and TIES (with a base; the
  scaling lambda chosen on val), align (MergeMany weight matching + average; BatchNorm statistics
  reset on train data where the model has BN, as for the average), output ensemble (probabilities),
  and "do not merge" (the member best on val).

Reported: Spearman's rho between the predicted change and the actual test change of the recommended
merge over all sets (bootstrap 95% CI over sets); the hit rate of the recommended family being
best or within noise of the best on val. "Within noise" for one set: the val accuracy of the best
family minus the recommended one is at most one binomial standard error sqrt(p (1 - p) / n_val) of
the best accuracy p, or the paired 95% t-interval (mergescope.study.stats) of that difference over
the replicates of the same set kind contains 0. Also reported: exact-best rate and both per task.

    .venv/bin/python bench/diagnose_predicts.py                 # 3 replicates, ~15 min on 2 cores
    .venv/bin/python bench/diagnose_predicts.py --replicates 1 --quick
    .venv/bin/python bench/diagnose_predicts.py --report        # tables + figure from the saved JSON

Writes bench/results/diagnose_predicts.json and docs/img/diagnose_predicts.png; checkpoints are
cached under bench/out/diagnose_predicts (mergescope.study.family, reused on an exact recipe match).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "diagnose_predicts.json"
FIGURE = ROOT.parent / "docs" / "img" / "diagnose_predicts.png"
CACHE = ROOT / "out" / "diagnose_predicts"
FAMILIES = ("average", "task_vectors", "align", "ensemble", "none")
LAMBDAS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)  # task-vector scalings tried on val (plus 1/N)
TUNING, HELD_OUT = "digits", "mnist1d"
TIES_DENSITY = 0.2  # as ms.diagnose measures TIES (the paper's default), so the recommended method is the one run


# ----------------------------------------------------------------------------- the model sets
def model_sets(replicate: int, quick: bool = False) -> list[dict]:
    """Every model set of one replicate: {name, kind, task, recipes, base} (recipes of study.family)."""
    from mergescope.study.family import recipe

    s = 1000 * replicate
    ep = (lambda full, small: small) if quick else (lambda full, small: full)
    sets = []

    def add(kind, task, recipes, base=None):
        sets.append({"kind": kind, "task": task, "replicate": replicate, "recipes": recipes, "base": base})

    # digits (tuning): MLP families as in the study (parent 3 epochs, fine-tunes 10 at lr 1e-3)
    mlp = {"width": ep(256, 64), "depth": 2}
    parent = recipe("mlp", s, ep(3, 2), **mlp)
    add("digits MLP: 3 fine-tunes of a parent", "digits",
        [recipe("mlp", s + 100 + i, ep(10, 3), parent, lr=1e-3, **mlp) for i in range(3)], parent)
    add("digits MLP: 3 independent seeds", "digits", [recipe("mlp", s + 10 + i, ep(20, 5), **mlp) for i in range(3)])
    add("digits MLP: label-subset fine-tunes", "digits",
        [recipe("mlp", s + 200 + i, ep(10, 3), parent, c, lr=1e-3, **mlp)
         for i, c in enumerate(((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)))], parent)
    total = ep(12, 4)
    for k in ((0, 2, 8) if not quick else (0, 2)):
        spawn = recipe("mlp", s + 300, k, **mlp)
        add(f"digits MLP: children spawned at k={k}", "digits",
            [recipe("mlp", s + 310 + i, total - k, spawn, **mlp) for i in range(2)])
    for model, opts, epochs in (("cnn", {"width": ep(16, 8)}, ep(20, 4)), ("resnet", {"width": ep(16, 8)}, ep(20, 3)),
                                ("transformer", {"dim": ep(32, 16)}, ep(40, 6))):
        add(f"digits {model.upper() if model == 'cnn' else model.capitalize()}: 2 independent seeds", "digits",
            [recipe(model, s + 10 + i, epochs, **opts) for i in range(2)])
    # MNIST-1D (held out): the study's CNN-1D, its spawn setting (lr 3e-2, 10 epochs), and an MLP
    w = {"width": ep(32, 16)}
    parent = recipe("cnn1d", s, ep(3, 2), task="mnist1d", **w)
    add("MNIST-1D CNN-1D: 3 fine-tunes of a parent", "mnist1d",
        [recipe("cnn1d", s + 100 + i, ep(5, 2), parent, lr=1e-3, task="mnist1d", **w) for i in range(3)], parent)
    add("MNIST-1D CNN-1D: 3 independent seeds", "mnist1d",
        [recipe("cnn1d", s + 10 + i, ep(10, 3), task="mnist1d", **w) for i in range(3)])
    add("MNIST-1D CNN-1D: label-subset fine-tunes", "mnist1d",
        [recipe("cnn1d", s + 200 + i, ep(5, 2), parent, c, lr=1e-3, task="mnist1d", **w)
         for i, c in enumerate(((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)))], parent)
    total = ep(10, 4)
    for k in ((0, 1, 4) if not quick else (0, 2)):
        spawn = recipe("cnn1d", s + 300, k, lr=3e-2, task="mnist1d", width=ep(16, 8))
        add(f"MNIST-1D CNN-1D: children spawned at k={k}", "mnist1d",
            [recipe("cnn1d", s + 310 + i, total - k, spawn, lr=3e-2, task="mnist1d", width=ep(16, 8)) for i in range(2)])
    add("MNIST-1D MLP: 2 independent seeds", "mnist1d",
        [recipe("mlp", s + 10 + i, ep(20, 4), task="mnist1d", in_features=40, **mlp) for i in range(2)])
    for i, item in enumerate(sets):
        item["name"] = f"{item['kind']} (replicate {replicate})"
        item["index"] = i
    return sets


# ----------------------------------------------------------------------------- one set
def _accuracy(module, state, task, split: str) -> float:
    from mergescope.state import with_state

    return task.evaluate(with_state(module, state), split)["accuracy"]


def _figures(module, state, task) -> dict:
    return {"val": _accuracy(module, state, task, "val"), "test": _accuracy(module, state, task, "test")}


def _bn(module, state, task) -> dict:
    """BatchNorm statistics of a merged state recomputed on train data (an unchanged copy without BN)."""
    from mergescope.state import reset_batchnorm

    return reset_batchnorm(module, state, list(task.batches("train", batch_size=512)))


def _scaled(module, method: str, states, base, task, lambdas) -> dict:
    """A task-vector method with its scaling chosen on val; the figures of that choice."""
    from mergescope.study.measure import merge_states

    n = len(states)
    tried = []
    for lam in sorted(set(lambdas) | {1.0 / n}):
        params = {"weight": [1.0] * n, "lam": lam}
        if method == "ties":
            params["density"] = [TIES_DENSITY] * n
        tried.append((lam, _figures(module, _bn(module, merge_states(method, states, base, **params), task), task)))
    lam, figures = max(tried, key=lambda t: (t[1]["val"], -abs(t[0] - 1.0 / n)))
    return {**figures, "lambda": lam}


def outcomes(module, states, base, task, seed: int) -> dict:
    """Every family's val and test accuracy on this set (method -> figures), and the members'."""
    from mergescope import ensemble
    from mergescope.align.many import merge_many
    from mergescope.state import average
    from mergescope.study.measure import spec_for

    members = [_figures(module, s, task) for s in states]
    best = max(range(len(states)), key=lambda i: members[i]["val"])
    out = {"average/linear": _figures(module, _bn(module, average(states), task), task),
           "align/weight+linear": _figures(module, _bn(module, merge_many(spec_for(module, task), states, seed=seed).mean,
                                                        task), task),
           "ensemble/probs": {split: ensemble.evaluate(module, states, task, method="probs", split=split).accuracy
                              for split in ("val", "test")},
           "none/best_member": {**members[best], "member": best}}
    if base is not None:
        out["task_vectors/task_arithmetic"] = _scaled(module, "task_arithmetic", states, base, task, LAMBDAS)
        out["task_vectors/ties"] = _scaled(module, "ties", states, base, task, LAMBDAS)
    return {"methods": out, "members": members,
            "members_mean": {split: float(np.mean([m[split] for m in members])) for split in ("val", "test")}}


def diagnosis(module, states, base, task, seed: int) -> dict:
    """The product's diagnosis (ms.diagnose) with the task: signals, measured, recommendation."""
    import mergescope as ms

    result = ms.diagnose(list(states), base=base, task=task, model=module, seed=seed).to_dict()
    return {k: result[k] for k in ("signals", "measured", "recommendation")}


def evaluate_set(item: dict, cache: str) -> dict:
    """One set: train/reuse its models, diagnose it, measure every family (runs in a worker process)."""
    torch.set_num_threads(1)
    from mergescope.diagnose.recommend import recommend
    from mergescope.study.family import Family
    from mergescope.tasks import get_task

    start = time.perf_counter()
    family = Family(Path(cache))
    states = [family.state(r) for r in item["recipes"]]
    base = None if item["base"] is None else family.state(item["base"])
    module = family.module(item["recipes"][0])
    task = get_task(item["task"])
    seed = item["replicate"]
    diag = diagnosis(module, states, base, task, seed)
    actual = outcomes(module, states, base, task, seed)
    return {"name": item["name"], "kind": item["kind"], "task": item["task"], "replicate": item["replicate"],
            "base": item["base"] is not None, "n_models": len(states), "val_size": task.size("val"),
            "test_size": task.size("test"), "signals": diag["signals"], "measured": diag["measured"],
            "recommendation": diag["recommendation"], "data_free": recommend(diag["signals"], None), "actual": actual,
            "seconds": time.perf_counter() - start}


def _train(recipe_, cache: str) -> str:
    torch.set_num_threads(1)
    from mergescope.study.family import Family

    Family(Path(cache)).state(recipe_)
    return recipe_.key


def run(replicates: int, quick: bool, workers: int) -> dict:
    """Train every model (parents first), then evaluate every set, on a pool of ``workers`` processes."""
    import multiprocessing

    sets = [s for r in range(replicates) for s in model_sets(r, quick)]
    parents = {r.parent.key: r.parent for s in sets for r in s["recipes"] if r.parent is not None}
    grand = {p.parent.key: p.parent for p in parents.values() if p.parent is not None}
    models = {r.key: r for s in sets for r in s["recipes"] if r.key not in parents}
    cache = str(CACHE / ("quick" if quick else "full"))
    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for phase in (grand, {k: v for k, v in parents.items() if k not in grand}, models):
            list(pool.map(_train, phase.values(), [cache] * len(phase)))
        trained = time.perf_counter() - start
        print(f"models ready in {trained:.0f} s", file=sys.stderr, flush=True)
        rows = list(pool.map(evaluate_set, sets, [cache] * len(sets)))
    return {"rows": rows, "replicates": replicates, "quick": quick, "workers": workers,
            "seconds": {"training": trained, "total": time.perf_counter() - start}}


# ----------------------------------------------------------------------------- scoring
def family_values(row: dict, split: str) -> dict[str, float]:
    """Each family's figure on ``split``: its best method on val (the scaling already chosen on val)."""
    best = {}
    for key, fig in row["actual"]["methods"].items():
        fam = key.split("/")[0]
        if fam not in best or fig["val"] > best[fam]["val"]:
            best[fam] = fig
    return {fam: fig[split] for fam, fig in best.items()}


def method_value(row: dict, rec: dict, split: str) -> float | None:
    """The actual figure of the recommended family and method (a family's best method if the method is unmeasured)."""
    methods = row["actual"]["methods"]
    key = f"{rec['family']}/{rec['method']}"
    if key in methods:
        return methods[key][split]
    values = family_values(row, split)
    return values.get(rec["family"])


def hits(rows: list[dict], which: str) -> list[dict]:
    """Per set: the recommended family (``which``: recommendation / data_free / with_aligned), the best on
    val, the gap, one binomial SE, the replicate interval of the gap, and the verdicts."""
    from mergescope.study.stats import interval

    gaps = defaultdict(list)
    per = []
    for row in rows:
        vals = family_values(row, "val")
        best = max(vals, key=vals.get)
        fam = row[which]["family"]
        rec_val = vals.get(fam, -math.inf)
        gap = vals[best] - rec_val
        se = math.sqrt(vals[best] * (1 - vals[best]) / row["val_size"])
        per.append({"name": row["name"], "kind": row["kind"], "task": row["task"], "recommended": fam, "best": best,
                    "gap": gap, "se": se, "exact": fam == best or gap <= 0, "within_se": gap <= se})
        gaps[row["kind"]].append(gap)
    for p in per:
        g = gaps[p["kind"]]
        if len(g) >= 2 and all(math.isfinite(x) for x in g):
            iv = interval(g)
            p["replicate_interval"] = [iv.low, iv.high]
            p["within_replicates"] = iv.low <= 0
        else:
            p["replicate_interval"], p["within_replicates"] = None, False
        p["hit"] = p["exact"] or p["within_se"] or p["within_replicates"]
    return per


def spearman(rows: list[dict], which: str, boot: int = 2000, seed: int = 0) -> dict:
    """rho between the predicted change and the actual test change of the recommended merge, bootstrap CI."""
    from scipy.stats import spearmanr

    pairs = []
    for row in rows:
        rec = row[which]
        actual = method_value(row, rec, "test")
        if rec["expected_change"] is None or actual is None:
            continue
        pairs.append((rec["expected_change"], actual - row["actual"]["members_mean"]["test"]))
    if len(pairs) < 3:
        return {"n": len(pairs), "rho": None, "ci": None, "pairs": pairs}
    x, y = np.array(pairs).T
    rho = float(spearmanr(x, y).statistic)
    mae = float(np.mean(np.abs(x - y)))
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            stats.append(spearmanr(x[i], y[i]).statistic)
    ci = [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))] if stats else None
    return {"n": len(pairs), "rho": rho, "ci": ci, "mean_abs_error": mae, "pairs": [list(p) for p in pairs]}


# measured key of ms.diagnose -> the bench's method for the same family
MEASURED = {"average_accuracy": "average/linear", "aligned_accuracy": "align/weight+linear",
            "ensemble_accuracy": "ensemble/probs", "task_arithmetic_accuracy": "task_vectors/task_arithmetic",
            "ties_accuracy": "task_vectors/ties"}


def every_family(rows: list[dict], boot: int = 2000, seed: int = 0) -> dict:
    """Secondary: every family the diagnosis measured (not only the recommended one), its predicted change
    (val sample) vs its actual test change; Spearman with a bootstrap CI over sets, and the mean absolute error."""
    from scipy.stats import spearmanr

    pairs, groups = [], []
    for g, row in enumerate(rows):
        m = row["measured"]
        for key, method in MEASURED.items():
            if m.get(key) is not None and method in row["actual"]["methods"]:
                pairs.append((m[key] - m["members_accuracy"],
                              row["actual"]["methods"][method]["test"] - row["actual"]["members_mean"]["test"]))
                groups.append(g)
    x, y, groups = *np.array(pairs).T, np.array(groups)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(boot):  # resample whole sets (their families are not independent)
        pick = np.concatenate([np.flatnonzero(groups == g) for g in rng.integers(0, len(rows), len(rows))])
        stats.append(spearmanr(x[pick], y[pick]).statistic)
    return {"n": len(pairs), "sets": len(rows), "rho": float(spearmanr(x, y).statistic),
            "ci": [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))],
            "mean_abs_error": float(np.mean(np.abs(x - y)))}


def summary(rows: list[dict]) -> dict:
    out = {"every_family": {scope: every_family([r for r in rows if scope == "all" or r["task"] == scope])
                            for scope in ("all", TUNING, HELD_OUT)}}
    for which in ("recommendation", "data_free"):
        per = hits(rows, which)
        out[which] = {"sets": per}
        for scope in ("all", TUNING, HELD_OUT):
            chosen = [p for p in per if scope == "all" or p["task"] == scope]
            if not chosen:
                continue
            sub_rows = [r for r in rows if scope == "all" or r["task"] == scope]
            out[which][scope] = {"n": len(chosen), "hit_rate": sum(p["hit"] for p in chosen) / len(chosen),
                                 "exact_rate": sum(p["exact"] for p in chosen) / len(chosen),
                                 "within_se_rate": sum(p["exact"] or p["within_se"] for p in chosen) / len(chosen),
                                 "spearman": None if which == "data_free" else spearman(sub_rows, which)}
    return out


# ----------------------------------------------------------------------------- output
def _scatter(ax, rows: list[dict], colors: dict, zoom: float | None = None) -> None:
    """Predicted vs actual change of the recommended merge, one marker per set (family colour, task shape)."""
    for fam in FAMILIES:
        for task, marker in ((TUNING, "o"), (HELD_OUT, "^")):
            pts = [(r["recommendation"]["expected_change"], method_value(r, r["recommendation"], "test")
                    - r["actual"]["members_mean"]["test"]) for r in rows
                   if r["recommendation"]["family"] == fam and r["task"] == task
                   and r["recommendation"]["expected_change"] is not None]
            if pts:
                ax.scatter(*zip(*pts), color=colors[fam], marker=marker, s=36, alpha=0.75,
                           label=f"{fam} ({'digits, tuning' if task == TUNING else 'MNIST-1D, held out'})")
    lim = (-zoom, zoom) if zoom else ax.get_xlim()
    ax.plot(lim, lim, color="black", lw=0.8, ls=":")
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    if zoom:
        ax.set_xlim(lim)
        ax.set_ylim(lim)
    ax.set_xlabel("predicted accuracy change (diagnosis, val sample)")
    ax.set_ylabel("actual test accuracy change\n(recommended merge - members' mean)")
    ax.set_title(f"zoom to +-{zoom}" if zoom else "all sets (dotted: y = x)", fontsize=9)


def figure(rows: list[dict], out: Path) -> Path:
    from mergescope.report.figures import pyplot, save

    plt = pyplot()
    rows = sorted(rows, key=lambda r: (r["task"] != TUNING, r["kind"], r["replicate"]))
    colors = dict(zip(FAMILIES, ("tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:gray")))
    fig = plt.figure(figsize=(13, 10))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.3])
    ax, zx, bx = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    _scatter(ax, rows, colors)
    _scatter(zx, rows, colors, zoom=0.04)
    ax.legend(fontsize=7, ncol=1)
    width = 0.16
    xs = np.arange(len(rows))
    for j, fam in enumerate(FAMILIES):
        vals = [family_values(r, "val").get(fam, np.nan) - r["actual"]["members_mean"]["val"] for r in rows]
        bx.bar(xs + (j - 2) * width, vals, width, color=colors[fam], label=fam)
    for i, r in enumerate(rows):
        j = FAMILIES.index(r["recommendation"]["family"])
        v = family_values(r, "val").get(r["recommendation"]["family"], np.nan) - r["actual"]["members_mean"]["val"]
        bx.plot(i + (j - 2) * width, v, marker="*", color="black", markersize=7)
    bx.axhline(0, color="gray", lw=0.5)
    bx.set_xticks(xs)
    bx.set_xticklabels([r["name"].replace(" (replicate ", " r").rstrip(")") for r in rows], rotation=90, fontsize=6)
    bx.set_ylabel("full-val accuracy change vs members' mean")
    bx.set_ylim(max(bx.get_ylim()[0], -0.3), bx.get_ylim()[1])
    bx.legend(fontsize=7, ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              title="each family's outcome per set (* = recommended by ms.diagnose; bars below -0.3 cut)",
              title_fontsize=7)
    fig.tight_layout()
    return save(fig, out)


def table(results: dict) -> str:
    lines = []
    s = results["summary"]
    for which, label in (("recommendation", "ms.diagnose (with task)"), ("data_free", "data-free (no task)")):
        for scope in ("all", TUNING, HELD_OUT):
            if scope not in s[which]:
                continue
            d = s[which][scope]
            sp = d["spearman"]
            rho = "" if not sp or sp["rho"] is None else \
                f"  Spearman {sp['rho']:.3f} [{sp['ci'][0]:.3f}, {sp['ci'][1]:.3f}] (n={sp['n']}, " \
                f"MAE {sp['mean_abs_error']:.3f})"
            lines.append(f"{label:28s} {scope:8s} hit {d['hit_rate']:.0%} (exact {d['exact_rate']:.0%}, "
                         f"<=1 SE {d['within_se_rate']:.0%}) of {d['n']}{rho}")
    for scope, d in s["every_family"].items():
        lines.append(f"every measured family     {scope:8s} Spearman {d['rho']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}] "
                     f"(n={d['n']} over {d['sets']} sets, MAE {d['mean_abs_error']:.3f})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicates", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny models and epochs (a smoke run)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--report", action="store_true", help="print the table and redraw the figure from the JSON")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    if args.report:
        results = json.loads(RESULTS.read_text())
        results["summary"] = summary(results["rows"])
    else:
        results = run(args.replicates, args.quick, args.workers)
        results["summary"] = summary(results["rows"])
        if not args.quick:
            from mergescope.results import write_json

            write_json(RESULTS, results)
    if not args.quick:
        figure(results["rows"], FIGURE)
    print(table(results))
    print(f"seconds: {results['seconds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
