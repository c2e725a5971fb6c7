"""Wall time of the full default study, cold (empty cache) and warm (every model reused).

Usage: python bench/study_time.py [--quick] [--out bench/out/study_time.json]
The README states the numbers; targets (2 cores, all replicates, digits and MNIST-1D): full cold
< 6 min, warm rerun < 15 s, --quick cold < 90 s (the end-to-end test's run).
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(out: Path, quick: bool) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "mergescope", "--quiet", "study", "--out", str(out)] + (["--quick"] if quick else [])
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench/out/study_time.json")
    args = parser.parse_args()
    folder = Path("bench/out/study-quick" if args.quick else "bench/out/study-full")
    shutil.rmtree(folder, ignore_errors=True)
    cold = run(folder, args.quick)
    trained = json.loads((folder / "results.json").read_text())["models"]["trained"]
    warm = run(folder, args.quick)
    results = json.loads((folder / "results.json").read_text())
    result = {"quick": args.quick, "replicates": results["replicates"], "cold_seconds": cold, "warm_seconds": warm,
              "speedup": cold / warm, "models_trained_cold": trained, "warm_stage_seconds": results["timings"]}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
