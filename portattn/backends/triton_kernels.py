"""FlashAttention-2 kernels in Triton: forward, and the backward split in three (delta, dK/dV, dQ).

Layout: every tensor is addressed through its (batch, head, seqlen, head_dim) strides, so a
contiguous (B, H, N, D) tensor and a transposed view of a (B, N, H, D) one both work without a copy.
The LSE and delta are contiguous float32 (B, H, Nq) tensors made by the caller.

Conventions shared by all kernels:

* scores are computed as ``(q @ k^T) * qk_scale`` with ``qk_scale = softmax_scale * log2(e)``, in
  float32, so the softmax runs on ``exp2``; the LSE is stored in natural log (``* ln 2``).
* causal masking is top-left aligned: key ``j`` is visible to query ``i`` iff ``j <= i``. Key
  blocks the mask rules out entirely are never visited; only blocks that straddle the diagonal or
  the end of the sequence are masked (``MASKED`` is a constexpr, so the unmasked loop carries no
  mask arithmetic at all).
* ``BLOCK_D`` is the head dim rounded up to a power of two (the plan's ``head_dim_padded``); the
  padding columns are masked on load (zeros) and on store. ``EVEN_D`` (head dim == BLOCK_D) drops
  those masks, so the loads of the common head dims (64, 128) are unmasked, full-width copies.
* ``IN_PRECISION`` is the ``tl.dot`` input precision: "ieee" for float32 inputs (exact float32
  products; the conformance bounds for float32 do not admit tf32's 2^-11 rounding), ignored by
  Triton for float16/bfloat16, whose products are exact in the float32 accumulator anyway.

Block sizes, warps and stages are launch parameters chosen by the planner; nothing here picks them.
Each distinct set of constexprs compiles once and is cached by ``triton.jit``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _mma(a, b, acc, IN_PRECISION: tl.constexpr):
    """``a @ b (+ acc)`` in float32 accumulation. ``IN_PRECISION == "upcast"`` widens both operands to
    float32 first (the products of 16-bit inputs are exact in float32, so the result is the same);
    the backend asks for it only for bfloat16 under TRITON_INTERPRET=1, whose ``tl.dot`` mishandles
    bfloat16 operands (Triton 3.x interpreter)."""
    if IN_PRECISION == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=IN_PRECISION)
    return out


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; rows past ``n_rows`` (when ``CHECK_ROWS``) and padding columns read 0."""
    if CHECK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_rows(ptrs, tile, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, tile, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
               start, stop, N_K, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, IN_PRECISION: tl.constexpr):
    """Key blocks [start, stop): online softmax into (acc, l_i, m_i), all float32, log2 domain.

    Unmasked blocks hold only finite scores, so the running max is finite after the first of them
    and needs no guard; masked blocks may leave a row with no visible key yet (max = -inf), which
    is shifted by 0 instead so that exp2 sees -inf - 0 = -inf, not NaN."""
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_ptrs + start_n * stride_kn, cols, N_K, offs_d, HEAD_DIM, MASKED, EVEN_D)
        qk = _mma(q, tl.trans(k), None, IN_PRECISION) * qk_scale
        if MASKED:
            visible = cols[None, :] < N_K
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None])
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_ptrs + start_n * stride_vn, cols, N_K, offs_d, HEAD_DIM, MASKED, EVEN_D)
        acc = acc * alpha[:, None]
        acc = _mma(p.to(v.dtype), v, acc, IN_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_forward(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od, stride_os,
    H, N_Q, N_K, qk_scale, KEYS_PER_SPLIT,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IN_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head), over keys [split * KEYS_PER_SPLIT,
    (split + 1) * KEYS_PER_SPLIT) (a multiple of BLOCK_N). Grid (cdiv(N_Q, BLOCK_M), B * H, splits).

    With one split, O and LSE are the results; with several (flash-decoding, when the plan splits
    the key loop to fill the device) they are per-split partials, ``stride_os`` apart, that the
    caller merges by log-sum-exp.
    """
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    block = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first so the grid ends on short work
        block = tl.num_programs(0) - 1 - block
    start_m = block * BLOCK_M
    bh = tl.program_id(1)
    split = tl.program_id(2)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    O += off_b * stride_ob + off_h * stride_oh + split.to(tl.int64) * stride_os
    LSE += split.to(tl.int64) * (tl.num_programs(1) * N_Q).to(tl.int64)
    q = _load_rows(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, offs_m, N_Q, offs_d, HEAD_DIM, True, EVEN_D)
    k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # keys this block can see at all: all of them, or (causal) those up to its last row
    if CAUSAL:
        hi = tl.minimum(N_K, start_m + BLOCK_M)
        full = tl.minimum((start_m // BLOCK_N) * BLOCK_N, (N_K // BLOCK_N) * BLOCK_N)  # blocks left of the diagonal
    else:
        hi = N_K
        full = (N_K // BLOCK_N) * BLOCK_N
    lo = split * KEYS_PER_SPLIT  # this split's keys: [lo, lo + KEYS_PER_SPLIT), cut to what is visible
    hi = tl.minimum(hi, lo + KEYS_PER_SPLIT)
    full = tl.maximum(lo, tl.minimum(full, hi))
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               lo, full, N_K, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, EVEN_D, IN_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               full, hi, N_K, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, True, EVEN_D, IN_PRECISION)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw no key: O = 0
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    _store_rows(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
                offs_m, N_Q, offs_d, HEAD_DIM, EVEN_D)
    tl.store(LSE + bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


# ---------------------------------------------------------------------------------------------
# backward: delta = rowsum(dO * O)
# ---------------------------------------------------------------------------------------------


@triton.jit
def attention_backward_delta(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                   offs_m, N_Q, offs_d, HEAD_DIM, True, EVEN_D).to(tl.float32)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                    offs_m, N_Q, offs_d, HEAD_DIM, True, EVEN_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


# ---------------------------------------------------------------------------------------------
# backward: dK, dV -- a program owns BLOCK_N keys and streams the query blocks that see them;
# with DQ_ATOMIC it also adds each block's share of dQ into a float32 buffer (FA2's fused form)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don, stride_dqn,
                offs_n, offs_m, offs_d, start, stop, N_Q, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr):
    """Query blocks [start, stop). ``MASKED``: blocks on the causal diagonal. Query rows past N_Q
    load q = dO = 0, lse = delta = 0, so they add exactly zero to dK and dV and need no mask."""
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < N_Q
        q = _load_rows(q_ptrs + start_m * stride_qn, rows, N_Q, offs_d, HEAD_DIM, True, EVEN_D)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # a row that sees no key: P = 0
        qkT = _mma(k, tl.trans(q), None, IN_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASKED:
            pT = tl.where(offs_n[:, None] <= rows[None, :], pT, 0.0)
        do = _load_rows(do_ptrs + start_m * stride_don, rows, N_Q, offs_d, HEAD_DIM, True, EVEN_D)
        dv = _mma(pT.to(do.dtype), do, dv, IN_PRECISION)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        dpT = _mma(v, tl.trans(do), None, IN_PRECISION)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = _mma(dsT, q, dk, IN_PRECISION)
        if DQ_ATOMIC:
            dq = _mma(tl.trans(dsT), k, None, IN_PRECISION)  # (BLOCK_M, BLOCK_D); scaled once at the end
            tl.atomic_add(dq_ptrs + start_m * stride_dqn, dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def attention_backward_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_K, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr,
):
    """Grid (cdiv(N_K, BLOCK_N), B * H). ``DQ_ACC``: a contiguous float32 (B, H, N_Q, BLOCK_D)
    buffer of zeros when ``DQ_ATOMIC`` (unscaled dQ is added into it), else unused."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_rows(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, N_K, offs_d, HEAD_DIM, True, EVEN_D)
    v = _load_rows(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   offs_n, N_K, offs_d, HEAD_DIM, True, EVEN_D)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    dq_ptrs = DQ_ACC + bh.to(tl.int64) * N_Q * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :]
    lse_ptr = LSE + bh.to(tl.int64) * N_Q
    delta_ptr = DELTA + bh.to(tl.int64) * N_Q

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:
        # query i sees key j iff j <= i: blocks before this key block's first key see none of it;
        # blocks starting at or after its last key see all of it
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag = tl.minimum(lo + tl.cdiv(start_n + BLOCK_N - lo, BLOCK_M) * BLOCK_M, tl.cdiv(N_Q, BLOCK_M) * BLOCK_M)
        diag = tl.maximum(diag, lo)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don, BLOCK_D,
                             offs_n, offs_m, offs_d, lo, diag, N_Q, qk_scale, HEAD_DIM, BLOCK_M, True, EVEN_D,
                             DQ_ATOMIC, IN_PRECISION)
    else:
        diag = 0
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don, BLOCK_D,
                         offs_n, offs_m, offs_d, diag, N_Q, N_Q, qk_scale, HEAD_DIM, BLOCK_M, False, EVEN_D,
                         DQ_ATOMIC, IN_PRECISION)

    dk *= sm_scale
    _store_rows(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                dk.to(DK.dtype.element_ty), offs_n, N_K, offs_d, HEAD_DIM, EVEN_D)
    _store_rows(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                dv.to(DV.dtype.element_ty), offs_n, N_K, offs_d, HEAD_DIM, EVEN_D)


# ---------------------------------------------------------------------------------------------
# backward: dQ -- a program owns BLOCK_M queries and streams the key blocks they see (no atomics)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
              start, stop, N_K, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, IN_PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_ptrs + start_n * stride_kn, cols, N_K, offs_d, HEAD_DIM, MASKED, EVEN_D)
        qk = _mma(q, tl.trans(k), None, IN_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            visible = cols[None, :] < N_K
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None])
            p = tl.where(visible, p, 0.0)
        v = _load_rows(v_ptrs + start_n * stride_vn, cols, N_K, offs_d, HEAD_DIM, MASKED, EVEN_D)
        dp = _mma(do, tl.trans(v), None, IN_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, IN_PRECISION)
    return dq


@triton.jit
def attention_backward_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N_Q, N_K, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IN_PRECISION: tl.constexpr,
):
    """Grid (cdiv(N_Q, BLOCK_M), B * H)."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    block = tl.program_id(0)
    if CAUSAL:  # longest rows first, as in the forward
        block = tl.num_programs(0) - 1 - block
    start_m = block * BLOCK_M
    bh = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N_Q

    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                   offs_m, N_Q, offs_d, HEAD_DIM, True, EVEN_D)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                    offs_m, N_Q, offs_d, HEAD_DIM, True, EVEN_D)
    lse = tl.load(LSE + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # a row that sees no key: P = 0
    delta = tl.load(DELTA + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        hi = tl.minimum(N_K, start_m + BLOCK_M)
        full = tl.minimum((start_m // BLOCK_N) * BLOCK_N, (N_K // BLOCK_N) * BLOCK_N)
    else:
        hi = N_K
        full = (N_K // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                   0, full, N_K, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, False, EVEN_D, IN_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                   full, hi, N_K, qk_scale, HEAD_DIM, BLOCK_N, CAUSAL, True, EVEN_D, IN_PRECISION)
    dq *= sm_scale
    _store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                dq.to(DQ.dtype.element_ty), offs_m, N_Q, offs_d, HEAD_DIM, EVEN_D)
