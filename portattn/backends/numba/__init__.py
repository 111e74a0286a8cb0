"""``numba``: FlashAttention-2 on the CPU, compiled by Numba (kernels in kernels.py, their arguments made in launch.py).

Executes the planner's CPU plan: tile sizes, worker threads and key splits come from the plan; the
kernels never choose them. Tile products run in the BLAS that blas.py finds: MKL where the process has it
(torch's CPU library), else SciPy's OpenBLAS. With MKL, bfloat16 inputs stay bfloat16 and their products
run as bf16 GEMMs with float32 sums (P and dS rounded to bfloat16 for theirs, as on GPUs) -- the forward's
on torch's own AMX micro-kernel where the CPU has AMX, with K and V packed once per call; otherwise
float16/bfloat16 inputs are widened to float32 (a linear-size copy, made by serial numba loops:
operands.py) and computed there. bfloat16 results are narrowed back the same way; float64 inputs are
computed in float64.

Every feature runs in the same kernels, described to them by one ``Features`` tuple (``_features``):
the feature arrays are handed over read-only and C-contiguous in fixed dtypes, with broadcast axes
cut back to length 1 (never expanded), and absent ones replaced by 1-element dummies -- so each
compute dtype compiles once, and a plain call reuses a cached tuple.
"""
from __future__ import annotations

import numpy as np

from ...devices import probe
from ..base import Backend, Capabilities, register
from . import launch

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


@register
class NumbaBackend(Backend):
    name = "numba"
    summary = ("CPUs: tiled FlashAttention-2 compiled by Numba, parallel over batch x heads x blocks, "
               "tile GEMMs in MKL or OpenBLAS")
    extra = "numba"
    compute_kind = "numpy"
    # widened and narrowed by serial numba loops: torch's conversions contend with numba's pool (operands.py)
    bfloat16_bits = True
    capabilities = Capabilities(
        device_kinds=frozenset({"cpu"}),
        dtypes=frozenset({"float64", "float32", "float16", "bfloat16"}),
        max_head_dim=1024,
        features=frozenset(FEATURE_NOTES),
        feature_notes=FEATURE_NOTES,
        notes=(("bfloat16 tile products run in bfloat16 (float32 sums) where MKL is loaded (torch's CPU library), "
                "the forward's on torch's AMX micro-kernel (cpublas::brgemm) where the CPU has AMX; else in float32"),
               "float16 inputs are computed in float32", "float64 inputs are computed in float64"),
        kvcache="decode.py: a task per (sequence, key split) streams every KV head's cache rows in place (pages through "
                "the block table), each row shared by its group's query heads; splits merged by LSE",
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
        steps = self.forward_decode_plan(spec)
        if steps is not None:  # few queries per sequence: the decode kernel (GQA packed, split-KV)
            from . import decode

            out, lse = decode.attention(q, k, v, spec, steps, extras)
            return launch.returned(out, q), lse
        dtype = launch.compute_dtype(spec)
        q_wide, k_wide, v_wide = (launch.product_operand(x, spec) for x in (q, k, v))
        out = np.empty(q.shape, dtype)
        lse = np.empty(q.shape[:3], dtype)
        features = launch.features(spec, extras, dtype)
        with launch.run_with(plan.threads, blas=launch.blas_may_thread(plan.block_q, plan.block_k, spec.head_dim, spec)):
            k_pairs, v_pairs = launch.packed_pairs(k_wide, v_wide, spec, plan.block_k)
            launch.kernels().forward(q_wide, k_wide, v_wide, out, lse, features, dtype(launch.log2_scale(spec)),
                                     plan.block_q, plan.block_k, plan.key_splits, k_pairs, v_pairs)
        return launch.returned(out, q), lse

    def backward(self, grad_out, q, k, v, out, lse, spec, plan, extras):
        dtype = launch.compute_dtype(spec)
        delta = launch.row_dots(grad_out, out, spec)  # rowsum(dO * O), the softmax-Jacobian term (dropout too)
        do, q_wide, k_wide, v_wide = (launch.product_operand(x, spec) for x in (grad_out, q, k, v))
        if launch.bfloat16_products(spec):  # the score GEMM scales (bf16 q scaled and rounded again would lose bits)
            q_scaled, q_factor = q_wide, dtype(launch.log2_scale(spec))
        else:
            q_scaled, q_factor = launch.operand(q, spec, launch.log2_scale(spec)), dtype(1.0)
        lse = np.ascontiguousarray(lse, dtype=dtype)
        dq, dk, dv = np.zeros(q.shape, dtype), np.empty(k.shape, dtype), np.empty(v.shape, dtype)
        kernels = launch.kernels()
        features = launch.features(spec, extras, dtype)
        block_q, block_k = plan.backward.block_q, plan.backward.block_k
        scale = dtype(spec.softmax_scale)
        key_blocks = -(-spec.seqlen_k // block_k)
        with launch.run_with(plan.threads, blas=launch.blas_may_thread(block_q, block_k, spec.head_dim, spec)):
            if plan.backward.dq_separate:
                kernels.backward_key_pass(q_wide, q_scaled, q_factor, k_wide, v_wide, do, lse, delta, dq, dk, dv,
                                          scale, features, block_q, block_k, 1, False)
                kernels.backward_query_pass(q_scaled, q_factor, k_wide, v_wide, do, lse, delta, dq, scale, features,
                                            block_q, block_k)
            else:  # a task owns all of a K/V head's key blocks, so it may add into that group's dQ rows
                kernels.backward_key_pass(q_wide, q_scaled, q_factor, k_wide, v_wide, do, lse, delta, dq, dk, dv,
                                          scale, features, block_q, block_k, max(1, key_blocks), True)
        return tuple(launch.returned(g, q) for g in (dq, dk, dv))

    def takes_decode(self, spec) -> bool:
        from . import decode  # imports numba: only when asked

        return decode.takes(spec)

    def decode_kvcache(self, q, k_cache, v_cache, block_table, lengths, spec, plan, extras):
        from . import decode  # imports numba: only when a decoding step runs

        return decode.run(q, k_cache, v_cache, block_table, lengths, spec, plan, extras)

    def dropout_keep(self, spec, extras):
        """keep[b, h, i, j] = u >= dropout_p, u = the top 53 bits of z / 2**53 with (uint64, wrapping)
        z = mix(mix(mix(mix(seed + G*(b+1)) + G*(h+1)) + G*(i+1)) + G*(j+1)), ``mix`` splitmix64's
        finalizer and G = 0x9E3779B97F4A7C15; varlen: b is the sequence, i and j its own row and key."""
        keep = np.empty((spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k), np.bool_)
        launch.kernels().dropout_keep(launch.features(spec, extras, launch.compute_dtype(spec)), keep)
        return keep
