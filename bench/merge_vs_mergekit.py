"""mergescope vs MergeKit 0.1.5: wall time and peak RSS of the same recipes on the same models.

Builds a Llama-architecture fixture (base + 3 fine-tunes, fp32, sharded safetensors, random
seeded weights written tensor by tensor; nothing downloaded), warms the page cache, measures the
machine's sequential read speed on the fixture, then runs each method with both tools as
separate processes under ``/usr/bin/time`` (wall seconds, max RSS) and checks their outputs agree.

    .venv/bin/python bench/merge_vs_mergekit.py               # ~0.25 GB per model
    .venv/bin/python bench/merge_vs_mergekit.py --size 1gb    # ~1 GB per model (issue target)

Writes bench/out/merge_vs_mergekit.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv" / "bin"
OUT = ROOT / "bench" / "out"
SIZES = {  # hidden, intermediate, layers, vocab -> about 0.25 GB / 1 GB / 3 GB of fp32 per model
    "250mb": (768, 2048, 8, 16000),
    "1gb": (1024, 2816, 18, 32000),
    "3gb": (2048, 5632, 14, 32000),  # TinyLlama's widths, 14 of its 22 layers
}
METHODS = {
    "linear": "models:\n{models_w}merge_method: linear\n",
    "task_arithmetic": "models:\n{models_w}base_model: {base}\nmerge_method: task_arithmetic\n",
    "ties": "models:\n{models_wd}base_model: {base}\nmerge_method: ties\n",
    "dare_ties": "models:\n{models_wd}base_model: {base}\nmerge_method: dare_ties\n",
    "slerp": "models:\n  - model: {a}\n  - model: {base}\nbase_model: {base}\nmerge_method: slerp\nparameters:\n  t: 0.4\n",
    "breadcrumbs": "models:\n{models_wd}base_model: {base}\nmerge_method: breadcrumbs\n",
}


def llama_tensors(hidden: int, inter: int, layers: int, vocab: int):
    """(name, shape) of a Llama state dict in the order transformers writes it."""
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden // 4, hidden)),
                            ("self_attn.v_proj", (hidden // 4, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            yield p + name + ".weight", shape
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def build_fixture(root: Path, size: str, dtype: str = "float32") -> list[Path]:
    from transformers import LlamaConfig

    hidden, inter, layers, vocab = SIZES[size]
    folders = []
    for m, name in enumerate(["base", "ft1", "ft2", "ft3"]):
        folder = root / name
        folders.append(folder)
        if not (folder / "config.json").exists():
            _write_weights(folder, size, m, hidden, inter, layers, vocab, dtype)
        LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                    tie_word_embeddings=False, architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    return folders


def _write_weights(folder: Path, size: str, m: int, hidden: int, inter: int, layers: int, vocab: int,
                   dtype: str = "float32") -> None:
    """The same float32 values for every dtype, rounded to ``dtype`` (bfloat16: what most checkpoints ship as)."""
    import torch

    from mergescope.io import ShardedWriter

    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(folder, "200MB", {"fixture": size})
    for i, (tname, shape) in enumerate(llama_tensors(hidden, inter, layers, vocab)):
        t = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02
        if m:  # fine-tune m = base + seeded noise
            t += 0.002 * torch.randn(shape, generator=torch.Generator().manual_seed(1000 * m + i))
        writer.add(tname, t.to(getattr(torch, dtype)))
    writer.close()


def recipe(method: str, folders: list[Path]) -> str:
    base, fts = folders[0], folders[1:]
    weights = (0.5, 0.3, 0.2)
    models_w = "".join(f"  - model: {f}\n    parameters: {{weight: {w}}}\n" for f, w in zip(fts, weights))
    models_wd = "".join(f"  - model: {f}\n    parameters: {{weight: {w}, density: 0.5}}\n" for f, w in zip(fts, weights))
    return METHODS[method].format(models_w=models_w, models_wd=models_wd, base=base, a=fts[0])


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command under /usr/bin/time: wall seconds and peak resident set size (GB). ``env``: variables added
    to this process's environment for that command only."""
    stats = Path(OUT / ".time.txt")
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(stats), *cmd], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env}, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stderr[-2000:]}")
    _, max_kb = stats.read_text().split()[-2:]
    return {"wall_s": round(wall, 3), "peak_rss_gb": round(int(max_kb) / 1e6, 3)}


def summarize(runs: list[dict]) -> dict:
    """Median wall time and largest peak RSS over repeated runs (all walls kept)."""
    walls = sorted(r["wall_s"] for r in runs)
    return {"wall_s": walls[len(walls) // 2], "peak_rss_gb": max(r["peak_rss_gb"] for r in runs), "walls_s": walls}


def read_speed(folders: list[Path]) -> tuple[float, int]:
    """Seconds to read every input tensor file sequentially (page cache warm) and the bytes read."""
    files = [f for d in folders for f in sorted(d.glob("*.safetensors"))]
    for f in files:  # warm
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass
    buf = bytearray(1 << 24)
    start = time.perf_counter()
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return time.perf_counter() - start, total


def max_diff(a: Path, b: Path) -> tuple[float, int, int]:
    """Largest absolute difference, entries differing by more than 1e-6, and entries compared."""
    from mergescope.io import load

    x, y = load(a), load(b)
    worst, count, total = 0.0, 0, 0
    for name in x:
        diff = (x.read(name).double() - y.read(name).double()).abs()
        worst = max(worst, float(diff.max()))
        count += int((diff > 1e-6).sum())
        total += diff.numel()
    return worst, count, total


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "wall_s", "wall time (s)"), (axes[1], "peak_rss_gb", "peak RSS (GB)")):
        xs = range(len(methods))
        ax.bar([x - 0.2 for x in xs], [results["methods"][m]["mergekit"][key] for m in methods], 0.4, label="MergeKit 0.1.5")
        ax.bar([x + 0.2 for x in xs], [results["methods"][m]["mergescope"][key] for m in methods], 0.4, label="mergescope")
        ax.set_xticks(list(xs), methods, rotation=30)
        ax.set_ylabel(label)
    axes[0].legend()
    fig.suptitle(f"4 x {results['model_gb']:.2f} GB fp32 Llama, {results['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="250mb")
    parser.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,slerp")
    parser.add_argument("--work", type=Path, default=OUT / "fixture")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="Runs per tool, alternating; the row keeps the median wall and the largest peak RSS.")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    folders = build_fixture(args.work / args.size, args.size)
    read_s, total = read_speed(folders)
    results = {"size": args.size, "model_gb": total / 4 / 1e9, "cpus": os.cpu_count(), "read_all_inputs_s": round(read_s, 3),
               "read_gbps": round(total / read_s / 1e9, 2), "methods": {}}
    previous = OUT / "merge_vs_mergekit.json"
    if previous.exists():  # a rerun of some methods keeps the other methods' rows for the same fixture
        old = json.loads(previous.read_text())
        if old.get("size") == args.size:
            results["methods"] = old.get("methods", {})
    print(f"fixture 4 x {total / 4e9:.2f} GB; sequential read (page cache) {total / read_s / 1e9:.2f} GB/s", flush=True)
    print(f"{'method':18s} {'mergekit s':>10s} {'ours s':>8s} {'ratio':>6s} {'mk GB':>6s} {'ours GB':>8s} {'ratio':>6s} "
          f"{'read frac':>9s} {'max diff':>9s}", flush=True)
    for method in args.methods.split(","):
        cfg = OUT / f"{method}.yml"
        cfg.write_text(recipe(method, folders))
        mk_out, ms_out = OUT / f"mk-{method}", OUT / f"ms-{method}"
        mk_runs, ours_runs = [], []
        for _ in range(args.repeats):  # alternate the tools so both see the same machine state
            for d in (mk_out, ms_out):
                shutil.rmtree(d, ignore_errors=True)
            mk_runs.append(timed([str(VENV / "mergekit-yaml"), str(cfg), str(mk_out), "--random-seed", "0",
                                  "--lazy-unpickle", "--quiet", "--no-copy-tokenizer"]))
            ours_runs.append(timed([str(VENV / "mergescope"), "--quiet", "merge", str(cfg), str(ms_out), "--random-seed",
                                    "0", "--threads", str(args.threads), "--max-shard-size", "2GB"]))
        mk, ours = summarize(mk_runs), summarize(ours_runs)
        diff, differing, compared = max_diff(mk_out, ms_out) if method != "dare_ties" else (None, None, None)
        row = {"mergekit": mk, "mergescope": ours, "wall_ratio": round(ours["wall_s"] / mk["wall_s"], 3),
               "rss_ratio": round(ours["peak_rss_gb"] / mk["peak_rss_gb"], 3),
               "read_fraction": round(read_s / ours["wall_s"], 3), "max_abs_diff": diff,
               "entries_differing": differing, "entries": compared}
        results["methods"][method] = row
        print(f"{method:18s} {mk['wall_s']:10.2f} {ours['wall_s']:8.2f} {row['wall_ratio']:6.2f} {mk['peak_rss_gb']:6.2f} "
              f"{ours['peak_rss_gb']:8.2f} {row['rss_ratio']:6.2f} {row['read_fraction']:9.2f} "
              f"{'-' if diff is None else f'{diff:.1e}':>9s} {'' if diff is None else f'({differing} of {compared})'}",
              flush=True)
        for d in (mk_out, ms_out):
            shutil.rmtree(d, ignore_errors=True)
    (OUT / "merge_vs_mergekit.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, OUT / "merge_vs_mergekit.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
