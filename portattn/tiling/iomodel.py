"""The IO model: how many bytes a tiled attention kernel moves between DRAM/HBM and SRAM.

FlashAttention's analysis (Dao et al. 2022) and its optimality proof (Saha & Ye 2024): with ``M``
elements of SRAM and ``M >= d^2``, exact attention needs Theta(N^2 d^2 / M) element transfers, and
the tiled kernel reaches it because every query block of ``block_q ~ M / d`` rows reads all of K and
V once. The planner uses :func:`forward_bytes` to predict a plan's traffic (exactly, for its block
sizes) and :func:`lower_bound_bytes` to say how far that is from the bound.
"""

from __future__ import annotations

import math


def visible_keys(query_block: int, block_q: int, seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """Keys a query block must read: all of them, or up to its last row when causal (top-left)."""
    if not causal:
        return seqlen_k
    last_row = min((query_block + 1) * block_q, seqlen_q) - 1
    return min(seqlen_k, last_row + 1)


def forward_bytes(
    *,
    batch_heads: int,
    seqlen_q: int,
    seqlen_k: int,
    head_dim: int,
    element_bytes: int,
    block_q: int,
    causal: bool,
    key_splits: int = 1,
) -> int:
    """DRAM bytes of the forward pass for one tiling: Q, O and LSE once; K and V once per query block.

    With the key loop split ``key_splits`` ways, each split also writes and the merge reads back a
    float32 partial output and LSE per query row.
    """
    query_blocks = math.ceil(seqlen_q / block_q) if seqlen_q else 0
    kv_rows = sum(visible_keys(i, block_q, seqlen_q, seqlen_k, causal) for i in range(query_blocks))
    per_head = (
        2 * seqlen_q * head_dim * element_bytes  # read Q, write O
        + seqlen_q * 4  # write LSE (float32)
        + 2 * kv_rows * head_dim * element_bytes  # read K and V once per query block
    )
    if key_splits > 1:
        per_head += 2 * key_splits * seqlen_q * (head_dim + 1) * 4  # partials written, then merged
    return batch_heads * per_head


def lower_bound_bytes(
    *, batch_heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, element_bytes: int, sram_bytes: int
) -> int:
    """The Theta(Nq Nk d^2 / M) bound (constant 1) plus the compulsory reads and writes.

    ``M`` is the SRAM one work unit may use, in elements. Below ``M = d^2`` the bound no longer holds
    (Saha & Ye); the planner never plans there, since a single K row block of ``d`` rows is ``d^2``.
    """
    sram_elements = max(1, sram_bytes // element_bytes)
    streamed = seqlen_q * seqlen_k * head_dim * head_dim / sram_elements
    compulsory = 2 * (seqlen_q + seqlen_k) * head_dim
    return int(batch_heads * (streamed + compulsory) * element_bytes)
