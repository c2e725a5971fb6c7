"""Saving results: JSON written atomically (temp file + rename), result objects through ``to_dict``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def finite_or_null(data):
    """``data`` with every NaN/infinity replaced by None, so it serialises as strict JSON (null)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_null(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_null(v) for v in data]
    if hasattr(data, "to_dict"):
        return finite_or_null(data.to_dict())
    return data


def write_json(path: str | os.PathLike, data, strict: bool = False) -> Path:
    """Write ``data`` as indented JSON; readers never see a half-written file.

    ``strict`` writes non-finite numbers as null (standard JSON); otherwise Python's NaN/Infinity
    tokens, which Python reads back exactly, are kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if strict:
        data = finite_or_null(data)
    tmp.write_text(json.dumps(data, indent=2, default=_default, allow_nan=not strict) + "\n")
    os.replace(tmp, path)
    return path
