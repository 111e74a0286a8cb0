"""The catalog of known devices: published figures as ``DeviceSpec`` values, and name lookup.

This module owns the figures portattn knows without touching hardware: each entry cites the
documents its numbers come from (``source``) and says in ``notes`` where a figure is an estimate or
depends on the variant. The planner can plan for any entry on a machine that has none of them, and
``probe`` fills the figures a live device does not report from the entry ``match`` finds for it.

A GPU entry describes one device as its runtime exposes it: one GCD of an MI250X and one stack of a
Data Center GPU Max, since that is what a kernel launch sees. The matrix-unit tables for NVIDIA
compute capabilities and AMD gfx targets live here too, so catalog entries and probed devices
derive them the same way.
"""

from __future__ import annotations

import re

from .description import DeviceSpec, MatrixUnit, cpu_device

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# Every CUDA device since compute capability 3.5 lets one thread address at most 255 registers,
# and every one since 2.0 allows 1024 threads per block (CUDA C++ Programming Guide, table of
# technical specifications per compute capability).
NVIDIA_MAX_REGISTERS_PER_THREAD = 255
NVIDIA_MAX_THREADS_PER_BLOCK = 1024

_HALF_TYPES = ("float16", "bfloat16")


def nvidia_matrix_units(compute_capability: tuple[int, int]) -> tuple[MatrixUnit, ...]:
    """The tensor-core instruction shapes a CUDA device of this compute capability offers (PTX ISA).

    Volta's ``mma.m8n8k4`` is reached through WMMA 16x16x16 fragments; Turing adds the m16n8k8 form;
    Ampere and later have m16n8k16 on fp16/bf16 and m16n8k8 on tf32; Hopper (sm_90) adds the
    warpgroup-wide ``wgmma``. Blackwell's ``tcgen05`` is left out: it is not a warp instruction and
    no backend here issues it, while sm_100+ still runs the m16n8k16 ``mma.sync``.
    """
    if compute_capability < (7, 0):
        return ()
    if compute_capability < (7, 5):
        return (
            MatrixUnit("mma.sync.m8n8k4", 8, 8, 4, ("float16",)),
            MatrixUnit("wmma.m16n16k16", 16, 16, 16, ("float16",)),
        )
    if compute_capability < (8, 0):
        return (
            MatrixUnit("mma.sync.m16n8k8", 16, 8, 8, ("float16",)),
            MatrixUnit("wmma.m16n16k16", 16, 16, 16, ("float16",)),
        )
    units = (
        MatrixUnit("mma.sync.m16n8k16", 16, 8, 16, _HALF_TYPES),
        MatrixUnit("mma.sync.m16n8k8.tf32", 16, 8, 8, ("tfloat32",)),
    )
    if compute_capability[0] == 9:
        units += (
            MatrixUnit("wgmma.m64n256k16", 64, 256, 16, _HALF_TYPES, scope="warpgroup"),
            MatrixUnit("wgmma.m64n256k8.tf32", 64, 256, 8, ("tfloat32",), scope="warpgroup"),
        )
    return units


def nvidia_has_async_copy(compute_capability: tuple[int, int]) -> bool:
    """``cp.async`` arrived with Ampere (sm_80); Hopper adds TMA on top."""
    return compute_capability >= (8, 0)


def amd_matrix_units(gfx_target: str) -> tuple[MatrixUnit, ...]:
    """The MFMA shapes of a CDNA target (AMD Instinct MI200 / CDNA3 ISA references), by gfx name."""
    target = gfx_target.split(":")[0].lower()
    if target not in ("gfx90a", "gfx940", "gfx941", "gfx942", "gfx950"):
        return ()
    units = (
        MatrixUnit("v_mfma_f32_32x32x8_f16", 32, 32, 8, ("float16",), scope="wavefront"),
        MatrixUnit("v_mfma_f32_32x32x8_bf16", 32, 32, 8, ("bfloat16",), scope="wavefront"),
        MatrixUnit("v_mfma_f32_16x16x16_f16", 16, 16, 16, _HALF_TYPES, scope="wavefront"),
        MatrixUnit("v_mfma_f32_32x32x2_f32", 32, 32, 2, ("float32",), scope="wavefront"),
    )
    if target in ("gfx940", "gfx941", "gfx942"):
        # CDNA3's xf32 is a reduced-precision fp32 input like tf32; CDNA4 (gfx950) dropped it.
        units += (MatrixUnit("v_mfma_f32_32x32x4_xf32", 32, 32, 4, ("tfloat32",), scope="wavefront"),)
    return units


def _nvidia(
    name: str,
    compute_capability: tuple[int, int],
    *,
    sms: int,
    smem_per_block: int,
    smem_per_sm: int,
    l1_per_sm: int,
    l2: int,
    memory: int,
    bandwidth_gbs: float,
    source: str,
    notes: tuple[str, ...] = (),
) -> DeviceSpec:
    """An NVIDIA entry: the figures that differ per product, the rest derived from the capability."""
    major, minor = compute_capability
    return DeviceSpec(
        name=name,
        vendor="nvidia",
        kind="gpu",
        arch=f"sm_{major}{minor}",
        compute_units=sms,
        simd_width=32,
        sram_per_block=smem_per_block,
        sram_per_unit=smem_per_sm,
        registers_per_unit=65536,  # 64K 32-bit registers per SM on every capability listed here
        max_registers_per_thread=NVIDIA_MAX_REGISTERS_PER_THREAD,
        max_threads_per_block=NVIDIA_MAX_THREADS_PER_BLOCK,
        matrix_units=nvidia_matrix_units(compute_capability),
        compute_capability=compute_capability,
        has_async_copy=nvidia_has_async_copy(compute_capability),
        l1_bytes=l1_per_sm,
        l2_bytes=l2,
        memory_bytes=memory,
        memory_bandwidth_gbs=bandwidth_gbs,
        source=source,
        notes=notes,
    )


_CUDA_GUIDE = "CUDA C++ Programming Guide, technical specifications per compute capability"

V100 = _nvidia(
    "NVIDIA Tesla V100 SXM2 16GB",
    (7, 0),
    sms=80,
    smem_per_block=96 * KIB,
    smem_per_sm=96 * KIB,
    l1_per_sm=128 * KIB,
    l2=6 * MIB,
    memory=16 * GIB,
    bandwidth_gbs=900.0,
    source=(
        "NVIDIA Tesla V100 GPU Architecture whitepaper (WP-08608-001); "
        f"{_CUDA_GUIDE} (7.0); PTX ISA (mma.m8n8k4, wmma.m16n16k16)"
    ),
    notes=(
        "no bf16 and no cp.async; mma.m8n8k4 runs per quad-pair, WMMA exposes it as 16x16x16 fragments",
        "l1_bytes is the combined L1/shared-memory array per SM; the 32GB variant has the same SM figures",
    ),
)

T4 = _nvidia(
    "NVIDIA Tesla T4",
    (7, 5),
    sms=40,
    smem_per_block=64 * KIB,
    smem_per_sm=64 * KIB,
    l1_per_sm=96 * KIB,
    l2=4 * MIB,
    memory=16 * GIB,
    bandwidth_gbs=320.0,
    source=f"NVIDIA Turing GPU Architecture whitepaper; NVIDIA T4 datasheet; {_CUDA_GUIDE} (7.5); PTX ISA",
    notes=(
        "compute capability 7.5 runs at most 1024 threads per SM, half of Volta's and Ampere's",
        "l1_bytes is the combined L1/shared-memory array per SM",
    ),
)

A100 = _nvidia(
    "NVIDIA A100 SXM4 80GB",
    (8, 0),
    sms=108,
    smem_per_block=163 * KIB,
    smem_per_sm=164 * KIB,
    l1_per_sm=192 * KIB,
    l2=40 * MIB,
    memory=80 * GIB,
    bandwidth_gbs=2039.0,
    source=(
        "NVIDIA A100 Tensor Core GPU Architecture whitepaper; NVIDIA A100 80GB datasheet; "
        f"{_CUDA_GUIDE} (8.0); PTX ISA"
    ),
    notes=(
        "the 40GB SXM4 variant has the same SM figures with 1555 GB/s; PCIe variants differ in bandwidth",
        "l1_bytes is the combined L1/shared-memory array per SM",
    ),
)

H100 = _nvidia(
    "NVIDIA H100 SXM5 80GB",
    (9, 0),
    sms=132,
    smem_per_block=227 * KIB,
    smem_per_sm=228 * KIB,
    l1_per_sm=256 * KIB,
    l2=50 * MIB,
    memory=80 * GIB,
    bandwidth_gbs=3350.0,
    source=(
        "NVIDIA H100 Tensor Core GPU Architecture whitepaper; NVIDIA H100 datasheet; "
        f"{_CUDA_GUIDE} (9.0); PTX ISA (wgmma); SM count, shared memory and L2 confirmed on our H100"
    ),
    notes=(
        "has TMA and distributed shared memory as well as cp.async",
        "the H100 PCIe (114 SMs, 2.0 TB/s) is not this entry: match() leaves it unknown",
        "l1_bytes is the combined L1/shared-memory array per SM",
    ),
)

H200 = _nvidia(
    "NVIDIA H200 SXM 141GB",
    (9, 0),
    sms=132,
    smem_per_block=227 * KIB,
    smem_per_sm=228 * KIB,
    l1_per_sm=256 * KIB,
    l2=50 * MIB,
    memory=141 * 10**9,
    bandwidth_gbs=4800.0,
    source=f"NVIDIA H200 Tensor Core GPU datasheet; H100 whitepaper for the Hopper SM; {_CUDA_GUIDE} (9.0)",
    notes=(
        "same Hopper die as the H100 SXM5 with 141 GB of HBM3e; memory_bytes is the marketed capacity",
        "l1_bytes is the combined L1/shared-memory array per SM",
    ),
)


def _amd_cdna(
    name: str,
    gfx_target: str,
    *,
    cus: int,
    l1_per_cu: int,
    l2: int,
    l3: int | None,
    memory: int,
    bandwidth_gbs: float,
    source: str,
    notes: tuple[str, ...],
) -> DeviceSpec:
    """A CDNA entry: 64-wide wavefronts, 64 KiB LDS and a 512 KiB VGPR file per CU on CDNA2 and 3."""
    return DeviceSpec(
        name=name,
        vendor="amd",
        kind="gpu",
        arch=gfx_target,
        compute_units=cus,
        simd_width=64,
        sram_per_block=64 * KIB,
        sram_per_unit=64 * KIB,
        registers_per_unit=512 * KIB // 4,
        # 256 architectural VGPRs plus 256 accumulation VGPRs (AGPRs) per lane.
        max_registers_per_thread=512,
        max_threads_per_block=1024,
        matrix_units=amd_matrix_units(gfx_target),
        l1_bytes=l1_per_cu,
        l2_bytes=l2,
        l3_bytes=l3,
        memory_bytes=memory,
        memory_bandwidth_gbs=bandwidth_gbs,
        source=source,
        notes=notes,
    )


_ROCM_SPECS = "AMD ROCm documentation, GPU specifications table"

MI250X = _amd_cdna(
    "AMD Instinct MI250X",
    "gfx90a",
    cus=110,
    l1_per_cu=16 * KIB,
    l2=8 * MIB,
    l3=None,
    memory=64 * GIB,
    bandwidth_gbs=1638.4,
    source=(
        f"{_ROCM_SPECS} (gfx90a: 110 CUs and 8 MB L2 per GCD, 64 KiB LDS, 512 KiB VGPR file); "
        "AMD CDNA 2 architecture whitepaper; AMD Instinct MI250X data sheet; AMD Instinct MI200 ISA (MFMA)"
    ),
    notes=(
        "one GCD: the MI250X package holds two, which ROCm exposes as two devices "
        "(package totals 220 CUs, 128 GB HBM2e, 3.2 TB/s)",
        "max_registers_per_thread counts 256 VGPRs plus 256 AccVGPRs; a kernel using all 512 runs one wave per SIMD",
    ),
)

MI300X = _amd_cdna(
    "AMD Instinct MI300X",
    "gfx942",
    cus=304,
    l1_per_cu=32 * KIB,
    l2=32 * MIB,
    l3=256 * MIB,
    memory=192 * GIB,
    bandwidth_gbs=5300.0,
    source=(
        f"{_ROCM_SPECS} (gfx942: 304 CUs, 4 MB L2 per XCD, 256 MB Infinity Cache, 64 KiB LDS, "
        "512 KiB VGPR file); AMD CDNA 3 architecture whitepaper; AMD Instinct MI300X data sheet; AMD CDNA3 ISA"
    ),
    notes=(
        "eight XCDs of 38 CUs; each XCD's CUs share 4 MB of L2, so l2_bytes (the sum) overstates what one CU sees",
        "figures for the default SPX partition mode (one device); CPX mode exposes each XCD as a device",
        "l3_bytes is the Infinity Cache (memory-side, shared by all XCDs)",
    ),
)

MAX1550 = DeviceSpec(
    name="Intel Data Center GPU Max 1550",
    vendor="intel",
    kind="gpu",
    arch="xe-hpc",
    compute_units=64,  # Xe-cores per stack
    simd_width=16,
    sram_per_block=128 * KIB,
    sram_per_unit=128 * KIB,
    # 8 vector engines x 8 hardware threads x 128 GRF registers x 64 bytes per Xe-core.
    registers_per_unit=8 * 8 * 128 * 64 // 4,
    # A SIMD16 hardware thread owns 128 x 64-byte GRFs: 128 32-bit registers per work-item
    # (256 in large-GRF mode, at half the threads).
    max_registers_per_thread=128,
    max_threads_per_block=1024,
    matrix_units=(
        MatrixUnit("dpas.8x16x16", 8, 16, 16, _HALF_TYPES, scope="sub-group"),
        MatrixUnit("dpas.8x16x8.tf32", 8, 16, 8, ("tfloat32",), scope="sub-group"),
    ),
    l1_bytes=512 * KIB,
    l2_bytes=204 * MIB,
    memory_bytes=64 * GIB,
    memory_bandwidth_gbs=1638.4,
    source=(
        "Intel oneAPI GPU Optimization Guide (Xe-HPC Xe-core: 8 vector engines, 8 threads x 128 GRF, "
        "512 KB L1/SLM); Intel GPU Occupancy Calculator (xe_hpc_pvc: 128 KB SLM per work-group, "
        "work-groups up to 1024, sub-groups 16/32); Intel Data Center GPU Max 1550 product specifications "
        "(128 Xe-cores, 408 MB L2, 128 GB HBM2e, 3.2768 TB/s); DPAS shape m=8, n=16, k=8x32/bits "
        "(Intel ESIMD xmx::dpas and MLIR XeGPU dpas documentation)"
    ),
    notes=(
        "one stack, the device a kernel sees under the default FLAT device hierarchy; "
        "the card holds two (totals 128 Xe-cores, 408 MB L2, 128 GB, 3.2768 TB/s)",
        "sub-group width 32 is also supported; 16 is the width DPAS uses",
        "l1_bytes is the 512 KB L1 array per Xe-core that the 128 KB of SLM is carved from",
    ),
)

M2_MAX = DeviceSpec(
    name="Apple M2 Max",
    vendor="apple",
    kind="gpu",
    arch="apple-m2",
    compute_units=38,
    simd_width=32,
    sram_per_block=32 * KIB,
    sram_per_unit=64 * KIB,
    registers_per_unit=384 * KIB // 4,
    max_registers_per_thread=128,
    max_threads_per_block=1024,
    matrix_units=(MatrixUnit("simdgroup_matrix.8x8x8", 8, 8, 8, ("float16", "float32"), scope="simdgroup"),),
    memory_bytes=96 * GIB,
    memory_bandwidth_gbs=400.0,
    source=(
        "Apple Metal Feature Set Tables (Apple8 family: 32 KiB threadgroup memory, 1024 threads per "
        "threadgroup, SIMD-group width 32); Metal Shading Language Specification (simdgroup_matrix 8x8, "
        "half and float); Apple M2 Max announcement (38-core GPU, 400 GB/s, up to 96 GB); per-core register "
        "file and threadgroup SRAM from philipturner/metal-benchmarks (third-party microbenchmarks)"
    ),
    notes=(
        "the 38-core configuration; the binned M2 Max has 30 GPU cores",
        "registers_per_unit (384 KB per core), sram_per_unit (64 KB per core) and max_registers_per_thread "
        "(128) are third-party estimates: Apple does not publish them",
        "GPU cache sizes are not published; l2_bytes and l3_bytes are left unset",
        "memory is unified with the CPU; memory_bytes is the largest configuration",
        "no bf16 simdgroup_matrix assumed (Metal 3.1 bfloat on this family is not confirmed here)",
    ),
)


GENERIC_X86_AVX2 = cpu_device(
    "Generic x86-64 (AVX2)",
    "x86",
    "x86-64-avx2",
    cores=8,
    lanes=8,
    vector_registers=16,
    l1d=32 * KIB,
    l2_per_core=1 * MIB,
    l3=None,
    threads=None,
    bandwidth_gbs=None,
    source=(
        "Intel 64 and IA-32 Architectures Software Developer's Manual (AVX2: 16 YMM registers of 8 fp32 "
        "lanes in 64-bit mode); cache sizes are representative of recent cores, not one product"
    ),
    notes=(
        "a stand-in used when a probe cannot read a figure: 8 cores, 32 KiB L1d and 1 MiB L2 per core are "
        "typical, not measured (older Intel client cores have 256 KiB L2)",
    ),
)

ZEN3_EPYC = cpu_device(
    "AMD EPYC 7763 (Zen 3)",
    "amd",
    "x86-64-avx2",
    cores=64,
    lanes=8,
    vector_registers=16,
    l1d=32 * KIB,
    l2_per_core=512 * KIB,
    l3=256 * MIB,
    threads=128,
    bandwidth_gbs=204.8,
    source=(
        "AMD EPYC 7003 series product specifications (EPYC 7763: 64 cores, 256 MB L3, 8 channels DDR4-3200); "
        "Software Optimization Guide for AMD EPYC 7003 Processors (Zen 3: 32 KB L1d, 512 KB L2 per core)"
    ),
    notes=("L3 is 32 MiB per 8-core CCD; l3_bytes is the socket total of eight CCDs", "no AVX-512 on Zen 3"),
)

ZEN4_EPYC = cpu_device(
    "AMD EPYC 9654 (Zen 4)",
    "amd",
    "x86-64-avx512",
    cores=96,
    lanes=16,
    vector_registers=32,
    l1d=32 * KIB,
    l2_per_core=1 * MIB,
    l3=384 * MIB,
    threads=192,
    bandwidth_gbs=460.8,
    source=(
        "AMD EPYC 9004 series product specifications (EPYC 9654: 96 cores, 384 MB L3, 12 channels DDR5-4800); "
        "Software Optimization Guide for AMD Family 19h Processors, Zen 4 (32 KB L1d, 1 MB L2 per core, "
        "AVX-512 with 32 ZMM registers)"
    ),
    notes=(
        "L3 is 32 MiB per 8-core CCD; l3_bytes is the socket total of twelve CCDs",
        "Zen 4 executes most 512-bit operations as two 256-bit halves: 16 lanes per register, 8 per cycle",
    ),
)

CATALOG: dict[str, DeviceSpec] = {
    "v100": V100,
    "t4": T4,
    "a100": A100,
    "h100": H100,
    "h200": H200,
    "mi250x": MI250X,
    "mi300x": MI300X,
    "max1550": MAX1550,
    "m2-max": M2_MAX,
    "x86-64-avx2": GENERIC_X86_AVX2,
    "zen3-epyc": ZEN3_EPYC,
    "zen4-epyc": ZEN4_EPYC,
}

# The entry a CPU probe falls back on for any figure it cannot read.
GENERIC_CPU_KEY = "x86-64-avx2"

# Short names people type, normalized as ``_normalize`` leaves them.
_ALIASES: dict[str, str] = {
    "cpu": GENERIC_CPU_KEY,
    "x86": GENERIC_CPU_KEY,
    "x86-64": GENERIC_CPU_KEY,
    "avx2": GENERIC_CPU_KEY,
    "generic-x86": GENERIC_CPU_KEY,
    "zen3": "zen3-epyc",
    "epyc-7763": "zen3-epyc",
    "zen4": "zen4-epyc",
    "epyc-9654": "zen4-epyc",
    "avx512": "zen4-epyc",
    "volta": "v100",
    "sm70": "v100",
    "sm-70": "v100",
    "turing": "t4",
    "sm75": "t4",
    "sm-75": "t4",
    "ampere": "a100",
    "sm80": "a100",
    "sm-80": "a100",
    "hopper": "h100",
    "sm90": "h100",
    "sm-90": "h100",
    "gfx90a": "mi250x",
    "gfx942": "mi300x",
    "pvc": "max1550",
    "ponte-vecchio": "max1550",
    "xe-hpc": "max1550",
    "max-1550": "max1550",
    "m2max": "m2-max",
    "apple-m2-max": "m2-max",
}

# Patterns for the names drivers report ("NVIDIA H100 80GB HBM3", "Tesla V100-SXM2-16GB",
# "AMD Instinct MI250X / MI250", "Intel(R) Data Center GPU Max 1550"), tried in order on the
# lowercased name. Word boundaries keep "t4" from matching inside other names.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bh200\b", "h200"),
    # The H100 PCIe (114 SMs, 2.0 TB/s) is a different part: better unknown than wrongly matched.
    (r"\bh100\b(?!.*\bpcie\b)", "h100"),
    (r"\ba100\b", "a100"),
    (r"\bv100\b", "v100"),
    (r"\bt4\b", "t4"),
    (r"\bmi250x\b", "mi250x"),
    (r"\bmi300x\b", "mi300x"),
    (r"\bmax[\s-]*1550\b", "max1550"),
    (r"\bm2[\s-]*max\b", "m2-max"),
    # EPYC model numbers: 9xx4 is Genoa (Zen 4), 7xx3 is Milan (Zen 3).
    (r"\bepyc\s+9\d\d4", "zen4-epyc"),
    (r"\bepyc\s+7\d\d3", "zen3-epyc"),
)


def _normalize(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def names() -> list[str]:
    """The catalog keys, in catalog order."""
    return list(CATALOG)


def match(device_name: str) -> DeviceSpec | None:
    """The entry for a name read off a live device, or None when the catalog does not know it."""
    lowered = device_name.lower()
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, lowered):
            return CATALOG[key]
    return None


def lookup(name: str) -> DeviceSpec:
    """The entry for a key, an alias or a device name, case-insensitively.

    Raises ``ValueError`` naming every known device when nothing matches.
    """
    normalized = _normalize(name)
    if normalized in CATALOG:
        return CATALOG[normalized]
    if normalized in _ALIASES:
        return CATALOG[_ALIASES[normalized]]
    for spec in CATALOG.values():
        if spec.key == normalized:
            return spec
    # "nvidia-h100", "a100-sxm4-80gb": the vendor prefix and variant suffixes go through ``match``
    # once the dashes are spaces again.
    found = match(normalized.replace("-", " "))
    if found is not None:
        return found
    raise ValueError(
        f"unknown device {name!r}; known devices: {', '.join(names())} "
        f"(aliases: {', '.join(sorted(_ALIASES))})"
    )
