"""Adapters between the array types users pass (numpy, torch) and the ones backends compute on.

Nothing here imports a framework at module import: torch is only looked at when the caller already
imported it (a torch tensor cannot exist otherwise), so ``import portattn`` needs only numpy.
Conversions never copy when they don't have to (torch CPU <-> numpy share memory); the one forced
copy is bfloat16 into numpy, which has no bfloat16 (it is widened to float32, exactly).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ArrayInfo:
    kind: str  # "numpy" or "torch"
    shape: tuple[int, ...]
    dtype: str  # numpy/torch dtype name without prefix: "float16", "bfloat16", "int64", ...
    device: str  # "cpu", "cuda:0", ...
    requires_grad: bool = False


def _torch():
    """The torch module if the process has imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def is_torch(x) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def describe(x, name: str) -> ArrayInfo:
    if isinstance(x, np.ndarray):
        return ArrayInfo("numpy", tuple(x.shape), x.dtype.name, "cpu")
    if is_torch(x):
        device = x.device.type if x.device.index is None else f"{x.device.type}:{x.device.index}"
        dtype = str(x.dtype).removeprefix("torch.")
        return ArrayInfo("torch", tuple(x.shape), dtype, device, bool(x.requires_grad))
    raise TypeError(f"{name} must be a numpy.ndarray or a torch.Tensor, got {type(x).__module__}.{type(x).__name__}")


def to_numpy(x) -> np.ndarray:
    """A numpy view of ``x`` (CPU only); bfloat16 tensors are widened to float32."""
    if isinstance(x, np.ndarray):
        return x
    torch = _torch()
    x = x.detach()
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.numpy()


def to_torch(x, device: str = "cpu"):
    import torch

    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.asarray(x)).to(device)


def convert(x, kind: str, device: str = "cpu"):
    """``x`` as the array kind a backend computes on."""
    return to_numpy(x) if kind == "numpy" else to_torch(x, device)


def restore(result, kind: str, dtype: str | None, device: str = "cpu"):
    """A backend's result as the caller's array kind, dtype (None: keep) and device."""
    if kind == "numpy":
        result = to_numpy(result)
        return result if dtype is None or result.dtype.name == dtype else result.astype(dtype)
    import torch

    result = to_torch(result, device)
    return result if dtype is None else result.to(getattr(torch, dtype))


def bhnd_view(x, layout: str):
    """``x`` seen as (B, H, N, D) whatever its layout: a transposed view, never a copy.

    The swap of axes 1 and 2 is its own inverse, so the same call turns a (B, H, N, D) result back
    into the caller's layout.
    """
    if layout == "bhnd":
        return x
    return x.transpose(0, 2, 1, 3) if isinstance(x, np.ndarray) else x.transpose(1, 2)

