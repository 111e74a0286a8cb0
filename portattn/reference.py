"""The float64 oracle: attention with the N x N score matrix materialized, forward and backward.

Exact up to float64 rounding and written for clarity, not speed; the conformance suite compares
every backend with it. Inputs are (B, H, N, D) arrays of any float dtype; results are float64 (LSE
too). A query row that sees no key gets a zero output and an LSE of -inf.
"""

from __future__ import annotations

import numpy as np


def causal_mask(seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """True where query i may see key j: j <= i (top-left aligned, as SDPA's ``is_causal``)."""
    return np.arange(seqlen_k)[None, :] <= np.arange(seqlen_q)[:, None]


def _probabilities(q, k, scale: float, causal: bool):
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if causal:
        scores = np.where(causal_mask(q.shape[2], k.shape[2]), scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    safe_max = np.where(np.isfinite(row_max), row_max, 0.0)  # rows with no visible key
    weights = np.exp(scores - safe_max)
    row_sum = weights.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        probs = np.where(row_sum > 0, weights / np.where(row_sum > 0, row_sum, 1.0), 0.0)
        lse = np.where(row_sum > 0, safe_max + np.log(row_sum), -np.inf)[..., 0]
    return probs, lse


def attention_forward(q, k, v, *, scale: float, causal: bool = False):
    """Returns ``(out, lse)`` in float64."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    probs, lse = _probabilities(q, k, scale, causal)
    return np.einsum("bhqk,bhkd->bhqd", probs, v), lse


def attention_backward(do, q, k, v, *, scale: float, causal: bool = False):
    """Returns ``(dq, dk, dv)`` in float64: dS = P * (dP - rowsum(dO * O)), the softmax Jacobian."""
    do, q, k, v = (np.asarray(x, dtype=np.float64) for x in (do, q, k, v))
    probs, _ = _probabilities(q, k, scale, causal)
    out = np.einsum("bhqk,bhkd->bhqd", probs, v)
    dv = np.einsum("bhqk,bhqd->bhkd", probs, do)
    dp = np.einsum("bhqd,bhkd->bhqk", do, v)
    delta = (do * out).sum(axis=-1, keepdims=True)
    ds = probs * (dp - delta)
    dq = np.einsum("bhqk,bhkd->bhqd", ds, k) * scale
    dk = np.einsum("bhqk,bhqd->bhkd", ds, q) * scale
    return dq, dk, dv
