"""Partial attention results merged by their log-sum-exp.

Attention over keys ``K1 ∪ K2`` from the results over each part: with ``L = logaddexp(L1, L2)``,
``O = exp(L1 - L) O1 + exp(L2 - L) O2``. A row that sees no key in a part has ``L = -inf`` and
``O = 0`` there (portattn's convention); a row that sees no key in either part keeps ``O = 0`` and
``L = -inf`` -- the weights are taken against a finite stand-in for ``L`` so no ``-inf - -inf``
(NaN) is ever formed.
"""

from __future__ import annotations

import torch


def merge_into(out, lse, part_out, part_lse) -> None:
    """Fold ``(part_out, part_lse)`` into the running ``(out, lse)`` in place: (..., N, D) and (..., N),
    ``out`` and ``lse`` in the accumulation precision."""
    new = torch.logaddexp(lse, part_lse.to(lse.dtype))
    finite = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    out.mul_(torch.exp(lse - finite).unsqueeze(-1))
    out.add_(part_out.to(out.dtype) * torch.exp(part_lse.to(lse.dtype) - finite).unsqueeze(-1))
    lse.copy_(new)


def merge(outs, lses):
    """(O, L) of attention over the union of the key sets that gave ``outs`` (..., N, D) and ``lses`` (..., N)."""
    out = torch.zeros_like(outs[0], dtype=torch.promote_types(outs[0].dtype, torch.float32))
    lse = torch.full_like(lses[0], float("-inf"), dtype=torch.promote_types(lses[0].dtype, torch.float32))
    for o, l in zip(outs, lses):
        merge_into(out, lse, o, l)
    return out.to(outs[0].dtype), lse
