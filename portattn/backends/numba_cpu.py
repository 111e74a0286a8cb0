"""``numba``: FlashAttention-2 on the CPU, compiled by Numba (kernels in numba_kernels.py).

Executes the planner's CPU plan: tile sizes, worker threads and key splits come from the plan; the
kernels never choose them. float16/bfloat16 inputs are widened to float32 (a linear-size copy) and
computed there; float64 inputs are computed in float64.

Every feature runs in the same kernels, described to them by one ``Features`` tuple (``_features``):
the feature arrays are handed over read-only and C-contiguous in fixed dtypes, with broadcast axes
cut back to length 1 (never expanded), and absent ones replaced by 1-element dummies -- so each
compute dtype compiles once, and a plain call reuses a cached tuple.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np

from ..tiling import probe
from . import register
from .base import Backend, Capabilities


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import numba_kernels  # compiles on first call of each kernel, then cached on disk

    return numba_kernels


@functools.lru_cache(maxsize=None)
def _blas_controller():
    import scipy.linalg.cython_blas  # noqa: F401  the BLAS numba calls: loaded first, so the controller sees it
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _run_with(threads: int):
    """Numba's pool sized by the plan, and BLAS single-threaded inside it (else each worker's GEMM
    would spawn its own BLAS threads and oversubscribe the cores)."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        with _blas_controller().limit(limits=1, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(previous)


LOG2E = 1.4426950408889634

# How each feature is run (the capability table prints these)
FEATURE_NOTES = {
    "gqa": "K/V head h // group serves query head h; the backward's key pass sums a group's query heads into its own dK/dV rows",
    "bottom_right": "query positions shifted by Nk - Nq (per sequence when varlen) in the tile and row key ranges",
    "window": "each query tile visits only the key blocks its window reaches (the key pass only the query tiles that reach its keys)",
    "bool_mask": "read per score inside visited tiles; a broadcast mask is indexed, never materialized",
    "additive_mask": "added per score (in the kernels' log2 units) inside visited tiles; broadcast axes indexed, not copied",
    "alibi": "-slope * |position - key| added per score in-kernel",
    "softcap": "softcap * tanh(s / softcap) per score; the backward multiplies dS by 1 - tanh^2",
    "block_sparse": "tiles whose sparse blocks are all False are skipped before any load or GEMM",
    "key_padding": "padded keys get -inf per score inside visited tiles",
    "varlen": "one task per (sequence, head, tile) over the packed rows; tiles past a sequence's end are skipped",
    "decoding": "the key blocks a query tile sees are split over tasks (plan.key_splits) and merged by LSE",
    "dropout": "counter-based (splitmix64 of seed, b, h, i, j) in-kernel; the backward redraws the same mask",
}


def _compute_dtype(spec):
    return np.float64 if spec.dtype == "float64" else np.float32


def _scaled(q, spec):
    """q * scale * log2(e): the kernels' GEMM then yields scores ready for exp2 (a linear-size copy)."""
    return q * q.dtype.type(spec.softmax_scale * LOG2E)


def _frozen(x, dtype, broadcast_axes: int = 0):
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
def _dummy(dtype, ndim: int):
    return _frozen(np.zeros((1,) * ndim, dtype), dtype)


def _features(spec, extras, dtype):
    """The kernels' ``Features`` for a call (cached for plain calls, which carry no arrays)."""
    if not (spec.window or spec.mask or spec.alibi or spec.softcap or spec.block_size or spec.key_padding
            or spec.varlen or spec.dropout_p):
        return _plain_features(np.dtype(dtype), spec.causal, spec.group_size, spec.align == "bottom-right")
    left, right = spec.window if spec.window is not None else (None, None)
    sparse_q, sparse_k = spec.block_size if spec.block_size is not None else (0, 0)
    return _kernels().Features(
        group_size=spec.group_size,
        causal=spec.causal,
        bottom_right=spec.align == "bottom-right",
        window_left=-1 if left is None else left,
        window_right=-1 if right is None else right,
        softcap=float(spec.softcap or 0.0),
        alibi=spec.alibi,
        slopes=_frozen(extras.alibi_slopes, dtype, 2) if spec.alibi else _dummy(dtype, 2),
        mask_kind={None: 0, "bool": 1, "additive": 2}[spec.mask],
        bool_mask=_frozen(extras.attn_mask, np.bool_, 4) if spec.mask == "bool" else _dummy(np.bool_, 4),
        additive_mask=_frozen(extras.attn_mask, dtype, 4) if spec.mask == "additive" else _dummy(dtype, 4),
        key_padding=spec.key_padding,
        padding=_frozen(extras.key_padding_mask, np.bool_) if spec.key_padding else _dummy(np.bool_, 2),
        sparse_q=sparse_q,
        sparse_k=sparse_k,
        block_mask=_frozen(extras.block_mask, np.bool_, 2) if spec.block_size else _dummy(np.bool_, 4),
        dropout_p=float(spec.dropout_p),
        dropout_seed=int(extras.dropout_seed or 0),
        varlen=spec.varlen,
        cu_q=_frozen(extras.cu_seqlens_q, np.int64) if spec.varlen else _dummy(np.int64, 1),
        cu_k=_frozen(extras.cu_seqlens_k, np.int64) if spec.varlen else _dummy(np.int64, 1),
        row_pass=bool(spec.softcap or spec.alibi or spec.mask or spec.key_padding),
    )


@functools.lru_cache(maxsize=None)
def _plain_features(dtype, causal: bool, group_size: int, bottom_right: bool):
    return _kernels().Features(
        group_size=group_size, causal=causal, bottom_right=bottom_right, window_left=-1, window_right=-1,
        softcap=0.0, alibi=False, slopes=_dummy(dtype.type, 2), mask_kind=0, bool_mask=_dummy(np.bool_, 4),
        additive_mask=_dummy(dtype.type, 4), key_padding=False, padding=_dummy(np.bool_, 2), sparse_q=0, sparse_k=0,
        block_mask=_dummy(np.bool_, 4), dropout_p=0.0, dropout_seed=0, varlen=False, cu_q=_dummy(np.int64, 1),
        cu_k=_dummy(np.int64, 1), row_pass=False,
    )


@register
class NumbaBackend(Backend):
    name = "numba"
    summary = "CPUs: tiled FlashAttention-2 compiled by Numba, parallel over batch x heads x blocks, tile GEMMs in BLAS"
    extra = "numba"
    compute_kind = "numpy"
    capabilities = Capabilities(
        device_kinds=frozenset({"cpu"}),
        dtypes=frozenset({"float64", "float32", "float16", "bfloat16"}),
        max_head_dim=1024,
        features=frozenset(FEATURE_NOTES),
        feature_notes=FEATURE_NOTES,
        notes=("float16 and bfloat16 inputs are computed in float32", "float64 inputs are computed in float64"),
    )
    auto_priority = {"cpu": 10}

    def _check_available(self) -> list[str]:
        return self._missing_modules((
            ("numba", "the kernels are compiled by numba"),
            ("scipy", "numba's np.dot calls SciPy's BLAS"),
            ("threadpoolctl", "BLAS must be kept to one thread inside numba's threads"),
        ))

    def device(self, spec):
        return probe.probe_cpu()

    def forward(self, q, k, v, spec, plan, extras):
        dtype = _compute_dtype(spec)
        q, k, v = (np.ascontiguousarray(x, dtype=dtype) for x in (q, k, v))
        out = np.empty_like(q)
        lse = np.empty(q.shape[:3], dtype)
        features = _features(spec, extras, dtype)
        with _run_with(plan.threads):
            _kernels().forward(_scaled(q, spec), k, v, out, lse, features, plan.block_q, plan.block_k, plan.key_splits)
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, spec, plan, extras):
        dtype = _compute_dtype(spec)
        grad_out, q, k, v, out = (np.ascontiguousarray(x, dtype=dtype) for x in (grad_out, q, k, v, out))
        lse = np.ascontiguousarray(lse, dtype=dtype)
        delta = np.einsum("bhnd,bhnd->bhn", grad_out, out)  # rowsum(dO * O), the softmax-Jacobian term (dropout too)
        dq, dk, dv = np.zeros_like(q), np.empty_like(k), np.empty_like(v)
        kernels = _kernels()
        features = _features(spec, extras, dtype)
        block_q, block_k = plan.backward_block_q, plan.backward_block_k
        q_scaled, scale = _scaled(q, spec), dtype(spec.softmax_scale)
        key_blocks = -(-spec.seqlen_k // block_k)
        with _run_with(plan.threads):
            if plan.backward_dq_separate:
                kernels.backward_key_pass(q, q_scaled, k, v, grad_out, lse, delta, dq, dk, dv, scale, features,
                                          block_q, block_k, 1, False)
                kernels.backward_query_pass(q_scaled, k, v, grad_out, lse, delta, dq, scale, features, block_q, block_k)
            else:  # a task owns all of a K/V head's key blocks, so it may add into that group's dQ rows
                kernels.backward_key_pass(q, q_scaled, k, v, grad_out, lse, delta, dq, dk, dv, scale, features,
                                          block_q, block_k, max(1, key_blocks), True)
        return dq, dk, dv

    def dropout_keep(self, spec, extras):
        """keep[b, h, i, j] = u >= dropout_p, u = the top 53 bits of z / 2**53 with (uint64, wrapping)
        z = mix(mix(mix(mix(seed + G*(b+1)) + G*(h+1)) + G*(i+1)) + G*(j+1)), ``mix`` splitmix64's
        finalizer and G = 0x9E3779B97F4A7C15; varlen: b is the sequence, i and j its own row and key."""
        keep = np.empty((spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k), np.bool_)
        _kernels().dropout_keep(_features(spec, extras, _compute_dtype(spec)), keep)
        return keep
