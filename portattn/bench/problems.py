"""What ``portattn bench`` times: problems (shapes, mask, dtype, pass) and the default grids.

FLOPs are counted as flash-attention's benchmark counts them: forward = 4·B·H·Nq·Nk·D, halved when
causal; forward+backward = 3.5 × forward. GPU grids follow flash-attention's benchmark (B·N = 16384
tokens, hidden 2048, so H = 2048 / D) so that figures can be set beside its published ones; CPU
grids keep B = 1, H = 8, small enough for a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec import AttentionSpec, default_dtype

MODES = ("fwd", "fwd+bwd")
BACKWARD_FLOP_FACTOR = 3.5  # forward+backward FLOPs as a multiple of forward (flash-attention's count)

# flash-attention's benchmark grid (benchmarks/benchmark_flash_attention.py there)
FLASH_TOKENS, FLASH_HIDDEN = 16384, 2048
GPU_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_HEAD_DIMS = (64, 128)
# the CPU's grid: the same head dims, lengths a 2-core machine times in minutes
CPU_SEQLENS = (512, 1024, 2048, 4096)
CPU_HEAD_DIMS = (64, 128)
CPU_BATCH, CPU_HEADS = 1, 8
# --quick: about a minute anywhere
QUICK_SEQLENS = (512, 1024, 2048)
QUICK_HEAD_DIMS = (64,)


@dataclass(frozen=True)
class Problem:
    """One timed shape: (batch, heads, seqlen, head_dim) inputs, a mask and a pass."""

    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    dtype: str
    mode: str  # "fwd" or "fwd+bwd"

    def spec(self, device: str = "cpu") -> AttentionSpec:
        return AttentionSpec(
            batch=self.batch,
            heads=self.heads,
            seqlen_q=self.seqlen,
            seqlen_k=self.seqlen,
            head_dim=self.head_dim,
            dtype=self.dtype,
            causal=self.causal,
            device=device,
            requires_grad=self.mode == "fwd+bwd",
        )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.seqlen, self.head_dim)

    @property
    def flops(self) -> float:
        forward = self.spec().flops_forward
        return forward * BACKWARD_FLOP_FACTOR if self.mode == "fwd+bwd" else float(forward)

    def label(self) -> str:
        """``2x32x8192x64-causal-fwdbwd``: shape, mask and pass, but no dtype or device, so that runs on two
        devices (each in its own default dtype) name the same problem alike; no ``+``, since labels
        become file names (pytest-benchmark's histograms)."""
        mask = "causal" if self.causal else "full"
        return f"{self.batch}x{self.heads}x{self.seqlen}x{self.head_dim}-{mask}-{self.mode.replace('+', '')}"


def flash_shape(seqlen: int, head_dim: int) -> tuple[int, int]:
    """(batch, heads) of flash-attention's grid: B·N = 16384 tokens, H·D = 2048 (at least 1 each)."""
    return max(1, FLASH_TOKENS // seqlen), max(1, FLASH_HIDDEN // head_dim)


def grid(seqlens, head_dims, *, causal, modes, dtype: str, heads: int | None = 8, batch: int = 1) -> list[Problem]:
    """Every (mode, head_dim, mask, seqlen) combination, in table order.

    ``causal`` is a bool or a sequence of bools (the masks to time). ``heads=None`` sizes each problem
    as flash-attention's grid does (``flash_shape``), ignoring ``batch``.
    """
    masks = (causal,) if isinstance(causal, bool) else tuple(causal)
    problems = []
    for mode in modes:
        for d in head_dims:
            for mask in masks:
                for n in seqlens:
                    b, h = flash_shape(n, d) if heads is None else (batch, heads)
                    problems.append(Problem(b, h, n, d, mask, dtype, mode))
    return problems


def default_grid(device_kind: str, *, quick: bool = False, seqlens=None, head_dims=None, masks=None, modes=None,
                 dtype: str | None = None, heads: int | None = None) -> list[Problem]:
    """The grid ``portattn bench`` runs when not told otherwise, each choice overridable.

    GPUs (cuda): flash-attention's grid, fp16, both masks, forward and forward+backward. CPUs: B = 1,
    H = 8, fp32, both masks, forward. ``quick``: N in {512, 1024, 2048}, D = 64, no mask, forward.
    ``heads`` fixes H (with B = 1) instead of the device's rule.
    """
    gpu = device_kind != "cpu"
    if quick:
        seqlens, head_dims = seqlens or QUICK_SEQLENS, head_dims or QUICK_HEAD_DIMS
        masks, modes = masks or (False,), modes or ("fwd",)
    seqlens = seqlens or (GPU_SEQLENS if gpu else CPU_SEQLENS)
    head_dims = head_dims or (GPU_HEAD_DIMS if gpu else CPU_HEAD_DIMS)
    masks = masks or (False, True)
    modes = modes or (MODES if gpu else ("fwd",))
    dtype = dtype or default_dtype(device_kind)
    if heads is None and not gpu:
        heads = CPU_HEADS
    return grid(seqlens, head_dims, causal=masks, modes=modes, dtype=dtype, heads=heads, batch=CPU_BATCH)
