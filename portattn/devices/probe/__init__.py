"""Build a ``DeviceSpec`` from the live device: the host CPU, CUDA devices, OpenCL devices.

This module owns reading figures off hardware. It imports only the standard library at module
level; torch, cupy and pyopencl are imported inside the function that needs them, so importing
portattn never touches a device or a GPU framework. Every figure a device does not report is taken
from the matching catalog entry (or the generic one) and the spec's ``notes`` say which.

``probe_cpu`` never raises; ``probe_cuda`` and ``probe_opencl`` raise ``RuntimeError`` saying why
when there is no such device or package; ``probe_all`` reports what it found and why not, and
never raises. Results are cached: device figures do not change within a process.
"""

from __future__ import annotations

import re

from ..description import DeviceSpec
from .cpu import probe_cpu
from .cuda import cuda_device_count, probe_cuda
from .opencl import opencl_devices, opencl_specs, probe_opencl

# ----------------------------------------------------------------------------------------------
# all devices, and one by name


def probe_all() -> list[tuple[str, DeviceSpec | None, str]]:
    """Every device this process can see, as (label, spec or None, note). Never raises."""
    found: list[tuple[str, DeviceSpec | None, str]] = [("cpu", probe_cpu(), "host CPU, read from the OS")]
    try:
        count = cuda_device_count()
        found.extend((f"cuda:{index}", probe_cuda(index), "CUDA device") for index in range(count))
    except (ImportError, RuntimeError) as error:
        found.append(("cuda", None, str(error)))
    try:
        found.extend((label, spec, "OpenCL device") for label, spec in opencl_specs())
    except (ImportError, RuntimeError) as error:
        found.append(("opencl", None, str(error)))
    return found


def probe(device: str) -> DeviceSpec:
    """The spec for a device named "cpu", "cuda", "cuda:N", "opencl" (the first) or "opencl:P:D"."""
    text = device.strip().lower()
    if text == "cpu":
        return probe_cpu()
    cuda = re.fullmatch(r"cuda(?::(\d+))?", text)
    if cuda:
        return probe_cuda(int(cuda.group(1) or 0))
    opencl = re.fullmatch(r"opencl(?::(\d+):(\d+))?", text)
    if opencl:
        labeled = opencl_specs()
        if opencl.group(1) is None:
            return labeled[0][1]
        label = f"opencl:{int(opencl.group(1))}:{int(opencl.group(2))}"
        for found_label, spec in labeled:
            if found_label == label:
                return spec
        raise RuntimeError(f"no OpenCL device {label}; found: {', '.join(l for l, _ in labeled)}")
    raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N', 'opencl' or 'opencl:P:D'")


def clear_cache() -> None:
    """Forget every cached probe (tests that fake the OS files call this)."""
    probe_cpu.cache_clear()
    probe_cuda.cache_clear()
    opencl_devices.cache_clear()
    opencl_specs.cache_clear()


__all__ = ["clear_cache", "cuda_device_count", "opencl_devices", "probe", "probe_all", "probe_cpu", "probe_cuda", "probe_opencl"]
