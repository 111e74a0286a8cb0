"""Numba CPU kernels: FlashAttention-2 forward and backward over (B, H, N, D) float arrays.

Each parallel task owns one tile of rows (``prange`` over batch x heads x blocks), streams the other
operand through in blocks, and keeps only tile-sized scratch: memory is linear in N. The GEMMs on
tiles go through BLAS (``np.dot`` with an ``out`` buffer, which numba lowers to sgemm/dgemm); the
softmax runs in log2 space with the scale folded in, as the GPU kernels do, so one ``exp2`` per
score. State names follow the other backends: ``m_i`` (running max), ``l_i`` (running sum),
``acc`` (unnormalized output).

Callers must run these with BLAS limited to one thread (see numba_cpu.py): numba's worker threads
already use every core, and a multi-threaded BLAS inside each of them oversubscribes the machine.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# 2**f on [-0.5, 0.5]: 1 + f * P(f), the minimax polynomial of Cephes' exp2f (relative error
# ~1e-7, float32's own rounding). Written out so LLVM vectorizes it; libm's exp is a scalar call.
_EXP2_P = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3,
           5.550332471162809e-2, 2.402264791363012e-1, 6.931472028550421e-1)
_EXP2_FLOOR = -125.0  # below this 2**t is under float32's normal range; 2**-125 ~ 2e-38 is as good as 0


def exp2_shifted(row, shift, exponent_bits):
    """``row[j] = 2 ** (row[j] - shift)`` in place; returns the row's new sum. ``exponent_bits`` is
    int32 scratch at least as long as ``row``."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(exp2_shifted, inline="always")
def _exp2_shifted_impl(row, shift, exponent_bits):
    if row.dtype == types.float32:
        # float32 constants throughout: a float64 one would promote the loop and halve its lanes
        p0, p1, p2, p3, p4, p5 = (np.float32(c) for c in _EXP2_P)
        floor, half, one = np.float32(_EXP2_FLOOR), np.float32(0.5), np.float32(1.0)

        def exp2_float32(row, shift, exponent_bits):
            # 2**t = 2**n * 2**f with n = round(t), f in [-0.5, 0.5]: the polynomial gives 2**f, and
            # adding n to the float's exponent field multiplies by 2**n without a libm call.
            # (np.floor, not math.floor: the latter returns int64, which AVX2 cannot convert in vectors.)
            for j in range(row.size):
                x = max(row[j] - shift, floor)
                n = np.floor(x + half)
                f = x - n
                row[j] = one + f * (((((p0 * f + p1) * f + p2) * f + p3) * f + p4) * f + p5)
                exponent_bits[j] = np.int32(n) << 23
            bits = row.view(np.int32)
            for j in range(row.size):
                bits[j] += exponent_bits[j]
            return row.sum()

        return exp2_float32

    def exp2_generic(row, shift, exponent_bits):  # float64: accuracy over speed
        for j in range(row.size):
            row[j] = np.exp2(row[j] - shift)
        return row.sum()

    return exp2_generic


@njit(inline="always")
def _ceil_div(a, b):
    return -(-a // b)


@njit(inline="always")
def _visible(row, causal, cols, j0):
    """Keys of a block (starting at key j0, ``cols`` wide) that query ``row`` may see."""
    if not causal:
        return cols
    return max(0, min(cols, row - j0 + 1))


@njit(inline="always")
def _causal_key_blocks(i1, seqlen_k, block_k, causal, key_blocks):
    """Key blocks a query tile ending before row ``i1`` must visit (whole blocks past it skipped)."""
    if not causal:
        return key_blocks
    return min(key_blocks, _ceil_div(min(i1, seqlen_k), block_k))


@njit(parallel=True, fastmath=True, cache=True)
def forward(q_scaled, k, v, out, lse, causal, block_q, block_k, key_splits):
    """O and LSE (natural log) for (B, H, N, D) arrays into ``out``/``lse`` (both of q's dtype).

    ``q_scaled`` is q times the softmax scale times log2(e): the scores come out of the GEMM
    ready for ``exp2``, with no pass over the tile to scale them.

    With ``key_splits > 1`` each query tile's key loop is cut in that many independent tasks whose
    partial results are merged by log-sum-exp afterwards (flash-decoding).
    """
    batch, heads, seqlen_q, head_dim = q_scaled.shape
    seqlen_k = k.shape[2]
    query_blocks = _ceil_div(seqlen_q, block_q)
    key_blocks = _ceil_div(seqlen_k, block_k)
    blocks_per_split = _ceil_div(key_blocks, key_splits)
    part_out = np.empty((key_splits, batch, heads, seqlen_q, head_dim), out.dtype) if key_splits > 1 else out[None]
    part_lse = np.empty((key_splits, batch, heads, seqlen_q), lse.dtype) if key_splits > 1 else lse[None]
    tasks = batch * heads * query_blocks * key_splits
    for task in prange(tasks):
        split = task % key_splits
        query_block = (task // key_splits) % query_blocks
        bh = task // (key_splits * query_blocks)
        b, h = bh // heads, bh % heads
        i0 = query_block * block_q
        i1 = min(i0 + block_q, seqlen_q)
        rows = i1 - i0
        first = split * blocks_per_split
        last = min(first + blocks_per_split, _causal_key_blocks(i1, seqlen_k, block_k, causal, key_blocks))

        acc = np.zeros((rows, head_dim), out.dtype)
        pv = np.empty((rows, head_dim), out.dtype)
        m_i = np.full(rows, -np.inf, out.dtype)
        l_i = np.zeros(rows, out.dtype)
        scores = np.empty(rows * block_k, out.dtype)
        exponent_bits = np.empty(block_k, np.int32)
        q_tile = q_scaled[b, h, i0:i1]
        for key_block in range(first, last):
            j0 = key_block * block_k
            j1 = min(j0 + block_k, seqlen_k)
            cols = j1 - j0
            s = scores[: rows * cols].reshape(rows, cols)
            np.dot(q_tile, k[b, h, j0:j1].T, s)
            for r in range(rows):
                visible = _visible(i0 + r, causal, cols, j0)
                row = s[r]
                if visible == 0:
                    row[:] = 0.0
                    continue
                m_new = max(m_i[r], row[:visible].max())
                alpha = np.exp2(m_i[r] - m_new)  # 0 on the first visible block (m_i = -inf)
                l_i[r] = l_i[r] * alpha + exp2_shifted(row[:visible], m_new, exponent_bits)
                row[visible:] = 0.0
                m_i[r] = m_new
                if alpha != 1.0:  # the max moved: rescale what was summed under the old one
                    acc[r] *= alpha
            np.dot(s, v[b, h, j0:j1], pv)
            acc += pv
        for r in range(rows):
            if l_i[r] > 0.0:
                part_out[split, b, h, i0 + r] = acc[r] / l_i[r]
                part_lse[split, b, h, i0 + r] = (m_i[r] + np.log2(l_i[r])) * LN2
            else:  # no visible key: zeros and -inf, never NaN
                part_out[split, b, h, i0 + r] = 0.0
                part_lse[split, b, h, i0 + r] = -np.inf
    if key_splits > 1:
        _merge_splits(part_out, part_lse, out, lse)


@njit(parallel=True, fastmath=True, cache=True)
def _merge_splits(part_out, part_lse, out, lse):
    """out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s(lse_s); empty rows stay zero."""
    splits, batch, heads, seqlen_q, _ = part_out.shape
    for row in prange(batch * heads * seqlen_q):
        b = row // (heads * seqlen_q)
        h = (row // seqlen_q) % heads
        i = row % seqlen_q
        top = -np.inf
        for s in range(splits):
            top = max(top, part_lse[s, b, h, i])
        out[b, h, i] = 0.0
        if top == -np.inf:
            lse[b, h, i] = -np.inf
            continue
        total = 0.0
        for s in range(splits):
            total += np.exp(part_lse[s, b, h, i] - top)
        for s in range(splits):
            weight = np.exp(part_lse[s, b, h, i] - top) / total
            out[b, h, i] += weight * part_out[s, b, h, i]
        lse[b, h, i] = top + np.log(total)


@njit(inline="always")
def _probabilities_and_ds(q_scaled_tile, k_tile, v_tile, do_tile, lse_log2, delta, i0, j0, causal, p, dp, exponent_bits):
    """Recompute P = exp2(q_scaled k^T - LSE * log2e) for one tile, then dS = P * (dP - delta)
    into ``dp`` (entries past the causal edge are zero in both)."""
    rows, cols = p.shape
    np.dot(q_scaled_tile, k_tile.T, p)
    np.dot(do_tile, v_tile.T, dp)
    for r in range(rows):
        visible = _visible(i0 + r, causal, cols, j0)
        row = p[r]
        if visible == 0 or lse_log2[r] == -np.inf:
            row[:] = 0.0
            dp[r] = 0.0
            continue
        exp2_shifted(row[:visible], lse_log2[r], exponent_bits)
        row[visible:] = 0.0
        for j in range(cols):
            dp[r, j] = row[j] * (dp[r, j] - delta[r])


@njit(parallel=True, fastmath=True, cache=True)
def backward_key_pass(q, q_scaled, k, v, do, lse, delta, dq, dk, dv, scale, causal, block_q, block_k, key_blocks_per_task, accumulate_dq):
    """dK, dV (and dQ when ``accumulate_dq``) for (B, H, N, D) arrays; ``delta`` = rowsum(dO * O).

    A task owns ``key_blocks_per_task`` consecutive key blocks of one head and streams every query
    tile that sees them. dQ may only be accumulated here when a task owns all of a head's key
    blocks, so no two tasks add into the same dQ rows. ``q_scaled`` is q times scale times
    log2(e) (see ``forward``); ``scale`` is a scalar of the arrays' dtype.
    """
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    key_blocks = _ceil_div(seqlen_k, block_k)
    query_blocks = _ceil_div(seqlen_q, block_q)
    tasks_per_head = _ceil_div(key_blocks, key_blocks_per_task)
    for task in prange(batch * heads * tasks_per_head):
        bh = task // tasks_per_head
        b, h = bh // heads, bh % heads
        first = (task % tasks_per_head) * key_blocks_per_task
        p = np.empty(block_q * block_k, dq.dtype)
        dp = np.empty(block_q * block_k, dq.dtype)
        grad_tile = np.empty((block_k, head_dim), dq.dtype)
        dq_tile = np.empty((block_q, head_dim), dq.dtype)
        lse_log2 = np.empty(block_q, dq.dtype)
        exponent_bits = np.empty(block_k, np.int32)
        for key_block in range(first, min(first + key_blocks_per_task, key_blocks)):
            j0 = key_block * block_k
            j1 = min(j0 + block_k, seqlen_k)
            cols = j1 - j0
            dk_acc = np.zeros((cols, head_dim), dq.dtype)
            dv_acc = np.zeros((cols, head_dim), dq.dtype)
            first_query_block = j0 // block_q if causal else 0  # earlier queries see none of these keys
            for query_block in range(first_query_block, query_blocks):
                i0 = query_block * block_q
                i1 = min(i0 + block_q, seqlen_q)
                rows = i1 - i0
                pt = p[: rows * cols].reshape(rows, cols)
                ds = dp[: rows * cols].reshape(rows, cols)
                for r in range(rows):
                    lse_log2[r] = lse[b, h, i0 + r] * LOG2E
                _probabilities_and_ds(q_scaled[b, h, i0:i1], k[b, h, j0:j1], v[b, h, j0:j1], do[b, h, i0:i1],
                                      lse_log2, delta[b, h, i0:i1], i0, j0, causal, pt, ds, exponent_bits)
                g = grad_tile[:cols]
                np.dot(pt.T, do[b, h, i0:i1], g)
                dv_acc += g
                np.dot(ds.T, q[b, h, i0:i1], g)
                dk_acc += g
                if accumulate_dq:
                    gq = dq_tile[:rows]
                    np.dot(ds, k[b, h, j0:j1], gq)
                    dq[b, h, i0:i1] += gq * scale
            dk[b, h, j0:j1] = dk_acc * scale
            dv[b, h, j0:j1] = dv_acc


@njit(parallel=True, fastmath=True, cache=True)
def backward_query_pass(q_scaled, k, v, do, lse, delta, dq, scale, causal, block_q, block_k):
    """dQ alone, a task per query tile: used when tasks of the key pass share heads."""
    batch, heads, seqlen_q, head_dim = q_scaled.shape
    seqlen_k = k.shape[2]
    key_blocks = _ceil_div(seqlen_k, block_k)
    query_blocks = _ceil_div(seqlen_q, block_q)
    for task in prange(batch * heads * query_blocks):
        bh = task // query_blocks
        b, h = bh // heads, bh % heads
        i0 = (task % query_blocks) * block_q
        i1 = min(i0 + block_q, seqlen_q)
        rows = i1 - i0
        p = np.empty(rows * block_k, dq.dtype)
        dp = np.empty(rows * block_k, dq.dtype)
        dq_acc = np.zeros((rows, head_dim), dq.dtype)
        gq = np.empty((rows, head_dim), dq.dtype)
        lse_log2 = np.empty(rows, dq.dtype)
        exponent_bits = np.empty(block_k, np.int32)
        for r in range(rows):
            lse_log2[r] = lse[b, h, i0 + r] * LOG2E
        for key_block in range(_causal_key_blocks(i1, seqlen_k, block_k, causal, key_blocks)):
            j0 = key_block * block_k
            j1 = min(j0 + block_k, seqlen_k)
            cols = j1 - j0
            pt = p[: rows * cols].reshape(rows, cols)
            ds = dp[: rows * cols].reshape(rows, cols)
            _probabilities_and_ds(q_scaled[b, h, i0:i1], k[b, h, j0:j1], v[b, h, j0:j1], do[b, h, i0:i1],
                                  lse_log2, delta[b, h, i0:i1], i0, j0, causal, pt, ds, exponent_bits)
            np.dot(ds, k[b, h, j0:j1], gq)
            dq_acc += gq
        dq[b, h, i0:i1] = dq_acc * scale
