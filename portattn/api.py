"""The public entry points: ``attention``, ``explain`` and ``plan``.

Arrays in -> ``AttentionSpec`` (every check, before any kernel) -> backend chosen -> tile plan ->
the backend's kernels on its own array kind -> results back in the caller's type, dtype, device
and layout.
"""

from __future__ import annotations

import sys

from . import arrays, dispatch, inputs
from .call import PreparedCall
from .devices import DeviceSpec, device_named
from .extras import NONE, Extras
from .spec import AttentionSpec, default_dtype
from .tiling import TilePlan
from .tiling import plan as make_plan


def prepare(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd", **features) -> PreparedCall:
    return _prepare(q, k, v, causal=causal, scale=scale, backend=backend, layout=layout, **features)[0]


def _prepare(q, k, v, *, backend="auto", varlen=None, **options) -> tuple[PreparedCall, Extras]:
    """Every check of a call, then its backend and plan; ``varlen`` = (cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k) for packed sequences (q, k, v then (1, total, H, D) views)."""
    backend = dispatch.check_name(backend)
    spec, extras = inputs.read_call(q, k, v, varlen=varlen, **options)
    chosen = dispatch.select(spec, backend)
    return PreparedCall(spec, chosen, chosen.plan(spec)), extras


def attention(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd", return_lse=False, autotune=False,
              align="top-left", window=None, attn_mask=None, alibi_slopes=None, softcap=None, block_mask=None,
              block_size=None, key_padding_mask=None, dropout_p=0.0, dropout_seed=None, device=None):
    """Exact softmax attention, ``softmax(q k^T * scale) v``, computed tile by tile.

    ``q`` is (B, H, Nq, D) and ``k``, ``v`` are (B, H_kv, Nk, D) -- or (B, N, H, D) with
    ``layout="bnhd"``; H a multiple of H_kv is GQA/MQA (K/V are never repeated in memory).
    ``scale`` defaults to 1/sqrt(D). numpy arrays, torch tensors and cupy arrays (through DLPack,
    without copies) are accepted and the result has the caller's type, dtype, device and layout;
    torch inputs that require grad get gradients from the backend's own backward kernel.

    Masking and scores (``portattn/extras.py`` has the exact semantics):

    * ``causal=True`` hides keys after each query's position; ``align`` says where queries sit:
      ``"top-left"`` (query i at key i, torch's ``is_causal``) or ``"bottom-right"`` (query i at
      key i + Nk - Nq, flash-attention's convention and what KV-cache decoding needs). The same
      positions serve ``window`` and ALiBi.
    * ``window=(left, right)``: only keys within ``left`` before and ``right`` after the query's
      position (None or -1: unbounded); combinable with ``causal``.
    * ``attn_mask`` as SDPA takes it: bool (True = attend) or float (added to the scores), of any
      shape that broadcasts to (B, H, Nq, Nk), e.g. (Nq, Nk) or (B, 1, Nq, Nk).
    * ``alibi_slopes`` (H,) or (B, H): ``-slope * |position - key|`` added in-kernel.
    * ``softcap``: scores become ``softcap * tanh(scores / softcap)`` (Gemma 2).
    * ``block_mask``: bool, one entry per ``block_size`` = (queries, keys) block (default
      (128, 128)), broadcastable to (B, H, ceil(Nq/bq), ceil(Nk/bk)); False blocks are never loaded.
    * ``key_padding_mask``: bool (B, Nk), True for real keys (padded batches).
    * ``dropout_p`` with ``dropout_seed``: the attention weights are dropped with the backend's
      counter-based generator; one seed gives one mask, and the backward applies the same one.

    ``device`` picks where host arrays (numpy, torch CPU) are computed by a backend that can move
    them, today ``backend="opencl"``: ``"opencl:P:D"`` as ``portattn info`` lists devices (default:
    ``$PORTATTN_OPENCL_DEVICE``, else the first OpenCL GPU, else the first OpenCL device).
    pyopencl arrays are computed on their own device and the result stays there.

    With ``return_lse=True`` the float32 log-sum-exp of the scores, (B, H, Nq), is returned too.
    A query that sees no key gets zeros and an LSE of -inf. ``autotune=True`` runs the fastest tile
    configuration found by :func:`tune` for this device and shape, tuning first when none is
    remembered (opt-in: a default call runs the planner's plan and never times anything).
    """
    if _traced(q):  # torch.compile / torch.export tracing, or fake tensors: the torch custom op (torch_ops.py)
        from .torch_ops import attention as traced_attention

        return traced_attention(q, k, v, causal=causal, scale=scale, backend=backend, layout=layout,
                                return_lse=return_lse, autotune=autotune, align=align, window=window,
                                attn_mask=attn_mask, alibi_slopes=alibi_slopes, softcap=softcap, block_mask=block_mask,
                                block_size=block_size, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                dropout_seed=dropout_seed, device=device)
    # a call is looked up by its arrays' metadata and its scalar options (every step of a model repeats them);
    # with no feature array (most calls) that is all, tested one by one: this runs on every call
    plain = (attn_mask is None and alibi_slopes is None and block_mask is None and block_size is None
             and key_padding_mask is None and dropout_seed is None and device is None and dropout_p == 0.0)
    key = _call_key(q, k, v, causal, scale, backend, layout, align, window, softcap)
    if key is not None and not plain:
        features_key = _features_key(q, attn_mask, alibi_slopes, key_padding_mask, block_mask, block_size, dropout_p,
                                     device)
        key = None if features_key is None else (key, features_key)
    call = _PREPARED.get(key) if key is not None else None
    extras = NONE
    if call is not None and not plain:  # checked once for these shapes; the arrays themselves are new each call
        extras = inputs.extras_from_arguments(call.spec, attn_mask=attn_mask, alibi_slopes=alibi_slopes,
                                              key_padding_mask=key_padding_mask, block_mask=block_mask,
                                              dropout_seed=dropout_seed)
    if call is None:
        # inputs.FEATURE_KEYWORDS names these (tests/api/test_api.py checks that the two agree); spelled out,
        # not read from locals(), which torch.compile cannot trace
        features = dict(align=align, window=window, attn_mask=attn_mask, alibi_slopes=alibi_slopes, softcap=softcap,
                        block_mask=block_mask, block_size=block_size, key_padding_mask=key_padding_mask,
                        dropout_p=dropout_p, dropout_seed=dropout_seed, device=device)
        call, extras = _prepare(q, k, v, causal=causal, scale=scale, backend=backend, layout=layout, **features)
        if key is not None:
            if len(_PREPARED) >= _PREPARED_MAX:
                _PREPARED.clear()
            _PREPARED[key] = call
    if layout != "bhnd":
        q, k, v = (arrays.bhnd_view(x, layout) for x in (q, k, v))
    if autotune:
        from . import tuning

        call = tuning.tuned_call(call, q, k, v, extras)
    out, lse = _run(call, q, k, v, extras, need_lse=return_lse)
    if layout != "bhnd":
        out = arrays.bhnd_view(out, layout)
    return (out, arrays.restore(lse, call.spec.array_kind, "float32", call.spec.device)) if return_lse else out


def _run(call: PreparedCall, q, k, v, extras: Extras, need_lse: bool = True):
    """The forward, through torch.autograd when the inputs require grad; ``(out, None)`` when no LSE is needed
    (neither asked for nor kept for a backward), which spares a backend writing it."""
    if call.spec.requires_grad and _grad_enabled():
        from .autograd import AttentionFunction

        return AttentionFunction.apply(q, k, v, call, extras)
    if not need_lse:
        return call.output(q, k, v, extras), None
    return call.forward(q, k, v, extras)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                     backend="auto", return_lse=False, align="top-left", window=None, alibi_slopes=None, softcap=None,
                     dropout_p=0.0, dropout_seed=None):
    """Attention over packed sequences, flash-attention's ``varlen`` convention.

    ``q`` is (total_q, H, D) and ``k``, ``v`` (total_k, H_kv, D): the rows of every sequence one
    after another. ``cu_seqlens_q``/``cu_seqlens_k`` are int32 (B + 1,) offsets, starting at 0 and
    ending at the totals, on q's device; ``max_seqlen_q``/``max_seqlen_k`` the longest sequence
    (they size the plan). Sequence b's queries attend to sequence b's keys only, with ``causal``,
    ``align``, ``window`` and ALiBi positions counted within the sequence. Returns (total_q, H, D)
    (and, with ``return_lse``, the float32 (H, total_q) LSE, as flash-attention)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        shape = tuple(arrays.describe(x, name).shape)
        if len(shape) != 3:
            raise ValueError(f"{name} must be 3-D (total, heads, head_dim) for attention_varlen, got shape {shape}")
    packed = [x[None] for x in (q, k, v)]  # (1, total, H, D): the bnhd layout of one long sequence
    call, extras = _prepare(*packed, causal=causal, scale=scale, backend=backend, layout="bnhd",
                            varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), align=align,
                            window=window, alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p,
                            dropout_seed=dropout_seed)
    out, lse = _run(call, *(arrays.bhnd_view(x, "bnhd") for x in packed), extras, need_lse=return_lse)
    out = arrays.bhnd_view(out, "bnhd")[0]
    return (out, arrays.restore(lse, call.spec.array_kind, "float32", call.spec.device)[0]) if return_lse else out


def tune(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd", backward=False, save=True,
         **features) -> TilePlan:
    """Time the configurations around the plan for these arrays and return (and remember) the fastest.

    Sweeps forward block sizes, warps and stages (and with ``backward=True`` the backward's blocks,
    warps, stages and fused-or-separate dQ) on the given arrays; the winner is kept per backend,
    device and problem -- in this process and in ``$PORTATTN_TUNE_CACHE`` (default
    ``~/.cache/portattn/tuned.json``) unless ``save=False`` -- and used by ``attention(...,
    autotune=True)``.
    """
    from . import tuning

    call, extras = _prepare(q, k, v, causal=causal, scale=scale, backend=backend, layout=layout, **features)
    q, k, v = (arrays.bhnd_view(x, layout) for x in (q, k, v))
    return tuning.tune_call(call, q, k, v, extras, backward=backward, save=save).plan


# Validated calls by their arguments' metadata: a repeated call (every step of a training loop) skips
# validation, backend choice and planning -- the checks depend on nothing else, so their verdict holds.
_PREPARED: dict[tuple, PreparedCall] = {}
_PREPARED_MAX = 1024
_SCALAR_TYPES = frozenset((bool, int, float, str, type(None)))  # arguments a call key can hold as they are


def _call_key(q, k, v, causal, scale, backend, layout, align="top-left", window=None, softcap=None) -> tuple | None:
    """What the checks, the backend choice and the plan depend on, for torch tensors and pyopencl arrays
    (whose queue fixes the device); None for arrays of other kinds (they take the full path, which
    also raises the errors for them)."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # None while another thread imports torch
    if tensor is not None and isinstance(q, tensor) and isinstance(k, tensor) and isinstance(v, tensor):
        metas = (q.shape, q.dtype, q.device, q.requires_grad, k.shape, k.dtype, k.device, k.requires_grad,
                 v.shape, v.dtype, v.device, v.requires_grad)  # flat: this runs on every call
    elif all(arrays.is_pyopencl(x) for x in (q, k, v)):
        metas = tuple((x.shape, x.dtype, x.queue) for x in (q, k, v))
    else:
        return None
    if not (type(causal) in _SCALAR_TYPES and type(scale) in _SCALAR_TYPES and type(backend) in _SCALAR_TYPES
            and type(layout) in _SCALAR_TYPES and type(align) in _SCALAR_TYPES and type(softcap) in _SCALAR_TYPES):
        return None  # e.g. a list where a flag belongs: the full path names the argument
    if window is not None:
        if type(window) is not tuple or len(window) != 2 or not all(type(side) in _SCALAR_TYPES for side in window):
            return None
        window = (window, type(window[0]), type(window[1]))
    # the types too: causal=1 hashes like causal=True but must be refused, not served from the cache
    return (metas, causal, scale, backend, layout, type(causal), type(scale), align, window, softcap, type(softcap))


def _features_key(q, attn_mask, alibi_slopes, key_padding_mask, block_mask, block_size, dropout_p,
                  device) -> tuple | None:
    """What the checks and the plan read of a call's features -- the feature arrays' metadata, ``block_size``,
    ``dropout_p`` and ``device`` -- for feature arrays of q's tensor type (None for any other call, which takes
    the full path). ``dropout_seed`` is not in it: ``extras_from_arguments`` checks it on every call."""
    if type(q).__module__.split(".", 1)[0] != "torch":
        return None  # pyopencl arrays (the other kind _call_key takes): their features take the full path
    metas = []
    for x in (attn_mask, alibi_slopes, key_padding_mask, block_mask):
        if x is None:
            metas.append(None)
        elif type(x) is type(q):
            metas.append((x.shape, x.dtype, x.device, x.requires_grad))
        else:
            return None
    if type(block_size) is tuple:
        if not all(type(side) is int for side in block_size):
            return None
    elif type(block_size) not in (int, type(None)):
        return None
    if type(dropout_p) not in (float, int) or type(device) not in _SCALAR_TYPES:
        return None
    return (*metas, block_size, type(block_size), dropout_p, device)


def _traced(q) -> bool:
    """True when ``q`` is a torch tensor that torch.compile or torch.export is tracing, a tensor subclass
    (a fake or functional tensor) or a meta tensor: then the call goes through the custom op
    ``portattn::attention_forward``, whose fake implementation checks the call and gives the results' shapes."""
    # a class defined in torch (torch.Tensor, Parameter, FakeTensor, ...): read off the type, which Dynamo
    # folds to a constant (not sys.modules: Dynamo would guard on that dict)
    if type(q).__module__.split(".", 1)[0] != "torch":
        return False
    import torch  # a torch tensor exists: torch is imported already

    return (torch.compiler.is_compiling() or type(q) is not torch.Tensor and type(q) is not torch.nn.Parameter
            or q.device.type == "meta")  # shapes only (a model on the meta device): the op's fake implementation


def _grad_enabled() -> bool:
    return sys.modules["torch"].is_grad_enabled()  # only reached with torch tensors, so torch is imported


def explain(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd", return_lse=False,
            **features) -> dispatch.Explanation:
    """Which backend ``attention`` would use for these arguments (the same keywords), its tile plan,
    and why not the others -- including each backend's reasons for refusing a feature."""
    dispatch.check_name(backend)
    spec, _ = inputs.read_call(q, k, v, causal=causal, scale=scale, layout=layout, **features)
    return dispatch.explain(spec, backend)


def plan(
    *,
    seqlen_q: int,
    head_dim: int,
    seqlen_k: int | None = None,
    batch: int = 1,
    heads: int = 16,
    dtype: str | None = None,
    causal: bool = False,
    device: str | DeviceSpec = "cpu",
) -> TilePlan:
    """The tile plan for a problem on a catalog device (``"h100"``, ``"v100"``, ...) or a live one
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"opencl:0:0"``). ``dtype`` defaults to float16 on GPUs
    and float32 on CPUs."""
    target = device if isinstance(device, DeviceSpec) else device_named(device)
    spec = AttentionSpec(
        batch=batch,
        heads=heads,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_q if seqlen_k is None else seqlen_k,
        head_dim=head_dim,
        dtype=dtype or default_dtype(target.kind),
        causal=causal,
    )
    return make_plan(spec, target)
