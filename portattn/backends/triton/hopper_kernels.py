"""The Hopper (sm_90) forward in Triton: plain attention (causal or not, GQA) with the loads, loop
structure and softmax arithmetic chosen for what Triton 3.6+ lowers well on an H100/H200.

One program owns BLOCK_M query rows of one (batch, query head) and streams that head's K/V head in
BLOCK_N-key tiles. Grid (cdiv(N_Q, BLOCK_M), B * H): axis 0 varies fastest, so programs running side
by side share a K/V head in L2; causal grids run their longest blocks first, so they end on short work.

What differs from ``kernels.attention_forward`` (FlashAttention-2, any GPU):

* Loads (``LOADS``): ``"host"`` takes (B, H, N, D) TMA descriptors made on the host
  (``triton.tools.tensor_descriptor.TensorDescriptor``: the launcher encodes them once per call);
  ``"device"`` makes a 2-D (N, D) descriptor of this program's head in the kernel
  (``tl.make_tensor_descriptor``; needs ``triton.set_allocator`` for their global scratch); either
  way TMA fetches the tiles into shared memory asynchronously and reads rows past a head's end as
  zeros, so no load carries a mask. ``"pointer"`` reads through the strides with ``tl.load`` (any
  strides: the fallback where TMA's 16-byte rules are not met).
* Two loops instead of one masked everywhere: key tiles that every row of the block sees whole run
  with no mask arithmetic at all; only the tiles that cut the causal diagonal or run past N_K
  (``_key_ranges``) are masked, after them.
* exp2 with the scale folded in: scores stay raw (q.k) and ``qk_scale = scale * log2(e)`` enters as
  one fused multiply-add, ``s * qk_scale - m`` (for qk_scale > 0, max(s) * qk_scale = max(s * qk_scale)).
* ``LAZY_TAU > 0``: the accumulator is rescaled only when some row's running max (log2 units) grew by
  more than LAZY_TAU since it was last applied; otherwise the stale max stays and P's entries may
  reach 2^LAZY_TAU (exact: O and the LSE use the same stale max; 2^8 fits float16 and bfloat16).
* ``SPLIT_Q``: the block is two query sub-tiles of BLOCK_M / 2 rows with their own softmax state, so
  one sub-tile's P V product can run on the tensor cores while the other's softmax runs on the CUDA
  cores (FlashAttention-3's overlap, from independent work in one program).
* ``DEFER_PV``: in the unmasked loop each tile's O += P V is issued one iteration late, after the
  next tile's QK^T, so it runs on the tensor cores during that tile's softmax (FlashAttention-3's
  intra-warpgroup overlap, arranged so that Triton 3.6's wgmma waits allow it; ``_deferred_loop``).
* ``WARP_SPECIALIZE`` sets ``tl.range(warp_specialize=True)`` on the unmasked loop: Triton's automatic
  warp specialization. Off by default: on sm_90 Triton 3.6 (and 3.9) runs its Hopper pass, which here
  leaves the PTX unchanged at 8 warps and fails (WSDataPartition) on 64 x 64 tiles at 4 warps.

The LSE is stored as ``kernels.attention_forward`` stores it, so the existing backward reads it
unchanged: natural log, float32, (B, H, N_Q) contiguous; -inf for a row that sees no key (O = 0 there).
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """``a @ b (+ acc)`` in float32. ``UPCAST`` (bfloat16 under TRITON_INTERPRET=1 only) widens the
    operands first: the interpreter's tl.dot mishandles bfloat16 (see ``kernels._mma``)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _head_source(X, stride, off_b, off_h, n_rows, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 LOADS: tl.constexpr):
    """What ``_load_tile`` reads one head's rows from: the host descriptor itself, a 2-D (N, D)
    descriptor of the head made here, or the head's base pointer."""
    if LOADS == "host":
        src = X
    else:
        base = X + off_b.to(tl.int64) * stride[0] + off_h.to(tl.int64) * stride[1]
        if LOADS == "device":
            src = tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride[2], 1],
                                            block_shape=[BLOCK, HEAD_DIM])
        else:
            src = base
    return src


@triton.jit
def _load_tile(src, stride, off_b, off_h, row, n_rows, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
               LOADS: tl.constexpr, CHECK: tl.constexpr):
    """Rows [row, row + BLOCK) of a head as a (BLOCK, HEAD_DIM) tile; rows past ``n_rows`` read 0.
    TMA zero-fills them by itself; the pointer path masks only when ``CHECK`` (a tile that may run
    past the end)."""
    if LOADS == "host":
        tile = src.load([off_b, off_h, row, 0]).reshape([BLOCK, HEAD_DIM])
    elif LOADS == "device":
        tile = src.load([row, 0])
    else:
        rows = row + tl.arange(0, BLOCK)
        ptrs = src + rows[:, None].to(tl.int64) * stride[2] + tl.arange(0, HEAD_DIM)[None, :] * stride[3]
        if CHECK:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(dst, stride, off_b, off_h, row, n_rows, tile, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                LOADS: tl.constexpr):
    """Rows [row, row + BLOCK) of a head, those past ``n_rows`` dropped (TMA clips them itself)."""
    if LOADS == "host":
        dst.store([off_b, off_h, row, 0], tile.reshape([1, 1, BLOCK, HEAD_DIM]))
    elif LOADS == "device":
        dst.store([row, 0], tile)
    else:
        rows = row + tl.arange(0, BLOCK)
        ptrs = dst + rows[:, None].to(tl.int64) * stride[2] + tl.arange(0, HEAD_DIM)[None, :] * stride[3]
        tl.store(ptrs, tile, mask=rows[:, None] < n_rows)


@triton.jit
def _key_ranges(start_m, n_q, n_k, off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """``(full, hi)`` for the query rows [start_m, start_m + BLOCK_M): key tiles [0, full) are seen
    whole by every row (full a multiple of BLOCK_N); [full, hi) holds the tiles that need the mask --
    the causal diagonal (query i sees keys j <= i + off) and the tile that runs past n_k."""
    if CAUSAL:
        last = tl.minimum(start_m + BLOCK_M, n_q) - 1 + off  # key position of the block's last real row
        hi = tl.minimum(last + 1, n_k)
        full = (tl.maximum(tl.minimum(start_m + off + 1, n_k), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = n_k
        full = (n_k // BLOCK_N) * BLOCK_N
    return full, hi


@triton.jit
def _row_update(l_i, m_i, s, qk_scale, LAZY_TAU: tl.constexpr, MASKED: tl.constexpr):
    """The online softmax's row statistics for one score tile ``s`` (raw q.k, float32; -inf where
    masked), log2 domain. Returns ``(l_i, m_i, alpha, rescale, p)``: the new row sums (P's included)
    and maxima, the factor ``alpha`` the accumulator must be multiplied by before P V is added, whether
    that multiply is needed at all (``LAZY_TAU``: only when some row's max grew by more than LAZY_TAU
    since it was last applied; the stale max is kept otherwise, so P <= 2^LAZY_TAU), and
    P = exp2(s * qk_scale - m_i). A masked row that has seen no key yet keeps max 0 (P = exp2(-inf) = 0,
    not NaN); here such a row never sees a key later (masked tiles come last, a row's keys are a prefix)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASKED:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    if LAZY_TAU > 0:
        rescale = tl.max(m_new - m_i, 0) > LAZY_TAU  # one block-wide decision: all rows move, or none
        m_new = tl.where(rescale, m_new, m_i)
    else:
        rescale = True
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return l_i, m_new, alpha, rescale, p


@triton.jit
def _rescale(acc, alpha, rescale, LAZY_TAU: tl.constexpr):
    """``acc * alpha`` per row; with ``LAZY_TAU`` only when ``rescale`` (else alpha is 1 anyway)."""
    if LAZY_TAU > 0:
        if rescale:
            acc = acc * alpha[:, None]
    else:
        acc = acc * alpha[:, None]
    return acc


@triton.jit
def _masked(s, start_m, start_n, n_k, off, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """``s`` with -inf where key j is not visible to query i: j >= n_k, or j > i + off when causal."""
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    visible = cols[None, :] < n_k
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + off)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _tile(acc, l_i, m_i, q, start_m, k, v_src, stride_v, off_b, off_hk, start_n, n_k, off, qk_scale,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, LOADS: tl.constexpr,
          CAUSAL: tl.constexpr, MASKED: tl.constexpr, LAZY_TAU: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile (``k`` already loaded) for one query tile: S = q k^T, the softmax step, O += P V."""
    s = _dot(q, k.T, None, UPCAST)
    if MASKED:
        s = _masked(s, start_m, start_n, n_k, off, BLOCK_M, BLOCK_N, CAUSAL)
    l_i, m_i, alpha, rescale, p = _row_update(l_i, m_i, s, qk_scale, LAZY_TAU, MASKED)
    acc = _rescale(acc, alpha, rescale, LAZY_TAU)
    v = _load_tile(v_src, stride_v, off_b, off_hk, start_n, n_k, BLOCK_N, HEAD_DIM, LOADS, MASKED)
    acc = _dot(p.to(v.dtype), v, acc, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _deferred_loop(acc, l_i, m_i, q, k_src, v_src, stride_k, stride_v, off_b, off_hk, full, n_k, qk_scale,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, LOADS: tl.constexpr, LAZY_TAU: tl.constexpr,
                   UPCAST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """Key tiles [0, full), unmasked, with each tile's O += P V issued one iteration late: after the
    next tile's scores, so the tensor cores run it while the CUDA cores do that tile's softmax.
    (Triton 3.6 waits for every outstanding wgmma right after a QK^T product whose result the softmax
    reads; a P V product issued after that wait is the one that can overlap the softmax.)"""
    if full > 0:
        k = _load_tile(k_src, stride_k, off_b, off_hk, 0, n_k, BLOCK_N, HEAD_DIM, LOADS, False)
        l_i, m_i, alpha, rescale, p = _row_update(l_i, m_i, _dot(q, k.T, None, UPCAST), qk_scale, LAZY_TAU, False)
        for start_n in tl.range(BLOCK_N, full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            k = _load_tile(k_src, stride_k, off_b, off_hk, start_n, n_k, BLOCK_N, HEAD_DIM, LOADS, False)
            s = _dot(q, k.T, None, UPCAST)
            acc = _rescale(acc, alpha, rescale, LAZY_TAU)
            v = _load_tile(v_src, stride_v, off_b, off_hk, start_n - BLOCK_N, n_k, BLOCK_N, HEAD_DIM, LOADS, False)
            acc = _dot(p.to(v.dtype), v, acc, UPCAST)  # P carried in float32: converted here, it stays a register operand
            l_i, m_i, alpha, rescale, p = _row_update(l_i, m_i, s, qk_scale, LAZY_TAU, False)
        acc = _rescale(acc, alpha, rescale, LAZY_TAU)
        v = _load_tile(v_src, stride_v, off_b, off_hk, full - BLOCK_N, n_k, BLOCK_N, HEAD_DIM, LOADS, False)
        acc = _dot(p.to(v.dtype), v, acc, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _one_tile_loop(acc, l_i, m_i, q, start_m, k_src, v_src, stride_k, stride_v, off_b, off_hk, lo, hi, n_k, off,
                   qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   LOADS: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, LAZY_TAU: tl.constexpr,
                   UPCAST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """Key tiles [lo, hi) for one query tile."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = _load_tile(k_src, stride_k, off_b, off_hk, start_n, n_k, BLOCK_N, HEAD_DIM, LOADS, MASKED)
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, start_m, k, v_src, stride_v, off_b, off_hk, start_n, n_k, off,
                              qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, LOADS, CAUSAL, MASKED, LAZY_TAU, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _two_tile_loop(acc0, l0, m0, q0, acc1, l1, m1, q1, start_m, k_src, v_src, stride_k, stride_v, off_b, off_hk,
                   lo, hi, n_k, off, qk_scale, HALF: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   LOADS: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, LAZY_TAU: tl.constexpr,
                   UPCAST: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """Key tiles [lo, hi) for two query sub-tiles of HALF rows (``SPLIT_Q``): each K/V tile is loaded
    once; both score products come first (each is waited for at once), then sub-tile 0's softmax and
    its P V, which the tensor cores run during sub-tile 1's softmax."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = _load_tile(k_src, stride_k, off_b, off_hk, start_n, n_k, BLOCK_N, HEAD_DIM, LOADS, MASKED)
        s0 = _dot(q0, k.T, None, UPCAST)
        s1 = _dot(q1, k.T, None, UPCAST)
        if MASKED:
            s0 = _masked(s0, start_m, start_n, n_k, off, HALF, BLOCK_N, CAUSAL)
            s1 = _masked(s1, start_m + HALF, start_n, n_k, off, HALF, BLOCK_N, CAUSAL)
        l0, m0, alpha0, rescale0, p0 = _row_update(l0, m0, s0, qk_scale, LAZY_TAU, MASKED)
        acc0 = _rescale(acc0, alpha0, rescale0, LAZY_TAU)
        v = _load_tile(v_src, stride_v, off_b, off_hk, start_n, n_k, BLOCK_N, HEAD_DIM, LOADS, MASKED)
        acc0 = _dot(p0.to(v.dtype), v, acc0, UPCAST)
        l1, m1, alpha1, rescale1, p1 = _row_update(l1, m1, s1, qk_scale, LAZY_TAU, MASKED)
        acc1 = _rescale(acc1, alpha1, rescale1, LAZY_TAU)
        acc1 = _dot(p1.to(v.dtype), v, acc1, UPCAST)
    return acc0, l0, m0, acc1, l1, m1


@triton.jit
def _finish(o_dst, stride_o, LSE, off_b, off_h, bh, row, n_q, acc, l_i, m_i, q, BLOCK: tl.constexpr,
            HEAD_DIM: tl.constexpr, LOADS: tl.constexpr):
    """O = acc / l and LSE = (m + log2 l) * ln 2 for rows [row, row + BLOCK), stored as
    ``kernels.attention_forward`` stores them (a row that saw no key: O = 0, LSE = -inf; NaN stays NaN);
    O in the dtype of the query tile ``q``."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    lse = tl.where(l_i != l_i, l_i, lse)
    _store_tile(o_dst, stride_o, off_b, off_h, row, n_q, out.to(q.dtype), BLOCK, HEAD_DIM, LOADS)
    rows = row + tl.arange(0, BLOCK)
    tl.store(LSE + bh.to(tl.int64) * n_q + rows, lse, mask=rows < n_q)


@triton.jit
def hopper_attention_forward(
    Q, K, V, O, LSE, H, GROUP, N_Q, N_K, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    BOTTOM_RIGHT: tl.constexpr, LOADS: tl.constexpr, SPLIT_Q: tl.constexpr, DEFER_PV: tl.constexpr,
    LAZY_TAU: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (cdiv(N_Q, BLOCK_M), B * H). Q, K, V, O: (B, H or H_kv, N, D) host TMA descriptors when
    LOADS == "host", else views (tensor, strides) with the last stride 1 for "device"; LSE a
    contiguous float32 (B, H, N_Q). Query head h reads K/V head h // GROUP. ``qk_scale`` = scale *
    log2(e), > 0."""
    if LOADS == "host":
        stride_q = (0, 0, 0, 0)  # unused: the descriptors carry their strides
        stride_k = stride_q
        stride_v = stride_q
        stride_o = stride_q
    else:
        Q, stride_q = Q
        K, stride_k = K
        V, stride_v = V
        O, stride_o = O
    block = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first so the grid ends on short work
        block = tl.num_programs(0) - 1 - block
    start_m = block * BLOCK_M
    bh = tl.program_id(1)
    off_b = bh // H  # int32: descriptor coordinates are 32-bit; pointer offsets widen them (_head_source)
    off_h = bh % H
    off_hk = off_h // GROUP
    off = 0
    if BOTTOM_RIGHT:
        off = N_K - N_Q
    Q_ROWS: tl.constexpr = BLOCK_M // 2 if SPLIT_Q else BLOCK_M
    q_src = _head_source(Q, stride_q, off_b, off_h, N_Q, Q_ROWS, HEAD_DIM, LOADS)
    k_src = _head_source(K, stride_k, off_b, off_hk, N_K, BLOCK_N, HEAD_DIM, LOADS)
    v_src = _head_source(V, stride_v, off_b, off_hk, N_K, BLOCK_N, HEAD_DIM, LOADS)
    o_dst = _head_source(O, stride_o, off_b, off_h, N_Q, Q_ROWS, HEAD_DIM, LOADS)
    full, hi = _key_ranges(start_m, N_Q, N_K, off, BLOCK_M, BLOCK_N, CAUSAL)

    if SPLIT_Q:
        HALF: tl.constexpr = BLOCK_M // 2
        q0 = _load_tile(q_src, stride_q, off_b, off_h, start_m, N_Q, HALF, HEAD_DIM, LOADS, True)
        q1 = _load_tile(q_src, stride_q, off_b, off_h, start_m + HALF, N_Q, HALF, HEAD_DIM, LOADS, True)
        m0 = tl.full([HALF], float("-inf"), tl.float32)
        l0 = tl.zeros([HALF], tl.float32)
        acc0 = tl.zeros([HALF, HEAD_DIM], tl.float32)
        m1 = tl.full([HALF], float("-inf"), tl.float32)
        l1 = tl.zeros([HALF], tl.float32)
        acc1 = tl.zeros([HALF, HEAD_DIM], tl.float32)
        acc0, l0, m0, acc1, l1, m1 = _two_tile_loop(
            acc0, l0, m0, q0, acc1, l1, m1, q1, start_m, k_src, v_src, stride_k, stride_v, off_b, off_hk, 0, full,
            N_K, off, qk_scale, HALF, BLOCK_N, HEAD_DIM, LOADS, CAUSAL, False, LAZY_TAU, UPCAST, WARP_SPECIALIZE)
        acc0, l0, m0, acc1, l1, m1 = _two_tile_loop(
            acc0, l0, m0, q0, acc1, l1, m1, q1, start_m, k_src, v_src, stride_k, stride_v, off_b, off_hk, full, hi,
            N_K, off, qk_scale, HALF, BLOCK_N, HEAD_DIM, LOADS, CAUSAL, True, LAZY_TAU, UPCAST, False)
        _finish(o_dst, stride_o, LSE, off_b, off_h, bh, start_m, N_Q, acc0, l0, m0, q0, HALF, HEAD_DIM, LOADS)
        _finish(o_dst, stride_o, LSE, off_b, off_h, bh, start_m + HALF, N_Q, acc1, l1, m1, q1, HALF, HEAD_DIM, LOADS)
    else:
        q = _load_tile(q_src, stride_q, off_b, off_h, start_m, N_Q, BLOCK_M, HEAD_DIM, LOADS, True)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        if DEFER_PV:
            acc, l_i, m_i = _deferred_loop(acc, l_i, m_i, q, k_src, v_src, stride_k, stride_v, off_b, off_hk, full,
                                           N_K, qk_scale, BLOCK_N, HEAD_DIM, LOADS, LAZY_TAU, UPCAST, WARP_SPECIALIZE)
        else:
            acc, l_i, m_i = _one_tile_loop(acc, l_i, m_i, q, start_m, k_src, v_src, stride_k, stride_v, off_b, off_hk,
                                           0, full, N_K, off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, LOADS, CAUSAL,
                                           False, LAZY_TAU, UPCAST, WARP_SPECIALIZE)
        acc, l_i, m_i = _one_tile_loop(acc, l_i, m_i, q, start_m, k_src, v_src, stride_k, stride_v, off_b, off_hk,
                                       full, hi, N_K, off, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, LOADS, CAUSAL,
                                       True, LAZY_TAU, UPCAST, False)
        _finish(o_dst, stride_o, LSE, off_b, off_h, bh, start_m, N_Q, acc, l_i, m_i, q, BLOCK_M, HEAD_DIM, LOADS)
