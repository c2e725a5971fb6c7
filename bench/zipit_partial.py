"""ZipIt! partial zipping on digits: joint accuracy vs parameters as more last unit groups stay unmerged.

Two cases, each for an MLP (width 128) and the zoo CNN (conv+BN):
- ``disjoint``: A trained on classes 0-4, B on classes 5-9 (ZipIt!'s use case: models from different tasks);
- ``same``: A and B trained on all classes from different seeds.

Protocol (documented, not ZipIt!'s exact one): ZipIt! gives its CIFAR models one fixed shared head
(CLIP class-name embeddings) and reports *joint* accuracy over the union of both tasks' classes.
Our digits models already share a 10-way label space (``digits(classes=...)`` keeps labels 0-9),
but each head is trained, so A's head has only learned to push classes 5-9 down. The merged
model's logits are (1 - alpha) A-part + alpha B-part with alpha = 0.5 (at K = all unmerged groups:
the logit ensemble); joint accuracy is its 10-way argmax on the whole test split (360 images);
per-task accuracy is on the test images of each half. Correlations and the BatchNorm reset use
the whole train split (both tasks' images), as ZipIt! uses data from both tasks.

Baseline at one model's size: permute-and-average (activation matching, the midpoint, BatchNorm
reset; Ainsworth et al. 2023), which ZipIt! reports failing across tasks.

Parameters: "stored" counts the widened state as written (block-diagonal tail layers are dense, half
zeros); "two-branch" is what a trunk + two tails implementation stores (the plotted x axis).

Usage: python bench/zipit_partial.py [--pairs 3] [--out bench/out/zipit_partial]
Seed pairs (0, 1), (2, 3), ...: A and B differ in seed (and in classes for ``disjoint``).
Writes <out>.json and <out>.png (mean joint accuracy vs two-branch parameters, one line per model/case).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import mergescope as ms
from mergescope.align.partial import zipped_model
from mergescope.results import write_json
from mergescope.align.zipit import zipit

MODELS = {"mlp": {"width": 128}, "cnn": {}}
HALVES = {"disjoint": ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)), "same": (None, None)}


def trained(name: str, options: dict, classes, seed: int) -> torch.nn.Module:
    """A zoo model trained with its default recipe on ``classes`` of digits (None: all)."""
    model = ms.tasks.build(name, seed=seed, **options)
    ms.tasks.train(model, ms.tasks.digits(classes=classes), seed=seed, **ms.tasks.TRAIN_DEFAULTS[name])
    return model.eval()


def accuracies(model: torch.nn.Module, halves) -> dict[str, float]:
    """Joint accuracy on all 10 classes, and on the test images of each task's classes."""
    out = {"joint": ms.tasks.digits().evaluate(model)["accuracy"]}
    if halves[0] is not None:
        out["task_a"] = ms.tasks.digits(classes=halves[0]).evaluate(model)["accuracy"]
        out["task_b"] = ms.tasks.digits(classes=halves[1]).evaluate(model)["accuracy"]
    return out


def permute_average(spec, a: torch.nn.Module, b: torch.nn.Module, batches: list) -> torch.nn.Module:
    """Git Re-Basin baseline: B activation-matched to A, the midpoint, BatchNorm statistics reset."""
    perm = ms.align.activation_matching(spec, a, b, batches)
    merged = copy.deepcopy(a)
    merged.load_state_dict(ms.align.interpolate_states(a.state_dict(), ms.align.apply(spec, perm, b.state_dict()), 0.5))
    return ms.align.reset_bn_stats(merged, batches).eval()


def sweep(name: str, case: str, seeds: tuple[int, int]) -> dict:
    """Train A and B, then zip with K = 0 .. all unit groups unmerged."""
    options, halves = MODELS[name], HALVES[case]
    a, b = trained(name, options, halves[0], seeds[0]), trained(name, options, halves[1], seeds[1])
    task = ms.tasks.digits()
    batches = [x for x, _ in task.batches("train", batch_size=512)]
    spec = ms.align.permutation_spec(a, batches[0][:8])
    one_model = sum(p.numel() for p in a.parameters())
    rows = []
    for k in range(len(spec.perms) + 1):
        start = time.perf_counter()
        result = zipit(spec, a, b, batches, alpha=0.5, unmerged=k)
        seconds = time.perf_counter() - start
        merged = zipped_model(a, result.state)
        params = result.info.get("parameters", one_model)
        branches = result.info.get("two_branch_parameters", one_model)
        rows.append({"unmerged": k, "parameters": params, "two_branch_parameters": branches,
                     "relative_parameters": params / one_model, "seconds": seconds, **accuracies(merged, halves)})
        print(f"{name:4s} {case:8s} K={k}  joint {rows[-1]['joint']:.4f}  params {params:8,d} "
              f"({params / one_model:.2f}x)  {seconds:.2f}s", flush=True)
    return {"model": name, "case": case, "seeds": list(seeds), "options": options, "groups": list(spec.perms),
            "one_model_parameters": one_model, "model_a": accuracies(a, halves), "model_b": accuracies(b, halves),
            "permute_average": accuracies(permute_average(spec, a, b, batches), halves), "rows": rows}


def summarize(results: list[dict]) -> list[dict]:
    """Per model, case and K: mean (min, max) over seed pairs of accuracies, parameters, seconds."""
    out = []
    for name in dict.fromkeys(r["model"] for r in results):
        for case in dict.fromkeys(r["case"] for r in results):
            runs = [r for r in results if r["model"] == name and r["case"] == case]
            if not runs:
                continue
            for k in range(len(runs[0]["rows"])):
                rows = [r["rows"][k] for r in runs]
                mean = lambda key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
                entry = {"model": name, "case": case, "unmerged": k, "groups": len(runs[0]["groups"]),
                         "pairs": len(rows), "parameters": rows[0]["parameters"],
                         "two_branch_parameters": rows[0]["two_branch_parameters"],
                         "relative_parameters": rows[0]["two_branch_parameters"] / runs[0]["one_model_parameters"],
                         "joint": mean("joint"), "joint_min": min(r["joint"] for r in rows),
                         "joint_max": max(r["joint"] for r in rows), "seconds": mean("seconds")}
                for key in ("task_a", "task_b"):
                    if key in rows[0]:
                        entry[key] = mean(key)
                entry["model_a_joint"] = sum(r["model_a"]["joint"] for r in runs) / len(runs)
                entry["model_b_joint"] = sum(r["model_b"]["joint"] for r in runs) / len(runs)
                entry["permute_average_joint"] = sum(r["permute_average"]["joint"] for r in runs) / len(runs)
                out.append(entry)
    return out


def plot(summary: list[dict], path: Path) -> None:
    """Mean joint accuracy against two-branch parameters (relative to one model), one line per model/case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, case in dict.fromkeys((s["model"], s["case"]) for s in summary):
        rows = [s for s in summary if s["model"] == name and s["case"] == case]
        xs = [s["relative_parameters"] for s in rows]
        line = ax.errorbar(xs, [100 * s["joint"] for s in rows], marker="o", capsize=3,
                           yerr=[[100 * (s["joint"] - s["joint_min"]) for s in rows],
                                 [100 * (s["joint_max"] - s["joint"]) for s in rows]], label=f"{name} {case}")
        ax.scatter([1.0], [100 * rows[0]["permute_average_joint"]], marker="x", s=60, color=line[0].get_color())
        for s in rows:
            ax.annotate(f"K={s['unmerged']}", (s["relative_parameters"], 100 * s["joint"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
    ax.set_xlabel("parameters as trunk + two tails / one model  (left: full zip, right: ensemble)")
    ax.set_ylabel("joint test accuracy, 10 classes (%)")
    ax.set_title("ZipIt! partial zipping on digits (mean, min-max; x: permute-average)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="Seed pairs (0, 1), (2, 3), ...")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--cases", nargs="+", default=list(HALVES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/out/zipit_partial")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [sweep(name, case, (2 * i, 2 * i + 1)) for name in args.models for case in args.cases
               for i in range(args.pairs)]
    summary = summarize(results)
    for s in summary:
        tasks = f"  A-task {s['task_a']:.4f}  B-task {s['task_b']:.4f}" if "task_a" in s else ""
        print(f"{s['model']:4s} {s['case']:8s} K={s['unmerged']}/{s['groups']}  joint {s['joint']:.4f} "
              f"[{s['joint_min']:.4f}, {s['joint_max']:.4f}]{tasks}  params {s['relative_parameters']:.2f}x  "
              f"stored {s['parameters']:,}  {s['seconds']:.2f}s")
        if s["unmerged"] == 0:
            print(f"     A alone {s['model_a_joint']:.4f}  B alone {s['model_b_joint']:.4f}  "
                  f"permute-average {s['permute_average_joint']:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), {"protocol": __doc__, "summary": summary, "results": results})
    plot(summary, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
