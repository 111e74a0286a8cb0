"""Launching the Triton decode kernels (``decode_kernels.py``) as the decode plan says: the grid of
(sequence, KV head, row block) x key splits, the outputs or float32 partials they write, and the merge."""
from __future__ import annotations

import functools
from typing import NamedTuple

from . import launch

LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=None)
def kernels():
    from . import decode_kernels  # imports triton: compiled on first launch of each specialization

    return decode_kernels


def decode_kvcache(q, k_cache, v_cache, block_table, lengths, spec, plan, extras):
    """``Backend.decode_kvcache`` for torch tensors: out (B, Nq, H, D) in q's dtype, lse float32 (B, H, Nq)."""
    import torch

    batch, n_q, heads, head_dim = q.shape
    out = torch.empty((batch, n_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    splits = plan.key_splits
    if splits == 1:  # the programs write the results; their split strides are never used
        part_out, part_lse = out[None], lse[None]
    else:
        part_out = torch.empty((splits, *out.shape), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, *lse.shape), dtype=torch.float32, device=q.device)
    paged = block_table is not None
    table = block_table if paged else lengths  # a placeholder pointer when contiguous (never read)
    left, right = spec.window if spec.window is not None else (None, None)
    slopes = extras.alibi_slopes if spec.alibi else lengths
    slope_strides = slopes.stride() if spec.alibi else (0, 0)
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    grid = (batch * spec.kv_heads * plan.row_blocks, splits)
    # every argument but the caller's tensors (and the page count, read off k_cache's shape) follows from
    # spec and plan: a repeated step relaunches the compiled kernel directly (launch.run)
    callers = (q, k_cache, v_cache, table, lengths, slopes)
    config = _launch_config(plan)
    with launch.on_device(q):
        launch.run(
            kernels().decode_kvcache, grid,
            (launch.view(q), launch.view(k_cache), launch.view(v_cache),
             (part_out, (*part_out.stride()[1:], part_out.stride(0))), (part_lse, (*part_lse.stride()[1:], part_lse.stride(0))),
             table, table.stride(0), lengths, slopes, *slope_strides,
             spec.kv_heads, n_q, spec.seqlen_k, k_cache.shape[0], spec.softmax_scale * LOG2E, plan.keys_per_split,
             left or 0, right or 0, (spec.softcap or 0.0) * LOG2E),
            _decode_meta(spec, config, head_dim, int(k_cache.shape[1]) if paged else 0, block_d),
            (spec, config, callers),
        )
        if splits > 1:
            launch.run(kernels().decode_merge, (batch * n_q * heads,),
                       (part_out, part_lse, launch.view(out), lse, splits, heads, n_q),
                       dict(HEAD_DIM=head_dim, BLOCK_S=max(2, 1 << (splits - 1).bit_length()), BLOCK_D=block_d),
                       (spec, config, (out,)))
    return out, lse


class LaunchConfig(NamedTuple):
    """The fields of a decode plan that a launch is compiled and sized for."""

    block_q: int
    row_blocks: int
    block_k: int
    warps: int
    stages: int
    key_splits: int
    keys_per_split: int


_CONFIGS: dict[LaunchConfig, LaunchConfig] = {}


def _launch_config(plan) -> LaunchConfig:
    """The plan's launch fields as one shared object per distinct value: ``launch.run`` knows a repeat launch
    by the identity of what it is given, and a decoding step's plan is a new object (its traffic figures
    grow with the keys) that mostly launches as the last one did."""
    config = LaunchConfig(plan.block_q, plan.row_blocks, plan.block_k, plan.warps, plan.stages, plan.key_splits,
                          plan.keys_per_split)
    if len(_CONFIGS) >= 4096:
        _CONFIGS.clear()
    return _CONFIGS.setdefault(config, config)


@functools.lru_cache(maxsize=1024)
def _decode_meta(spec, config: LaunchConfig, head_dim: int, page_size: int, block_d: int) -> dict:
    """The decode kernel's constexprs and launch options (they follow from spec, plan and the page size)."""
    left, right = spec.window if spec.window is not None else (None, None)
    return dict(GROUP=spec.group_size, HEAD_DIM=head_dim, BLOCK_M=config.block_q, BLOCK_N=config.block_k,
                BLOCK_D=block_d, PAGE_SIZE=page_size, CAUSAL=spec.causal, HAS_LEFT=left is not None,
                HAS_RIGHT=right is not None, SOFTCAP=spec.softcap is not None, ALIBI=spec.alibi,
                IN_PRECISION=launch.precision_for(spec.dtype), num_warps=config.warps, num_stages=config.stages)
