"""Launching the OpenCL kernels: one ``Call`` per call holds its queue, memory pool, uploads and
downloads, placeholders for absent feature arrays, and launches with declared scalar types."""
from __future__ import annotations

import functools

import numpy as np

from ...spec import WINDOW_UNBOUNDED_FROM
from . import runtime

# a window side with no bound: farther than any key, and no int32 overflow in the kernels' bounds arithmetic
UNBOUNDED = WINDOW_UNBOUNDED_FROM


class Call:
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
        return placeholder(self.queue, np.dtype(dtype))

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
        args = tuple(buffer(a) for a in args)
        scalar_dtypes = tuple(a.dtype if isinstance(a, np.generic) else None for a in args)  # scalars are numpy's
        kernel = runtime.kernel(self.queue.context, grid.options() + self.options, name, scalar_dtypes)
        if global_size is not None:  # the delta kernel: one work-item per row, any work-group shape
            kernel(self.queue, global_size, None, *args)
            return
        kernel(self.queue, (groups[0] * grid.threads, groups[1]), (grid.threads, 1), *args)

@functools.lru_cache(maxsize=16)
def placeholder(queue, dtype):
    """A one-element zero array standing in for a feature's absent input (the kernels never read it):
    one per queue and dtype, not a fill command per call."""
    import pyopencl.array as cla

    return cla.zeros(queue, (1,), dtype)

def buffer(x):
    """Kernel arguments: device arrays as their buffers, scalars as they are."""
    return x.base_data if hasattr(x, "base_data") else x
