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

Arguments: every tensor is one argument, a view ``(pointer, strides)`` (a Triton tuple, unpacked
first thing in the kernel). The feature values of a call are one more, ``F``, a ``Features``
named tuple (GQA group, varlen cu_seqlens, window sides, softcap, the ALiBi slopes, the mask, the
key padding and the block-sparse lists with their strides, dropout's seed, p and 1 / (1 - p)); each
entry is read only when its feature's ``tl.constexpr`` flag is set, and a pointer whose feature is
off is None, so the default specialization -- every flag off -- compiles to the plain
FlashAttention-2 loops. ``_preamble`` (program ids, varlen offsets, query offset) and
``_head_features`` (per (batch, head): ALiBi slope, mask and key-padding pointers, as the
``HeadFeatures`` tuple the tiles read) are the one preamble of the forward, dK/dV and dQ kernels;
``_sparse_list`` / ``_sparse_tile`` their block-sparse loop. The forward with every feature off is
also ``attention_forward``, a kernel with only the plain arguments (Triton's launcher costs host time
per argument). Tuples need Triton 3.4+; what keeps 3.4-3.6 compiling them: view arguments are
unpacked before any loop (a tuple argument nested two deep loses its constexpr entries across a
loop there, hence the flat ``Features``), no helper returns a tuple holding None (0 stands for an
absent pointer), and no assignment unpacks into a nested target.

Block sizes, warps and stages are launch parameters chosen by the planner; nothing here picks them.
Each distinct set of constexprs compiles once and is cached by ``triton.jit``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)
TWO_LOG2E = tl.constexpr(2.8853900817779268)


class Features(NamedTuple):
    """A call's feature values, passed to the attention kernels as one argument (a Triton tuple, read
    by field name inside them). Each feature's entries are read only under its constexpr flag; with
    the flag off they are None (a pointer: no kernel parameter at all) or zeros. Flat on purpose:
    Triton 3.5/3.6 lose the constexpr-specialized entries (an int equal to 1) of a tuple nested in a
    tuple argument once a loop has run (the GQA loop of the dK/dV kernel reads this one)."""

    group: int  # GQA: query heads per K/V head
    cu_q: Any  # varlen: int32 (B + 1,) cu_seqlens of the queries and the keys
    cu_k: Any
    win_left: int  # window: keys before / after the query's position (HAS_LEFT / HAS_RIGHT)
    win_right: int
    softcap2: float  # softcap * log2 e
    slopes: Any  # ALiBi: the (B, H) slopes and their strides
    slopes_stride_b: int
    slopes_stride_h: int
    mask: Any  # attn_mask (bool read as uint8, or additive) and its strides
    mask_stride_b: int
    mask_stride_h: int
    mask_stride_i: int
    mask_stride_j: int
    kpad: Any  # key_padding_mask as uint8 (B, Nk) and its strides
    kpad_stride_b: int
    kpad_stride_j: int
    sparse_idx: Any  # block-sparse: int32 (B, H, rows, entries) kept-block indices, per row in order
    sparse_idx_stride_b: int
    sparse_idx_stride_h: int
    sparse_idx_stride_row: int
    sparse_num: Any  # ... and their counts, int32 (B, H, rows)
    sparse_num_stride_b: int
    sparse_num_stride_h: int
    seed: int  # dropout: the Philox key, p and 1 / (1 - p)
    drop_p: float
    drop_scale: float


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




class HeadFeatures(NamedTuple):
    """What the tiles of one (batch, query head) read of a call's ``Features``: made once per head by
    ``_head_features`` and passed, one tuple, down to ``_scores`` and the dropout test. Pointers and
    the slope are 0 where their feature is off."""

    off: Any  # key position of query 0 (bottom-right alignment; 0 otherwise)
    win_left: Any  # window sides (HAS_LEFT / HAS_RIGHT)
    win_right: Any
    softcap2: Any  # softcap * log2 e
    slope2: Any  # this head's ALiBi slope * log2 e
    mask: Any  # attn_mask at this (batch, head), and its (i, j) strides
    mask_stride_i: Any
    mask_stride_j: Any
    kpad: Any  # key_padding_mask at this batch, and its key stride
    kpad_stride_j: Any
    seed: Any  # dropout: seed, p, 1 / (1 - p), and the counter's batch and head words (int32)
    drop_p: Any
    drop_scale: Any
    b: Any
    h: Any


@triton.jit
def _scores(qk, rows, cols, n_q, n_k, S, MASKED: tl.constexpr, CHECK_KEYS: tl.constexpr, CAUSAL: tl.constexpr,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
            MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr):
    """The scores of one tile, log2 domain: ``qk`` = scale * log2(e) * q.k for query indices ``rows``
    and key indices ``cols`` (broadcastable 2-D int32 tensors: (M, 1) x (1, N) in the forward and dQ
    pass, (1, M) x (N, 1) in the transposed dK/dV pass), modified in the order the semantics give
    (softcap, ALiBi, additive mask), with -inf wherever the key is not visible. ``S``: the head's
    ``HeadFeatures``.

    Returns ``(s, t)``: ``t = tanh(raw / softcap)`` for the backward's softcap derivative (``qk``
    itself, unused, without softcap). ``MASKED`` applies the geometric rules (key range, causal,
    window), needed only in tiles that straddle an edge; the array masks apply to every tile.
    ``CHECK_KEYS`` (with ``MASKED``) hides keys past n_k: the dK/dV pass leaves it off, as keys past
    the end only make dK/dV rows that are never stored (but on with the atomic dQ, which reads them)."""
    t = qk
    if SOFTCAP:  # softcap * tanh(raw / softcap), in log2 units: C tanh(qk / C) with C = softcap * log2 e
        t = _tanh(qk / S.softcap2)
        qk = S.softcap2 * t
    if ALIBI:  # slope2 = slope * log2 e
        qk = qk - S.slope2 * tl.abs(rows + S.off - cols).to(tl.float32)
    if MASK_KIND != 0:
        in_bounds = (rows < n_q) & (cols < n_k)
        mask_ptrs = S.mask + rows.to(tl.int64) * S.mask_stride_i + cols * S.mask_stride_j
    if MASK_KIND == 2:
        qk = qk + tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32) * LOG2E
    if MASKED:
        visible = None
        if CHECK_KEYS:
            visible = cols < n_k
        if CAUSAL:
            visible = _both(visible, cols <= rows + S.off)
        if HAS_LEFT:
            visible = _both(visible, cols >= rows + S.off - S.win_left)
        if HAS_RIGHT:
            visible = _both(visible, cols <= rows + S.off + S.win_right)
        qk = tl.where(visible, qk, float("-inf"))
    if KEY_PADDING:
        real = tl.load(S.kpad + cols * S.kpad_stride_j, mask=cols < n_k, other=0)
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
# the preamble the three attention kernels share: the program's block, batch, head and sequence,
# then each head's feature values, and the block-sparse lists
# ---------------------------------------------------------------------------------------------


@triton.jit
def _preamble(F, H, N_Q, N_K, BLOCK: tl.constexpr, BY_KEYS: tl.constexpr, CAUSAL: tl.constexpr, GQA: tl.constexpr,
              VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """What an attention program works out first from its program ids (grid axis 0: blocks of
    ``BLOCK`` rows, of queries, or of keys when ``BY_KEYS`` (the dK/dV pass); axis 1: batch x heads,
    K/V heads when ``BY_KEYS``). Returns ``(start, off_b, off_h, off_hk, q_start, k_start, n_q, n_k,
    n_seen, off)``: the block's first row; the batch index (sequence, when varlen), query head and
    K/V head, int64 (``off_h`` is the K/V head too when ``BY_KEYS``); the sequence's first rows in the
    packed tensors (varlen; 0 otherwise) and lengths; the other side's length, or 0 for a block past
    its sequence's end (no work); and ``off``, the key position of query 0."""
    block = tl.program_id(0)
    if CAUSAL and not BY_KEYS:  # the last query blocks see the most keys: launch them first so the grid ends on short work
        block = tl.num_programs(0) - 1 - block
    start = block * BLOCK
    bh = tl.program_id(1)
    heads = H
    if GQA and BY_KEYS:
        heads = H // F.group
    off_b = (bh // heads).to(tl.int64)
    off_h = (bh % heads).to(tl.int64)
    off_hk = off_h
    if GQA and not BY_KEYS:
        off_hk = off_h // F.group
    n_q = N_Q
    n_k = N_K
    q_start = 0
    k_start = 0
    if BY_KEYS:
        n_seen = N_Q
    else:
        n_seen = N_K
    if VARLEN:  # this sequence's rows: batch strides are 0, the row offsets come from cu_seqlens
        q_start = tl.load(F.cu_q + off_b)
        k_start = tl.load(F.cu_k + off_b)
        n_q = tl.load(F.cu_q + off_b + 1) - q_start
        n_k = tl.load(F.cu_k + off_b + 1) - k_start
        if BY_KEYS:
            n_seen = tl.where(start < n_k, n_q, 0)
        else:
            n_seen = tl.where(start < n_q, n_k, 0)
    off = 0
    if BOTTOM_RIGHT:
        off = n_k - n_q
    return start, off_b, off_h, off_hk, q_start, k_start, n_q, n_k, n_seen, off


@triton.jit
def _head_features(F, off, off_b, off_h, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr):
    """The ``HeadFeatures`` of query head ``off_h`` of batch (sequence) ``off_b``: its ALiBi slope
    loaded, the mask and key-padding pointers moved to it."""
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(F.slopes + off_b * F.slopes_stride_b + off_h * F.slopes_stride_h).to(tl.float32) * LOG2E
    mask = 0
    if MASK_KIND != 0:
        mask = F.mask + off_b * F.mask_stride_b + off_h * F.mask_stride_h
    kpad = 0
    if KEY_PADDING:
        kpad = F.kpad + off_b * F.kpad_stride_b
    return HeadFeatures(off, F.win_left, F.win_right, F.softcap2, slope2, mask, F.mask_stride_i, F.mask_stride_j, kpad,
                        F.kpad_stride_j, F.seed, F.drop_p, F.drop_scale, off_b.to(tl.int32), off_h.to(tl.int32))


@triton.jit
def _sparse_list(F, off_b, off_h, row):
    """Block-sparse: a pointer to the kept-block list of sparse row ``row`` (a query block; a key
    block in the dK/dV pass) of this batch and head, and its length."""
    idx_ptr = F.sparse_idx + off_b * F.sparse_idx_stride_b + off_h * F.sparse_idx_stride_h + row * F.sparse_idx_stride_row
    count = tl.load(F.sparse_num + off_b * F.sparse_num_stride_b + off_h * F.sparse_num_stride_h + row)
    return idx_ptr, count


@triton.jit
def _sparse_tile(idx_ptr, t, TILES: tl.constexpr, SPARSE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """The first row of tile ``t`` of a kept-block list (``TILES`` tiles of ``BLOCK`` rows a block)."""
    return tl.load(idx_ptr + t // TILES) * SPARSE_BLOCK + (t % TILES) * BLOCK


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
              start_n, n_q, n_k, qk_scale, S,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, IN_PRECISION: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """One key tile at ``start_n`` of the online softmax (see ``_fwd_inner``)."""
    CAN_EMPTY: tl.constexpr = MASKED or KEY_PADDING or MASK_KIND != 0
    cols = start_n + offs_n
    k = _load_rows(k_ptrs + start_n * stride_kn, cols, n_k, offs_d, HEAD_DIM, MASKED, EVEN_D)
    qk = _mma(q, tl.trans(k), None, IN_PRECISION) * qk_scale
    qk, _t = _scores(qk, offs_m[:, None], cols[None, :], n_q, n_k, S,
                     MASKED, True, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING)
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_ref = m_new  # what the exponents are taken against
    if CAN_EMPTY:
        # a row that has seen no key yet: exp2(-inf - 0) = 0; its running max stays -inf (were it pinned at 0,
        # later scores below -126 would underflow against it and the row would seem to see no key)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(qk - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_dropout_keep(S.seed, S.b, S.h, offs_m[:, None], cols[None, :], S.drop_p), p, 0.0)
    v = _load_rows(v_ptrs + start_n * stride_vn, cols, n_k, offs_d, HEAD_DIM, MASKED, EVEN_D)
    acc = acc * alpha[:, None]
    acc = _mma(p.to(v.dtype), v, acc, IN_PRECISION)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
               start, stop, n_q, n_k, qk_scale, S,
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
                                  start_n, n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_N, CAUSAL, MASKED, EVEN_D,
                                  IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return acc, l_i, m_i


@triton.jit
def _fwd_span(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
              s, e, bounds, n_q, n_k, qk_scale, S,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
              IN_PRECISION: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
              ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """The keys [s, e) (a key split; s a multiple of BLOCK_N) cut to the block's visible range
    ``bounds`` = (lo, a, c, hi) of ``_key_bounds``: masked edge tiles, unmasked interior."""
    lo, a, c, hi = bounds
    if HAS_LEFT:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                   tl.maximum(lo, s), tl.minimum(a, e), n_q, n_k, qk_scale, S,
                                   HEAD_DIM, BLOCK_N, CAUSAL, True, EVEN_D, IN_PRECISION,
                                   HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
        start = tl.maximum(a, s)
    else:
        start = s
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               start, tl.minimum(c, e), n_q, n_k, qk_scale, S,
                               HEAD_DIM, BLOCK_N, CAUSAL, False, EVEN_D, IN_PRECISION,
                               HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                               tl.maximum(c, s), tl.minimum(hi, e), n_q, n_k, qk_scale, S,
                               HEAD_DIM, BLOCK_N, CAUSAL, True, EVEN_D, IN_PRECISION,
                               HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return acc, l_i, m_i


@triton.jit
def attention_forward_features(
    Q, K, V, O, LSE, H, N_Q, N_K, qk_scale, KEYS_PER_SPLIT, F,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IN_PRECISION: tl.constexpr,
    GQA: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
    KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, SPARSE_MASKED: tl.constexpr, SPARSE_Q: tl.constexpr,
    SPARSE_K: tl.constexpr, DROPOUT: tl.constexpr, STORE_LSE: tl.constexpr = True,
):
    """One program: BLOCK_M query rows of one (batch, head), over keys [split * KEYS_PER_SPLIT,
    (split + 1) * KEYS_PER_SPLIT) (a multiple of BLOCK_N). Grid (cdiv(N_Q, BLOCK_M), B * H, splits).
    Q, K, V are (B, H, N, D) views, O a (splits, B, H, N_Q, D) view with strides (b, h, n, d, split)
    and LSE a (splits, B, H, N_Q) one with strides (b, h, split); F the call's ``Features``.

    With one split, O and LSE are the results; with several (flash-decoding, when the plan splits
    the key loop to fill the device) they are per-split partials that the caller merges by
    log-sum-exp -- every feature only narrows which keys a split visits, so the merge is unchanged.
    STORE_LSE=False (one split, a caller that needs O alone): LSE is not written, and may be any pointer.
    """
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    Q, stride_q = Q
    K, stride_k = K
    V, stride_v = V
    O, stride_o = O
    LSE, stride_l = LSE
    stride_qb, stride_qh, stride_qn, stride_qd = stride_q
    stride_kb, stride_kh, stride_kn, stride_kd = stride_k
    stride_vb, stride_vh, stride_vn, stride_vd = stride_v
    stride_ob, stride_oh, stride_on, stride_od, stride_os = stride_o
    stride_lb, stride_lh, stride_ls = stride_l
    start_m, off_b, off_h, off_hk, q_start, k_start, n_q, n_k, n_k_seen, off = _preamble(
        F, H, N_Q, N_K, BLOCK_M, False, CAUSAL, GQA, VARLEN, BOTTOM_RIGHT)
    split = tl.program_id(2)
    if VARLEN:
        Q += q_start.to(tl.int64) * stride_qn
        O += q_start.to(tl.int64) * stride_on
        LSE += q_start.to(tl.int64)
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
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
    S = _head_features(F, off, off_b, off_h, ALIBI, MASK_KIND, KEY_PADDING)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if SPARSE:
        # FlexAttention-style: one flat loop over the tiles of the kept key blocks of this query
        # block's sparse row (the host already dropped blocks the causal/window range rules out);
        # key splits share out the list's tiles instead of key ranges
        TILES: tl.constexpr = SPARSE_K // BLOCK_N
        idx_ptr, count = _sparse_list(F, off_b, off_h, start_m // SPARSE_Q)
        tiles = count * TILES
        per_split = tl.cdiv(tiles, tl.num_programs(2))
        first = split * per_split
        for t in range(first, tl.minimum(first + per_split, tiles)):
            start_n = _sparse_tile(idx_ptr, t, TILES, SPARSE_K, BLOCK_N)
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                      start_n, n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_N, CAUSAL, SPARSE_MASKED, EVEN_D,
                                      IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    else:
        bounds = _key_bounds(start_m, n_q, n_k_seen, off, S.win_left, S.win_right, BLOCK_M, BLOCK_N,
                             CAUSAL, HAS_LEFT, HAS_RIGHT)
        s = split * KEYS_PER_SPLIT  # this split's keys: [s, s + KEYS_PER_SPLIT), cut to what is visible
        e = s + KEYS_PER_SPLIT
        acc, l_i, m_i = _fwd_span(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                  s, e, bounds, n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_N, CAUSAL, EVEN_D, IN_PRECISION,
                                  HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw no key: O = 0
    if DROPOUT:
        out = out * S.drop_scale
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    lse = tl.where(l_i != l_i, l_i, lse)  # a NaN score (NaN in q, k or the mask): the LSE is NaN too, as O is
    _store_rows(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
                offs_m, n_q, offs_d, HEAD_DIM, EVEN_D)
    if STORE_LSE:
        tl.store(LSE + offs_m, lse, mask=offs_m < n_q)


@triton.jit
def attention_forward(
    Q, K, V, O, LSE, H, N_Q, N_K, qk_scale, KEYS_PER_SPLIT,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IN_PRECISION: tl.constexpr, STORE_LSE: tl.constexpr = True,
):
    """The forward of a call with no features: ``attention_forward_features`` called (inlined) with
    every feature off. A kernel of its own so that a plain launch passes neither the ``Features``
    tuple nor the 14 flags -- Triton's launcher handles each argument in Python on every call, which
    cost short sequences ~20% (H100, N = 512) when the features were 30 arguments of their own."""
    attention_forward_features(
        Q, K, V, O, LSE, H, N_Q, N_K, qk_scale, KEYS_PER_SPLIT,
        Features(1, None, None, 0, 0, 0.0, None, 0, 0, None, 0, 0, 0, 0, None, 0, 0, None, 0, 0, 0, None, 0, 0, 0, 0.0, 1.0),
        HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL, IN_PRECISION,
        False, False, False, False, False, False, False, 0, False, False, False, 0, 0, False, STORE_LSE,
    )


# ---------------------------------------------------------------------------------------------
# backward: delta = rowsum(dO * O)  (dropout needs nothing else: O already holds the dropped P)
# ---------------------------------------------------------------------------------------------


@triton.jit
def attention_backward_delta(O, DO, DELTA, H, N_Q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """O, DO: (B, H, N_Q, D) views; DELTA a contiguous float32 (B, H, N_Q)."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    O, stride_o = O
    DO, stride_do = DO
    stride_ob, stride_oh, stride_on, stride_od = stride_o
    stride_dob, stride_doh, stride_don, stride_dod = stride_do
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
               offs_n, offs_m, offs_d, start_m, n_q, n_k, qk_scale, S,
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
    sT, tT = _scores(qkT, rows[None, :], offs_n[:, None], n_q, n_k, S,
                     MASKED, DQ_ATOMIC, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING)
    pT = tl.math.exp2(sT - lse2[None, :])
    do = _load_rows(do_ptrs + start_m * stride_don, rows, n_q, offs_d, HEAD_DIM, True, EVEN_D)
    if DROPOUT:  # dV sees the dropped, rescaled P; dP is dropped the same way (dS = P * (dP' - delta))
        keepT = _dropout_keep(S.seed, S.b, S.h, rows[None, :], offs_n[:, None], S.drop_p)
        dv = _mma(tl.where(keepT, pT * S.drop_scale, 0.0).to(do.dtype), do, dv, IN_PRECISION)
    else:
        dv = _mma(pT.to(do.dtype), do, dv, IN_PRECISION)
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    dpT = _mma(v, tl.trans(do), None, IN_PRECISION)
    if DROPOUT:
        dpT = tl.where(keepT, dpT * S.drop_scale, 0.0)
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
                offs_n, offs_m, offs_d, start, stop, n_q, n_k, qk_scale, S,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                EVEN_D: tl.constexpr, DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """Query blocks [start, stop), tiles transposed (keys x queries). ``MASKED``: blocks on an edge of
    the visible range. Query rows past n_q load q = dO = 0, delta = 0 and an LSE of +inf, so P = 0
    there and they add exactly zero to dK and dV without a mask."""
    for start_m in range(start, stop, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                            stride_dqn, offs_n, offs_m, offs_d, start_m, n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_M,
                            CAUSAL, MASKED, EVEN_D, DQ_ATOMIC, IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI,
                            MASK_KIND, KEY_PADDING, DROPOUT)
    return dk, dv


@triton.jit
def _dkdv_span(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don, stride_dqn,
               offs_n, offs_m, offs_d, s, e, bounds, n_q, n_k, qk_scale, S,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
               DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """The query rows [s, e) cut to ``bounds`` = (lo, a, c, hi) of ``_query_bounds``: masked tiles on
    the edges, unmasked ones inside."""
    LEAD: tl.constexpr = CAUSAL or HAS_RIGHT or DQ_ATOMIC
    lo, a, c, hi = bounds
    if LEAD:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                             stride_dqn, offs_n, offs_m, offs_d, tl.maximum(lo, s), tl.minimum(a, e), n_q, n_k, qk_scale,
                             S, HEAD_DIM, BLOCK_M, CAUSAL, True, EVEN_D, DQ_ATOMIC, IN_PRECISION,
                             HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
        start = tl.maximum(a, s)
    else:
        start = s
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                         stride_dqn, offs_n, offs_m, offs_d, start, tl.minimum(c, e), n_q, n_k, qk_scale,
                         S, HEAD_DIM, BLOCK_M, CAUSAL, False, EVEN_D, DQ_ATOMIC, IN_PRECISION,
                         HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    if HAS_LEFT:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                             stride_dqn, offs_n, offs_m, offs_d, tl.maximum(c, s), tl.minimum(hi, e), n_q, n_k, qk_scale,
                             S, HEAD_DIM, BLOCK_M, CAUSAL, True, EVEN_D, DQ_ATOMIC, IN_PRECISION,
                             HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return dk, dv


@triton.jit
def _dkdv_head(dk, dv, k, v, off_b, off_h, start_n, offs_n, offs_m, offs_d, bounds, n_q, n_k, qk_scale,
               Q, DO, LSE, DELTA, DQ_ACC, off, F,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
               DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
               MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, SPARSE_MASKED: tl.constexpr,
               SPARSE_Q: tl.constexpr, SPARSE_K: tl.constexpr, DROPOUT: tl.constexpr):
    """The contribution of query head ``off_h`` to the dK, dV of this program's keys. Q, DO, DQ_ACC
    (strides (b, h, n, d) / (b, h, n)) and LSE ((b, h)) are views, DELTA a pointer with LSE's
    strides, all already moved to the sequence's first row."""
    Q, stride_q = Q
    DO, stride_do = DO
    DQ_ACC, stride_dqa = DQ_ACC
    LSE, stride_l = LSE
    stride_qb, stride_qh, stride_qn, stride_qd = stride_q
    stride_dob, stride_doh, stride_don, stride_dod = stride_do
    stride_dqab, stride_dqah, stride_dqan = stride_dqa
    stride_lb, stride_lh = stride_l
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    dq_ptrs = DQ_ACC + off_b * stride_dqab + off_h * stride_dqah + offs_m[:, None] * stride_dqan + offs_d[None, :]
    lse_ptr = LSE + off_b * stride_lb + off_h * stride_lh
    delta_ptr = DELTA + off_b * stride_lb + off_h * stride_lh
    S = _head_features(F, off, off_b, off_h, ALIBI, MASK_KIND, KEY_PADDING)
    if SPARSE:  # a flat loop over the tiles of the kept query blocks of this key block's sparse column
        TILES: tl.constexpr = SPARSE_Q // BLOCK_M
        idx_ptr, count = _sparse_list(F, off_b, off_h, start_n // SPARSE_K)
        tiles = count * TILES
        for t in range(0, tiles):
            start_m = _sparse_tile(idx_ptr, t, TILES, SPARSE_Q, BLOCK_M)
            dk, dv = _dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                                stride_dqan, offs_n, offs_m, offs_d, start_m, n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_M,
                                CAUSAL, SPARSE_MASKED, EVEN_D, DQ_ATOMIC, IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                                ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    else:
        dk, dv = _dkdv_span(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, stride_qn, stride_don,
                            stride_dqan, offs_n, offs_m, offs_d, 0, bounds[3], bounds, n_q, n_k, qk_scale, S,
                            HEAD_DIM, BLOCK_M, CAUSAL, EVEN_D, DQ_ATOMIC, IN_PRECISION,
                            HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return dk, dv


@triton.jit
def attention_backward_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, H, N_Q, N_K, sm_scale, qk_scale, F,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, DQ_ATOMIC: tl.constexpr, IN_PRECISION: tl.constexpr,
    GQA: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
    KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, SPARSE_MASKED: tl.constexpr, SPARSE_Q: tl.constexpr,
    SPARSE_K: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Grid (cdiv(N_K, BLOCK_N), B * H_kv). Views: Q, K, V, DO, DK, DV (b, h, n, d); LSE (b, h),
    and DELTA a pointer with LSE's strides; DQ_ACC (b, h, n) -- a float32 (B, H, N_Q, BLOCK_D) buffer of zeros when ``DQ_ATOMIC``
    (unscaled dQ is added into it), else unused. With GQA the program sums the contributions of its
    K/V head's GROUP query heads. F: the call's ``Features``."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    Q, stride_q = Q
    K, stride_k = K
    V, stride_v = V
    DO, stride_do = DO
    LSE, stride_l = LSE
    DK, stride_dk = DK
    DV, stride_dv = DV
    DQ_ACC, stride_dqa = DQ_ACC
    stride_kb, stride_kh, stride_kn, stride_kd = stride_k
    stride_vb, stride_vh, stride_vn, stride_vd = stride_v
    stride_dkb, stride_dkh, stride_dkn, stride_dkd = stride_dk
    stride_dvb, stride_dvh, stride_dvn, stride_dvd = stride_dv
    start_n, off_b, _off_h, off_hk, q_start, k_start, n_q, n_k, n_q_seen, off = _preamble(
        F, H, N_Q, N_K, BLOCK_N, True, CAUSAL, GQA, VARLEN, BOTTOM_RIGHT)
    if VARLEN:
        Q += q_start.to(tl.int64) * stride_q[2]
        DO += q_start.to(tl.int64) * stride_do[2]
        DQ_ACC += q_start.to(tl.int64) * stride_dqa[2]
        LSE += q_start.to(tl.int64)
        DELTA += q_start.to(tl.int64)
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
        DK += k_start.to(tl.int64) * stride_dkn
        DV += k_start.to(tl.int64) * stride_dvn
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k = _load_rows(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, n_k, offs_d, HEAD_DIM, True, EVEN_D)
    v = _load_rows(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                   offs_n, n_k, offs_d, HEAD_DIM, True, EVEN_D)
    bounds = _query_bounds(start_n, n_q_seen, n_k, off, F.win_left, F.win_right, BLOCK_M, BLOCK_N,
                           CAUSAL, HAS_LEFT, HAS_RIGHT, DQ_ATOMIC)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if GQA:  # the query heads sharing this K/V head, one after another: dK, dV summed in registers
        for g in range(0, F.group):
            dk, dv = _dkdv_head(dk, dv, k, v, off_b, off_hk * F.group + g, start_n, offs_n, offs_m, offs_d, bounds,
                                n_q, n_k, qk_scale, (Q, stride_q), (DO, stride_do), (LSE, stride_l), DELTA,
                                (DQ_ACC, stride_dqa), off, F, HEAD_DIM, BLOCK_M, CAUSAL, EVEN_D, DQ_ATOMIC,
                                IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, SPARSE,
                                SPARSE_MASKED, SPARSE_Q, SPARSE_K, DROPOUT)
    else:
        dk, dv = _dkdv_head(dk, dv, k, v, off_b, off_hk, start_n, offs_n, offs_m, offs_d, bounds,
                            n_q, n_k, qk_scale, (Q, stride_q), (DO, stride_do), (LSE, stride_l), DELTA,
                            (DQ_ACC, stride_dqa), off, F, HEAD_DIM, BLOCK_M, CAUSAL, EVEN_D, DQ_ATOMIC,
                            IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, SPARSE,
                            SPARSE_MASKED, SPARSE_Q, SPARSE_K, DROPOUT)

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
             start_n, n_q, n_k, qk_scale, S,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
             MASKED: tl.constexpr, EVEN_D: tl.constexpr, IN_PRECISION: tl.constexpr,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
             MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """One key tile at ``start_n`` of the dQ pass."""
    cols = start_n + offs_n
    k = _load_rows(k_ptrs + start_n * stride_kn, cols, n_k, offs_d, HEAD_DIM, MASKED, EVEN_D)
    qk = _mma(q, tl.trans(k), None, IN_PRECISION) * qk_scale
    s, t = _scores(qk, offs_m[:, None], cols[None, :], n_q, n_k, S,
                   MASKED, True, CAUSAL, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING)
    p = tl.math.exp2(s - lse2[:, None])
    v = _load_rows(v_ptrs + start_n * stride_vn, cols, n_k, offs_d, HEAD_DIM, MASKED, EVEN_D)
    dp = _mma(do, tl.trans(v), None, IN_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(S.seed, S.b, S.h, offs_m[:, None], cols[None, :], S.drop_p)
        dp = tl.where(keep, dp * S.drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq = _mma(ds.to(k.dtype), k, dq, IN_PRECISION)
    return dq


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
              start, stop, n_q, n_k, qk_scale, S,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr, IN_PRECISION: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d, start_n,
                      n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_N, CAUSAL, MASKED, EVEN_D, IN_PRECISION,
                      HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return dq


@triton.jit
def _dq_span(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
             s, e, bounds, n_q, n_k, qk_scale, S,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
             IN_PRECISION: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
             ALIBI: tl.constexpr, MASK_KIND: tl.constexpr, KEY_PADDING: tl.constexpr, DROPOUT: tl.constexpr):
    """As ``_fwd_span``: keys [s, e) cut to ``bounds`` = (lo, a, c, hi)."""
    lo, a, c, hi = bounds
    if HAS_LEFT:
        dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                       tl.maximum(lo, s), tl.minimum(a, e), n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_N, CAUSAL, True,
                       EVEN_D, IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
        start = tl.maximum(a, s)
    else:
        start = s
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                   start, tl.minimum(c, e), n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_N, CAUSAL, False,
                   EVEN_D, IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    dq = _dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                   tl.maximum(c, s), tl.minimum(hi, e), n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_N, CAUSAL, True,
                   EVEN_D, IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    return dq


@triton.jit
def attention_backward_dq(
    Q, K, V, DO, LSE, DELTA, DQ, H, N_Q, N_K, sm_scale, qk_scale, F,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, IN_PRECISION: tl.constexpr,
    GQA: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, MASK_KIND: tl.constexpr,
    KEY_PADDING: tl.constexpr, SPARSE: tl.constexpr, SPARSE_MASKED: tl.constexpr, SPARSE_Q: tl.constexpr,
    SPARSE_K: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Grid (cdiv(N_Q, BLOCK_M), B * H). Views: Q, K, V, DO, DQ (b, h, n, d), LSE (b, h); DELTA a
    pointer with LSE's strides. F: the call's ``Features``."""
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    Q, stride_q = Q
    K, stride_k = K
    V, stride_v = V
    DO, stride_do = DO
    LSE, stride_l = LSE
    DQ, stride_dq = DQ
    stride_qb, stride_qh, stride_qn, stride_qd = stride_q
    stride_kb, stride_kh, stride_kn, stride_kd = stride_k
    stride_vb, stride_vh, stride_vn, stride_vd = stride_v
    stride_dob, stride_doh, stride_don, stride_dod = stride_do
    stride_dqb, stride_dqh, stride_dqn, stride_dqd = stride_dq
    stride_lb, stride_lh = stride_l
    start_m, off_b, off_h, off_hk, q_start, k_start, n_q, n_k, n_k_seen, off = _preamble(
        F, H, N_Q, N_K, BLOCK_M, False, CAUSAL, GQA, VARLEN, BOTTOM_RIGHT)
    if VARLEN:
        Q += q_start.to(tl.int64) * stride_qn
        DO += q_start.to(tl.int64) * stride_don
        DQ += q_start.to(tl.int64) * stride_dqn
        LSE += q_start.to(tl.int64)
        DELTA += q_start.to(tl.int64)
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
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
    S = _head_features(F, off, off_b, off_h, ALIBI, MASK_KIND, KEY_PADDING)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if SPARSE:  # as the forward: a flat loop over the tiles of the kept key blocks
        TILES: tl.constexpr = SPARSE_K // BLOCK_N
        idx_ptr, count = _sparse_list(F, off_b, off_h, start_m // SPARSE_Q)
        tiles = count * TILES
        for t in range(0, tiles):
            start_n = _sparse_tile(idx_ptr, t, TILES, SPARSE_K, BLOCK_N)
            dq = _dq_tile(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                          start_n, n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_N, CAUSAL, SPARSE_MASKED, EVEN_D,
                          IN_PRECISION, HAS_LEFT, HAS_RIGHT, SOFTCAP, ALIBI, MASK_KIND, KEY_PADDING, DROPOUT)
    else:
        bounds = _key_bounds(start_m, n_q, n_k_seen, off, S.win_left, S.win_right, BLOCK_M, BLOCK_N,
                             CAUSAL, HAS_LEFT, HAS_RIGHT)
        dq = _dq_span(dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                      0, bounds[3], bounds, n_q, n_k, qk_scale, S, HEAD_DIM, BLOCK_N, CAUSAL, EVEN_D, IN_PRECISION,
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
