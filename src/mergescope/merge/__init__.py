"""Weight aggregation: merge methods (pure tensor functions), MergeKit-compatible recipes, streaming engine.

``methods`` holds the per-tensor functions and their registry; ``engine.merge`` runs a recipe.
Data-aware methods (Fisher, RegMean) live in ``data_aware``.
"""

from importlib import import_module

__all__ = ["engine", "methods", "merge", "get"]


def __getattr__(name):
    if name in ("engine", "methods"):
        return import_module(f"{__name__}.{name}")
    if name == "merge":
        return import_module(f"{__name__}.engine").merge
    if name == "get":
        return import_module(f"{__name__}.methods").get
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
