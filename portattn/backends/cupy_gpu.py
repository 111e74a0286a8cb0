"""``cupy``: FlashAttention-2 in hand-written CUDA C++ on tensor cores through WMMA, for Volta and later.

The kernels (``cupy_kernels/attention.cu``) are compiled at run time by ``cupy.RawModule`` with the
plan of ``portattn/tiling/wmma.py`` as compile-time constants (``cupy_build.Variant``), one module
per (device, variant), cached. Forward: a block of ``warps`` warps owns 16 query rows per warp and
streams K/V tiles of ``block_k`` keys (``stages`` deep with cp.async on sm_80+, through registers on
Volta/Turing), online softmax in float32, causal whole-tile skipping. Backward: a delta kernel, a
dK/dV kernel that owns keys and streams query tiles (GQA: over every query head of the group, summed
in registers), and a dQ kernel that owns queries and streams key tiles -- no atomics, deterministic.

MMA_CHOICE -- WMMA 16x16x16 rather than inline ``mma.sync.m8n8k4``, measured: on the H100
``benchmarks/mma_shapes.py`` runs WMMA at 431 TFLOP/s and m8n8k4 at 15.6 (28x slower: from sm_80 on
WMMA becomes the native m16n8k16 instruction while m8n8k4 is emulated;
``benchmarks/results/h100-mma-shapes.json``). On Volta a WMMA 16x16x16 product is itself executed as
m8n8k4 steps of the four quad-pairs (HMMA.884; the Volta whitepaper and the "Dissecting Volta"
microbenchmarks), so inline m8n8k4 could only save register shuffles there, at the price of
hand-written fragment layouts, and this machine has no V100 to show it does. WMMA's one cost, an
opaque accumulator layout, is paid once per warp by probing it (``probe_layout`` in the .cu file).

Inputs are torch CUDA tensors (cupy arrays reach here as torch tensors through DLPack, without
copies) read through their strides; only a last dimension that is not contiguous is copied.
"""

from __future__ import annotations

import dataclasses
import functools

from ..spec import FEATURES
from ..tiling import probe, wmma
from . import register
from .base import Backend, Capabilities
from .cupy_build import KERNELS, LAYOUT_SOURCE_PATH, Variant, accumulator_layout, source

LOG2E = 1.4426950408889634
MIN_COMPUTE_CAPABILITY = (7, 0)
BF16_COMPUTE_CAPABILITY = (8, 0)
DELTA_ROWS_PER_BLOCK = 4  # the delta kernel: one warp per row
_SUPPORTED = frozenset({"gqa", "bottom_right", "window"})
UNBOUNDED = 1 << 29  # a window side with no bound: farther than any key (and no int overflow in the bounds arithmetic)
_FEATURE_NOTES = {
    "gqa": "query head h reads K/V head h // group in place; the dK/dV kernel loops over the group's query heads "
           "(sums in registers, no repeat, no atomics)",
    "bottom_right": "query positions shifted by Nk - Nq in the causal mask and the causal tile range",
    "window": "each block's visible key range (queries for dK/dV) is computed and only it is loaded; edge tiles are masked",
    "bool_mask": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "additive_mask": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "alibi": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "softcap": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "block_sparse": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "key_padding": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "varlen": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "decoding": "no key-split kernel: a few queries would leave most SMs idle; use triton (sm_80+) or numba",
    "dropout": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
}
assert set(_FEATURE_NOTES) == set(FEATURES)


@register
class CupyBackend(Backend):
    name = "cupy"
    summary = "NVIDIA Volta and later: FlashAttention-2 in CUDA C++ on WMMA tensor cores, compiled by CuPy"
    extra = "cupy"
    compute_kind = "torch"
    auto_priority = {"cuda": 20}  # below triton, which refuses sm_70/sm_75: there this is what auto picks
    capabilities = Capabilities(
        device_kinds=frozenset({"cuda"}),
        dtypes=frozenset({"float16", "bfloat16"}),
        min_head_dim=1,
        max_head_dim=256,
        backward=True,
        features=_SUPPORTED,
        feature_notes=_FEATURE_NOTES,
        notes=(
            "float16 (sm_70+) and bfloat16 (sm_80+) on WMMA 16x16x16 tensor cores, float32 accumulation and softmax; "
            "float32 inputs are refused (no fragment takes them; triton or numba do)",
            "head dims up to 256 forward; the backward where its dK/dV accumulators fit registers (<= 128)",
        ),
    )

    def _check_available(self) -> list[str]:
        missing = self._missing_modules((("cupy", "it compiles and launches the kernels"),
                                         ("torch", "inputs are computed on as torch tensors")))
        if missing:
            return missing
        import cupy

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # noqa: BLE001 - no driver is the usual case on a CPU machine
            return [f"cupy sees no CUDA device ({type(error).__name__}: {error})"]
        if count == 0:
            return ["cupy sees no CUDA device"]
        return []

    def _extra_reasons(self, spec) -> list[str]:
        if spec.device_kind != "cuda" or self.unavailable_reasons():
            return []
        cc = _compute_capability(_device_index(spec.device))
        if cc < MIN_COMPUTE_CAPABILITY:
            return [f"cupy needs tensor cores (compute capability 7.0+); {spec.device} is {cc[0]}.{cc[1]}"]
        if spec.dtype == "bfloat16" and cc < BF16_COMPUTE_CAPABILITY:
            return [f"bfloat16 needs compute capability 8.0+ (WMMA has no bf16 fragment before Ampere); {spec.device} is "
                    f"{cc[0]}.{cc[1]}: pass float16"]
        return self._plan_reasons(spec)

    def device(self, spec):
        return probe.probe_cuda(_device_index(spec.device))

    def plan(self, spec, device=None):
        return wmma.plan(spec, device or self.device(spec))

    def retile(self, plan, changes):
        """Swept tiles the WMMA kernels can run (W3: 16 rows per warp; W6: at most 2 stages; dQ in its own
        kernel; W5: registers), with shared memory and threads recomputed (W4); None otherwise."""
        new = dataclasses.replace(plan, **changes)
        forward_ok = (new.block_q == wmma.ROWS_PER_WARP * new.warps and 1 <= new.stages <= 2 and new.block_k % 16 == 0
                      and wmma.forward_registers(new.head_dim_padded, new.block_k) <= wmma.MAX_REGISTERS)
        backward_ok = not new.backward_warps or (
            new.backward_block_k == wmma.ROWS_PER_WARP * new.backward_warps and 1 <= new.backward_stages <= 2
            and new.backward_dq_separate and new.backward_block_q % 16 == 0
            and wmma.backward_registers(new.head_dim_padded, new.backward_block_q) <= wmma.MAX_REGISTERS)
        if not (forward_ok and backward_ok):
            return None
        pad = new.head_dim_padded
        return dataclasses.replace(
            new, threads=32 * new.warps, sram_bytes=wmma.forward_smem_bytes(pad, new.warps, new.block_k, new.stages),
            registers_per_thread=wmma.forward_registers(pad, new.block_k),
            backward_sram_bytes=(wmma.backward_smem_bytes(pad, new.backward_warps, new.backward_block_q, new.backward_stages)
                                 if new.backward_warps else 0),
        )

    def forward(self, q, k, v, spec, plan, extras):
        import torch

        batch, heads, seqlen_q, head_dim = q.shape
        out = torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        if out.numel() == 0:
            lse.fill_(float("-inf"))
            return out, lse
        q, k, v = (_rows_contiguous(x) for x in (q, k, v))
        launch = _Launcher(q, spec, plan, (q, k, v))
        launch(
            "attention_forward", (-(-seqlen_q // plan.block_q), batch * heads), plan.threads, plan.sram_bytes,
            q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            _i64(lse.stride(0)), _i64(lse.stride(1)), *_sizes(spec), _f32(spec.softmax_scale * LOG2E),
        )
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, spec, plan, extras):
        import torch

        batch, heads, seqlen_q, head_dim = q.shape
        kv_heads, seqlen_k = k.shape[1], k.shape[2]
        dq = torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
        dk = torch.empty((batch, kv_heads, seqlen_k, head_dim), dtype=q.dtype, device=q.device)
        dv = torch.empty_like(dk)
        if batch * heads == 0 or seqlen_q == 0 or seqlen_k == 0:  # no query sees any key: every gradient is zero
            return dq.zero_(), dk.zero_(), dv.zero_()
        grad_out = _rows_contiguous(grad_out.to(q.dtype))
        q, k, v, out = (_rows_contiguous(x) for x in (q, k, v, out))
        lse = lse.to(torch.float32).contiguous()
        delta = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        launch = _Launcher(q, spec, plan, (q, k, v, out, grad_out))
        scale = spec.softmax_scale
        owned = wmma.ROWS_PER_WARP * plan.backward_warps
        threads = 32 * plan.backward_warps
        launch("attention_backward_delta", (-(-seqlen_q // DELTA_ROWS_PER_BLOCK), batch * heads), 32 * DELTA_ROWS_PER_BLOCK,
               0, out, grad_out, delta, *_strides(out), *_strides(grad_out), _i32(heads), _i32(seqlen_q))
        common = (q, k, v, grad_out, lse, delta)
        launch("attention_backward_dkdv", (-(-seqlen_k // owned), batch * kv_heads), threads, plan.backward_sram_bytes,
               *common, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk),
               *_strides(dv), *_sizes(spec), _f32(scale), _f32(scale * LOG2E))
        launch("attention_backward_dq", (-(-seqlen_q // owned), batch * heads), threads, plan.backward_sram_bytes,
               *common, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
               *_sizes(spec), _f32(scale), _f32(scale * LOG2E))
        return dq, dk, dv


class _Launcher:
    """Launches the kernels of one call's variant on the tensors' device and torch's current stream."""

    def __init__(self, q, spec, plan, tensors):
        import torch

        self.index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        vector = spec.head_dim % 8 == 0 and all(_vector_friendly(x) for x in tensors)
        variant = Variant(spec.head_dim, plan, spec.causal, q.dtype == torch.bfloat16, vector, _accumulator(self.index),
                          window=spec.window is not None)
        self.options = variant.options()  # the module's cache key, built once for the call's launches
        self.stream = torch.cuda.current_stream(q.device).cuda_stream

    def __call__(self, name, grid, threads, smem, *args):
        import cupy
        import torch

        kernel = _kernel(self.index, self.options, name, smem)
        packed = tuple(cupy.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
        with cupy.cuda.Device(self.index), _external_stream(self.index, self.stream):
            kernel((grid[0], grid[1], 1), (threads, 1, 1), packed, shared_mem=smem)


@functools.lru_cache(maxsize=None)
def _module(index: int, options: tuple[str, ...]):
    """The compiled module of one variant (its compile options: problem sizes other than the tiles do
    not enter) on one device; NVRTC at first use, and CuPy also caches the binary on disk."""
    import cupy

    with cupy.cuda.Device(index):
        return cupy.RawModule(code=source(), options=(*options, *_include_options()), name_expressions=None)


REGISTER_SOFTMAX_COMPUTE_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def _accumulator(index: int):
    """The device's WMMA accumulator layout, read once by fragment_layout.cu: the register softmax
    where it has the structure that needs (``cupy_build.accumulator_layout``), else None.

    Only from sm_80 on, where it was measured (H100, fp16, N = 4096: the forward at 1.31x (D = 128)
    and 1.43x (D = 64) the shared-memory softmax's speed). Before that the shared-memory softmax stays: Volta's quad-pair layout is
    not known to have the structure, and on Turing the register path's dK/dV kernel spills 36-76 B
    at head dims >= 112 (ptxas 12.9 for sm_75), which no T4 run has weighed yet."""
    import cupy

    if _compute_capability(index) < REGISTER_SOFTMAX_COMPUTE_CAPABILITY:
        return None
    with cupy.cuda.Device(index):
        module = cupy.RawModule(code=LAYOUT_SOURCE_PATH.read_text(), options=("-std=c++17", *_include_options()))
        rows = cupy.zeros((32, 8), dtype=cupy.int32)
        cols = cupy.zeros((32, 8), dtype=cupy.int32)
        module.get_function("accumulator_layout")((1,), (32,), (rows, cols))
        return accumulator_layout(rows.get(), cols.get())


@functools.lru_cache(maxsize=None)
def _kernel(index: int, options: tuple[str, ...], name: str, smem: int):
    assert name in KERNELS, name
    kernel = _module(index, options).get_function(name)
    if smem > 48 * 1024:  # above 48 KiB a kernel must opt in to dynamic shared memory
        kernel.max_dynamic_shared_size_bytes = smem
    return kernel


@functools.lru_cache(maxsize=None)
def _include_options() -> tuple[str, ...]:
    """``-I`` for a CUDA toolkit's headers that include ``crt/mma.h`` (WMMA): the header set CuPy
    finds (e.g. the pip ``nvidia/cu13`` one) may lack it, so look in CuPy's toolkit, $CUDA_PATH,
    $CUDA_HOME, /usr/local/cuda and the pip ``nvidia-cuda-nvcc`` headers, and pass the first that has it."""
    import os

    import cupy

    candidates = []
    try:
        candidates.append(cupy.cuda.get_cuda_path() or "")
    except Exception:  # noqa: BLE001 - no toolkit path: the others may do
        pass
    candidates += [os.environ.get("CUDA_PATH", ""), os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    try:
        import nvidia.cuda_nvcc as nvcc  # type: ignore[import-not-found]

        candidates += list(nvcc.__path__)
    except ImportError:
        pass
    for root in candidates:
        include = os.path.join(root, "include")
        if root and os.path.exists(os.path.join(include, "crt", "mma.h")):
            return (f"-I{include}",)
    return ()


@functools.lru_cache(maxsize=64)
def _external_stream(index: int, pointer: int):
    """CuPy's view of torch's current stream, so kernels order with the caller's torch work (cached
    per stream: creating one costs more than a launch)."""
    import cupy

    with cupy.cuda.Device(index):
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy 14 deprecates ExternalStream for this
            return cupy.cuda.Stream.from_external(_StreamHandle(pointer))
        return cupy.cuda.ExternalStream(pointer)


class _StreamHandle:
    """A raw CUDA stream pointer through the CUDA stream protocol that ``Stream.from_external`` reads."""

    def __init__(self, pointer: int):
        self.pointer = pointer

    def __cuda_stream__(self):
        return (0, self.pointer)


@functools.lru_cache(maxsize=16)
def _compute_capability(index: int) -> tuple[int, int]:
    import cupy

    major, minor = divmod(int(cupy.cuda.Device(index).compute_capability), 10)
    return major, minor


def _device_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _rows_contiguous(x):
    """The kernels read rows through strides but need each row's elements adjacent."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _vector_friendly(x) -> bool:
    """16-byte loads: base address and every stride but the last in whole 8-element (16-byte) pieces."""
    return x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in x.stride()[:-1])


def _strides(x):
    import cupy

    return tuple(cupy.int64(s) for s in x.stride()[:3])


def _sizes(spec):
    """heads, group, Nq, Nk, the query offset and the window's (left, right) bounds, as the kernels take them."""
    import cupy

    left, right = spec.window if spec.window is not None else (None, None)
    bounds = (UNBOUNDED if left is None else left, UNBOUNDED if right is None else right)
    return tuple(cupy.int32(x) for x in (spec.heads, spec.group_size, spec.seqlen_q, spec.seqlen_k, spec.query_offset(), *bounds))


def _i64(value):
    import cupy

    return cupy.int64(value)


def _i32(value):
    import cupy

    return cupy.int32(value)


def _f32(value):
    import cupy

    return cupy.float32(value)
