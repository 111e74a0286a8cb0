"""portattn as torch custom operators: ``portattn::attention_forward`` and ``portattn::attention_backward``.

What ``portattn.attention`` runs for torch tensors while ``torch.compile`` (or ``torch.export``) traces
it, and for tensor subclasses (fake tensors, functional tensors): Dynamo puts one opaque node in the
graph instead of tracing into validation, the backend registry or a backend's launcher (numba's
dispatcher, Triton's JIT, CuPy, pyopencl), which it cannot follow.

The operators take q, k, v already seen as (B, H, N, D) (the caller's layout is transposed back and
forth outside them, as views) and every option as a schema type::

    portattn::attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? alibi_slopes,
        Tensor? key_padding_mask, Tensor? block_mask, bool causal, float? scale, str backend, str layout,
        str align, SymInt[]? window, float? softcap, SymInt[]? block_size, float dropout_p,
        SymInt? dropout_seed, str? device, bool requires_grad, bool autotune) -> (Tensor out, Tensor lse)
    portattn::attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
        <the same masks and options>) -> (Tensor dq, Tensor dk, Tensor dv)

``window`` is (left, right) with -1 for an unbounded side; ``requires_grad`` says whether the plan
must have a backward (the tensors below autograd no longer say). Both operators re-derive the call's
``PreparedCall`` from their arguments through a cache keyed by the arguments' metadata (every check
runs on a miss; a hit is a dictionary lookup). ``out`` and the gradients are contiguous (B, H, ., D)
tensors of q's dtype, ``lse`` is (B, H, Nq) float32 (float64 for float64 inputs, which the backends
that take float64 compute in: the backward recomputes P from it). The fake (meta) implementations run
the same checks when the shapes are concrete, so a bad call fails while it is traced.

Autograd is registered on the forward operator (``register_autograd``); the backward operator's own
gradient raises ``NOT_TWICE``: portattn's backward kernels have no backward.
"""

from typing import Optional

import torch
from torch import Tensor

from . import dispatch, inputs
from .autograd import NOT_TWICE
from .call import PreparedCall
from .extras import NONE
from .spec import AttentionSpec

MASKS = ("attn_mask", "alibi_slopes", "key_padding_mask", "block_mask")
# the scalar options of the operators, in schema order after q, k, v and the masks
OPTIONS = ("causal", "scale", "backend", "layout", "align", "window", "softcap", "block_size", "dropout_p",
           "dropout_seed", "device", "requires_grad", "autotune")


@torch.library.custom_op("portattn::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor],
                      key_padding_mask: Optional[Tensor], block_mask: Optional[Tensor], causal: bool,
                      scale: Optional[float], backend: str, layout: str, align: str, window: Optional[list[int]],
                      softcap: Optional[float], block_size: Optional[list[int]], dropout_p: float,
                      dropout_seed: Optional[int], device: Optional[str], requires_grad: bool,
                      autotune: bool) -> tuple[Tensor, Tensor]:
    masks = (attn_mask, alibi_slopes, key_padding_mask, block_mask)
    options = (causal, scale, backend, layout, align, window, softcap, block_size, dropout_p, dropout_seed, device,
               requires_grad, autotune)
    call, extras = prepared(q, k, v, masks, options)
    out, lse = call.forward(q, k, v, extras)
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, attn_mask, alibi_slopes, key_padding_mask, block_mask, causal, scale, backend,
                            layout, align, window, softcap, block_size, dropout_p, dropout_seed, device, requires_grad,
                            autotune):
    masks = (attn_mask, alibi_slopes, key_padding_mask, block_mask)
    _check_traced(q, k, v, masks, (causal, scale, backend, layout, align, window, softcap, block_size, dropout_p,
                                   dropout_seed, device, requires_grad, autotune))
    batch, heads, seqlen_q, _ = q.shape
    out = q.new_empty((batch, heads, seqlen_q, v.shape[-1]))
    return out, q.new_empty((batch, heads, seqlen_q), dtype=_lse_dtype(q))


@torch.library.custom_op("portattn::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       attn_mask: Optional[Tensor], alibi_slopes: Optional[Tensor], key_padding_mask: Optional[Tensor],
                       block_mask: Optional[Tensor], causal: bool, scale: Optional[float], backend: str, layout: str,
                       align: str, window: Optional[list[int]], softcap: Optional[float],
                       block_size: Optional[list[int]], dropout_p: float, dropout_seed: Optional[int],
                       device: Optional[str], requires_grad: bool, autotune: bool) -> tuple[Tensor, Tensor, Tensor]:
    masks = (attn_mask, alibi_slopes, key_padding_mask, block_mask)
    options = (causal, scale, backend, layout, align, window, softcap, block_size, dropout_p, dropout_seed, device,
               requires_grad, autotune)
    call, extras = prepared(q, k, v, masks, options)
    grads = call.backward(grad_out, q, k, v, out, lse, extras)
    return tuple(g.contiguous() for g in grads)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, lse, *masks_and_options):
    return tuple(x.new_empty(x.shape) for x in (q, k, v))


def _setup_forward(ctx, inputs, output):
    q, k, v, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *rest[:len(MASKS)])
    ctx.options = tuple(rest[len(MASKS):])
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    # grad_lse is ignored: the LSE is returned for inspection and marked non-differentiable
    q, k, v, out, lse, *masks = ctx.saved_tensors
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, *masks, *ctx.options)
    return (dq, dk, dv) + (None,) * (len(MASKS) + len(OPTIONS))


def _backward_of_backward(ctx, *grads):
    raise RuntimeError(NOT_TWICE)


attention_forward.register_autograd(_backward, setup_context=_setup_forward)
attention_backward.register_autograd(_backward_of_backward, setup_context=lambda ctx, inputs, output: None)


def _lse_dtype(q) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# The call behind the operators' arguments

# PreparedCalls by the metadata of the operators' arguments (what every check and the plan depend on)
_CALLS: dict[tuple, PreparedCall] = {}
_CALLS_MAX = 1024


def _meta(x):
    return None if x is None else (x.shape, x.dtype, x.device)


def prepared(q, k, v, masks, options):
    """The ``PreparedCall`` and ``Extras`` of the operators' arguments: q, k, v as (B, H, N, D)
    tensors, the four optional mask tensors and the scalar ``options`` (``OPTIONS`` order)."""
    window, block_size = options[5], options[7]
    key = (q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device, *map(_meta, masks),
           *options[:5], None if window is None else tuple(window), options[6],
           None if block_size is None else tuple(block_size), *options[8:])
    call = _CALLS.get(key)
    if call is None:
        call = _prepare(q, k, v, masks, options)
        if len(_CALLS) >= _CALLS_MAX:
            _CALLS.clear()
        _CALLS[key] = call
    dropout_p, dropout_seed, autotune = options[8], options[9], options[12]
    extras = NONE
    if dropout_p or any(x is not None for x in masks):  # the arrays themselves change from call to call
        extras = inputs.extras_from_arguments(call.spec, **dict(zip(MASKS, masks)), dropout_seed=dropout_seed)
    if autotune:
        from . import tuning

        call = tuning.tuned_call(call, q, k, v, extras)
    return call, extras


def _prepare(q, k, v, masks, options) -> PreparedCall:
    """Every check of the call (as ``portattn.attention`` makes them), its backend and plan."""
    spec = _spec(q, k, v, masks, options)
    chosen = dispatch.select(spec, options[2])
    return PreparedCall(spec, chosen, chosen.plan(spec))


def _spec(q, k, v, masks, options) -> AttentionSpec:
    """The checks of the call that read no backend (all of them on the meta device, where none runs)."""
    (causal, scale, backend, layout, align, window, softcap, block_size, dropout_p, dropout_seed, device,
     requires_grad, _) = options
    dispatch.check_name(backend)
    if layout == "bnhd":  # the checks read the caller's layout
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    spec, _ = inputs.read_call(
        q, k, v, causal=causal, scale=scale, layout=layout, align=align,
        window=None if window is None else tuple(window), softcap=softcap,
        block_size=None if block_size is None else tuple(block_size), dropout_p=dropout_p,
        dropout_seed=dropout_seed, device=device, **dict(zip(MASKS, masks)))
    if spec.requires_grad != requires_grad:
        spec = spec.with_(requires_grad=requires_grad)
    return spec


def _check_traced(q, k, v, masks, options) -> None:
    """The fake implementation's checks: all of them when the sizes (and the options) are concrete;
    with symbolic sizes (dynamic shapes) they wait for the real call."""
    concrete = all(type(size) is int for x in (q, k, v, *masks) if x is not None for size in x.shape)
    concrete = concrete and not any(isinstance(value, torch.SymInt) for value in options) and not any(
        isinstance(side, torch.SymInt) for value in (options[5], options[7]) if value is not None for side in value)
    if concrete:
        (_spec if q.device.type == "meta" else _prepare)(q, k, v, masks, options)


# ------------------------------------------------------------------------------------------------
# portattn.attention's keywords -> the operators' arguments (what portattn.attention runs while traced)

def attention(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd", return_lse=False, autotune=False,
              **features):
    """``portattn.attention`` for torch tensors through ``portattn::attention_forward``; the same
    keywords, results and errors (type errors of the options raised before the operator sees them,
    the rest by its checks)."""
    inputs.check_feature_names(features)
    unknown = sorted(name for name in features if name not in inputs.FEATURE_KEYWORDS or name not in _FEATURES)
    if unknown:
        raise TypeError(f"portattn.attention under torch.compile does not take {', '.join(unknown)} yet")
    masks = tuple(_tensor_or_none(name, features.get(name), q) for name in MASKS)
    options = _options(causal, scale, backend, layout, **features)
    requires_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if layout == "bnhd":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out, lse = attention_forward(q, k, v, *masks, *options, requires_grad, bool(autotune))
    if layout == "bnhd":
        out = out.transpose(1, 2)
    return (out, lse.to(torch.float32)) if return_lse else out


_FEATURES = ("align", "window", "softcap", "block_size", "dropout_p", "dropout_seed", "device") + MASKS


def _tensor_or_none(name, x, q):
    if x is None or isinstance(x, torch.Tensor):
        return x
    raise ValueError(f"{name} is a {type(x).__module__}.{type(x).__name__} but q is a torch tensor; pass it as a "
                     "torch tensor on q's device")


def _options(causal, scale, backend, layout, *, align="top-left", window=None, softcap=None, block_size=None,
             dropout_p=0.0, dropout_seed=None, device=None, **masks):
    """The options as the operators' schema types, each refused with portattn's own error when its type
    is wrong (the values are checked by the operator, against the arrays)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    for name, value, optional in (("backend", backend, False), ("layout", layout, False), ("align", align, False),
                                  ("device", device, True)):
        if not isinstance(value, str) and not (optional and value is None):
            raise ValueError(f"{name} must be a string{' or None' if optional else ''}, got {value!r}")
    window = inputs._as_window(window)
    if window is not None:
        if not all(side is None or _is_int(side) for side in window):
            raise ValueError(f"window must be (left, right) with non-negative ints or None (unbounded) on each side, "
                             f"e.g. (256, 0); got {window!r}")
        window = [-1 if side is None else side for side in window]
    if block_size is not None:
        block_size = inputs._as_block_size(block_size)
        if not (isinstance(block_size, tuple) and len(block_size) == 2 and all(_is_int(b) for b in block_size)):
            raise ValueError(f"block_size must be (queries, keys), powers of two >= 16, e.g. (128, 128); got {block_size!r}")
        block_size = list(block_size)
    dropout_p = inputs._as_number("dropout_p", dropout_p)
    if not dropout_p:
        dropout_seed = None  # unused without dropout (and unchecked, as portattn.attention leaves it)
    elif dropout_seed is not None and not _is_int(dropout_seed):
        raise ValueError(f"dropout_p = {dropout_p} needs dropout_seed, an int in [0, 2**31) that fixes the mask "
                         f"(the backward applies the same one); got {dropout_seed!r}")
    return (causal, None if scale is None else inputs._as_scale(scale), backend, layout, align, window,
            None if softcap is None else inputs._as_number("softcap", softcap), block_size, dropout_p, dropout_seed,
            device)


def _is_int(x) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)
