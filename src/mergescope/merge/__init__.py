"""Weight aggregation: merge methods (pure tensor functions), MergeKit-compatible recipes, streaming engine.

``methods`` holds the per-tensor functions and their registry; ``engine.merge`` runs a recipe.
Data-aware methods (Fisher, RegMean) live in ``data_aware``.

Importing this package sets ``mergescope.merge`` to the package itself, which would shadow the
public function ``ms.merge``; the package is therefore callable and forwards to ``engine.merge``.
"""

import sys
import types
from importlib import import_module

__all__ = ["engine", "methods", "merge", "get"]


def __getattr__(name):
    if name in ("engine", "methods", "plan", "writer"):
        return import_module(f"{__name__}.{name}")
    if name == "merge":
        return import_module(f"{__name__}.engine").merge
    if name == "get":
        return import_module(f"{__name__}.methods").get
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """``ms.merge(recipe, out_dir, ...)``: see ``mergescope.merge.engine.merge``."""
        return import_module(f"{__name__}.engine").merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
