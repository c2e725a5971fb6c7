"""Analyses of why merging works: soups, representation similarity (CKA), model stitching, and
the three Rethink-Merge analyses (arXiv 2411.09263): weight structure, weight space vs feature
space, and parameter scaling / prediction stability.

Each analysis returns a frozen dataclass with ``to_dict()``; its figure is drawn from that dict alone
by ``mergescope.report.analysis_figures`` (each module's ``plot`` forwards there), so figures come
from saved JSON and only ``report/`` imports matplotlib.
Submodules: ``soups``, ``similarity``, ``stitching``, ``weights``, ``spaces``, ``scaling``.
"""

from importlib import import_module

_SUBMODULES = ("soups", "similarity", "stitching", "weights", "spaces", "scaling", "backdoor")
__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
