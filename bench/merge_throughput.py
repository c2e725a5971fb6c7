"""Merge throughput against the copy floor, side by side in one run (issue 20).

The copy floor: read every input byte with plain buffered reads and write an output of the merged
size, then fsync it (the least any merge must do, same page-cache state). Against it, each method
runs as a separate process for mergescope (``merge --json``: the engine's own timestamps give the
time to the first merged tensor and the steady-state input bytes/s after it) and for MergeKit
(``mergekit-yaml``). Every run starts after ``sync`` and is timed with its own output synced
(mergescope syncs its shards itself; a no-op sync after it is timed too). Tools alternate within
each repeat; rows are medians of ``--repeats``. ``linear --no-fsync`` runs beside ``linear`` to
measure what the per-shard fsync costs. Fixture: bench/merge_vs_mergekit.py's Llama-shaped fp32
models (base + 3 fine-tunes).

    .venv/bin/python bench/merge_throughput.py --size 250mb --repeats 3

Writes bench/results/merge_throughput_SIZE.json and docs/img/merge_throughput_SIZE.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_vs_mergekit as mvm

RESULTS = mvm.ROOT / "bench" / "results" / "merge_throughput_{size}.json"
FIGURE = mvm.ROOT / "docs" / "img" / "merge_throughput_{size}.png"
ALL_METHODS = "linear,task_arithmetic,slerp,model_stock,ties,dare_ties,breadcrumbs,della"
mvm.METHODS.setdefault("model_stock", "models:\n{models_w}base_model: {base}\nmerge_method: model_stock\n")
mvm.METHODS.setdefault("della", "models:\n{models_wd}base_model: {base}\nmerge_method: della\n"
                                "parameters: {{epsilon: 0.1, lambda: 1.0}}\n")


def page_cache_gb() -> float:
    """The page cache's size now (Cached in /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Cached:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def sync_tree(folder: Path) -> float:
    """fsync every file of an output and the output itself; the seconds it took."""
    from mergescope.merge.engine import fsync_path

    start = time.perf_counter()
    paths = [folder] if folder.is_file() else [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]
    for p in paths:
        fsync_path(p)
    fsync_path(folder.parent)
    return time.perf_counter() - start


def copy_floor(files: list[Path], out_bytes: int, target: Path) -> float:
    """Seconds to read ``files`` with buffered reads and write (and fsync) ``out_bytes`` of them to ``target``."""
    os.sync()
    start = time.perf_counter()
    left = out_bytes
    with open(target, "wb") as out:
        for path in files:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    if left > 0:
                        out.write(chunk[:left])
                        left -= min(left, len(chunk))
        out.flush()
        os.fsync(out.fileno())
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


def run_mergescope(cfg: Path, out: Path, threads: int, shard: str, fsync: bool) -> dict:
    """One ``mergescope merge`` process: wall (+ its output's sync), peak RSS and the engine's timestamps."""
    report = out.with_suffix(".json")
    cmd = [str(mvm.VENV / "mergescope"), "--quiet", "merge", str(cfg), str(out), "--random-seed", "0", "--threads",
           str(threads), "--max-shard-size", shard, "--json", str(report), *([] if fsync else ["--no-fsync"])]
    os.sync()
    row = mvm.timed(cmd)
    row["sync_s"] = round(sync_tree(out), 3)
    engine = json.loads(report.read_text())
    report.unlink()
    row.update({k: engine[k] for k in ("seconds", "first_tensor_s", "last_tensor_s", "steady_bytes_per_s",
                                       "fsync_wait_s", "bytes_read")})
    return row


def run_mergekit(cfg: Path, out: Path) -> dict:
    """One ``mergekit-yaml`` process, then its output synced (timed)."""
    os.sync()
    row = mvm.timed([str(mvm.VENV / "mergekit-yaml"), str(cfg), str(out), "--random-seed", "0", "--lazy-unpickle",
                     "--quiet", "--no-copy-tokenizer"])
    row["sync_s"] = round(sync_tree(out), 3)
    return row


def warm_up(args, methods: list[str]) -> None:
    """One untimed run of each method on a tiny fixture: numba compiles the merge kernels once per install and
    caches them on disk, so no timed run pays for compilation."""
    from transformers import LlamaConfig

    tiny = []
    for m, name in enumerate(["base", "ft1", "ft2", "ft3"]):
        folder = args.work / "tiny" / name
        if not (folder / "config.json").exists():
            mvm._write_weights(folder, "tiny", m, 256, 512, 1, 2048)
            LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=1, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
        tiny.append(folder)
    for method in methods:
        cfg = mvm.OUT / f"warm-{method}.yml"
        cfg.write_text(mvm.recipe(method, tiny))
        out = mvm.OUT / "warm-out"
        shutil.rmtree(out, ignore_errors=True)
        run_mergescope(cfg, out, args.threads, args.max_shard_size, False)
        shutil.rmtree(out, ignore_errors=True)


def median_row(runs: list[dict]) -> dict:
    """Medians of every number over the repeats, the durable wall (process + output sync) first."""
    durable = [r["wall_s"] + r["sync_s"] for r in runs]
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    row = {k: statistics.median(r[k] for r in runs if r.get(k) is not None) for k in keys
           if all(r.get(k) is not None for r in runs)}
    row["durable_s"] = statistics.median(durable)
    row["durable_runs_s"] = sorted(round(d, 3) for d in durable)
    row["peak_rss_gb"] = max(r["peak_rss_gb"] for r in runs)
    return row


def measure(args, folders: list[Path], methods: list[str], mk_methods: set[str]) -> dict:
    """Every repeat: the copy floor, then per method MergeKit and mergescope alternating (+ linear --no-fsync)."""
    inputs = [f for d in folders for f in sorted(d.glob("*.safetensors"))]
    in_bytes = sum(f.stat().st_size for f in inputs)
    out_bytes = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
    runs: dict[str, list] = {"floor": []}
    for rep in range(args.repeats):
        runs["floor"].append(copy_floor(inputs, out_bytes, mvm.OUT / "floor.bin"))
        print(f"repeat {rep + 1}: copy floor {runs['floor'][-1]:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
        for method in methods:
            cfg = mvm.OUT / f"{method}.yml"
            cfg.write_text(mvm.recipe(method, folders))
            variants = [("mergescope", True)] + ([("mergescope_nofsync", False)] if method == "linear" else [])
            for tool, fsync in variants:
                out = mvm.OUT / f"tp-{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                runs.setdefault(f"{tool}:{method}", []).append(run_mergescope(cfg, out, args.threads, args.max_shard_size, fsync))
                shutil.rmtree(out, ignore_errors=True)
            if method in mk_methods and rep < args.mergekit_repeats:
                out = mvm.OUT / f"tp-mergekit-{method}"
                shutil.rmtree(out, ignore_errors=True)
                try:
                    runs.setdefault(f"mergekit:{method}", []).append(run_mergekit(cfg, out))
                except RuntimeError as e:
                    runs.setdefault(f"mergekit_error:{method}", []).append(str(e).splitlines()[-1][:200])
                shutil.rmtree(out, ignore_errors=True)
            print(f"  {method}: " + ", ".join(f"{k.split(':')[0]} {v[-1]['wall_s'] + v[-1]['sync_s']:.1f} s"
                                               for k, v in runs.items() if k.endswith(f":{method}") and len(v) == rep + 1
                                               and isinstance(v[-1], dict)), flush=True)
    if "linear" in methods:
        fsync_pairs(args, runs)
    return {"in_bytes": in_bytes, "out_bytes": out_bytes, "runs": runs}


def fsync_pairs(args, runs: dict) -> None:
    """More alternating linear runs with and without fsync: the cost is small against the machine's noise."""
    cfg = mvm.OUT / "linear.yml"
    for _ in range(args.fsync_pairs):
        for tool, fsync in (("mergescope_nofsync", False), ("mergescope", True)):
            out = mvm.OUT / f"tp-{tool}-pair"
            shutil.rmtree(out, ignore_errors=True)
            runs[f"{tool}:linear_pairs"] = runs.get(f"{tool}:linear_pairs", []) + [
                run_mergescope(cfg, out, args.threads, args.max_shard_size, fsync)]
            shutil.rmtree(out, ignore_errors=True)


def table(measured: dict, methods: list[str]) -> dict:
    """Per method: durable walls, throughput (input bytes/s) as a fraction of the copy floor's, ratios."""
    floor_s = statistics.median(measured["runs"]["floor"])
    floor_bps = measured["in_bytes"] / floor_s
    rows = {}
    for method in methods:
        ours = median_row(measured["runs"][f"mergescope:{method}"])
        row = {"mergescope": ours, "fraction": round(floor_s / ours["durable_s"], 3),
               "steady_fraction": round(ours["steady_bytes_per_s"] / floor_bps, 3) if ours.get("steady_bytes_per_s") else None}
        mk_runs = measured["runs"].get(f"mergekit:{method}")
        if mk_runs:
            mk = median_row(mk_runs)
            row.update(mergekit=mk, mergekit_fraction=round(floor_s / mk["durable_s"], 3),
                       wall_ratio=round(ours["durable_s"] / mk["durable_s"], 3),
                       rss_ratio=round(ours["peak_rss_gb"] / mk["peak_rss_gb"], 3))
        elif f"mergekit_error:{method}" in measured["runs"]:
            row["mergekit_error"] = measured["runs"][f"mergekit_error:{method}"][0]
        rows[method] = row
    linear = rows.get("linear")
    for row in rows.values():  # issue 20: the sparsifying methods within 1.5x linear's wall
        row["vs_linear"] = round(row["mergescope"]["durable_s"] / linear["mergescope"]["durable_s"], 3) if linear else None
    return {"floor_s": round(floor_s, 3), "floor_gbps": round(floor_bps / 1e9, 3), "methods": rows,
            "fsync_cost": fsync_cost(measured["runs"])}


def fsync_cost(runs: dict) -> dict | None:
    """linear with fsync vs without, every alternating run: medians of the process wall and the engine's times."""
    on = runs.get("mergescope:linear", []) + runs.get("mergescope:linear_pairs", [])
    off = runs.get("mergescope_nofsync:linear", []) + runs.get("mergescope_nofsync:linear_pairs", [])
    if not on or not off:
        return None
    on_row, off_row = median_row(on), median_row(off)
    return {"runs": len(on), "with": on_row, "without": off_row,
            "wall_cost_s": round(on_row["wall_s"] - off_row["wall_s"], 3),
            "engine_cost_s": round(on_row["seconds"] - off_row["seconds"], 3)}


def print_table(results: dict) -> None:
    print(f"copy floor: {results['floor_s']:.2f} s = {results['floor_gbps']:.2f} GB/s of input "
          f"(read {results['in_bytes'] / 1e9:.2f} GB, write + fsync {results['out_bytes'] / 1e9:.2f} GB)")
    print(f"{'method':16s} {'ours s':>7s} {'/lin':>5s} {'frac':>5s} {'steady':>6s} {'1st s':>5s} {'RSS GB':>6s} "
          f"{'MK s':>7s} {'MK frac':>7s} {'ratio':>5s} {'MK RSS':>6s}")
    for method, r in results["methods"].items():
        o, mk = r["mergescope"], r.get("mergekit")
        steady = "-" if r["steady_fraction"] is None else f"{r['steady_fraction']:.2f}"
        mk_cols = (f"{mk['durable_s']:7.1f} {r['mergekit_fraction']:7.2f} {r['wall_ratio']:5.2f} {mk['peak_rss_gb']:6.2f}"
                   if mk else f"{'-':>7s} {'-':>7s} {'-':>5s} {'-':>6s}")
        lin = "-" if r.get("vs_linear") is None else f"{r['vs_linear']:.2f}"
        print(f"{method:16s} {o['durable_s']:7.1f} {lin:>5s} {r['fraction']:5.2f} {steady:>6s} {o['first_tensor_s']:5.2f} "
              f"{o['peak_rss_gb']:6.2f} {mk_cols}")
    cost = results["fsync_cost"]
    if cost:
        on, off = cost["with"], cost["without"]
        print(f"linear fsync cost ({cost['runs']} alternating pairs, medians): process wall {on['wall_s']:.2f} s with, "
              f"{off['wall_s']:.2f} s without (+{off['sync_s']:.2f} s to sync it afterwards); engine {on['seconds']:.2f} "
              f"vs {off['seconds']:.2f} s; waited for the last shard's sync {on['fsync_wait_s']:.2f} s")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    rows = [results["methods"][m] for m in methods]
    xs = range(len(methods))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar([x - 0.27 for x in xs], [r["fraction"] for r in rows], 0.27, label="mergescope (durable wall)")
    ax.bar(list(xs), [r["steady_fraction"] or 0 for r in rows], 0.27, label="mergescope steady state")
    ax.bar([x + 0.27 for x in xs], [r.get("mergekit_fraction", 0) for r in rows], 0.27, label="MergeKit 0.1.5")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), methods, rotation=30)
    ax.set_ylabel("throughput / copy floor")
    ax.legend(fontsize=8)
    ax.set_title(f"4 x {results['out_bytes'] / 1e9:.2f} GB fp32 Llama, copy floor {results['floor_gbps']:.2f} GB/s, "
                 f"median of {results['repeats']} (MergeKit {results['mergekit_repeats']}), load {results['load_start']:.1f}-{results['load_end']:.1f}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(mvm.SIZES), default="1gb", help="Per-model fixture size.")
    parser.add_argument("--methods", default=ALL_METHODS)
    parser.add_argument("--mergekit-methods", default=None, help="Methods also run with MergeKit [default: all].")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit-repeats", type=int, default=None,
                        help="Run MergeKit in the first N repeats only [default: every repeat].")
    parser.add_argument("--fsync-pairs", type=int, default=4, help="Extra alternating linear runs with/without fsync.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-shard-size", default="500MB", help="mergescope's output shards (fsync is per shard).")
    parser.add_argument("--work", type=Path, default=mvm.OUT / "fixture")
    args = parser.parse_args(argv)
    args.mergekit_repeats = args.repeats if args.mergekit_repeats is None else args.mergekit_repeats
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    mvm.OUT.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    mk_methods = set(methods if args.mergekit_methods is None else args.mergekit_methods.split(","))
    folders = mvm.build_fixture(args.work / args.size, args.size)
    warm_up(args, methods)
    cache_before = page_cache_gb()
    read_s, total = mvm.read_speed(folders)  # warms the page cache, then times a plain read
    load_start = os.getloadavg()[0]
    print(f"fixture 4 x {total / 4e9:.2f} GB; page cache {cache_before:.1f} -> {page_cache_gb():.1f} GB after warming; "
          f"read alone {total / read_s / 1e9:.2f} GB/s; load {load_start:.1f}", flush=True)
    measured = measure(args, folders, methods, mk_methods)
    results = {"size": args.size, "repeats": args.repeats, "mergekit_repeats": args.mergekit_repeats, "threads": args.threads, "max_shard_size": args.max_shard_size,
               "cpus": os.cpu_count(), "mem_total_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9,
               "in_bytes": measured["in_bytes"], "out_bytes": measured["out_bytes"],
               "read_only_gbps": round(total / read_s / 1e9, 3), "page_cache_gb_after_warm": page_cache_gb(),
               "load_start": load_start, "load_end": os.getloadavg()[0],
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), **table(measured, methods),
               "runs": measured["runs"]}
    print_table(results)
    print(f"load average {results['load_start']:.1f} at start, {results['load_end']:.1f} at end; "
          f"page cache {results['page_cache_gb_after_warm']:.1f} GB of {results['mem_total_gb']:.0f} GB", flush=True)
    results_path = Path(str(RESULTS).format(size=args.size))
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(str(FIGURE).format(size=args.size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
