"""Whether numba probes for BLAS (by importing scipy.linalg) when its CPU target first loads in this process.

Why: the first kernel a process compiles or loads makes numba import ``numba.np.arraymath``, which probes for
BLAS by importing scipy.linalg: 0.18-0.20 s of every merge's start-up (a first jitted call took 0.30 s with the
probe against 0.11 s without, 3 runs each). No mergescope kernel calls BLAS, and the probe's answer only decides
whether numba's own ``np.correlate``/``np.convolve`` take BLAS's dot (``np.dot`` and ``np.linalg`` check for BLAS
themselves when they compile). The ``mergescope`` executable turns the probe off (``cli.script``); a library
caller's process keeps it, since its own numba code may use those functions.
"""

from __future__ import annotations

import contextlib
import sys

PROBE = True  # False: merge/kernels.py imports numba.np.arraymath with the probe answering "no BLAS"


def apply() -> None:
    """Before numba's CPU target loads (merge/kernels.py calls this right after importing numba): nothing while
    PROBE is on or once numba.np.arraymath is imported; else import it with the probe answering "no BLAS"."""
    if PROBE or "numba.np.arraymath" in sys.modules:
        return
    from numba.np import linalg

    probe = linalg.ensure_blas
    linalg.ensure_blas = _no_blas
    try:
        with contextlib.suppress(Exception):  # another numba's arraymath: left to numba's own import and probe
            import numba.np.arraymath  # noqa: F401
    finally:
        linalg.ensure_blas = probe


def _no_blas() -> None:
    raise ImportError("BLAS probe skipped by the mergescope executable (merge/blas_probe.py)")
