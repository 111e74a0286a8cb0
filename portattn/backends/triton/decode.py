"""Launching the Triton decode kernels (``decode_kernels.py``) as the decode plan says: the grid of
(sequence, KV head, row block) x key splits, the outputs or float32 partials they write, and the merge."""
from __future__ import annotations

import functools
from typing import NamedTuple

from ...memo import by_identity
from ...tiling.decode import MAX_QUERIES
from ...tiling.planner import next_power_of_two
from . import launch

LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=None)
def kernels():
    from . import decode_kernels  # imports triton: compiled on first launch of each specialization

    return decode_kernels


def decode_kvcache(q, k_cache, v_cache, block_table, lengths, spec, plan, extras, store_lse: bool = True):
    """``Backend.decode_kvcache`` for torch tensors: out (B, Nq, H, D) in q's dtype, lse float32 (B, H, Nq)
    (None when ``store_lse`` is off and one key split wrote out directly)."""
    import torch

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _launch(_view(q), _view(k_cache), _view(v_cache), _view(out), block_table, lengths, int(k_cache.shape[0]),
                  spec, plan, extras, store_lse)
    return out, lse


def attention(q, k, v, spec, plan, extras, store_lse: bool = True):
    """``Backend.forward`` of a call ``takes`` accepts: (B, H, Nq, D) q against (B, H_kv, Nk, D) k and v through
    the decode kernel, every sequence holding all Nk keys. out (B, H, Nq, D) contiguous, lse (B, H, Nq) (None
    when ``store_lse`` is off and one key split wrote out directly)."""
    import torch

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _launch(*(_view(x, bhnd=True) for x in (q, k, v, out)), None, None, spec.batch, spec, plan, extras,
                  store_lse)
    return out, lse


def takes(spec) -> bool:
    """True when ``attention`` should run ``spec`` through the decode kernel: few queries per sequence (at most
    ``MAX_QUERIES``: decoding, speculative steps), which it packs with the query heads of their KV group so each
    K/V row is read once for the group, with its key splits merged by a kernel; and features it has (causal,
    window and ALiBi bottom-right aligned, as it places queries -- or without a position rule --,
    softcap, and a key padding (a padded batch's decoding step). Masks, dropout, varlen and block sparsity take
    the prefill kernel."""
    return (0 < spec.seqlen_q <= MAX_QUERIES and spec.mask is None and not spec.varlen
            and spec.block_size is None and not spec.dropout_p
            and (spec.align == "bottom-right" or not (spec.causal or spec.window is not None or spec.alibi)))


def _view(x, bhnd: bool = False):
    """(tensor, strides in (batch, row, head, dim) order) as the decode kernels take it; ``bhnd``: x is (B, H, N, D)."""
    strides = x.stride()
    return x, (strides[0], strides[2], strides[1], strides[3]) if bhnd else strides


def _launch(q, k, v, out, block_table, lengths, cache_rows: int, spec, plan, extras, store_lse: bool = True):
    """The decode kernel (and the merge of its key splits) on (tensor, (b, n, h, d) strides) views, writing
    ``out``; returns the float32 (B, H, Nq) LSE, or None when ``store_lse`` is off and one split writes ``out``
    (then nothing but ``out`` is allocated). ``lengths`` None: every sequence holds all its keys."""
    import torch

    q, q_strides = q
    out, out_strides = out
    paged = block_table is not None
    step = _step(spec, _launch_config(plan), (spec.batch, spec.seqlen_q, spec.heads, spec.head_dim), cache_rows,
                 int(k[0].shape[1]) if paged else 0, lengths is not None, store_lse)
    if step.meta["STORE_LSE"]:
        # LSE and the float32 partials of the key splits in one allocation: a step's host time is mostly such calls
        floats = torch.empty(step.floats, dtype=torch.float32, device=q.device)
        lse = floats.as_strided(step.lse_shape, step.lse_strides)
    else:
        lse = None
    if out.numel() == 0:
        return lse
    if step.splits == 1:  # the programs write the results; their split strides are never used
        part_out = (out, (*out_strides, 0))
        # no LSE wanted: the kernel writes none and is given out's address in its place
        part_lse = (lse, (*step.lse_strides, 0)) if lse is not None else (out, (0, 0, 0, 0))
    else:
        part_out = (floats.as_strided(*step.part_out), step.part_out_strides)
        part_lse = (floats.as_strided(*step.part_lse), step.part_lse_strides)
    # every argument but the caller's tensors (and the page count, read off k_cache's shape) follows from spec,
    # plan and the shapes (out and the partials are fresh allocations): a repeated step relaunches the compiled
    # kernel directly (launch.run), keyed by those tensors; k stands in for the pointers never read
    padding = extras.key_padding_mask.view(torch.uint8) if spec.key_padding else None  # as the prefill reads it
    callers = [q, k[0], v[0]]
    for given in (block_table, lengths, extras.alibi_slopes if spec.alibi else None, padding):
        if given is not None:
            callers.append(given)
    table = block_table if paged else (lengths if lengths is not None else k[0])
    lengths = lengths if lengths is not None else k[0]
    slopes = extras.alibi_slopes if spec.alibi else k[0]
    slope_strides = slopes.stride() if spec.alibi else (0, 0)
    padding, padding_strides = (padding, padding.stride()) if padding is not None else (k[0], (0, 0))
    with launch.on_device(q):
        launch.run(
            kernels().decode_kvcache, step.grid,
            ((q, q_strides), k, v, part_out, part_lse, table, table.stride(0), lengths, slopes, *slope_strides,
             padding, *padding_strides, *step.scalars),
            step.meta, (spec, step, callers),  # the Step: its plan and constexprs
        )
        if step.splits > 1:
            launch.run(kernels().decode_merge, step.merge_grid,
                       (part_out[0], part_lse[0], (out, out_strides), lse, *step.merge_scalars), step.merge_meta,
                       (spec, step, (out,)))
    return lse


def merge_splits(part_out, part_lse, out, lse, spec_plan: tuple) -> None:
    """The prefill forward's key splits merged by the decode kernels' merge, in one launch: out = sum_s
    exp(lse_s - lse) * out_s, lse = logsumexp_s(lse_s); rows no split saw get 0 and -inf. ``part_out``
    float32 (splits, B, N, H, D) and ``part_lse`` (splits, B, H, N), contiguous; ``out`` (B, H, N, D), ``lse``
    (B, H, N) contiguous. ``spec_plan``: the call's (spec, plan), which fix every argument but ``out`` (a
    repeat is relaunched directly)."""
    splits, batch, rows, heads, dim = part_out.shape
    if launch.interpreting() and batch * rows * heads > INTERPRETED_MERGE_PROGRAMS:
        _merge_with_torch(part_out, part_lse, out, lse)
        return
    o = out.stride()
    launch.run(kernels().decode_merge, (batch * rows * heads,),
               (part_out, part_lse, (out, (o[0], o[2], o[1], o[3])), lse, splits, heads, rows),
               _merge_meta(splits, dim), (*spec_plan, (out,)))


# Triton's interpreter runs every program of a grid in Python, one merge program per row: a prefill's merge
# grid of thousands of rows takes seconds there, so above this many it merges with torch operations (the same
# log-sum-exp); smaller grids -- the test suite's -- still run the kernel
INTERPRETED_MERGE_PROGRAMS = 256


def _merge_with_torch(part_out, part_lse, out, lse) -> None:
    """``merge_splits`` in torch operations, for the interpreter."""
    import torch

    torch.logsumexp(part_lse, dim=0, out=lse)
    weights = torch.exp(part_lse - torch.where(torch.isinf(lse), 0.0, lse))  # exp(-inf) = 0 for empty splits
    merged = (weights.transpose(2, 3).unsqueeze(-1) * part_out).sum(dim=0)  # (B, N, H, D)
    out.copy_(merged.transpose(1, 2))


class Step(NamedTuple):
    """What a decode launch takes that follows from the spec, the plan's launch fields and the shapes:
    worked out once, so that each decoding step only allocates and launches."""

    config: "LaunchConfig"
    splits: int
    floats: int  # float32 elements of the LSE and the partials, one allocation
    lse_shape: tuple
    lse_strides: tuple
    part_out: tuple  # (shape, strides, offset) in the float32 allocation, split axis first
    part_out_strides: tuple  # as the kernel takes them: (B, Nq, H, D) strides, then the split stride
    part_lse: tuple
    part_lse_strides: tuple
    grid: tuple
    scalars: tuple
    meta: dict
    merge_grid: tuple
    merge_scalars: tuple
    merge_meta: dict


@by_identity
def _step(spec, config: "LaunchConfig", q_shape: tuple, cache_rows: int, page_size: int, has_lengths: bool,
          store_lse: bool) -> Step:
    """``Step`` of a call, looked up by the identity of its spec and launch config (a repeated step's are the
    same objects, and a dataclass hash of every field would cost more than the lookup saves)."""
    return _make_step(spec, config, q_shape, cache_rows, page_size, has_lengths, store_lse)


def _make_step(spec, config: "LaunchConfig", q_shape: tuple, cache_rows: int, page_size: int,
               has_lengths: bool, store_lse: bool) -> Step:
    batch, n_q, heads, head_dim = q_shape
    splits = config.key_splits
    n_out, n_lse = batch * n_q * heads * head_dim, batch * heads * n_q
    lse_shape, lse_strides = (batch, heads, n_q), (heads * n_q, n_q, 1)
    out_strides = (n_q * heads * head_dim, heads * head_dim, head_dim, 1)
    # [lse | partial LSEs | partial outputs]: the partial outputs start 16-byte aligned
    part_out_offset = -(-(n_lse * (1 + splits)) // 4) * 4
    block_d = _block_d(head_dim)
    left, right = spec.window if spec.window is not None else (None, None)
    meta = dict(GROUP=spec.group_size, HEAD_DIM=head_dim, BLOCK_M=config.block_q, BLOCK_N=config.block_k,
                BLOCK_D=block_d, PAGE_SIZE=page_size, CAUSAL=spec.causal, HAS_LEFT=left is not None,
                HAS_RIGHT=right is not None, SOFTCAP=spec.softcap is not None, ALIBI=spec.alibi,
                KEY_PADDING=spec.key_padding,
                IN_PRECISION=launch.precision_for(spec.dtype), HAS_LENGTHS=has_lengths,
                STORE_LSE=store_lse or splits > 1,  # the splits' LSEs are merged
                num_warps=config.warps, num_stages=config.stages)
    return Step(
        config=config, splits=splits,
        floats=part_out_offset + splits * n_out if splits > 1 else n_lse,
        lse_shape=lse_shape, lse_strides=lse_strides,
        part_out=((splits, *q_shape), (n_out, *out_strides), part_out_offset),
        part_out_strides=(*out_strides, n_out),
        part_lse=((splits, *lse_shape), (n_lse, *lse_strides), n_lse),
        part_lse_strides=(*lse_strides, n_lse),
        grid=(batch * spec.kv_heads * config.row_blocks, splits),
        scalars=(spec.kv_heads, n_q, spec.seqlen_k, cache_rows, spec.softmax_scale * LOG2E, config.keys_per_split,
                 left or 0, right or 0, (spec.softcap or 0.0) * LOG2E),
        meta=meta,
        merge_grid=(batch * n_q * heads,),
        merge_scalars=(splits, heads, n_q),
        merge_meta=_merge_meta(splits, head_dim),
    )


def _block_d(head_dim: int) -> int:
    """The head dim's tile width: a power of two, at least 16 (``tl.dot``'s smallest K)."""
    return max(16, next_power_of_two(head_dim))


def _merge_meta(splits: int, head_dim: int) -> dict:
    """The merge kernel's constexprs: every split's partial row in one tile."""
    return dict(HEAD_DIM=head_dim, BLOCK_S=max(2, next_power_of_two(splits)), BLOCK_D=_block_d(head_dim))


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
