"""``triton``: FlashAttention-2 on NVIDIA Ampere/Ada/Hopper GPUs, in Triton (kernels in kernels.py).

Executes the planner's GPU plan as given: forward ``block_q`` x ``block_k`` with ``warps`` warps and
``stages`` pipeline stages, the key loop split ``key_splits`` ways (merged by LSE) when the plan says
so; backward with ``backward.warps`` and ``backward.stages``: dK/dV programs own
``backward.block_k`` keys and stream ``backward.block_q`` queries, then dQ in a mirrored pass of its
own (``backward.dq_separate``) or, when the plan says so, summed in the dK/dV pass by float32 atomic
adds. ``head_dim_padded`` is the kernels' ``BLOCK_D``; the padding is masked. Inputs are read through their strides (no copies);
outputs are (B, H, N, D) contiguous in the input dtype, the LSE float32.

Every tensor is passed as one argument, ``launch.view`` = (tensor, strides). Features
(``spec.FEATURES``, all of them, forward and backward; ``launch.features`` turns a call's spec and
extras into the kernels' ``Features`` tuple, one argument, and their constexpr flags, so a plain
call compiles to the same code as before, and a plain forward launches ``attention_forward``, the
featureless entry without the tuple and the flags, since Triton's launcher costs Python time per
argument): GQA without repeating K/V (the dK/dV program of a K/V head loops over its query heads),
bottom-right alignment, sliding windows (whole key blocks outside the range are never visited),
bool/additive masks and key padding read through their (broadcast) strides, ALiBi, softcap,
block-sparse masks (turned here into compacted per-block lists of kept blocks, cut by the
causal/window rules, that the kernels loop over), varlen (cu_seqlens offsets; batch strides 0),
decoding (key splits merged by LSE, with every feature) and dropout (Philox keyed by the seed on the
counter (key j, query i, head h, batch b); ``dropout_keep`` materializes that mask).

float16/bfloat16: tensor-core products accumulated in float32, softmax in float32. float32: products
in IEEE float32 (``input_precision="ieee"``), not tf32 -- slower, but within the float32 error
bounds of the conformance suite, which tf32's 10-bit mantissa is not.

Interpreter mode: with ``TRITON_INTERPRET=1`` in the environment (read when availability is first
checked, and it must be set before kernels.py is first imported, since ``triton.jit`` decides at
decoration time), the backend runs the same kernels through Triton's CPU interpreter on CPU torch
tensors. It then plans for the catalog's H100 (``catalog.lookup("h100")``) -- the device the
interpreter stands in for -- and runs that plan unchanged, so the kernels are tested with the block
sizes a real H100 would get.
"""

from __future__ import annotations

import dataclasses
import functools

from ...devices import catalog, cuda_index, probe
from ...extras import NONE
from ...memo import by_identity
from ...spec import FEATURES
from ..base import Backend, Capabilities, register
from . import hopper, launch
from .launch import interpreting

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
    min_compute_capability=MIN_COMPUTE_CAPABILITY,
    kvcache="decode_kernels.py: a program per (sequence, KV head, key split) holds the group's query heads x queries "
            "as one tile's rows and reads K/V tiles from the cache in place (pages through the block table); "
            "splits merged by LSE in one more launch",
    notes=(
        "float16/bfloat16: tensor-core products, float32 accumulation and softmax",
        "float32: IEEE float32 products (input_precision='ieee'), not tf32",
        "TRITON_INTERPRET=1: the same kernels run on CPU tensors in Triton's interpreter, planned for an H100 (tests, CI)",
    ),
)
_INTERPRETER_CAPABILITIES = dataclasses.replace(_GPU_CAPABILITIES, device_kinds=frozenset({"cpu"}))


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

    def device(self, spec):
        if interpreting() and spec.device_kind != "cuda":
            return catalog.lookup("h100")  # TRITON_INTERPRET=1: the interpreter emulates an H100's plan
        return probe.probe_cuda(cuda_index(spec.device))

    def forward(self, q, k, v, spec, plan, extras):
        return self._forward(q, k, v, spec, plan, extras, True)

    def forward_output(self, q, k, v, spec, plan, extras):
        return self._forward(q, k, v, spec, plan, extras, False)[0]

    def _forward(self, q, k, v, spec, plan, extras, store_lse: bool):
        """(out, lse); ``store_lse`` False: lse is None where the kernel could skip it (one key split)."""
        steps = self.forward_decode_plan(spec)
        if steps is not None:  # few queries per sequence: the decode kernel (GQA packed, split-KV)
            from . import decode

            return decode.attention(q, k, v, spec, steps, extras, store_lse)
        config = _hopper_config(self, spec)
        if config is not None:  # a large plain call on Hopper: TMA and wgmma (hopper.py)
            return hopper.hopper_forward(q, k, v, spec.causal, spec.softmax_scale, config,
                                         bottom_right=spec.align == "bottom-right")
        import torch

        batch, heads, seqlen_q, head_dim = q.shape  # varlen: (1, H, total_q, D)
        out = torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
        fixed = launch.forward_launch(spec, plan, store_lse)
        store_lse = fixed.meta["STORE_LSE"]  # several splits need their LSEs to merge
        lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device) if store_lse else None
        if out.numel() == 0:
            return out, lse.fill_(float("-inf")) if store_lse else None
        splits = fixed.splits
        varlen = spec.varlen
        if splits == 1:  # one split writes O and LSE directly (the split stride is never used)
            part_out, split_strides = out, (0, 0)
            # O needed alone: the kernel writes no LSE and is given O's address in its place
            part_lse = (lse, (*launch.lse_strides(lse, varlen), 0)) if store_lse else (out, (0, 0, 0))
        else:  # several write float32 partials, (splits, B, N, H, D) as the merge kernel reads them, merged below
            part_out = torch.empty((splits, batch, seqlen_q, heads, head_dim), dtype=torch.float32, device=q.device)
            partial_lse = torch.empty((splits, *lse.shape), dtype=torch.float32, device=q.device)
            split_strides = (part_out.stride(0), partial_lse.stride(0))
            part_lse = (partial_lse, (*launch.lse_strides(lse, varlen), split_strides[1]))
        out_strides = launch.strides(out, varlen) if splits == 1 else launch.partial_strides(part_out, varlen)
        tensors = (  # O and LSE: their (split) partials, one more stride each
            launch.view(q, varlen), launch.view(k, varlen), launch.view(v, varlen),
            (part_out, (*out_strides, split_strides[0])), part_lse,
        )
        with launch.on_device(q):
            # a repeat launch is known by the spec and the ForwardLaunch (plan and constexprs) it was made for
            if fixed.featured:
                features, _ = launch.features(spec, extras, by_keys=False)
                launch.run(fixed.kernel, fixed.grid, (*tensors, *fixed.scalars, features), fixed.meta,
                           (spec, fixed, (q, k, v)) if extras is NONE else None)
            else:  # every feature off: the same program compiled without the features and their flags
                launch.run(fixed.kernel, fixed.grid, (*tensors, *fixed.scalars), fixed.meta, (spec, fixed, (q, k, v)))
            if splits > 1:
                from . import decode  # its merge kernel serves the forward's splits too

                decode.merge_splits(part_out, part_lse[0], out, lse, (spec, fixed))
        return out, lse

    def plan(self, spec, device=None):
        return _with_hopper_reason(super().plan(spec, device), _hopper_config(self, spec))

    def takes_decode(self, spec) -> bool:
        from . import decode

        return decode.takes(spec)

    def decode_kvcache(self, q, k_cache, v_cache, block_table, lengths, spec, plan, extras):
        from . import decode

        return decode.decode_kvcache(q, k_cache, v_cache, block_table, lengths, spec, plan, extras)

    def decode_kvcache_output(self, q, k_cache, v_cache, block_table, lengths, spec, plan, extras):
        from . import decode

        return decode.decode_kvcache(q, k_cache, v_cache, block_table, lengths, spec, plan, extras, False)[0]

    def backward(self, grad_out, q, k, v, out, lse, spec, plan, extras):
        import torch

        kernels = launch.kernels()
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
        block_q, block_k = plan.backward.block_q, plan.backward.block_k
        common = dict(HEAD_DIM=head_dim, BLOCK_D=plan.head_dim_padded, num_warps=plan.backward.warps,
                      num_stages=plan.backward.stages)
        atomic = not plan.backward.dq_separate
        # fused dQ: float32 partial sums added atomically by every key block, scaled and cast once
        dq_acc = torch.zeros((batch, heads, seqlen_q, plan.head_dim_padded) if atomic else (1, 1, 1, 1),
                             dtype=torch.float32, device=q.device)
        dq = None if atomic else torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
        scale = spec.softmax_scale
        precision = launch.in_precision(q)
        varlen = spec.varlen
        key_features, key_flags = launch.features(spec, extras, by_keys=True, atomic_dq=atomic)
        # q, k, v, dO and the LSE as both passes read them (delta: a pointer with the LSE's strides)
        reads = (launch.view(q, varlen), launch.view(k, varlen), launch.view(v, varlen), launch.view(grad_out, varlen),
                 (lse, launch.lse_strides(lse, varlen)), delta)
        # without feature arrays every argument but the caller's tensors follows from spec and plan
        reuse = (lambda *tensors: (spec, plan, tensors)) if extras is NONE else (lambda *tensors: None)
        with launch.on_device(q):
            launch.run(kernels.attention_backward_delta, (-(-seqlen_q // block_k), batch * heads),
                       (launch.view(out), launch.view(grad_out), delta, heads, seqlen_q),
                       dict(HEAD_DIM=head_dim, BLOCK_M=block_k, BLOCK_D=plan.head_dim_padded), reuse(out, grad_out))
            launch.run(kernels.attention_backward_dkdv, (-(-spec.seqlen_k // block_k), spec.batch * kv_heads),
                       (*reads, launch.view(dk, varlen), launch.view(dv, varlen),
                        (dq_acc, launch.strides(dq_acc, varlen)[:3]), heads, spec.seqlen_q, spec.seqlen_k, scale,
                        scale * LOG2E, key_features),
                       dict(BLOCK_M=block_q, BLOCK_N=block_k, CAUSAL=spec.causal, DQ_ATOMIC=atomic,
                            IN_PRECISION=precision, **key_flags, **common),
                       reuse(q, k, v, grad_out, lse))
            if atomic:
                dq = (dq_acc[..., :head_dim] * scale).to(q.dtype)
            else:
                features, flags = launch.features(spec, extras, by_keys=False)
                launch.run(kernels.attention_backward_dq, (-(-spec.seqlen_q // block_k), spec.batch * heads),
                           (*reads, launch.view(dq, varlen), heads, spec.seqlen_q, spec.seqlen_k, scale, scale * LOG2E,
                            features),
                           dict(BLOCK_M=block_k, BLOCK_N=block_q, CAUSAL=spec.causal, IN_PRECISION=precision, **flags,
                                **common),
                           reuse(q, k, v, grad_out, lse))
        return dq, dk, dv

    def dropout_keep(self, spec, extras):
        """The (B, H, Nq, Nk) mask of ``_dropout_keep`` (Philox-4x32-10, key = seed, counter = (key j,
        query i, head h, batch b); kept iff uniform >= p), drawn by the kernels' own function. Varlen:
        Nq, Nk are the longest lengths and i, j index each sequence's own rows."""
        import torch

        kernels = launch.kernels()
        device = "cpu" if interpreting() and spec.device_kind != "cuda" else spec.device
        b, h, nq, nk = spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k
        keep = torch.empty((b, h, nq, nk), dtype=torch.uint8, device=device)
        if keep.numel():
            grid = (-(-nq // 32), -(-nk // 32), b * h)
            with launch.on_device(keep):
                kernels.dropout_mask[grid](keep, *keep.stride()[:3], h, nq, nk, int(extras.dropout_seed),
                                           float(spec.dropout_p), BLOCK_M=32, BLOCK_N=32)
        return keep.bool().cpu().numpy()


@by_identity
def _hopper_config(backend, spec):
    """The Hopper forward's configuration for ``spec`` when ``forward`` runs it there (``hopper.serves`` on the
    device's compute capability), else None: cached per spec, since a forward asks on every call."""
    if not hopper.serves(spec, backend.device(spec).compute_capability):
        return None
    return hopper.config_for(spec)


@functools.lru_cache(maxsize=4096)
def _with_hopper_reason(plan, config):
    """``plan``, saying so when ``forward`` runs the Hopper kernel with ``config``."""
    if config is None:
        return plan
    return dataclasses.replace(plan, reasons=(*plan.reasons, (
        f"H0 the forward runs the Hopper kernel (TMA loads, wgmma), {config.label()} (hopper.config_for, rules "
        "H1-H3 in docs/tiling.md); the tiles above serve the backward")))


