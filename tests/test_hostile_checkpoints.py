"""Hostile checkpoint files (issue 14): FIFOs, symlinks out of a model folder, JSON bombs, huge
shapes, truncated and protocol-5 pickles, inputs truncated while a merge runs, bad base configs.

Each case builds the input in ``tmp_path`` and runs the CLI on it. A representative of every class
runs in a subprocess through ``hostile.attack`` (exit code, stderr, peak RSS, files changed); the
other variants run the CLI in-process (much faster) under a SIGALRM guard, so a regression that
blocks on a FIFO fails instead of hanging. ``hostile.assert_refused`` checks all the promises:
exit 2, one line naming the file and the problem, no traceback or warning, nothing changed.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from hostile import CANARY, assert_refused, attack, run_inprocess  # noqa: E402

import mergescope as ms  # noqa: E402
from mergescope.errors import MergescopeError  # noqa: E402
from mergescope.io import write_file  # noqa: E402
from mergescope.merge.reader import JobMaps, Locator  # noqa: E402

DEEP = 100_000  # nesting depth of the JSON bombs
HUGE_INT = "9" * 5000  # over Python's 4,300-digit int conversion limit


# ---- building blocks ------------------------------------------------------------------------------

def st_file(path: Path, header, data: bytes = b"") -> None:
    """A safetensors file with a raw header (bytes, text or a JSON-able object)."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def good(path: Path, seed: int = 0, n: int = 4) -> None:
    g = torch.Generator().manual_seed(seed)
    write_file(path, {"w": torch.randn(n, n, generator=g), "v": torch.randn(2 * n, generator=g)})


def pt_bytes(legacy: bool = False, n: int = 64) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.arange(n, dtype=torch.float32)}, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def folder(d: Path, name: str = "m") -> Path:
    (d / name).mkdir()
    return d / name


def deep_json() -> str:
    return "[" * DEEP + "]" * DEEP


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {CANARY}",)


def linear_recipe(d: Path, *models: str) -> str:
    lines = "".join(f"  - {{model: {m}, parameters: {{weight: 0.5}}}}\n" for m in models)
    (d / "r.yml").write_text(f"merge_method: linear\nmodels:\n{lines}")
    return "r.yml"


# ---- cases: name -> builder(d) returning (args, strings the one line must hold) -------------------

def fifo_file(suffix):
    def build(d):
        os.mkfifo(d / f"fifo{suffix}")
        return ["inspect", f"fifo{suffix}"], (f"fifo{suffix}", "FIFO")
    return build


def fifo_in_folder(layout):
    def build(d):
        m = folder(d)
        target = {"single": "model.safetensors", "index": "model.safetensors.index.json", "bin": "pytorch_model.bin",
                  "bin_index": "pytorch_model.bin.index.json"}.get(layout)
        if layout == "shard":
            (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "s1.safetensors"}}))
            target = "s1.safetensors"
        if layout == "bin_shard":
            (m / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "s1.bin"}}))
            target = "s1.bin"
        os.mkfifo(m / target)
        return ["inspect", "m"], (target, "FIFO")
    return build


def fifo_model_in_recipe(d):
    good(d / "a.safetensors")
    os.mkfifo(d / "b.safetensors")
    return ["merge", linear_recipe(d, "a.safetensors", "b.safetensors"), "out.safetensors"], ("b.safetensors", "FIFO")


def link_out(name, target_kind):
    def build(d):
        if target_kind == "safetensors":
            good(d / "outside.safetensors")
        elif target_kind == "pt":
            (d / "outside.pt").write_bytes(pt_bytes())
        else:  # an index that names a shard inside the folder
            good(d / "m_shard.safetensors")
            (d / "outside.json").write_text(json.dumps({"weight_map": {"w": "s.safetensors"}}))
        m = folder(d)
        ext = {"safetensors": "safetensors", "pt": "pt", "index": "json"}[target_kind]
        (m / name).symlink_to(Path("..") / f"outside.{ext}")
        return ["inspect", "m"], (name, "outside the model folder")
    return build


def link_odd(kind):
    def build(d):
        m = folder(d)
        if kind == "dangling":
            (m / "model.safetensors").symlink_to("gone.safetensors")
            return ["inspect", "m"], ("model.safetensors", "missing")
        if kind == "loop":
            (m / "model.safetensors").symlink_to("model.safetensors")
            return ["inspect", "m"], ("model.safetensors", "cannot be resolved")
        (m / "model.safetensors").mkdir()  # a folder named like the weights (it used to be recursed into)
        good(m / "model.safetensors" / "model.safetensors")
        return ["inspect", "m"], ("model.safetensors", "folder")
    return build


def header(text, *names):
    def build(d):
        st_file(d / "h.safetensors", text)
        return ["inspect", "h.safetensors"], ("h.safetensors", *names)
    return build


def index_json(text, *names, pickle_index=False):
    def build(d):
        m = folder(d)
        good(m / "s.safetensors")
        index = "pytorch_model.bin.index.json" if pickle_index else "model.safetensors.index.json"
        (m / index).write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["inspect", "m"], (index, *names)
    return build


def shape(dims, span, *names, command="inspect"):
    def build(d):
        st_file(d / "s.safetensors", {"w": {"dtype": "F32", "shape": dims, "data_offsets": [0, span]}}, b"\0" * span)
        if command == "merge":
            good(d / "a.safetensors")
            return ["merge", linear_recipe(d, "a.safetensors", "s.safetensors"), "out.safetensors"], ("s.safetensors",
                                                                                                       *names)
        return ["inspect", "s.safetensors"], ("s.safetensors", *names)
    return build


def pt_truncated(legacy, fraction):
    def build(d):
        data = pt_bytes(legacy)
        (d / "t.pt").write_bytes(data[: int(len(data) * fraction)] if fraction < 1 else data[:fraction])
        return ["inspect", "t.pt"], ("t.pt",)
    return build


def pt_protocol(obj, protocol, in_folder=False):
    def build(d):
        path = (folder(d) / "pytorch_model.bin") if in_folder else d / "p.pt"
        path.write_bytes(pickle.dumps(obj() if callable(obj) else obj, protocol=protocol))
        return ["inspect", "m" if in_folder else "p.pt"], (path.name, "refused")
    return build


def base_config(content):
    def build(d):
        base = folder(d, "base")
        good(base / "model.safetensors")
        good(d / "a.safetensors", 1)
        if content == "fifo":
            os.mkfifo(base / "config.json")
        elif content == "link_out":
            (d / "secret.json").write_text("{}")
            (base / "config.json").symlink_to("../secret.json")
        else:
            (base / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["merge", linear_recipe(d, "base", "a.safetensors"), "out"], ("config.json",)
    return build


CASES = {
    # 1. FIFOs never block: a checkpoint, every file a folder layout names, a recipe's model
    "fifo.safetensors": fifo_file(".safetensors"),
    "fifo.pt": fifo_file(".pt"),
    "fifo folder model.safetensors": fifo_in_folder("single"),
    "fifo folder index": fifo_in_folder("index"),
    "fifo folder shard": fifo_in_folder("shard"),
    "fifo folder pytorch_model.bin": fifo_in_folder("bin"),
    "fifo folder bin index": fifo_in_folder("bin_index"),
    "fifo folder bin shard": fifo_in_folder("bin_shard"),
    "fifo model in a merge recipe": fifo_model_in_recipe,
    # 2. one symlink rule for every file a folder layout names
    "symlink out: model.safetensors": link_out("model.safetensors", "safetensors"),
    "symlink out: pytorch_model.bin": link_out("pytorch_model.bin", "pt"),
    "symlink out: index": link_out("model.safetensors.index.json", "index"),
    "symlink dangling": link_odd("dangling"),
    "symlink loop": link_odd("loop"),
    "model.safetensors is a folder": link_odd("folder"),
    # 3. JSON bombs in headers and indexes
    "header nested 100k deep": header(deep_json(), "nested too deeply"),
    "header entry nested 100k deep": header('{"w": {"dtype": "F32", "shape": ' + deep_json() + ', "data_offsets": [0, 0]}}',
                                            "nested too deeply"),
    "header 5000-digit shape": header('{"w": {"dtype": "F32", "shape": [' + HUGE_INT + '], "data_offsets": [0, 4]}}',
                                      "not valid JSON", "4300"),
    "header 5000-digit offset": header('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + HUGE_INT + ']}}',
                                       "not valid JSON", "4300"),
    "index nested 100k deep": index_json(deep_json(), "nested too deeply"),
    "index 5000-digit total_size": index_json('{"metadata": {"total_size": ' + HUGE_INT + '}, "weight_map": {"w": "s.safetensors"}}',
                                              "not valid JSON", "4300"),
    "index not UTF-8": index_json(b'{"weight_map": {"w": "\xff"}}', "not UTF-8"),
    "bin index nested 100k deep": index_json(deep_json(), "nested too deeply", pickle_index=True),
    "header dtype a list": header('{"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 0]}}', "unknown dtype"),
    "index shard name with a NUL byte": index_json('{"weight_map": {"w": "a\\u0000b"}}', "embedded null byte"),
    "index shard name too long": index_json(json.dumps({"weight_map": {"w": "a" * 5000}}), "too long"),
    # 4. shapes whose sizes do not fit in int64
    "shape [0, 10**30]": shape([0, 10**30], 0, "too large"),
    "shape [0, 2**40, 2**40]": shape([0, 2**40, 2**40], 0, "too large"),
    "shape [2**32, 2**32]": shape([2**32, 2**32], 4, "too large"),
    "shape 65 dims": shape([1] * 65, 4, "65 dimensions"),
    "shape [0, 10**30] in a merge": shape([0, 10**30], 0, "too large", command="merge"),
    # 5. truncated and protocol 4/5 pickles: one line, no torch warning, no code run
    "pt zip cut at 10 bytes": pt_truncated(False, 10),
    "pt zip cut in half": pt_truncated(False, 0.5),
    "pt zip cut before the end": pt_truncated(False, 0.98),
    "pt legacy cut at 18 bytes": pt_truncated(True, 18),
    "pt legacy cut in half": pt_truncated(True, 0.5),
    "pt legacy cut before the end": pt_truncated(True, 0.98),
    "pickle protocol 5 payload": pt_protocol(Payload, 5),
    "pickle protocol 4 payload in a folder": pt_protocol(Payload, 4, in_folder=True),
    "pickle protocol 5 plain dict": pt_protocol({"w": [1.0, 2.0]}, 5),
    "pickle protocol 4 plain list": pt_protocol([1, 2, 3], 4),
    # 7. the base model's config.json (rewritten into a folder output)
    "config.json garbage": base_config("{not json"),
    "config.json not UTF-8": base_config(b'{"a": "\xff\xfe"}'),
    "config.json nested 100k deep": base_config('{"a": ' + deep_json() + "}"),
    "config.json 5000-digit integer": base_config('{"num_hidden_layers": ' + HUGE_INT + "}"),
    "config.json a list": base_config("[1, 2]"),
    "config.json a FIFO": base_config("fifo"),
    "config.json symlink out": base_config("link_out"),
}

# One of each class (the slowest path: a real process, RSS measured); the rest run in-process.
SUBPROCESS = {"fifo.pt", "fifo folder shard", "symlink out: model.safetensors", "header nested 100k deep",
              "pickle protocol 5 payload", "config.json a FIFO"}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_checkpoint_is_refused_in_one_line(case, tmp_path, capsys):
    args, names = CASES[case](tmp_path)
    if case in SUBPROCESS:
        out = attack(args, tmp_path, timeout=30)
    else:
        out = run_inprocess(args, tmp_path, capsys)
    assert_refused(out, *names)
    assert not (tmp_path / CANARY).exists()
    for name in ("out", "out.safetensors", ".out.partial", ".out.lock", ".out.safetensors.partial",
                 ".out.safetensors.lock"):
        assert not (tmp_path / name).exists()


# ---- accepted layouts (the rules refuse only what they must) --------------------------------------

def test_symlinks_inside_the_folder_and_empty_tensors_are_accepted(tmp_path):
    m = folder(tmp_path)
    (m / "real").mkdir()
    good(m / "real" / "weights.safetensors")
    (m / "model.safetensors").symlink_to("real/weights.safetensors")
    assert set(ms.load(m)) == {"w", "v"}
    st_file(tmp_path / "e.safetensors", {"w": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}})
    assert ms.load(tmp_path / "e.safetensors")["w"].shape == (0, 2**40)


def test_every_cut_of_a_torch_file_is_a_one_line_error(tmp_path):
    """torch's readers raise struct.error, IndexError, KeyError... on cut files: all are one line."""
    for legacy in (False, True):
        data = pt_bytes(legacy)
        for cut in sorted({*range(0, len(data), max(1, len(data) // 40)), 18, len(data) - 1}):
            path = tmp_path / f"cut{int(legacy)}_{cut}.pt"
            path.write_bytes(data[:cut])
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a torch warning would fail here
                with pytest.raises(MergescopeError) as err:
                    ms.load(path)
            assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---- 6. inputs truncated after their headers were read ---------------------------------------------

def _truncate_after_open(tmp_path):
    path = tmp_path / "a.safetensors"
    good(path)
    ckpt = ms.load(path)
    return path, ckpt, ckpt._files[0].data_start


def test_truncated_after_open_read_and_get_fail_in_one_line(tmp_path):
    path, ckpt, data_start = _truncate_after_open(tmp_path)
    os.truncate(path, data_start + 8)
    for access in (ckpt.read, ckpt.__getitem__):
        with pytest.raises(MergescopeError, match=r"a\.safetensors: tensor '(w|v)'.*(truncated|shorter)"):
            access("w")


def test_truncated_after_map_get_fails_instead_of_sigbus(tmp_path):
    path, ckpt, data_start = _truncate_after_open(tmp_path)
    kept = ckpt["v"]  # the file is now mapped
    os.truncate(path, data_start)
    with pytest.raises(MergescopeError, match=r"a\.safetensors: tensor 'w'.*truncated"):
        ckpt["w"]
    del kept


def test_truncated_before_a_merge_job_maps_it(tmp_path):
    path, ckpt, data_start = _truncate_after_open(tmp_path)
    locator = Locator(ckpt)
    os.truncate(path, data_start)
    maps = JobMaps()
    with pytest.raises(MergescopeError, match=r"a\.safetensors: tensor 'w': the file is now .*truncated"):
        maps.tensor(locator, "w")
    maps.close()


def test_truncated_torch_zip_after_load_fails_in_one_line(tmp_path):
    path = tmp_path / "a.pt"
    path.write_bytes(pt_bytes())
    ckpt = ms.load(path)
    os.truncate(path, 100)
    with pytest.raises(MergescopeError, match=r"a\.pt: tensor 'w': the file shrank"):
        ckpt.read("w")


HOOK = """
import os
victim = os.environ.get("MS_TEST_TRUNCATE")
if victim:
    import mergescope.merge.reader as reader
    tensor = reader.JobMaps.tensor
    done = []

    def patched(self, locator, name):  # headers read, plan made, jobs running: now the input shrinks
        if not done:
            done.append(name)
            os.truncate(victim, int(os.environ["MS_TEST_TRUNCATE_TO"]))
        return tensor(self, locator, name)

    reader.JobMaps.tensor = patched
"""


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_input_truncated_while_the_cli_merge_runs(kind, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(HOOK))
    work = tmp_path / "work"
    work.mkdir()
    # Tensors of several pages: a page wholly past the new end of the file is what raised SIGBUS
    # (the old reader mapped it anyway); bytes past the end within the last page read as zeros.
    if kind == "safetensors":
        good(work / "a.safetensors", 1, n=64)
        good(work / "b.safetensors", 2, n=64)
        keep = ms.load(work / "b.safetensors")._files[0].data_start
    else:
        write_file(work / "a.safetensors", {"w": torch.ones(8192)})  # same tensor names in both inputs
        (work / "b.pt").write_bytes(pt_bytes(n=8192))
        keep = 100
    victim = f"b.{kind}"
    recipe = linear_recipe(work, "a.safetensors", victim)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "MS_TEST_TRUNCATE": str(work / victim), "MS_TEST_TRUNCATE_TO": str(keep)}
    out = attack(["merge", recipe, "out.safetensors", "--threads", "1"], work, timeout=30, env=env)
    assert (work / victim).stat().st_size == keep, "the hook did not run"
    assert_refused(out, victim, "tensor", "truncated", allowed_new=(victim,))
    assert not (work / "out.safetensors").exists()
