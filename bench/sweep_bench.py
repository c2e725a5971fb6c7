"""Barrier-matrix sweep throughput: 10 digits MLPs (45 pairs), local pool vs Ray, 1 and 2 workers.

Writes bench/out/sweep_bench.json and bench/out/sweep_scaling.png. Per-task overhead is
(wall x workers - serial compute) / tasks, where serial compute is the same 45 tasks run in this
process with no executor. Checks that every run's results table is byte-identical.

    .venv/bin/python bench/sweep_bench.py [--models 10] [--epochs 5] [--points 25]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

OUT = Path(__file__).resolve().parent / "out"


def make_zoo(folder: Path, models: int, epochs: int) -> list[str]:
    """Default-width digits MLPs from different seeds (cached: reused when present)."""
    from mergescope.io import save
    from mergescope.tasks import TRAIN_DEFAULTS, build, digits, train
    from mergescope.tasks.checkpoints import model_metadata

    folder.mkdir(parents=True, exist_ok=True)
    task, names = digits(), []
    d = TRAIN_DEFAULTS["mlp"]
    for seed in range(models):
        name = f"mlp_seed{seed}_e{epochs}.safetensors"
        if not (folder / name).exists():
            model = build("mlp", seed=seed)
            train(model, task, epochs=epochs, lr=d["lr"], weight_decay=d["weight_decay"], seed=seed)
            save(model.state_dict(), folder / name, metadata=model_metadata("mlp", {}))
        names.append(name)
    return names


def timed_run(spec_file: Path, out: Path, executor) -> dict:
    from mergescope import sweep

    if out.exists():
        out.unlink()
    start = time.perf_counter()
    first = []
    result = sweep.run(spec_file, out, executor, on_row=lambda d, t, r: first or first.append(time.perf_counter()))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tasks": result.ran, "tasks_per_s": result.ran / wall,
            "first_row_s": first[0] - start, "steady_tasks_per_s": (result.ran - 1) / (wall - (first[0] - start))}


def serial(spec_file: Path) -> dict:
    from mergescope import sweep

    specs = sweep.expand(sweep.read(spec_file), root=spec_file.parent)
    sweep.run_task(specs[0])  # warm caches (task data, imports)
    start = time.perf_counter()
    for s in specs:
        sweep.run_task(s)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tasks": len(specs), "per_task_s": wall / len(specs), "tasks_per_s": len(specs) / wall}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label in ("local", "ray"):
        xs = [1, 2]
        ax.plot(xs, [results[f"{label}_{w}"]["tasks_per_s"] for w in xs], "o-", label=f"{label} (incl. start-up)")
        ax.plot(xs, [results[f"{label}_{w}"]["steady_tasks_per_s"] for w in xs], "o--", label=f"{label} (steady)")
    ax.axhline(results["serial"]["tasks_per_s"], color="grey", ls=":", label="serial, in-process")
    ax.set_xticks([1, 2])
    ax.set_xlabel("workers")
    ax.set_ylabel("tasks / s")
    ax.set_title("barrier-matrix sweep, 45 pairs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--points", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from mergescope import sweep
    from mergescope.results import write_json

    work = OUT / "sweep_bench"
    names = make_zoo(work, args.models, args.epochs)
    spec_file = work / "barrier.yaml"
    spec_file.write_text(yaml.safe_dump({"kind": "barrier_matrix", "checkpoints": names, "points": args.points}))
    import os

    results = {"load_average_at_start": os.getloadavg()[0], "models": args.models, "pairs": args.models * (args.models - 1) // 2, "points": args.points,
               "serial": serial(spec_file)}
    for w in (1, 2):
        results[f"local_{w}"] = timed_run(spec_file, work / f"local_{w}.jsonl", sweep.LocalExecutor(workers=w))
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results["ray_init_s"] = time.perf_counter() - start
    for w in (1, 2):  # default: checkpoints under 64 MB shared through the object store
        results[f"ray_{w}"] = timed_run(spec_file, work / f"ray_{w}.jsonl", sweep.RayExecutor(workers=w))
    results["ray_2_by_path"] = timed_run(spec_file, work / "ray_2_by_path.jsonl",
                                         sweep.RayExecutor(workers=2, share_below=0))
    ray.shutdown()
    tables = {k: (work / f"{k}.jsonl").read_bytes() for k in ("local_1", "local_2", "ray_1", "ray_2", "ray_2_by_path")}
    results["load_average_at_end"] = os.getloadavg()[0]
    results["tables_identical"] = len(set(tables.values())) == 1
    per_task = results["serial"]["per_task_s"]
    for k in tables:
        r = results[k]
        workers = int(k.split("_")[1])
        r["overhead_per_task_s"] = (r["wall_s"] * workers - per_task * r["tasks"]) / r["tasks"]
    write_json(OUT / "sweep_bench.json", results)
    plot(results, OUT / "sweep_scaling.png")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
