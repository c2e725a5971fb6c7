"""Results a kernel vouches are finite, so the merge engine skips its own pass over them.

Why: the engine refuses a merged tensor holding NaN/Inf (``engine.check_finite``), one more read of every output
byte; for bf16 slerp and model_stock that pass was 8-10 % of the merge (torch's bf16 ``aminmax``). The kernels
that write a method's whole result (merge/kernels.py: the slerp mix, model_stock's mix) test what they store
(float32/float64: in the storing loop; bf16: in a loop of their own right after it, over the same window) and
vouch for the result when nothing stored is Inf or NaN.

A vouch names the result's memory, size, dtype and torch version counter, on the calling thread. It is
dropped before each job (``forget``) and by any later kernel call on the thread (every kernel takes its arrays
through ``kernels._arrays``/``_bits16``, which forget), and a torch write into the result bumps its version
counter: whatever else reaches the engine is checked as before.
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()


def _key(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.numel(), t.dtype, t._version


def forget() -> None:
    """Drop this thread's vouch."""
    _local.key = None


def vouch(t: torch.Tensor) -> None:
    """Record that every entry of ``t`` (contiguous, just written by the caller) is finite."""
    _local.key = _key(t)


def vouched(t: torch.Tensor) -> bool:
    """Whether ``t`` is the very result the last kernel on this thread vouched for, unchanged since."""
    return t.is_contiguous() and getattr(_local, "key", None) == _key(t)
