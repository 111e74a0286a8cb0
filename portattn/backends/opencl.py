"""``opencl``: FlashAttention-2 in portable OpenCL C, for any OpenCL 1.2 device -- AMD, Intel, Apple and
mobile GPUs, NVIDIA's OpenCL driver, and CPUs through PoCL.

The kernels (``opencl_kernels/attention.cl``) use nothing beyond OpenCL 1.2 core: float32
arithmetic on float4 register tiles, float16 storage read and written with ``vload_half`` /
``vstore_half`` (no ``cl_khr_fp16`` needed), bfloat16 as 16-bit patterns widened by a shift. The
sub-group and fp16 extensions are not used: the one step they would speed up, the row max across a
work-group row, is a local-memory exchange once per key tile, and every device has that.

The plan (``portattn/tiling/opencl.py``, rules O1-O6) is read from the device's local memory size,
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
import functools

import numpy as np

from ..spec import FEATURES
from ..tiling import opencl as rules
from ..tiling import probe
from . import opencl_runtime as runtime
from . import register
from .base import Backend, Capabilities

UNBOUNDED = 1 << 29  # a window side with no bound: farther than any key, and no int overflow in the kernels
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
    "decoding": "no key-split kernel: a few query rows would give one work-group per head; use numba or triton",
    "dropout": "no counter-based generator in the OpenCL kernels yet; use numba or triton",
}
_SUPPORTED = frozenset({"gqa", "bottom_right", "window", "bool_mask", "additive_mask", "alibi", "softcap", "key_padding"})
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
            runtime.choose()
        except Exception as error:  # noqa: BLE001 - no ICD loader, no platform, or a bad $PORTATTN_OPENCL_DEVICE
            return [f"no usable OpenCL device: {error}"]
        return []

    def _label(self, spec) -> str:
        return spec.device if spec.device_kind == "opencl" else runtime.choose(spec.compute_device)

    def _extra_reasons(self, spec) -> list[str]:
        if self.unavailable_reasons():
            return []
        return self._plan_reasons(spec)

    def device(self, spec):
        return probe.probe(self._label(spec))

    def plan(self, spec, device=None):
        return rules.plan(spec, device or self.device(spec))

    def retile(self, plan, changes):
        """Swept tiles that are O1 grids, with local memory and registers recomputed; None otherwise."""
        new = dataclasses.replace(plan, **changes)
        head_dim = plan.head_dim_padded  # the sweep keeps the problem; padding follows the grid
        forward = rules.forward_grid(new, head_dim)
        backward = rules.backward_grid(new, head_dim)
        if forward is None or backward is None:
            return None
        return dataclasses.replace(new, threads=forward.threads, stages=1, backward_stages=1, backward_dq_separate=True,
                                   head_dim_padded=forward.head_dim_padded, sram_bytes=forward.forward_local_bytes(),
                                   backward_sram_bytes=backward.backward_local_bytes())

    # ------------------------------------------------------------------------------------------

    def forward(self, q, k, v, spec, plan, extras):
        call = _Call(self._label(spec), q, spec, extras)
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
        call = _Call(self._label(spec), q, spec, extras)
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


class _Call:
    """One call's queue, storage dtype, build options and feature arguments, and the moves of its
    arrays to the device and back."""

    def __init__(self, label: str, q, spec, extras):
        self.spec = spec
        self.on_device = spec.array_kind == "pyopencl"
        self.queue = q.queue if self.on_device else runtime.queue_for(label)
        self.storage = runtime.STORAGE[spec.dtype]
        self.pool = runtime.memory_pool(self.queue.context)
        left, right = spec.window if spec.window is not None else (None, None)
        left = UNBOUNDED if left is None else left
        right = UNBOUNDED if right is None else right
        if spec.causal:
            right = min(right, 0)
        mask, mask_strides = self._mask(extras)
        self.options = (
            f"-DDTYPE={runtime.DTYPE_CODES[spec.dtype]}", f"-DCAUSAL_OR_WINDOW={int(spec.causal or spec.window is not None)}",
            f"-DSOFTCAP={int(spec.softcap is not None)}", f"-DALIBI={int(spec.alibi)}",
            f"-DMASK={ {None: 0, 'bool': 1, 'additive': 2}[spec.mask] }", f"-DKEY_PADDING={int(spec.key_padding)}",
        )
        slopes = self._host_array(np.broadcast_to(extras.alibi_slopes, (spec.batch, spec.heads)), np.float32) \
            if spec.alibi else self._placeholder(np.float32)
        padding = self._host_array(extras.key_padding_mask, np.uint8) if spec.key_padding else self._placeholder(np.uint8)
        self.feature_args = (
            np.int32(spec.heads), np.int32(spec.group_size), np.int32(spec.seqlen_q), np.int32(spec.seqlen_k),
            np.int32(spec.query_offset()), np.int32(left), np.int32(right), np.float32(spec.softmax_scale),
            np.float32(spec.softcap or 0.0), slopes.data, mask.data, *mask_strides, padding.data,
        )

    def _host_array(self, x, dtype):
        """A small feature array (slopes, padding, a cut-down mask) on the device."""
        return runtime.to_device(np.ascontiguousarray(np.asarray(x), dtype=dtype), self.queue, dtype)

    def _placeholder(self, dtype):
        return _placeholder(self.queue, np.dtype(dtype))

    def align(self, *arrays):
        """ALIGNED (the .cl file's storage types) when every row of these device arrays starts a multiple of
        4 elements into its buffer (they all start a buffer): quads then move as single 16- or 8-byte accesses."""
        aligned = self.spec.head_dim % 4 == 0 and all(int(step) % 4 == 0 for a in arrays for step in runtime.strides(a))
        self.options += (f"-DALIGNED={int(aligned)}",)

    def _mask(self, extras):
        """The mask as the kernels index it: broadcast axes cut to length 1 and given stride 0 (never
        expanded); bool as uchar, additive as float32 (bfloat16 bits widened)."""
        if self.spec.mask is None:
            return self._placeholder(np.uint8), (np.int64(0),) * 4
        mask = np.asarray(extras.attn_mask)
        if mask.dtype == np.uint16:  # bfloat16 bits (arrays.to_opencl_host)
            mask = (mask.astype(np.uint32) << 16).view(np.float32)
        stored = mask[tuple(slice(0, 1) if step == 0 else slice(None) for step in mask.strides)]
        dtype = np.uint8 if self.spec.mask == "bool" else np.float32
        stored = np.ascontiguousarray(stored, dtype=dtype)
        steps = tuple(np.int64(0 if size == 1 and full > 1 else step // stored.itemsize)
                      for size, full, step in zip(stored.shape, mask.shape, stored.strides))
        return self._host_array(stored, dtype), steps

    def empty(self, shape, zero=False):
        """A (B, H, N, D) result. For a pyopencl caller in the bnhd layout it is a view of (B, N, H, D)
        storage (the kernels write through strides), so the caller gets a contiguous array back."""
        import pyopencl.array as cla

        make = cla.zeros if zero else cla.empty
        if self.on_device and self.spec.layout == "bnhd":
            b, h, n, d = shape
            return make(self.queue, (b, n, h, d), self.storage, allocator=self.pool).transpose((0, 2, 1, 3))
        return make(self.queue, shape, self.storage, allocator=self.pool)

    def scratch(self, shape):
        """A float32 array for LSE and the backward's per-row statistics."""
        import pyopencl.array as cla

        return cla.empty(self.queue, shape, np.float32, allocator=self.pool)

    def upload(self, x):
        return runtime.to_device(x, self.queue, self.storage)

    def download(self, x):
        """A result for the caller: left on the device for pyopencl callers, else a host array
        (bfloat16 bits as a torch bfloat16 tensor: only torch can hold bfloat16 on the host)."""
        if self.on_device:
            return x
        host = x.get(self.queue)
        if host.dtype == np.uint16:
            import torch

            return torch.from_numpy(host.view(np.int16)).view(torch.bfloat16)
        return host

    def launch(self, grid, name, groups, *args, global_size=None):
        args = tuple(_buffer(a) for a in args)
        scalar_dtypes = tuple(a.dtype if isinstance(a, np.generic) else None for a in args)  # scalars are numpy's
        kernel = runtime.kernel(self.queue.context, grid.options() + self.options, name, scalar_dtypes)
        if global_size is not None:  # the delta kernel: one work-item per row, any work-group shape
            kernel(self.queue, global_size, None, *args)
            return
        kernel(self.queue, (groups[0] * grid.threads, groups[1]), (grid.threads, 1), *args)


@functools.lru_cache(maxsize=16)
def _placeholder(queue, dtype):
    """A one-element zero array standing in for a feature's absent input (the kernels never read it):
    one per queue and dtype, not a fill command per call."""
    import pyopencl.array as cla

    return cla.zeros(queue, (1,), dtype)


def _buffer(x):
    """Kernel arguments: device arrays as their buffers, scalars as they are."""
    return x.base_data if hasattr(x, "base_data") else x
