"""``numba``: FlashAttention-2 on the CPU, compiled by Numba (kernels in numba_kernels.py).

Executes the planner's CPU plan: tile sizes, worker threads and key splits come from the plan; the
kernels never choose them. float16/bfloat16 inputs are widened to float32 (a linear-size copy) and
computed there; float64 inputs are computed in float64.
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


def _compute_dtype(spec):
    return np.float64 if spec.dtype == "float64" else np.float32


def _scaled(q, spec):
    """q * scale * log2(e): the kernels' GEMM then yields scores ready for exp2 (a linear-size copy)."""
    return q * q.dtype.type(spec.softmax_scale * LOG2E)


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
        notes=("float16 and bfloat16 inputs are computed in float32", "float64 inputs are computed in float64"),
    )
    auto_priority = {"cpu": 10}

    def _check_available(self) -> list[str]:
        missing = []
        for module, why in (
            ("numba", "the kernels are compiled by numba"),
            ("scipy", "numba's np.dot calls SciPy's BLAS"),
            ("threadpoolctl", "BLAS must be kept to one thread inside numba's threads"),
        ):
            try:
                __import__(module)
            except ImportError as error:
                missing.append(f"{module} is not installed ({why}; pip install 'portattn[numba]'): {error}")
        return missing

    def device(self, spec):
        return probe.probe_cpu()

    def forward(self, q, k, v, spec, plan, extras):
        dtype = _compute_dtype(spec)
        q, k, v = (np.ascontiguousarray(x, dtype=dtype) for x in (q, k, v))
        out = np.empty_like(q)
        lse = np.empty(q.shape[:3], dtype)
        with _run_with(plan.threads):
            _kernels().forward(_scaled(q, spec), k, v, out, lse, spec.causal, plan.block_q, plan.block_k, plan.key_splits)
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, spec, plan, extras):
        dtype = _compute_dtype(spec)
        grad_out, q, k, v, out = (np.ascontiguousarray(x, dtype=dtype) for x in (grad_out, q, k, v, out))
        lse = np.ascontiguousarray(lse, dtype=dtype)
        delta = np.einsum("bhnd,bhnd->bhn", grad_out, out)  # rowsum(dO * O), the softmax-Jacobian term
        dq, dk, dv = np.zeros_like(q), np.empty_like(k), np.empty_like(v)
        kernels = _kernels()
        block_q, block_k = plan.backward_block_q, plan.backward_block_k
        q_scaled, scale = _scaled(q, spec), dtype(spec.softmax_scale)
        key_blocks = -(-spec.seqlen_k // block_k)
        with _run_with(plan.threads):
            if plan.backward_dq_separate:
                kernels.backward_key_pass(q, q_scaled, k, v, grad_out, lse, delta, dq, dk, dv, scale, spec.causal, block_q, block_k, 1, False)
                kernels.backward_query_pass(q_scaled, k, v, grad_out, lse, delta, dq, scale, spec.causal, block_q, block_k)
            else:
                kernels.backward_key_pass(
                    q, q_scaled, k, v, grad_out, lse, delta, dq, dk, dv, scale, spec.causal, block_q, block_k, max(1, key_blocks), True
                )
        return dq, dk, dv
