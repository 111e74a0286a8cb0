"""Backends: the registry, filled by the ``@register`` decorator as backend modules are imported.

Backend modules import nothing heavy at import time (their frameworks load on first use), so
importing them all to fill the registry costs little and never fails for a missing package.
Adding a backend means writing its module and naming it in ``MODULES``; the core does not change.
"""

from __future__ import annotations

import importlib
import threading

from .base import REGISTRY, Backend, Capabilities, register

MODULES = ("reference", "numba", "triton", "cupy", "opencl")

_ORDERED: dict[str, Backend] = {}
_FILLING = threading.Lock()


def registry() -> dict[str, Backend]:
    """Every known backend by name, in ``MODULES`` order whichever was imported first (the modules are
    imported once; then a dict copy per call)."""
    if not _ORDERED:
        with _FILLING:  # threads making their first call at once import the backends once
            if not _ORDERED:
                modules = [importlib.import_module(f"{__name__}.{module}") for module in MODULES]
                _ORDERED.update((name, backend) for module in modules for name, backend in REGISTRY.items()
                                if type(backend).__module__ == module.__name__)
    return dict(_ORDERED)


__all__ = ["Backend", "Capabilities", "register", "registry"]
