"""Coverage-guided fuzzing of the checkpoint parsers with atheris (bench-only: `pip install atheris`).

Usage: python bench/fuzz/fuzz_headers.py -atheris_runs=100000
Each input is written as a safetensors file (and, split at its first byte, as a sharded folder's
index + shard) and opened; anything but a clean MergescopeError is a crash that atheris reports.
"""

import os
import sys
import tempfile

import atheris

# the editable install's import hook bypasses atheris's instrumentation: import from the source tree
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
import numpy  # noqa: F401
import torch  # noqa: F401  (imported first so only mergescope's own code is instrumented)

with atheris.instrument_imports():
    from mergescope.errors import MergescopeError
    from mergescope.io import load

ROOT = tempfile.mkdtemp(prefix="mergescope-fuzz-")
FILE = os.path.join(ROOT, "f.safetensors")
FOLDER = os.path.join(ROOT, "m")
os.makedirs(FOLDER, exist_ok=True)


def open_all(path: str) -> None:
    ckpt = load(path)
    for name in ckpt:
        ckpt.read(name)
        ckpt[name].sum()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    split = fdp.ConsumeIntInRange(0, 255)
    rest = fdp.ConsumeBytes(sys.maxsize)
    with open(FILE, "wb") as f:
        f.write(rest)
    try:
        open_all(FILE)
    except MergescopeError:
        pass
    with open(os.path.join(FOLDER, "model.safetensors.index.json"), "wb") as f:
        f.write(rest[:split])
    with open(os.path.join(FOLDER, "model-00001-of-00001.safetensors"), "wb") as f:
        f.write(rest[split:])
    try:
        open_all(FOLDER)
    except MergescopeError:
        pass


def seed_corpus() -> str:
    """A few valid files (split byte first) so the fuzzer starts past the JSON parser."""
    import json

    import torch

    from mergescope.io import write_file

    corpus = os.path.join(ROOT, "corpus")
    os.makedirs(corpus, exist_ok=True)
    samples = [{"w": torch.ones(2, 3)}, {"a": torch.arange(4, dtype=torch.int8), "b": torch.zeros(1, dtype=torch.bfloat16)},
               {"x": torch.tensor([True, False])}]
    for i, state in enumerate(samples):
        write_file(os.path.join(ROOT, "seed.safetensors"), state, {"k": "v"})
        blob = open(os.path.join(ROOT, "seed.safetensors"), "rb").read()
        index = json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in state}}).encode()
        # FuzzedDataProvider takes the split byte from the *end* of the input
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(index + blob + bytes([len(index) % 256]))
        with open(os.path.join(corpus, f"file{i}"), "wb") as f:
            f.write(blob + bytes([0]))
    return corpus


def main() -> None:
    atheris.Setup(sys.argv + [seed_corpus()], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
