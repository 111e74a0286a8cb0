"""CUDA devices as ``DeviceSpec``s, read through torch (NVIDIA, or AMD through a ROCm build) or cupy;
figures the runtime does not give come from the catalog, and the notes say which."""

from __future__ import annotations

import functools

from .. import catalog
from ..description import DeviceSpec

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


