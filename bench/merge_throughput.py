"""Merge throughput against the copy floor, side by side in one run (issue 20).

The copy floor, per set of inputs a method reads (linear: the 3 fine-tunes; slerp: base + one; the
rest: all 4): read every one of those input bytes with plain buffered reads and write an output of the
merged size, once fsynced (*durable*, against which whole durable walls are compared) and once not
(*buffered*, faster: against which the engine's steady state is compared, the stricter reading). Against it, each method
runs as a separate process for mergescope (``merge --json``: the engine's own timestamps give the
time to the first merged tensor and the steady-state input bytes/s after it) and for MergeKit
(``mergekit-yaml``). Every run starts after ``sync`` and is timed with its own output synced
(mergescope syncs its shards itself; a no-op sync after it is timed too). Tools alternate within
each repeat; rows are medians of ``--repeats``, and each method's wall over linear's is also taken per
repeat ("paired /lin": median and range; ``--vs-linear-figure`` draws them from saved results files).
``linear --no-fsync`` runs beside ``linear`` to measure what the per-shard fsync costs. Fixture: bench/merge_vs_mergekit.py's Llama-shaped fp32
models (base + 3 fine-tunes).

    .venv/bin/python bench/merge_throughput.py --size 250mb --repeats 3

Writes bench/results/merge_throughput_SIZE.json and docs/img/merge_throughput_SIZE.png (SIZE_bf16 with
``--dtype bfloat16``).
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
CACHED = {"MERGESCOPE_DIRECT": "0"}  # the engine's results through the page cache instead of O_DIRECT
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


def copy_floor(files: list[Path], out_bytes: int, target: Path, fsync: bool = True) -> float:
    """Seconds to read ``files`` with buffered reads and write ``out_bytes`` of them to ``target`` (fsynced
    when ``fsync``; else its dirty pages are synced, untimed, before returning)."""
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
        if fsync:
            os.fsync(out.fileno())
    elapsed = time.perf_counter() - start
    os.sync()
    target.unlink()
    return elapsed


def run_mergescope(cfg: Path, out: Path, threads: int, shard: str, fsync: bool, env: dict | None = None) -> dict:
    """One ``mergescope merge`` process: wall (+ its output's sync), peak RSS and the engine's timestamps.
    ``env``: variables set for that process only (``MERGESCOPE_DIRECT=0``: results through the page cache)."""
    report = out.with_suffix(".json")
    cmd = [str(mvm.VENV / "mergescope"), "--quiet", "merge", str(cfg), str(out), "--random-seed", "0", "--threads",
           str(threads), "--max-shard-size", shard, "--json", str(report), *([] if fsync else ["--no-fsync"])]
    os.sync()
    row = mvm.timed(cmd, env)
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


def paired_ratios(runs: dict, method: str, against: str = "linear") -> list[float]:
    """Per repeat, the method's durable wall over ``against``'s in the same repeat, sorted. Why: the two ran
    minutes apart at most, so a drift of the shared machine between repeats cancels in the ratio, and the
    spread of the ratios says whether a target such as 1.5x linear is met or a tie within noise."""
    ours, other = runs.get(f"mergescope:{method}", []), runs.get(f"mergescope:{against}", [])
    return sorted(round((a["wall_s"] + a["sync_s"]) / (b["wall_s"] + b["sync_s"]), 3) for a, b in zip(ours, other))


def input_set(method: str, folders: list[Path]) -> str:
    """The models a method's recipe reads, as a key ("base+ft1", "ft1+ft2+ft3", ...)."""
    text = mvm.recipe(method, folders)
    return "+".join(f.name for f in folders if f"{f}\n" in text or f"{f} " in text or text.endswith(str(f)))


def input_files(key: str, folders: list[Path]) -> list[Path]:
    names = key.split("+")
    return [f for d in folders if d.name in names for f in sorted(d.glob("*.safetensors"))]


def measure(args, folders: list[Path], methods: list[str], mk_methods: set[str], cached_methods: set[str] = frozenset()
            ) -> dict:
    """Every repeat: the copy floors (durable and buffered, per input set), then per method MergeKit and
    mergescope alternating (+ linear --no-fsync, + ``cached_methods`` with results through the page cache)."""
    out_bytes = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
    sets = {method: input_set(method, folders) for method in methods}
    in_bytes = {key: sum(f.stat().st_size for f in input_files(key, folders)) for key in set(sets.values())}
    runs: dict[str, list] = {}
    for rep in range(args.repeats):
        for key in sorted(in_bytes):
            for kind, fsync in (("durable", True), ("buffered", False)):
                runs.setdefault(f"floor_{kind}:{key}", []).append(
                    copy_floor(input_files(key, folders), out_bytes, mvm.OUT / "floor.bin", fsync))
        print(f"repeat {rep + 1}: copy floors " + ", ".join(f"{k.removeprefix('floor_')} {v[-1]:.2f} s"
                                                            for k, v in runs.items() if k.startswith("floor"))
              + f" (load {os.getloadavg()[0]:.1f})", flush=True)
        for method in methods:
            cfg = mvm.OUT / f"{method}.yml"
            cfg.write_text(mvm.recipe(method, folders))
            variants = ([("mergescope", True, None)] + ([("mergescope_nofsync", False, None)] if method == "linear" else [])
                        + ([("mergescope_cached", True, CACHED)] if method in cached_methods else []))
            for tool, fsync, env in variants:
                out = mvm.OUT / f"tp-{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                runs.setdefault(f"{tool}:{method}", []).append(
                    run_mergescope(cfg, out, args.threads, args.max_shard_size, fsync, env))
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
    return {"in_bytes": in_bytes, "sets": sets, "out_bytes": out_bytes, "runs": runs}


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


def floors(measured: dict) -> dict:
    """Per input set: median durable and buffered copy-floor seconds and their input bytes/s."""
    out = {}
    for key, nbytes in measured["in_bytes"].items():
        durable = statistics.median(measured["runs"][f"floor_durable:{key}"])
        buffered = statistics.median(measured["runs"][f"floor_buffered:{key}"])
        out[key] = {"in_bytes": nbytes, "durable_s": round(durable, 3), "buffered_s": round(buffered, 3),
                    "durable_gbps": round(nbytes / durable / 1e9, 3), "buffered_gbps": round(nbytes / buffered / 1e9, 3)}
    return out


def table(measured: dict, methods: list[str]) -> dict:
    """Per method: durable walls, throughput (input bytes/s) as a fraction of its input set's copy floor
    (durable wall against the durable floor, steady state against the buffered floor), ratios."""
    floor = floors(measured)
    rows = {}
    for method in methods:
        ours, f = median_row(measured["runs"][f"mergescope:{method}"]), floor[measured["sets"][method]]
        steady = ours.get("steady_bytes_per_s")
        row = {"mergescope": ours, "inputs": measured["sets"][method], "floor": f,
               "fraction": round(f["durable_s"] / ours["durable_s"], 3),
               "steady_fraction": round(steady / (f["in_bytes"] / f["buffered_s"]), 3) if steady else None}
        floor_s = f["durable_s"]
        mk_runs = measured["runs"].get(f"mergekit:{method}")
        if mk_runs:
            mk = median_row(mk_runs)
            row.update(mergekit=mk, mergekit_fraction=round(floor_s / mk["durable_s"], 3),
                       wall_ratio=round(ours["durable_s"] / mk["durable_s"], 3),
                       rss_ratio=round(ours["peak_rss_gb"] / mk["peak_rss_gb"], 3))
        elif f"mergekit_error:{method}" in measured["runs"]:
            row["mergekit_error"] = measured["runs"][f"mergekit_error:{method}"][0]
        cached_runs = measured["runs"].get(f"mergescope_cached:{method}")
        if cached_runs:  # the same method with its results through the page cache, alternating with the above
            cached = median_row(cached_runs)
            row.update(cached=cached, cached_steady_fraction=round(
                cached["steady_bytes_per_s"] / (f["in_bytes"] / f["buffered_s"]), 3) if cached.get("steady_bytes_per_s")
                else None)
        rows[method] = row
    linear = rows.get("linear")
    for method, row in rows.items():  # issue 20: the sparsifying methods within 1.5x linear's wall
        row["vs_linear"] = round(row["mergescope"]["durable_s"] / linear["mergescope"]["durable_s"], 3) if linear else None
        row["vs_linear_paired"] = paired_ratios(measured["runs"], method) if linear else []
    return {"floors": floor, "methods": rows,
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


def paired_text(ratios: list[float] | None) -> str:
    """'median (lowest-highest)' of paired ratios; '-' for none."""
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def print_table(results: dict) -> None:
    for key, f in results["floors"].items():
        print(f"copy floor {key}: read {f['in_bytes'] / 1e9:.2f} GB, write {results['out_bytes'] / 1e9:.2f} GB: "
              f"durable {f['durable_s']:.2f} s = {f['durable_gbps']:.2f} GB/s of input, buffered {f['buffered_s']:.2f} s "
              f"= {f['buffered_gbps']:.2f} GB/s")
    print(f"{'method':16s} {'ours s':>7s} {'/lin':>5s} {'paired /lin':>16s} {'frac':>5s} {'steady':>6s} {'1st s':>5s} "
          f"{'RSS GB':>6s} {'MK s':>7s} {'MK frac':>7s} {'ratio':>5s} {'MK RSS':>6s}")
    for method, r in results["methods"].items():
        o, mk = r["mergescope"], r.get("mergekit")
        steady = "-" if r["steady_fraction"] is None else f"{r['steady_fraction']:.2f}"
        mk_cols = (f"{mk['durable_s']:7.1f} {r['mergekit_fraction']:7.2f} {r['wall_ratio']:5.2f} {mk['peak_rss_gb']:6.2f}"
                   if mk else f"{'-':>7s} {'-':>7s} {'-':>5s} {'-':>6s}")
        lin = "-" if r.get("vs_linear") is None else f"{r['vs_linear']:.2f}"
        print(f"{method:16s} {o['durable_s']:7.1f} {lin:>5s} {paired_text(r.get('vs_linear_paired')):>16s} "
              f"{r['fraction']:5.2f} {steady:>6s} {o['first_tensor_s']:5.2f} {o['peak_rss_gb']:6.2f} {mk_cols}")
    for method, r in results["methods"].items():
        if "cached" in r:
            c, o = r["cached"], r["mergescope"]
            print(f"{method}: results through the page cache (MERGESCOPE_DIRECT=0) {c['durable_s']:.1f} s, steady "
                  f"{r['cached_steady_fraction']:.2f} of the floor; past it (default) {o['durable_s']:.1f} s, steady "
                  f"{r['steady_fraction']:.2f}")
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
    ax.bar([x - 0.27 for x in xs], [r["fraction"] for r in rows], 0.27, label="mergescope durable wall / durable floor")
    ax.bar(list(xs), [r["steady_fraction"] or 0 for r in rows], 0.27, label="mergescope steady state / buffered floor")
    cached = [(x, r["cached_steady_fraction"]) for x, r in zip(xs, rows) if r.get("cached_steady_fraction")]
    if cached:  # the same runs' results through the page cache (MERGESCOPE_DIRECT=0): an outline over the bar
        ax.bar([x for x, _ in cached], [v for _, v in cached], 0.27, fill=False, edgecolor="black", ls="--", lw=1,
               label="its steady state, results through the page cache")
    ran = [m for m, r in zip(methods, rows) if r.get("mergekit")]
    if ran:
        ax.bar([x + 0.27 for x in xs], [r.get("mergekit_fraction", 0) for r in rows], 0.27, color="C2",
               label="MergeKit 0.1.5 durable wall / durable floor")
    mergekit = ("MergeKit not run" if not ran else f"MergeKit {results['mergekit_repeats']}"
                + ("" if len(ran) == len(methods) else f" for {', '.join(ran)}"))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), methods, rotation=30)
    ax.set_ylabel("throughput / copy floor")
    ax.legend(fontsize=8)
    speeds = [f["durable_gbps"] for f in results["floors"].values()]
    ax.set_title(f"{fixture_label(results)} Llama, durable copy floors {min(speeds):.2f}-{max(speeds):.2f} GB/s, "
                 f"median of {results['repeats']} ({mergekit}), load {results['load_start']:.1f}-{results['load_end']:.1f}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


SPARSIFYING = ("ties", "dare_ties", "breadcrumbs", "della")


def fixture_label(results: dict) -> str:
    """'4 x 1.07 GB fp32' for a results file."""
    dtype = {"float32": "fp32", "bfloat16": "bf16"}[results.get("dtype", "float32")]
    return f"4 x {results['out_bytes'] / 1e9:.2f} GB {dtype}"


def plot_vs_linear(named: list[tuple[str, dict]], path: Path, values: Path) -> None:
    """The TIES family's walls over linear's, paired per repeat (:func:`paired_ratios`), one group of bars per
    results file: the median, a line from the lowest to the highest repeat, the 1.5x target; the plotted ratios
    go to ``values`` (JSON). Why: whether a target is met, missed or a tie within noise reads off the line
    crossing 1.5, not off a table of medians."""
    ratios_of = {name: {"fixture": fixture_label(r), **{m: paired_ratios(r["runs"], m) for m in SPARSIFYING}}
                 for name, r in named}
    values.parent.mkdir(parents=True, exist_ok=True)
    values.write_text(json.dumps(ratios_of, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(SPARSIFYING)
    for g, name in enumerate(ratios_of):
        for m, method in enumerate(SPARSIFYING):
            ratios = ratios_of[name][method]
            if not ratios:
                continue
            x, mid = g + (m - (len(SPARSIFYING) - 1) / 2) * width, statistics.median(ratios)
            ax.bar(x, mid, width * 0.9, color=f"C{m}", label=method if g == 0 else None)
            ax.vlines(x, ratios[0], ratios[-1], color="black", lw=1.2)
    ax.axhline(1.5, color="grey", lw=0.8, ls="--", label="target 1.5x")
    ax.set_xticks(range(len(named)), [f"{name}\n{row['fixture']}" for name, row in ratios_of.items()], fontsize=8)
    ax.set_ylabel("durable wall / linear's, same repeat")
    ax.set_title("TIES family against linear, per repeat: median and lowest-highest of each pass's repeats", fontsize=9)
    ax.legend(fontsize=8, ncol=5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(mvm.SIZES), default="1gb", help="Per-model fixture size.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="The fixture's dtype (bfloat16: the same values rounded; results get a _bf16 suffix).")
    parser.add_argument("--methods", default=ALL_METHODS)
    parser.add_argument("--mergekit-methods", default=None, help="Methods also run with MergeKit [default: all].")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit-repeats", type=int, default=None,
                        help="Run MergeKit in the first N repeats only [default: every repeat].")
    parser.add_argument("--fsync-pairs", type=int, default=4, help="Extra alternating linear runs with/without fsync.")
    parser.add_argument("--cached-methods", default="",
                        help="Methods also run with MERGESCOPE_DIRECT=0 (results through the page cache), alternating.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-shard-size", default="500MB", help="mergescope's output shards (fsync is per shard).")
    parser.add_argument("--work", type=Path, default=mvm.OUT / "fixture")
    parser.add_argument("--tag", default="", help="Appended to the result and figure names (a pass over some methods "
                                                  "beside a full one).")
    parser.add_argument("--vs-linear-figure", nargs="+", type=Path, metavar="RESULTS_JSON",
                        help="Only draw docs/img/merge_vs_linear_paired.png (values: bench/results/"
                             "merge_vs_linear_paired.json) from saved results files; no runs.")
    args = parser.parse_args(argv)
    if args.vs_linear_figure:
        named = [(path.stem.removeprefix("merge_throughput_"), json.loads(path.read_text()))
                 for path in args.vs_linear_figure]
        plot_vs_linear(named, FIGURE.with_name("merge_vs_linear_paired.png"),
                       RESULTS.with_name("merge_vs_linear_paired.json"))
        return 0
    args.mergekit_repeats = args.repeats if args.mergekit_repeats is None else args.mergekit_repeats
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    mvm.OUT.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    mk_methods = set(methods if args.mergekit_methods is None else args.mergekit_methods.split(","))
    label = args.size if args.dtype == "float32" else f"{args.size}_bf16"
    folders = mvm.build_fixture(args.work / label, args.size, args.dtype)
    warm_up(args, methods)
    cache_before = page_cache_gb()
    read_s, total = mvm.read_speed(folders)  # warms the page cache, then times a plain read
    load_start = os.getloadavg()[0]
    print(f"fixture 4 x {total / 4e9:.2f} GB; page cache {cache_before:.1f} -> {page_cache_gb():.1f} GB after warming; "
          f"read alone {total / read_s / 1e9:.2f} GB/s; load {load_start:.1f}", flush=True)
    measured = measure(args, folders, methods, mk_methods, set(filter(None, args.cached_methods.split(","))))
    results = {"size": args.size, "dtype": args.dtype, "repeats": args.repeats, "mergekit_repeats": args.mergekit_repeats, "threads": args.threads, "max_shard_size": args.max_shard_size,
               "cpus": os.cpu_count(), "mem_total_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9,
               "in_bytes": measured["in_bytes"], "out_bytes": measured["out_bytes"],
               "read_only_gbps": round(total / read_s / 1e9, 3), "page_cache_gb_after_warm": page_cache_gb(),
               "load_start": load_start, "load_end": os.getloadavg()[0],
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), **table(measured, methods),
               "runs": measured["runs"]}
    print_table(results)
    print(f"load average {results['load_start']:.1f} at start, {results['load_end']:.1f} at end; "
          f"page cache {results['page_cache_gb_after_warm']:.1f} GB of {results['mem_total_gb']:.0f} GB", flush=True)
    label += f"_{args.tag}" if args.tag else ""
    results_path = Path(str(RESULTS).format(size=label))
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(str(FIGURE).format(size=label)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
