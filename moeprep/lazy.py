"""Modules imported when first used.

``torch`` takes a second or more to import; the header-only commands (``inspect``, ``convert
--dry-run``, ``--help``, ``--version``) never use it, so the modules they pass through take it
from here and the import happens at the first attribute a data path reads.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """``name`` as a module object whose import runs on first attribute access (the real module
    where it is already imported)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


torch = lazy_import("torch")
