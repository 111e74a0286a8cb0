"""``cupy``: FlashAttention-2 in hand-written CUDA C++ on tensor cores through WMMA, for Volta and later.

The kernels (``kernels/attention.cu``) are compiled at run time by ``cupy.RawModule`` with the
plan of ``portattn/backends/cupy/plan.py`` as compile-time constants (``build.Variant``), one module
per (device, variant), cached. Forward: a block of ``warps`` warps owns 16 query rows per warp and
streams K/V tiles of ``block_k`` keys (``stages`` deep with cp.async on sm_80+, through registers on
Volta/Turing), online softmax in float32, causal whole-tile skipping. Backward: a delta kernel, a
dK/dV kernel that owns keys and streams query tiles (GQA: over every query head of the group, summed
in registers), and a dQ kernel that owns queries and streams key tiles -- no atomics, deterministic.
``attn_mask`` (bool or additive) and ``key_padding_mask`` are compile-time variants of the same kernels
(``MASK``, ``KEY_PADDING``): read per score in place through their strides, forward and backward; a
call without them compiles to the kernels it always had.

MMA_CHOICE -- WMMA 16x16x16 rather than inline ``mma.sync.m8n8k4``, measured: on the H100
``benchmarks/mma_shapes.py`` runs WMMA at 431 TFLOP/s and m8n8k4 at 15.6 (28x slower: from sm_80 on
WMMA becomes the native m16n8k16 instruction while m8n8k4 is emulated;
``benchmarks/results/h100-mma-shapes.json``). On Volta a WMMA 16x16x16 product is itself executed as
m8n8k4 steps of the four quad-pairs (HMMA.884; the Volta whitepaper and the "Dissecting Volta"
microbenchmarks), so inline m8n8k4 could only save register shuffles there, at the price of
hand-written fragment layouts, and this machine has no V100 to show it does. WMMA's one cost, an
opaque accumulator layout, is paid once per warp by probing it (``probe_layout`` in the .cu file).

Inputs are torch CUDA tensors (cupy arrays reach here as torch tensors through DLPack, without
copies) read through their strides; only a last dimension that is not contiguous is copied.
"""

from __future__ import annotations

import dataclasses

from ...devices import cuda_index, probe
from ...spec import FEATURES
from ..base import Backend, Capabilities, register
from . import launch
from . import plan as wmma

LOG2E = 1.4426950408889634
MIN_COMPUTE_CAPABILITY = (7, 0)
BF16_COMPUTE_CAPABILITY = (8, 0)
_SUPPORTED = frozenset({"gqa", "bottom_right", "window", "bool_mask", "additive_mask", "key_padding", "decoding"})
_FEATURE_NOTES = {
    "gqa": "query head h reads K/V head h // group in place; the dK/dV kernel loops over the group's query heads "
           "(sums in registers, no repeat, no atomics)",
    "bottom_right": "query positions shifted by Nk - Nq in the causal mask and the causal tile range",
    "window": "each block's visible key range (queries for dK/dV) is computed and only it is loaded; edge tiles are masked",
    "bool_mask": "read per score in place through the broadcast view's strides (stride 0 on broadcast axes, never "
                 "expanded), forward and backward; tiles are still skipped by causal/window alone",
    "additive_mask": "added per score in float32, read in place in the inputs' dtype or float32 (other dtypes are "
                     "converted over the stored elements only); broadcast axes read with stride 0",
    "alibi": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "softcap": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "block_sparse": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "key_padding": "padded keys get -inf per score (the (B, Nk) mask read through its strides); a row with no "
                   "visible key gives O = 0 and LSE = -inf",
    "varlen": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
    "decoding": "run by the ordinary kernels with one key split (no split-KV kernel yet): correct, but a few queries per head keep few SMs busy; triton (sm_80+) splits the key loop",
    "dropout": "not implemented in the WMMA kernels yet; use triton (sm_80+) or numba",
}
assert set(_FEATURE_NOTES) == set(FEATURES)


@register
class CupyBackend(Backend):
    name = "cupy"
    summary = "NVIDIA Volta and later: FlashAttention-2 in CUDA C++ on WMMA tensor cores, compiled by CuPy"
    extra = "cupy"
    compute_kind = "torch"
    auto_priority = {"cuda": 20}  # below triton, which refuses sm_70/sm_75: there this is what auto picks
    capabilities = Capabilities(
        device_kinds=frozenset({"cuda"}),
        dtypes=frozenset({"float16", "bfloat16"}),
        min_head_dim=1,
        max_head_dim=256,
        backward=True,
        features=_SUPPORTED,
        feature_notes=_FEATURE_NOTES,
        min_compute_capability=MIN_COMPUTE_CAPABILITY,  # WMMA tensor cores
        notes=(
            "float16 (sm_70+) and bfloat16 (sm_80+) on WMMA 16x16x16 tensor cores, float32 accumulation and softmax; "
            "float32 inputs are refused (no fragment takes them; triton or numba do)",
            "head dims up to 256 forward; the backward where its dK/dV accumulators fit registers (<= 128)",
        ),
    )

    def _check_available(self) -> list[str]:
        missing = self._missing_modules((("cupy", "it compiles and launches the kernels"),
                                         ("torch", "inputs are computed on as torch tensors")))
        if missing:
            return missing
        import cupy

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as error:  # noqa: BLE001 - no driver is the usual case on a CPU machine
            return [f"cupy sees no CUDA device ({type(error).__name__}: {error})"]
        if count == 0:
            return ["cupy sees no CUDA device"]
        return []

    def _extra_reasons(self, spec) -> list[str]:
        if spec.device_kind != "cuda" or self.unavailable_reasons():
            return []
        cc = launch.compute_capability(cuda_index(spec.device))
        if spec.dtype == "bfloat16" and cc < BF16_COMPUTE_CAPABILITY:
            return [f"bfloat16 needs compute capability 8.0+ (WMMA has no bf16 fragment before Ampere); {spec.device} is "
                    f"{cc[0]}.{cc[1]}: pass float16"]
        return self._plan_reasons(spec)

    def device(self, spec):
        return probe.probe_cuda(cuda_index(spec.device))

    def plan(self, spec, device=None):
        return wmma.plan(spec, device or self.device(spec))

    def retile(self, plan, changes):
        """Swept tiles the WMMA kernels can run (W3: 16 rows per warp; W6: at most 2 stages; dQ in its own
        kernel; W5: registers), with shared memory and threads recomputed (W4); None otherwise."""
        new = super().retile(plan, changes)
        if new is None:
            return None
        b = new.backward
        forward_ok = (new.block_q == wmma.ROWS_PER_WARP * new.warps and 1 <= new.stages <= 2 and new.block_k % 16 == 0
                      and wmma.forward_registers(new.head_dim_padded, new.block_k) <= wmma.MAX_REGISTERS)
        backward_ok = b is None or (
            b.block_k == wmma.ROWS_PER_WARP * b.warps and 1 <= b.stages <= 2
            and b.dq_separate and b.block_q % 16 == 0
            and wmma.backward_registers(new.head_dim_padded, b.block_q) <= wmma.MAX_REGISTERS)
        if not (forward_ok and backward_ok):
            return None
        pad = new.head_dim_padded
        return dataclasses.replace(
            new, threads=32 * new.warps, sram_bytes=wmma.forward_smem_bytes(pad, new.warps, new.block_k, new.stages),
            registers_per_thread=wmma.forward_registers(pad, new.block_k),
            backward=(dataclasses.replace(b, sram_bytes=wmma.backward_smem_bytes(pad, b.warps, b.block_q, b.stages))
                      if b is not None else None),
        )

    def forward(self, q, k, v, spec, plan, extras):
        import torch

        batch, heads, seqlen_q, head_dim = q.shape
        out = torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        if out.numel() == 0:
            lse.fill_(float("-inf"))
            return out, lse
        q, k, v = (launch.rows_contiguous(x) for x in (q, k, v))
        run = launch.Launcher(q, spec, plan, (q, k, v), extras)
        run(
            "attention_forward", (-(-seqlen_q // plan.block_q), batch * heads), plan.threads, plan.sram_bytes,
            q, k, v, out, lse, *launch.strides(q), *launch.strides(k), *launch.strides(v), *launch.strides(out),
            launch.i64(lse.stride(0)), launch.i64(lse.stride(1)), *launch.sizes(spec), launch.f32(spec.softmax_scale * LOG2E),
            *run.masks,
        )
        return out, lse

    def backward(self, grad_out, q, k, v, out, lse, spec, plan, extras):
        import torch

        batch, heads, seqlen_q, head_dim = q.shape
        kv_heads, seqlen_k = k.shape[1], k.shape[2]
        dq = torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
        dk = torch.empty((batch, kv_heads, seqlen_k, head_dim), dtype=q.dtype, device=q.device)
        dv = torch.empty_like(dk)
        if batch * heads == 0 or seqlen_q == 0 or seqlen_k == 0:  # no query sees any key: every gradient is zero
            return dq.zero_(), dk.zero_(), dv.zero_()
        grad_out = launch.rows_contiguous(grad_out.to(q.dtype))
        q, k, v, out = (launch.rows_contiguous(x) for x in (q, k, v, out))
        lse = lse.to(torch.float32).contiguous()
        delta = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
        run = launch.Launcher(q, spec, plan, (q, k, v, out, grad_out), extras)
        scale = spec.softmax_scale
        owned = wmma.ROWS_PER_WARP * plan.backward.warps
        threads = 32 * plan.backward.warps
        run("attention_backward_delta", (-(-seqlen_q // launch.DELTA_ROWS_PER_BLOCK), batch * heads), 32 * launch.DELTA_ROWS_PER_BLOCK,
               0, out, grad_out, delta, *launch.strides(out), *launch.strides(grad_out), launch.i32(heads), launch.i32(seqlen_q))
        common = (q, k, v, grad_out, lse, delta)
        run("attention_backward_dkdv", (-(-seqlen_k // owned), batch * kv_heads), threads, plan.backward.sram_bytes,
               *common, dk, dv, *launch.strides(q), *launch.strides(k), *launch.strides(v), *launch.strides(grad_out), *launch.strides(dk),
               *launch.strides(dv), *launch.sizes(spec), launch.f32(scale), launch.f32(scale * LOG2E), *run.masks)
        run("attention_backward_dq", (-(-seqlen_q // owned), batch * heads), threads, plan.backward.sram_bytes,
               *common, dq, *launch.strides(q), *launch.strides(k), *launch.strides(v), *launch.strides(grad_out), *launch.strides(dq),
               *launch.sizes(spec), launch.f32(scale), launch.f32(scale * LOG2E), *run.masks)
        return dq, dk, dv


