"""What the ``cupy`` backend compiles: the kernel source and its compile-time constants, from a WMMA plan.

No cupy import here: the same definitions are compiled by ``cupy.RawModule`` on a GPU and, in CI
without one, by CUDA 12's NVRTC for compute_70/75 (``tests/backends/test_cupy_compile.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ..tiling import TilePlan
from ..tiling.wmma import backward_smem_bytes, q_in_registers

SOURCE_PATH = Path(__file__).with_name("cupy_kernels") / "attention.cu"
KERNELS = ("attention_forward", "attention_backward_delta", "attention_backward_dkdv", "attention_backward_dq")


@functools.lru_cache(maxsize=1)
def source() -> str:
    return SOURCE_PATH.read_text()


@dataclass(frozen=True)
class Variant:
    """One compiled module: a plan's tiles plus the call's compile-time switches (the cache key)."""

    head_dim: int
    plan: TilePlan
    causal: bool
    bf16: bool
    vector_loads: bool  # 16-byte global loads: head dim, row strides and base pointers in 8-element units

    def defines(self) -> dict[str, int]:
        p = self.plan
        # a plan with no backward (backward_warps == 0) still compiles the backward kernels at the
        # smallest legal size; they are never launched
        backward = (p.backward_warps, p.backward_block_q, p.backward_stages) if p.backward_warps else (1, 16, 1)
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
            "BF16": int(self.bf16),
            "VECTOR_LOADS": int(self.vector_loads),
        }

    def options(self) -> tuple[str, ...]:
        return ("-std=c++17", *(f"-D{name}={value}" for name, value in self.defines().items()))
