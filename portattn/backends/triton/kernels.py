"""FlashAttention-2 kernels in Triton: forward, and the backward split in three (delta, dK/dV, dQ),
with every feature of ``portattn.spec.FEATURES`` behind a ``tl.constexpr`` flag.

Layout: every tensor is addressed through its (batch, head, seqlen, head_dim) strides, so a
contiguous (B, H, N, D) tensor and a transposed view of a (B, N, H, D) one both work without a copy.
The LSE and delta are contiguous float32 (B, H, Nq) tensors made by the caller, addressed through
their (batch, head) strides.

Conventions shared by all kernels:

* scores are computed as ``(q @ k^T) * qk_scale`` with ``qk_scale = softmax_scale * log2(e)``, in
  float32, so the softmax runs on ``exp2``; the LSE is stored in natural log (``* ln 2``). Every
  score modification (softcap, ALiBi, additive mask) is applied in that log2 domain, by
  ``_scores``, the one helper the forward, the dK/dV pass and the dQ pass share.
* visibility (``portattn/extras.py`` has the semantics): query ``i`` sits at key position
  ``p = i + off`` (``off = 0`` top-left, ``Nk - Nq`` bottom-right, per sequence when varlen); the
  causal and window rules cut each block's key range to an interval. Key blocks outside it are
  never visited (``_key_bounds`` / ``_query_bounds`` compute it); only the blocks that straddle
  one of its edges, or the end of the sequence, are masked elementwise (``MASKED`` is a constexpr,
  so the unmasked loop carries no mask arithmetic at all). Masks given as arrays (bool/additive
  ``attn_mask``, ``key_padding_mask``) are applied to every visited tile.
* block-sparse: the host turns ``block_mask`` into, per sparse query block, the compacted list of
  its kept key blocks and their count (per sparse key block, the kept query blocks, for the dK/dV
  pass), already cut by the causal/window rules; the kernels run one flat loop over the tiles of
  those blocks only (as FlexAttention does), so an empty block is never loaded. The planner keeps
  every tile inside one sparse block (tiles <= the sparse block sizes, both powers of two), so
  ``SPARSE_K // BLOCK_N`` tiles make one block. ``SPARSE_MASKED`` (host-decided) says whether those
  tiles need the elementwise causal/window/end-of-keys mask at all.
* GQA: query head ``h`` reads K/V head ``h // GROUP``; a dK/dV program owns one K/V head's keys and
  loops over the ``GROUP`` query heads that share them, so dK and dV are summed in registers (no
  repeat of K/V in memory, no atomics).
* varlen: q, k, v are (1, H, total, D) (the host passes batch strides of 0); program ``b`` of the
  batch axis reads sequence b's rows ``[cu_seqlens[b], cu_seqlens[b + 1])``; every index the
  visibility rules, ALiBi and dropout see is the row's index within its own sequence.
* dropout (``_dropout_keep``): Philox-4x32 with 10 rounds (``tl.philox``), key = seed, counter =
  ``(j, i, h, b)`` -- key index, query index (within the sequence when varlen), query head, batch
  index / sequence -- each a 32-bit word, so nothing overflows for any size. The first output word
  becomes a uniform u in [0, 1) (``tl.uint_to_uniform_float``); the weight is kept iff
  ``u >= dropout_p``. ``dropout_mask`` materializes exactly that for tests.
* softcap: ``tanh`` is ``_tanh``, built on ``exp2(-2|x| log2 e)`` in (0, 1]: it never overflows, so it
  saturates to +-1 for large |x|, on the GPU and in the interpreter alike.
* ``BLOCK_D`` is the head dim rounded up to a power of two (the plan's ``head_dim_padded``); the
  padding columns are masked on load (zeros) and on store. ``EVEN_D`` (head dim == BLOCK_D) drops
  those masks, so the loads of the common head dims (64, 128) are unmasked, full-width copies.
* ``IN_PRECISION`` is the ``tl.dot`` input precision: "ieee" for float32 inputs (exact float32
  products; the conformance bounds for float32 do not admit tf32's 2^-11 rounding), ignored by
  Triton for float16/bfloat16, whose products are exact in the float32 accumulator anyway.

Feature arguments (the same list, in the same order, in the three attention kernels; each read only
when its flag is set, so the default specialization -- every flag off -- compiles to the plain
FlashAttention-2 loops): ``GROUP`` (GQA), ``CU_Q``, ``CU_K`` (varlen), ``WIN_LEFT``, ``WIN_RIGHT``
(window sides, for ``HAS_LEFT``/``HAS_RIGHT``), ``SOFTCAP2`` (softcap * log2 e), ``SLOPES`` and its
(b, h) strides (ALiBi), ``MASK`` and its (b, h, i, j) strides (``MASK_KIND`` 1 bool as uint8, 2
additive), ``KPAD`` and its (b, j) strides (key padding, uint8), ``SP_IDX`` (b, h, row, entry) /
``SP_NUM`` (b, h, row) and the sparse block sizes, constexpr (block-sparse), ``SEED``, ``DROP_P``,
``DROP_SCALE`` = 1 / (1 - p) (dropout).

Block sizes, warps and stages are launch parameters chosen by the planner; nothing here picks them.
Each distinct set of constexprs compiles once and is cached by ``triton.jit``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)
TWO_LOG2E = tl.constexpr(2.8853900817779268)


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
# feature helpers: tanh, the dropout counter, the score modifications, the visible ranges
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh from exp(-2|x|) in (0, 1]: no overflow, and it saturates to +-1 exactly for large |x|."""
    e = tl.math.exp2(tl.abs(x) * -TWO_LOG2E)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _dropout_keep(seed, b, h, rows, cols, drop_p):
    """Which weights dropout keeps, for broadcastable int32 index tensors ``rows`` (queries) and
    ``cols`` (keys): Philox-4x32-10 keyed by ``seed`` on the counter (key j, query i, head h, batch b),
    first word -> uniform [0, 1), kept iff >= drop_p. The same function serves the forward, both
    backward passes and ``dropout_mask``, so all of them see one mask."""
    i = rows + cols * 0  # both (rows, cols)-shaped: Philox mixes the four words elementwise
    j = cols + rows * 0
    zero = i * 0
    r0, _r1, _r2, _r3 = tl.philox(seed, j, i, zero + h, zero + b)
    return tl.uint_to_uniform_float(r0) >= drop_p


@triton.jit
def _both(a, b):
    """a & b, where a may be None (no condition yet)."""
    if a is None:
        out = b
    else:
        out = a & b
    return out


@triton.jit
def _scores(qk, rows, cols, n_q, n_k, off, win_left, win_right, softcap2, slope2,
            mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
            MASKED: tl.constexpr, CHECK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr,
            HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
            KEY_PADDING: tl.constexpr):
    """The scores of one tile, log2 domain: ``qk`` = scale * log2(e) * q.k for query indices ``rows``
    and key indices ``cols`` (broadcastable 2-D int32 tensors: (M, 1) x (1, N) in the forward and dQ
    pass, (1, M) x (N, 1) in the transposed dK/dV pass), modified in the order the semantics give
    (softcap, ALiBi, additive mask), with -inf wherever the key is not visible.

    Returns ``(s, t)``: ``t = tanh(raw / softcap)`` for the backward's softcap derivative (``qk``
    itself, unused, without softcap). ``MASKED`` applies the geometric rules (key range, causal,
    window), needed only in tiles that straddle an edge; the array masks apply to every tile.
    ``CHECK_KEYS`` (with ``MASKED``) hides keys past n_k: the dK/dV pass leaves it off, as keys past
    the end only make dK/dV rows that are never stored (but on with the atomic dQ, which reads them)."""
    t = qk
    if SOFTCAP:  # softcap * tanh(raw / softcap), in log2 units: C tanh(qk / C) with C = softcap * log2 e
        t = _tanh(qk / softcap2)
        qk = softcap2 * t
    if ALIBI:  # slope2 = slope * log2 e
        qk = qk - slope2 * tl.abs(rows + off - cols).to(tl.float32)
    if MASK_KIND != 0:
        in_bounds = (rows < n_q) & (cols < n_k)
        mask_ptrs = mask_ptr + rows.to(tl.int64) * stride_mi + cols * stride_mj
    if MASK_KIND == 2:
        qk = qk + tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
    if MASKED:
        visible = None
        if CHECK_KEYS:
            visible = cols < n_k
        if CAUSAL:
            visible = _both(visible, cols <= rows + off)
        if HAS_LEFT:
            visible = _both(visible, cols >= rows + off - win_left)
        if HAS_RIGHT:
            visible = _both(visible, cols <= rows + off + win_right)
        qk = tl.where(visible, qk, float("-inf"))
    if KEY_PADDING:
        real = tl.load(kpad_ptr + cols * stride_pj, mask=cols < n_k, other=0)
        qk = tl.where(real != 0, qk, float("-inf"))
    if MASK_KIND == 1:
        allowed = tl.load(mask_ptrs, mask=in_bounds, other=0)
        qk = tl.where(allowed != 0, qk, float("-inf"))
    return qk, t


@triton.jit
def _key_bounds(start_m, n_q, n_k, off, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key range of the query rows [start_m, start_m + BLOCK_M): ``(lo, a, c, hi)`` with lo <= a <= c
    <= max(hi, lo). Keys [lo, hi) are all that any real row of the block may see (lo a multiple of
    BLOCK_N); keys [a, c) (multiples of BLOCK_N) are seen by every row, so their tiles need no
    geometric mask; [lo, a) and [c, hi) hold the tiles that straddle an edge. Without a left window
    edge lo = a = 0 (constexpr)."""
    first = start_m + off  # key position of the block's first row
    last = tl.minimum(start_m + BLOCK_M, n_q) - 1 + off  # ... and of its last real row
    hi = n_k
    if CAUSAL or HAS_RIGHT:
        full_hi = n_k
        if CAUSAL:
            hi = tl.minimum(hi, last + 1)
            full_hi = tl.minimum(full_hi, first + 1)
        if HAS_RIGHT:
            hi = tl.minimum(hi, last + win_right + 1)
            full_hi = tl.minimum(full_hi, first + win_right + 1)
        full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N  # <= hi: the first row sees the fewest keys
    else:
        full_hi = (n_k // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = (tl.maximum(first - win_left, 0) // BLOCK_N) * BLOCK_N
        top = tl.maximum(hi, lo)
        a = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last - win_left, 0), BLOCK_N) * BLOCK_N, lo), top)
        c = tl.maximum(tl.minimum(full_hi, top), a)
    else:
        lo = 0
        a = 0
        c = full_hi
    return lo, a, c, hi


@triton.jit
def _query_bounds(start_n, n_q, n_k, off, win_left, win_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_TAIL: tl.constexpr):
    """The mirror of ``_key_bounds`` for the keys [start_n, start_n + BLOCK_N) of a dK/dV program:
    ``(lo, a, c, hi)`` over query rows, lo and a, c multiples of BLOCK_M. Query i sees key j iff
    j <= i + off (causal), j <= i + off + right, j >= i + off - left. ``MASK_TAIL``: a key block that
    runs past n_k gets only masked tiles (the fused atomic dQ reads its zero-padded keys; without it
    those keys only produce dK/dV rows that are never stored)."""
    first = start_n
    last = tl.minimum(start_n + BLOCK_N, n_k) - 1
    LEAD: tl.constexpr = CAUSAL or HAS_RIGHT or MASK_TAIL
    hi = n_q
    if HAS_LEFT:
        hi = tl.minimum(hi, last - off + win_left + 1)
    lo = 0
    a = 0
    if LEAD:
        full_lo = 0
        if CAUSAL:
            lo = tl.maximum(lo, first - off)
            full_lo = tl.maximum(full_lo, last - off)
        if HAS_RIGHT:
            lo = tl.maximum(lo, first - off - win_right)
            full_lo = tl.maximum(full_lo, last - off - win_right)
        lo = (lo // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(full_lo, BLOCK_M) * BLOCK_M
        a = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
        if MASK_TAIL:
            a = tl.where(start_n + BLOCK_N > n_k, tl.maximum(hi, lo), a)
    c = hi  # without a left edge every row from a on sees the whole key block
    if HAS_LEFT:
        full_hi = (tl.maximum(first - off + win_left + 1, 0) // BLOCK_M) * BLOCK_M
        c = tl.maximum(tl.minimum(full_hi, tl.maximum(hi, lo)), a)
    return lo, a, c, hi


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
               start_n, n_q, n_k, qk_scale,
               off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
               seed, drop_p, off_b, off_h,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, IN_PRECISION: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """One key tile at ``start_n`` of the online softmax (see ``_fwd_inner``)."""
    CAN_EMPTY: tl.constexpr = MASKED or KEY_PADDING or MASK_KIND != 0
    cols = start_n + offs_n
    k = _load_rows(k_ptrs + start_n * stride_kn, cols, n_k, offs_d, HEAD_DIM, MASKED, EVEN_D)
    qk = _mma(q, tl.trans(k), None, IN_PRECISION) * qk_scale
    qk, _t = _scores(qk, offs_m[:, None], cols[None, :], n_q, n_k, off, win_left, win_right, softcap2, slope2,
                     mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
                     MASKED, True, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if CAN_EMPTY:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, off_b, off_h, offs_m[:, None], cols[None, :], drop_p), p, 0.0)
    v = _load_rows(v_ptrs + start_n * stride_vn, cols, n_k, offs_d, HEAD_DIM, MASKED, EVEN_D)
    acc = acc * alpha[:, None]
    acc = _mma(p.to(v.dtype), v, acc, IN_PRECISION)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
               start, stop, n_q, n_k, qk_scale,
               off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
               seed, drop_p, off_b, off_h,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, IN_PRECISION: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """Key blocks [start, stop): online softmax into (acc, l_i, m_i), all float32, log2 domain.

    Unmasked blocks without array masks hold only finite scores, so the running max is finite after
    the first of them and needs no guard; masked blocks (and array masks) may leave a row with no
    visible key yet (max = -inf), which is shifted by 0 instead so that exp2 sees -inf - 0 = -inf,
    not NaN. Dropout zeroes the dropped weights of P @ V only: l_i sums the undropped ones (the LSE
    is that of the undropped weights); the 1 / (1 - p) is applied once, at the end."""
    for start_n in range(start, stop, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                  start_n, n_q, n_k, qk_scale, off, win_left, win_right, softcap2, slope2, mask_ptr,
                                  stride_mi, stride_mj, kpad_ptr, stride_pj, seed, drop_p, off_b, off_h, HEAD_DIM,
                                  BLOCK_N, CAUSAL, MASKED, EVEN_D, IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI,
                                  MASK_KIND, KEY_PADDING, DROPOUT)
    return acc, l_i, m_i


@triton.jit
def _fwd_span(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
              s, e, lo, a, c, hi, n_q, n_k, qk_scale,
              off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
              seed, drop_p, off_b, off_h,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
              IN_PRECISION: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
              ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """The keys [s, e) (a key split; s a multiple of BLOCK_N) cut to the block's visible range
    (lo, a, c, hi) of ``_key_bounds``: masked edge tiles, unmasked interior."""
    if HAS_LEFT:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                   tl.maximum(lo, s), tl.minimum(a, e), n_q, n_k, qk_scale,
                                   off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj,
                                   kpad_ptr, stride_pj, seed, drop_p, off_b, off_h,
                                   HEAD_DIM, BLOCK_N, CAUSAL, True, EVEN_D, IN_PRECISION,
                                   HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
        start = tl.maximum(a, s)
    else:
        start = s
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               start, tl.minimum(c, e), n_q, n_k, qk_scale,
                               off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj,
                               kpad_ptr, stride_pj, seed, drop_p, off_b, off_h,
                               HEAD_DIM, BLOCK_N, CAUSAL, False, EVEN_D, IN_PRECISION,
                               HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               tl.maximum(c, s), tl.minimum(hi, e), n_q, n_k, qk_scale,
                               off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj,
                               kpad_ptr, stride_pj, seed, drop_p, off_b, off_h,
                               HEAD_DIM, BLOCK_N, CAUSAL, True, EVEN_D, IN_PRECISION,
                               HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return acc, l_i, m_i


@triton.jit
def attention_forward_features(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od, stride_os,
    stride_lb, stride_lh, stride_ls,
    H, N_Q, N_K, qk_scale, KEYS_PER_SPLIT,
    GROUP, CU_Q, CU_K, WIN_LEFT, WIN_RIGHT, SOFTCAP2, SLOPES, stride_ab, stride_ah,
    MASK, stride_mb, stride_mh, stride_mi, stride_mj, KPAD, stride_pb, stride_pj,
    SP_IDX, SP_NUM, stride_sib, stride_sih, stride_sir, stride_snb, stride_snh, SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr,
    SEED, DROP_P, DROP_SCALE,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IN_PRECISION: tl.constexpr,
    GQA: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
    KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, SPARSE_MASKED: tl.constexpr, DROPOUT: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head), over keys [split * KEYS_PER_SPLIT,
    (split + 1) * KEYS_PER_SPLIT) (a multiple of BLOCK_N). Grid (cdiv(N_Q, BLOCK_M), B * H, splits).

    With one split, O and LSE are the results; with several (flash-decoding, when the plan splits
    the key loop to fill the device) they are per-split partials, ``stride_os`` / ``stride_ls``
    apart, that the caller merges by log-sum-exp -- every feature only narrows which keys a split
    visits, so the merge is unchanged.
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
    off_hk = off_h
    if GQA:
        off_hk = off_h // GROUP
    n_q = N_Q
    n_k = N_K
    n_k_seen = N_K
    if VARLEN:  # this sequence's rows: batch strides are 0, the row offsets come from cu_seqlens
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        n_q = tl.load(CU_Q + off_b + 1) - q_start
        n_k = tl.load(CU_K + off_b + 1) - k_start
        n_k_seen = tl.where(start_m < n_q, n_k, 0)  # a block past the sequence's last query: no work
        Q += q_start.to(tl.int64) * stride_qn
        O += q_start.to(tl.int64) * stride_on
        LSE += q_start.to(tl.int64)
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
    off = 0
    if BOTTOM_RIGHT:
        off = n_k - n_q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_hk * stride_kh
    V += off_b * stride_vb + off_hk * stride_vh
    O += off_b * stride_ob + off_h * stride_oh + split.to(tl.int64) * stride_os
    LSE += off_b * stride_lb + off_h * stride_lh + split.to(tl.int64) * stride_ls
    q = _load_rows(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, offs_m, n_q, offs_d, HEAD_DIM, True,
                   EVEN_D)
    k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * LOG2E
    mask_ptr = MASK
    if MASK_KIND != 0:
        mask_ptr = MASK + off_b * stride_mb + off_h * stride_mh
    kpad_ptr = KPAD
    if KEY_PADDING:
        kpad_ptr = KPAD + off_b * stride_pb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if SPARSE:
        # FlexAttention-style: one flat loop over the tiles of the kept key blocks of this query
        # block's sparse row (the host already dropped blocks the causal/window range rules out);
        # key splits share out the list's tiles instead of key ranges
        TILES: tl.constexpr = SPARSE_K // BLOCK_N
        row = start_m // SPARSE_Q
        idx_ptr = SP_IDX + off_b * stride_sib + off_h * stride_sih + row * stride_sir
        tiles = tl.load(SP_NUM + off_b * stride_snb + off_h * stride_snh + row) * TILES
        per_split = tl.cdiv(tiles, tl.num_programs(2))
        first = split * per_split
        for t in range(first, tl.minimum(first + per_split, tiles)):
            start_n = tl.load(idx_ptr + t // TILES) * SPARSE_K + (t % TILES) * BLOCK_N
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                      start_n, n_q, n_k, qk_scale, off, WIN_LEFT, WIN_RIGHT, SOFTCAP2, slope2,
                                      mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj, SEED, DROP_P, bh // H, bh % H,
                                      HEAD_DIM, BLOCK_N, CAUSAL, SPARSE_MASKED, EVEN_D, IN_PRECISION,
                                      HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    else:
        lo, a, c, hi = _key_bounds(start_m, n_q, n_k_seen, off, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N,
                                   CAUSAL, HAS_LEFT, HAS_RIGHT)
        s = split * KEYS_PER_SPLIT  # this split's keys: [s, s + KEYS_PER_SPLIT), cut to what is visible
        e = s + KEYS_PER_SPLIT
        acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                  s, e, lo, a, c, hi, n_q, n_k, qk_scale, off, WIN_LEFT, WIN_RIGHT, SOFTCAP2, slope2,
                                  mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj, SEED, DROP_P, bh // H, bh % H,
                                  HEAD_DIM, BLOCK_N, CAUSAL, EVEN_D, IN_PRECISION,
                                  HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw no key: O = 0
    if DROPOUT:
        out = out * DROP_SCALE
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    _store_rows(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
                offs_m, n_q, offs_d, HEAD_DIM, EVEN_D)
    tl.store(LSE + offs_m, lse, mask=offs_m < n_q)


@triton.jit
def attention_forward(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od, stride_os,
    stride_lb, stride_lh, stride_ls,
    H, N_Q, N_K, qk_scale, KEYS_PER_SPLIT,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IN_PRECISION: tl.constexpr,
):
    """The forward of a call with no features: ``attention_forward_features`` called (inlined) with
    every feature off. A kernel of its own so that a plain launch passes 29 arguments, not 60 --
    Triton's launcher handles each argument in Python on every call, which costs short sequences
    ~20% (H100, N = 512)."""
    attention_forward_features(
        Q, K, V, O, LSE,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od, stride_os,
        stride_lb, stride_lh, stride_ls,
        H, N_Q, N_K, qk_scale, KEYS_PER_SPLIT,
        1, None, None, 0, 0, 0.0, None, 0, 0,
        None, 0, 0, 0, 0, None, 0, 0,
        None, None, 0, 0, 0, 0, 0, 0, 0,
        0, 0.0, 1.0,
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, IN_PRECISION,
        False, False, False, False, False, False, False, 0, False, False, False, False,
    )


# ---------------------------------------------------------------------------------------------
# backward: delta = rowsum(dO * O)  (dropout needs nothing else: O already holds the dropped P)
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
# backward: dK, dV -- a program owns BLOCK_N keys of one K/V head and streams the query blocks (of
# every query head of its group) that see them; with DQ_ATOMIC it also adds each block's share of
# dQ into a float32 buffer (FA2's fused form)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don, stride_dqn,
                offs_n, offs_m, offs_d, start_m, n_q, n_k, qk_scale,
                off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
                seed, drop_p, drop_scale, off_b, off_h,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                EVEN_D: tl.constexpr, DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """One query tile at ``start_m`` (see ``_dkdv_inner``)."""
    rows = start_m + offs_m
    row_ok = rows < n_q
    q = _load_rows(q_ptrs + start_m * stride_qn, rows, n_q, offs_d, HEAD_DIM, True, EVEN_D)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # a row that sees no key: P = 0
    qkT = _mma(k, tl.trans(q), None, IN_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    sT, tT = _scores(qkT, rows[None, :], offs_n[:, None], n_q, n_k, off, win_left, win_right, softcap2, slope2,
                     mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
                     MASKED, DQ_ATOMIC, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING)
    pT = tl.math.exp2(sT - lse2[None, :])
    do = _load_rows(do_ptrs + start_m * stride_don, rows, n_q, offs_d, HEAD_DIM, True, EVEN_D)
    if DROPOUT:  # dV sees the dropped, rescaled P; dP is dropped the same way (dS = P * (dP' - delta))
        keepT = _dropout_keep(seed, off_b, off_h, rows[None, :], offs_n[:, None], drop_p)
        dv = _mma(tl.where(keepT, pT * drop_scale, 0.0).to(do.dtype), do, dv, IN_PRECISION)
    else:
        dv = _mma(pT.to(do.dtype), do, dv, IN_PRECISION)
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    dpT = _mma(v, tl.trans(do), None, IN_PRECISION)
    if DROPOUT:
        dpT = tl.where(keepT, dpT * drop_scale, 0.0)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:  # d(softcap * tanh(raw / softcap)) / d raw = 1 - tanh^2
        dsT = dsT * (1.0 - tT * tT)
    dsT = dsT.to(q.dtype)
    dk = _mma(dsT, q, dk, IN_PRECISION)
    if DQ_ATOMIC:
        dq = _mma(tl.trans(dsT), k, None, IN_PRECISION)  # (BLOCK_M, BLOCK_D); scaled once at the end
        tl.atomic_add(dq_ptrs + start_m * stride_dqn, dq, mask=row_ok[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don, stride_dqn,
                offs_n, offs_m, offs_d, start, stop, n_q, n_k, qk_scale,
                off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
                seed, drop_p, drop_scale, off_b, off_h,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                EVEN_D: tl.constexpr, DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """Query blocks [start, stop), tiles transposed (keys x queries). ``MASKED``: blocks on an edge of
    the visible range. Query rows past n_q load q = dO = 0, delta = 0 and an LSE of +inf, so P = 0
    there and they add exactly zero to dK and dV without a mask."""
    for start_m in range(start, stop, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                            stride_dqn, offs_n, offs_m, offs_d, start_m, n_q, n_k, qk_scale, off, win_left, win_right,
                            softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj, seed, drop_p,
                            drop_scale, off_b, off_h, HEAD_DIM, BLOCK_M, CAUSAL, MASKED, EVEN_D, DQ_ATOMIC,
                            IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return dk, dv


@triton.jit
def _dkdv_span(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don, stride_dqn,
               offs_n, offs_m, offs_d, s, e, lo, a, c, hi, n_q, n_k, qk_scale,
               off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
               seed, drop_p, drop_scale, off_b, off_h,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
               DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """The query rows [s, e) cut to ``_query_bounds``' (lo, a, c, hi): masked tiles on the edges,
    unmasked ones inside."""
    LEAD: tl.constexpr = CAUSAL or HAS_RIGHT or DQ_ATOMIC
    if LEAD:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                             stride_dqn, offs_n, offs_m, offs_d, tl.maximum(lo, s), tl.minimum(a, e), n_q, n_k, qk_scale,
                             off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj,
                             kpad_ptr, stride_pj, seed, drop_p, drop_scale, off_b, off_h,
                             HEAD_DIM, BLOCK_M, CAUSAL, True, EVEN_D, DQ_ATOMIC, IN_PRECISION,
                             HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
        start = tl.maximum(a, s)
    else:
        start = s
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                         stride_dqn, offs_n, offs_m, offs_d, start, tl.minimum(c, e), n_q, n_k, qk_scale,
                         off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj,
                         kpad_ptr, stride_pj, seed, drop_p, drop_scale, off_b, off_h,
                         HEAD_DIM, BLOCK_M, CAUSAL, False, EVEN_D, DQ_ATOMIC, IN_PRECISION,
                         HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    if HAS_LEFT:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                             stride_dqn, offs_n, offs_m, offs_d, tl.maximum(c, s), tl.minimum(hi, e), n_q, n_k, qk_scale,
                             off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj,
                             kpad_ptr, stride_pj, seed, drop_p, drop_scale, off_b, off_h,
                             HEAD_DIM, BLOCK_M, CAUSAL, True, EVEN_D, DQ_ATOMIC, IN_PRECISION,
                             HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return dk, dv


@triton.jit
def _dkdv_head(dk, dv, k, v, off_b, off_h, start_n, offs_n, offs_m, offs_d, lo, a, c, hi, n_q, n_k, qk_scale,
               Q, DO, LSE, DELTA, DQ_ACC,
               stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
               stride_dqab, stride_dqah, stride_dqan, stride_lb, stride_lh, H,
               off, WIN_LEFT, WIN_RIGHT, SOFTCAP2, SLOPES, stride_ab, stride_ah,
               MASK, stride_mb, stride_mh, stride_mi, stride_mj, KPAD, stride_pb, stride_pj,
               SP_IDX, SP_NUM, stride_sib, stride_sih, stride_sir, stride_snb, stride_snh,
               SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr, SEED, DROP_P, DROP_SCALE,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
               DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, SPARSE_MASKED: tl.constexpr,
               DROPOUT: tl.constexpr):
    """The contribution of query head ``off_h`` to the dK, dV of this program's keys."""
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    dq_ptrs = DQ_ACC + off_b * stride_dqab + off_h * stride_dqah + offs_m[:, None] * stride_dqan + offs_d[None, :]
    lse_ptr = LSE + off_b * stride_lb + off_h * stride_lh
    delta_ptr = DELTA + off_b * stride_lb + off_h * stride_lh
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * LOG2E
    mask_ptr = MASK
    if MASK_KIND != 0:
        mask_ptr = MASK + off_b * stride_mb + off_h * stride_mh
    kpad_ptr = KPAD
    if KEY_PADDING:
        kpad_ptr = KPAD + off_b * stride_pb
    b32 = off_b.to(tl.int32)
    h32 = off_h.to(tl.int32)
    if SPARSE:  # a flat loop over the tiles of the kept query blocks of this key block's sparse column
        TILES: tl.constexpr = SPARSE_Q // BLOCK_M
        col = start_n // SPARSE_K
        idx_ptr = SP_IDX + off_b * stride_sib + off_h * stride_sih + col * stride_sir
        tiles = tl.load(SP_NUM + off_b * stride_snb + off_h * stride_snh + col) * TILES
        for t in range(0, tiles):
            start_m = tl.load(idx_ptr + t // TILES) * SPARSE_Q + (t % TILES) * BLOCK_M
            dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                                stride_dqan, offs_n, offs_m, offs_d, start_m, n_q, n_k, qk_scale, off, WIN_LEFT,
                                WIN_RIGHT, SOFTCAP2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj, SEED,
                                DROP_P, DROP_SCALE, b32, h32, HEAD_DIM, BLOCK_M, CAUSAL, SPARSE_MASKED, EVEN_D,
                                DQ_ATOMIC, IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING,
                                DROPOUT)
    else:
        dk, dv = _dkdv_span(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                            stride_dqan, offs_n, offs_m, offs_d, 0, hi, lo, a, c, hi,
                            n_q, n_k, qk_scale, off, WIN_LEFT, WIN_RIGHT, SOFTCAP2, slope2, mask_ptr, stride_mi,
                            stride_mj, kpad_ptr, stride_pj, SEED, DROP_P, DROP_SCALE, b32, h32,
                            HEAD_DIM, BLOCK_M, CAUSAL, EVEN_D, DQ_ATOMIC, IN_PRECISION,
                            HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
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
    stride_dqab, stride_dqah, stride_dqan, stride_lb, stride_lh,
    H, N_Q, N_K, sm_scale, qk_scale,
    GROUP, CU_Q, CU_K, WIN_LEFT, WIN_RIGHT, SOFTCAP2, SLOPES, stride_ab, stride_ah,
    MASK, stride_mb, stride_mh, stride_mi, stride_mj, KPAD, stride_pb, stride_pj,
    SP_IDX, SP_NUM, stride_sib, stride_sih, stride_sir, stride_snb, stride_snh, SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr,
    SEED, DROP_P, DROP_SCALE,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr,
    GQA: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
    KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, SPARSE_MASKED: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Grid (cdiv(N_K, BLOCK_N), B * H_kv). ``DQ_ACC``: a float32 (B, H, N_Q, BLOCK_D) buffer of zeros
    when ``DQ_ATOMIC`` (unscaled dQ is added into it), else unused. With GQA the program sums the
    contributions of its K/V head's GROUP query heads."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    if GQA:
        kv_heads = H // GROUP
        off_b = (bh // kv_heads).to(tl.int64)
        off_hk = (bh % kv_heads).to(tl.int64)
    else:
        off_b = (bh // H).to(tl.int64)
        off_hk = (bh % H).to(tl.int64)
    n_q = N_Q
    n_k = N_K
    n_q_seen = N_Q
    if VARLEN:
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        n_q = tl.load(CU_Q + off_b + 1) - q_start
        n_k = tl.load(CU_K + off_b + 1) - k_start
        n_q_seen = tl.where(start_n < n_k, n_q, 0)  # a block past the sequence's last key: no work
        Q += q_start.to(tl.int64) * stride_qn
        DO += q_start.to(tl.int64) * stride_don
        DQ_ACC += q_start.to(tl.int64) * stride_dqan
        LSE += q_start.to(tl.int64)
        DELTA += q_start.to(tl.int64)
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
        DK += k_start.to(tl.int64) * stride_dkn
        DV += k_start.to(tl.int64) * stride_dvn
    off = 0
    if BOTTOM_RIGHT:
        off = n_k - n_q
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_rows(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, n_k, offs_d, HEAD_DIM, True, EVEN_D)
    v = _load_rows(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   offs_n, n_k, offs_d, HEAD_DIM, True, EVEN_D)
    lo, a, c, hi = _query_bounds(start_n, n_q_seen, n_k, off, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N,
                                 CAUSAL, HAS_LEFT, HAS_RIGHT, DQ_ATOMIC)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if GQA:  # the query heads sharing this K/V head, one after another: dK, dV summed in registers
        for g in range(0, GROUP):
            dk, dv = _dkdv_head(dk, dv, k, v, off_b, off_hk * GROUP + g, start_n, offs_n, offs_m, offs_d, lo, a, c, hi,
                                n_q, n_k, qk_scale, Q, DO, LSE, DELTA, DQ_ACC,
                                stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
                                stride_dqab, stride_dqah, stride_dqan, stride_lb, stride_lh, H,
                                off, WIN_LEFT, WIN_RIGHT, SOFTCAP2, SLOPES, stride_ab, stride_ah,
                                MASK, stride_mb, stride_mh, stride_mi, stride_mj, KPAD, stride_pb, stride_pj,
                                SP_IDX, SP_NUM, stride_sib, stride_sih, stride_sir, stride_snb, stride_snh,
                                SPARSE_Q, SPARSE_K, SEED, DROP_P, DROP_SCALE,
                                HEAD_DIM, BLOCK_M, CAUSAL, EVEN_D, DQ_ATOMIC, IN_PRECISION,
                                HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, SPARSE, SPARSE_MASKED, DROPOUT)
    else:
        dk, dv = _dkdv_head(dk, dv, k, v, off_b, off_hk, start_n, offs_n, offs_m, offs_d, lo, a, c, hi,
                            n_q, n_k, qk_scale, Q, DO, LSE, DELTA, DQ_ACC,
                            stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
                            stride_dqab, stride_dqah, stride_dqan, stride_lb, stride_lh, H,
                            off, WIN_LEFT, WIN_RIGHT, SOFTCAP2, SLOPES, stride_ab, stride_ah,
                            MASK, stride_mb, stride_mh, stride_mi, stride_mj, KPAD, stride_pb, stride_pj,
                            SP_IDX, SP_NUM, stride_sib, stride_sih, stride_sir, stride_snb, stride_snh,
                            SPARSE_Q, SPARSE_K, SEED, DROP_P, DROP_SCALE,
                            HEAD_DIM, BLOCK_M, CAUSAL, EVEN_D, DQ_ATOMIC, IN_PRECISION,
                            HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, SPARSE, SPARSE_MASKED, DROPOUT)

    dk *= sm_scale
    _store_rows(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                dk.to(DK.dtype.element_ty), offs_n, n_k, offs_d, HEAD_DIM, EVEN_D)
    _store_rows(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                dv.to(DV.dtype.element_ty), offs_n, n_k, offs_d, HEAD_DIM, EVEN_D)


# ---------------------------------------------------------------------------------------------
# backward: dQ -- a program owns BLOCK_M queries and streams the key blocks they see (no atomics)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
              start_n, n_q, n_k, qk_scale,
              off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
              seed, drop_p, drop_scale, off_b, off_h,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, IN_PRECISION: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """One key tile at ``start_n`` of the dQ pass."""
    cols = start_n + offs_n
    k = _load_rows(k_ptrs + start_n * stride_kn, cols, n_k, offs_d, HEAD_DIM, MASKED, EVEN_D)
    qk = _mma(q, tl.trans(k), None, IN_PRECISION) * qk_scale
    s, t = _scores(qk, offs_m[:, None], cols[None, :], n_q, n_k, off, win_left, win_right, softcap2, slope2,
                   mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
                   MASKED, True, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING)
    p = tl.math.exp2(s - lse2[:, None])
    v = _load_rows(v_ptrs + start_n * stride_vn, cols, n_k, offs_d, HEAD_DIM, MASKED, EVEN_D)
    dp = _mma(do, tl.trans(v), None, IN_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, off_b, off_h, offs_m[:, None], cols[None, :], drop_p)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq = _mma(ds.to(k.dtype), k, dq, IN_PRECISION)
    return dq


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
              start, stop, n_q, n_k, qk_scale,
              off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
              seed, drop_p, drop_scale, off_b, off_h,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, IN_PRECISION: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d, start_n,
                      n_q, n_k, qk_scale, off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj,
                      kpad_ptr, stride_pj, seed, drop_p, drop_scale, off_b, off_h, HEAD_DIM, BLOCK_N, CAUSAL, MASKED,
                      EVEN_D, IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return dq


@triton.jit
def _dq_span(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
             s, e, lo, a, c, hi, n_q, n_k, qk_scale,
             off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
             seed, drop_p, drop_scale, off_b, off_h,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
             IN_PRECISION: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
             ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """As ``_fwd_span``: keys [s, e) cut to (lo, a, c, hi)."""
    if HAS_LEFT:
        dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                       tl.maximum(lo, s), tl.minimum(a, e), n_q, n_k, qk_scale,
                       off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
                       seed, drop_p, drop_scale, off_b, off_h, HEAD_DIM, BLOCK_N, CAUSAL, True, EVEN_D, IN_PRECISION,
                       HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
        start = tl.maximum(a, s)
    else:
        start = s
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                   start, tl.minimum(c, e), n_q, n_k, qk_scale,
                   off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
                   seed, drop_p, drop_scale, off_b, off_h, HEAD_DIM, BLOCK_N, CAUSAL, False, EVEN_D, IN_PRECISION,
                   HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                   tl.maximum(c, s), tl.minimum(hi, e), n_q, n_k, qk_scale,
                   off, win_left, win_right, softcap2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
                   seed, drop_p, drop_scale, off_b, off_h, HEAD_DIM, BLOCK_N, CAUSAL, True, EVEN_D, IN_PRECISION,
                   HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return dq


@triton.jit
def attention_backward_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_lb, stride_lh,
    H, N_Q, N_K, sm_scale, qk_scale,
    GROUP, CU_Q, CU_K, WIN_LEFT, WIN_RIGHT, SOFTCAP2, SLOPES, stride_ab, stride_ah,
    MASK, stride_mb, stride_mh, stride_mi, stride_mj, KPAD, stride_pb, stride_pj,
    SP_IDX, SP_NUM, stride_sib, stride_sih, stride_sir, stride_snb, stride_snh, SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr,
    SEED, DROP_P, DROP_SCALE,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IN_PRECISION: tl.constexpr,
    GQA: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
    KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, SPARSE_MASKED: tl.constexpr, DROPOUT: tl.constexpr,
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
    off_hk = off_h
    if GQA:
        off_hk = off_h // GROUP
    n_q = N_Q
    n_k = N_K
    n_k_seen = N_K
    if VARLEN:
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        n_q = tl.load(CU_Q + off_b + 1) - q_start
        n_k = tl.load(CU_K + off_b + 1) - k_start
        n_k_seen = tl.where(start_m < n_q, n_k, 0)
        Q += q_start.to(tl.int64) * stride_qn
        DO += q_start.to(tl.int64) * stride_don
        DQ += q_start.to(tl.int64) * stride_dqn
        LSE += q_start.to(tl.int64)
        DELTA += q_start.to(tl.int64)
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
    off = 0
    if BOTTOM_RIGHT:
        off = n_k - n_q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q

    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                   offs_m, n_q, offs_d, HEAD_DIM, True, EVEN_D)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                    offs_m, n_q, offs_d, HEAD_DIM, True, EVEN_D)
    lse = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + offs_m, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # a row that sees no key: P = 0
    delta = tl.load(DELTA + off_b * stride_lb + off_h * stride_lh + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd

    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + off_b * stride_ab + off_h * stride_ah).to(tl.float32) * LOG2E
    mask_ptr = MASK
    if MASK_KIND != 0:
        mask_ptr = MASK + off_b * stride_mb + off_h * stride_mh
    kpad_ptr = KPAD
    if KEY_PADDING:
        kpad_ptr = KPAD + off_b * stride_pb

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if SPARSE:  # as the forward: a flat loop over the tiles of the kept key blocks
        TILES: tl.constexpr = SPARSE_K // BLOCK_N
        row = start_m // SPARSE_Q
        idx_ptr = SP_IDX + off_b * stride_sib + off_h * stride_sih + row * stride_sir
        tiles = tl.load(SP_NUM + off_b * stride_snb + off_h * stride_snh + row) * TILES
        for t in range(0, tiles):
            start_n = tl.load(idx_ptr + t // TILES) * SPARSE_K + (t % TILES) * BLOCK_N
            dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                          start_n, n_q, n_k, qk_scale, off, WIN_LEFT, WIN_RIGHT, SOFTCAP2, slope2, mask_ptr, stride_mi,
                          stride_mj, kpad_ptr, stride_pj, SEED, DROP_P, DROP_SCALE, bh // H, bh % H, HEAD_DIM, BLOCK_N,
                          CAUSAL, SPARSE_MASKED, EVEN_D, IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND,
                          KEY_PADDING, DROPOUT)
    else:
        lo, a, c, hi = _key_bounds(start_m, n_q, n_k_seen, off, WIN_LEFT, WIN_RIGHT, BLOCK_M, BLOCK_N,
                                   CAUSAL, HAS_LEFT, HAS_RIGHT)
        dq = _dq_span(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                      0, hi, lo, a, c, hi, n_q, n_k, qk_scale,
                      off, WIN_LEFT, WIN_RIGHT, SOFTCAP2, slope2, mask_ptr, stride_mi, stride_mj, kpad_ptr, stride_pj,
                      SEED, DROP_P, DROP_SCALE, bh // H, bh % H, HEAD_DIM, BLOCK_N, CAUSAL, EVEN_D, IN_PRECISION,
                      HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    dq *= sm_scale
    _store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                dq.to(DQ.dtype.element_ty), offs_m, n_q, offs_d, HEAD_DIM, EVEN_D)


# ---------------------------------------------------------------------------------------------
# dropout mask, materialized for tests and debugging from the kernels' own counter function
# ---------------------------------------------------------------------------------------------


@triton.jit
def dropout_mask(KEEP, stride_kb, stride_kh, stride_ki, H, N_Q, N_K, seed, drop_p,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """KEEP: a (B, H, N_Q, N_K) uint8 tensor (last stride 1); 1 where ``_dropout_keep`` keeps the weight.
    Grid (cdiv(N_Q, BLOCK_M), cdiv(N_K, BLOCK_N), B * H)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    keep = _dropout_keep(seed, b, h, rows[:, None], cols[None, :], drop_p)
    ptrs = KEEP + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + rows[:, None].to(tl.int64) * stride_ki + cols[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(rows[:, None] < N_Q) & (cols[None, :] < N_K))
