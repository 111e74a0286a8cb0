"""The sequence axis split across the ranks of a process group, and put back together.

Two layouts, both as chunks of the global sequence (``W`` ranks):

* ``"contiguous"``: ``W`` equal chunks, rank ``i`` holds chunk ``i``.
* ``"zigzag"``: ``2W`` equal chunks, rank ``i`` holds chunks ``i`` and ``2W - 1 - i`` (one early and
  one late chunk), so that under a causal mask every rank has the same amount of work.

Everything here is torch.distributed's own communication (``all_gather``, ``all_reduce``); nothing
is home-made. A ``Segment`` says where a local row range sits in the global sequence, which is what
the ring's block planner (``blocks.py``) reasons with.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

SHARDINGS = ("zigzag", "contiguous")


class Segment(NamedTuple):
    """Local rows ``[local, local + length)`` are global positions ``[start, start + length)``."""

    local: int
    start: int
    length: int


def check_sharding(sharding) -> str:
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    return sharding


def group_info(group) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size), with a clear error before any communication
    when torch.distributed is not set up."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build: portattn.distributed needs it")
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group(...) "
                           "first (torchrun sets the rendezvous environment; docs/distributed.md has an example)")
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, rank: int) -> int:
    """The global rank of ``group``'s rank ``rank`` (P2P operations address global ranks)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def pieces(sharding: str, world: int) -> int:
    """How many equal chunks the global sequence is cut into."""
    return 2 * world if sharding == "zigzag" else world


def segments(rank: int, world: int, local_length: int, sharding: str) -> tuple[Segment, ...]:
    """Where rank ``rank``'s local rows sit in the global sequence."""
    if sharding == "contiguous":
        return (Segment(0, rank * local_length, local_length),)
    chunk = local_length // 2
    return (Segment(0, rank * chunk, chunk), Segment(chunk, (2 * world - 1 - rank) * chunk, chunk))


def _check_axis(x, dim: int, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for {name} with shape {tuple(x.shape)}")
    return dim % x.dim()


def shard(x, group=None, sharding: str = "zigzag", dim: int = -2):
    """This rank's piece of ``x``'s sequence axis ``dim`` (a copy; differentiable).

    ``x`` is the whole sequence, the same on every rank (e.g. (B, H, N, D) with ``dim=-2``, or token
    ids (B, N) with ``dim=-1``). ``N`` must divide into ``W`` chunks (contiguous) or ``2W`` (zigzag).
    """
    check_sharding(sharding)
    dim = _check_axis(x, dim, "x")
    rank, world = group_info(group)
    n, count = x.shape[dim], pieces(sharding, world)
    if n % count:
        raise ValueError(f"the sequence length {n} (x.shape[{dim}]) must be divisible by {count} for "
                         f"sharding={sharding!r} over {world} ranks (a multiple of {count}: pad the sequence, "
                         "with key_padding_mask hiding the padding)")
    parts = [x.narrow(dim, s.start, s.length) for s in segments(rank, world, n // world, sharding)]
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0].clone()


def assemble(local_pieces, sharding: str, dim: int):
    """The global sequence from every rank's local piece (rank order), along ``dim``."""
    world = len(local_pieces)
    if sharding == "contiguous":
        return torch.cat(local_pieces, dim)
    halves = [p.chunk(2, dim) for p in local_pieces]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


class _Unshard(torch.autograd.Function):
    """all_gather forward; backward: every rank's gradient of the whole sequence summed (all_reduce) and this
    rank's piece taken -- the gradient of the sum of the ranks' losses, as torch.distributed.nn's all_gather."""

    @staticmethod
    def forward(ctx, x, group, sharding, dim):
        ctx.group, ctx.sharding, ctx.dim = group, sharding, dim
        return assemble(gather(x, group), sharding, dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return _take(grad, ctx.group, ctx.sharding, ctx.dim), None, None, None


def _take(x, group, sharding, dim):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    parts = [x.narrow(dim, s.start, s.length) for s in segments(rank, world, x.shape[dim] // world, sharding)]
    return torch.cat(parts, dim)


def gather(x, group):
    """Every rank's ``x`` (same shape everywhere), in rank order; bool tensors travel as uint8."""
    world = dist.get_world_size(group)
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()
    out = [torch.empty_like(wire, memory_format=torch.contiguous_format) for _ in range(world)]
    dist.all_gather(out, wire, group=group)
    return [o.to(torch.bool) for o in out] if x.dtype == torch.bool else out


def unshard(x, group=None, sharding: str = "zigzag", dim: int = -2):
    """The whole sequence on every rank from each rank's piece ``x`` (all_gather; differentiable: the
    backward sums the ranks' gradients of the whole sequence and keeps this rank's piece)."""
    check_sharding(sharding)
    dim = _check_axis(x, dim, "x")
    _, world = group_info(group)
    if sharding == "zigzag" and x.shape[dim] % 2:
        raise ValueError(f"a zigzag piece holds two equal chunks, so its length must be even; x.shape[{dim}] = "
                         f"{x.shape[dim]}")
    if world == 1:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _Unshard.apply(x, group, sharding, dim)
    return assemble(gather(x, group), sharding, dim)
