"""``Extras``: the arrays a call's features need, beside the (array-free, hashable) ``AttentionSpec``.

The API validates and normalizes them once, before any kernel runs, so every backend receives the
same shapes whatever the caller passed:

* ``attn_mask``: (B, H, Nq, Nk), a broadcast *view* of what the caller gave (strides 0 on the
  broadcast axes, no copy); bool (True = attend) when ``spec.mask == "bool"``, else floats added to
  the scores (the caller's float dtype).
* ``alibi_slopes``: float32 (B, H), a broadcast view when the caller gave (H,).
* ``key_padding_mask``: bool (B, Nk), True for real keys.
* ``block_mask``: bool (B, H, ceil(Nq / block_q), ceil(Nk / block_k)) for ``spec.block_size`` =
  (block_q, block_k), a broadcast view.
* ``cu_seqlens_q`` / ``cu_seqlens_k``: int32 (B + 1,) row offsets of the packed sequences
  (``spec.varlen``); q, k, v then reach backends as (1, H, total, D) views of the packed rows.
* ``dropout_seed``: the int that, with the backend's counter-based generator, fixes the dropout mask.

The semantics every backend implements (and ``portattn.reference`` spells out in float64): query i
sits at key position ``p = i + spec.query_offset()``; key j is visible iff it exists (j < Nk of
its sequence), ``j <= p`` when causal, ``p - left <= j <= p + right`` inside a window, the key
padding, bool mask and block mask allow it, and its score is finite. The score is
``s = scale * q.k``, then ``softcap * tanh(s / softcap)``, then ``- slope * |p - j|`` (ALiBi), then
``+ attn_mask`` (additive). A row with no visible key gets O = 0 and LSE = -inf. Dropout keeps a
weight with probability 1 - p and scales it by 1 / (1 - p); the LSE is that of the undropped weights.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class Extras:
    attn_mask: Any = None
    alibi_slopes: Any = None
    key_padding_mask: Any = None
    block_mask: Any = None
    cu_seqlens_q: Any = None
    cu_seqlens_k: Any = None
    dropout_seed: int | None = None

    def arrays(self) -> dict[str, Any]:
        """The array fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "dropout_seed" and getattr(self, f.name) is not None}

    def map_arrays(self, convert) -> "Extras":
        """The same extras with every array passed through ``convert`` (e.g. to a backend's kind)."""
        return replace(self, **{name: convert(x) for name, x in self.arrays().items()})


NONE = Extras()


def from_arguments(spec, *, attn_mask=None, alibi_slopes=None, key_padding_mask=None, block_mask=None,
                   dropout_seed=None, cu_seqlens_q=None, cu_seqlens_k=None) -> Extras:
    """Check the feature arrays against ``spec`` (made by ``spec_from_arrays`` from the same
    arguments) and return them as ``Extras``, broadcast to the shapes backends take. Every failure
    names the argument and the shapes that would work."""
    from . import arrays

    b, h, nq, nk = spec.batch, spec.heads, spec.seqlen_q, spec.seqlen_k
    found = {}
    if attn_mask is not None:
        found["attn_mask"] = arrays.broadcast_view(
            attn_mask, _broadcast_shape("attn_mask", attn_mask, (b, h, nq, nk), "(Nq, Nk), (1 or B, 1 or H, Nq, Nk)"))
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


def _broadcast_shape(name: str, x, target: tuple[int, ...], accepted: str) -> tuple[int, ...]:
    shape = tuple(x.shape)
    ok = 2 <= len(shape) <= 4 and all(got in (1, want) for got, want in zip(shape[::-1], target[::-1]))
    if not ok or shape[-2:] != target[-2:]:
        raise ValueError(f"{name} has shape {shape}; it must broadcast to {target}: give {accepted}")
    return target
