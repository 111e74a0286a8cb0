"""The host CPU as a ``DeviceSpec``: /proc/cpuinfo, /sys caches, affinity and cgroup limits on Linux,
sysctl on macOS; figures it cannot read come from the catalog. ``probe_cpu`` never raises."""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from .. import catalog
from ..description import DeviceSpec, cpu_device

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
    return cpu_device(
        name,
        str(figures.get("vendor") or platform.machine().lower() or "unknown"),
        _cpu_arch(platform.machine(), simd_label),
        cores=int(cores),
        lanes=lanes,
        vector_registers=vector_registers,
        l1d=l1,
        l2_per_core=int(l2),
        l3=l3,
        threads=figures.get("threads"),
        bandwidth_gbs=bandwidth,
        memory_bytes=figures.get("memory"),
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


