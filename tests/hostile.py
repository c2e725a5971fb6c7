"""Running the CLI on a hostile input and checking every promise of docs/reliability.md at once.

``attack(args, cwd)`` runs ``mergescope`` in a subprocess under a wall-clock limit and reports
the exit code, stderr, the child's peak resident memory and whether any file under ``cwd``
changed. ``assert_refused`` checks: exit 2, one line naming ``names``, no traceback, no input
changed, nothing written outside ``allowed_new``, no canary created (no code run), bounded time
and memory.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# Runs the CLI and prints the peak RSS (KiB) of this very process on the last stderr line. VmHWM is
# the high-water mark of this process's own address space; getrusage's ru_maxrss is not: Linux
# carries it across fork and exec, so it would report the (large) pytest parent's size.
_RUNNER = (
    "import sys\n"
    "from mergescope.cli import main\n"
    "def hwm():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return line.split()[1]\n"
    "    return '0'\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "finally:\n"
    "    sys.stderr.write('\\n@@maxrss ' + hwm() + '\\n')\n"
    "sys.exit(code)\n"
)

CANARY = "PWNED"


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str  # without the runner's maxrss line
    maxrss_mb: float
    changed: list[str]  # files under cwd added, removed or modified
    seconds: float


def snapshot(root: Path) -> dict[str, str]:
    """sha256 (or a marker for non-regular files) of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "special"
    return out


def attack(args: list[str], cwd: Path, timeout: float = 60, env: dict | None = None) -> Outcome:
    import time

    before = snapshot(cwd)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "COLUMNS": "400", **(env or {})})
    seconds = time.monotonic() - start
    after = snapshot(cwd)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    stderr, _, rss = proc.stderr.rpartition("\n@@maxrss ")
    return Outcome(proc.returncode, proc.stdout, stderr.strip(), int(rss.strip() or 0) / 1024, changed, seconds)


def assert_refused(out: Outcome, *names: str, allowed_new: tuple[str, ...] = (), max_rss_mb: float = 1500,
                   max_seconds: float = 45) -> None:
    """Exit 2, one line naming every string of ``names``, no traceback, no input touched."""
    assert out.code == 2, f"exit {out.code}, stderr: {out.stderr[-2000:]}"
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got: {out.stderr[-2000:]}"
    assert "Traceback" not in out.stderr and "Warning" not in out.stderr
    for name in names:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    unexpected = [c for c in out.changed if not c.startswith(allowed_new)]
    assert not unexpected, f"files changed: {unexpected}"
    assert not any(CANARY in c for c in out.changed), "the payload ran"
    assert out.maxrss_mb < max_rss_mb, f"peak RSS {out.maxrss_mb:.0f} MB"
    assert out.seconds < max_seconds, f"took {out.seconds:.1f} s"


class Hung(BaseException):
    """Raised by the in-process guard; a BaseException so no handler can turn it into a refusal."""


def run_inprocess(args: list[str], cwd: Path, capsys, timeout: int = 20) -> Outcome:
    """``mergescope ARGS`` in this process (cwd = ``cwd``), as an ``Outcome`` whose stderr includes any
    Python warning raised; SIGALRM ends a hang. Faster than ``attack`` (no interpreter start-up), for
    cases that need no memory measurement or process isolation."""
    import signal
    import time
    import warnings

    from mergescope.cli import main

    before = snapshot(cwd)
    old_cwd = os.getcwd()

    def on_alarm(*_):
        raise Hung(f"mergescope {' '.join(args)} blocked for {timeout} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    os.chdir(cwd)
    capsys.readouterr()
    signal.alarm(timeout)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main(args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
    seconds = time.monotonic() - start
    captured = capsys.readouterr()
    stderr = captured.err + "".join(f"\n{w.category.__name__}: {w.message}" for w in caught)
    after = snapshot(cwd)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return Outcome(code, captured.out, stderr.strip(), 0.0, changed, seconds)
