"""The Triton decode kernels: one step of KV-cache decoding read from the cache where it lies, and the
log-sum-exp merge of its key splits.

``decode_kvcache``: one program per (sequence, KV head, row block) and key split (the decode plan,
``portattn/tiling/decode.py``). Its tile's rows are the G x Nq queries of the KV group -- row r is
query r % Nq of query head hk * G + r // Nq -- so each K/V tile it loads serves every query head of
the group (GQA packing); rows past G x Nq are zeros, never stored (``tl.dot`` needs M >= 16). Keys
are found in the cache as flash-attn lays it out: contiguous (B, Nmax, H_kv, D), or pages
(num_blocks, PAGE_SIZE, H_kv, D) through the block table, key j of sequence b in page
``table[b, j // PAGE_SIZE]`` at row ``j % PAGE_SIZE``. ``PAGE_SIZE`` is a constexpr (a deployment
uses one or two), so a power of two compiles to shifts; a page that holds whole tiles
(``PAGE_SIZE % BLOCK_N == 0``) costs one table load per tile, any other page size (1 to 256, odd ones
too) one per key, gathered. Every tile is masked (the keys past this split's end or the sequence's,
causal and window edges) -- decoding is bound by the bytes it reads, not by that arithmetic -- and
the scores go through the forward's own ``_scores`` (softcap, ALiBi, causal/window in the log2
domain, bottom-right aligned on each sequence's length, and ``attention``'s key padding). One split
writes O (q's dtype) and the LSE directly; several write float32 partials that ``decode_merge``
combines in one more launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import LN2, LOG2E, HeadFeatures, _mma, _scores


@triton.jit
def _cache_rows(table_row, cols, in_range, b, stride_cb, stride_cn, start, num_pages,
                PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets (int64) of keys ``cols`` of sequence b in a cache of batch/page stride ``stride_cb`` and row
    stride ``stride_cn``: contiguous when PAGE_SIZE == 0, else through the block table row ``table_row``,
    page ids clamped to the cache's ``num_pages`` (a bad table reads a wrong page, never outside)."""
    if PAGE_SIZE == 0:
        rows = b * stride_cb + cols.to(tl.int64) * stride_cn
    elif PAGE_SIZE % BLOCK_N == 0:  # the tile lies in one page: one table entry
        page = tl.minimum(tl.maximum(tl.load(table_row + start // PAGE_SIZE), 0), num_pages - 1).to(tl.int64)
        rows = page * stride_cb + (cols % PAGE_SIZE).to(tl.int64) * stride_cn
    else:
        pages = tl.load(table_row + cols // PAGE_SIZE, mask=in_range, other=0)
        pages = tl.minimum(tl.maximum(pages, 0), num_pages - 1).to(tl.int64)
        rows = pages * stride_cb + (cols % PAGE_SIZE).to(tl.int64) * stride_cn
    return rows


@triton.jit
def decode_kvcache(
    Q, K, V, O, LSE, TABLE, stride_table, LENGTHS, SLOPES, stride_slopes_b, stride_slopes_h,
    KPAD, stride_kpad_b, stride_kpad_j,
    H_KV, N_Q, CAPACITY, NUM_PAGES, qk_scale, KEYS_PER_SPLIT, win_left, win_right, softcap2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, KEY_PADDING: tl.constexpr,
    IN_PRECISION: tl.constexpr, HAS_LENGTHS: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Grid (B * H_kv * row blocks, splits). Q (B, Nq, H, D) and the caches as views (tensor, strides);
    O a (B, Nq, H, D) view with a fifth (split) stride, LSE a (B, H, Nq) one with a fourth; TABLE int32
    (B, max_blocks) (unused when contiguous), LENGTHS int32 (B,) keys per sequence (clamped to [0,
    CAPACITY]; without HAS_LENGTHS every sequence has CAPACITY); SLOPES (B, H) when ALIBI; KPAD uint8
    (B, Nk), nonzero for a real key, when KEY_PADDING (``attention``'s padded batches: a hidden key is
    -inf). Sequence b's L_b keys are cut into ranges of max(KEYS_PER_SPLIT, ceil(L_b / splits)) keys, rounded up to BLOCK_N
    (the decode plan's D2); split s takes the s-th. STORE_LSE=False (one split, a caller that needs O alone):
    the LSE is not written, and LSE may be any pointer."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    Q, stride_q = Q
    K, stride_k = K
    V, stride_v = V
    O, stride_o = O
    LSE, stride_l = LSE
    stride_qb, stride_qn, stride_qh, stride_qd = stride_q
    stride_kb, stride_kn, stride_kh, stride_kd = stride_k
    stride_vb, stride_vn, stride_vh, stride_vd = stride_v
    stride_ob, stride_on, stride_oh, stride_od, stride_os = stride_o
    stride_lb, stride_lh, stride_ln, stride_ls = stride_l
    row_blocks = tl.cdiv(GROUP * N_Q, BLOCK_M)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    block = pid % row_blocks
    hk = ((pid // row_blocks) % H_KV).to(tl.int64)
    b = (pid // (row_blocks * H_KV)).to(tl.int64)

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    real = rows < GROUP * N_Q
    query = rows % N_Q  # the row's query within its sequence, and its query head
    head = hk * GROUP + rows // N_Q
    offs_d = tl.arange(0, BLOCK_D)
    io_mask = real[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + query[:, None].to(tl.int64) * stride_qn + head[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)

    if HAS_LENGTHS:
        n_k = tl.minimum(tl.maximum(tl.load(LENGTHS + b), 0), CAPACITY)
    else:  # every sequence holds CAPACITY keys (``attention``'s few-query calls): LENGTHS is never read
        n_k = CAPACITY
    off = n_k - N_Q  # key position of query 0: bottom-right on this sequence's keys
    per_split = tl.maximum(KEYS_PER_SPLIT, tl.cdiv(tl.cdiv(n_k, tl.num_programs(1)), BLOCK_N) * BLOCK_N)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_k)
    if HAS_LEFT:  # no row sees a key before the first query's window (lo stays a multiple of BLOCK_N)
        lo = tl.maximum(lo, (tl.maximum(off - win_left, 0) // BLOCK_N) * BLOCK_N)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + b * stride_slopes_b + head * stride_slopes_h, mask=real, other=0.0)
        slope2 = (slope2.to(tl.float32) * LOG2E)[:, None]
    kpad = 0
    if KEY_PADDING:
        kpad = KPAD + b * stride_kpad_b
    S = HeadFeatures(off, win_left, win_right, softcap2, slope2, 0, 0, 0, kpad, stride_kpad_j, 0, 0.0, 1.0, 0, 0)
    table_row = TABLE + b * stride_table
    k_head = K + hk * stride_kh + offs_d[None, :] * stride_kd
    v_head = V + hk * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        in_range = cols < hi
        kv_mask = in_range[:, None]
        if not EVEN_D:
            kv_mask = kv_mask & (offs_d[None, :] < HEAD_DIM)
        k_rows = _cache_rows(table_row, cols, in_range, b, stride_kb, stride_kn, start, NUM_PAGES, PAGE_SIZE, BLOCK_N)
        k = tl.load(k_head + k_rows[:, None], mask=kv_mask, other=0.0)
        qk = _mma(q, tl.trans(k), None, IN_PRECISION) * qk_scale
        qk, _t = _scores(qk, query[:, None], cols[None, :], N_Q, hi, S, True, True, CAUSAL, HAS_LEFT, HAS_RIGHT,
                         SOFTCAP, ALIBI, 0, KEY_PADDING)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row that sees no key yet: exp2(-inf - 0) = 0, and its running max stays -inf (pinned at 0, later
        # scores below -126 would underflow against it)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(qk - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = _cache_rows(table_row, cols, in_range, b, stride_vb, stride_vn, start, NUM_PAGES, PAGE_SIZE, BLOCK_N)
        v = tl.load(v_head + v_rows[:, None], mask=kv_mask, other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], IN_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a split (or row) that saw no key: O = 0, LSE = -inf
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    split64 = split.to(tl.int64)
    tl.store(O + b * stride_ob + query[:, None].to(tl.int64) * stride_on + head[:, None] * stride_oh
             + offs_d[None, :] * stride_od + split64 * stride_os, out.to(O.dtype.element_ty), mask=io_mask)
    if STORE_LSE:
        tl.store(LSE + b * stride_lb + head * stride_lh + query.to(tl.int64) * stride_ln + split64 * stride_ls, lse,
                 mask=real)


@triton.jit
def decode_merge(PART_O, PART_LSE, O, LSE, SPLITS, H, N_Q,
                 HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """O = sum_s exp(lse_s - lse) O_s and LSE = logsumexp_s lse_s for one (sequence, query, head) per
    program, grid (B * Nq * H,): PART_O float32 (splits, B, Nq, H, D) and PART_LSE (splits, B, H, Nq),
    contiguous; O a (B, Nq, H, D) view, LSE (B, H, Nq) contiguous. A row no split saw: 0 and -inf.
    The prefill forward's key splits are merged here too (``decode.merge_splits``)."""
    O, stride_o = O
    stride_ob, stride_on, stride_oh, stride_od = stride_o
    pid = tl.program_id(0)
    h = pid % H
    i = (pid // H) % N_Q
    b = pid // (H * N_Q)
    batch = tl.num_programs(0) // (H * N_Q)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(PART_LSE + offs_s.to(tl.int64) * (batch * H * N_Q) + (b * H + h) * N_Q + i,
                    mask=offs_s < SPLITS, other=float("-inf"))
    top = tl.max(lse_s, 0)
    weights = tl.math.exp(lse_s - tl.where(top == float("-inf"), 0.0, top))
    total = tl.sum(weights, 0)
    rows = offs_s.to(tl.int64)[:, None] * (batch * N_Q * H * HEAD_DIM) + ((b * N_Q + i) * H + h) * HEAD_DIM
    parts = tl.load(PART_O + rows + offs_d[None, :], mask=(offs_s[:, None] < SPLITS) & (offs_d[None, :] < HEAD_DIM),
                    other=0.0)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(O + b.to(tl.int64) * stride_ob + i * stride_on + h * stride_oh + offs_d * stride_od,
             out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    tl.store(LSE + (b * H + h) * N_Q + i, tl.where(total > 0.0, top + tl.math.log(tl.where(total > 0.0, total, 1.0)), float("-inf")))
