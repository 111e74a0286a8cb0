"""Turning a device name into a `DeviceSpec`: live devices by label, others from the catalog."""

from __future__ import annotations

from . import catalog, probe
from .device import DeviceSpec

LIVE_PREFIXES = ("cpu", "cuda", "opencl")


def device_named(name: str) -> DeviceSpec:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"opencl:0:0"`` probe the live device; any other name
    (``"h100"``, ``"v100"``, ``"mi300x"``, ...) is looked up in the catalog."""
    if name.split(":", 1)[0].lower() in LIVE_PREFIXES:
        return probe.probe(name.lower())
    return catalog.lookup(name)
