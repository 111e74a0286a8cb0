"""Ulysses (all-to-all) context parallelism: trade the sequence split for a head split and back.

Each rank holds (B, H, N/W, D). One ``all_to_all_single`` gives it (B, H/W, N, D): every position
of ``H/W`` heads. It attends those heads over the whole sequence with one plain ``portattn.attention``
call (so every feature that needs global positions -- ALiBi, windows, causal -- is just the
single-device feature), and a second all-to-all returns the output to the sequence split. Needs
``H`` divisible by ``W``; K/V heads (GQA) that do not divide by ``W`` are repeated up to
``lcm(H_kv, W)`` heads before the exchange (never beyond ``H``). The all-to-all with equal splits is
its own adjoint, so the autograd function's backward is the same exchange in the other direction.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import api
from .common import check_features, check_qkv
from .sharding import assemble, check_sharding, gather, group_info

ALLOWED = ("window", "softcap", "key_padding_mask", "alibi_slopes", "align")


def _all_to_all(x, group):
    """(W, ...) -> (W, ...): slot j goes to rank j, slot j comes from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)  # empty_like alone keeps a permuted layout
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``_all_to_all``, differentiable: with equal splits the exchange is its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group), None


def _exchange(x, group):
    return _AllToAll.apply(x, group) if torch.is_grad_enabled() and x.requires_grad else _all_to_all(x, group)


def _zigzag_to_order(x, world: int):
    """(B, h, W, n, D) rank pieces of zigzag sharding -> (B, h, N, D) in global order."""
    b, h, _, n, d = x.shape
    halves = x.reshape(b, h, world, 2, n // 2, d)
    chunks = torch.cat([halves[:, :, :, 0], halves[:, :, :, 1].flip(2)], dim=2)
    return chunks.reshape(b, h, world * n, d)


def _order_to_zigzag(x, world: int):
    """The inverse of ``_zigzag_to_order``: (B, h, N, D) -> (B, h, W, n, D)."""
    b, h, total, d = x.shape
    chunks = x.reshape(b, h, 2 * world, total // (2 * world), d)
    return torch.stack([chunks[:, :, :world], chunks[:, :, world:].flip(2)], dim=3).reshape(b, h, world, -1, d)


def seq_to_heads(x, group, world: int, sharding: str):
    """(B, H, n, D) sequence pieces -> (B, H/W, W*n, D): this rank's heads, the whole sequence in order."""
    b, h, n, d = x.shape
    sent = x.reshape(b, world, h // world, n, d).transpose(0, 1)
    got = _exchange(sent.contiguous(), group)  # (W, B, h/W, n, D): slot j is rank j's piece
    pieces = got.permute(1, 2, 0, 3, 4)
    if sharding == "zigzag":
        return _zigzag_to_order(pieces, world)
    return pieces.reshape(b, h // world, world * n, d)


def heads_to_seq(x, group, world: int, sharding: str):
    """The inverse: (B, H/W, N, D) -> (B, H, N/W, D)."""
    b, h, total, d = x.shape
    if sharding == "zigzag":
        pieces = _order_to_zigzag(x, world)
    else:
        pieces = x.reshape(b, h, world, total // world, d)
    got = _exchange(pieces.permute(2, 0, 1, 3, 4).contiguous(), group)  # slot j: rank j's heads, my positions
    return got.transpose(0, 1).reshape(b, h * world, total // world, d)


def ulysses_attention(q, k, v, *, causal=False, group=None, sharding="contiguous", backend="auto", scale=None,
                      return_lse=False, **features):
    """Exact attention over a sequence sharded across ``group``'s ranks, through a head split.

    Same pieces, result and gradients as :func:`ring_attention` (``sharding`` as :func:`shard` cut
    them, contiguous or zigzag); needs H (query heads) divisible by the group's size W. Features:
    everything a single-device call runs except attn_mask, block_mask and dropout:
    ``causal``, ``align``, ``window``, ``softcap``, ``alibi_slopes`` ((H,) or (B, H), global heads),
    ``key_padding_mask`` as this rank's (B, Nk_local) piece, sharded like k.
    """
    mode = "ulysses_attention"
    check_sharding(sharding)
    check_qkv(q, k, v, mode)
    features = check_features(features, ALLOWED, {}, mode)
    rank, world = group_info(group)
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % world:
        raise ValueError(f"ulysses_attention splits the {heads} query heads over {world} ranks, so they must be "
                         f"divisible by {world}; use ring_attention, which has no such limit")
    if sharding == "zigzag" and (q.shape[-2] % 2 or k.shape[-2] % 2):
        raise ValueError(f"a zigzag piece holds two equal chunks, so its length must be even; q has {q.shape[-2]} "
                         f"rows, k {k.shape[-2]}")
    if kv_heads % world:  # GQA with fewer K/V heads than ranks: repeat each up to lcm(H_kv, W) heads (divides H)
        k, v = (x.repeat_interleave(math.lcm(kv_heads, world) // kv_heads, dim=1) for x in (k, v))
    local = slice(rank * heads // world, (rank + 1) * heads // world)
    slopes = features.get("alibi_slopes")
    if slopes is not None:
        if not isinstance(slopes, torch.Tensor) or slopes.shape[-1] != heads:
            raise ValueError(f"alibi_slopes must be a tensor (H,) or (B, H) over all {heads} query heads, got "
                             f"{getattr(slopes, 'shape', type(slopes).__name__)}")
        features["alibi_slopes"] = slopes[..., local]
    padding = features.get("key_padding_mask")
    if padding is not None:
        if not isinstance(padding, torch.Tensor) or padding.dtype != torch.bool \
                or tuple(padding.shape) != (k.shape[0], k.shape[-2]):
            raise ValueError(f"key_padding_mask must be this rank's bool (B, Nk_local) = {(k.shape[0], k.shape[-2])} "
                             f"piece, sharded like k; got {getattr(padding, 'shape', type(padding).__name__)}")
        padding = padding.to(k.device)
        features["key_padding_mask"] = assemble(gather(padding, group), sharding, -1) if world > 1 else padding
    if world == 1:
        return api.attention(q, k, v, causal=causal, scale=scale, backend=backend, return_lse=return_lse, **features)
    qh, kh, vh = (seq_to_heads(x, group, world, sharding) for x in (q, k, v))
    out, lse = api.attention(qh, kh, vh, causal=causal, scale=scale, backend=backend, return_lse=True, **features)
    out = heads_to_seq(out, group, world, sharding)
    if not return_lse:
        return out
    with torch.no_grad():
        lse = heads_to_seq(lse.unsqueeze(-1), group, world, sharding).squeeze(-1)
    return out, lse
