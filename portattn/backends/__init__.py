"""Backends: the registry, filled by the ``@register`` decorator as backend modules are imported.

Backend modules import nothing heavy at import time (their frameworks load on first use), so
importing them all to fill the registry costs little and never fails for a missing package.
Adding a backend means writing its module and naming it in ``MODULES``; the core does not change.
"""

from __future__ import annotations

import importlib

from .base import Backend, Capabilities

MODULES = ("reference", "numba_cpu", "triton_gpu", "cupy_gpu", "opencl")

_REGISTRY: dict[str, Backend] = {}


def register(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls()
    return cls


_FILLED: list[bool] = []


def registry() -> dict[str, Backend]:
    """Every known backend by name, in ``MODULES`` order (imported once; then a dict copy per call)."""
    if not _FILLED:
        for module in MODULES:
            importlib.import_module(f"{__name__}.{module}")
        _FILLED.append(True)
    return dict(_REGISTRY)


__all__ = ["Backend", "Capabilities", "register", "registry"]
