"""What the ``cupy`` backend compiles: the kernel source and its compile-time constants, from a WMMA plan.

No cupy import here: the same definitions are compiled by ``cupy.RawModule`` on a GPU and, in CI
without one, by CUDA 12's NVRTC for compute_70/75 (``tests/backends/test_cupy_compile.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ...tiling import TilePlan
from .plan import backward_smem_bytes, q_in_registers

SOURCE_PATH = Path(__file__).with_name("kernels") / "attention.cu"
LAYOUT_SOURCE_PATH = SOURCE_PATH.with_name("fragment_layout.cu")
KERNELS = ("attention_forward", "attention_backward_delta", "attention_backward_dkdv", "attention_backward_dq")
MASK_CODES = {None: 0, "bool": 1, "additive": 2}  # the .cu file's MASK


@functools.lru_cache(maxsize=1)
def source() -> str:
    return SOURCE_PATH.read_text()


@dataclass(frozen=True)
class AccumulatorLayout:
    """The structure of a 16x16 float32 WMMA accumulator that the register softmax relies on: every
    lane holds ``rows`` rows, element i in row slot ``slots[i]`` (the same for every lane), and the
    lanes sharing a row are the XOR group spanned by ``shuffles``."""

    rows: int
    slots: tuple[int, ...]
    shuffles: tuple[int, ...]

    def defines(self) -> dict[str, object]:
        return {"REGISTER_SOFTMAX": 1, "ACC_ROWS": self.rows, "ACC_SLOTS": ",".join(map(str, self.slots)),
                "ACC_SHUFFLES": ",".join(map(str, self.shuffles)), "ACC_SHUFFLE_COUNT": len(self.shuffles)}


# What fragment_layout.cu reads on sm_80+ (the H100 here): the PTX m16n8k16 C layout, twice along n.
SM80_ACCUMULATOR = AccumulatorLayout(rows=2, slots=(0, 0, 1, 1, 0, 0, 1, 1), shuffles=(1, 2))


def accumulator_layout(rows, cols) -> AccumulatorLayout | None:
    """The ``AccumulatorLayout`` of probed (32 lanes x 8 elements) row and column indices, or None when
    the layout lacks that structure (then the kernels keep the shared-memory softmax)."""
    rows = [list(map(int, lane)) for lane in rows]
    cols = [list(map(int, lane)) for lane in cols]
    if len(rows) != 32 or any(len(lane) != 8 for lane in rows):
        return None
    held = {(r, c) for lane in range(32) for r, c in zip(rows[lane], cols[lane])}
    if held != {(r, c) for r in range(16) for c in range(16)}:
        return None  # 256 elements that do not cover the tile: some cell is held twice
    slots_of = []
    for lane in rows:
        order = list(dict.fromkeys(lane))  # distinct rows in order of first appearance
        slots_of.append(tuple(order.index(r) for r in lane))
    if len(set(slots_of)) != 1:
        return None
    # the lanes sharing lane 0's first row, as XOR distances from lane 0; every row must be shared the same way
    masks = frozenset(other for other in range(32) if rows[0][0] in rows[other])
    for lane in range(32):
        for r in set(rows[lane]):
            if frozenset(other ^ lane for other in range(32) if r in rows[other]) != masks:
                return None
    basis: list[int] = []
    span = {0}
    for m in sorted(masks):
        if m not in span:
            basis.append(m)
            span |= {x ^ m for x in span}
    if span != set(masks):
        return None  # not an XOR group: shuffles cannot reduce it
    return AccumulatorLayout(rows=max(slots_of[0]) + 1, slots=slots_of[0], shuffles=tuple(basis))


@dataclass(frozen=True)
class Variant:
    """One compiled module: a plan's tiles plus the call's compile-time switches (the cache key)."""

    head_dim: int
    plan: TilePlan
    causal: bool
    bf16: bool
    vector_loads: bool  # 16-byte global loads: head dim, row strides and base pointers in 8-element units
    accumulator: AccumulatorLayout | None = None  # probed on the device; None: shared-memory softmax
    window: bool = False  # sliding-window bounds (their values are run-time arguments)
    mask: str | None = None  # attn_mask kind: None, "bool" or "additive" (spec.mask); read per score through strides
    mask_float32: bool = False  # an additive mask's values are float32 (else the inputs' dtype)
    key_padding: bool = False  # key_padding_mask (B, Nk), read per score

    def defines(self) -> dict[str, object]:
        p = self.plan
        # a plan with no backward (backward None) still compiles the backward kernels at the
        # smallest legal size; they are never launched
        b = p.backward
        backward = (b.warps, b.block_q, b.stages) if b is not None else (1, 16, 1)
        return {
            "HEAD_DIM": self.head_dim,
            "HEAD_DIM_PAD": p.head_dim_padded,
            "FWD_WARPS": p.warps,
            "FWD_BLOCK_K": p.block_k,
            "FWD_STAGES": p.stages,
            "FWD_SMEM_BYTES": p.sram_bytes,
            "BWD_WARPS": backward[0],
            "BWD_BLOCK_N": backward[1],
            "BWD_STAGES": backward[2],
            "BWD_SMEM_BYTES": backward_smem_bytes(p.head_dim_padded, *backward),
            "Q_IN_REGISTERS": int(q_in_registers(p.head_dim_padded)),
            "CAUSAL": int(self.causal),
            "WINDOW": int(self.window),
            "BF16": int(self.bf16),
            "VECTOR_LOADS": int(self.vector_loads),
            "MASK": MASK_CODES[self.mask],
            "MASK_FLOAT32": int(self.mask == "additive" and self.mask_float32),
            "KEY_PADDING": int(self.key_padding),
            **(self.accumulator.defines() if self.accumulator else {"REGISTER_SOFTMAX": 0}),
        }

    def options(self) -> tuple[str, ...]:
        return ("-std=c++17", *(f"-D{name}={value}" for name, value in self.defines().items()))
