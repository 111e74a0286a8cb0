"""The device catalog: every entry internally consistent, names resolve, driver names match."""

from __future__ import annotations

import pytest

from portattn.devices import catalog
from portattn.spec import DTYPE_BYTES

MATRIX_DTYPES = set(DTYPE_BYTES) | {"tfloat32", "int8"}
ENTRIES = sorted(catalog.CATALOG.items())
GPU_ENTRIES = [(key, spec) for key, spec in ENTRIES if spec.kind == "gpu"]
CPU_ENTRIES = [(key, spec) for key, spec in ENTRIES if spec.kind == "cpu"]


@pytest.mark.parametrize("key, spec", ENTRIES, ids=[key for key, _ in ENTRIES])
def test_entry_is_internally_consistent(key, spec):
    assert key == key.lower() and " " not in key
    assert spec.kind in ("gpu", "cpu")
    assert spec.compute_units > 0
    assert 0 < spec.sram_per_block <= spec.sram_per_unit
    assert spec.registers_per_unit > 0
    assert 0 < spec.max_registers_per_thread <= spec.registers_per_unit
    assert spec.max_threads_per_block >= 1
    assert spec.source.strip()
    assert all(note.strip() for note in spec.notes)
    for size in (spec.l1_bytes, spec.l2_bytes, spec.l3_bytes, spec.memory_bytes, spec.memory_bandwidth_gbs):
        assert size is None or size > 0


@pytest.mark.parametrize("key, spec", ENTRIES, ids=[key for key, _ in ENTRIES])
def test_matrix_units_are_well_formed(key, spec):
    for unit in spec.matrix_units:
        assert min(unit.m, unit.n, unit.k) > 0
        assert unit.input_dtypes and set(unit.input_dtypes) <= MATRIX_DTYPES, unit
        assert unit.accumulate_dtype in MATRIX_DTYPES
        assert unit.scope in ("warp", "warpgroup", "wavefront", "sub-group", "simdgroup")


@pytest.mark.parametrize("key, spec", GPU_ENTRIES, ids=[key for key, _ in GPU_ENTRIES])
def test_gpu_entries(key, spec):
    assert spec.simd_width in (16, 32, 64)
    assert spec.max_threads_per_block >= spec.simd_width
    assert spec.matrix_unit_for("float16") is not None, "every catalogued GPU has an fp16 matrix unit"
    if spec.vendor == "nvidia":
        assert spec.compute_capability is not None
        major, minor = spec.compute_capability
        assert spec.arch == f"sm_{major}{minor}"
        assert spec.has_async_copy == (spec.compute_capability >= (8, 0))
    else:
        assert spec.compute_capability is None


@pytest.mark.parametrize("key, spec", CPU_ENTRIES, ids=[key for key, _ in CPU_ENTRIES])
def test_cpu_entries_follow_the_cpu_convention(key, spec):
    assert spec.simd_width in (4, 8, 16)
    assert spec.sram_per_block == spec.sram_per_unit == spec.l2_bytes
    assert spec.max_threads_per_block == 1
    assert spec.registers_per_unit == spec.max_registers_per_thread
    assert spec.registers_per_unit % spec.simd_width == 0
    assert spec.matrix_units == ()


def test_h100_matches_the_figures_seen_on_our_gpu_machine():
    h100 = catalog.CATALOG["h100"]
    assert h100.compute_capability == (9, 0)
    assert h100.compute_units == 132
    assert h100.sram_per_block == 232448
    assert h100.sram_per_unit == 228 * 1024
    assert h100.registers_per_unit == 65536
    assert h100.l2_bytes == 50 * 1024 * 1024
    largest = h100.matrix_unit_for("float16")
    assert (largest.name, largest.scope) == ("wgmma.m64n256k16", "warpgroup")
    assert any(unit.name == "mma.sync.m16n8k16" for unit in h100.matrix_units)


def test_volta_has_no_bf16_and_no_async_copy():
    v100 = catalog.CATALOG["v100"]
    assert v100.matrix_unit_for("bfloat16") is None
    assert not v100.has_async_copy
    assert {(u.m, u.n, u.k) for u in v100.matrix_units} == {(8, 8, 4), (16, 16, 16)}


@pytest.mark.parametrize(
    "capability, largest_fp16",
    [((6, 1), None), ((7, 0), (16, 16, 16)), ((7, 5), (16, 16, 16)), ((8, 0), (16, 8, 16)), ((8, 9), (16, 8, 16)),
     ((9, 0), (64, 256, 16)), ((10, 0), (16, 8, 16))],
)
def test_nvidia_matrix_units_by_compute_capability(capability, largest_fp16):
    units = [u for u in catalog.nvidia_matrix_units(capability) if u.supports("float16")]
    largest = max(units, key=lambda u: u.m * u.n * u.k, default=None)
    assert (None if largest is None else (largest.m, largest.n, largest.k)) == largest_fp16


def test_amd_matrix_units_by_gfx_target():
    assert catalog.amd_matrix_units("gfx1100") == ()
    cdna2 = catalog.amd_matrix_units("gfx90a:sramecc+:xnack-")
    assert {u.scope for u in cdna2} == {"wavefront"}
    assert not any(u.supports("tfloat32") for u in cdna2)
    assert any(u.supports("tfloat32") for u in catalog.amd_matrix_units("gfx942"))


@pytest.mark.parametrize(
    "name, key",
    [
        ("h100", "h100"),
        ("H100", "h100"),
        ("nvidia-h100", "h100"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("hopper", "h100"),
        ("a100-sxm4-80gb", "a100"),
        ("A100", "a100"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("volta", "v100"),
        ("t4", "t4"),
        ("h200", "h200"),
        ("MI250X", "mi250x"),
        ("gfx942", "mi300x"),
        ("max1550", "max1550"),
        ("Intel(R) Data Center GPU Max 1550", "max1550"),
        ("pvc", "max1550"),
        ("m2-max", "m2-max"),
        ("Apple M2 Max", "m2-max"),
        ("cpu", "x86-64-avx2"),
        ("CPU", "x86-64-avx2"),
        ("x86_64", "x86-64-avx2"),
        ("zen4", "zen4-epyc"),
        ("zen3-epyc", "zen3-epyc"),
        (" Zen4-EPYC ", "zen4-epyc"),
    ],
)
def test_lookup_accepts_keys_aliases_and_device_names(name, key):
    assert catalog.lookup(name) is catalog.CATALOG[key]


def test_lookup_accepts_each_entry_by_its_own_name():
    for spec in catalog.CATALOG.values():
        assert catalog.lookup(spec.name) is spec


@pytest.mark.parametrize("name", ["tpu-v5", "", "h1000", "NVIDIA GeForce RTX 4090"])
def test_lookup_of_an_unknown_name_raises_and_lists_known_devices(name):
    with pytest.raises(ValueError) as raised:
        catalog.lookup(name)
    message = str(raised.value)
    for key in ("h100", "v100", "mi300x", "x86-64-avx2"):
        assert key in message


@pytest.mark.parametrize(
    "probed_name, key",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 SXM5 80GB", "h100"),
        ("Tesla V100-SXM2-16GB", "v100"),
        ("Tesla V100-PCIE-32GB", "v100"),
        ("NVIDIA A100-SXM4-40GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("Tesla T4", "t4"),
        ("NVIDIA H200", "h200"),
        ("AMD Instinct MI250X / MI250", "mi250x"),
        ("AMD Instinct MI300X", "mi300x"),
        ("Intel(R) Data Center GPU Max 1550", "max1550"),
        ("Apple M2 Max", "m2-max"),
        ("AMD EPYC 9654 96-Core Processor", "zen4-epyc"),
        ("AMD EPYC 7763 64-Core Processor", "zen3-epyc"),
    ],
)
def test_match_finds_the_entry_for_names_probes_read(probed_name, key):
    assert catalog.match(probed_name) is catalog.CATALOG[key]


@pytest.mark.parametrize(
    "probed_name", ["pthread-AMD EPYC", "NVIDIA GeForce RTX 4090", "NVIDIA H100 PCIe", "Tesla T40", "gfx1100", ""]
)
def test_match_returns_none_for_devices_it_does_not_know(probed_name):
    assert catalog.match(probed_name) is None


def test_names_lists_every_key():
    assert catalog.names() == list(catalog.CATALOG)
    assert {"v100", "t4", "a100", "h100", "h200", "mi250x", "mi300x", "max1550", "x86-64-avx2", "zen4-epyc"} <= set(
        catalog.names()
    )
    assert catalog.GENERIC_CPU_KEY in catalog.CATALOG
