"""Compile the ``cupy`` backend's kernels without a GPU: NVRTC to PTX, then ``ptxas -v`` for registers and spills.

On a GPU, ``cupy.RawModule`` compiles ``kernels/attention.cu`` at run time for the device it runs
on. CI has no GPU and no driver, yet the kernels must be checked for the oldest architectures the
backend claims, Volta (sm_70) and Turing (sm_75): that they compile for every variant the planner
emits, and that the registers and spills ``ptxas`` reports agree with the plan's register estimates
(``portattn/backends/cupy/plan.py``, rule W5).

Why CUDA 12 exactly: NVRTC itself needs no driver, and the PyPI wheels ``nvidia-cuda-nvrtc-cu12``
(the compiler library), ``nvidia-cuda-nvcc-cu12`` (the ``ptxas`` binary and the device headers such as
``mma.h``) and ``nvidia-cuda-runtime-cu12`` (``cuda_fp16.h`` and friends) install a complete offline
toolchain, which ``cupy_backends`` (shipped with ``cupy-cuda12x``) drives. CUDA 13 dropped Volta
(compute_70 is no longer a target), so a CUDA 13 NVRTC cannot check sm_70; CUDA 12 still targets it,
with a deprecation warning that is harmless here.

Nothing here imports cupy when this module is imported; ``unavailable_reason()`` says what is missing.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .build import Variant

NVRTC_MAJOR = 12  # CUDA 13 dropped compute_70 (Volta); CUDA 12 is the last toolchain that targets it
OLDEST_ARCH = 70
INSTALL_HINT = "pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12"


class OfflineCompileError(RuntimeError):
    """NVRTC or ptxas refused the source; ``log`` holds the compiler's own output."""

    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n{log}")
        self.log = log


@dataclass(frozen=True)
class KernelReport:
    """What ``ptxas -v`` says about one kernel of one compiled module."""

    kernel: str
    arch: int  # e.g. 70 for sm_70
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes
    shared_bytes: int = 0  # static shared memory ptxas reports (the kernels' is dynamic: usually 0)


@dataclass(frozen=True)
class Toolchain:
    """Where the CUDA 12 wheels put the headers and ``ptxas``."""

    include_dirs: tuple[str, ...]
    ptxas: str


def _nvidia_root() -> Path | None:
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return None
    for entry in getattr(nvidia, "__path__", ()):
        root = Path(entry)
        if (root / "cuda_nvcc").is_dir() or (root / "cuda_runtime").is_dir():
            return root
    return None


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[Toolchain | None, str | None]:
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as error:
        return None, f"cupy_backends is not importable ({error}); {INSTALL_HINT}"
    try:
        version = tuple(nvrtc.getVersion())
    except Exception as error:  # noqa: BLE001 - libnvrtc missing or unloadable
        return None, f"NVRTC cannot be loaded ({type(error).__name__}: {error}); {INSTALL_HINT}"
    if version[0] != NVRTC_MAJOR:
        why = "CUDA 13 dropped compute_70 (Volta)" if version[0] > NVRTC_MAJOR else "it predates what the kernels use"
        return None, (f"NVRTC is {version[0]}.{version[1]}, need {NVRTC_MAJOR}.x ({why}); {INSTALL_HINT}")
    try:
        archs = tuple(nvrtc.getSupportedArchs())
    except Exception:  # noqa: BLE001 - older bindings: trust the version check
        archs = (OLDEST_ARCH,)
    if OLDEST_ARCH not in archs:
        return None, f"NVRTC {version[0]}.{version[1]} cannot target compute_{OLDEST_ARCH}; {INSTALL_HINT}"
    root = _nvidia_root()
    if root is None:
        return None, f"the nvidia-* CUDA wheels are not installed; {INSTALL_HINT}"
    ptxas = root / "cuda_nvcc" / "bin" / ("ptxas.exe" if os.name == "nt" else "ptxas")
    if not ptxas.is_file() or not os.access(ptxas, os.X_OK):
        return None, f"no executable ptxas at {ptxas} (nvidia-cuda-nvcc-cu12); {INSTALL_HINT}"
    try:
        banner = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"ptxas at {ptxas} does not run ({type(error).__name__}: {error}); {INSTALL_HINT}"
    release = re.search(r"release (\d+)\.(\d+)", banner)
    if not release or int(release.group(1)) != NVRTC_MAJOR:
        return None, f"ptxas at {ptxas} is not CUDA {NVRTC_MAJOR}.x ({banner.strip()[-80:]!r}); {INSTALL_HINT}"
    includes = (root / "cuda_runtime" / "include", root / "cuda_nvcc" / "include")
    for header, directory in (("cuda_fp16.h", includes[0]), ("mma.h", includes[0]), ("crt/mma.hpp", includes[1])):
        if not (directory / header).is_file():
            return None, f"header {header} missing under {directory}; {INSTALL_HINT}"
    return Toolchain(tuple(str(d) for d in includes), str(ptxas)), None


def unavailable_reason() -> str | None:
    """Why kernels cannot be compiled offline here (None: they can).

    Needs ``cupy_backends`` (from ``cupy-cuda12x``), an NVRTC of CUDA 12 (12.x; 13 has no compute_70)
    that lists compute_70, and ``ptxas`` with the CUDA headers from the ``nvidia-cuda-nvcc-cu12`` /
    ``nvidia-cuda-runtime-cu12`` wheels. No GPU and no driver are needed.
    """
    return _probe()[1]


def toolchain() -> Toolchain:
    toolchain_, why = _probe()
    if toolchain_ is None:
        raise RuntimeError(f"offline compilation is unavailable: {why}")
    return toolchain_


def compile_ptx(variant: "Variant", arch: int, source: str | None = None) -> str:
    """NVRTC: the variant's module as PTX for ``compute_<arch>``. Raises ``OfflineCompileError`` with the log.

    ``source``: the .cu text to compile instead of ``build.source()`` (e.g. another revision of it)."""
    from cupy_backends.cuda.libs import nvrtc

    from . import build as cupy_build

    tools = toolchain()
    options = [f"--gpu-architecture=compute_{arch}", *(f"-I{d}" for d in tools.include_dirs), *variant.options()]
    program = nvrtc.createProgram(cupy_build.source() if source is None else source, "attention.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            raise OfflineCompileError(f"NVRTC failed for compute_{arch} with {' '.join(variant.options())}: {error}",
                                      nvrtc.getProgramLog(program)) from None
        ptx = nvrtc.getPTX(program)
    finally:
        nvrtc.destroyProgram(program)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_FUNCTION_PROPERTIES = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+)\s+bytes stack frame")
_SPILL_STORES = re.compile(r"(\d+)\s+bytes spill stores")
_SPILL_LOADS = re.compile(r"(\d+)\s+bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_SHARED = re.compile(r"(\d+)\s+bytes smem")


def parse_ptxas(output: str, arch: int) -> dict[str, KernelReport]:
    """Per-kernel reports from ``ptxas -v`` output (stderr).

    ptxas prints, per entry function, a ``Compiling entry function 'NAME' for 'sm_XX'`` line, then a
    ``Function properties for NAME`` block with ``N bytes stack frame, N bytes spill stores, N bytes
    spill loads``, then ``Used N registers, ... N bytes smem ...``. The order of those lines has varied
    between CUDA releases, so each figure is attributed to the most recently named function, and a
    figure that never appears is taken as 0 (ptxas leaves out what is zero in some versions).
    """
    figures: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in output.splitlines():
        for pattern in (_ENTRY, _FUNCTION_PROPERTIES):
            found = pattern.search(line)
            if found:
                current = found.group(1)
                figures.setdefault(current, {})
        if current is None:
            continue
        for key, pattern in (("stack_frame", _STACK), ("spill_stores", _SPILL_STORES), ("spill_loads", _SPILL_LOADS),
                             ("registers", _REGISTERS), ("shared_bytes", _SHARED)):
            found = pattern.search(line)
            if found:
                figures[current][key] = int(found.group(1))
    reports = {}
    for name, values in figures.items():
        if "registers" not in values:
            continue  # a device function's properties block, not an entry with a register count
        reports[name] = KernelReport(kernel=name, arch=arch, registers=values["registers"],
                                     spill_stores=values.get("spill_stores", 0), spill_loads=values.get("spill_loads", 0),
                                     stack_frame=values.get("stack_frame", 0), shared_bytes=values.get("shared_bytes", 0))
    return reports


def assemble(ptx: str, arch: int) -> tuple[dict[str, KernelReport], str]:
    """``ptxas -arch=sm_<arch> -v``: per-kernel reports and ptxas's raw output. Raises ``OfflineCompileError``."""
    tools = toolchain()
    with tempfile.TemporaryDirectory(prefix="portattn-ptx-") as directory:
        path = Path(directory) / "attention.ptx"
        path.write_text(ptx)
        result = subprocess.run([tools.ptxas, f"-arch=sm_{arch}", "-v", str(path), "-o", os.devnull],
                                capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise OfflineCompileError(f"ptxas -arch=sm_{arch} failed (exit {result.returncode})", output)
    return parse_ptxas(output, arch), output


def compile_variant(variant: "Variant", arch: int, source: str | None = None) -> dict[str, KernelReport]:
    """Compile ``variant`` for ``sm_<arch>`` (70, 75, ...) offline: NVRTC to PTX, ``ptxas -v`` to machine code,
    and return ``{kernel name: KernelReport}``. Raises ``OfflineCompileError`` (log attached) on failure,
    ``RuntimeError`` when ``unavailable_reason()`` is not None."""
    reports, _ = assemble(compile_ptx(variant, arch, source), arch)
    return reports
