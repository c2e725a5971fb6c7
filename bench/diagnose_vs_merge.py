"""Data-free `mergescope diagnose` vs a linear `mergescope merge` of the same two checkpoints, side by side.

Goal (issue 17): diagnosing two 1 GB checkpoints takes no longer than merging them linearly, with no
more memory. Builds two ~1 GB fp32 single-file safetensors checkpoints in /tmp (the Llama layout of
bench/merge_vs_mergekit.py, seeded random weights, the second a small perturbation of the first),
warms the page cache, then runs, alternating, ``repeats`` times each: the linear merge (default
threads), the data-free diagnose, and the diagnose without the alignment gap, each as its own
process under ``/usr/bin/time`` (wall seconds, peak RSS); then the work alone in this process (the
engine's merge vs ``signals.data_free``, no start-up, imports or figure). Everything in /tmp is deleted.

    .venv/bin/python bench/diagnose_vs_merge.py              # ~1 GB per model
    .venv/bin/python bench/diagnose_vs_merge.py --size 250mb

Writes bench/results/diagnose_vs_merge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_vs_mergekit import OUT, SIZES, VENV, llama_tensors

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "diagnose_vs_merge.json"


class SeededState(Mapping):
    """A lazy state: each tensor drawn from (seed, position) when read, so writing streams one at a time."""

    def __init__(self, shapes: dict[str, tuple], seed: int, parent: int | None = None, scale: float = 0.01):
        self.shapes, self.seed, self.parent, self.scale = shapes, seed, parent, scale

    def _draw(self, name: str, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed * 100_003 + list(self.shapes).index(name))
        return torch.randn(self.shapes[name], generator=g) * 0.02

    def __getitem__(self, name: str):
        if self.parent is None:
            return self._draw(name, self.seed)
        return self._draw(name, self.parent).add_(self._draw(name, self.seed), alpha=self.scale)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def build(root: Path, size: str) -> list[Path]:
    """Two single-file checkpoints: a parent-like model and a small perturbation of it."""
    from mergescope.io import save

    shapes = dict(llama_tensors(*SIZES[size]))
    paths = [root / "a.safetensors", root / "b.safetensors"]
    save(SeededState(shapes, 1), paths[0])
    save(SeededState(shapes, 2, parent=1), paths[1])
    return paths


def timed(cmd: list[str]) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS (GB) of a command, from ``/usr/bin/time``.

    CPU time is reported too because this machine is shared: under load, wall time mostly measures
    the neighbours."""
    import subprocess
    import time

    stats = OUT / ".diagnose_time.txt"
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(stats), *cmd], check=False, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-2000:]}")
    max_kb, user, system = stats.read_text().split()[-3:]
    return {"wall_s": round(wall, 3), "cpu_s": round(float(user) + float(system), 3),
            "peak_rss_gb": round(int(max_kb) / 1e6, 3)}


def summarize(runs: list[dict]) -> dict:
    """Medians of wall and CPU seconds, the largest peak RSS, every run kept."""
    import statistics

    return {"wall_s": statistics.median(r["wall_s"] for r in runs), "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs), "runs": runs}


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass


def in_process(paths: list[Path], recipe: Path, root: Path, repeats: int) -> dict:
    """Median wall and CPU seconds of the work alone (no interpreter start, imports, figure): the
    engine's linear merge vs the streamed data-free pass with and without the alignment gap, alternating."""
    import resource
    import statistics
    import time

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    from mergescope.diagnose.signals import data_free
    from mergescope.merge.engine import merge

    walls: dict[str, list[tuple[float, float]]] = {"merge_linear": [], "data_free": [], "data_free_no_gap": []}
    for r in range(repeats):
        for name, done in walls.items():
            start, start_cpu = time.perf_counter(), cpu()
            if name == "merge_linear":
                merge(recipe, root / f"inproc_{r}")
                shutil.rmtree(root / f"inproc_{r}")
            else:
                data_free(paths, align_gap=name == "data_free")
            done.append((round(time.perf_counter() - start, 3), round(cpu() - start_cpu, 3)))
    return {name: {"wall_s": statistics.median(w for w, _ in runs), "cpu_s": statistics.median(c for _, c in runs),
                   "runs": runs} for name, runs in walls.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="1gb")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="diagnose_bench_", dir="/tmp"))
    try:
        paths = build(root, args.size)
        recipe = root / "linear.yml"
        recipe.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {p}\n    parameters:\n"
                                                                       "      weight: 0.5\n" for p in paths))
        warm(paths)
        runs: dict[str, list[dict]] = {"merge_linear": [], "diagnose": [], "diagnose_no_gap": []}
        ms = str(VENV / "mergescope")
        for r in range(args.repeats):
            for name, done in runs.items():
                out = root / f"out_{name}_{r}"
                if name == "merge_linear":
                    cmd = [ms, "--quiet", "merge", str(recipe), str(out)]
                else:
                    cmd = [ms, "--quiet", "diagnose", *map(str, paths), "-o", str(out)]
                    cmd += ["--no-align-gap"] if name == "diagnose_no_gap" else []
                done.append(timed(cmd))
                shutil.rmtree(out, ignore_errors=True)
                print(name, done[-1], flush=True)
        passes = in_process(paths, recipe, root, args.repeats)
        result = {"size": args.size, "bytes_per_model": paths[0].stat().st_size, "repeats": args.repeats,
                  "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                  "load_average": list(os.getloadavg()),
                  **{name: summarize(rs) for name, rs in runs.items()}, "in_process": passes}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("merge_linear", "diagnose", "diagnose_no_gap"):
        r = result[name]
        print(f"{name}: wall {r['wall_s']:.2f} s, CPU {r['cpu_s']:.2f} s, peak RSS {r['peak_rss_gb']:.3f} GB")
    print("in process:", {k: (v["wall_s"], v["cpu_s"]) for k, v in passes.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
