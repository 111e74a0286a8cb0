"""Launching the numba kernels: the BLAS and thread-pool settings a plan asks for, the compute dtype,
the operands converted into it and results back (kernels in operands.py), and the one ``Features``
tuple every kernel reads (feature arrays read-only and C-contiguous, absent ones
as cached 1-element dummies)."""
from __future__ import annotations

import functools
import math

import numpy as np


@functools.lru_cache(maxsize=None)
def kernels():
    from . import kernels as numba_kernels  # compiles on first call of each kernel, then cached on disk

    return numba_kernels

@functools.lru_cache(maxsize=None)
def conversions():
    from . import operands  # imports numba: only when a call runs

    return operands

@functools.lru_cache(maxsize=None)
def blas_controller():
    import scipy.linalg.cython_blas  # noqa: F401  the BLAS numba calls: loaded first, so the controller sees it
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()

class run_with:
    """Numba's pool sized by the plan, and BLAS single-threaded inside it (else each worker's GEMM
    would spawn its own BLAS threads and oversubscribe the cores); both restored on exit. ``blas=False``
    (a kernel that calls no BLAS: decoding) leaves BLAS alone, which spares a small call its settings.

    threadpoolctl's ``limit(limits=1, user_api="blas")`` without its per-call ``info()`` dictionaries
    (about 10 us of a small call): the BLAS controllers are found once and read and set directly, and
    a library already at one thread is left alone."""

    __slots__ = ("threads", "blas", "previous", "changed", "set")

    def __init__(self, threads: int, blas: bool = True):
        self.threads, self.blas = threads, blas

    def __enter__(self):
        import numba

        self.previous = numba.get_num_threads()
        threads = max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS))
        self.set = threads != self.previous
        if self.set:
            numba.set_num_threads(threads)
        self.changed = [(lib, n) for lib in blas_libraries() if (n := lib.num_threads) is not None and n != 1] if self.blas else []
        for lib, _ in self.changed:
            lib.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        import numba

        for lib, n in self.changed:
            lib.set_num_threads(n)
        for cls in {type(lib) for lib, _ in self.changed}:  # as threadpoolctl's limiter ends: OpenBLAS's pool
            getattr(cls, "clear_controlling_thread", lambda: None)()  # may be limited by other threads again
        if self.set:
            numba.set_num_threads(self.previous)
        return False


# OpenBLAS runs a GEMM on one thread when m * n * k <= SMP_THRESHOLD_MIN (65536) * GEMM_MULTITHREAD_THRESHOLD
# (a build setting, 4 by default, at least 1): tile products of at most this many multiply-adds never
# start its threads, so a call whose tiles are all that small need not limit them -- setting and restoring
# OpenBLAS's thread count was 17 of a (1, 8, 16, 64) call's 42 us. Above it, limiting is a must: OpenBLAS's
# threads inside numba's hung back ("Detect OpenMP Loop") and a (1, 8, 128, 64) call took 11 ms, not 0.34.
BLAS_SERIAL_MNK = 65536


def blas_may_thread(block_q: int, block_k: int, head_dim: int, spec=None) -> bool:
    """Whether a kernel's tile GEMMs (block_q x block_k x head_dim multiply-adds each) may start OpenBLAS threads:
    never where MKL runs them (``spec``'s float32 or bfloat16 products, when blas.py chose MKL), which the
    kernels set single-threaded per task, with no call-wide setting to make and undo."""
    if spec is not None and spec.dtype != "float64" and kernels().blas.chosen().threads_per_task:
        return False
    return block_q * block_k * head_dim > BLAS_SERIAL_MNK


@functools.lru_cache(maxsize=None)
def blas_libraries() -> tuple:
    return tuple(blas_controller().select(user_api="blas").lib_controllers)

LOG2E = 1.4426950408889634



def compute_dtype(spec):
    return np.float64 if spec.dtype == "float64" else np.float32

def log2_scale(spec) -> float:
    """What q is multiplied by: the kernels' GEMM then yields scores ready for exp2."""
    return spec.softmax_scale * LOG2E

def operand(x, spec, factor: float = 1.0):
    """``x`` (B, H, N, D) as the kernels take it: C-contiguous in the compute dtype, times ``factor``. A
    C-contiguous array of the compute dtype passes through (or is scaled by numpy); others -- bfloat16
    bits, float16, views -- are converted by numba on this thread (operands.py says why not torch's, nor
    in parallel)."""
    dtype = compute_dtype(spec)
    if x.dtype == dtype and x.flags.c_contiguous:
        return x if factor == 1.0 else x * dtype(factor)
    out = np.empty(x.shape, dtype)
    conversions().widen(*_readable(x, spec), dtype(factor), out)
    return out

def bfloat16_products(spec) -> bool:
    """Whether a bfloat16 call's tile products run in bfloat16 (the BLAS has a bf16 GEMM: blas.py) rather
    than widened to float32."""
    return spec.dtype == "bfloat16" and kernels().blas.chosen().bfloat16

def product_operand(x, spec):
    """``x`` as the kernels' GEMMs take it: bfloat16 bits as they are (C-contiguous) where
    ``bfloat16_products``, else widened by ``operand``."""
    if x.dtype == np.uint16 and bfloat16_products(spec):
        return np.ascontiguousarray(x)
    return operand(x, spec)

def packed_pairs(k, v, spec, block_k: int):
    """(k_pairs, v_pairs): k and v (bfloat16 bits from ``product_operand``) VNNI-paired for the forward's
    products on torch's micro-kernel (kernels.packed_gemm, AMX), packed once per call where it can take them
    (blas.py: bound, and torch's could_pack; even head dim and block_k; no varlen, no dropout; a positive scale,
    which the row passes apply); else (None, None), and the forward runs on ``gemm``."""
    if not (k.dtype == np.uint16 and bfloat16_products(spec) and spec.head_dim % 2 == 0 and block_k % 2 == 0
            and not spec.varlen and not spec.dropout_p and spec.softmax_scale > 0 and kernels().blas.packed_tiles()):
        return None, None
    batch, heads_k, seqlen_k, head_dim = k.shape
    k_pairs = np.empty((batch, heads_k, -(-seqlen_k // block_k), head_dim // 2, block_k + kernels().ROW_PAD), np.uint32)
    kernels().pair_keys(k.view(np.uint32), block_k, k_pairs)
    v_pairs = np.empty((batch, heads_k, -(-seqlen_k // 2), head_dim), np.uint32)
    kernels().pair_values(v, v_pairs)
    return k_pairs, v_pairs

def row_dots(a, b, spec):
    """rowsum(a * b) over the last axis of (B, H, N, D) arrays as they came: the backward's delta from dO
    and O (by numpy's einsum for float arrays, else read from the bits as ``operand`` reads them)."""
    dtype = compute_dtype(spec)
    if a.dtype == b.dtype == dtype:
        return np.einsum("bhnd,bhnd->bhn", a, b)
    out = np.empty(a.shape[:3], dtype)
    (a, table), (b, _) = _readable(a, spec), _readable(b, spec)
    conversions().row_dots(a, b, table, out)
    return out

def returned(x, like):
    """A float32 result as the caller's converter expects it: bfloat16 bits when the inputs (``like``)
    came as bits (narrowed by numba on this thread, as ``operand`` widens), else as it is."""
    if like.dtype != np.uint16:
        return x
    bits = np.empty(x.shape, np.uint16)
    conversions().narrow_bfloat16(x.reshape(-1).view(np.uint32), bits.reshape(-1))
    return bits

def _readable(x, spec):
    """(x, table) as numba reads them: 16-bit floats as their bits, float16's through its table (numba has
    no float16), bfloat16's shifted (no table)."""
    if x.dtype == np.float16 or (x.dtype == np.uint16 and spec.dtype == "float16"):
        return x.view(np.uint16), conversions().widen_table("float16")
    return x, None

def frozen(x, dtype, broadcast_axes: int = 0):
    """``x`` as the kernels take it: C-contiguous, read-only, of ``dtype``, with stride-0 (broadcast)
    axes among its first ``broadcast_axes`` cut to length 1 -- so one compiled kernel serves every
    call, and a broadcast mask is indexed, never copied to full size (only the caller's own data
    may be copied, to change its dtype or layout)."""
    x = np.asarray(x)
    index = tuple(slice(0, 1) if axis < broadcast_axes and stride == 0 and size > 1 else slice(None)
                  for axis, (size, stride) in enumerate(zip(x.shape, x.strides)))
    x = np.ascontiguousarray(x[index], dtype=dtype).view()
    x.flags.writeable = False
    return x

@functools.lru_cache(maxsize=None)
def dummy(dtype, ndim: int):
    return frozen(np.zeros((1,) * ndim, dtype), dtype)

def features(spec, extras, dtype):
    """The kernels' ``Features`` for a call (cached for plain calls, which carry no arrays)."""
    if not (spec.window or spec.mask or spec.alibi or spec.softcap or spec.block_size or spec.key_padding
            or spec.varlen or spec.dropout_p):
        return plain_features(np.dtype(dtype), spec.causal, spec.group_size, spec.align == "bottom-right")
    left, right = spec.window if spec.window is not None else (None, None)
    sparse_q, sparse_k = spec.block_size if spec.block_size is not None else (0, 0)
    return kernels().Features(
        group_size=spec.group_size,
        causal=spec.causal,
        bottom_right=spec.align == "bottom-right",
        window_left=-1 if left is None else left,
        window_right=-1 if right is None else right,
        softcap=float(spec.softcap or 0.0),
        alibi=spec.alibi,
        slopes=frozen(extras.alibi_slopes, dtype, 2) if spec.alibi else dummy(dtype, 2),
        mask_kind={None: 0, "bool": 1, "additive": 2}[spec.mask],
        bool_mask=frozen(extras.attn_mask, np.bool_, 4) if spec.mask == "bool" else dummy(np.bool_, 4),
        additive_mask=frozen(extras.attn_mask, dtype, 4) if spec.mask == "additive" else dummy(dtype, 4),
        key_padding=spec.key_padding,
        padding=frozen(extras.key_padding_mask, np.bool_) if spec.key_padding else dummy(np.bool_, 2),
        sparse_q=sparse_q,
        sparse_k=sparse_k,
        block_mask=frozen(extras.block_mask, np.bool_, 2) if spec.block_size else dummy(np.bool_, 4),
        dropout_p=float(spec.dropout_p),
        dropout_seed=int(extras.dropout_seed or 0),
        varlen=spec.varlen,
        cu_q=frozen(extras.cu_seqlens_q, np.int64) if spec.varlen else dummy(np.int64, 1),
        cu_k=frozen(extras.cu_seqlens_k, np.int64) if spec.varlen else dummy(np.int64, 1),
        row_pass=bool(spec.softcap or spec.alibi or spec.mask or spec.key_padding),
    )

@functools.lru_cache(maxsize=None)
def plain_features(dtype, causal: bool, group_size: int, bottom_right: bool):
    return kernels().Features(
        group_size=group_size, causal=causal, bottom_right=bottom_right, window_left=-1, window_right=-1,
        softcap=0.0, alibi=False, slopes=dummy(dtype.type, 2), mask_kind=0, bool_mask=dummy(np.bool_, 4),
        additive_mask=dummy(dtype.type, 4), key_padding=False, padding=dummy(np.bool_, 2), sparse_q=0, sparse_k=0,
        block_mask=dummy(np.bool_, 4), dropout_p=0.0, dropout_seed=0, varlen=False, cu_q=dummy(np.int64, 1),
        cu_k=dummy(np.int64, 1), row_pass=False,
    )
