"""Device probes: the real host CPU, a faked /proc and /sys, faked torch/cupy, and PoCL's OpenCL CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from portattn.devices import catalog, probe
from portattn.devices.description import DeviceSpec

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_probes():
    """Probes are cached per process; each test starts and ends with an empty cache."""
    probe.clear_cache()
    yield
    probe.clear_cache()


def _host_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


# ---------------------------------------------------------------------------------------------
# module hygiene


def test_importing_probe_imports_no_gpu_framework():
    code = (
        "import sys, portattn.devices.probe\n"
        "loaded = [m for m in ('torch', 'cupy', 'pyopencl', 'numba', 'triton') if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT)}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


# ---------------------------------------------------------------------------------------------
# the real host CPU


def test_probe_cpu_reads_this_host():
    spec = probe.probe_cpu()
    assert isinstance(spec, DeviceSpec)
    assert spec.kind == "cpu"
    assert spec.compute_units >= 1
    assert spec.hardware_threads is None or spec.hardware_threads >= spec.compute_units
    assert spec.simd_width in (4, 8, 16)
    assert spec.sram_per_block == spec.sram_per_unit == spec.l2_bytes > 0
    assert spec.registers_per_unit == spec.max_registers_per_thread > 0
    assert spec.max_threads_per_block == 1
    assert spec.source.startswith("probed")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_probe_cpu_simd_width_follows_the_cpu_flags():
    flags = _host_flags()
    expected = 16 if "avx512f" in flags else 8 if "avx2" in flags or "avx" in flags else 4
    assert probe.probe_cpu().simd_width == expected


def test_probe_cpu_is_cached():
    assert probe.probe_cpu() is probe.probe_cpu()
    assert probe.probe("cpu") is probe.probe_cpu()


# ---------------------------------------------------------------------------------------------
# a faked /proc and /sys


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


FAKE_CPUINFO = "\n\n".join(
    textwrap.dedent(
        f"""\
        processor\t: {cpu}
        vendor_id\t: GenuineIntel
        model name\t: Fake Xeon 9999
        physical id\t: 0
        core id\t: {cpu % 2}
        flags\t\t: fpu sse2 avx avx2 avx512f
        """
    )
    for cpu in range(4)
)


def _fake_sys(root: Path) -> Path:
    """Two cores with two SMT threads each (cpu0+cpu2, cpu1+cpu3), private L1/L2, L3 per core pair."""
    sys_cpu = root / "sys-cpu"
    _write(sys_cpu / "online", "0-3\n")
    for cpu in range(4):
        siblings = f"{cpu % 2},{cpu % 2 + 2}\n"
        _write(sys_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list", siblings)
        caches = [(1, "Data", "48K", siblings), (1, "Instruction", "32K", siblings), (2, "Unified", "2048K", siblings),
                  # Two L3 instances of 16 MiB, one per core, so the total must be 32 MiB.
                  (3, "Unified", "16384K", siblings)]
        for index, (level, kind, size, shared) in enumerate(caches):
            leaf = sys_cpu / f"cpu{cpu}" / "cache" / f"index{index}"
            _write(leaf / "level", f"{level}\n")
            _write(leaf / "type", f"{kind}\n")
            _write(leaf / "size", f"{size}\n")
            _write(leaf / "shared_cpu_list", shared)
    return sys_cpu


@pytest.fixture
def fake_os(tmp_path, monkeypatch):
    """Points the probe at files under tmp_path; affinity says all four fake CPUs are usable."""
    monkeypatch.setattr(probe.cpu, "PROC_CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(probe.cpu, "SYS_CPU_DIR", tmp_path / "sys-cpu")
    monkeypatch.setattr(probe.cpu, "CGROUP_V2_CPU_MAX", tmp_path / "cgroup" / "cpu.max")
    monkeypatch.setattr(probe.cpu, "CGROUP_V1_CPU_DIR", tmp_path / "cgroup-v1")
    monkeypatch.setattr(probe.cpu, "_usable_cpus", lambda: {0, 1, 2, 3})
    return tmp_path


def test_probe_cpu_reads_a_complete_fake_tree(fake_os):
    _write(fake_os / "cpuinfo", FAKE_CPUINFO)
    _fake_sys(fake_os)
    spec = probe.probe_cpu()
    assert spec.name == "Fake Xeon 9999"
    assert spec.vendor == "intel"
    assert spec.compute_units == 2
    assert spec.hardware_threads == 4
    assert spec.simd_width == 16
    assert spec.registers_per_unit == 32 * 16
    assert spec.l1_bytes == 48 * 1024
    assert spec.l2_bytes == spec.sram_per_block == spec.sram_per_unit == 2 * 1024 * 1024
    assert spec.l3_bytes == 32 * 1024 * 1024
    assert spec.notes == ()


@pytest.mark.parametrize(
    "version, files, usable_threads",
    [
        ("v2", {"cgroup/cpu.max": "150000 100000\n"}, 2),
        ("v2", {"cgroup/cpu.max": "max 100000\n"}, 4),
        ("v1", {"cgroup-v1/cpu.cfs_quota_us": "100000\n", "cgroup-v1/cpu.cfs_period_us": "100000\n"}, 1),
        ("v1", {"cgroup-v1/cpu.cfs_quota_us": "-1\n", "cgroup-v1/cpu.cfs_period_us": "100000\n"}, 4),
    ],
)
def test_probe_cpu_respects_the_cgroup_cpu_quota(fake_os, version, files, usable_threads):
    _write(fake_os / "cpuinfo", FAKE_CPUINFO)
    _fake_sys(fake_os)
    for relative, text in files.items():
        _write(fake_os / relative, text)
    spec = probe.probe_cpu()
    assert spec.hardware_threads == usable_threads
    assert spec.compute_units == min(2, usable_threads)


def test_probe_cpu_falls_back_to_the_generic_entry_with_notes(fake_os):
    # Nothing under tmp_path exists: no cpuinfo, no /sys, no cgroup files.
    generic = catalog.CATALOG[catalog.GENERIC_CPU_KEY]
    spec = probe.probe_cpu()
    assert spec.kind == "cpu"
    assert spec.simd_width == generic.simd_width
    assert spec.l2_bytes == spec.sram_per_block == generic.l2_bytes
    assert spec.l1_bytes == generic.l1_bytes
    # Affinity still names four usable CPUs, so those count as cores rather than the generic 8.
    assert spec.compute_units == 4
    notes = " | ".join(spec.notes)
    assert "L2 size per core not readable" in notes and "1 MiB" in notes
    assert "L1d size per core not readable" in notes
    assert "CPU flags not readable" in notes
    assert "topology not readable" in notes


def test_probe_cpu_survives_malformed_files(fake_os):
    _write(fake_os / "cpuinfo", "garbage without colons\n\nflags : \n")
    sys_cpu = _fake_sys(fake_os)
    _write(sys_cpu / "cpu0" / "cache" / "index2" / "size", "lots\n")
    _write(sys_cpu / "online", "x-y\n")
    _write(fake_os / "cgroup" / "cpu.max", "nonsense\n")
    spec = probe.probe_cpu()
    assert spec.simd_width == 4  # flags readable but empty: the narrowest vector
    assert spec.l2_bytes == catalog.CATALOG[catalog.GENERIC_CPU_KEY].l2_bytes
    assert any("L2 size per core not readable" in note for note in spec.notes)


def test_probe_cpu_on_macos_reads_sysctl(fake_os, monkeypatch):
    answers = {
        "machdep.cpu.brand_string": "Apple M2 Max",
        "hw.physicalcpu": "12",
        "hw.logicalcpu": "12",
        "hw.perflevel0.l1dcachesize": "131072",
        "hw.perflevel0.l2cachesize": "16777216",
        "hw.optional.neon": "1",
    }
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(probe.cpu, "_usable_cpus", lambda: None)
    monkeypatch.setattr(probe.cpu, "_sysctl", answers.get)
    spec = probe.probe_cpu()
    assert (spec.name, spec.vendor, spec.compute_units) == ("Apple M2 Max", "apple", 12)
    assert spec.simd_width == 4
    assert spec.l1_bytes == 128 * 1024 and spec.l2_bytes == spec.sram_per_block == 16 * 1024 * 1024


def test_probe_cpu_borrows_unread_figures_from_its_own_catalog_entry(fake_os):
    _write(fake_os / "cpuinfo", FAKE_CPUINFO.replace("Fake Xeon 9999", "AMD EPYC 9654 96-Core Processor"))
    spec = probe.probe_cpu()
    zen4 = catalog.CATALOG["zen4-epyc"]
    assert spec.l2_bytes == zen4.l2_bytes and spec.l3_bytes == zen4.l3_bytes
    assert spec.memory_bandwidth_gbs == zen4.memory_bandwidth_gbs
    assert any(zen4.name in note for note in spec.notes)


# ---------------------------------------------------------------------------------------------
# CUDA through faked torch and cupy modules


def _fake_torch(properties: types.SimpleNamespace, *, hip: str | None = None) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.__version__ = "0.0-fake"
    torch.version = types.SimpleNamespace(hip=hip, cuda=None if hip else "12.0")
    torch.cuda = types.SimpleNamespace(
        is_available=lambda: True, device_count=lambda: 1, get_device_properties=lambda index: properties
    )
    return torch


H100_PROPERTIES = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3",
    major=9,
    minor=0,
    multi_processor_count=132,
    total_memory=85_000_000_000,
    L2_cache_size=50 * 1024 * 1024,
    shared_memory_per_block=48 * 1024,
    shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472,
    regs_per_multiprocessor=65536,
    max_threads_per_multi_processor=2048,
    warp_size=32,
)


def test_probe_cuda_raises_without_torch_or_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(RuntimeError, match="torch is not installed.*cupy is not installed"):
        probe.probe_cuda()


def test_probe_cuda_through_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(H100_PROPERTIES))
    spec = probe.probe_cuda(0)
    assert (spec.vendor, spec.kind, spec.arch, spec.compute_capability) == ("nvidia", "gpu", "sm_90", (9, 0))
    assert spec.compute_units == 132
    assert spec.sram_per_block == 232448 and spec.sram_per_unit == 233472
    assert spec.l2_bytes == 50 * 1024 * 1024
    assert spec.has_async_copy
    assert spec.matrix_unit_for("bfloat16").scope == "warpgroup"
    # Bandwidth and L1 are not in torch's properties: they come from the catalog, with a note.
    assert spec.memory_bandwidth_gbs == catalog.CATALOG["h100"].memory_bandwidth_gbs
    assert any("memory_bandwidth_gbs" in note and "catalog" in note for note in spec.notes)


def test_probe_cuda_through_an_old_torch_missing_attributes(monkeypatch):
    old = types.SimpleNamespace(name="Tesla V100-SXM2-16GB", major=7, minor=0, multi_processor_count=80,
                                total_memory=16 * 1024**3, warp_size=32)
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(old))
    spec = probe.probe_cuda(0)
    v100 = catalog.CATALOG["v100"]
    assert spec.sram_per_block == v100.sram_per_block
    assert spec.registers_per_unit == v100.registers_per_unit
    assert spec.l2_bytes == v100.l2_bytes
    assert not spec.has_async_copy and spec.matrix_unit_for("bfloat16") is None
    assert any("sram_per_block" in note for note in spec.notes)


def test_probe_cuda_through_cupy_when_torch_is_absent(monkeypatch):
    properties = {
        "name": b"NVIDIA A100-SXM4-40GB", "major": 8, "minor": 0, "multiProcessorCount": 108,
        "totalGlobalMem": 40 * 1024**3, "l2CacheSize": 40 * 1024**2, "sharedMemPerBlock": 49152,
        "sharedMemPerBlockOptin": 166912, "sharedMemPerMultiprocessor": 167936, "regsPerMultiprocessor": 65536,
        "maxThreadsPerBlock": 1024, "warpSize": 32, "memoryClockRate": 1215000, "memoryBusWidth": 5120,
    }
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "0.0-fake"
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda index: properties)
    )
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    spec = probe.probe_cuda(0)
    assert spec.name == "NVIDIA A100-SXM4-40GB"
    assert spec.arch == "sm_80" and spec.sram_per_block == 166912
    assert spec.memory_bandwidth_gbs == pytest.approx(1555.2)  # read from the device, not the 80GB entry
    with pytest.raises(RuntimeError, match="no CUDA device 3"):
        probe.probe_cuda(3)


def test_probe_cuda_on_rocm_reads_the_gfx_target(monkeypatch):
    mi250x = types.SimpleNamespace(name="AMD Instinct MI250X / MI250", major=9, minor=0, multi_processor_count=110,
                                   total_memory=64 * 1024**3, warp_size=64, gcnArchName="gfx90a:sramecc+:xnack-",
                                   shared_memory_per_block=65536)
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(mi250x, hip="6.0"))
    spec = probe.probe_cuda(0)
    assert (spec.vendor, spec.arch, spec.simd_width, spec.compute_capability) == ("amd", "gfx90a", 64, None)
    assert spec.matrix_unit_for("float16").scope == "wavefront"


def _cuda_visible() -> bool:
    try:
        return probe.cuda_device_count() > 0
    except RuntimeError:
        return False


@pytest.mark.skipif(_cuda_visible(), reason="a CUDA device is visible: probe_cuda succeeds here")
def test_probe_cuda_raises_runtime_error_without_a_gpu():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        probe.probe_cuda()


# ---------------------------------------------------------------------------------------------
# OpenCL


def _opencl_devices() -> list[DeviceSpec]:
    pytest.importorskip("pyopencl", reason="pyopencl is not installed")
    try:
        return probe.probe_opencl()
    except RuntimeError as error:
        pytest.skip(f"pyopencl is installed but found no OpenCL device: {error}")


def test_probe_opencl_raises_without_pyopencl(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyopencl", None)
    with pytest.raises(RuntimeError, match="pyopencl is not installed"):
        probe.probe_opencl()


def test_probe_opencl_finds_a_cpu_device():
    devices = _opencl_devices()
    cpus = [spec for spec in devices if spec.kind == "cpu"]
    if not cpus:
        pytest.skip("no OpenCL CPU device (PoCL) on this machine")
    for spec in cpus:
        assert spec.compute_units >= 1
        assert spec.simd_width >= 1
        assert 0 < spec.sram_per_block <= spec.sram_per_unit
        assert spec.max_threads_per_block >= 1
        assert spec.memory_bytes and spec.memory_bytes > 0
        assert spec.arch.startswith("opencl-")


@pytest.mark.parametrize("log, lanes", [
    ("warning: AVX vector argument of type '__private float16' without 'avx512f' enabled changes the ABI", 8),
    ("error: unknown target CPU 'generic'", 8),
    ("", 16),
])
def test_opencl_cpu_lanes_fall_to_8_when_the_compiler_cannot_pass_16(monkeypatch, log, lanes):
    """PoCL 3.0's wheel on AMD Zen 4 reports 16 lanes but builds 16-lane kernels that fail to load or crash:
    the probe's child-process build log decides (a faked child here; the real one runs in the test above)."""
    from portattn.devices.probe import opencl as probe_opencl

    ran = []

    def child(argv, **options):
        ran.append(argv[-3:])
        return subprocess.CompletedProcess(argv, 0, stdout=log, stderr="")

    monkeypatch.setattr(subprocess, "run", child)
    notes: list[str] = []
    assert probe_opencl._abi_safe_lanes("opencl:0:1", 16, notes) == lanes
    assert ran == [["0", "1", "16"]]
    assert bool(notes) == (lanes == 8)
    assert probe_opencl._abi_safe_lanes("opencl:0:1", 8, []) == 8 and len(ran) == 1  # narrower: nothing to check


class FakeClError(Exception):
    """Stands in for pyopencl.Error: what a driver raises for an attribute it does not know."""


def _fake_cl_device(**attributes) -> types.SimpleNamespace:
    base = dict(version="OpenCL 3.0 CUDA", max_compute_units=132, local_mem_size=49152, max_work_group_size=1024,
                global_mem_size=80 * 1024**3)
    return types.SimpleNamespace(**{**base, **attributes})


def test_opencl_gpu_spec_for_nvidia_reads_the_nv_extension():
    device = _fake_cl_device(name="NVIDIA H100 80GB HBM3", vendor="NVIDIA Corporation", warp_size_nv=32,
                             compute_capability_major_nv=9, compute_capability_minor_nv=0,
                             registers_per_block_nv=65536)
    spec = probe.opencl._opencl_gpu_spec(device, "NVIDIA CUDA", FakeClError)
    assert (spec.vendor, spec.arch, spec.compute_capability, spec.simd_width) == ("nvidia", "sm_90", (9, 0), 32)
    assert spec.sram_per_block == 49152  # OpenCL's limit, not CUDA's opt-in 227 KiB
    assert spec.sram_per_unit == catalog.CATALOG["h100"].sram_per_unit
    assert spec.matrix_unit_for("float16") is not None and spec.has_async_copy


def test_opencl_gpu_spec_for_an_unknown_vendor_assumes_and_notes():
    device = _fake_cl_device(name="Mystery GPU", vendor="Mystery Inc.", version="OpenCL 2.1 mystery")
    spec = probe.opencl._opencl_gpu_spec(device, "Mystery", FakeClError)
    assert (spec.kind, spec.arch, spec.simd_width, spec.matrix_units) == ("gpu", "opencl-2.1", 32, ())
    assert spec.sram_per_block == spec.sram_per_unit == 49152
    notes = " | ".join(spec.notes)
    assert "sub-group width not reported" in notes and "not in the catalog" in notes


def test_probe_names_opencl_devices_by_platform_and_index():
    devices = _opencl_devices()
    assert probe.probe("opencl:0:0") == probe.probe("opencl") == devices[0]
    with pytest.raises(RuntimeError, match="no OpenCL device opencl:99:0"):
        probe.probe("opencl:99:0")


# ---------------------------------------------------------------------------------------------
# everything at once, and names


def test_probe_all_never_raises_and_labels_every_entry():
    found = probe.probe_all()
    assert found[0][0] == "cpu" and found[0][1] is not None
    for label, spec, note in found:
        assert isinstance(label, str) and label
        assert spec is None or isinstance(spec, DeviceSpec)
        assert isinstance(note, str) and note
    labels = [label for label, _, _ in found]
    assert any(label.startswith("cuda") for label in labels)
    assert any(label.startswith("opencl") for label in labels)


def test_probe_all_says_why_when_no_framework_is_installed(monkeypatch):
    for module in ("torch", "cupy", "pyopencl"):
        monkeypatch.setitem(sys.modules, module, None)
    found = {label: (spec, note) for label, spec, note in probe.probe_all()}
    assert found["cuda"][0] is None and "not installed" in found["cuda"][1]
    assert found["opencl"][0] is None and "pyopencl is not installed" in found["opencl"][1]
    assert found["cpu"][0] is not None


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "opencl:1", "gpu0"])
def test_probe_rejects_unknown_device_names(name):
    with pytest.raises(ValueError, match="use 'cpu', 'cuda'"):
        probe.probe(name)
