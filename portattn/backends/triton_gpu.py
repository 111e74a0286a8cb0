"""``triton``: FlashAttention-2 on NVIDIA Ampere/Ada/Hopper GPUs, in Triton (kernels in triton_kernels.py).

Executes the planner's GPU plan as given: forward ``block_q`` x ``block_k`` with ``warps`` warps and
``stages`` pipeline stages, the key loop split ``key_splits`` ways (merged by LSE) when the plan says
so; backward with ``backward_warps`` and ``backward_stages``: dK/dV programs own
``backward_block_k`` keys and stream ``backward_block_q`` queries, then dQ in a mirrored pass of its
own (``backward_dq_separate``) or, when the plan says so, summed in the dK/dV pass by float32 atomic
adds. ``head_dim_padded`` is the kernels' ``BLOCK_D``; the padding is masked. Inputs are read through their strides (no copies);
outputs are (B, H, N, D) contiguous in the input dtype, the LSE float32.

Features (``spec.FEATURES``, all of them, forward and backward; ``_features`` turns a call's spec and
extras into the kernels' feature arguments and constexpr flags, so a plain call compiles to the same
code as before, and a plain forward launches ``attention_forward``, the featureless entry with half
the arguments, since Triton's launcher costs Python time per argument): GQA without repeating K/V (the dK/dV program of a K/V head loops over its query
heads), bottom-right alignment, sliding windows (whole key blocks outside the range are never
visited), bool/additive masks and key padding read through their (broadcast) strides, ALiBi,
softcap, block-sparse masks (turned here into compacted per-block lists of kept blocks, cut by the
causal/window rules, that the kernels loop over), varlen (cu_seqlens offsets; batch strides 0),
decoding (key splits merged by LSE, with every feature) and dropout (Philox keyed by the seed on the
counter (key j, query i, head h, batch b); ``dropout_keep`` materializes that mask).

float16/bfloat16: tensor-core products accumulated in float32, softmax in float32. float32: products
in IEEE float32 (``input_precision="ieee"``), not tf32 -- slower, but within the float32 error
bounds of the conformance suite, which tf32's 10-bit mantissa is not.

Interpreter mode: with ``TRITON_INTERPRET=1`` in the environment (read when availability is first
checked, and it must be set before triton_kernels is first imported, since ``triton.jit`` decides at
decoration time), the backend runs the same kernels through Triton's CPU interpreter on CPU torch
tensors. It then plans for the catalog's H100 (``catalog.lookup("h100")``) -- the device the
interpreter stands in for -- and runs that plan unchanged, so the kernels are tested with the block
sizes a real H100 would get.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

from ..extras import NONE
from ..spec import FEATURES
from ..tiling import catalog, probe
from . import register
from .base import Backend, Capabilities

LOG2E = 1.4426950408889634
MIN_COMPUTE_CAPABILITY = (8, 0)
_DTYPES = frozenset({"float16", "bfloat16", "float32"})
_FEATURE_NOTES = {
    "gqa": "query head h reads K/V head h // group in place; a dK/dV program loops over its group's query heads "
           "(sums in registers, no repeat, no atomics)",
    "bottom_right": "query positions shifted by Nk - Nq (per sequence when varlen) in the range and mask arithmetic",
    "window": "each block's visible key range [lo, hi) is computed and only it is visited; edge tiles are masked",
    "bool_mask": "attn_mask tile loaded through its strides (broadcasts stay stride 0) in every visited tile",
    "additive_mask": "attn_mask tile added to the scores through its strides, in every visited tile",
    "alibi": "-slope * |p - j| added in-kernel from the (B, H) slopes",
    "softcap": "softcap * tanh(s / softcap) with an exp-based tanh; the backward multiplies dS by 1 - tanh^2",
    "block_sparse": "per sparse block row (column for dK/dV) a compacted list of kept blocks, built on the host; "
                    "the kernels loop over it only, so empty blocks are never loaded",
    "key_padding": "key_padding_mask read per key tile",
    "varlen": "one program per (sequence, head, block): offsets from cu_seqlens, blocks past a sequence do no work",
    "decoding": "the key loop split plan.key_splits ways and merged by LSE, with every feature",
    "dropout": "Philox-4x32-10 (tl.philox) keyed by the seed on the counter (key j, query i, head h, batch b), "
               "each a 32-bit word (no overflow); kept iff uniform >= p; the backward redraws the same mask",
}
_GPU_CAPABILITIES = Capabilities(
    device_kinds=frozenset({"cuda"}),
    dtypes=_DTYPES,
    min_head_dim=16,
    max_head_dim=256,
    backward=True,
    features=frozenset(FEATURES),
    feature_notes=_FEATURE_NOTES,
    notes=(
        "float16/bfloat16: tensor-core products, float32 accumulation and softmax",
        "float32: IEEE float32 products (input_precision='ieee'), not tf32",
        "TRITON_INTERPRET=1: the same kernels run on CPU tensors in Triton's interpreter, planned for an H100 (tests, CI)",
    ),
)
_INTERPRETER_CAPABILITIES = dataclasses.replace(_GPU_CAPABILITIES, device_kinds=frozenset({"cpu"}))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import triton_kernels  # compiled on first launch of each constexpr specialization, then cached

    return triton_kernels


def _in_precision(q) -> str:
    """tl.dot's input precision: IEEE float32 for float32 inputs; for 16-bit inputs Triton ignores it.
    "upcast" (bfloat16 under the interpreter only) widens the operands first: the Triton 3.x
    interpreter's tl.dot returns garbage for bfloat16 operands; on a GPU they go to the tensor cores."""
    import torch

    if q.dtype == torch.float32:
        return "ieee"
    if q.dtype == torch.bfloat16 and interpreting():
        return "upcast"
    return "tf32"


@register
class TritonBackend(Backend):
    name = "triton"
    summary = "NVIDIA Ampere/Ada/Hopper: FlashAttention-2 in Triton, forward and backward, blocks from the plan"
    extra = "triton"
    compute_kind = "torch"
    auto_priority = {"cuda": 30}

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return _INTERPRETER_CAPABILITIES if interpreting() else _GPU_CAPABILITIES

    def declared_capabilities(self) -> Capabilities:
        return _GPU_CAPABILITIES  # the table describes the GPU target; notes mention the interpreter

    def _check_available(self) -> list[str]:
        missing = self._missing_modules((("torch", "the kernels take torch tensors"),
                                         ("triton", "the kernels are written in Triton")))
        if missing or interpreting():
            return missing
        import torch

        if not torch.cuda.is_available():
            return [f"triton needs an NVIDIA GPU of compute capability {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}+ "
                    "and torch sees no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"]
        if getattr(torch.version, "hip", None):
            return ["triton backend targets NVIDIA GPUs; this torch is a ROCm build"]
        found = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        if not any(cc >= MIN_COMPUTE_CAPABILITY for cc in found):
            shown = ", ".join(f"{a}.{b}" for a, b in found)
            return [f"triton needs an NVIDIA GPU of compute capability {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}+ (found {shown})"]
        return []

    def _extra_reasons(self, spec) -> list[str]:
        if interpreting() or spec.device_kind != "cuda":
            return []
        try:
            import torch

            index = int(spec.device.split(":", 1)[1]) if ":" in spec.device else torch.cuda.current_device()
            cc = torch.cuda.get_device_capability(index)
        except Exception as error:  # noqa: BLE001 - reported, not raised
            return [f"cannot read the compute capability of {spec.device}: {error}"]
        if cc < MIN_COMPUTE_CAPABILITY:
            return [f"triton needs an NVIDIA GPU of compute capability {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]}+ "
                    f"({spec.device} is {cc[0]}.{cc[1]})"]
        return []

    def device(self, spec):
        if interpreting() and spec.device_kind != "cuda":
            return catalog.lookup("h100")  # TRITON_INTERPRET=1: the interpreter emulates an H100's plan
        index = int(spec.device.split(":", 1)[1]) if ":" in spec.device else 0
        return probe.probe_cuda(index)

    def forward(self, q, k, v, spec, plan, extras):
        import torch

        kernels = _kernels()
        batch, heads, seqlen_q, head_dim = q.shape  # varlen: (1, H, total_q, D)
        out = torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        if out.numel() == 0:
            lse.fill_(float("-inf"))
            return out, lse
        key_blocks = -(-spec.seqlen_k // plan.block_k)
        splits = max(1, min(plan.key_splits, key_blocks))
        keys_per_split = -(-key_blocks // splits) * plan.block_k
        # one split writes O and LSE directly; several write float32 partials merged below
        part_out = out[None] if splits == 1 else torch.empty((splits, *out.shape), dtype=torch.float32, device=q.device)
        part_lse = lse[None] if splits == 1 else torch.empty((splits, *lse.shape), dtype=torch.float32, device=q.device)
        args, flags = _features(spec, extras, by_keys=False)
        varlen = spec.varlen
        grid = (-(-spec.seqlen_q // plan.block_q), spec.batch * heads, splits)
        common = (
            q, k, v, part_out, part_lse,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(part_out[0], varlen),
            part_out.stride(0), *_lse_strides(lse, varlen), part_lse.stride(0),
            heads, spec.seqlen_q, spec.seqlen_k, spec.softmax_scale * LOG2E, keys_per_split,
        )
        launch = dict(HEAD_DIM=head_dim, BLOCK_M=plan.block_q, BLOCK_N=plan.block_k, BLOCK_D=plan.head_dim_padded,
                      CAUSAL=spec.causal, IN_PRECISION=_in_precision(q), num_warps=plan.warps, num_stages=plan.stages)
        with _on_device(q):
            if any(flags.values()):
                kernels.attention_forward_features[grid](*common, *args, **flags, **launch)
            else:  # the same program with every feature off, launched with half the arguments
                kernels.attention_forward[grid](*common, **launch)
        if splits > 1:
            _merge_splits(part_out, part_lse, out, lse)
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, spec, plan, extras):
        import torch

        kernels = _kernels()
        batch, heads, seqlen_q, head_dim = q.shape  # varlen: (1, H, total_q, D)
        kv_heads, seqlen_k = k.shape[1], k.shape[2]
        dk = torch.empty((batch, kv_heads, seqlen_k, head_dim), dtype=q.dtype, device=q.device)
        dv = torch.empty((batch, kv_heads, seqlen_k, head_dim), dtype=q.dtype, device=q.device)
        if batch * heads == 0 or seqlen_q == 0 or seqlen_k == 0:  # no query sees any key: every gradient is zero
            return (torch.zeros_like(q, memory_format=torch.contiguous_format), dk.zero_(), dv.zero_())
        grad_out = grad_out.to(q.dtype)
        lse = lse.to(torch.float32).contiguous()  # (B, H, Nq) as the forward wrote it: no copy
        delta = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        # dK/dV programs own block_k keys and stream block_q queries; the dQ pass mirrors them
        # (owns block_k queries, streams block_q keys), so one pair of sizes serves both passes
        block_q, block_k = plan.backward_block_q, plan.backward_block_k
        common = dict(HEAD_DIM=head_dim, BLOCK_D=plan.head_dim_padded, num_warps=plan.backward_warps,
                      num_stages=plan.backward_stages)
        atomic = not plan.backward_dq_separate
        # fused dQ: float32 partial sums added atomically by every key block, scaled and cast once
        dq_acc = torch.zeros((batch, heads, seqlen_q, plan.head_dim_padded) if atomic else (1, 1, 1, 1),
                             dtype=torch.float32, device=q.device)
        dq = None if atomic else torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
        scale = spec.softmax_scale
        precision = _in_precision(q)
        varlen = spec.varlen
        key_args, key_flags = _features(spec, extras, by_keys=True, atomic_dq=atomic)
        with _on_device(q):
            kernels.attention_backward_delta[(-(-seqlen_q // block_k), batch * heads)](
                out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, seqlen_q,
                HEAD_DIM=head_dim, BLOCK_M=block_k, BLOCK_D=plan.head_dim_padded,
            )
            kernels.attention_backward_dkdv[(-(-spec.seqlen_k // block_k), spec.batch * kv_heads)](
                q, k, v, grad_out, lse, delta, dk, dv, dq_acc,
                *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(grad_out, varlen),
                *_strides(dk, varlen), *_strides(dv, varlen), *_strides(dq_acc, varlen)[:3], *_lse_strides(lse, varlen),
                heads, spec.seqlen_q, spec.seqlen_k, scale, scale * LOG2E, *key_args,
                BLOCK_M=block_q, BLOCK_N=block_k, CAUSAL=spec.causal, DQ_ATOMIC=atomic, IN_PRECISION=precision,
                **key_flags, **common,
            )
            if atomic:
                dq = (dq_acc[..., :head_dim] * scale).to(q.dtype)
            else:
                args, flags = _features(spec, extras, by_keys=False)
                kernels.attention_backward_dq[(-(-spec.seqlen_q // block_k), spec.batch * heads)](
                    q, k, v, grad_out, lse, delta, dq,
                    *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(grad_out, varlen),
                    *_strides(dq, varlen), *_lse_strides(lse, varlen),
                    heads, spec.seqlen_q, spec.seqlen_k, scale, scale * LOG2E, *args,
                    BLOCK_M=block_k, BLOCK_N=block_q, CAUSAL=spec.causal, IN_PRECISION=precision, **flags, **common,
                )
        return dq, dk, dv

    def dropout_keep(self, spec, extras):
        """The (B, H, Nq, Nk) mask of ``_dropout_keep`` (Philox-4x32-10, key = seed, counter = (key j,
        query i, head h, batch b); kept iff uniform >= p), drawn by the kernels' own function. Varlen:
        Nq, Nk are the longest lengths and i, j index each sequence's own rows."""
        import torch

        kernels = _kernels()
        device = "cpu" if interpreting() and spec.device_kind != "cuda" else spec.device
        b, h, nq, nk = spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k
        keep = torch.empty((b, h, nq, nk), dtype=torch.uint8, device=device)
        if keep.numel():
            grid = (-(-nq // 32), -(-nk // 32), b * h)
            with _on_device(keep):
                kernels.dropout_mask[grid](keep, *keep.stride()[:3], h, nq, nk, int(extras.dropout_seed),
                                           float(spec.dropout_p), BLOCK_M=32, BLOCK_N=32)
        return keep.bool().cpu().numpy()


def _strides(x, varlen: bool = False):
    """(batch, head, row, col) strides; varlen tensors are (1, H, total, D) whose rows are found from
    cu_seqlens, so their batch stride is 0 (the kernels index batch by sequence)."""
    strides = tuple(x.stride())
    return (0, *strides[1:]) if varlen else strides


def _lse_strides(lse, varlen: bool):
    """(batch, head) strides of a (B, H, N) float32 LSE/delta whose rows are contiguous."""
    return (0 if varlen else lse.stride(0), lse.stride(1))


def _features(spec, extras, *, by_keys: bool, atomic_dq: bool = False):
    """``_feature_arguments``, cached when the call has no feature arrays (``extras is NONE``): then
    they follow from the spec alone, and a repeated plain call must not rebuild ~30 arguments."""
    if extras is NONE:
        return _spec_features(spec, by_keys, atomic_dq)
    return _feature_arguments(spec, extras, by_keys=by_keys, atomic_dq=atomic_dq)


@functools.lru_cache(maxsize=1024)
def _spec_features(spec, by_keys: bool, atomic_dq: bool):
    args, flags = _feature_arguments(spec, NONE, by_keys=by_keys, atomic_dq=atomic_dq)
    return tuple(args), flags


def _feature_arguments(spec, extras, *, by_keys: bool, atomic_dq: bool = False):
    """The kernels' feature arguments (the list their docstring names, in order) and constexpr flags
    for a call; every flag off (and placeholders) for a plain call, so it compiles as before.
    ``by_keys``: block-sparse lists per sparse key block (the dK/dV pass) instead of per query block;
    ``atomic_dq``: that pass also sums dQ."""
    left, right = spec.window if spec.window is not None else (None, None)
    mask = extras.attn_mask if spec.mask is not None else None
    if mask is not None and mask.dtype == _torch().bool:
        mask = mask.view(_torch().uint8)  # same strides: the kernels read bytes
    slopes = extras.alibi_slopes if spec.alibi else None
    pad = extras.key_padding_mask.view(_torch().uint8) if spec.key_padding else None
    sp_idx = sp_num = None
    if spec.block_size is not None:
        sp_idx, sp_num = _sparse_lists(extras.block_mask, spec, by_keys)
    dropout = spec.dropout_p > 0
    args = [
        spec.group_size,
        extras.cu_seqlens_q if spec.varlen else None, extras.cu_seqlens_k if spec.varlen else None,
        left or 0, right or 0,
        spec.softcap * LOG2E if spec.softcap is not None else 0.0,
        slopes, *(slopes.stride() if slopes is not None else (0, 0)),
        mask, *(mask.stride() if mask is not None else (0, 0, 0, 0)),
        pad, *(pad.stride() if pad is not None else (0, 0)),
        sp_idx, sp_num, *(sp_idx.stride()[:3] if sp_idx is not None else (0, 0, 0)),
        *(sp_num.stride()[:2] if sp_num is not None else (0, 0)),
        *(spec.block_size or (0, 0)),
        int(extras.dropout_seed) if dropout else 0, float(spec.dropout_p), 1.0 / (1.0 - spec.dropout_p),
    ]
    flags = dict(
        GQA=spec.group_size > 1,
        VARLEN=spec.varlen,
        BOTTOM_RIGHT=spec.align == "bottom-right" and (spec.causal or spec.window is not None or spec.alibi),
        HAS_LEFT=left is not None,
        HAS_RIGHT=right is not None,
        SOFTCAP=spec.softcap is not None,
        ALIBI=spec.alibi,
        MASK_KIND={None: 0, "bool": 1, "additive": 2}[spec.mask],
        KEY_PADDING=spec.key_padding,
        SPARSE=spec.block_size is not None,
        # the tiles of kept blocks need the elementwise mask only where a causal/window edge or the end
        # of the keys can cut through them (the dK/dV pass: also for the atomic dQ, which reads past-the-end keys)
        SPARSE_MASKED=spec.block_size is not None and (
            spec.causal or spec.window is not None or (atomic_dq if by_keys else spec.seqlen_k % spec.block_size[1] != 0)),
        DROPOUT=dropout,
    )
    return args, flags


def _sparse_lists(block_mask, spec, by_keys: bool):
    """Block-sparse iteration lists from a bool (B, H, QB, KB) block mask (a broadcast view): per row
    (query block; key block when ``by_keys``) the indices of its kept blocks in increasing order,
    padded after ``count`` (int32 (B, H, R, C) and (B, H, R)). Blocks that the causal/window rules
    leave wholly invisible are dropped here, so the kernels never visit them. Computed once per
    distinct (b, h) -- broadcast axes stay stride 0 -- with a stable sort of the dropped-flags."""
    torch = _torch()
    distinct = tuple(slice(0, 1) if block_mask.stride(axis) == 0 else slice(None) for axis in range(2))
    kept = block_mask[distinct]
    reach = _block_reach(spec, kept.shape[2], kept.shape[3], kept.device)
    if reach is not None:
        kept = kept & reach
    if by_keys:
        kept = kept.transpose(-1, -2)
    kept = kept.contiguous()
    count = kept.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~kept).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    b, h = block_mask.shape[:2]
    return order.expand(b, h, *order.shape[2:]), count.expand(b, h, count.shape[2])


def _block_reach(spec, query_blocks: int, key_blocks: int, device):
    """(QB, KB) bool: the sparse blocks that hold at least one (query, key) pair the causal and window
    rules allow (a superset where both edges cut one block; the kernels mask inside); None if no rule."""
    if not spec.causal and spec.window is None:
        return None
    torch = _torch()
    block_q, block_k = spec.block_size
    rows = torch.arange(query_blocks, device=device) * block_q
    first = rows + spec.query_offset()  # positions of each query block's first and last row
    last = torch.clamp(rows + block_q, max=spec.seqlen_q) - 1 + spec.query_offset()
    keys = torch.arange(key_blocks, device=device) * block_k
    key_last = torch.clamp(keys + block_k, max=spec.seqlen_k) - 1
    reach = torch.ones((query_blocks, key_blocks), dtype=torch.bool, device=device)
    left, right = spec.window if spec.window is not None else (None, None)
    if spec.causal:
        reach &= keys[None, :] <= last[:, None]
    if right is not None:
        reach &= keys[None, :] <= last[:, None] + right
    if left is not None:
        reach &= key_last[None, :] >= first[:, None] - left
    return reach


def _torch():
    import torch

    return torch


def _merge_splits(part_out, part_lse, out, lse) -> None:
    """out = sum_s exp(lse_s - lse) * out_s, lse = logsumexp_s(lse_s); rows no split saw stay 0, -inf.
    Linear in N: the partials are (splits, B, H, N, D)."""
    import torch

    torch.logsumexp(part_lse, dim=0, out=lse)
    weights = torch.exp(part_lse - torch.where(torch.isinf(lse), 0.0, lse))  # exp(-inf) = 0 for empty splits
    out.copy_((weights.unsqueeze(-1) * part_out).sum(dim=0))


def _on_device(x):
    """Launch on the tensor's GPU (Triton launches on the current device); no switch when it is current."""
    import torch

    if x.device.type != "cuda" or x.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(x.device)
