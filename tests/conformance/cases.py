"""The conformance cases: one list, with readable ids, built from the issue's checklist.

Lengths that are no multiple of any block (1, 17, 113, 1000), Nq != Nk both ways, head dims
16..256 (including 40, 80, 96, 111), causal and not, float32/float16/bfloat16 (and float64), rows
that see no key (Nk = 0), and scores near +-1e4.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    causal: bool
    dtype: str
    magnitude: str = "normal"  # "normal": N(0, 1) inputs; "large": integer inputs with |scores| ~ 1e4

    @property
    def id(self) -> str:
        short = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[self.dtype]
        n = f"{self.seqlen_q}" if self.seqlen_q == self.seqlen_k else f"{self.seqlen_q}q{self.seqlen_k}k"
        tag = "-large" if self.magnitude == "large" else ""
        return f"{short}-{'causal' if self.causal else 'full'}-{self.batch}x{self.heads}x{n}x{self.head_dim}{tag}"

    @property
    def longest(self) -> int:
        return max(self.seqlen_q, self.seqlen_k)


LENGTHS = [(1, 1), (17, 17), (113, 113), (1000, 1000), (17, 113), (113, 17), (1, 1000), (1000, 113)]
HEAD_DIMS = [16, 32, 40, 64, 80, 96, 111, 128, 256]
LOW_PRECISION = ["float32", "float16", "bfloat16"]


def _cases() -> list[Case]:
    cases = []
    for causal in (False, True):
        for seqlen_q, seqlen_k in LENGTHS:  # every length pair in every dtype, at d = 64
            for dtype in LOW_PRECISION:
                cases.append(Case(2, 3, seqlen_q, seqlen_k, 64, causal, dtype))
        for head_dim in HEAD_DIMS:  # every head dim, odd lengths, Nq != Nk
            for dtype in ("float32", "float16"):
                cases.append(Case(1, 2, 113, 77, head_dim, causal, dtype))
            cases.append(Case(1, 2, 77, 113, head_dim, causal, "bfloat16"))
        cases.append(Case(1, 2, 113, 113, 64, causal, "float64"))
        for dtype in LOW_PRECISION:
            cases.append(Case(1, 2, 33, 0, 64, causal, dtype))  # no keys: every row fully masked
            cases.append(Case(1, 2, 113, 113, 64, causal, dtype, "large"))
    unique = {case.id: case for case in cases}
    return list(unique.values())


CASES = _cases()
