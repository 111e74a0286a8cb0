"""FastAttention's tiling all-reduce for tensor-parallel attention (forward, inference).

Under tensor parallelism each rank holds some heads: q (B, H_local, N, D), k/v (B, H_kv_local, N, D),
and its rows of the output projection ``w_o`` (H_local * D, E). The layer's output is the sum over ranks
of ``out_local @ w_o_local`` -- one all-reduce of (B, N, E). Here the query rows are cut into ``tiles``
tiles; each tile's attention is projected and its all-reduce issued asynchronously while the next tile's
attention runs, so only the last tile's all-reduce is exposed. ``overlap=False`` is the baseline it is
measured against: the whole attention, the projection, then one all-reduce.

Causal tiles attend only the keys up to their last row (``align="bottom-right"`` on the key prefix puts
query row ``i`` of tile ``[a, b)`` at key ``a + i``), so the tiles also skip the masked upper triangle.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import api
from .common import check_features, check_qkv
from .sharding import group_info

ALLOWED = ("softcap", "key_padding_mask")
REFUSED = {
    "window": "not implemented for the tiled all-reduce (each tile would need its own key range)",
    "alibi_slopes": "not implemented for the tiled all-reduce",
    "align": "the tiles set the alignment themselves (top-left over the whole sequence)",
}


def tiled_allreduce_attention_output(q, k, v, w_o, *, tiles=4, causal=False, group=None, backend="auto", scale=None,
                                     overlap=True, **features):
    """``sum over ranks of attention(q, k, v) @ w_o`` as (B, N, E), the all-reduce issued tile by tile.

    ``q``, ``k``, ``v`` are this rank's heads (B, H_local, N, D) over the whole sequence, ``w_o`` its rows of
    the output projection, (H_local * D, E), laid out head by head. Forward only (no autograd through the
    all-reduce). ``tiles`` must divide N."""
    mode = "tiled_allreduce_attention_output"
    check_qkv(q, k, v, mode)
    features = check_features(features, ALLOWED, REFUSED, mode)
    group_info(group)
    batch, heads, length, dim = q.shape
    if not isinstance(tiles, int) or isinstance(tiles, bool) or tiles < 1 or length % tiles:
        raise ValueError(f"tiles must be a positive int dividing the sequence length {length}, got {tiles!r}")
    if not isinstance(w_o, torch.Tensor) or w_o.dim() != 2 or w_o.shape[0] != heads * v.shape[-1]:
        raise ValueError(f"w_o must be this rank's (H_local * D, E) = ({heads * v.shape[-1]}, E) rows of the output "
                         f"projection, got {getattr(w_o, 'shape', type(w_o).__name__)}")
    if causal and k.shape[-2] != length:
        raise ValueError(f"causal needs queries and keys at the same positions: q has {length} rows, k {k.shape[-2]}")
    padding = features.pop("key_padding_mask", None)
    with torch.no_grad():
        if not overlap:
            out = api.attention(q, k, v, causal=causal, scale=scale, backend=backend, key_padding_mask=padding,
                                **features)
            projected = _project(out, w_o)
            dist.all_reduce(projected, group=group)
            return projected
        step = length // tiles
        results, pending = [], []
        for a in range(0, length, step):
            b = a + step
            keys = b if causal else k.shape[-2]  # a causal tile sees keys up to its last row only
            out = api.attention(q[..., a:b, :], k[..., :keys, :], v[..., :keys, :], causal=causal,
                                align="bottom-right", scale=scale, backend=backend,
                                key_padding_mask=None if padding is None else padding[:, :keys], **features)
            projected = _project(out, w_o)
            pending.append(dist.all_reduce(projected, group=group, async_op=True))
            results.append(projected)
        for work in pending:
            work.wait()
        return torch.cat(results, dim=1)


def _project(out, w_o):
    """(B, H, n, Dv) attention output -> (B, n, H * Dv) @ w_o, contiguous (all-reduce buffers must be)."""
    batch, heads, rows, dim = out.shape
    return (out.transpose(1, 2).reshape(batch, rows, heads * dim) @ w_o).contiguous()
