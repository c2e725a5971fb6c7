"""The CLI as a user meets it: help everywhere, version, train -> inspect, one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
import typer
from safetensors.torch import load_file

import mergescope as ms
from mergescope.cli import app, main


def all_command_paths():
    root = typer.main.get_command(app)

    def walk(cmd, path):
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(root, []))


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "root")
def test_every_command_has_help(path, capsys):
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage" in out and len(out.splitlines()) > 3


def test_executable_is_script_and_script_freezes_what_the_command_made(monkeypatch):
    """The installed `mergescope` runs cli.script: main's exit code, and what the command created is put out of
    the interpreter's shutdown collections (gc.freeze): a merge's process ended ~0.5 s sooner."""
    import gc
    import tomllib
    from pathlib import Path

    from mergescope import cli

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["mergescope"] == "mergescope.cli:script"
    made = []
    monkeypatch.setattr(cli, "main", lambda argv=None: made.append([[] for _ in range(1000)]) or 3)
    before = gc.get_freeze_count()
    try:
        assert cli.script() == 3
        assert gc.get_freeze_count() >= before + 1000
    finally:
        gc.unfreeze()  # this process goes on: its objects collectable again


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mergescope {ms.__version__}"


def test_train_then_inspect_json(tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    assert main(["train", "--model", "mlp", "--width", "32", "--epochs", "2", "--seed", "5", "-o", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ref = load_file(out)
    assert info["tensors"] == len(ref)
    assert info["parameters"] == sum(t.numel() for t in ref.values()) == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert info["bytes"] == 4 * info["parameters"] and info["dtypes"] == {"F32": 6}
    assert json.loads(info["metadata"]["model"]) == {"name": "mlp", "options": {"width": 32, "depth": 2}}
    assert info["metadata"]["seed"] == "5"


def test_train_cnn_without_batchnorm_records_it(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    assert main(["train", "--model", "cnn", "--width", "4", "--no-batchnorm", "--epochs", "1", "-o", str(out)]) == 0
    ref = load_file(out)
    assert not any("running_mean" in k for k in ref) and "features.0.0.bias" in ref
    assert json.loads(ms.load(out).metadata["model"]) == {"name": "cnn", "options": {"width": 4, "batchnorm": False}}
    capsys.readouterr()
    assert main(["train", "--model", "mlp", "--no-batchnorm", "--epochs", "1", "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "unknown option(s) batchnorm" in capsys.readouterr().err


def test_train_is_reproducible_and_continues_from_a_checkpoint(tmp_path):
    args = ["train", "--model", "mlp", "--width", "16", "--epochs", "1", "--seed", "2"]
    assert main([*args, "-o", str(tmp_path / "a.safetensors")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.safetensors")]) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert main(["train", "--from", str(tmp_path / "a.safetensors"), "--epochs", "1", "--seed", "9",
                 "-o", str(tmp_path / "c.safetensors")]) == 0
    a, c = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "c.safetensors")
    assert a.keys() == c.keys() and not torch.equal(a["head.weight"], c["head.weight"])
    assert ms.load(tmp_path / "c.safetensors").metadata["model"] == ms.load(tmp_path / "a.safetensors").metadata["model"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mergescope.cli", *args], capture_output=True, text=True, timeout=120)


def test_corrupt_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"w\": 3}")
    result = run_cli("inspect", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in result.stderr


def test_existing_output_is_kept_without_force(tmp_path):
    out = tmp_path / "a.safetensors"
    out.write_bytes(b"precious")
    result = run_cli("train", "--epochs", "1", "--width", "8", "-o", str(out))
    assert result.returncode == 2 and "--force" in result.stderr
    assert out.read_bytes() == b"precious"


def test_usage_errors_exit_2(capsys):
    assert main(["train", "--no-such-option"]) == 2
    assert main(["train", "-o", "x.safetensors", "--model", "vgg"]) == 2
    assert "unknown model 'vgg'" in capsys.readouterr().err


def test_error_text_with_brackets_is_printed_verbatim(tmp_path):
    import struct

    bad = tmp_path / "r.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode()
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    result = run_cli("inspect", str(bad))
    assert result.returncode == 2
    assert "data_offsets must be [start, end]" in result.stderr and "got [8, 0]" in result.stderr


def test_exit_codes_raised_inside_commands_reach_the_shell():
    @app.command("exit-probe", hidden=True)
    def probe():
        raise typer.Exit(130)

    try:
        assert main(["exit-probe"]) == 130
    finally:
        app.registered_commands.pop()
