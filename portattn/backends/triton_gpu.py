"""``triton``: FlashAttention-2 on NVIDIA Ampere/Ada/Hopper GPUs, in Triton (kernels in triton_kernels.py).

Executes the planner's GPU plan as given: forward ``block_q`` x ``block_k`` with ``warps`` warps and
``stages`` pipeline stages, the key loop split ``key_splits`` ways (merged by LSE) when the plan says
so; backward with ``backward_warps`` and ``backward_stages``: dK/dV programs own
``backward_block_k`` keys and stream ``backward_block_q`` queries, then dQ in a mirrored pass of its
own (``backward_dq_separate``) or, when the plan says so, summed in the dK/dV pass by float32 atomic
adds. ``head_dim_padded`` is the kernels' ``BLOCK_D``; the padding is masked. Inputs are read through their strides (no copies);
outputs are (B, H, N, D) contiguous in the input dtype, the LSE float32.

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

from ..tiling import catalog, probe
from . import register
from .base import Backend, Capabilities

LOG2E = 1.4426950408889634
MIN_COMPUTE_CAPABILITY = (8, 0)
_DTYPES = frozenset({"float16", "bfloat16", "float32"})
_GPU_CAPABILITIES = Capabilities(
    device_kinds=frozenset({"cuda"}),
    dtypes=_DTYPES,
    min_head_dim=16,
    max_head_dim=256,
    backward=True,
    notes=(
        "float16/bfloat16: tensor-core products, float32 accumulation and softmax",
        "float32: IEEE float32 products (input_precision='ieee'), not tf32",
    ),
)
_INTERPRETER_CAPABILITIES = dataclasses.replace(
    _GPU_CAPABILITIES,
    device_kinds=frozenset({"cpu"}),
    notes=_GPU_CAPABILITIES.notes + ("TRITON_INTERPRET=1: the kernels run in Triton's CPU interpreter, planned for an H100",),
)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _kernels():
    from . import triton_kernels  # compiled on first launch of each constexpr specialization, then cached

    return triton_kernels


def _strides(x):
    return tuple(x.stride())


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

    def _check_available(self) -> list[str]:
        missing = []
        for module, why in (("torch", "the kernels take torch tensors"), ("triton", "the kernels are written in Triton")):
            try:
                __import__(module)
            except ImportError as error:
                missing.append(f"{module} is not installed ({why}; pip install 'portattn[triton]'): {error}")
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
        batch, heads, seqlen_q, head_dim = q.shape
        seqlen_k = k.shape[2]
        out = torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        if out.numel() == 0:
            lse.fill_(float("-inf"))
            return out, lse
        key_blocks = -(-seqlen_k // plan.block_k)
        splits = max(1, min(plan.key_splits, key_blocks))
        keys_per_split = -(-key_blocks // splits) * plan.block_k
        # one split writes O and LSE directly; several write float32 partials merged below
        part_out = out[None] if splits == 1 else torch.empty((splits, *out.shape), dtype=torch.float32, device=q.device)
        part_lse = lse[None] if splits == 1 else torch.empty((splits, *lse.shape), dtype=torch.float32, device=q.device)
        grid = (-(-seqlen_q // plan.block_q), batch * heads, splits)
        with _on_device(q):
            kernels.attention_forward[grid](
                q, k, v, part_out, part_lse,
                *_strides(q), *_strides(k), *_strides(v), *_strides(part_out[0]), part_out.stride(0),
                heads, seqlen_q, seqlen_k, spec.softmax_scale * LOG2E, keys_per_split,
                HEAD_DIM=head_dim, BLOCK_M=plan.block_q, BLOCK_N=plan.block_k, BLOCK_D=plan.head_dim_padded,
                CAUSAL=spec.causal, IN_PRECISION=_in_precision(q),
                num_warps=plan.warps, num_stages=plan.stages,
            )
        if splits > 1:
            _merge_splits(part_out, part_lse, out, lse)
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, spec, plan, extras):
        import torch

        kernels = _kernels()
        batch, heads, seqlen_q, head_dim = q.shape
        seqlen_k = k.shape[2]
        dk = torch.empty((batch, heads, seqlen_k, head_dim), dtype=q.dtype, device=q.device)
        dv = torch.empty((batch, heads, seqlen_k, head_dim), dtype=q.dtype, device=q.device)
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
        dq_acc = torch.zeros((batch, heads, seqlen_q, plan.head_dim_padded) if atomic else (1,), dtype=torch.float32,
                             device=q.device)
        dq = None if atomic else torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
        scale = spec.softmax_scale
        precision = _in_precision(q)
        with _on_device(q):
            kernels.attention_backward_delta[(-(-seqlen_q // block_k), batch * heads)](
                out, grad_out, delta, *_strides(out), *_strides(grad_out), heads, seqlen_q,
                HEAD_DIM=head_dim, BLOCK_M=block_k, BLOCK_D=plan.head_dim_padded,
            )
            kernels.attention_backward_dkdv[(-(-seqlen_k // block_k), batch * heads)](
                q, k, v, grad_out, lse, delta, dk, dv, dq_acc,
                *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
                heads, seqlen_q, seqlen_k, scale, scale * LOG2E,
                BLOCK_M=block_q, BLOCK_N=block_k, CAUSAL=spec.causal, DQ_ATOMIC=atomic, IN_PRECISION=precision, **common,
            )
            if atomic:
                dq = (dq_acc[..., :head_dim] * scale).to(q.dtype)
            else:
                kernels.attention_backward_dq[(-(-seqlen_q // block_k), batch * heads)](
                    q, k, v, grad_out, lse, delta, dq,
                    *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
                    heads, seqlen_q, seqlen_k, scale, scale * LOG2E,
                    BLOCK_M=block_k, BLOCK_N=block_q, CAUSAL=spec.causal, IN_PRECISION=precision, **common,
                )
        return dq, dk, dv


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
