"""The input path: the caller's arrays and keywords in, a validated ``AttentionSpec`` and its ``Extras`` out.

Every check of a call happens here, before any backend or kernel sees it: q, k, v (through
:mod:`portattn.arrays`, which reads shapes, dtypes and devices of any array kind), the options, the
feature arrays (broadcast to the shapes backends take) and packed-sequence offsets. Each failure
names the argument at fault and what would have worked.

``FEATURE_KEYWORDS`` is the one list of the feature keywords of ``portattn.attention`` with their
defaults; ``explain``, ``tune`` and the varlen and SDPA entry points pass them through by name.
"""

from __future__ import annotations

from . import arrays
from .extras import NONE, Extras
from .spec import DEFAULT_BLOCK_SIZE, DTYPES, LAYOUTS, WINDOW_UNBOUNDED_FROM, AttentionSpec

# The keywords of ``attention`` beyond q, k, v and the core options, with their defaults
FEATURE_KEYWORDS = {
    "align": "top-left",
    "window": None,
    "attn_mask": None,
    "alibi_slopes": None,
    "softcap": None,
    "block_mask": None,
    "block_size": None,
    "key_padding_mask": None,
    "dropout_p": 0.0,
    "dropout_seed": None,
    "device": None,
}
# those that are arrays (or the seed) and travel in ``Extras`` rather than the spec
EXTRA_ARRAYS = ("attn_mask", "alibi_slopes", "key_padding_mask", "block_mask", "dropout_seed")


def check_feature_names(features: dict) -> None:
    unknown = sorted(set(features) - set(FEATURE_KEYWORDS))
    if unknown:
        raise TypeError(f"unknown keyword argument(s) {', '.join(map(repr, unknown))}; the feature keywords are "
                        + ", ".join(FEATURE_KEYWORDS))


def read_call(q, k, v, *, varlen=None, **options) -> tuple[AttentionSpec, Extras]:
    """The spec and extras of one call; ``varlen`` = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k) for packed sequences (q, k, v then (1, total, H, D) views)."""
    spec = spec_from_arrays(q, k, v, **options)
    offsets = {}
    if varlen is not None:
        spec, offsets = varlen_spec(spec, *varlen)
    extras = extras_from_arguments(spec, **{name: options.get(name) for name in EXTRA_ARRAYS}, **offsets)
    return spec, extras


def spec_from_arrays(q, k, v, *, causal: bool = False, scale: float | None = None, layout: str = "bhnd",
                     align: str = "top-left", window=None, attn_mask=None, alibi_slopes=None, softcap=None,
                     block_mask=None, block_size=None, key_padding_mask=None, dropout_p: float = 0.0,
                     dropout_seed=None, device: str | None = None) -> AttentionSpec:
    """Validate ``q``, ``k``, ``v`` and the options together; return the spec of the call.

    The feature arrays are only looked at for their kind, device and dtype here (a bool
    ``attn_mask`` masks, a float one is added); ``extras_from_arguments`` checks their shapes and
    ``dropout_seed``, which is accepted here only so that one set of keywords serves both.
    Raises ``TypeError`` for unsupported array types or dtypes and ``ValueError`` for everything
    else, each naming the argument and what would work.
    """
    if not isinstance(layout, str) or layout not in LAYOUTS:
        known = "; ".join(f"{name!r} {meaning}" for name, meaning in LAYOUTS.items())
        raise ValueError(f"unknown layout {layout!r}; use {known}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    infos = {name: arrays.describe(x, name) for name, x in (("q", q), ("k", k), ("v", v))}
    _check_same(infos, "kind", "array types", "pass q, k and v as the same kind of array")
    _check_same(infos, "device", "devices", "move them to one device")
    _check_same(infos, "dtype", "dtypes", "cast them to one dtype")
    for name, info in infos.items():
        if len(info.shape) != 4:
            raise ValueError(f"{name} must be 4-D {LAYOUTS[layout]}, got shape {info.shape} ({len(info.shape)}-D); "
                             "portattn.scaled_dot_product_attention takes SDPA's other ranks (2-D, 3-D, 5-D, ...)")
    batch, heads, seqlen_q, head_dim = _bhnd(infos["q"].shape, layout)
    kb, kh, seqlen_k, kd = _bhnd(infos["k"].shape, layout)
    vb, vh, vn, vd = _bhnd(infos["v"].shape, layout)
    axis = {"bhnd": "(B, H, N, D)", "bnhd": "(B, N, H, D)"}[layout]
    for what, qs, ks, vs in (("batch size B", batch, kb, vb), ("head dim D", head_dim, kd, vd)):
        if not qs == ks == vs:
            raise ValueError(f"q, k and v must share the {what} in layout {layout!r} {axis}: got {qs}, {ks}, {vs}")
    if kh != vh:
        raise ValueError(f"k and v must have the same number of heads in layout {layout!r} {axis}: got {kh} and {vh}")
    if vn != seqlen_k:
        raise ValueError(f"k and v must have the same sequence length: k has {seqlen_k} keys, v has {vn} values")
    if batch == 0 or heads == 0 or head_dim == 0:
        raise ValueError(f"q has an empty batch, head or head_dim axis (shape {infos['q'].shape}); B, H and D must be >= 1")
    if kh == 0:
        raise ValueError(f"k and v have 0 heads (k has shape {infos['k'].shape}, v {infos['v'].shape}); they need >= 1 head")
    dtype = infos["q"].dtype
    if dtype not in DTYPES:
        raise TypeError(f"q, k, v have dtype {dtype}; portattn takes {', '.join(DTYPES)}")
    mask_kind = None
    if attn_mask is not None:
        info = _companion("attn_mask", attn_mask, infos["q"])
        if info.dtype == "bool":
            mask_kind = "bool"
        elif info.dtype in DTYPES:
            mask_kind = "additive"
        else:
            raise TypeError(f"attn_mask has dtype {info.dtype}; give bool (True = attend) or a float dtype (added to the scores)")
    for name, x, wanted in (("alibi_slopes", alibi_slopes, "float"), ("key_padding_mask", key_padding_mask, "bool"),
                            ("block_mask", block_mask, "bool")):
        if x is not None:
            info = _companion(name, x, infos["q"])
            if (wanted == "bool") != (info.dtype == "bool") or (wanted == "float" and info.dtype not in DTYPES):
                raise TypeError(f"{name} must be a {wanted} array, got dtype {info.dtype}")
    if block_size is not None and block_mask is None:
        raise ValueError("block_size was given without block_mask; pass block_mask (True = compute the block)")
    if device is not None and infos["q"].kind == "pyopencl" and device not in ("opencl", infos["q"].device):
        raise ValueError(f"device={device!r} but q, k, v are pyopencl arrays on {infos['q'].device}: they are computed "
                         "where they live; drop device= or move them there")
    return AttentionSpec(
        batch=batch,
        heads=heads,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=head_dim,
        dtype=dtype,
        causal=causal,
        scale=None if scale is None else _as_scale(scale),
        layout=layout,
        device=infos["q"].device,
        array_kind=infos["q"].kind,
        requires_grad=any(info.requires_grad for info in infos.values()),
        kv_heads=kh,
        align=align,
        window=_as_window(window),
        mask=mask_kind,
        alibi=alibi_slopes is not None,
        softcap=None if softcap is None else _as_number("softcap", softcap),
        block_size=None if block_mask is None else _as_block_size(block_size),
        key_padding=key_padding_mask is not None,
        dropout_p=_as_number("dropout_p", dropout_p),
        compute_device=device,
    )


def _companion(name: str, x, q_info):
    """A feature array must be the same kind of array as q, on q's device, and not require grad: the
    kernels differentiate q, k and v only, so a float mask or ALiBi slopes would silently get none."""
    info = arrays.describe(x, name)
    if info.kind != q_info.kind or info.device != q_info.device:
        raise ValueError(f"{name} is a {info.kind} array on {info.device} but q is a {q_info.kind} array on "
                         f"{q_info.device}; pass it as the same kind of array on the same device")
    if info.requires_grad:
        raise ValueError(f"{name} requires grad, but portattn's backward kernels give gradients for q, k and v only "
                         f"(not for {name}): pass {name}.detach(), or use torch's scaled_dot_product_attention "
                         "for a learned bias")
    return info


def _as_window(window):
    """(left, right) with None or -1 (flash-attention's convention) for an unbounded side."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be (left, right), e.g. (256, 0); got {window!r}")
    # -1 is flash-attention's "unbounded"; so is any side long enough to reach every key (and no int32
    # arithmetic in a kernel can overflow on it)
    return tuple(None if side is None or (isinstance(side, int) and not isinstance(side, bool)
                                          and (side == -1 or side >= WINDOW_UNBOUNDED_FROM)) else side
                 for side in window)


def _as_block_size(block_size):
    if block_size is None:
        return DEFAULT_BLOCK_SIZE
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        return (block_size, block_size)
    return tuple(block_size) if isinstance(block_size, (tuple, list)) else block_size


def _as_number(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _as_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a finite number or None (for 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def _bhnd(shape: tuple[int, ...], layout: str) -> tuple[int, int, int, int]:
    b, x, y, d = shape
    return (b, x, y, d) if layout == "bhnd" else (b, y, x, d)


def _check_same(infos: dict, field: str, what: str, fix: str) -> None:
    values = {name: getattr(info, field) for name, info in infos.items()}
    if len(set(values.values())) > 1:
        listed = ", ".join(f"{name}: {value}" for name, value in values.items())
        raise (TypeError if field in ("kind", "dtype") else ValueError)(f"q, k and v have different {what} ({listed}); {fix}")


def extras_from_arguments(spec, *, attn_mask=None, alibi_slopes=None, key_padding_mask=None, block_mask=None,
                   dropout_seed=None, cu_seqlens_q=None, cu_seqlens_k=None) -> Extras:
    """Check the feature arrays against ``spec`` (made by ``spec_from_arrays`` from the same
    arguments) and return them as ``Extras``, broadcast to the shapes backends take. Every failure
    names the argument and the shapes that would work."""
    b, h, nq, nk = spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k
    found = {}
    if attn_mask is not None:
        found["attn_mask"] = arrays.broadcast_view(
            attn_mask, _broadcast_shape("attn_mask", attn_mask, (b, h, nq, nk),
                                        "any shape that broadcasts as SDPA's does, e.g. (Nq, Nk), (Nk,), (B, 1, 1, Nk) "
                                        "or (1 or B, 1 or H, Nq, Nk)", trailing_exact=False))
    if alibi_slopes is not None:
        shape = tuple(alibi_slopes.shape)
        if shape not in ((h,), (b, h)):
            raise ValueError(f"alibi_slopes must be (H,) = ({h},) or (B, H) = ({b}, {h}), one slope per head; got {shape}")
        found["alibi_slopes"] = arrays.broadcast_view(alibi_slopes, (b, h))
    if key_padding_mask is not None:
        shape = tuple(key_padding_mask.shape)
        if shape != (b, nk):
            raise ValueError(f"key_padding_mask must be (B, Nk) = ({b}, {nk}), True for real keys; got {shape}")
        found["key_padding_mask"] = key_padding_mask
    if block_mask is not None:
        block_q, block_k = spec.block_size
        blocks = (b, h, -(-nq // block_q), -(-nk // block_k))
        found["block_mask"] = arrays.broadcast_view(block_mask, _broadcast_shape(
            "block_mask", block_mask, blocks, f"(ceil(Nq/{block_q}), ceil(Nk/{block_k})) = {blocks[2:]}, or with leading "
            f"(1 or B, 1 or H) axes, for block_size {spec.block_size}"))
    if cu_seqlens_q is not None:
        found["cu_seqlens_q"], found["cu_seqlens_k"] = cu_seqlens_q, cu_seqlens_k
    if spec.dropout_p > 0:
        if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int) or not 0 <= dropout_seed < 2**31:
            raise ValueError(f"dropout_p = {spec.dropout_p} needs dropout_seed, an int in [0, 2**31) that fixes the mask "
                             f"(the backward applies the same one); got {dropout_seed!r}")
        found["dropout_seed"] = dropout_seed
    return Extras(**found) if found else NONE  # NONE by identity: backends take their fast path


def _broadcast_shape(name: str, x, target: tuple[int, ...], accepted: str, trailing_exact: bool = True) -> tuple[int, ...]:
    """``target`` when ``x`` broadcasts to it by numpy's rule (trailing axes of size 1 or the target's);
    ``trailing_exact``: its last two axes must be given in full (a block mask names every block)."""
    shape = tuple(x.shape)
    ok = len(shape) <= len(target) and all(got in (1, want) for got, want in zip(shape[::-1], target[::-1]))
    if trailing_exact:
        ok = ok and len(shape) >= 2 and shape[-2:] == target[-2:]
    if not ok:
        raise ValueError(f"{name} has shape {shape}; it must broadcast to {target}: give {accepted}")
    return target


def varlen_spec(spec: AttentionSpec, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """The spec of a packed call (batch = sequences, lengths = the longest) and its checked offsets."""
    totals = {"cu_seqlens_q": spec.seqlen_q, "cu_seqlens_k": spec.seqlen_k}
    lengths = {}
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        info = arrays.describe(cu, name)
        if info.kind != spec.array_kind or info.device != spec.device:
            raise ValueError(f"{name} is a {info.kind} array on {info.device}; pass it like q ({spec.array_kind} on {spec.device})")
        if info.dtype != "int32" or len(info.shape) != 1 or info.shape[0] < 2:
            raise ValueError(f"{name} must be an int32 array of B + 1 offsets (0, len_0, len_0 + len_1, ...); "
                             f"got dtype {info.dtype}, shape {info.shape}")
        offsets = arrays.to_numpy(cu if info.device == "cpu" else cu.cpu() if arrays.is_torch(cu) else cu.get())
        steps = offsets[1:].astype("int64") - offsets[:-1]
        if offsets[0] != 0 or (steps < 0).any() or offsets[-1] != totals[name]:
            raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {totals[name]}; "
                             f"got {offsets.tolist()}")
        lengths[name] = int(steps.max())
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences: "
                         f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1}")
    for name, given, longest in (("max_seqlen_q", max_seqlen_q, lengths["cu_seqlens_q"]),
                                 ("max_seqlen_k", max_seqlen_k, lengths["cu_seqlens_k"])):
        if isinstance(given, bool) or not isinstance(given, int) or given < longest:
            raise ValueError(f"{name} must be an int >= the longest sequence ({longest}); got {given!r}")
    varlen = spec.with_(batch=cu_seqlens_q.shape[0] - 1, seqlen_q=max_seqlen_q, seqlen_k=max_seqlen_k, varlen=True)
    return varlen, {"cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
