"""``opencl``: FlashAttention-2 in portable OpenCL C, for any OpenCL 1.2 device -- AMD, Intel, Apple and
mobile GPUs, NVIDIA's OpenCL driver, and CPUs through PoCL.

The kernels (``kernels/attention.cl``) use nothing beyond OpenCL 1.2 core: float32
arithmetic on float4 register tiles, float16 storage read and written with ``vload_half`` /
``vstore_half`` (no ``cl_khr_fp16`` needed), bfloat16 as 16-bit patterns widened by a shift. The
sub-group and fp16 extensions are not used: the one step they would speed up, the row max across a
work-group row, is a local-memory exchange once per key tile, and every device has that.

The plan (``portattn/backends/opencl/plan.py``, rules O1-O6) is read from the device's local memory size,
work-group limit, compute units and vector width; it reaches the compiler as ``-D`` options with
the call's dtype and features, and each (context, options) program is built once
(``opencl_runtime.program``). Forward: one work-group per (query tile, batch x head) streams the
key tiles its rows can see (causal and window tiles outside are never loaded), online softmax, O
and LSE. Backward: a delta kernel, a dK/dV kernel owning key tiles (GQA: summing its group's
query heads), a dQ kernel owning query tiles; no atomics, deterministic.

Inputs: numpy arrays and torch CPU tensors are copied to the chosen device and the results back
(``opencl_runtime.choose``: ``device=``, ``$PORTATTN_OPENCL_DEVICE``, else the first GPU, else the
first device); pyopencl arrays stay on their device, and so do the results.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...devices import probe
from ...spec import FEATURES
from ..base import Backend, Capabilities, register
from . import launch, runtime
from . import plan as rules

FEATURE_NOTES = {
    "gqa": "query head h reads K/V head h // group in place; the dK/dV kernel sums the group's query heads in registers",
    "bottom_right": "query positions shifted by Nk - Nq in the position checks and the tile ranges",
    "window": "each work-group visits only the key tiles (dK/dV: query tiles) its window reaches; edge tiles are "
              "checked per score",
    "bool_mask": "read per score inside visited tiles (uchar, broadcast axes indexed with stride 0, never expanded)",
    "additive_mask": "added per score in float32 inside visited tiles (broadcast axes indexed, not expanded)",
    "alibi": "-slope * |position - key| added per score in-kernel",
    "softcap": "softcap * tanh(s / softcap) per score; the backward multiplies dS by 1 - tanh^2",
    "block_sparse": "not implemented in the OpenCL kernels yet; use numba or triton",
    "key_padding": "padded keys get -inf per score inside visited tiles",
    "varlen": "not implemented in the OpenCL kernels yet; use numba or triton",
    "decoding": "runs as any other call, without key splits: one work-group per (query tile, batch x head) walks "
                "all of its keys (plan.key_splits == 1), so a few queries occupy batch x heads work-groups; "
                "numba and triton split the key loop",
    "dropout": "no counter-based generator in the OpenCL kernels yet; use numba or triton",
}
_SUPPORTED = frozenset({"gqa", "bottom_right", "window", "bool_mask", "additive_mask", "alibi", "softcap", "key_padding",
                        "decoding"})
assert set(FEATURE_NOTES) == set(FEATURES)


@register
class OpenCLBackend(Backend):
    name = "opencl"
    summary = ("any OpenCL 1.2 device (AMD/Intel/Apple/mobile GPUs, NVIDIA's driver, CPUs via PoCL): "
               "FlashAttention-2 in OpenCL C on float4 register tiles, float32 FMAs")
    extra = "opencl"
    compute_kind = "opencl"
    # pyopencl arrays: the only backend there. Host arrays: below numba, which runs on the CPU itself
    auto_priority = {"opencl": 10, "cpu": 1}
    capabilities = Capabilities(
        device_kinds=frozenset({"cpu", "opencl"}),
        dtypes=frozenset({"float32", "float16", "bfloat16"}),
        min_head_dim=1,
        max_head_dim=256,
        backward=True,
        features=_SUPPORTED,
        feature_notes=FEATURE_NOTES,
        notes=(
            "float32 arithmetic whatever the input dtype: float16 read and written with vload_half/vstore_half, "
            "bfloat16 as bit patterns; float64 is refused (cl_khr_fp64 is optional and the tiles are float32)",
            "numpy and torch CPU inputs are copied to the OpenCL device (device=, $PORTATTN_OPENCL_DEVICE, else the "
            "first GPU, else the first device); pyopencl arrays stay on theirs",
        ),
        device_choice=True,
    )

    def _check_available(self) -> list[str]:
        missing = self._missing_modules((("pyopencl", "it builds and launches the OpenCL kernels"),))
        if missing:
            return missing
        try:
            label = runtime.choose()
        except Exception as error:  # noqa: BLE001 - no ICD loader, no platform, or a bad $PORTATTN_OPENCL_DEVICE
            return [f"no usable OpenCL device: {error}"]
        return self._compile_reasons(label)

    def _compile_reasons(self, label: str) -> list[str]:
        problem = runtime.compile_problem(label)
        if problem is None:
            return []
        name = runtime.device_of(label).name.strip()
        return [f"the OpenCL device {label} ({name}) cannot compile kernels: {problem}"]

    def _label(self, spec) -> str:
        return spec.device if spec.device_kind == "opencl" else runtime.choose(spec.compute_device)

    def _extra_reasons(self, spec) -> list[str]:
        if self.unavailable_reasons():
            return []
        return self._compile_reasons(self._label(spec)) or self._plan_reasons(spec)

    def device(self, spec):
        return probe.probe(self._label(spec))

    def plan(self, spec, device=None):
        return rules.plan(spec, device or self.device(spec))

    def retile(self, plan, changes):
        """Swept tiles that are O1 grids, with local memory and registers recomputed; None otherwise."""
        new = super().retile(plan, changes)
        if new is None:
            return None
        head_dim = plan.head_dim_padded  # the sweep keeps the problem; padding follows the grid
        forward = rules.forward_grid(new, head_dim)
        backward = rules.backward_grid(new, head_dim)
        if forward is None or backward is None:
            return None
        return dataclasses.replace(new, threads=forward.threads, stages=1, head_dim_padded=forward.head_dim_padded,
                                   sram_bytes=forward.forward_local_bytes(),
                                   backward=dataclasses.replace(new.backward, stages=1, dq_separate=True,
                                                                sram_bytes=backward.backward_local_bytes()))

    # ------------------------------------------------------------------------------------------

    def forward(self, q, k, v, spec, plan, extras):
        call = launch.Call(self._label(spec), q, spec, extras)
        q, k, v = (call.upload(x) for x in (q, k, v))
        batch, heads, seqlen_q, head_dim = spec.batch, spec.heads, spec.seqlen_q, spec.head_dim
        out = call.empty((batch, heads, seqlen_q, head_dim))
        call.align(q, k, v, out)
        lse = call.scratch((batch, heads, seqlen_q))
        if out.size == 0:
            lse.fill(-np.inf)
            return call.download(out), call.download(lse)
        grid = rules.forward_grid(plan, head_dim)
        call.launch(grid, "attention_forward", (-(-seqlen_q // grid.rows), batch * heads),
                    q, k, v, out, lse, *runtime.strides(q), *runtime.strides(k), *runtime.strides(v),
                    *runtime.strides(out), *call.feature_args)
        return call.download(out), call.download(lse)

    def backward(self, grad_out, q, k, v, out, lse, spec, plan, extras):
        call = launch.Call(self._label(spec), q, spec, extras)
        grad_out, q, k, v, out = (call.upload(x) for x in (grad_out, q, k, v, out))
        lse = runtime.to_device(lse, call.queue, np.float32)
        batch, heads, seqlen_q, head_dim = spec.batch, spec.heads, spec.seqlen_q, spec.head_dim
        kv_heads, seqlen_k = spec.kv_heads, spec.seqlen_k
        dq = call.empty((batch, heads, seqlen_q, head_dim), zero=True)
        dk = call.empty((batch, kv_heads, seqlen_k, head_dim), zero=True)
        dv = call.empty((batch, kv_heads, seqlen_k, head_dim), zero=True)
        call.align(grad_out, q, k, v, out, dq, dk, dv)
        if seqlen_q == 0 or seqlen_k == 0:  # no query sees any key: every gradient is zero
            return tuple(call.download(x) for x in (dq, dk, dv))
        grid = rules.backward_grid(plan, head_dim)
        delta, lse_log2 = call.scratch((batch, heads, seqlen_q)), call.scratch((batch, heads, seqlen_q))
        call.launch(grid, "attention_backward_delta", None, out, grad_out, lse, delta, lse_log2,
                    *runtime.strides(out), *runtime.strides(grad_out), np.int32(heads), np.int32(seqlen_q),
                    global_size=(seqlen_q, batch * heads))
        common = (q, k, v, grad_out, lse_log2, delta)
        operand_strides = (*runtime.strides(q), *runtime.strides(k), *runtime.strides(v), *runtime.strides(grad_out))
        call.launch(grid, "attention_backward_dkdv", (-(-seqlen_k // grid.rows), batch * kv_heads), *common, dk, dv,
                    *operand_strides, *runtime.strides(dk), *runtime.strides(dv), *call.feature_args)
        call.launch(grid, "attention_backward_dq", (-(-seqlen_q // grid.rows), batch * heads), *common, dq,
                    *operand_strides, *runtime.strides(dq), *call.feature_args)
        return tuple(call.download(x) for x in (dq, dk, dv))


