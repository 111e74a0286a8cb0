"""The conformance cases: one list, with readable ids, built from the issue's checklist.

Lengths that are no multiple of any block (1, 17, 113, 1000), Nq != Nk both ways, head dims
16..256 (including 40, 80, 96, 111), causal and not, float32/float16/bfloat16 (and float64), rows
that see no key (Nk = 0), and scores near +-1e4.

``CASES`` is the full grid: every backend that runs natively (numba, reference, triton and cupy on a
GPU, opencl on a GPU) runs all of it. ``EMULATOR_DEFAULT`` is the part the slow CPU emulations --
Triton's interpreter (TRITON_INTERPRET=1) and OpenCL on a CPU device (PoCL) -- run by default;
``pytest --full-grid`` runs the full grid on them too (``tests/conformance/conftest.py``).
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


def emulator_dtype(index: int, causal: bool) -> str:
    """The one dtype the CPU emulations run the ``index``-th case shape in by default, rotating through
    the three (shifted when causal) so that each dtype meets short and long, odd and Nq != Nk (both
    ways) lengths, six of the nine head dims and, in features.py, every feature's cases, causal and
    not. The dtypes share the kernels' tiling and differ in loads, stores and matmul precision, which
    each dtype's share of the shapes still exercises; the other two dtypes of each shape run under
    --full-grid (and on the GPU, which always runs the full grid)."""
    return LOW_PRECISION[(index + causal) % len(LOW_PRECISION)]


def _cases() -> tuple[list[Case], frozenset[str]]:
    """The full grid, and the ids of its cases the CPU emulations run by default."""
    cases: list[Case] = []
    emulator_default: set[str] = set()

    def add(case: Case, on_emulators: bool) -> None:
        cases.append(case)
        if on_emulators:
            emulator_default.add(case.id)

    for causal in (False, True):
        for index, (seqlen_q, seqlen_k) in enumerate(LENGTHS):  # every length pair in every dtype, at d = 64
            for dtype in LOW_PRECISION:
                if (seqlen_q, seqlen_k) == (1000, 1000):
                    # by far the slowest case in Triton's interpreter (20-50 s per backward, 6-16 s per
                    # forward in each dtype and mask; the other pairs take 0.3-13 s): the emulations run
                    # only its float32 causal case (a causal diagonal across many key tiles), and
                    # (1000, 113), (1, 1000) keep long queries and long keys in the other dtypes
                    on_emulators = causal and dtype == "float32"
                else:
                    on_emulators = dtype == emulator_dtype(index, causal)
                add(Case(2, 3, seqlen_q, seqlen_k, 64, causal, dtype), on_emulators)
        for index, head_dim in enumerate(HEAD_DIMS):  # every head dim, odd lengths, Nq != Nk
            # the emulations rotate the dtype here too, the largest head dim included (the most staged chunks,
            # the widest padding: a build of it takes 10-16 s on PoCL, in each dtype and mask)
            for dtype in ("float32", "float16"):
                add(Case(1, 2, 113, 77, head_dim, causal, dtype), dtype == emulator_dtype(index, causal))
            add(Case(1, 2, 77, 113, head_dim, causal, "bfloat16"), emulator_dtype(index, causal) == "bfloat16")
        # small: every dtype, on every backend natively; rows with no key at all (Nk = 0) in one dtype per
        # causal flag on the emulations (each is a build of its own, ~10 s on PoCL), large scores in all
        add(Case(1, 2, 113, 113, 64, causal, "float64"), True)
        for dtype in LOW_PRECISION:
            add(Case(1, 2, 33, 0, 64, causal, dtype), dtype == emulator_dtype(0, causal))  # every row fully masked
            add(Case(1, 2, 113, 113, 64, causal, dtype, "large"), True)
    unique = {case.id: case for case in cases}
    return list(unique.values()), frozenset(emulator_default)


CASES, EMULATOR_DEFAULT = _cases()
