"""The README's examples are real: every `$ mergescope ...` line and every python block runs."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert blocks("console") and blocks("python")


def files() -> list[tuple[str, str]]:
    """Blocks fenced as ```yaml file=NAME are files the examples below them use."""
    return re.findall(r"```\w+ file=(\S+)\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_cli_and_python_examples_run(tmp_path, monkeypatch, capsys):
    """Each `$ mergescope ...` line through the CLI's entry point in this process (a subprocess per line paid
    torch's import twelve times; `python -m mergescope` itself is tested elsewhere), the python blocks as
    scripts of their own."""
    from mergescope.cli import main

    for name, text in files():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    for block in blocks("console"):
        for line in block.splitlines():
            if not line.startswith("$ "):
                continue
            args = shlex.split(line[2:])
            assert args[0] == "mergescope", line
            code = main(args[1:])
            out, err = capsys.readouterr()
            assert code == 0, f"{line}\n{out}\n{err}"
    for block in blocks("python"):
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{block}\n{result.stdout}\n{result.stderr}"
