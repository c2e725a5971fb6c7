"""Run a corpus of malformed checkpoints and recipes through the CLI; every one must be a clean
one-line error with exit code 2, no payload executed, no input modified.

Usage: python bench/malformed_corpus.py [--out bench/out/malformed_corpus.json]
"""

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

CANARY = "PAYLOAD_RAN"


class Payload:
    """Would create the canary file if unpickled with weights_only=False."""

    def __reduce__(self):
        return (os.system, (f"touch {CANARY}",))


def raw(path: Path, header, data: bytes = b"", length=None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def checkpoints(root: Path) -> dict[str, Path]:
    """Malformed checkpoint files and folders, one per failure mode."""
    good = root / "good.safetensors"
    save_file({"w": torch.ones(4)}, good)
    cases = {
        "empty file": _write(root / "empty.safetensors", b""),
        "only 4 bytes": _write(root / "short.safetensors", b"\x01\x02\x03\x04"),
        "truncated data": _write(root / "trunc.safetensors", good.read_bytes()[:-3]),
        "huge header length": raw(root / "huge.safetensors", b"{}", length=2**62),
        "header length past EOF": raw(root / "past.safetensors", b"{}", length=4096),
        "header not JSON": raw(root / "notjson.safetensors", b"{this is not json}"),
        "header is a list": raw(root / "list.safetensors", b"[1, 2, 3]"),
        "header not UTF-8": raw(root / "utf.safetensors", b'{"\xff\xfe": 1}'),
        "unknown dtype": raw(root / "dtype.safetensors", {"w": entry("Q4")}, b"\0" * 8),
        "negative shape": raw(root / "neg.safetensors", {"w": entry(shape=(-2,))}, b"\0" * 8),
        "float shape": raw(root / "fshape.safetensors", {"w": entry(shape=(2.5,))}, b"\0" * 8),
        "shape/offset size mismatch": raw(root / "size.safetensors", {"w": entry(shape=(3,))}, b"\0" * 12),
        "offsets reversed": raw(root / "rev.safetensors", {"w": entry(offsets=(8, 0))}, b"\0" * 8),
        "offsets past data": raw(root / "pastdata.safetensors", {"w": entry(shape=(4,), offsets=(0, 16))}, b"\0" * 8),
        "overlapping tensors": raw(root / "overlap.safetensors", {"a": entry(), "b": entry(offsets=(4, 12))}, b"\0" * 12),
        "duplicate tensor names": raw(root / "dup.safetensors",
                                      b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                                      b"\0" * 4),
        "metadata not strings": raw(root / "meta.safetensors", {"__metadata__": {"a": 1}, "w": entry()}, b"\0" * 8),
        "extra entry keys": raw(root / "extra.safetensors", {"w": {**entry(), "evil": 1}}, b"\0" * 8),
        "pickle with payload (.pt)": _pickle(root / "evil.pt", {"w": torch.ones(1), "x": Payload()}),
        "pickle with payload (.bin folder)": _pickle_folder(root / "evil_bin", {"w": Payload()}),
        "pickle that is not a state dict": _pickle(root / "list.pt", [torch.ones(1)]),
        "not a checkpoint (.txt)": _write(root / "notes.txt", b"hello"),
        "missing path": root / "does-not-exist.safetensors",
        "folder without weights": _folder(root / "emptydir"),
    }
    cases.update(_index_cases(root, good))
    return cases


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _pickle(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _pickle_folder(path: Path, obj) -> Path:
    path.mkdir()
    torch.save(obj, path / "pytorch_model.bin")
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _index_folder(root: Path, name: str, index, shard: Path | None = None, link: Path | None = None) -> Path:
    folder = root / name
    folder.mkdir()
    if shard is not None:
        (folder / "model-00001-of-00001.safetensors").write_bytes(shard.read_bytes())
    if link is not None:
        (folder / "model-00001-of-00001.safetensors").symlink_to(link)
    (folder / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return folder


def _index_cases(root: Path, good: Path) -> dict[str, Path]:
    outside = root / "secret.safetensors"
    outside.write_bytes(good.read_bytes())
    shard = "model-00001-of-00001.safetensors"
    return {
        "index: path traversal": _index_folder(root, "trav", {"weight_map": {"w": "../secret.safetensors"}}),
        "index: absolute path": _index_folder(root, "abs", {"weight_map": {"w": str(outside)}}),
        "index: symlink escape": _index_folder(root, "link", {"weight_map": {"w": shard}}, link=outside),
        "index: missing shard": _index_folder(root, "missing", {"weight_map": {"w": "model-00009-of-00009.safetensors"}}),
        "index: tensor not in shard": _index_folder(root, "ghost", {"weight_map": {"w": shard, "ghost": shard}}, shard=good),
        "index: not JSON": _index_folder(root, "badjson", "{oops", shard=good),
        "index: weight_map not a mapping": _index_folder(root, "badmap", {"weight_map": ["w"]}, shard=good),
    }


def recipes(root: Path) -> dict[str, Path]:
    """Malformed recipes against small valid checkpoints."""
    a, b = root / "ra.safetensors", root / "rb.safetensors"
    save_file({"w": torch.ones(4)}, a)
    save_file({"w": torch.ones(5)}, root / "rc.safetensors")
    nan = root / "rnan.safetensors"
    save_file({"w": torch.tensor([float("nan"), 1.0, 2.0, 3.0])}, nan)
    save_file({"w": torch.zeros(4)}, b)
    big = root / "rbig.safetensors"
    save_file({"w": torch.full((4,), 60000.0, dtype=torch.float16)}, big)
    evil = _pickle(root / "revil.pt", {"w": torch.ones(4), "x": Payload()})
    texts = {
        "recipe: not YAML": "models: [unclosed\n",
        "recipe: YAML with python tag": f"!!python/object/apply:os.system ['touch {CANARY}']\n",
        "recipe: unknown key": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\nmodle: x\n",
        "recipe: unknown method": f"merge_method: frankenmerge\nmodels:\n  - model: {a}\n  - model: {b}\n",
        "recipe: missing model": f"merge_method: linear\nmodels:\n  - model: {root / 'nope.safetensors'}\n    parameters: {{weight: 1}}\n",
        "recipe: hub model name": "merge_method: linear\nmodels:\n  - model: meta-llama/Llama-3-8B\n    parameters: {weight: 1}\n",
        "recipe: weight not a number": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: heavy}}\n  - model: {b}\n    parameters: {{weight: 1}}\n",
        "recipe: infinite weight": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: .inf}}\n  - model: {b}\n    parameters: {{weight: 1}}\n",
        "recipe: density out of range": f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 1.5}}\n",
        "recipe: mismatched shapes": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {root / 'rc.safetensors'}\n    parameters: {{weight: 1}}\n",
        "recipe: NaN in merged tensor": f"merge_method: linear\nmodels:\n  - model: {nan}\n    parameters: {{weight: 1}}\n  - model: {b}\n    parameters: {{weight: 1}}\n",
        "recipe: ties without base": f"merge_method: ties\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0.5}}\n",
        "recipe: empty file": "",
        "recipe: density zero": f"merge_method: dare_linear\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, density: 0}}\n",
        "recipe: NaN weight in a gradient": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: [1, .nan]}}\n  - model: {b}\n    parameters: {{weight: 1}}\n",
        "recipe: infinite lambda": f"merge_method: task_arithmetic\nbase_model: {b}\nparameters: {{lambda: -.inf}}\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n",
        "recipe: Inf from fp16 overflow": f"merge_method: linear\nparameters: {{normalize: false}}\nmodels:\n  - model: {big}\n    parameters: {{weight: 1}}\n  - model: {big}\n    parameters: {{weight: 1}}\n",
        "recipe: model is a pickle payload": f"merge_method: linear\nmodels:\n  - model: {evil}\n    parameters: {{weight: 1}}\n  - model: {a}\n    parameters: {{weight: 1}}\n",
        "recipe: YAML alias bomb (9^9)": f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight:\n{_alias_bomb(9)}",
    }
    out = {}
    for i, (name, text) in enumerate(texts.items()):
        path = root / f"recipe{i}.yml"
        path.write_text(text)
        out[name] = path
    return out


def _alias_bomb(levels: int) -> str:
    """'Billion laughs': each level lists the previous one 9 times (9**levels strings if expanded)."""
    lines, prev = [], None
    for i in range(levels):
        items = ", ".join(["lol"] * 9 if prev is None else [f"*l{prev}"] * 9)
        lines.append(f"        - &l{i} [{items}]\n")
        prev = i
    return "".join(lines)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else [path]
    for f in files:
        if f.exists():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergescope", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out/malformed_corpus.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mergescope-corpus-"))
    rows = []
    jobs = [(name, ["inspect", str(p)], p) for name, p in checkpoints(root).items()]
    jobs += [(name, ["merge", str(p), str(root / f"out{i}")], p) for i, (name, p) in enumerate(recipes(root).items())]
    inputs = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    before = {p: digest(p) for p in inputs}
    for name, cmd, path in jobs:
        result = run(cmd, root)
        lines = result.stderr.strip().splitlines()
        ok = (result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr
              and not (root / CANARY).exists())
        if cmd[0] == "merge":
            out = Path(cmd[2])
            leftovers = [p for p in (out, out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.lock"))
                         if p.exists()]
            ok = ok and not leftovers
        rows.append({"input": name, "command": cmd[0], "exit_code": result.returncode,
                     "message": lines[-1] if lines else "", "ok": ok})
        print(f"{'ok ' if ok else 'BAD'} {result.returncode}  {name:36s} {lines[-1][:110] if lines else ''}", flush=True)
    modified = [str(p) for p in inputs if digest(p) != before[p]]
    payload_ran = (root / CANARY).exists()
    summary = {"cases": len(rows), "all_ok": all(r["ok"] for r in rows) and not modified and not payload_ran,
               "inputs_modified": modified, "payload_executed": payload_ran}
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    sys.exit(0 if summary["all_ok"] else 1)


if __name__ == "__main__":
    main()
