"""The numba decode kernel: one step of KV-cache decoding read from the cache where it lies.

Imported on the first ``decode_kvcache`` call (it imports numba). A task owns one (sequence, key
split) of the decode plan (``portattn/tiling/decode.py``) and, per key, reads the rows of every KV head
(contiguous in the cache) and dots each with the G x Nq query rows of its group, then adds each V row
into all of their accumulators: each K/V row is read once for its group (GQA packing). Rows come
straight from the cache -- (B, Nmax, H_kv, D) contiguous, or (num_blocks, page_size, H_kv, D) pages
found through the block table, any page size -- so there is no gather and no transposing copy; only
float16/bfloat16 rows are widened, one D-vector at a time, through a 65536-entry float32 table of
their bit patterns (numba has no half-precision arithmetic). Each split writes a float32 partial
(O, LSE) and ``merge`` combines them by log-sum-exp. The same arithmetic as the other kernels: q
pre-scaled by scale * log2(e), the softmax on exp2, softcap and ALiBi in log2 units, the LSE stored
in natural log.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from .kernels import exp2_shifted
from .operands import widen_table

LN2 = math.log(2.0)
LOG2E = 1.4426950408889634


def _row(cache, page, pos, head, heads_first, buffer, table):
    """Row ``cache[page, pos, head]`` (``cache[page, head, pos]`` when ``heads_first``: an attention call's
    (B, H, N, D) keys) as floats: the row itself, or 16-bit bits widened into ``buffer``."""


@numba.njit(inline="always")
def _axis1(pos, head, heads_first):
    """The index along axis 1 of the cache: the position, or the head when ``heads_first`` (0 or 1). In
    arithmetic, not a conditional, which in an inlined overload trips numba's SSA check (a phi out of scope)."""
    return pos + (head - pos) * heads_first


@overload(_row, inline="always")
def _row_impl(cache, page, pos, head, heads_first, buffer, table):
    if isinstance(cache.dtype, types.Float):
        return lambda cache, page, pos, head, heads_first, buffer, table: cache[
            page, _axis1(pos, head, heads_first), _axis1(head, pos, heads_first)]

    def widen(cache, page, pos, head, heads_first, buffer, table):
        row = cache[page, _axis1(pos, head, heads_first), _axis1(head, pos, heads_first)]
        for d in range(row.shape[0]):
            buffer[d] = table[row[d]]
        return buffer

    return widen


# A hidden key's score: finite, because the kernel is compiled with fastmath (reassociation vectorizes its
# dot products and row updates; the flags also let LLVM assume no infinities, so -inf cannot mark anything)
HIDDEN = -1e30
NOTHING_SEEN = -5e29  # a row whose running max is below this has seen no key yet


@numba.njit(inline="always")
def _locate(table, b, start, n, page_size, last_page, pages, positions):
    """(cache block, row in it) of sequence b's keys start..start + n into ``pages``/``positions``: once per
    key block for both the K and the V pass, walking the block table without a division per key (the page
    lookup per key and pass cost a paged step a third of its time). Page ids are clamped to the cache: a
    bad table reads a wrong page, never outside. Unpaged (``page_size`` 0): row j of sequence b."""
    if page_size == 0:
        for jj in range(n):
            pages[jj], positions[jj] = b, start + jj
        return
    entry, pos = start // page_size, start % page_size
    page = min(max(table[b, entry], 0), last_page)
    for jj in range(n):
        if pos == page_size:
            entry, pos = entry + 1, 0
            page = min(max(table[b, entry], 0), last_page)
        pages[jj], positions[jj] = page, pos
        pos += 1


@numba.njit(parallel=True, fastmath=True, cache=True)
def decode(q, k, v, table, lengths, capacity, page_size, widen, part_out, part_lse, group, causal, win_left,
           win_right, softcap2, alibi, slopes2, keys_per_split, block_k, heads_first):
    """Partials of every (split, sequence) task, each over all KV heads. q: float32 (B, Nq, H, D),
    already scaled by scale * log2(e); k, v: the cache (float, or uint16 bits widened by the ``widen``
    table); ``table`` int32 (B, max_blocks) when ``page_size`` > 0, else unused (sequence b's key j at
    ``k[b, j]``); ``lengths`` int32 (B,), clamped to [0, capacity], each cut into ranges of
    max(keys_per_split, ceil(L_b / splits)) keys rounded up to ``block_k`` (the plan's D2). part_out float32 (splits, B, Nq, H, D), part_lse (splits, B,
    H, Nq) in natural log. Window sides < 0 are unbounded; ``softcap2`` = softcap * log2(e), 0 for
    none; ``slopes2`` (B, H) ALiBi slopes * log2(e) when ``alibi``. ``heads_first`` (1, else 0): k and v are
    an attention call's (B, H_kv, N, D) arrays rather than a cache (each KV head's rows then stream apart).

    Row r of a task is query r % Nq of query head r // Nq, so KV head hk's rows are the G x Nq from
    hk * G * Nq on. A task walks its keys in order and, per key, every KV head's row: the (H_kv, D)
    block of a key is contiguous in the cache, so the stream is sequential -- one KV head's rows alone
    are 1 / H_kv of every cache row, and the strided stream ran at a fifth of the bandwidth here."""
    splits = part_out.shape[0]
    batch, n_q, heads, dim = q.shape
    kv_heads = heads // group
    rows = heads * n_q
    per_head = group * n_q
    last_page = k.shape[0] - 1  # page ids clamped to the cache (``_locate``)
    modified = causal or win_left >= 0 or win_right >= 0 or softcap2 > 0.0 or alibi
    for task in prange(batch * splits):
        split = task % splits
        b = task // splits
        n_k = min(max(lengths[b], 0), capacity)
        off = n_k - n_q  # key position of query 0: bottom-right alignment on this sequence's keys
        share = -(-n_k // splits)  # an even cut of this sequence's keys, rounded up to whole tiles
        per_split = max(keys_per_split, -(-share // block_k) * block_k)
        lo = split * per_split
        hi = min(lo + per_split, n_k)
        if win_left >= 0:
            lo = max(lo, off - win_left)  # no query sees a key before the first one's window
        qs = np.empty((rows, dim), np.float32)
        for r in range(rows):
            qs[r, :] = q[b, r % n_q, r // n_q, :]
        acc = np.zeros((rows, dim), np.float32)
        m = np.full(rows, HIDDEN, np.float32)
        ell = np.zeros(rows, np.float32)
        scores = np.empty((rows, block_k), np.float32)
        buffer = np.empty(dim, np.float32)
        pages = np.empty(block_k, np.int64)
        positions = np.empty(block_k, np.int64)
        for start in range(lo, hi, block_k):
            n = min(block_k, hi - start)
            _locate(table, b, start, n, page_size, last_page, pages, positions)
            for jj in range(n):
                page, pos = pages[jj], positions[jj]
                for hk in range(kv_heads):
                    k_row = _row(k, page, pos, hk, heads_first, buffer, widen)
                    for r in range(hk * per_head, (hk + 1) * per_head):
                        s = np.float32(0.0)
                        for d in range(dim):
                            s += qs[r, d] * k_row[d]
                        scores[r, jj] = s
            if modified:
                for r in range(rows):
                    position = off + r % n_q
                    for jj in range(n):
                        j = start + jj
                        x = scores[r, jj]
                        if softcap2 > 0.0:
                            x = softcap2 * math.tanh(x / softcap2)
                        if alibi:
                            x -= slopes2[b, r // n_q] * abs(position - j)
                        if (causal and j > position) or (win_left >= 0 and j < position - win_left) or (
                                win_right >= 0 and j > position + win_right):
                            x = HIDDEN
                        scores[r, jj] = x
            for r in range(rows):  # online softmax, log2 domain
                top = m[r]
                for jj in range(n):
                    top = max(top, scores[r, jj])
                if top < NOTHING_SEEN:  # nothing visible to this row yet: its weights are 0
                    scores[r, :n] = 0.0
                    continue
                alpha = np.float32(2.0) ** (m[r] - top)
                # the forward's vectorized exp2 (a hidden score's weight is 0, as there): float32 pow
                # per score was most of a short step's time
                total = exp2_shifted(scores[r, :n], 1.0, top, scores[r, :n])
                ell[r] = ell[r] * alpha + total
                m[r] = top
                for d in range(dim):
                    acc[r, d] *= alpha
            for jj in range(n):
                page, pos = pages[jj], positions[jj]
                for hk in range(kv_heads):
                    v_row = _row(v, page, pos, hk, heads_first, buffer, widen)
                    for r in range(hk * per_head, (hk + 1) * per_head):
                        p = scores[r, jj]
                        for d in range(dim):
                            acc[r, d] += p * v_row[d]
        for r in range(rows):
            i, h = r % n_q, r // n_q
            if ell[r] > 0.0:
                inverse = np.float32(1.0) / ell[r]  # row by row: ``acc[r] / ell[r]`` would allocate a row
                for d in range(dim):
                    part_out[split, b, i, h, d] = acc[r, d] * inverse
                part_lse[split, b, h, i] = (m[r] + math.log2(ell[r])) * LN2
            else:  # no visible key in this split: an empty partial the merge ignores (or the result: 0, -inf)
                part_out[split, b, i, h, :] = 0.0
                part_lse[split, b, h, i] = -np.inf


@numba.njit(parallel=True, fastmath=False, cache=True)
def merge(part_out, part_lse, out, lse):
    """out = sum_s exp(lse_s - lse) out_s, lse = logsumexp_s lse_s; a row no split saw stays 0, -inf."""
    splits, batch, n_q, heads, dim = part_out.shape
    for task in prange(batch * heads * n_q):
        i = task % n_q
        h = (task // n_q) % heads
        b = task // (n_q * heads)
        top = -np.inf
        for s in range(splits):
            top = max(top, part_lse[s, b, h, i])
        out[b, i, h, :] = 0.0
        if top == -np.inf:
            lse[b, h, i] = -np.inf
            continue
        total = 0.0
        for s in range(splits):
            w = math.exp(part_lse[s, b, h, i] - top)
            total += w
            for d in range(dim):
                out[b, i, h, d] += w * part_out[s, b, i, h, d]
        for d in range(dim):
            out[b, i, h, d] /= total
        lse[b, h, i] = top + math.log(total)


_NO_PAGES = np.zeros((1, 1), np.int32)
_NO_SLOPES = np.zeros((1, 1), np.float32)


def _heads_first(k_cache, v_cache, paged: bool):
    """(k, v, 1) when a contiguous cache is a (B, Nk, H_kv, D) view of C-contiguous (B, H_kv, Nk, D) arrays
    -- a model's own K/V seen in flash-attn's layout, as ``attention`` and ``portattn bench`` pass them -- so
    the kernel reads them in their own layout; else (k_cache, v_cache, 0). Read through the view, whose
    rows lose their unit stride in numba's typing, the kernel's dot products did not vectorize: 4-8x slower."""
    if paged or k_cache.flags.c_contiguous:
        return k_cache, v_cache, 0
    k, v = k_cache.transpose(0, 2, 1, 3), v_cache.transpose(0, 2, 1, 3)
    if k.flags.c_contiguous and v.flags.c_contiguous:
        return k, v, 1
    return k_cache, v_cache, 0


def run(q, k_cache, v_cache, block_table, lengths, spec, plan, extras):
    """``Backend.decode_kvcache`` for numpy arrays (float16/bfloat16 as uint16 bits, as
    ``arrays.to_numpy_bits`` hands them over): (out float32 (B, Nq, H, D), lse float32 (B, H, Nq))."""
    sixteen = spec.dtype in ("float16", "bfloat16")
    table = widen_table(spec.dtype)
    if sixteen:  # float16 arrays as their bits too (bfloat16 arrives so): one kernel widens both kinds
        q, k_cache, v_cache = (x.view(np.uint16) for x in (q, k_cache, v_cache))
    query = table[q] if sixteen else q  # a few rows: widening them is cheap
    query = np.ascontiguousarray(query * np.float32(spec.softmax_scale * LOG2E), dtype=np.float32)
    batch, n_q, heads, dim = q.shape
    splits = plan.key_splits
    part_out = np.empty((splits, batch, n_q, heads, dim), np.float32)
    part_lse = np.empty((splits, batch, heads, n_q), np.float32)
    left, right = spec.window if spec.window is not None else (None, None)
    slopes = (np.ascontiguousarray(extras.alibi_slopes, np.float32) * np.float32(LOG2E) if spec.alibi else _NO_SLOPES)
    paged = block_table is not None
    k_cache, v_cache, heads_first = _heads_first(k_cache, v_cache, paged)
    from .launch import run_with  # numba's pool sized by the plan

    with run_with(plan.threads, blas=False):  # the decode kernels call no BLAS
        decode(query, k_cache, v_cache, np.ascontiguousarray(block_table) if paged else _NO_PAGES,
               np.ascontiguousarray(lengths, np.int32), spec.seqlen_k, int(k_cache.shape[1]) if paged else 0, table,
               part_out, part_lse,
               spec.group_size, spec.causal, -1 if left is None else int(left), -1 if right is None else int(right),
               float(spec.softcap or 0.0) * LOG2E, spec.alibi, slopes, plan.keys_per_split, plan.block_k, heads_first)
        if splits == 1:
            return part_out[0], part_lse[0]
        out = np.empty((batch, n_q, heads, dim), np.float32)
        lse = np.empty((batch, heads, n_q), np.float32)
        merge(part_out, part_lse, out, lse)
    return out, lse


MAX_QUERIES = 16  # queries per sequence up to which ``attention`` takes this kernel (as the triton backend's)
# ... and only with GQA and at least this many key elements (Nk x D) per sequence: below, the tiled forward
# (MKL's products per head) was as fast or faster on the 2-core Xeon -- 1 q, 32/8 heads, D 128: 1024 keys
# 485 against 499 us, 2048 keys 836 against 1041, 4096 keys 1461 against 2647; D 32 or one query head per
# KV head, the forward at every length up to 4096.
MIN_KEY_ELEMENTS = 2048 * 128


def takes(spec) -> bool:
    """True when ``attention`` should run ``spec`` through this kernel rather than the tiled forward: few
    queries per sequence (a decoding or speculative step) with GQA and enough keys (``MIN_KEY_ELEMENTS``),
    whose group's query heads then share each K/V row read (the forward kernel gives each query head its
    own task, which reads its KV head's keys again), and only features this kernel has: causal, window
    and ALiBi bottom-right aligned (as it places queries) or without a position rule, and softcap. Masks,
    key padding, dropout, varlen and block sparsity take the forward kernel."""
    return (0 < spec.seqlen_q <= MAX_QUERIES and spec.group_size > 1
            and spec.seqlen_k * spec.head_dim >= MIN_KEY_ELEMENTS and spec.mask is None and not spec.key_padding
            and not spec.varlen and spec.block_size is None and not spec.dropout_p and spec.dtype != "float64"
            and (spec.align == "bottom-right" or not (spec.causal or spec.window is not None or spec.alibi)))


def attention(q, k, v, spec, plan, extras):
    """``Backend.forward`` of a few-query call through ``run``: K and V read in their (B, H, N, D) layout
    (``_heads_first``), every sequence holding all its keys. (out, lse) as the forward kernel gives them:
    out float32 (B, H, Nq, D) (a view), lse (B, H, Nq)."""
    lengths = np.full(spec.batch, spec.seqlen_k, np.int32)
    q, k, v = (np.ascontiguousarray(x).transpose(0, 2, 1, 3) for x in (q, k, v))
    out, lse = run(q, k, v, None, lengths, spec, plan, extras)
    return out.transpose(0, 2, 1, 3), lse
