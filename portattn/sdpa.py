"""``scaled_dot_product_attention``: torch's SDPA signature and semantics, computed by portattn.

A drop-in for ``torch.nn.functional.scaled_dot_product_attention``: the same positional arguments,
the same shapes and the same meaning of every argument, so code written for SDPA can switch by
changing one import. It maps the call onto :func:`portattn.attention`:

* leading dims: query is ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``; the axis
  before L and S is the head axis and everything before it is batch (a 2-D or 3-D input gets
  length-1 batch/head axes, as SDPA's math backend treats them). Key and value share query's batch
  dims; their head count may be smaller only with ``enable_gqa=True`` (as in SDPA).
* ``attn_mask`` of any shape that broadcasts to ``(..., L, S)``: bool (True = attend) or float
  (added to the scores). Passed through as a broadcast view, never expanded.
* ``is_causal``: top-left aligned, as SDPA; an error with ``attn_mask`` too, as SDPA.
* ``Ev != E``: value (or query and key) are zero-padded to the larger head dim, the scale kept at
  ``1/sqrt(E)``, and the output sliced back to Ev -- exact, since zero columns add nothing to q.k
  and give zero output columns.
* ``dropout_p > 0``: dropped with portattn's counter-based generator on a seed drawn from torch's
  default generator (so ``torch.manual_seed`` makes it reproducible); applied whenever
  ``dropout_p > 0``, as SDPA (it has no notion of training mode).

A query row that sees no key (a fully masked row) gets zeros, as torch's CPU kernels give (torch 2.13's
flash and math); its CUDA kernels need not (NaN or other values), so that row is portattn's convention.
"""

from __future__ import annotations

import math

import numpy as np

from . import arrays
from .api import attention


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend="auto"):
    """``softmax(query key^T * scale + mask) value`` with SDPA's exact conventions (module docstring);
    ``backend`` as in :func:`portattn.attention`. Returns an array of query's type, dtype and device
    with shape ``(..., L, Ev)``."""
    shapes = {"query": _shape(query, "query"), "key": _shape(key, "key"), "value": _shape(value, "value")}
    _check_shapes(shapes, enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal were both given; SDPA refuses that too: fold the causal mask into "
                         "attn_mask, or drop attn_mask")
    lead = shapes["query"][:-2]
    q, k, v = (_as_bhnd(x, shapes[name]) for name, x in (("query", query), ("key", key), ("value", value)))
    head_dim, value_dim = shapes["query"][-1], shapes["value"][-1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)  # of the caller's E, before any padding
    width = max(head_dim, value_dim)
    q, k, v = pad_last(q, width), pad_last(k, width), pad_last(v, width)
    seed = _dropout_seed() if dropout_p > 0 else None
    out = attention(q, k, v, causal=bool(is_causal), scale=scale, backend=backend, attn_mask=_mask(attn_mask, lead),
                    dropout_p=dropout_p, dropout_seed=seed)
    if value_dim < width:
        out = out[..., :value_dim]
    return out if len(lead) == 2 else out.reshape(*lead, shapes["query"][-2], value_dim)


def _shape(x, name: str) -> tuple[int, ...]:
    """An array's shape, read directly (this runs on every call); ``arrays.describe`` names the argument
    and what would work when ``x`` is not an array. ``attention`` checks the arrays themselves."""
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else tuple(arrays.describe(x, name).shape)


def _check_shapes(shapes: dict, enable_gqa: bool) -> None:
    q, k, v = shapes["query"], shapes["key"], shapes["value"]
    for name, shape in shapes.items():
        if len(shape) < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., sequence, head_dim), got shape {shape}")
    if not len(q) == len(k) == len(v):
        raise ValueError(f"query, key and value must have the same number of dims; got {q}, {k}, {v}")
    if k[:-1] != v[:-1]:
        raise ValueError(f"key {k} and value {v} must agree on every dim but the last (the value head dim)")
    if q[-1] != k[-1]:
        raise ValueError(f"query and key must share the head dim E (the last dim): got {q[-1]} and {k[-1]}")
    if q[:-3] != k[:-3]:
        raise ValueError(f"query {q} and key {k} must share their batch dims (all but the last three)")
    if len(q) >= 3 and q[-3] != k[-3]:
        if not enable_gqa:
            raise ValueError(f"query has {q[-3]} heads and key/value {k[-3]} (dim -3): pass enable_gqa=True for "
                             "grouped-query attention, as SDPA requires")
        if q[-3] % k[-3]:
            raise ValueError(f"enable_gqa=True needs query heads ({q[-3]}) to be a multiple of key/value heads ({k[-3]})")


def _as_bhnd(x, shape: tuple[int, ...]):
    """(..., N, D) as (B, H, N, D): the dim before N is the head axis, the rest flattened into batch."""
    if len(shape) == 4:
        return x  # (B, H, N, D) already
    heads = shape[-3] if len(shape) >= 3 else 1
    batch = math.prod(shape[:-3])
    return x.reshape(batch, heads, shape[-2], shape[-1])


def _mask(attn_mask, lead: tuple[int, ...]):
    """The mask with its leading dims folded like the inputs' (a broadcast view wherever possible)."""
    if attn_mask is None:
        return None
    shape = tuple(arrays.describe(attn_mask, "attn_mask").shape)
    if len(shape) <= 3 or len(lead) <= 2:
        return attn_mask  # it lines up with (B, H, L, S) from the right already
    if len(shape) > len(lead) + 2:
        raise ValueError(f"attn_mask has shape {shape}: more dims than the {len(lead) + 2} of query's scores {(*lead, '...')}")
    full = (1,) * (len(lead) + 2 - len(shape)) + shape
    batch_dims, rest = full[:-3], full[-3:]
    if all(n == 1 for n in batch_dims):
        return attn_mask.reshape(1, *rest)
    expanded = arrays.broadcast_view(attn_mask.reshape(full), (*lead[:-1], *rest))
    return expanded.reshape(math.prod(lead[:-1]), *rest)


def pad_last(x, width: int):
    """``x`` with zero columns appended to its last dim up to ``width`` (itself when already that wide)."""
    if x.shape[-1] == width:
        return x
    if arrays.is_torch(x):
        import torch.nn.functional as F

        return F.pad(x, (0, width - x.shape[-1]))
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def _dropout_seed() -> int:
    """A dropout seed from torch's default generator (reproducible under ``torch.manual_seed``)."""
    import torch

    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())
