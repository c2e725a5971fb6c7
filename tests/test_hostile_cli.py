"""Hostile inputs through the CLI (issue 14): files that try to choose code, outputs aimed at inputs,
model folders that link out, numbers that would allocate forever, terminal escapes.

Every case runs the real CLI in a subprocess (``hostile.attack``) and checks all promises of
docs/reliability.md at once (``hostile.assert_refused``): exit 2, one line naming the file and the
problem, no traceback, no input changed, nothing written, no payload run, bounded time and memory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergescope as ms
from hostile import CANARY, assert_refused, attack
from mergescope.tasks.checkpoints import model_metadata

MLP = {"width": 8, "depth": 1}
PAYLOAD = json.dumps({"name": "os:system", "options": {"command": f"touch {CANARY}"}})


def zoo_checkpoint(path: Path, seed: int = 0, **meta) -> Path:
    """A small zoo MLP saved the way `mergescope train` saves it, metadata overridable."""
    state = ms.tasks.build("mlp", seed=seed, **MLP).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={**model_metadata("mlp", MLP), **meta})
    return path


@pytest.fixture
def evil(tmp_path):
    """Two checkpoints whose metadata names ``os:system`` with a command of the file's choosing."""
    return [zoo_checkpoint(tmp_path / f"{n}.safetensors", seed=i, model=PAYLOAD) for i, n in enumerate("ab")]


# ------------------------------------------------------------------ 1. a file never chooses code

COMMANDS = {
    "landscape line": lambda a, b: ["landscape", "line", a, b, "--n", "3", "-o", "lout"],
    "landscape matrix": lambda a, b: ["landscape", "matrix", a, b, "--n", "3", "-o", "mout"],
    "ensemble": lambda a, b: ["ensemble", a, b],
    "soup": lambda a, b: ["soup", a, b, "-o", "soup.safetensors"],
    "align": lambda a, b: ["align", a, b, "-o", "aligned.safetensors"],
    "train --from": lambda a, b: ["train", "--from", a, "--epochs", "1", "-o", "t.safetensors"],
    "analyse weights": lambda a, b: ["analyse", "weights", a, b, "-o", "wout"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_metadata_naming_code_is_refused(tmp_path, evil, command):
    out = attack(COMMANDS[command](evil[0].name, evil[1].name), tmp_path)
    assert_refused(out, "a.safetensors", "os:system", "not a zoo model", "--model")


def test_metadata_naming_code_is_refused_in_a_sweep_worker(tmp_path, evil):
    (tmp_path / "s.yml").write_text("kind: evaluate\ncheckpoints: [a.safetensors, b.safetensors]\n")
    out = attack(["sweep", "s.yml", "-o", "rows.jsonl", "--workers", "1"], tmp_path, timeout=120)
    assert not (tmp_path / CANARY).exists()
    assert out.code == 2 and "os:system" in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("task", ["os:system", "digits[0,1]; rm -rf", "subprocess:run"])
def test_metadata_naming_a_task_is_refused(tmp_path, task):
    zoo_checkpoint(tmp_path / "a.safetensors", task=task)
    zoo_checkpoint(tmp_path / "b.safetensors", seed=1)
    out = attack(["ensemble", "a.safetensors", "b.safetensors"], tmp_path)
    assert_refused(out, "a.safetensors", "not a built-in task", "--task")


@pytest.mark.parametrize("record, problem", [
    ({"name": "mlp", "options": {"width": 10**9, "depth": 1}}, "16384"),  # ~250 GB
    ({"name": "cnn", "options": {"width": 16384}}, "parameters"),  # within the width bound, ~58 GB
    ({"name": "transformer", "options": {"dim": 4096, "depth": 64}}, "parameters"),
])
def test_zoo_options_from_metadata_are_bounded(tmp_path, record, problem):
    """A zoo name with huge options would allocate until it fails: refused before building."""
    zoo_checkpoint(tmp_path / "a.safetensors", model=json.dumps(record))
    zoo_checkpoint(tmp_path / "b.safetensors", seed=1)
    out = attack(["ensemble", "a.safetensors", "b.safetensors"], tmp_path)
    assert_refused(out, "a.safetensors", problem, max_rss_mb=1200)


def test_user_given_model_overrides_hostile_metadata(tmp_path, evil):
    """The user's own --model is trusted (by design); the file's record is then ignored."""
    out = attack(["align", "a.safetensors", "b.safetensors", "-o", "c.safetensors", "--model", "mlp", "--width", "8",
                  "--depth", "1"], tmp_path, timeout=120)
    assert out.code == 0, out.stderr
    assert not (tmp_path / CANARY).exists()


def test_user_factory_runs_only_when_given_on_the_command_line(tmp_path):
    """A user's package.module:factory is allowed from --model, never from the file."""
    (tmp_path / "userzoo.py").write_text(
        "import mergescope as ms\n"
        "def tiny(**kw):\n"
        "    open('FACTORY_RAN', 'w').close()\n"
        f"    return ms.tasks.build('mlp', **{MLP!r})\n")
    record = json.dumps({"name": "userzoo:tiny", "options": {}})
    for i, n in enumerate("ab"):
        zoo_checkpoint(tmp_path / f"{n}.safetensors", seed=i, model=record)
    env = {"PYTHONPATH": str(tmp_path)}
    refused = attack(["ensemble", "a.safetensors", "b.safetensors"], tmp_path, env=env)
    assert_refused(refused, "userzoo:tiny", "not a zoo model")
    assert not (tmp_path / "FACTORY_RAN").exists()
    allowed = attack(["ensemble", "a.safetensors", "b.safetensors", "--model", "userzoo:tiny"], tmp_path,
                     env=env, timeout=120)
    assert allowed.code == 0, allowed.stderr
    assert (tmp_path / "FACTORY_RAN").exists()


def test_merge_does_not_spread_the_payload(tmp_path, evil):
    (tmp_path / "r.yml").write_text("merge_method: linear\nmodels:\n"
                                    "  - model: a.safetensors\n    parameters: {weight: 1}\n"
                                    "  - model: b.safetensors\n    parameters: {weight: 1}\n")
    out = attack(["-q", "merge", "r.yml", "m.safetensors"], tmp_path)
    assert out.code == 0, out.stderr
    meta = ms.load(tmp_path / "m.safetensors").metadata
    assert "model" not in meta and "os:system" not in json.dumps(meta)
    # a clean zoo record does travel, so merged zoo models stay usable without --model
    zoo_checkpoint(tmp_path / "a.safetensors")
    out = attack(["-q", "merge", "r.yml", "m2.safetensors"], tmp_path)
    assert out.code == 0 and json.loads(ms.load(tmp_path / "m2.safetensors").metadata["model"])["name"] == "mlp"


# ------------------------------------------------------------------ 2. outputs never land on inputs

@pytest.fixture
def pair(tmp_path):
    return [zoo_checkpoint(tmp_path / f"{n}.safetensors", seed=i) for i, n in enumerate("ab")]


def _hf_folder(path: Path, seed: int = 2) -> Path:
    path.mkdir()
    zoo_checkpoint(path / "model.safetensors", seed=seed)
    (path / "config.json").write_text("{}")
    return path


SIDE_OUTPUTS = {
    "ensemble --json onto a checkpoint": (["ensemble", "a.safetensors", "b.safetensors", "--json", "b.safetensors"],
                                          "would overwrite input"),
    "soup --json onto a checkpoint": (["soup", "a.safetensors", "b.safetensors", "--json", "a.safetensors"],
                                      "would overwrite input"),
    "soup --json and -o on one path": (["soup", "a.safetensors", "b.safetensors", "--json", "s.safetensors",
                                        "-o", "s.safetensors"], "two outputs"),
    "align --spec-out onto a checkpoint": (["align", "a.safetensors", "b.safetensors", "-o", "c.safetensors",
                                            "--spec-out", "a.safetensors"], "would overwrite input"),
    "landscape -o the input folder": (["landscape", "line", "a.safetensors", "hf", "-o", "hf"],
                                      "lies inside input"),
    "landscape -o inside the input folder": (["landscape", "line", "a.safetensors", "hf", "-o", "hf/sub"],
                                             "lies inside input"),
    "landscape -o an existing file": (["landscape", "line", "a.safetensors", "b.safetensors", "-o", "notes.txt"],
                                      "not a folder"),
    "analyse -o the input folder": (["analyse", "weights", "a.safetensors", "hf", "-o", "hf"], "lies inside input"),
    "sweep -o onto a checkpoint --force": (["sweep", "s.yml", "-o", "a.safetensors", "--force"],
                                           "would overwrite input"),
    "sweep --summary onto the sweep file": (["sweep", "s.yml", "-o", "rows.jsonl", "--summary", "s.yml"],
                                            "would overwrite input"),
    "sweep --plot through a symlink to a checkpoint": (["sweep", "s.yml", "-o", "rows.jsonl", "--plot", "link.png"],
                                                       "would overwrite input"),
    "train -o with an over-long name": (["train", "-o", "x" * 300 + ".safetensors", "--epochs", "1"],
                                        "output name is"),
    "merge into an over-long name": (["merge", "r.yml", "y" * 300], "output name is"),
}


@pytest.mark.parametrize("case", list(SIDE_OUTPUTS))
def test_side_outputs_never_overwrite_inputs(tmp_path, pair, case):
    _hf_folder(tmp_path / "hf")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "s.yml").write_text("kind: evaluate\ncheckpoints: [a.safetensors, b.safetensors]\n")
    (tmp_path / "r.yml").write_text("merge_method: linear\nmodels:\n  - model: a.safetensors\n"
                                    "    parameters: {weight: 1}\n  - model: b.safetensors\n"
                                    "    parameters: {weight: 1}\n")
    os.symlink("b.safetensors", tmp_path / "link.png")
    args, problem = SIDE_OUTPUTS[case]
    out = attack(args, tmp_path)
    assert_refused(out, problem)


# ------------------------------------------------------------------ 3. copying the base folder's files

def _merge_with_base(tmp_path: Path) -> Path:
    base = _hf_folder(tmp_path / "base")
    (tmp_path / "r.yml").write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                                    "  - model: a.safetensors\n    parameters: {weight: 1}\n")
    zoo_checkpoint(tmp_path / "a.safetensors")
    return base


@pytest.mark.parametrize("link", ["secret", "/dev/zero", "folder", "fifo"])
def test_base_folder_files_never_leave_the_folder(tmp_path, link):
    base = _merge_with_base(tmp_path)
    (tmp_path / "secret.txt").write_text("ssh key")
    (base / "tok").mkdir()
    if link == "secret":
        os.symlink("../../secret.txt", base / "tok" / "vocab.txt")
    elif link == "/dev/zero":
        os.symlink("/dev/zero", base / "tokenizer.json")
    elif link == "folder":
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "id_rsa").write_text("key")
        os.symlink("../../elsewhere", base / "tok" / "more")
    else:
        os.mkfifo(base / "tok" / "merges.txt")
    out = attack(["-q", "merge", "r.yml", "merged"], tmp_path, timeout=60)
    assert_refused(out, str(Path("base") / "tok") if link != "/dev/zero" else "tokenizer.json",
                   allowed_new=())
    assert not (tmp_path / "merged").exists()


def test_top_level_weights_link_out_of_the_folder_is_refused_like_a_shard(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    zoo_checkpoint(tmp_path / "outside.safetensors")
    os.symlink("../outside.safetensors", folder / "model.safetensors")
    out = attack(["inspect", "model"], tmp_path)
    assert_refused(out, "model", "outside the model folder")


def test_hugging_face_cache_snapshot_links_are_followed(tmp_path):
    """The HF cache stores files as links from snapshots/REV/ into the repo's blobs/: accepted."""
    repo = tmp_path / "models--me--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    (snap / "sub").mkdir(parents=True)
    zoo_checkpoint(repo / "blobs" / "w")
    (repo / "blobs" / "c").write_text('{"hidden_size": 8}')
    (repo / "blobs" / "t").write_text("vocab")
    os.symlink("../../blobs/w", snap / "model.safetensors")
    os.symlink("../../blobs/c", snap / "config.json")
    os.symlink("../../../blobs/t", snap / "sub" / "vocab.txt")
    (tmp_path / "r.yml").write_text(f"merge_method: task_arithmetic\nbase_model: {snap}\nmodels:\n"
                                    f"  - model: {snap}\n    parameters: {{weight: 1}}\n")
    out = attack(["-q", "merge", "r.yml", "merged"], tmp_path)
    assert out.code == 0, out.stderr
    assert (tmp_path / "merged" / "sub" / "vocab.txt").read_text() == "vocab"
    assert not (tmp_path / "merged" / "sub" / "vocab.txt").is_symlink()
    ref = load_file(str(repo / "blobs" / "w"))
    merged = ms.load(tmp_path / "merged")
    assert all(torch.equal(merged[k], ref[k]) for k in ref)


# ------------------------------------------------------------------ 4/5. numbers that would never finish

NUMBERS = {
    "train --width -4": (["train", "-o", "t.safetensors", "--width", "-4"], "--width"),
    "train --width 0": (["train", "-o", "t.safetensors", "--width", "0"], "--width"),
    "train --width 10**9": (["train", "-o", "t.safetensors", "--width", str(10**9)], "--width"),
    "train --lr nan": (["train", "-o", "t.safetensors", "--lr", "nan"], "--lr"),
    "train --lr inf": (["train", "-o", "t.safetensors", "--lr", "inf"], "--lr"),
    "train --epochs -1": (["train", "-o", "t.safetensors", "--epochs", "-1"], "--epochs"),
    "train --seed 10**30": (["train", "-o", "t.safetensors", "--seed", str(10**30)], "--seed"),
    "landscape line --n 10**9": (["landscape", "line", "a.safetensors", "b.safetensors", "--n", str(10**9)], "--n"),
    "landscape plane --grid 10**6": (["landscape", "plane", "a.safetensors", "--grid", str(10**6)], "--grid"),
    "landscape curve --epochs 10**9": (["landscape", "curve", "a.safetensors", "b.safetensors", "--epochs",
                                        str(10**9)], "--epochs"),
    "align --alpha nan": (["align", "a.safetensors", "b.safetensors", "-o", "c.safetensors", "--alpha", "nan"],
                          "--alpha"),
}


@pytest.mark.parametrize("case", list(NUMBERS))
def test_numbers_out_of_range_are_one_line(tmp_path, pair, case):
    args, option = NUMBERS[case]
    assert_refused(attack(args, tmp_path), option)


# ------------------------------------------------------------------ 7. terminal escapes

def test_inspect_escapes_control_characters(tmp_path):
    name = "w\x1b]0;owned\x07\x1b[2J[bold]x\u202e"
    save_file({name: torch.ones(2)}, str(tmp_path / "e.safetensors"),
              metadata={"k\x1b]8;;http://evil\x07": "v\x1b[31m\u2066"})
    out = attack(["inspect", "e.safetensors"], tmp_path)
    assert out.code == 0, out.stderr
    for raw in ("\x1b", "\x07", "\u202e", "\u2066"):
        assert raw not in out.stdout
    assert "\\x1b]0;owned\\x07" in out.stdout and "[bold]x" in out.stdout


def test_error_lines_escape_control_characters(tmp_path):
    out = attack(["inspect", "bad\x1b[2J\nname.safetensors"], tmp_path)
    assert_refused(out, "\\x1b[2J\\nname.safetensors")


def test_strict_json_writes_non_finite_numbers_as_null(tmp_path):
    """Summaries of sweeps with a diverged run stay standard JSON (a bare NaN token is not JSON)."""
    from mergescope.results import write_json

    write_json(tmp_path / "s.json", {"loss": [float("nan"), 1.5], "worst": float("-inf")}, strict=True)
    text = (tmp_path / "s.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard token {c}")) == \
        {"loss": [None, 1.5], "worst": None}


def test_results_folder_may_be_the_current_folder(tmp_path, pair):
    """`-o .` writes the JSON and PNG here (only the checkpoints themselves are protected)."""
    out = attack(["landscape", "line", "a.safetensors", "b.safetensors", "--n", "3", "-o", "."], tmp_path, timeout=120)
    assert out.code == 0, out.stderr
    assert (tmp_path / "line.json").is_file() and (tmp_path / "line.png").is_file()
    refused = attack(["landscape", "line", "a.safetensors", "b.safetensors", "--n", "3", "-o", "y" * 300],
                     tmp_path)
    assert_refused(refused, "folder name is")
