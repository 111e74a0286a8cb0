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

import functools
import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from . import catalog
from .device import DeviceSpec

# Where the Linux CPU probe reads from; module constants so tests can point them at a fake tree.
PROC_CPUINFO = Path("/proc/cpuinfo")
SYS_CPU_DIR = Path("/sys/devices/system/cpu")
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_CPU_DIR = Path("/sys/fs/cgroup/cpu")

# fp32 lanes per vector register and the number of vector registers, by instruction-set flag, best
# first. Flags are /proc/cpuinfo "flags" (x86) or "Features" (Arm) words.
_SIMD_BY_FLAG: tuple[tuple[str, int, int, str], ...] = (
    ("avx512f", 16, 32, "avx512"),
    ("avx2", 8, 16, "avx2"),
    ("avx", 8, 16, "avx"),
    ("asimd", 4, 32, "neon"),
    ("neon", 4, 32, "neon"),
    ("sse2", 4, 16, "sse2"),
)
# When flags are readable but list none of the above: the narrowest vector anyone has.
_BASELINE_SIMD = (4, 16, "")

_VENDOR_BY_ID = {"authenticamd": "amd", "genuineintel": "intel", "hygongenuine": "hygon"}
_ARM_IMPLEMENTERS = {"0x41": "arm", "0x61": "apple", "0x51": "qualcomm", "0x46": "fujitsu", "0xc0": "ampere"}


# ----------------------------------------------------------------------------------------------
# small readers: each returns None (never raises) when the file or value is not there


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _parse_size(text: str) -> int | None:
    """'32K', '1M', '32768K', '512 KB', '1048576' -> bytes."""
    found = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, flags=re.IGNORECASE)
    if not found:
        return None
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[found.group(2).upper()]
    return int(found.group(1)) * scale


def _parse_cpu_list(text: str) -> set[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11}; malformed parts are skipped."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        bounds = part.strip().split("-")
        if not all(b.isdigit() for b in bounds) or len(bounds) not in (1, 2):
            continue
        low, high = int(bounds[0]), int(bounds[-1])
        cpus.update(range(low, high + 1))
    return cpus


def _parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """One dict per blank-line-separated block of /proc/cpuinfo (one per logical CPU on x86)."""
    blocks: list[dict[str, str]] = []
    for chunk in text.split("\n\n"):
        fields = {}
        for line in chunk.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if fields:
            blocks.append(fields)
    return blocks


def _first_field(blocks: list[dict[str, str]], *keys: str) -> str | None:
    """The first value any block gives for any of ``keys`` (possibly empty), or None."""
    for block in blocks:
        for key in keys:
            if key in block:
                return block[key]
    return None


def _sysctl(name: str) -> str | None:
    """One ``sysctl -n`` value on macOS/BSD, or None."""
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    value = done.stdout.strip()
    return value if done.returncode == 0 and value else None


def _sysctl_int(name: str) -> int | None:
    value = _sysctl(name)
    return int(value) if value is not None and value.isdigit() else None


# ----------------------------------------------------------------------------------------------
# CPU


def _usable_cpus() -> set[int] | None:
    """The logical CPUs this process may run on, where the OS says (Linux ``sched_getaffinity``)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return set(os.sched_getaffinity(0))
        except OSError:
            return None
    return None


def _cgroup_cpu_limit() -> int | None:
    """Whole CPUs the cgroup quota allows (cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None."""
    text = _read_text(CGROUP_V2_CPU_MAX)
    if text is not None:
        fields = text.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[1]) > 0:
            return max(1, math.ceil(int(fields[0]) / int(fields[1])))
        return None  # "max 100000": no quota
    quota = _read_text(CGROUP_V1_CPU_DIR / "cpu.cfs_quota_us")
    period = _read_text(CGROUP_V1_CPU_DIR / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    quota_us, period_us = quota.strip(), period.strip()
    if quota_us.isdigit() and period_us.isdigit() and int(period_us) > 0:  # "-1" means no quota
        return max(1, math.ceil(int(quota_us) / int(period_us)))
    return None


def _sibling_groups(cpus: set[int]) -> set[frozenset[int]] | None:
    """The physical cores behind ``cpus``: each as the set of its SMT siblings, from /sys topology."""
    groups = set()
    for cpu in cpus:
        topology = SYS_CPU_DIR / f"cpu{cpu}" / "topology"
        text = _read_text(topology / "core_cpus_list") or _read_text(topology / "thread_siblings_list")
        if text is None:
            return None
        groups.add(frozenset(_parse_cpu_list(text)))
    return groups


def _cores_from_cpuinfo(blocks: list[dict[str, str]], cpus: set[int] | None) -> int | None:
    """Distinct (physical id, core id) pairs among the usable logical CPUs, where cpuinfo lists them."""
    pairs = set()
    for block in blocks:
        if "core id" not in block or "processor" not in block:
            continue
        if cpus is not None and block["processor"].isdigit() and int(block["processor"]) not in cpus:
            continue
        pairs.add((block.get("physical id", "0"), block["core id"]))
    return len(pairs) or None


def _cache_entries(cpu: int) -> list[dict[str, object]]:
    """The caches /sys lists for one logical CPU: level, type, size in bytes and the CPUs sharing it."""
    entries = []
    cache_dir = SYS_CPU_DIR / f"cpu{cpu}" / "cache"
    try:
        indexes = sorted(cache_dir.glob("index*"))
    except OSError:
        return []
    for index in indexes:
        level, kind, size = (_read_text(index / leaf) for leaf in ("level", "type", "size"))
        if level is None or kind is None or size is None or not level.strip().isdigit():
            continue
        size_bytes = _parse_size(size)
        if size_bytes is None:
            continue
        shared = _read_text(index / "shared_cpu_list")
        entries.append(
            {
                "level": int(level),
                "type": kind.strip().lower(),
                "size": size_bytes,
                "shared": frozenset(_parse_cpu_list(shared)) if shared else frozenset({cpu}),
            }
        )
    return entries


def _cores_sharing(shared: frozenset[int]) -> int:
    """How many physical cores share a cache listed as shared by these logical CPUs.

    SMT siblings count once. When /sys topology is unreadable the cache is taken as private to one
    core, the common case, rather than split on a guess.
    """
    groups = _sibling_groups(set(shared))
    return max(1, len(groups)) if groups else 1


def _linux_caches(cpus: set[int]) -> dict[str, int]:
    """L1d and L2 per core and the L3 total, from /sys; keys present only where readable."""
    caches: dict[str, int] = {}
    first = min(cpus)
    for entry in _cache_entries(first):
        level, kind, size = entry["level"], entry["type"], entry["size"]
        if kind not in ("data", "unified") or level not in (1, 2):
            continue
        # Some designs share one L2 among a cluster of cores (Intel E-cores): split it per core.
        caches["l1" if level == 1 else "l2"] = size // _cores_sharing(entry["shared"])
    # L3 total: every distinct L3 instance the machine's CPUs see, summed (one per CCD on EPYC).
    l3_instances: dict[frozenset[int], int] = {}
    for cpu in sorted(_all_cpus() or cpus):
        if any(cpu in shared for shared in l3_instances):
            continue  # already counted through a CPU sharing that L3
        for entry in _cache_entries(cpu):
            if entry["level"] == 3:
                l3_instances[entry["shared"]] = entry["size"]
    if l3_instances:
        caches["l3"] = sum(l3_instances.values())
    return caches


def _all_cpus() -> set[int] | None:
    text = _read_text(SYS_CPU_DIR / "online") or _read_text(SYS_CPU_DIR / "present")
    return _parse_cpu_list(text) if text else None


def _simd_from_flags(flags: set[str]) -> tuple[int, int, str]:
    """(fp32 lanes, vector registers, ISA label) for the widest vector extension in ``flags``."""
    for flag, lanes, registers, label in _SIMD_BY_FLAG:
        if flag in flags:
            return lanes, registers, label
    return _BASELINE_SIMD


def _is_x86(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64")


def _cpu_arch(machine: str, simd_label: str) -> str:
    machine = machine.lower()
    if _is_x86(machine):
        base = "x86-64"
    elif machine in ("aarch64", "arm64"):
        base = "aarch64"
    else:
        base = machine or "unknown"
    return f"{base}-{simd_label}" if simd_label else base


def _cpu_vendor(blocks: list[dict[str, str]]) -> str | None:
    vendor_id = _first_field(blocks, "vendor_id")
    if vendor_id:
        return _VENDOR_BY_ID.get(vendor_id.lower(), vendor_id.lower())
    implementer = _first_field(blocks, "cpu implementer")
    if implementer:
        return _ARM_IMPLEMENTERS.get(implementer.lower(), "arm")
    return None


def _macos_figures() -> dict[str, object]:
    """What ``sysctl`` tells on macOS; keys present only where readable."""
    figures: dict[str, object] = {}
    brand = _sysctl("machdep.cpu.brand_string")
    if brand:
        figures["name"] = brand
        vendor = next((v for v in ("apple", "intel", "amd") if v in brand.lower()), None)
        if vendor:
            figures["vendor"] = vendor
    for key, names in (
        ("cores", ("hw.physicalcpu",)),
        ("threads", ("hw.logicalcpu",)),
        ("l1", ("hw.perflevel0.l1dcachesize", "hw.l1dcachesize")),
        ("l2", ("hw.perflevel0.l2cachesize", "hw.l2cachesize")),
        ("l3", ("hw.l3cachesize",)),
        ("memory", ("hw.memsize",)),
    ):
        for name in names:
            value = _sysctl_int(name)
            if value:
                figures[key] = value
                break
    flags = {flag for flag in ("avx512f", "avx2", "neon") if _sysctl_int(f"hw.optional.{flag}") == 1}
    if _sysctl_int("hw.optional.avx2_0") == 1:
        flags.add("avx2")
    if platform.machine().lower() == "arm64":
        flags.add("neon")  # every Apple-silicon core has NEON
    if flags:
        figures["flags"] = flags
    return figures


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _read_cpu_figures() -> dict[str, object]:
    """Every CPU figure the OS reports, by name; what is missing is simply absent."""
    figures: dict[str, object] = {}
    cpuinfo = _read_text(PROC_CPUINFO)
    blocks = _parse_cpuinfo(cpuinfo) if cpuinfo else []
    name = _first_field(blocks, "model name", "hardware", "cpu model")
    if name:
        figures["name"] = name
    vendor = _cpu_vendor(blocks)
    if vendor:
        figures["vendor"] = vendor
    flag_text = _first_field(blocks, "flags", "features")
    if flag_text is not None:
        figures["flags"] = set(flag_text.split())

    usable = _usable_cpus()
    groups = _sibling_groups(usable) if usable else None
    cores = len(groups) if groups else _cores_from_cpuinfo(blocks, usable)
    threads = len(usable) if usable else os.cpu_count()
    limit = _cgroup_cpu_limit()
    if limit is not None:
        # A cgroup quota of N CPUs lets N threads run at once whatever the affinity mask says.
        threads = min(threads, limit) if threads else limit
        cores = min(cores, limit) if cores else None
    if cores:
        figures["cores"] = cores
    if threads:
        figures["threads"] = threads
    if usable:
        figures.update(_linux_caches(usable))
    memory = _physical_memory()
    if memory:
        figures["memory"] = memory

    if sys.platform == "darwin":
        for key, value in _macos_figures().items():
            figures.setdefault(key, value)
    if "cores" not in figures and "threads" in figures:
        # Topology unreadable: count each usable logical CPU as a core (exact without SMT).
        figures["cores"] = figures["threads"]
        figures["cores_from_threads"] = True
    return figures


def _cpu_fallback(name: str | None) -> DeviceSpec:
    """The catalog entry to borrow unread figures from: this very CPU if known, else the generic one."""
    known = catalog.match(name) if name else None
    if known is not None and known.kind == "cpu":
        return known
    return catalog.CATALOG[catalog.GENERIC_CPU_KEY]


@functools.lru_cache(maxsize=None)
def probe_cpu() -> DeviceSpec:
    """The host CPU as a ``DeviceSpec``. Never raises.

    Figures the OS does not report come from the catalog entry for this CPU model when there is
    one, else from the generic x86-64 entry; ``notes`` names each one taken that way.
    """
    figures = _read_cpu_figures()
    name = str(figures.get("name") or platform.processor() or platform.machine() or "unknown CPU")
    fallback = _cpu_fallback(name)
    notes: list[str] = []

    def read_or_assume(key: str, assumed, what: str):
        if key in figures:
            return figures[key]
        notes.append(f"{what} not readable from the OS: assumed {_shown(assumed)} (catalog entry {fallback.name!r})")
        return assumed

    if "flags" in figures:
        lanes, vector_registers, simd_label = _simd_from_flags(figures["flags"])
        if not simd_label:
            notes.append(f"no known vector extension in the CPU flags: assumed {lanes} fp32 lanes")
    else:
        lanes = fallback.simd_width
        vector_registers = fallback.registers_per_unit // fallback.simd_width
        # The fallback's ISA label only describes an x86 host; elsewhere leave the arch bare.
        simd_label = fallback.arch.rsplit("-", 1)[-1] if _is_x86(platform.machine()) else ""
        notes.append(f"CPU flags not readable: assumed {lanes} fp32 lanes per vector (catalog entry {fallback.name!r})")

    cores = read_or_assume("cores", fallback.compute_units, "core count")
    if figures.get("cores_from_threads"):
        notes.append("CPU topology not readable: each usable logical CPU counted as a core")
    l1 = read_or_assume("l1", fallback.l1_bytes, "L1d size per core")
    l2 = read_or_assume("l2", fallback.l2_bytes, "L2 size per core")
    l3 = figures.get("l3")
    if l3 is None and fallback.l3_bytes is not None:
        l3 = read_or_assume("l3", fallback.l3_bytes, "L3 size")
    bandwidth = fallback.memory_bandwidth_gbs
    if bandwidth is not None:
        notes.append(f"memory bandwidth not measured: {bandwidth:g} GB/s from catalog entry {fallback.name!r}")
    on_linux = sys.platform.startswith("linux")
    return DeviceSpec(
        name=name,
        vendor=str(figures.get("vendor") or platform.machine().lower() or "unknown"),
        kind="cpu",
        arch=_cpu_arch(platform.machine(), simd_label),
        compute_units=int(cores),
        simd_width=lanes,
        sram_per_block=int(l2),
        sram_per_unit=int(l2),
        registers_per_unit=vector_registers * lanes,
        max_registers_per_thread=vector_registers * lanes,
        max_threads_per_block=1,
        l1_bytes=l1,
        l2_bytes=l2,
        l3_bytes=l3,
        memory_bytes=figures.get("memory"),
        memory_bandwidth_gbs=bandwidth,
        hardware_threads=figures.get("threads"),
        source="probed: /proc/cpuinfo, /sys/devices/system/cpu, sched_getaffinity, cgroup cpu quota"
        if on_linux
        else f"probed: platform module and sysctl on {sys.platform}",
        notes=tuple(notes),
    )


def _shown(value) -> str:
    """A figure as a note shows it: sizes in KiB/MiB, counts as they are."""
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value // (1024 * 1024)} MiB"
    if isinstance(value, int) and value >= 1024 and value % 1024 == 0:
        return f"{value // 1024} KiB"
    return str(value)


# ----------------------------------------------------------------------------------------------
# CUDA (NVIDIA through torch or cupy; AMD through a ROCm build of torch)


def _from_catalog(spec_name: str, figures: dict[str, object], field: str, default, why: str, notes: list[str]):
    """``figures[field]`` when the runtime gave it, else the catalog entry's, else ``default``; noted."""
    value = figures.get(field)
    if value:
        return value
    known = catalog.match(spec_name)
    if known is not None and getattr(known, field) is not None:
        notes.append(f"{field} {why}: taken from catalog entry {known.name!r}")
        return getattr(known, field)
    if default is not None:
        notes.append(f"{field} {why}: assumed {default}")
    return default


def _torch_cuda_figures(torch, index: int) -> dict[str, object]:
    """Figures from ``torch.cuda.get_device_properties``; attribute names vary across versions."""
    props = torch.cuda.get_device_properties(index)

    def attr(*names):
        for name in names:
            value = getattr(props, name, None)
            if value is not None:
                return value
        return None

    figures: dict[str, object] = {
        "name": attr("name"),
        "major": attr("major"),
        "minor": attr("minor"),
        "compute_units": attr("multi_processor_count"),
        "memory_bytes": attr("total_memory"),
        "l2_bytes": attr("L2_cache_size", "l2_cache_size"),
        "sram_per_block": attr("shared_memory_per_block_optin"),
        "sram_per_block_default": attr("shared_memory_per_block"),
        "sram_per_unit": attr("shared_memory_per_multiprocessor"),
        "registers_per_unit": attr("regs_per_multiprocessor"),
        "max_threads_per_block": attr("max_threads_per_block"),
        "simd_width": attr("warp_size"),
        "gcn_arch": attr("gcnArchName"),
        "runtime": "torch " + str(torch.__version__),
    }
    bandwidth = _peak_bandwidth_gbs(attr("memory_clock_rate"), attr("memory_bus_width"))
    if bandwidth:
        figures["memory_bandwidth_gbs"] = bandwidth
    if getattr(torch.version, "hip", None):
        figures["vendor"] = "amd"
    return figures


def _peak_bandwidth_gbs(clock_khz, bus_bits) -> float | None:
    """Peak DRAM bandwidth from the memory clock (kHz) and bus width (bits), two transfers per clock.

    None when the runtime does not report both (older torch has neither attribute).
    """
    if not clock_khz or not bus_bits:
        return None
    return round(2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, 1)


def _cupy_cuda_figures(cupy, index: int) -> dict[str, object]:
    """Figures from ``cupy.cuda.runtime.getDeviceProperties`` (a dict of cudaDeviceProp fields)."""
    props = cupy.cuda.runtime.getDeviceProperties(index)
    name = props.get("name", b"")
    figures: dict[str, object] = {
        "name": name.decode(errors="replace") if isinstance(name, bytes) else str(name),
        "major": props.get("major"),
        "minor": props.get("minor"),
        "compute_units": props.get("multiProcessorCount"),
        "memory_bytes": props.get("totalGlobalMem"),
        "l2_bytes": props.get("l2CacheSize"),
        "sram_per_block": props.get("sharedMemPerBlockOptin"),
        "sram_per_block_default": props.get("sharedMemPerBlock"),
        "sram_per_unit": props.get("sharedMemPerMultiprocessor"),
        "registers_per_unit": props.get("regsPerMultiprocessor"),
        "max_threads_per_block": props.get("maxThreadsPerBlock"),
        "simd_width": props.get("warpSize"),
        "runtime": "cupy " + str(cupy.__version__),
    }
    bandwidth = _peak_bandwidth_gbs(props.get("memoryClockRate"), props.get("memoryBusWidth"))
    if bandwidth:
        figures["memory_bandwidth_gbs"] = bandwidth
    return figures


def _cuda_runtime():
    """("torch", module) or ("cupy", module) for the first one that sees a CUDA device; else raises."""
    reasons = []
    try:
        import torch
    except ImportError:
        reasons.append("torch is not installed")
    else:
        if torch.cuda.is_available():
            return "torch", torch
        reasons.append(f"torch {torch.__version__} sees no CUDA device")
    try:
        import cupy
    except ImportError:
        reasons.append("cupy is not installed")
    else:
        try:
            if cupy.cuda.runtime.getDeviceCount() > 0:
                return "cupy", cupy
            reasons.append("cupy sees no CUDA device")
        except RuntimeError as error:  # CUDARuntimeError: no driver, no device
            reasons.append(f"cupy cannot reach a CUDA device ({error})")
    raise RuntimeError("no CUDA device to probe: " + "; ".join(reasons))


def _device_count(runtime: str, module) -> int:
    return module.cuda.device_count() if runtime == "torch" else module.cuda.runtime.getDeviceCount()


def cuda_device_count() -> int:
    """How many CUDA (or ROCm) devices torch or cupy sees; raises RuntimeError when none can."""
    return _device_count(*_cuda_runtime())


@functools.lru_cache(maxsize=None)
def probe_cuda(index: int = 0) -> DeviceSpec:
    """CUDA device ``index`` as a ``DeviceSpec``, read through torch or, without torch, cupy.

    Raises ``RuntimeError`` when neither package can reach a CUDA device, or ``index`` is out of range.
    """
    runtime, module = _cuda_runtime()
    count = _device_count(runtime, module)
    if not 0 <= index < count:
        raise RuntimeError(f"no CUDA device {index}: {runtime} sees {count}")
    figures = _torch_cuda_figures(module, index) if runtime == "torch" else _cupy_cuda_figures(module, index)
    if figures.get("vendor") == "amd":
        return _rocm_spec(figures)
    return _nvidia_spec(figures)


def _nvidia_spec(figures: dict[str, object]) -> DeviceSpec:
    name = str(figures["name"])
    runtime = figures["runtime"]
    notes: list[str] = []
    compute_capability = (int(figures["major"]), int(figures["minor"]))
    missing = f"not reported by {runtime}"
    sram_per_block = figures.get("sram_per_block")
    if not sram_per_block:
        sram_per_block = _from_catalog(name, figures, "sram_per_block", None, missing, notes)
    if not sram_per_block:
        # Without the opt-in figure only the default 48 KiB per block is certain.
        sram_per_block = figures.get("sram_per_block_default") or 48 * 1024
        notes.append(f"opt-in shared memory per block {missing}: using the default {sram_per_block} bytes")
    return DeviceSpec(
        name=name,
        vendor="nvidia",
        kind="gpu",
        arch=f"sm_{compute_capability[0]}{compute_capability[1]}",
        compute_units=int(figures["compute_units"]),
        simd_width=int(figures.get("simd_width") or 32),
        sram_per_block=int(sram_per_block),
        sram_per_unit=int(_from_catalog(name, figures, "sram_per_unit", sram_per_block, missing, notes)),
        registers_per_unit=int(_from_catalog(name, figures, "registers_per_unit", 65536, missing, notes)),
        max_registers_per_thread=catalog.NVIDIA_MAX_REGISTERS_PER_THREAD,
        max_threads_per_block=int(figures.get("max_threads_per_block") or catalog.NVIDIA_MAX_THREADS_PER_BLOCK),
        matrix_units=catalog.nvidia_matrix_units(compute_capability),
        compute_capability=compute_capability,
        has_async_copy=catalog.nvidia_has_async_copy(compute_capability),
        l1_bytes=_from_catalog(name, figures, "l1_bytes", None, missing, notes),
        l2_bytes=_from_catalog(name, figures, "l2_bytes", None, missing, notes),
        memory_bytes=figures.get("memory_bytes"),
        memory_bandwidth_gbs=_from_catalog(name, figures, "memory_bandwidth_gbs", None, missing, notes),
        source=f"probed: {runtime}; matrix units and async copy derived from compute capability",
        notes=tuple(notes),
    )


def _rocm_spec(figures: dict[str, object]) -> DeviceSpec:
    """An AMD GPU seen through a ROCm build of torch: ``major``/``minor`` there are not CUDA's."""
    name = str(figures["name"])
    runtime = figures["runtime"]
    notes: list[str] = []
    missing = f"not reported by {runtime}"
    gfx_target = str(figures.get("gcn_arch") or "").split(":")[0]
    known = catalog.match(name)
    if not gfx_target:
        gfx_target = known.arch if known is not None else "gfx-unknown"
        notes.append(f"gfx target {missing}: {gfx_target}")
    sram_per_block = figures.get("sram_per_block") or figures.get("sram_per_block_default") or 64 * 1024
    return DeviceSpec(
        name=name,
        vendor="amd",
        kind="gpu",
        arch=gfx_target,
        compute_units=int(figures["compute_units"]),
        simd_width=int(figures.get("simd_width") or 64),
        sram_per_block=int(sram_per_block),
        sram_per_unit=int(_from_catalog(name, figures, "sram_per_unit", sram_per_block, missing, notes)),
        registers_per_unit=int(_from_catalog(name, figures, "registers_per_unit", 65536, missing, notes)),
        max_registers_per_thread=int(_from_catalog(name, figures, "max_registers_per_thread", 256, missing, notes)),
        max_threads_per_block=int(figures.get("max_threads_per_block") or 1024),
        matrix_units=catalog.amd_matrix_units(gfx_target),
        l1_bytes=_from_catalog(name, figures, "l1_bytes", None, missing, notes),
        l2_bytes=_from_catalog(name, figures, "l2_bytes", None, missing, notes),
        l3_bytes=known.l3_bytes if known is not None else None,
        memory_bytes=figures.get("memory_bytes"),
        memory_bandwidth_gbs=_from_catalog(name, figures, "memory_bandwidth_gbs", None, missing, notes),
        source=f"probed: {runtime} (ROCm); matrix units derived from the gfx target",
        notes=tuple(notes),
    )


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


def _opencl_cpu_spec(device, platform_name: str) -> DeviceSpec:
    """An OpenCL CPU device (PoCL, Intel's CPU runtime) is this host's CPU: caches come from ``probe_cpu``."""
    host = probe_cpu()
    lanes = int(device.preferred_vector_width_float) or host.simd_width
    vector_registers = host.registers_per_unit // host.simd_width
    local_memory = int(device.local_mem_size)
    return replace(
        host,
        name=device.name.strip(),
        arch=_opencl_arch(device),
        compute_units=int(device.max_compute_units),
        simd_width=lanes,
        registers_per_unit=vector_registers * lanes,
        max_registers_per_thread=vector_registers * lanes,
        # A work-group's __local buffer is what an OpenCL kernel can ask for, whatever the caches.
        sram_per_block=local_memory,
        sram_per_unit=local_memory,
        max_threads_per_block=int(device.max_work_group_size),
        memory_bytes=int(device.global_mem_size),
        hardware_threads=int(device.max_compute_units),
        source=f"probed: OpenCL platform {platform_name!r}; registers and caches from probe_cpu",
        notes=host.notes
        + ("an OpenCL CPU device: max_threads_per_block is the work-group limit, not 1 as for native CPU code",),
    )


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
def _probe_opencl_labeled() -> tuple[tuple[str, DeviceSpec], ...]:
    devices = opencl_devices()  # first: it says why when pyopencl or a platform is missing
    import pyopencl as cl

    found = []
    for label, device in devices:
        try:
            if device.type & cl.device_type.CPU:
                spec = _opencl_cpu_spec(device, device.platform.name)
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
    return [spec for _, spec in _probe_opencl_labeled()]


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
        found.extend((label, spec, "OpenCL device") for label, spec in _probe_opencl_labeled())
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
        labeled = _probe_opencl_labeled()
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
    _probe_opencl_labeled.cache_clear()
