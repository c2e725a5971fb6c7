"""mergescope: deep model merging grounded in loss-landscape geometry.

Public API (re-exports only, loaded lazily so `import mergescope` stays cheap):
``load``, ``save``, ``merge``, ``diagnose``, and the submodules ``methods``, ``align``, ``landscape``,
``ensemble``, ``tasks``, ``analysis``.
"""

from importlib import import_module

from ._version import __version__
from .errors import MergescopeError

_FUNCTIONS = {
    "load": ("mergescope.io", "load"),
    "save": ("mergescope.io", "save"),
}
# ``merge`` is both the function ``ms.merge(recipe, out)`` and the package ``mergescope.merge``:
# importing any ``mergescope.merge.*`` module binds the package to this name, so the name is always
# the package, made callable in ``merge/__init__.py`` (calls go to ``merge.engine.merge``).
_SUBMODULES = {
    "merge": "mergescope.merge",
    "methods": "mergescope.merge.methods",
    "align": "mergescope.align",
    "landscape": "mergescope.landscape",
    "ensemble": "mergescope.ensemble",
    "tasks": "mergescope.tasks",
    "analysis": "mergescope.analysis",
    "io": "mergescope.io",
    "diagnose": "mergescope.diagnose",  # callable package, like merge: ms.diagnose(models, ...)
}

__all__ = ["__version__", "MergescopeError", *_FUNCTIONS, *_SUBMODULES]


def __getattr__(name):
    if name in _FUNCTIONS:
        module, attr = _FUNCTIONS[name]
        return getattr(import_module(module), attr)
    if name in _SUBMODULES:
        return import_module(_SUBMODULES[name])
    raise AttributeError(f"module 'mergescope' has no attribute {name!r}")
