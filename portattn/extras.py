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
padding, bool mask and block mask allow it, and its score is not -inf (an additive -inf hides it). The score is
``s = scale * q.k``, then ``softcap * tanh(s / softcap)``, then ``- slope * |p - j|`` (ALiBi), then
``+ attn_mask`` (additive). A row with no visible key gets O = 0 and LSE = -inf; a row with a NaN
score (a NaN in q, in a visible key, or in the additive mask) gets NaN in O and the LSE, never a
quiet zero. Dropout keeps a
weight with probability 1 - p and scales it by 1 / (1 - p); the LSE is that of the undropped weights.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
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
        return {name: x for name in ARRAY_FIELDS if (x := getattr(self, name)) is not None}

    def map_arrays(self, convert) -> "Extras":
        """The same extras with every array passed through ``convert`` (e.g. to a backend's kind). Built field by
        field, not by ``dataclasses.replace`` (which reads ``fields()``): a masked call runs this every time."""
        return Extras(*(None if (x := getattr(self, name)) is None else convert(x) for name in ARRAY_FIELDS),
                      dropout_seed=self.dropout_seed)


ARRAY_FIELDS = tuple(f.name for f in fields(Extras) if f.name != "dropout_seed")  # in field order


NONE = Extras()
