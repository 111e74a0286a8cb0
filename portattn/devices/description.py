"""The frozen description of a device that the planner reads.

One shape for every kind of hardware: a GPU fills in warps, shared memory and its matrix units; a CPU
fills in cores, SIMD lanes and caches. Each figure is a plain number (bytes, counts) so the planner
can do arithmetic on it; where a probe could not read a figure it keeps the catalog's or a
conservative default and says so in ``notes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MatrixUnit:
    """One matrix-multiply instruction shape: ``m x n x k`` on the given input dtypes.

    ``scope`` says how many threads issue it together: a warp (``mma.sync``, WMMA), a warpgroup of
    four warps (Hopper ``wgmma``), a wavefront (AMD MFMA), a sub-group (Intel XMX/DPAS), or a single
    SIMD-group (Apple ``simdgroup_matrix``).
    """

    name: str
    m: int
    n: int
    k: int
    input_dtypes: tuple[str, ...]
    accumulate_dtype: str = "float32"
    scope: str = "warp"

    def supports(self, dtype: str) -> bool:
        return dtype in self.input_dtypes


@dataclass(frozen=True)
class DeviceSpec:
    """Everything the planner needs to know about one device.

    Sizes are in bytes; ``registers_per_unit`` counts 32-bit registers. For a CPU a "compute unit" is
    a core, ``simd_width`` is the number of fp32 lanes in one vector register, and the "SRAM" a tile
    must live in is the per-core L2 cache (``sram_per_block`` = ``sram_per_unit`` = L2 per core).
    """

    name: str
    vendor: str  # "nvidia", "amd", "intel", "apple", or the CPU vendor
    kind: str  # "gpu" or "cpu"
    arch: str  # "sm_90", "gfx942", "xe-hpc", "apple-m2", "x86-64-avx512", ...
    compute_units: int  # SMs, CUs, Xe-cores, GPU cores, or CPU cores
    simd_width: int  # warp / wavefront / sub-group / SIMD-group width; CPU: fp32 lanes per vector
    sram_per_block: int  # shared/local memory one block (work-group) may use
    sram_per_unit: int  # shared/local memory per compute unit
    registers_per_unit: int  # 32-bit registers per compute unit (CPU: vector registers x lanes)
    max_registers_per_thread: int  # what one thread can address before spilling
    max_threads_per_block: int
    matrix_units: tuple[MatrixUnit, ...] = ()
    compute_capability: tuple[int, int] | None = None  # NVIDIA only
    has_async_copy: bool = False  # cp.async / TMA: lets a kernel pipeline loads over several stages
    l1_bytes: int | None = None  # per compute unit
    l2_bytes: int | None = None  # GPU: whole device; CPU: per core
    l3_bytes: int | None = None  # whole device / socket (Infinity Cache on AMD)
    memory_bytes: int | None = None
    memory_bandwidth_gbs: float | None = None
    hardware_threads: int | None = None  # CPU: logical CPUs this process may run on
    source: str = ""  # where the figures come from (catalog citation or "probed: ...")
    notes: tuple[str, ...] = field(default=())  # what a probe could not read, and what it assumed

    @property
    def key(self) -> str:
        """A short lowercase name, used to look the device up and to key caches."""
        return self.name.lower().replace(" ", "-")

    def matrix_unit_for(self, dtype: str) -> MatrixUnit | None:
        """The largest matrix unit that takes ``dtype`` inputs, or None when there is none."""
        units = [u for u in self.matrix_units if u.supports(dtype)]
        return max(units, key=lambda u: u.m * u.n * u.k, default=None)

    def describe(self) -> str:
        """A few readable lines for ``portattn info``."""
        kib = 1024
        lines = [f"{self.name} ({self.vendor} {self.kind}, {self.arch})"]
        if self.kind == "cpu":
            threads = f", {self.hardware_threads} threads usable" if self.hardware_threads else ""
            lines.append(f"  cores: {self.compute_units}{threads}, {self.simd_width} fp32 lanes per vector")
            caches = [
                f"{label} {size // kib} KiB"
                for label, size in (("L1d/core", self.l1_bytes), ("L2/core", self.l2_bytes), ("L3", self.l3_bytes))
                if size
            ]
            if caches:
                lines.append("  caches: " + ", ".join(caches))
        else:
            cc = f", compute capability {self.compute_capability[0]}.{self.compute_capability[1]}" if self.compute_capability else ""
            lines.append(f"  compute units: {self.compute_units}, SIMD width {self.simd_width}{cc}")
            lines.append(
                f"  SRAM: {self.sram_per_block // kib} KiB per block, {self.sram_per_unit // kib} KiB per unit; "
                f"{self.registers_per_unit} registers per unit; up to {self.max_threads_per_block} threads per block"
            )
            if self.l2_bytes:
                lines.append(f"  L2: {self.l2_bytes // kib // kib} MiB")
        if self.matrix_units:
            units = ", ".join(f"{u.name} {u.m}x{u.n}x{u.k} ({'/'.join(u.input_dtypes)})" for u in self.matrix_units)
            lines.append(f"  matrix units: {units}")
        if self.source:
            lines.append(f"  source: {self.source}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def cpu_device(
    name: str,
    vendor: str,
    arch: str,
    *,
    cores: int,
    lanes: int,
    vector_registers: int,
    l1d: int | None,
    l2_per_core: int,
    l3: int | None,
    threads: int | None,
    bandwidth_gbs: float | None,
    source: str,
    notes: tuple[str, ...],
    memory_bytes: int | None = None,
    local_memory: int | None = None,
    max_threads_per_block: int = 1,
) -> DeviceSpec:
    """The one way a CPU becomes a ``DeviceSpec`` (catalog entries, the live probe, OpenCL CPU devices):
    a core is a compute unit, its L2 the SRAM a tile should fit, ``vector_registers`` x ``lanes`` its
    registers. An OpenCL CPU device passes its ``local_memory`` (what a work-group's ``__local``
    buffer may take, whatever the caches) and its work-group limit as ``max_threads_per_block``."""
    sram = l2_per_core if local_memory is None else local_memory
    return DeviceSpec(
        name=name,
        vendor=vendor,
        kind="cpu",
        arch=arch,
        compute_units=cores,
        simd_width=lanes,
        sram_per_block=sram,
        sram_per_unit=sram,
        registers_per_unit=vector_registers * lanes,
        max_registers_per_thread=vector_registers * lanes,
        max_threads_per_block=max_threads_per_block,
        l1_bytes=l1d,
        l2_bytes=l2_per_core,
        l3_bytes=l3,
        memory_bytes=memory_bytes,
        memory_bandwidth_gbs=bandwidth_gbs,
        hardware_threads=threads,
        source=source,
        notes=notes,
    )

