"""Checks shared by the context-parallel modes, and one cached way to run a block through portattn."""

from __future__ import annotations

import torch

from .. import api

# what no context-parallel mode runs, and why
ALWAYS_REFUSED = {
    "attn_mask": "a dense (Nq, Nk) mask would have to be cut per block and sent with K/V; express it as causal, "
                 "window or key_padding_mask, or run portattn.attention on one device",
    "block_mask": "block-sparse masks are laid out for one device's (Nq, Nk) grid, not for sharded sequences",
    "block_size": "it only shapes a block_mask, which is refused",
    "dropout_p": "each block would draw its own dropout mask, not the one a single-device call draws; "
                 "apply dropout elsewhere or run portattn.attention on one device",
    "dropout_seed": "dropout is refused (see dropout_p)",
    "device": "it only moves host arrays to OpenCL devices; sharded tensors are computed where they lie",
}
ALIGNS = ("top-left", "bottom-right")


def check_features(features: dict, allowed: tuple[str, ...], refused: dict, mode: str) -> dict:
    """The feature keywords this mode runs; a ValueError naming the first refused one and why."""
    for name, value in features.items():
        if name in allowed:
            continue
        reason = refused.get(name, ALWAYS_REFUSED.get(name))
        if reason is None:
            raise TypeError(f"{mode}() got an unexpected keyword argument {name!r}")
        if value is None or (name == "dropout_p" and value == 0.0):
            continue  # the default: nothing asked
        raise ValueError(f"{mode} does not run {name}: {reason}")
    if features.get("align", "top-left") not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}, got {features['align']!r}")
    return {name: value for name, value in features.items() if name in allowed}


def check_qkv(q, k, v, mode: str):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{mode} takes torch tensors (torch.distributed moves them); {name} is "
                            f"{type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N_local, D), this rank's piece of the sequence; got shape "
                             f"{tuple(x.shape)}")
    check_shapes(q, k, v)
    if len({q.dtype, k.dtype, v.dtype}) > 1 or len({q.device, k.device, v.device}) > 1:
        raise ValueError("q, k and v must have one dtype and one device; got "
                         f"{q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}")


def check_shapes(q, k, v) -> None:
    """(B, H, Nq, D) q against (B, H_kv, Nk, D) k and v, H a multiple of H_kv."""
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in batch, heads and length: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must agree in batch and head_dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q's heads ({q.shape[1]}) must be a multiple of k's and v's ({k.shape[1]}) (GQA)")


def accumulation_dtype(dtype):
    """Where partial results and gradients add up: float64 stays, anything narrower adds in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_CALLS: dict[tuple, object] = {}
_CALLS_MAX = 256


def prepared(q, k, v, *, needs_grad: bool, causal: bool, window, scale, backend, features: dict):
    """(PreparedCall, Extras) for one block; calls without arrays among their features are cached by metadata.
    ``needs_grad`` asks for a plan with a backward."""
    arrays = any(isinstance(x, torch.Tensor) for x in features.values())
    key = None if arrays else (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, needs_grad,
                               causal, window, scale, backend, tuple(sorted(features.items())))
    hit = _CALLS.get(key) if key is not None else None
    if hit is not None:
        return hit
    # metadata stand-ins: the backward plan is made for arrays that require grad
    stand_in = [x.detach().requires_grad_(needs_grad) if x.is_floating_point() else x for x in (q, k, v)]
    found = api._prepare(*stand_in, causal=causal, scale=scale, backend=backend, window=window, **features)
    if key is not None:
        if len(_CALLS) >= _CALLS_MAX:
            _CALLS.clear()
        _CALLS[key] = found
    return found
