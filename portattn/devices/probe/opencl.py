"""OpenCL devices as ``DeviceSpec``s, read through pyopencl, in the one numbering (``opencl:P:D``) that
``portattn info``, array labels and the opencl backend share."""

from __future__ import annotations

import functools

from .. import catalog
from ..description import DeviceSpec, cpu_device
from .cpu import probe_cpu

# ----------------------------------------------------------------------------------------------
# OpenCL


def _cl_info(device, attribute: str, cl_error: type[Exception]):
    """A vendor-extension device attribute, or None when this driver does not answer it."""
    try:
        return getattr(device, attribute)
    except (cl_error, AttributeError):
        return None


# Sub-group width by vendor, for drivers that do not report it: NVIDIA warps, AMD CDNA/GCN
# wavefronts (RDNA also runs 32), the width Intel's DPAS uses, Apple SIMD-groups.
_SUB_GROUP_BY_VENDOR = {"nvidia": 32, "amd": 64, "intel": 16, "apple": 32}


def _opencl_vendor(vendor_text: str) -> str:
    """'NVIDIA Corporation', 'Advanced Micro Devices, Inc.', 'Intel(R) Corporation' -> short name."""
    lowered = vendor_text.strip().lower()
    if "advanced micro devices" in lowered:
        return "amd"
    return next((v for v in _SUB_GROUP_BY_VENDOR if v in lowered), lowered)


def _opencl_arch(device) -> str:
    """'OpenCL 3.0 PoCL HSTR: ...' -> 'opencl-3.0'."""
    return "opencl-" + " ".join(device.version.split()[1:2])


def _opencl_sub_group_width(device, vendor: str, cl_error: type[Exception], notes: list[str]) -> int:
    for attribute in ("warp_size_nv", "wavefront_width_amd"):
        width = _cl_info(device, attribute, cl_error)
        if width:
            return int(width)
    width = _SUB_GROUP_BY_VENDOR.get(vendor, 32)
    notes.append(f"sub-group width not reported: assumed {width} for vendor {vendor!r}")
    return width


def _opencl_gpu_spec(device, platform_name: str, cl_error: type[Exception]) -> DeviceSpec:
    vendor = _opencl_vendor(device.vendor)
    name = device.name.strip()
    notes: list[str] = []
    arch = _opencl_arch(device)
    compute_capability = None
    major = _cl_info(device, "compute_capability_major_nv", cl_error)
    minor = _cl_info(device, "compute_capability_minor_nv", cl_error)
    if major is not None and minor is not None:
        compute_capability = (int(major), int(minor))
        arch = f"sm_{major}{minor}"
    if name.startswith("gfx"):
        # AMD's driver reports the gfx target as the name; the product name is the board name.
        arch = name.split(":")[0]
        name = _cl_info(device, "board_name_amd", cl_error) or name
    known = catalog.match(name)
    local_memory = int(device.local_mem_size)
    sram_per_unit = _cl_info(device, "local_mem_size_per_compute_unit_amd", cl_error) or (
        known.sram_per_unit if known else local_memory
    )
    registers = _cl_info(device, "registers_per_block_nv", cl_error)
    if not registers:
        registers = known.registers_per_unit if known else 65536
        notes.append(
            f"registers per compute unit not reported: {registers} from catalog entry {known.name!r}"
            if known
            else f"registers per compute unit not reported: assumed {registers}"
        )
    if compute_capability is not None:
        matrix_units = catalog.nvidia_matrix_units(compute_capability)
        has_async_copy = catalog.nvidia_has_async_copy(compute_capability)
    else:
        matrix_units = known.matrix_units if known else catalog.amd_matrix_units(arch)
        has_async_copy = known.has_async_copy if known else False
    if known is None:
        notes.append("device not in the catalog: no matrix units or cache sizes assumed beyond what OpenCL reports")
    return DeviceSpec(
        name=name,
        vendor=vendor,
        kind="gpu",
        arch=arch,
        compute_units=int(device.max_compute_units),
        simd_width=_opencl_sub_group_width(device, vendor, cl_error, notes),
        sram_per_block=local_memory,
        sram_per_unit=int(sram_per_unit),
        registers_per_unit=int(registers),
        max_registers_per_thread=known.max_registers_per_thread if known else 128,
        max_threads_per_block=int(device.max_work_group_size),
        matrix_units=matrix_units,
        compute_capability=compute_capability,
        has_async_copy=has_async_copy,
        l1_bytes=known.l1_bytes if known else None,
        l2_bytes=known.l2_bytes if known else None,
        l3_bytes=known.l3_bytes if known else None,
        memory_bytes=int(device.global_mem_size),
        memory_bandwidth_gbs=known.memory_bandwidth_gbs if known else None,
        source=f"probed: OpenCL platform {platform_name!r}" + (f"; catalog entry {known.name!r}" if known else ""),
        notes=tuple(notes),
    )


def _opencl_cpu_spec(device, label: str) -> DeviceSpec:
    """An OpenCL CPU device (PoCL, Intel's CPU runtime), ``label`` 'opencl:P:D', is this host's CPU: caches
    come from ``probe_cpu``."""
    host = probe_cpu()
    platform_name = device.platform.name
    notes = list(host.notes)
    lanes = _abi_safe_lanes(label, int(device.preferred_vector_width_float) or host.simd_width, notes)
    return cpu_device(
        device.name.strip(),
        host.vendor,
        _opencl_arch(device),
        cores=int(device.max_compute_units),
        lanes=lanes,
        vector_registers=host.registers_per_unit // host.simd_width,
        l1d=host.l1_bytes,
        l2_per_core=host.l2_bytes,
        l3=host.l3_bytes,
        threads=int(device.max_compute_units),
        bandwidth_gbs=host.memory_bandwidth_gbs,
        memory_bytes=int(device.global_mem_size),
        local_memory=int(device.local_mem_size),
        max_threads_per_block=int(device.max_work_group_size),
        source=f"probed: OpenCL platform {platform_name!r}; registers and caches from probe_cpu",
        notes=tuple(notes)
        + ("an OpenCL CPU device: max_threads_per_block is the work-group limit, not 1 as for native CPU code",),
    )


# Builds, in a child process, a function passing a float vector of N lanes by value (what the kernels'
# score vectors do) on OpenCL platform P's device D, and prints the build log
_LANES_PROBE = """
import os, sys, warnings
import pyopencl as cl
warnings.simplefilter("ignore")
platform, index, lanes = map(int, sys.argv[1:])
device = cl.get_platforms()[platform].get_devices()[index]
source = ("__attribute__((noinline)) float{n} portattn_lanes(float{n} a) {{ return exp(a); }}\\n"
          "__kernel void portattn_lanes_probe(__global float *x) {{ vstore{n}(portattn_lanes(vload{n}(0, x)), 0, x); }}")
try:
    program = cl.Program(cl.Context([device]), source.format(n=lanes)).build()
    print(program.get_build_info(device, cl.program_build_info.LOG) or "", flush=True)
except cl.Error as error:
    print(error, flush=True)
os._exit(0)  # skip the compiler's teardown, which aborts after a bad build
"""


def _abi_safe_lanes(label: str, lanes: int, notes: list[str]) -> int:
    """``lanes``, or 8 when the device's compiler cannot pass a 16-lane float vector by value. PoCL 3.0's
    wheel (LLVM 14) on AMD Zen 4 reports 16 lanes (AVX-512) and links its AVX-512 kernel library, but
    LLVM 14 does not know the CPU and compiles for a target without avx512f: a float16 argument "changes
    the ABI", and kernels built so fail to load or crash. The build runs in a child process because such
    a build also leaves PoCL's compiler unable to shut down (the process aborts at exit)."""
    if lanes < 16:
        return lanes
    import subprocess
    import sys

    platform, index = label.split(":")[1:]
    try:
        done = subprocess.run([sys.executable, "-c", _LANES_PROBE, platform, index, str(lanes)],
                              capture_output=True, text=True, timeout=120)
        log = done.stdout
    except (OSError, subprocess.SubprocessError) as error:
        log = f"error: {error}"
    if "changes the ABI" not in log and "error" not in log.lower():
        return lanes
    notes.append(f"the OpenCL compiler cannot pass {lanes}-lane float vectors by value (its target lacks the ISA "
                 "the device reports): 8 lanes used")
    return 8


@functools.lru_cache(maxsize=None)
def opencl_devices() -> tuple[tuple[str, object], ...]:
    """Every OpenCL device as ('opencl:P:D', pyopencl.Device): platform P's device D, platforms with no
    device keeping their index -- the one numbering ``portattn info``, array labels and the opencl
    backend share. Raises RuntimeError without pyopencl or a platform."""
    try:
        import pyopencl as cl
    except ImportError as error:
        raise RuntimeError("pyopencl is not installed") from error
    try:
        platforms = cl.get_platforms()
    except cl.Error as error:  # no ICD loader configuration, or no platform behind it
        raise RuntimeError(f"no OpenCL platform found ({error})") from error
    found = []
    for platform_index, cl_platform in enumerate(platforms):
        try:
            devices = cl_platform.get_devices()
        except cl.Error:  # a platform with no devices answers DEVICE_NOT_FOUND
            continue
        found.extend((f"opencl:{platform_index}:{index}", device) for index, device in enumerate(devices))
    return tuple(found)


@functools.lru_cache(maxsize=None)
def opencl_specs() -> tuple[tuple[str, DeviceSpec], ...]:
    devices = opencl_devices()  # first: it says why when pyopencl or a platform is missing
    import pyopencl as cl

    found = []
    for label, device in devices:
        try:
            if device.type & cl.device_type.CPU:
                spec = _opencl_cpu_spec(device, label)
            else:
                spec = _opencl_gpu_spec(device, device.platform.name, cl.Error)
        except cl.Error as error:  # pyopencl's errors are not builtin RuntimeErrors
            raise RuntimeError(f"reading OpenCL device {label} failed: {error}") from error
        found.append((label, spec))
    if not found:
        raise RuntimeError("OpenCL platforms found, but none has a device")
    return tuple(found)


def probe_opencl() -> list[DeviceSpec]:
    """Every device on every OpenCL platform. Raises RuntimeError without pyopencl or devices."""
    return [spec for _, spec in opencl_specs()]


