"""The public entry points: ``attention``, ``explain`` and ``plan``.

Arrays in -> ``AttentionSpec`` (every check, before any kernel) -> backend chosen -> tile plan ->
the backend's kernels on its own array kind -> results back in the caller's type, dtype, device
and layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import arrays, dispatch
from .backends import Backend
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

    def forward(self, q, k, v):
        """(B, H, N, D) arrays of the caller's kind in; ``(out, lse)`` of that kind out.

        The LSE keeps the backend's precision (float64 for float64 inputs) so that the backward
        pass, which recomputes P from it, loses nothing; ``attention`` hands users float32.
        """
        out, lse = self.backend.forward(*self._to_backend(q, k, v), self.spec, self.plan)
        return self._to_caller(out, self.spec.dtype), self._to_caller(lse, None)

    def backward(self, grad_out, q, k, v, out, lse):
        grads = self.backend.backward(*self._to_backend(grad_out, q, k, v, out, lse), self.spec, self.plan)
        return tuple(self._to_caller(g, self.spec.dtype) for g in grads)


def prepare(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd") -> PreparedCall:
    dispatch.check_name(backend)
    spec = spec_from_arrays(q, k, v, causal=causal, scale=scale, layout=layout)
    chosen = dispatch.select(spec, backend)
    return PreparedCall(spec, chosen, chosen.plan(spec))


def attention(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd", return_lse=False, autotune=False):
    """Exact softmax attention, ``softmax(q k^T * scale) v``, computed tile by tile.

    ``q`` is (B, H, Nq, D) and ``k``, ``v`` are (B, H, Nk, D) -- or (B, N, H, D) with
    ``layout="bnhd"``. ``causal=True`` hides key j from query i when j > i (top-left aligned, as
    torch's ``is_causal``). ``scale`` defaults to 1/sqrt(D). numpy arrays, torch tensors and cupy
    arrays (through DLPack, without copies) are accepted and the result has the caller's type,
    dtype, device and layout; torch inputs that
    require grad get gradients from the backend's own backward kernel. With ``return_lse=True``
    the float32 log-sum-exp of the scaled scores, (B, H, Nq), is returned too. A query that sees no
    key gets zeros and an LSE of -inf. ``autotune=True`` runs the fastest tile configuration found
    by :func:`tune` for this device and shape, tuning first when none is remembered (opt-in: a
    default call runs the planner's plan and never times anything).
    """
    key = _call_key(q, k, v, causal, scale, backend, layout)
    call = _PREPARED.get(key) if key is not None else None
    if call is None:
        call = prepare(q, k, v, causal=causal, scale=scale, backend=backend, layout=layout)
        if key is not None:
            if len(_PREPARED) >= _PREPARED_MAX:
                _PREPARED.clear()
            _PREPARED[key] = call
    q, k, v = (arrays.bhnd_view(x, layout) for x in (q, k, v))
    if autotune:
        from . import tuning

        call = tuning.tuned_call(call, q, k, v)
    if call.spec.requires_grad and _grad_enabled():
        from .autograd import AttentionFunction

        out, lse = AttentionFunction.apply(q, k, v, call)
    else:
        out, lse = call.forward(q, k, v)
    out = arrays.bhnd_view(out, layout)
    return (out, arrays.restore(lse, call.spec.array_kind, "float32", call.spec.device)) if return_lse else out


def tune(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd", backward=False, save=True) -> TilePlan:
    """Time the configurations around the plan for these arrays and return (and remember) the fastest.

    Sweeps forward block sizes, warps and stages (and with ``backward=True`` the backward's blocks,
    warps, stages and fused-or-separate dQ) on the given arrays; the winner is kept per backend,
    device and problem -- in this process and in ``$PORTATTN_TUNE_CACHE`` (default
    ``~/.cache/portattn/tuned.json``) unless ``save=False`` -- and used by ``attention(...,
    autotune=True)``.
    """
    from . import tuning

    call = prepare(q, k, v, causal=causal, scale=scale, backend=backend, layout=layout)
    q, k, v = (arrays.bhnd_view(x, layout) for x in (q, k, v))
    return tuning.tune_call(call, q, k, v, backward=backward, save=save).plan


# Validated calls by their arguments' metadata: a repeated call (every step of a training loop) skips
# validation, backend choice and planning -- the checks depend on nothing else, so their verdict holds.
_PREPARED: dict[tuple, PreparedCall] = {}
_PREPARED_MAX = 1024


def _call_key(q, k, v, causal, scale, backend, layout) -> tuple | None:
    """What the checks, the backend choice and the plan depend on; None for arrays of other kinds
    (they take the full path, which also raises the errors for them)."""
    if not all(arrays.is_torch(x) for x in (q, k, v)):
        return None
    metas = tuple((x.shape, x.dtype, x.device, x.requires_grad) for x in (q, k, v))
    # the types too: causal=1 hashes like causal=True but must be refused, not served from the cache
    return (metas, causal, scale, backend, layout, type(causal), type(scale))


def _grad_enabled() -> bool:
    import torch  # only reached with torch tensors, so torch is already imported

    return torch.is_grad_enabled()


def explain(q, k, v, *, causal=False, scale=None, backend="auto", layout="bhnd", return_lse=False) -> dispatch.Explanation:
    """Which backend ``attention`` would use for these arguments, its tile plan, and why not the others."""
    dispatch.check_name(backend)
    spec = spec_from_arrays(q, k, v, causal=causal, scale=scale, layout=layout)
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
