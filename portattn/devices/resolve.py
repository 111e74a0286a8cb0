"""Turning a device name into a `DeviceSpec`: live devices by label, others from the catalog."""

from __future__ import annotations

from . import catalog, probe
from .description import DeviceSpec

LIVE_PREFIXES = ("cpu", "cuda", "opencl")


def cuda_index(device: str, current: int = 0) -> int:
    """The N of a ``"cuda:N"`` label; ``current`` (the framework's current device) for a bare ``"cuda"``."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"{device!r} is not a CUDA device label; use 'cuda' or 'cuda:N'")
    return int(index) if index else current


def device_named(name: str) -> DeviceSpec:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"opencl:0:0"`` probe the live device; any other name
    (``"h100"``, ``"v100"``, ``"mi300x"``, ...) is looked up in the catalog."""
    if name.split(":", 1)[0].lower() in LIVE_PREFIXES:
        return probe.probe(name.lower())
    return catalog.lookup(name)
