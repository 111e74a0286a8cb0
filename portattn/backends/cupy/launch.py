"""Launching the CUDA kernels: one compiled module per (device, variant), the probed accumulator layout,
the caller's stream, and the kernels' size, stride and scalar arguments."""
from __future__ import annotations

import functools

from ...extras import NONE
from ...spec import WINDOW_UNBOUNDED_FROM
from .build import KERNELS, LAYOUT_SOURCE_PATH, Variant, accumulator_layout, source

# a window side with no bound: farther than any key, and no int32 overflow in the kernels' bounds arithmetic
UNBOUNDED = WINDOW_UNBOUNDED_FROM

DELTA_ROWS_PER_BLOCK = 4  # the delta kernel: one warp per row

class Launcher:
    """Launches the kernels of one call's variant on the tensors' device and torch's current stream.

    ``masks``: the attn_mask and key_padding_mask arguments that the forward, dK/dV and dQ kernels
    take last (none for a call without them: those kernels then have the parameters they always had)."""

    def __init__(self, q, spec, plan, tensors, extras=NONE):
        import torch

        self.index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        vector = spec.head_dim % 8 == 0 and all(vector_friendly(x) for x in tensors)
        self.masks, mask_float32 = score_masks(spec, extras, q.dtype)
        variant = Variant(spec.head_dim, plan, spec.causal, q.dtype == torch.bfloat16, vector, accumulator(self.index),
                          window=spec.window is not None, mask=spec.mask, mask_float32=mask_float32,
                          key_padding=spec.key_padding)
        self.options = variant.options()  # the module's cache key, built once for the call's launches
        self.stream = torch.cuda.current_stream(q.device).cuda_stream

    def __call__(self, name, grid, threads, smem, *args):
        import cupy
        import torch

        compiled = kernel(self.index, self.options, name, smem)
        packed = tuple(cupy.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
        with cupy.cuda.Device(self.index), external_stream(self.index, self.stream):
            compiled((grid[0], grid[1], 1), (threads, 1, 1), packed, shared_mem=smem)

@functools.lru_cache(maxsize=None)
def module(index: int, options: tuple[str, ...]):
    """The compiled module of one variant (its compile options: problem sizes other than the tiles do
    not enter) on one device; NVRTC at first use, and CuPy also caches the binary on disk."""
    import cupy

    with cupy.cuda.Device(index):
        return cupy.RawModule(code=source(), options=(*options, *include_options()), name_expressions=None)

REGISTER_SOFTMAX_COMPUTE_CAPABILITY = (8, 0)

@functools.lru_cache(maxsize=None)
def accumulator(index: int):
    """The device's WMMA accumulator layout, read once by fragment_layout.cu: the register softmax
    where it has the structure that needs (``build.accumulator_layout``), else None.

    Only from sm_80 on, where it was measured (H100, fp16, N = 4096: the forward at 1.31x (D = 128)
    and 1.43x (D = 64) the shared-memory softmax's speed). Before that the shared-memory softmax stays: Volta's quad-pair layout is
    not known to have the structure, and on Turing the register path's dK/dV kernel spills 36-76 B
    at head dims >= 112 (ptxas 12.9 for sm_75), which no T4 run has weighed yet."""
    import cupy

    if compute_capability(index) < REGISTER_SOFTMAX_COMPUTE_CAPABILITY:
        return None
    with cupy.cuda.Device(index):
        module = cupy.RawModule(code=LAYOUT_SOURCE_PATH.read_text(), options=("-std=c++17", *include_options()))
        rows = cupy.zeros((32, 8), dtype=cupy.int32)
        cols = cupy.zeros((32, 8), dtype=cupy.int32)
        module.get_function("accumulator_layout")((1,), (32,), (rows, cols))
        return accumulator_layout(rows.get(), cols.get())

@functools.lru_cache(maxsize=None)
def kernel(index: int, options: tuple[str, ...], name: str, smem: int):
    assert name in KERNELS, name
    kernel = module(index, options).get_function(name)
    if smem > 48 * 1024:  # above 48 KiB a kernel must opt in to dynamic shared memory
        kernel.max_dynamic_shared_size_bytes = smem
    return kernel

@functools.lru_cache(maxsize=None)
def include_options() -> tuple[str, ...]:
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
def external_stream(index: int, pointer: int):
    """CuPy's view of torch's current stream, so kernels order with the caller's torch work (cached
    per stream: creating one costs more than a launch)."""
    import cupy

    with cupy.cuda.Device(index):
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy 14 deprecates ExternalStream for this
            return cupy.cuda.Stream.from_external(StreamHandle(pointer))
        return cupy.cuda.ExternalStream(pointer)

class StreamHandle:
    """A raw CUDA stream pointer through the CUDA stream protocol that ``Stream.from_external`` reads."""

    def __init__(self, pointer: int):
        self.pointer = pointer

    def __cuda_stream__(self):
        return (0, self.pointer)

@functools.lru_cache(maxsize=16)
def compute_capability(index: int) -> tuple[int, int]:
    import cupy

    major, minor = divmod(int(cupy.cuda.Device(index).compute_capability), 10)
    return major, minor


def rows_contiguous(x):
    """The kernels read rows through strides but need each row's elements adjacent."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()

def vector_friendly(x) -> bool:
    """16-byte loads: base address and every stride but the last in whole 8-element (16-byte) pieces."""
    return x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in x.stride()[:-1])

def strides(x):
    import cupy

    return tuple(cupy.int64(s) for s in x.stride()[:3])

def sizes(spec):
    """heads, group, Nq, Nk, the query offset and the window's (left, right) bounds, as the kernels take them."""
    import cupy

    left, right = spec.window if spec.window is not None else (None, None)
    bounds = (UNBOUNDED if left is None else left, UNBOUNDED if right is None else right)
    return tuple(cupy.int32(x) for x in (spec.heads, spec.group_size, spec.seqlen_q, spec.seqlen_k, spec.query_offset(), *bounds))

def score_masks(spec, extras, dtype):
    """The kernels' mask arguments, and whether an additive mask is read as float32.

    ``attn_mask`` arrives as the API's (B, H, Nq, Nk) broadcast view and is passed as it is -- its data
    and its four strides in elements, 0 on every broadcast axis -- so a (B, 1, Nq, Nk) or (B, 1, 1, Nk)
    mask is read in place and never expanded. Bool is read as bytes; an additive mask in the inputs'
    dtype (a model's own float16/bfloat16 mask) or in float32 is read as it is; any other float dtype
    (float64, float16 with bfloat16 inputs) is converted to float32 over its stored elements only (its
    broadcast axes cut to length 1, then broadcast again). ``key_padding_mask`` (B, Nk) bool: its data
    and two strides."""
    import torch

    args, float32 = (), False
    if spec.mask is not None:
        mask = extras.attn_mask
        if spec.mask == "additive" and mask.dtype != dtype:
            float32 = True
            if mask.dtype != torch.float32:
                stored = mask[tuple(slice(0, 1) if step == 0 else slice(None) for step in mask.stride())]
                mask = stored.to(torch.float32).expand(mask.shape)
        args += (mask, *(i64(step) for step in mask.stride()))
    if spec.key_padding:
        padding = extras.key_padding_mask
        args += (padding, i64(padding.stride(0)), i64(padding.stride(1)))
    return args, float32

def i64(value):
    import cupy

    return cupy.int64(value)

def i32(value):
    import cupy

    return cupy.int32(value)

def f32(value):
    import cupy

    return cupy.float32(value)
