"""Weight aggregation: merge methods (pure tensor functions), MergeKit-compatible recipes, streaming engine.

``methods`` holds the per-tensor functions and their registry; ``engine.merge`` runs a recipe.
Data-aware methods (Fisher, RegMean) live in ``data_aware``.

Why this package is callable: the public API has a function ``ms.merge("recipe.yml", "out")`` and a
package ``ms.merge.methods``. Python binds a subpackage to its parent's attribute on import
(``import mergescope.merge.methods`` sets ``mergescope.merge`` to this package), so no function named
``merge`` can live next to it in ``mergescope``. The alternatives are worse: renaming the package
breaks ``mergescope.merge.methods`` imports, and a function carrying ``methods`` attributes is
replaced by the package on the first submodule import. So the package itself is the function:
its class is set to a ``ModuleType`` subclass with ``__call__`` (the mechanism the Python data model
documents for customising a module, "Customizing module attribute access"), and
``mergescope.__getattr__`` always returns this package for ``ms.merge``.
"""

import sys
import types
from importlib import import_module

__all__ = ["engine", "methods", "merge", "get"]


def __getattr__(name):
    if name in ("engine", "methods", "plan", "writer", "reader", "data_aware", "adamerging", "svd_methods", "tokenizer",
                "multistage", "architectures"):
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
