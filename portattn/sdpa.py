"""``scaled_dot_product_attention``: torch's SDPA signature and semantics, computed by portattn.

A drop-in for ``torch.nn.functional.scaled_dot_product_attention``: the same positional arguments,
the same shapes and the same meaning of every argument, so code written for SDPA can switch by
changing one import. It maps the call onto :func:`portattn.attention`:

* leading dims: query is ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``; the axis
  before L and S is the head axis and everything before it is batch. As in SDPA's math backend the
  leading dims broadcast against each other (a 3-D query with 4-D keys, a batch or head axis of 1);
  with ``enable_gqa=True`` key and value may have fewer heads than query, each a divisor of its
  head count (key and value need not have the same number).
* ``attn_mask`` of any shape that broadcasts to ``(..., L, S)``: bool (True = attend) or float
  (added to the scores), float32 or query's dtype, as SDPA takes. Passed through as a broadcast
  view, never expanded. A float mask that requires grad gets its gradient (``sdpa_mask_grad.py``).
  ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left``/``causal_lower_right``) is read as
  the causal flag with its alignment.
* ``is_causal``: top-left aligned, as SDPA; an error with ``attn_mask`` too, as SDPA's math backend.
* ``Ev != E``: value (or query and key) are zero-padded to the larger head dim, the scale kept at
  ``1/sqrt(E)``, and the output sliced back to Ev -- exact, since zero columns add nothing to q.k
  and give zero output columns. The same padding lifts a head dim below a named backend's smallest
  (Triton's 16) to it, so that SDPA's small head dims (8, 6, ...) run there too.
* ``dropout_p > 0``: dropped with portattn's counter-based generator on a seed drawn from torch's
  default generator (so ``torch.manual_seed`` makes it reproducible); applied whenever
  ``dropout_p > 0``, as SDPA (it has no notion of training mode). ``dropout_p == 1`` gives zeros.
* empty inputs (a batch, head or sequence axis of 0, or ``Ev == 0``) give an empty (or zero) result,
  as SDPA.

Errors are SDPA's: a refused call raises an exception that is both the ValueError/TypeError
portattn raises and a RuntimeError, the class SDPA raises, so ``except RuntimeError`` written for
torch keeps working.

A query row that sees no key (a fully masked row) gets zeros, as torch's CPU kernels give (torch 2.13's
flash and math); its CUDA kernels need not (NaN or other values), so that row is portattn's convention.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from . import arrays
from .api import _call_key, _traced, attention
from .backends import registry

_MIN_HEAD_DIM_OF_ANY = 16  # no backend asks for a larger smallest head dim (Triton's is 16)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend="auto"):
    """``softmax(query key^T * scale + mask) value`` with SDPA's exact conventions (module docstring);
    ``backend`` as in :func:`portattn.attention`. Returns an array of query's type, dtype and device
    with shape ``(..., L, Ev)`` (the leading dims broadcast over query, key and value)."""
    try:
        direct = _direct_key(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
        if direct is not None and (direct_scale := _DIRECT.get(direct)) is not None:
            return attention(query, key, value, causal=is_causal, scale=direct_scale, backend=backend)
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, direct)
    except (ValueError, TypeError) as error:
        if isinstance(error, RuntimeError):
            raise
        raise _sdpa_error(error).with_traceback(error.__traceback__) from None


# SDPA calls that come down to one plain ``attention`` call -- 4-D inputs of one batch and head dim, no mask, no
# dropout, key and value heads alike -- by their metadata (``_direct_key``), with the scale they get: a model's
# every step skips the mapping below (about 14 of a small CPU call's 50 us). Only calls that passed every check.
_DIRECT: dict[tuple, float] = {}
_DIRECT_MAX = 1024


def _direct_key(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend) -> tuple | None:
    """What the mapping of a call without mask or dropout depends on: ``attention``'s own call key (its arrays'
    metadata and scalar options) and ``enable_gqa``; None for any other call, and while torch.compile traces
    (which must not read a dict of shapes)."""
    if attn_mask is not None or not (type(dropout_p) is float or type(dropout_p) is int) or dropout_p != 0:
        return None
    if type(enable_gqa) is not bool or _traced(query):
        return None
    call_key = _call_key(query, key, value, is_causal, scale, backend, "bhnd")
    return None if call_key is None else (call_key, enable_gqa)


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, direct=None):
    attn_mask, is_causal, align = _causal_flag(attn_mask, is_causal)
    shapes = {"query": _shape(query, "query"), "key": _shape(key, "key"), "value": _shape(value, "value")}
    lead, kv_heads = _broadcast_dims(shapes, enable_gqa)
    if attn_mask is not None:
        _check_mask_dtype(attn_mask, query)
        if is_causal:
            raise ValueError("attn_mask and is_causal were both given (Explicit attn_mask should not be set when "
                             "is_causal=True, as SDPA's math backend says): fold the causal mask into attn_mask, or "
                             "drop attn_mask")
    dropout_p = _dropout_probability(dropout_p)
    head_dim, value_dim = shapes["query"][-1], shapes["value"][-1]
    out_shape = (*lead, shapes["query"][-2], value_dim)
    if math.prod(out_shape) == 0 or dropout_p == 1.0:
        return _zeros(out_shape, query, key, value)  # nothing to compute, or every weight dropped
    if scale is None:
        # of the caller's E, before any padding; with E == 0 every score is 0 whatever the scale
        scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    width = _kernel_width(max(head_dim, value_dim), backend)
    if direct is not None and _is_direct(shapes, width, lead):
        out = attention(query, key, value, causal=is_causal, scale=scale, backend=backend)
        if len(_DIRECT) >= _DIRECT_MAX:
            _DIRECT.clear()
        _DIRECT[direct] = scale  # after the call: only a call attention took is remembered
        return out
    q, k, v = _as_bhnd(query, key, value, shapes, lead, kv_heads)
    q, k, v = pad_last(q, width), pad_last(k, width), pad_last(v, width)
    seed = _dropout_seed() if dropout_p > 0 else None
    mask_grad = _mask_requires_grad(attn_mask)
    if mask_grad and dropout_p > 0:
        raise ValueError("attn_mask requires grad and dropout_p > 0: portattn's dropout mask is drawn in its kernels, "
                         "so the mask gradient cannot be formed outside them; pass dropout_p=0.0 or attn_mask.detach()")
    folded = _mask(attn_mask.detach() if mask_grad else attn_mask, lead)
    out = attention(q, k, v, causal=bool(is_causal), scale=scale, backend=backend, attn_mask=folded, align=align,
                    dropout_p=dropout_p, dropout_seed=seed)
    if value_dim < width:
        out = out[..., :value_dim]
    out = out.reshape(out_shape)
    if mask_grad:
        from .sdpa_mask_grad import with_mask_grad

        out = with_mask_grad(out, attn_mask, query, key, value, scale)
    return out


def _is_direct(shapes: dict, width: int, lead: tuple[int, ...]) -> bool:
    """Whether the arrays go to ``attention`` as they are: 4-D, query's leading dims the result's, key's and
    value's of query's batch and one head count (GQA's fewer heads are attention's own), no head dim padded."""
    q, k, v = shapes["query"], shapes["key"], shapes["value"]
    return (len(q) == len(k) == len(v) == 4 and q[:2] == lead and q[0] == k[0] == v[0] and k[1] == v[1]
            and q[-1] == v[-1] == width)


def _shape(x, name: str) -> tuple[int, ...]:
    """An array's shape, read directly (this runs on every call); ``arrays.describe`` names the argument
    and what would work when ``x`` is not an array. ``attention`` checks the arrays themselves."""
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else tuple(arrays.describe(x, name).shape)


def _causal_flag(attn_mask, is_causal):
    """(attn_mask, is_causal, align): SDPA's bool flag checked, and a ``CausalBias`` mask read as the causal
    flag with its alignment (upper left = SDPA's ``is_causal``, lower right = the KV-cache convention)."""
    if not isinstance(is_causal, (bool, np.bool_)):  # SDPA's argument parser refuses 1, None, ...
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__} {is_causal!r}")
    bias_module = sys.modules.get("torch.nn.attention.bias")  # loaded wherever a CausalBias exists
    if bias_module is None or not isinstance(attn_mask, bias_module.CausalBias):
        return attn_mask, bool(is_causal), "top-left"
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True (as SDPA): the bias is the causal mask")
    lower_right = attn_mask.variant == bias_module.CausalVariant.LOWER_RIGHT
    return None, True, "bottom-right" if lower_right else "top-left"


def _broadcast_dims(shapes: dict, enable_gqa: bool) -> tuple[tuple[int, ...], int | None]:
    """(the result's leading dims, the key/value head count the kernels get): SDPA's math backend
    broadcasts the dims before (L, E) like matmul, after repeating key/value heads for ``enable_gqa``."""
    q, k, v = shapes["query"], shapes["key"], shapes["value"]
    for name, shape in shapes.items():
        if len(shape) < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., sequence, head_dim), got shape {shape}")
    if q[-1] != k[-1]:
        raise ValueError(f"query and key must share the head dim E (the last dim): got {q[-1]} and {k[-1]}")
    if k[-2] != v[-2]:
        raise ValueError(f"key {k} and value {v} must have the same sequence length S (dim -2)")
    kv_heads = _gqa_heads(q, k, v) if enable_gqa else None
    lead_k, lead_v = k[:-2], v[:-2]
    if kv_heads is not None:  # as SDPA: key and value repeated to query's heads, then broadcast
        lead_k, lead_v = lead_k[:-1] + q[-3:-2], lead_v[:-1] + q[-3:-2]
    try:
        lead = tuple(np.broadcast_shapes(q[:-2], lead_k, lead_v))
    except ValueError:
        hint = ("; pass enable_gqa=True for grouped-query attention (fewer key/value heads), as SDPA requires"
                if not enable_gqa and len(q) >= 3 and len(k) >= 3 and q[-3] != k[-3] else "")
        raise ValueError(f"the leading dims of query {q}, key {k} and value {v} do not broadcast (all but the last "
                         f"two; dim -3 is the head axis){hint}") from None
    return lead, kv_heads


def _gqa_heads(q, k, v) -> int | None:
    """The key/value head count for ``enable_gqa=True``: None where no head is shared (equal counts or no
    head axis), else the least common multiple of key's and value's counts, which divides query's."""
    if min(len(q), len(k), len(v)) < 3 or q[-3] == k[-3] == v[-3]:
        return None
    if q[-3] % k[-3] or q[-3] % v[-3]:
        raise ValueError(f"enable_gqa=True needs query heads ({q[-3]}) to be a multiple of key heads ({k[-3]}) and "
                         f"of value heads ({v[-3]}), as SDPA requires")
    return math.lcm(k[-3], v[-3])


def _check_mask_dtype(attn_mask, query) -> None:
    """SDPA takes a bool mask, a float32 one, or one of query's dtype; any other float would be silently
    cast by portattn, so it is refused as SDPA refuses it."""
    mask_dtype, query_dtype = str(getattr(attn_mask, "dtype", "")), str(getattr(query, "dtype", ""))
    if mask_dtype.endswith(("bool", "float32")) or mask_dtype == query_dtype:
        return
    raise TypeError(f"attn_mask has dtype {mask_dtype} and query {query_dtype}: SDPA takes an attn_mask of dtype bool "
                    "(True = attend), float32 or query's dtype (added to the scores)")


def _dropout_probability(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, np.floating, np.integer)):
        raise TypeError(f"dropout_p must be a number, got {type(dropout_p).__name__} {dropout_p!r}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be a probability in [0, 1], got {dropout_p}")
    return float(dropout_p)


def _zeros(shape: tuple[int, ...], query, key, value):
    """Zeros of the result's shape, query's type, dtype and device; connected to the inputs that require grad
    (with zero gradients), as SDPA's result for an empty call or ``dropout_p == 1``."""
    if not arrays.is_torch(query):
        return (_array_module(query)).zeros(shape, dtype=query.dtype)
    import torch

    out = torch.zeros(shape, dtype=query.dtype, device=query.device)
    inputs = [x for x in (query, key, value) if x.requires_grad]
    if inputs and torch.is_grad_enabled():
        out = out + sum(x.sum() for x in inputs) * 0  # zero gradients, not "does not require grad"
    return out


def _array_module(x):
    return sys.modules["cupy"] if arrays.is_cupy(x) else np


def _as_bhnd(query, key, value, shapes: dict, lead: tuple[int, ...], kv_heads: int | None):
    """query, key and value as (B, H, N, D) with the leading dims broadcast to ``lead`` (a view where they
    already are; broadcasting an axis copies only when the fold into B needs it) and key/value with
    ``kv_heads`` heads under GQA."""
    batch, heads = lead[:-1], (lead[-1] if lead else 1)
    folded = []
    for name, x in (("query", query), ("key", key), ("value", value)):
        shape = shapes[name]
        x_heads = heads if name == "query" or kv_heads is None else kv_heads
        if name != "query" and kv_heads is not None and shape[-3] != kv_heads:
            x = _repeat_heads(x, kv_heads // shape[-3])
        target = (*batch, x_heads, *shape[-2:]) if lead else shape
        if tuple(x.shape) != target:
            x = arrays.broadcast_view(x, target)
        folded.append(x if len(target) == 4 else x.reshape(math.prod(batch), x_heads, *shape[-2:]))
    return folded


def _kernel_width(width: int, backend) -> int:
    """The head dim the kernels get: ``width`` (the larger of E and Ev), zero-padded up to a named backend's
    smallest (Triton's: its tl.dot takes 16 and up), as SDPA takes any E -- exact, as for Ev != E."""
    if width >= _MIN_HEAD_DIM_OF_ANY or not isinstance(backend, str) or backend.strip().lower() == "auto":
        return width  # auto picks a backend that takes this head dim
    backends = registry()
    name = backend.strip().lower()
    return max(width, backends[name].capabilities.min_head_dim) if name in backends else width


def _repeat_heads(x, times: int):
    """Each head of ``x`` (dim -3) repeated ``times`` times in place, as SDPA's ``enable_gqa`` does."""
    return x.repeat_interleave(times, dim=-3) if arrays.is_torch(x) else x.repeat(times, axis=-3)


def _mask_requires_grad(attn_mask) -> bool:
    if not getattr(attn_mask, "requires_grad", False):
        return False
    return sys.modules["torch"].is_grad_enabled()


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


_ERROR_TYPES: dict[type, type] = {}


def _sdpa_error(error: Exception) -> Exception:
    """``error`` as an instance of a class that is both its own and RuntimeError: SDPA raises RuntimeError
    for what portattn refuses with ValueError or TypeError, and code written for either catches it."""
    base = type(error)
    if base not in _ERROR_TYPES:
        _ERROR_TYPES[base] = type(f"SDPA{base.__name__}", (base, RuntimeError), {"__module__": __name__})
    return _ERROR_TYPES[base](*error.args)
