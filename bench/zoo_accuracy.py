"""Test accuracy of every zoo model on digits with its default training recipe, over seeds.

Usage: python bench/zoo_accuracy.py [--seeds 3] [--out bench/out/zoo_accuracy.json]
Checks the foundation's targets: every model >= 95%, MLP and CNN >= 97%.
"""

import argparse
import json
import time
from pathlib import Path

import torch

import mergescope as ms

TARGETS = {"mlp": 0.97, "cnn": 0.97, "resnet": 0.95, "transformer": 0.95}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/out/zoo_accuracy.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = ms.tasks.digits()
    rows = []
    for name in ms.tasks.ZOO:
        for seed in range(args.seeds):
            start = time.perf_counter()
            model = ms.tasks.build(name, seed=seed)
            ms.tasks.train(model, task, seed=seed, **ms.tasks.TRAIN_DEFAULTS[name])
            metrics = task.evaluate(model, "test")
            rows.append({"model": name, "seed": seed, **metrics, "seconds": time.perf_counter() - start,
                         "params": sum(p.numel() for p in model.parameters())})
            print(f"{name:12s} seed {seed}  acc {metrics['accuracy']:.4f}  loss {metrics['loss']:.4f}  "
                  f"{rows[-1]['seconds']:.1f}s", flush=True)
    summary = {}
    for name, target in TARGETS.items():
        accs = [r["accuracy"] for r in rows if r["model"] == name]
        summary[name] = {"min": min(accs), "mean": sum(accs) / len(accs), "target": target, "met": min(accs) >= target}
        print(f"{name:12s} min {min(accs):.4f} mean {summary[name]['mean']:.4f} target {target}  "
              f"{'OK' if summary[name]['met'] else 'MISSED'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
