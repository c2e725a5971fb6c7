"""Users' own tasks and models plug in as ``package.module:factory`` strings."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ..errors import MergescopeError


def resolve(spec: str) -> Callable:
    """Import ``package.module:attr`` and return the attribute (a factory callable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise MergescopeError(f"{spec!r}: expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise MergescopeError(f"{spec!r}: cannot import {module_name} ({e})") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise MergescopeError(f"{spec!r}: {module_name} has no attribute {attr!r}") from None
    if not callable(obj):
        raise MergescopeError(f"{spec!r}: {attr} is not callable")
    return obj
