"""Error bounds for the conformance suite, per input dtype, in one place.

Every backend is compared with the float64 reference run on the *same* inputs (already rounded to
the input dtype), so a bound only has to cover what the backend itself adds:

* the rounding of its result to the output dtype: one unit roundoff ``u`` of that dtype per
  element (u = 2^-11 for float16, 2^-8 for bfloat16, 2^-24 for float32);
* the accumulation error of its float32 (or float64) arithmetic: sums of up to N terms, whose
  error grows like sqrt(N) * u_compute in practice -- a few 1e-6 at N = 1000 in float32;
* the LSE is returned in float32 for every dtype, so it carries float32's rounding too;
* for gradients, the recomputed P and the rounded O that enters rowsum(dO * O): a few more ``u``;
* the conditioning of softmax itself: a perturbation dS of the scores changes P by about
  |dS| * P, and float32 scores of magnitude |S| carry dS ~ u_compute * |S|. That term matters
  only for the large-magnitude cases (|S| ~ 1e4 gives ~1e-3) and is added explicitly, scaled by
  the largest score of the case, rather than loosening every bound.

Errors are measured as max |x - ref| / max |ref| over the tensor (a normwise relative error), and
the LSE as max |lse - ref| / max(1, |ref|).
"""

from __future__ import annotations

from dataclasses import dataclass

UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
COMPUTE_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-24, "bfloat16": 2.0**-24}


@dataclass(frozen=True)
class Bound:
    out: float
    lse: float
    grad: float


def _bound(dtype: str, accumulation: float) -> Bound:
    u = UNIT_ROUNDOFF[dtype]
    # 4u for the output's own rounding plus headroom; gradients pass through two more roundings
    # (O and dO enter delta) and one more GEMM, hence 8u and a larger accumulation allowance.
    # the LSE is float32 whatever the input dtype, so it carries float32's rounding
    return Bound(out=4 * u + accumulation, lse=2 * UNIT_ROUNDOFF["float32"] + accumulation, grad=8 * u + 4 * accumulation)


BOUNDS = {
    "float64": _bound("float64", 1e-12),
    "float32": _bound("float32", 2e-5),  # the 1e-4 with margin to spare
    "float16": _bound("float16", 2e-5),
    "bfloat16": _bound("bfloat16", 2e-5),
}

CONDITIONING_FACTOR = 8  # times u_compute * max|S|: the softmax sensitivity term described above


def conditioning(dtype: str, max_abs_score: float) -> float:
    return CONDITIONING_FACTOR * COMPUTE_ROUNDOFF[dtype] * max_abs_score
