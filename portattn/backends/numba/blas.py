"""The BLAS that the numba kernels' tile products call, chosen once per process.

* **Intel MKL** where this process has it: torch's CPU library links MKL in and exports its BLAS
  (``libtorch_cpu.so``: ``sgemm_``, ``cblas_gemm_bf16bf16f32``), and Intel's ``mkl`` wheel ships
  ``libmkl_rt``. float32 tiles then go through MKL's SGEMM (on the project's 2-core Xeon 15-25% faster
  than OpenBLAS on 256 x 512 x 128 tiles, single-threaded), and bfloat16 inputs stay bfloat16: their
  tile products run as ``cblas_gemm_bf16bf16f32`` (bf16 x bf16, float32 accumulation) -- AMX or
  AVX512-BF16 where the CPU has them, ~4-7x the float32 rate on that Xeon (benchmarks/cpu_numba_vs_torch.py).
* **SciPy's OpenBLAS** otherwise, the one numba's own ``np.dot`` calls: float32 and float64, bfloat16
  inputs widened to float32.

MKL is taken from torch only when torch is already imported (a numpy-only user does not pay for loading
it), and only on Intel CPUs: on the project's earlier AMD EPYC (Zen 4) MKL's tile products were no faster
than OpenBLAS's (docs/benchmarks.md), and MKL's code paths for other vendors' CPUs are its generic ones.
bfloat16 products need the CPU's bf16 instructions (AMX-BF16 or AVX512-BF16); without them MKL would only
emulate them. ``PORTATTN_NUMBA_BLAS=openblas`` or ``=mkl`` overrides the choice (to compare the two; with
OpenBLAS bfloat16 is computed in float32).

Where torch's CPU library also exports its oneDNN micro-kernel for bfloat16 tiles with a pre-packed right
operand (``at::native::cpublas::brgemm``, AMX; the kernel torch's own CPU flash attention runs) and this CPU
can run it (``could_pack``), the forward's two products take it instead of MKL's GEMM, which re-packs both
operands into AMX's layout on every call (K once per query tile): the kernels pack K and V once per call
(kernels.pair_keys/pair_values). These are C++ functions: bound by their mangled names, called only with
the arguments they accept (even inner sizes, VNNI-paired right operands), since a refusal there is a C++
exception that would end the process.

The kernels call fixed names -- ``portattn_sgemm``, ``portattn_gemm_bf16``, ``portattn_blas_threads_local``,
``portattn_brgemm_bf16``, ``portattn_brgemm_release`` -- that are bound here to the chosen library's
functions (``llvmlite.binding.add_symbol``), never its addresses: numba's on-disk cache of the kernels
stays valid in a process that made the other choice.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import NamedTuple

import llvmlite.binding as llvm

SGEMM = "portattn_sgemm"  # Fortran sgemm_: every argument by pointer
GEMM_BF16 = "portattn_gemm_bf16"  # cblas_gemm_bf16bf16f32 (row-major layout, 32-bit ints)
THREADS_LOCAL = "portattn_blas_threads_local"  # int f(int): this thread's BLAS threads, returns the previous value
# void brgemm(int64 m, n, k, lda, ldb, ldc, bool accumulate, const bf16* a, const bf16* b_vnni, float* c, bool vnni)
BRGEMM_BF16 = "portattn_brgemm_bf16"
BRGEMM_RELEASE = "portattn_brgemm_release"  # void f(bool vnni): gives this thread's AMX tile state back

# at::native::cpublas (ATen/native/CPUBlas.h), Itanium-mangled: brgemm's bfloat16 overload, brgemm_release, could_pack
_TORCH_BRGEMM = {
    BRGEMM_BF16: "_ZN2at6native7cpublas6brgemmEllllllbPKN3c108BFloat16ES5_Pfb",
    BRGEMM_RELEASE: "_ZN2at6native7cpublas14brgemm_releaseEb",
}
_TORCH_COULD_PACK = "_ZN2at6native7cpublas10could_packEN3c1010ScalarTypeE"
_SCALAR_TYPE_BFLOAT16 = 15  # c10::ScalarType::BFloat16


class Blas(NamedTuple):
    name: str  # "mkl (libtorch_cpu.so)", "openblas (scipy)"
    bfloat16: bool  # whether bfloat16 tiles are multiplied as bfloat16
    threads_per_task: bool  # whether the kernels set its threads per task (MKL); else the caller limits them
    could_pack: object = None  # torch's could_pack(ScalarType) where its bf16 micro-kernel is bound (``packed_tiles``)


def _address(function) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


def _mkl_library():
    """A loaded library exporting MKL's BLAS, with a name for it, or (None, None)."""
    candidates = []
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        candidates.append(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    candidates += ["libmkl_rt.so.2", "libmkl_rt.so", ctypes.util.find_library("mkl_rt")]
    for path in filter(None, candidates):
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        if all(hasattr(library, name) for name in ("sgemm_", "cblas_gemm_bf16bf16f32", "MKL_Set_Num_Threads_Local")):
            return library, os.path.basename(path)
    return None, None


def _openblas_sgemm() -> int:
    """SciPy's Fortran sgemm (its ``cython_blas`` capsule): what numba's ``np.dot`` calls."""
    import scipy.linalg.cython_blas as cython_blas

    capsule = cython_blas.__pyx_capi__["sgemm"]
    get_name, get_pointer = ctypes.pythonapi.PyCapsule_GetName, ctypes.pythonapi.PyCapsule_GetPointer
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return get_pointer(capsule, get_name(capsule))


def _cpu_info() -> tuple[str, set[str]]:
    """(vendor, flags) of this machine's CPU as Linux reports them; ("", set()) elsewhere."""
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    vendor = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


@functools.lru_cache(maxsize=None)
def chosen() -> Blas:
    """Bind the kernels' BLAS names (once per process) and say what they are bound to."""
    wanted = os.environ.get("PORTATTN_NUMBA_BLAS", "").lower()
    vendor, flags = _cpu_info()
    use_mkl = wanted == "mkl" or (wanted != "openblas" and vendor == "GenuineIntel")
    library, name = _mkl_library() if use_mkl else (None, None)
    if library is not None:
        bfloat16 = bool(flags & {"amx_bf16", "avx512_bf16"}) or wanted == "mkl"
        llvm.add_symbol(SGEMM, _address(library.sgemm_))
        llvm.add_symbol(GEMM_BF16, _address(library.cblas_gemm_bf16bf16f32))
        llvm.add_symbol(THREADS_LOCAL, _address(library.MKL_Set_Num_Threads_Local))
        return Blas(f"mkl ({name})", bfloat16, True, _bind_torch_brgemm(library) if bfloat16 else None)
    llvm.add_symbol(SGEMM, _openblas_sgemm())
    # OpenBLAS has no per-thread setting (launch.run_with limits it for the whole call); libc's abs(),
    # an int -> int function that does nothing, stands in: abs(1) "returns the previous value" 1.
    llvm.add_symbol(THREADS_LOCAL, _address(ctypes.CDLL(None).abs))
    return Blas("openblas (scipy)", False, False)


def _bind_torch_brgemm(library):
    """Bind the micro-kernel names to torch's and return its ``could_pack``; None where ``library`` (MKL
    alone, or another torch build) lacks them."""
    if not all(hasattr(library, symbol) for symbol in (*_TORCH_BRGEMM.values(), _TORCH_COULD_PACK)):
        return None
    for name, symbol in _TORCH_BRGEMM.items():
        llvm.add_symbol(name, _address(getattr(library, symbol)))
    could_pack = getattr(library, _TORCH_COULD_PACK)
    could_pack.restype, could_pack.argtypes = ctypes.c_bool, [ctypes.c_int8]
    return could_pack


def packed_tiles() -> bool:
    """Whether bfloat16 tiles may run on torch's micro-kernel now: bound, and torch says this CPU packs
    bfloat16 (AMX) with oneDNN enabled -- asked per call, since ``torch.backends.mkldnn.enabled`` may be
    switched off at any time, and the micro-kernel then raises instead of computing."""
    could_pack = chosen().could_pack
    return could_pack is not None and could_pack(_SCALAR_TYPE_BFLOAT16)
