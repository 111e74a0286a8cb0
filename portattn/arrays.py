"""Adapters between the array types users pass (numpy, torch, cupy, pyopencl) and the ones backends compute on.

Nothing here imports a framework at module import: torch, cupy and pyopencl are only looked at when
the caller already imported them (a torch tensor or cupy array cannot exist otherwise), so
``import portattn`` needs only numpy. Conversions never copy when they don't have to (torch CPU <->
numpy share memory; cupy <-> torch CUDA go through DLPack, strides kept); the one forced copy is
bfloat16 into numpy, which has no bfloat16 (it is widened to float32, exactly).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np

from .devices import cuda_index


@dataclass(frozen=True)
class ArrayInfo:
    kind: str  # "numpy", "torch", "cupy" or "pyopencl"
    shape: tuple[int, ...]
    dtype: str  # numpy/torch dtype name without prefix: "float16", "bfloat16", "int64", ...
    device: str  # "cpu", "cuda:0", "opencl:0:0" (platform:device), ...
    requires_grad: bool = False


def _torch():
    """The torch module if the process has imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def is_torch(x) -> bool:
    # no Tensor yet while another thread is still importing torch: then no torch tensor exists either
    tensor = getattr(_torch(), "Tensor", None)
    return tensor is not None and isinstance(x, tensor)


def _cupy():
    """The cupy module if the process has imported it, else None (never imports it)."""
    return sys.modules.get("cupy")


def is_cupy(x) -> bool:
    cupy = _cupy()
    return cupy is not None and isinstance(x, cupy.ndarray)


def _pyopencl_array():
    """pyopencl.array if the process has imported it, else None (never imports it)."""
    return sys.modules.get("pyopencl.array")


def is_pyopencl(x) -> bool:
    # while another thread is still importing pyopencl.array, the module is in sys.modules without its
    # Array class yet: no pyopencl array can exist before that import finishes, so x is none
    array_type = getattr(_pyopencl_array(), "Array", None)
    return array_type is not None and isinstance(x, array_type)


@functools.lru_cache(maxsize=None)
def opencl_label(device) -> str:
    """'opencl:P:D' for a pyopencl Device, in the numbering ``portattn info`` shows."""
    from .devices import probe

    for label, found in probe.opencl_devices():
        if found == device:
            return label
    raise ValueError(f"OpenCL device {device.name!r} is on no platform this process sees")


def _pyopencl_device(x):
    return x.queue.device if x.queue is not None else x.context.devices[0]


def describe(x, name: str) -> ArrayInfo:
    if isinstance(x, np.ndarray):
        return ArrayInfo("numpy", tuple(x.shape), x.dtype.name, "cpu")
    if is_torch(x):
        device = x.device.type if x.device.index is None else f"{x.device.type}:{x.device.index}"
        dtype = str(x.dtype).removeprefix("torch.")
        return ArrayInfo("torch", tuple(x.shape), dtype, device, bool(x.requires_grad))
    if is_cupy(x):
        return ArrayInfo("cupy", tuple(x.shape), x.dtype.name, f"cuda:{x.device.id}")
    if is_pyopencl(x):
        return ArrayInfo("pyopencl", tuple(x.shape), x.dtype.name, opencl_label(_pyopencl_device(x)))
    # the message keeps its original prefix (tests/api/test_errors.py matches on it) and names the others after it
    raise TypeError(
        f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(x).__module__}.{type(x).__name__}; "
        "a cupy.ndarray or a pyopencl.array.Array is accepted too"
    )


def to_numpy(x) -> np.ndarray:
    """A numpy view of ``x`` (CPU only); bfloat16 tensors are widened to float32."""
    if isinstance(x, np.ndarray):
        return x
    if is_cupy(x):
        raise TypeError(
            f"a cupy array lives on a GPU (cuda:{x.device.id}) and a CPU backend cannot take it; "
            "move it to the host with cupy.asnumpy, or pick a CUDA backend (backend='auto' or 'triton')"
        )
    if is_pyopencl(x):
        return x.get()  # a device -> host copy: only host-side feature arrays (masks, slopes) take this path
    torch = _torch()
    x = x.detach()
    if x.dtype == torch.bfloat16:
        # widen only the stored elements: a broadcast view (stride 0, e.g. a (Nq, Nk) mask seen as
        # (B, H, Nq, Nk)) stays a view instead of growing into a full-size float32 copy
        stored = x[tuple(slice(0, 1) if step == 0 else slice(None) for step in x.stride())]
        return np.broadcast_to(stored.float().numpy(), x.shape)
    return x.numpy()


def to_torch(x, device: str = "cpu"):
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if is_cupy(x):
        return torch.from_dlpack(x)  # zero copy, strides kept (transposed bnhd views stay views)
    x = np.asarray(x)
    if any(stride < 0 for stride in x.strides) or not x.dtype.isnative:
        # torch.from_numpy takes neither negative strides (a reversed view) nor a foreign byte order
        x = np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))
    return torch.from_numpy(x).to(device)


def to_opencl_host(x):
    """What the OpenCL backend takes: a pyopencl array as it is (it stays on its device), a bfloat16
    tensor as a uint16 numpy view of its bits (the kernels widen them; nothing is copied here),
    anything else as numpy."""
    if is_pyopencl(x):
        return x
    return to_numpy_bits(x)


def to_numpy_bits(x) -> np.ndarray:
    """A numpy view of a host array with nothing widened: a bfloat16 tensor as a uint16 view of its bits
    (the kernels that take it widen them; ``to_numpy`` would copy it to float32)."""
    if is_torch(x) and x.dtype == _torch().bfloat16:
        return x.detach().view(_torch().int16).numpy().view(np.uint16)
    return to_numpy(x)


def from_numpy_bits(x: np.ndarray):
    """The inverse of ``to_numpy_bits`` for bfloat16: uint16 bits as a torch bfloat16 tensor (a view)."""
    return _torch().from_numpy(x.view(np.int16)).view(_torch().bfloat16)


def convert(x, kind: str, device: str = "cpu"):
    """``x`` as the array kind a backend computes on ("numpy", "torch" or "opencl")."""
    if kind == "opencl":
        return to_opencl_host(x)
    return to_numpy(x) if kind == "numpy" else to_torch(x, device)


def restore(result, kind: str, dtype: str | None, device: str = "cpu"):
    """A backend's result as the caller's array kind, dtype (None: keep) and device."""
    if kind == "numpy":
        result = to_numpy(result)
        return result if dtype is None or result.dtype.name == dtype else result.astype(dtype)
    if kind == "cupy":
        return _to_cupy(result, dtype, device)
    if kind == "pyopencl":  # the OpenCL backend leaves a pyopencl caller's results on its device
        return result if dtype is None or result.dtype.name == dtype else result.astype(dtype)
    import torch

    result = to_torch(result, device)
    return result if dtype is None else result.to(getattr(torch, dtype))


def _to_cupy(result, dtype: str | None, device: str):
    """A backend's result as a cupy array: torch CUDA tensors through DLPack (no copy)."""
    import cupy  # only reached for cupy inputs, so cupy is already imported

    if is_cupy(result):
        out = result
    elif is_torch(result) and result.device.type == "cuda":
        torch = _torch()
        result = result.detach()  # DLPack refuses tensors that require grad
        if result.dtype == torch.bfloat16:  # cupy has no bfloat16: cast on the torch side first
            result = result.to(getattr(torch, dtype) if dtype is not None else torch.float32)
        out = cupy.from_dlpack(result)
    else:  # a host result (numpy or torch CPU): the one path that copies, onto the caller's GPU
        current = cupy.cuda.runtime.getDevice()
        index = cuda_index(device, current) if device.startswith("cuda") else current
        with cupy.cuda.Device(index):
            out = cupy.asarray(to_numpy(result))
    return out if dtype is None or out.dtype.name == dtype else out.astype(dtype)


def broadcast_view(x, shape: tuple[int, ...]):
    """``x`` broadcast to ``shape`` as a view (strides 0 on the broadcast axes), never a copy."""
    if isinstance(x, np.ndarray):
        return np.broadcast_to(x, shape)
    if is_cupy(x):
        return _cupy().broadcast_to(x, shape)
    if is_pyopencl(x):  # pyopencl has no broadcasting views: a feature array is read on the host
        return np.broadcast_to(x.get(), shape)
    return x.expand(*shape)


def bhnd_view(x, layout: str):
    """``x`` seen as (B, H, N, D) whatever its layout: a transposed view, never a copy.

    The swap of axes 1 and 2 is its own inverse, so the same call turns a (B, H, N, D) result back
    into the caller's layout.
    """
    if layout == "bhnd":
        return x
    if is_pyopencl(x):
        return x.transpose((0, 2, 1, 3))
    return x.transpose(0, 2, 1, 3) if isinstance(x, np.ndarray) or is_cupy(x) else x.transpose(1, 2)

