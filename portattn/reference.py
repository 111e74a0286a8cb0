"""The float64 oracle: attention with the N x N score matrix materialized, forward and backward.

Exact up to float64 rounding and written for clarity, not speed; the conformance suite compares
every backend with it. Inputs are (B, H, N, D) arrays of any float dtype (k, v may have fewer
heads: GQA); results are float64 (LSE too). A query row that sees no key gets a zero output and an
LSE of -inf. Every feature of ``portattn.extras`` is spelled out here, element by element, from a
spec and its extras (numpy arrays); the dropout mask is an input (``keep``), since each backend
draws it from its own generator.
"""

from __future__ import annotations

import numpy as np

from .extras import NONE, Extras


def causal_mask(seqlen_q: int, seqlen_k: int, offset: int = 0) -> np.ndarray:
    """True where query i may see key j: j <= i + offset (offset 0: top-left, as SDPA's ``is_causal``)."""
    return np.arange(seqlen_k)[None, :] <= np.arange(seqlen_q)[:, None] + offset


def visible_keys(spec, extras: Extras, seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """(B, H, Nq, Nk) bool: which keys each query may see, before the scores are looked at."""
    offset = spec.query_offset(seqlen_q, seqlen_k)
    position = np.arange(seqlen_q)[:, None] + offset
    key = np.arange(seqlen_k)[None, :]
    visible = np.ones((seqlen_q, seqlen_k), bool)
    if spec.causal:
        visible &= key <= position
    if spec.window is not None:
        left, right = spec.window
        if left is not None:
            visible &= key >= position - left
        if right is not None:
            visible &= key <= position + right
    visible = np.broadcast_to(visible, (spec.batch, spec.heads, seqlen_q, seqlen_k))
    if extras.key_padding_mask is not None:
        visible = visible & np.asarray(extras.key_padding_mask, bool)[:, None, None, :]
    if spec.mask == "bool":
        visible = visible & np.asarray(extras.attn_mask, bool)
    if spec.block_size is not None:
        block_q, block_k = spec.block_size
        blocks = np.asarray(extras.block_mask, bool)
        per_key = np.repeat(np.repeat(blocks, block_q, axis=2), block_k, axis=3)[:, :, :seqlen_q, :seqlen_k]
        visible = visible & per_key
    return visible


def scores(q, k, spec, extras: Extras, scale: float):
    """(raw, scores): raw = scale * q k^T; scores after softcap, ALiBi, the additive mask and -inf
    for every key that is not visible."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    raw = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    s = spec.softcap * np.tanh(raw / spec.softcap) if spec.softcap is not None else raw
    if spec.alibi:
        position = np.arange(seqlen_q)[:, None] + spec.query_offset(seqlen_q, seqlen_k)
        distance = np.abs(position - np.arange(seqlen_k)[None, :])
        s = s - np.asarray(extras.alibi_slopes, np.float64)[:, :, None, None] * distance
    if spec.mask == "additive":
        s = s + np.asarray(extras.attn_mask, np.float64)
    return raw, np.where(visible_keys(spec, extras, seqlen_q, seqlen_k), s, -np.inf)


def _softmax(scores):
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    safe_max = np.where(np.isfinite(row_max), row_max, 0.0)  # rows with no visible key
    weights = np.exp(scores - safe_max)
    row_sum = weights.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        # a NaN score (a NaN in q, k or the mask) makes its row NaN, weights and LSE: honest, not zeros
        empty = np.where(np.isnan(row_sum), np.nan, 0.0)
        probs = np.where(row_sum > 0, weights / np.where(row_sum > 0, row_sum, 1.0), empty)
        lse = np.where(row_sum > 0, safe_max + np.log(row_sum), np.where(np.isnan(row_sum), np.nan, -np.inf))[..., 0]
    return probs, lse


def _plain_spec(spec, causal: bool, q, k):
    if spec is not None:
        return spec
    from .spec import AttentionSpec

    b, h, nq, d = q.shape
    return AttentionSpec(b, h, nq, k.shape[2], d, causal=causal, kv_heads=k.shape[1])


def _per_sequence(spec, extras: Extras, keep, arrays, run):
    """Varlen: split (1, H, total, D) arrays by cu_seqlens and run each sequence as a batch of one."""
    cu_q = np.asarray(extras.cu_seqlens_q)
    cu_k = np.asarray(extras.cu_seqlens_k)
    pieces = []
    for b in range(spec.batch):
        nq, nk = int(cu_q[b + 1] - cu_q[b]), int(cu_k[b + 1] - cu_k[b])
        one = spec.with_(batch=1, seqlen_q=nq, seqlen_k=nk, varlen=False)
        slopes = None if extras.alibi_slopes is None else np.asarray(extras.alibi_slopes)[b:b + 1]
        sliced = [x[:, :, cu_q[b]:cu_q[b + 1]] if role == "q" else x[:, :, cu_k[b]:cu_k[b + 1]] for role, x in arrays]
        pieces.append(run(one, Extras(alibi_slopes=slopes), None if keep is None else keep[b:b + 1, :, :nq, :nk], *sliced))
    return pieces


def attention_forward(q, k, v, *, scale: float, causal: bool = False, spec=None, extras: Extras = NONE, keep=None):
    """Returns ``(out, lse)`` in float64. ``spec``/``extras`` carry the features (without them: plain
    attention, ``causal`` top-left); ``keep`` is the (B, H, Nq, Nk) dropout mask to apply."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    spec = _plain_spec(spec, causal, q, k)
    if spec.varlen:
        pieces = _per_sequence(spec, extras, keep, (("q", q), ("k", k), ("k", v)),
                               lambda s, e, kp, *xs: attention_forward(*xs, scale=scale, spec=s, extras=e, keep=kp))
        return np.concatenate([o for o, _ in pieces], axis=2), np.concatenate([lse for _, lse in pieces], axis=2)
    k, v = (np.repeat(x, spec.group_size, axis=1) for x in (k, v))
    _, s = scores(q, k, spec, extras, scale)
    probs, lse = _softmax(s)
    if spec.dropout_p > 0:
        probs = probs * np.asarray(keep, bool) / (1.0 - spec.dropout_p)
    return np.einsum("bhqk,bhkd->bhqd", probs, v), lse


def attention_backward(do, q, k, v, *, scale: float, causal: bool = False, spec=None, extras: Extras = NONE, keep=None):
    """Returns ``(dq, dk, dv)`` in float64: dS = P * (dP - rowsum(dO * O)), the softmax Jacobian,
    times the softcap's derivative; dK, dV summed over the query heads that share a K/V head."""
    do, q, k, v = (np.asarray(x, dtype=np.float64) for x in (do, q, k, v))
    spec = _plain_spec(spec, causal, q, k)
    if spec.varlen:
        pieces = _per_sequence(spec, extras, keep, (("q", do), ("q", q), ("k", k), ("k", v)),
                               lambda s, e, kp, *xs: attention_backward(*xs, scale=scale, spec=s, extras=e, keep=kp))
        return tuple(np.concatenate([p[i] for p in pieces], axis=2) for i in range(3))
    group = spec.group_size
    k, v = (np.repeat(x, group, axis=1) for x in (k, v))
    raw, s = scores(q, k, spec, extras, scale)
    probs, _ = _softmax(s)
    dropped = probs * np.asarray(keep, bool) / (1.0 - spec.dropout_p) if spec.dropout_p > 0 else probs
    out = np.einsum("bhqk,bhkd->bhqd", dropped, v)
    dv = np.einsum("bhqk,bhqd->bhkd", dropped, do)
    dp = np.einsum("bhqd,bhkd->bhqk", do, v)
    if spec.dropout_p > 0:
        dp = dp * np.asarray(keep, bool) / (1.0 - spec.dropout_p)
    delta = (do * out).sum(axis=-1, keepdims=True)
    ds = probs * (dp - delta)
    if spec.softcap is not None:
        ds = ds * (1.0 - np.tanh(raw / spec.softcap) ** 2)
    dq = np.einsum("bhqk,bhkd->bhqd", ds, k) * scale
    dk = np.einsum("bhqk,bhqd->bhkd", ds, q) * scale

    def per_kv_head(x):
        b, h, n, d = x.shape
        return x.reshape(b, h // group, group, n, d).sum(axis=2)

    return dq, per_kv_head(dk), per_kv_head(dv)
