"""Small checkpoint families for engine tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def base_and_two(root: Path, model: Callable[[Path, int], None], method: str, density: float | None = None) -> str:
    """Saves ``model(folder, seed)`` as base, a and b under ``root`` (seeds 0, 1, 2) and returns a recipe merging a
    (weight 0.7) and b (0.4) onto the base with ``method`` (and ``density`` for each, when given)."""
    for seed, name in enumerate(("base", "a", "b")):
        model(root / name, seed)
    extra = "" if density is None else f", density: {density}"
    return (f"merge_method: {method}\nbase_model: {root}/base\nmodels:\n"
            f"  - {{model: {root}/a, parameters: {{weight: 0.7{extra}}}}}\n"
            f"  - {{model: {root}/b, parameters: {{weight: 0.4{extra}}}}}\n")
