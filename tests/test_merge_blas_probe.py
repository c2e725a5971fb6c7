"""numba's BLAS probe (merge/blas_probe.py): the executable skips the scipy.linalg import the probe costs at a
merge's start-up; a library caller's process keeps the probe. Each check runs in a fresh interpreter, since the
probe runs once per process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import mergescope as ms
from mergescope.io import save

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                          cwd=ROOT)


def _imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_executable_merges_without_importing_scipy_linalg(tmp_path):
    for seed, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(seed)
        save({"w": torch.randn(64, 32, generator=g), "v": torch.randn(300, generator=g)}, tmp_path / name)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - {{model: {tmp_path}/a, parameters: {{weight: 0.3}}}}\n"
                      f"  - {{model: {tmp_path}/b, parameters: {{weight: 0.7}}}}\n")
    code = ("import sys; from mergescope.cli import script; "
            f"sys.argv = ['mergescope', '-q', 'merge', {str(recipe)!r}, {str(tmp_path / 'out')!r}, '--threads', '2']; "
            "code = script(); import numba.np.arraymath as am; "
            "print(code, am._HAVE_BLAS, 'scipy.linalg' in sys.modules)")
    done = _run(code, "-X", "importtime")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "False", "False"]
    assert "scipy.linalg" not in _imported(done.stderr)
    a, b, out = (ms.load(tmp_path / name) for name in ("a", "b", "out"))
    for name in a:  # the merge itself: 0.3 a + 0.7 b against a float64 reference
        expect = 0.3 * a[name].double() + 0.7 * b[name].double()
        assert (out[name].double() - expect).abs().max() < 1e-6


def test_library_process_keeps_the_probe():
    code = ("import sys, torch; from mergescope.merge import kernels; "
            "out = torch.empty(4); kernels.lerp(out, torch.ones(4), torch.ones(4), 0.5, 0.5); "
            "import numba.np.arraymath as am; print(am._HAVE_BLAS, 'scipy.linalg' in sys.modules)")
    done = _run(code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "True"]  # scipy is installed here: the probe finds BLAS
