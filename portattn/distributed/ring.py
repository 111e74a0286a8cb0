"""Ring attention: queries stay, K/V blocks travel around the ring of ranks.

Each rank holds its piece of q, k, v (``sharding.py``). In step ``s`` of ``W`` it attends its
queries to the K/V block of rank ``rank - s`` while that block is already on its way to
``rank + 1`` (``batch_isend_irecv``: the transfer overlaps the block's attention). The blocks'
partial results merge by LSE (``merge.py``); ``blocks.py`` decides per step which calls are needed
(full, causal-diagonal, windowed band, or none).

The backward sends K/V around the ring again, together with the dK/dV accumulators of the block
held: each rank adds its queries' contribution to that block's dK/dV and passes the sums on, so after
``W`` steps each accumulator is back with its owner. Each block's contribution comes from
portattn's own backward kernel fed with the *global* O and LSE: with ``P = exp(S - LSE_global)``
and ``dS = P * (dP - rowsum(dO * O_global))`` a block's dQ, dK, dV are exactly its share of the
full gradients (FlashAttention's ring-attention identity), so nothing is recomputed beyond the
kernels' own recomputation of S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..autograd import not_twice
from .blocks import plan_step
from .common import accumulation_dtype, check_features, check_qkv, prepared
from .merge import merge_into
from .sharding import check_sharding, gather, global_rank, group_info, segments

ALLOWED = ("window", "softcap", "key_padding_mask", "align")
REFUSED = {
    "alibi_slopes": "ALiBi's bias -slope * |position - key| needs global positions that the per-block calls do not "
                    "see (ulysses_attention, whose calls see the whole sequence, runs it)",
}


@dataclass(frozen=True, eq=False)
class Ring:
    """One ring_attention call's fixed data: the group, the layout, the mask and the block features."""

    group: object
    rank: int
    world: int
    sharding: str
    causal: bool
    window: tuple | None
    scale: float | None
    backend: str
    softcap: float | None
    key_padding: list | None  # every rank's (B, N_local) key padding piece, by rank
    needs_grad: bool

    @property
    def neighbours(self) -> tuple[int, int]:
        """(global rank of the next rank, of the previous one)."""
        return (global_rank(self.group, (self.rank + 1) % self.world),
                global_rank(self.group, (self.rank - 1) % self.world))

    def tasks(self, step: int, nq: int, nk: int):
        src = (self.rank - step) % self.world
        return src, plan_step(segments(self.rank, self.world, nq, self.sharding),
                              segments(src, self.world, nk, self.sharding), self.causal, self.window)

    def block(self, task, src, q, k, v):
        """(call, extras, q rows, k rows, v rows) for one task."""
        q_t = _rows(q, task.q0, task.q1)
        k_t, v_t = _rows(k, task.k0, task.k1), _rows(v, task.k0, task.k1)
        features = {} if self.softcap is None else {"softcap": self.softcap}
        if self.key_padding is not None:
            features["key_padding_mask"] = self.key_padding[src][:, task.k0:task.k1]
        call, extras = prepared(q_t, k_t, v_t, needs_grad=self.needs_grad, causal=task.causal, window=task.window,
                                scale=self.scale, backend=self.backend, features=features)
        return call, extras, q_t, k_t, v_t


def _rows(x, a: int, b: int):
    return x if (a, b) == (0, x.shape[-2]) else x[..., a:b, :].contiguous()


class _InFlight:
    """Tensors sent to the next rank while the same-shaped ones from the previous rank arrive."""

    def __init__(self, ring: Ring, tensors, tag: int):
        nxt, prev = ring.neighbours
        self.sent = [t.contiguous() for t in tensors]
        self.received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in self.sent]
        ops = [dist.P2POp(dist.isend, t, nxt, ring.group, tag) for t in self.sent]
        ops += [dist.P2POp(dist.irecv, t, prev, ring.group, tag) for t in self.received]
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self):
        for request in self.requests:
            request.wait()
        return self.received


def ring_forward(q, k, v, ring: Ring):
    """(out in q's dtype, LSE in the accumulation precision) of this rank's queries against every rank's keys."""
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    held = (k, v)
    for step in range(ring.world):
        in_flight = _InFlight(ring, held, tag=0) if step < ring.world - 1 else None
        src, tasks = ring.tasks(step, q.shape[-2], k.shape[-2])
        for task in tasks:
            call, extras, q_t, k_t, v_t = ring.block(task, src, q, *held)
            o, l = call.forward(q_t, k_t, v_t, extras)
            _merge_rows(out, lse, task.q0, task.q1, o, l)
        if in_flight is not None:
            held = tuple(in_flight.wait())
    return out.to(q.dtype), lse


def _merge_rows(out, lse, a, b, o, l):
    merge_into(out[..., a:b, :], lse[..., a:b], o, l)


def ring_backward(grad_out, q, k, v, out, lse, ring: Ring):
    """(dq, dk, dv) of this rank's pieces: K/V travel as in the forward, dK/dV accumulators travel with them."""
    acc = accumulation_dtype(q.dtype)
    grad_out = grad_out.contiguous()
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    held, returning = (k, v), None
    for step in range(ring.world):
        in_flight = _InFlight(ring, held, tag=0) if step < ring.world - 1 else None
        src, tasks = ring.tasks(step, q.shape[-2], k.shape[-2])
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for task in tasks:
            call, extras, q_t, k_t, v_t = ring.block(task, src, q, *held)
            a, b = task.q0, task.q1
            g = call.backward(_rows(grad_out, a, b), q_t, k_t, v_t, _rows(out, a, b),
                              lse[..., a:b].contiguous(), extras)
            dq[..., a:b, :] += g[0]
            dk[..., task.k0:task.k1, :] += g[1]
            dv[..., task.k0:task.k1, :] += g[2]
        if returning is not None:  # the sums of the ranks this block has visited
            before_k, before_v = returning.wait()
            dk += before_k
            dv += before_v
        if ring.world > 1:
            returning = _InFlight(ring, (dk, dv), tag=1)
        if in_flight is not None:
            held = tuple(in_flight.wait())
    if returning is not None:  # after W steps every block's sums are back with its owner
        dk, dv = returning.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring):
        out, lse = ring_forward(q, k, v, ring)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv = ring_backward(grad_out, q, k, v, out, lse, ctx.ring)
        dq, dk, dv = not_twice((dq, dk, dv), (grad_out, q, k, v))  # double backward: an error, not a silent zero
        return dq, dk, dv, None


def ring_attention(q, k, v, *, causal=False, group=None, sharding="zigzag", backend="auto", scale=None,
                   return_lse=False, **features):
    """Exact attention over a sequence sharded across ``group``'s ranks, from this rank's pieces.

    ``q`` (B, H, Nq_local, D) and ``k``, ``v`` (B, H_kv, Nk_local, D) are this rank's pieces as
    :func:`shard` cuts them (``sharding`` must match); H a multiple of H_kv is GQA. Returns this
    rank's piece of the output (and with ``return_lse`` the float32 (B, H, Nq_local) LSE), equal to
    ``shard(portattn.attention(full q, k, v, causal=..., ...))``. Differentiable: gradients reach
    this rank's q, k, v pieces.

    Features: ``causal`` (queries and keys share positions: Nq_local == Nk_local), ``window=(left,
    right)`` in global positions, ``softcap``, ``key_padding_mask`` as this rank's (B, Nk_local)
    piece (sharded like k). ``backend`` is any portattn backend with LSE and, for training, a
    backward (numba, triton, cupy, opencl). Refused with a reason: attn_mask, block_mask,
    alibi_slopes, dropout.
    """
    mode = "ring_attention"
    check_sharding(sharding)
    check_qkv(q, k, v, mode)
    features = check_features(features, ALLOWED, REFUSED, mode)
    features.pop("align", None)  # queries and keys share positions: top-left and bottom-right agree
    rank, world = group_info(group)
    window = features.get("window")
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2 or not all(
                side is None or (isinstance(side, int) and not isinstance(side, bool)) for side in window):
            raise ValueError(f"window must be (left, right) with non-negative ints or None, got {window!r}")
        window = tuple(None if side is None or side == -1 else side for side in window)
        if any(side is not None and side < 0 for side in window):
            raise ValueError(f"window must be (left, right) with non-negative ints or None (-1: unbounded), "
                             f"got {features['window']!r}")
    nq, nk = q.shape[-2], k.shape[-2]
    if (causal or window is not None) and nq != nk:
        raise ValueError(f"causal and window need queries and keys at the same positions: q has {nq} rows and k "
                         f"{nk} on this rank")
    if sharding == "zigzag" and (nq % 2 or nk % 2):
        raise ValueError(f"a zigzag piece holds two equal chunks, so its length must be even; q has {nq} rows, "
                         f"k {nk}")
    key_padding = features.get("key_padding_mask")
    if key_padding is not None:
        if not isinstance(key_padding, torch.Tensor) or key_padding.dtype != torch.bool \
                or tuple(key_padding.shape) != (k.shape[0], nk):
            raise ValueError(f"key_padding_mask must be this rank's bool (B, Nk_local) = {(k.shape[0], nk)} piece, "
                             f"sharded like k; got {getattr(key_padding, 'shape', type(key_padding).__name__)}")
        key_padding = gather(key_padding.to(k.device), group) if world > 1 else [key_padding.to(k.device)]
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    ring = Ring(group, rank, world, sharding, bool(causal), window, scale, backend, features.get("softcap"),
                key_padding, needs_grad)
    if needs_grad:
        out, lse = RingFunction.apply(q, k, v, ring)
    else:
        with torch.no_grad():
            out, lse = ring_forward(q, k, v, ring)
    return (out, lse.to(torch.float32)) if return_lse else out
