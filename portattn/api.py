"""The public entry points: ``attention``, ``explain`` and ``plan``.

Arrays in -> ``AttentionSpec`` (every check, before any kernel) -> backend chosen -> tile plan ->
the backend's kernels on its own array kind -> results back in the caller's type, dtype, device
and layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import arrays, dispatch
from . import extras as extras_mod
from .backends import Backend
from .extras import NONE, Extras
from .spec import AttentionSpec, default_dtype, spec_from_arrays
from .tiling import DeviceSpec, TilePlan, device_named
from .tiling import plan as make_plan


@dataclass(frozen=True)
class PreparedCall:
    """A validated call bound to a backend and its plan; converts arrays at the backend boundary."""

    spec: AttentionSpec
    backend: Backend
    plan: TilePlan

    def _to_backend(self, *xs):
        return [arrays.convert(x, self.backend.compute_kind, self.spec.device) for x in xs]

    def _to_caller(self, x, dtype: str | None):
        return arrays.restore(x, self.spec.array_kind, dtype, self.spec.device)

    def _extras_to_backend(self, extras: Extras) -> Extras:
        if extras is NONE:
            return extras
        return extras.map_arrays(lambda x: arrays.convert(x, self.backend.compute_kind, self.spec.device))

    def forward(self, q, k, v, extras: Extras = NONE):
        """(B, H, N, D) arrays of the caller's kind in; ``(out, lse)`` of that kind out.

        The LSE keeps the backend's precision (float64 for float64 inputs) so that the backward
        pass, which recomputes P from it, loses nothing; ``attention`` hands users float32.
        """
        out, lse = self.backend.forward(*self._to_backend(q, k, v), self.spec, self.plan, self._extras_to_backend(extras))
        return self._to_caller(out, self.spec.dtype), self._to_caller(lse, None)

    def backward(self, grad_out, q, k, v, out, lse, extras: Extras = NONE):
        grads = self.backend.backward(*self._to_backend(grad_out, q, k, v, out, lse), self.spec, self.plan,
                                      self._extras_to_backend(extras))
        return tuple(self._to_caller(g, self.spec.dtype) for g in grads)


# the keywords of ``attention`` that describe features; their arrays become ``Extras``
_EXTRA_ARRAYS = ("attn_mask", "alibi_slopes", "key_padding_mask", "block_mask", "dropout_seed")


def prepare(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd", **features) -> PreparedCall:
    return _prepare(q, k, v, causal=causal, scale=scale, backend=backend, layout=layout, **features)[0]


def _prepare(q, k, v, *, backend="auto", varlen=None, **options) -> tuple[PreparedCall, Extras]:
    """Every check of a call, then its backend and plan; ``varlen`` = (cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k) for packed sequences (q, k, v then (1, total, H, D) views)."""
    dispatch.check_name(backend)
    spec = spec_from_arrays(q, k, v, **options)
    cu = {}
    if varlen is not None:
        spec, cu = _varlen_spec(spec, *varlen)
    extras = extras_mod.from_arguments(spec, **{name: options.get(name) for name in _EXTRA_ARRAYS}, **cu)
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
    features = dict(align=align, window=window, attn_mask=attn_mask, alibi_slopes=alibi_slopes, softcap=softcap,
                    block_mask=block_mask, block_size=block_size, key_padding_mask=key_padding_mask,
                    dropout_p=dropout_p, dropout_seed=dropout_seed, device=device)
    plain = all(value is None for name, value in features.items() if name not in ("align", "dropout_p")) \
        and align == "top-left" and dropout_p == 0.0
    key = _call_key(q, k, v, causal, scale, backend, layout) if plain else None
    call = _PREPARED.get(key) if key is not None else None
    extras = NONE
    if call is None:
        call, extras = _prepare(q, k, v, causal=causal, scale=scale, backend=backend, layout=layout, **features)
        if key is not None:
            if len(_PREPARED) >= _PREPARED_MAX:
                _PREPARED.clear()
            _PREPARED[key] = call
    q, k, v = (arrays.bhnd_view(x, layout) for x in (q, k, v))
    if autotune:
        from . import tuning

        call = tuning.tuned_call(call, q, k, v, extras)
    out, lse = _run(call, q, k, v, extras)
    out = arrays.bhnd_view(out, layout)
    return (out, arrays.restore(lse, call.spec.array_kind, "float32", call.spec.device)) if return_lse else out


def _run(call: PreparedCall, q, k, v, extras: Extras):
    """The forward, through torch.autograd when the inputs require grad."""
    if call.spec.requires_grad and _grad_enabled():
        from .autograd import AttentionFunction

        return AttentionFunction.apply(q, k, v, call, extras)
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
    out, lse = _run(call, *(arrays.bhnd_view(x, "bnhd") for x in packed), extras)
    out = arrays.bhnd_view(out, "bnhd")[0]
    return (out, arrays.restore(lse, call.spec.array_kind, "float32", call.spec.device)[0]) if return_lse else out


def _varlen_spec(spec: AttentionSpec, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
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


def _call_key(q, k, v, causal, scale, backend, layout) -> tuple | None:
    """What the checks, the backend choice and the plan depend on, for torch tensors and pyopencl arrays
    (whose queue fixes the device); None for arrays of other kinds (they take the full path, which
    also raises the errors for them)."""
    if all(arrays.is_torch(x) for x in (q, k, v)):
        metas = tuple((x.shape, x.dtype, x.device, x.requires_grad) for x in (q, k, v))
    elif all(arrays.is_pyopencl(x) for x in (q, k, v)):
        metas = tuple((x.shape, x.dtype, x.queue) for x in (q, k, v))
    else:
        return None
    # the types too: causal=1 hashes like causal=True but must be refused, not served from the cache
    return (metas, causal, scale, backend, layout, type(causal), type(scale))


def _grad_enabled() -> bool:
    import torch  # only reached with torch tensors, so torch is already imported

    return torch.is_grad_enabled()


def explain(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd", return_lse=False,
            **features) -> dispatch.Explanation:
    """Which backend ``attention`` would use for these arguments (the same keywords), its tile plan,
    and why not the others -- including each backend's reasons for refusing a feature."""
    dispatch.check_name(backend)
    spec = spec_from_arrays(q, k, v, causal=causal, scale=scale, layout=layout, **features)
    extras_mod.from_arguments(spec, **{name: features.get(name) for name in _EXTRA_ARRAYS})
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
