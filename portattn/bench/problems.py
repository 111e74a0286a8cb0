"""What ``portattn bench`` times: problems (shapes, mask, dtype, pass) and the default grids.

FLOPs are counted as flash-attention's benchmark counts them: forward = 4·B·H·Nq·Nk·D, halved when
causal; forward+backward = 3.5 × forward. GPU grids follow flash-attention's benchmark (B·N = 16384
tokens, hidden 2048, so H = 2048 / D) so that figures can be set beside its published ones; CPU
grids keep B = 1, H = 8, small enough for a laptop.

Decoding (``mode="decode"``, ``portattn bench --decode``) is a forward of ``seqlen_q`` new queries per
sequence against a KV cache of ``seqlen`` keys with ``kv_heads`` heads, through
``attention_with_kvcache``, contiguous or paged (``page_size``). It is bound by reading the cache, so
its figure of merit is bandwidth: ``bytes_moved`` (K and V once, q and the output) over the time.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ..spec import DTYPE_BYTES, AttentionSpec, default_dtype

MODES = ("fwd", "fwd+bwd")  # and "decode": a forward against a KV cache (decode_grid)
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
# --decode: 32 query heads, one new query per sequence, GQA groups 1/4/8; a problem's K/V at most
# DECODE_MAX_CACHE_BYTES (the paged copy doubles it), so batch 64 stops at fewer keys than batch 1
DECODE_HEADS = 32
GPU_DECODE = dict(batches=(1, 8, 64), seqlens=(1024, 4096, 16384, 32768, 131072), head_dims=(64, 128),
                  groups=(1, 4, 8), dtypes=("float16", "bfloat16"), page_sizes=(0, 16))
CPU_DECODE = dict(batches=(1, 8), seqlens=(4096, 16384, 32768), head_dims=(128,), groups=(4,), dtypes=("float32",),
                  page_sizes=(0, 16))
DECODE_MAX_CACHE_BYTES = 8 << 30


@dataclass(frozen=True)
class Problem:
    """One timed shape: (batch, heads, seqlen, head_dim) inputs, a mask and a pass."""

    batch: int
    heads: int
    seqlen: int  # keys (and queries, but for decoding)
    head_dim: int
    causal: bool
    dtype: str
    mode: str  # "fwd", "fwd+bwd" or "decode"
    seqlen_q: int | None = None  # decoding: the new queries per sequence
    kv_heads: int | None = None  # decoding: the cache's heads (GQA); None = heads
    page_size: int = 0  # decoding: 0 = a contiguous cache, else its page size (block_table)

    def spec(self, device: str = "cpu") -> AttentionSpec:
        return AttentionSpec(
            batch=self.batch,
            heads=self.heads,
            kv_heads=self.kv_heads or self.heads,
            seqlen_q=self.queries,
            seqlen_k=self.seqlen,
            head_dim=self.head_dim,
            dtype=self.dtype,
            causal=self.causal,
            device=device,
            requires_grad=self.backward,
            align="bottom-right" if self.decoding else "top-left",
        )

    @property
    def decoding(self) -> bool:
        return self.mode == "decode"

    @property
    def backward(self) -> bool:
        """True when the timed pass includes the backward ("fwd+bwd"); "fwd" and "decode" are forwards."""
        return self.mode == "fwd+bwd"

    @property
    def queries(self) -> int:
        return self.seqlen if self.seqlen_q is None else self.seqlen_q

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The queries' (B, H, Nq, D)."""
        return (self.batch, self.heads, self.queries, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        """The keys' and values' (B, H_kv, Nk, D)."""
        return (self.batch, self.kv_heads or self.heads, self.seqlen, self.head_dim)

    @property
    def bytes_moved(self) -> int:
        """The least a forward reads and writes: q, K, V once each and the output."""
        itemsize = DTYPE_BYTES[self.dtype]
        return itemsize * (2 * math.prod(self.shape) + 2 * math.prod(self.kv_shape))

    @property
    def flops(self) -> float:
        forward = self.spec().flops_forward
        return forward * BACKWARD_FLOP_FACTOR if self.backward else float(forward)

    def label(self) -> str:
        """``2x32x8192x64-causal-fwdbwd``: shape, mask and pass, but no dtype or device, so that runs on two
        devices (each in its own default dtype) name the same problem alike; no ``+``, since labels
        become file names (pytest-benchmark's histograms). Decoding: ``8x32q8kv-1x4096x128-decode-paged16``."""
        mask = "causal" if self.causal else "full"
        if self.decoding:
            layout = f"-paged{self.page_size}" if self.page_size else ""
            return (f"{self.batch}x{self.heads}q{self.kv_heads or self.heads}kv-{self.queries}x{self.seqlen}x{self.head_dim}"
                    f"{'-causal' if self.causal else ''}-decode{layout}")
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


def decode_grid(device_kind: str, *, batches=None, seqlens=None, head_dims=None, groups=None, dtypes=None,
                page_sizes=None, queries: int = 1, heads: int = DECODE_HEADS) -> list[Problem]:
    """The decoding grid of ``portattn bench --decode`` (GPU_DECODE or CPU_DECODE, each choice overridable):
    ``heads`` query heads over ``heads / group`` KV heads, ``queries`` new queries per sequence, a
    contiguous cache (page size 0) or a paged one. Problems whose K/V exceed DECODE_MAX_CACHE_BYTES
    are left out."""
    default = CPU_DECODE if device_kind == "cpu" else GPU_DECODE
    choices = dict(batches=batches, seqlens=seqlens, head_dims=head_dims, groups=groups, dtypes=dtypes,
                   page_sizes=page_sizes)
    axes = [choices[name] or default[name] for name in ("dtypes", "page_sizes", "head_dims", "groups", "batches", "seqlens")]
    problems = []
    for dtype, page, d, group, b, n in itertools.product(*axes):
        if heads % group:
            raise ValueError(f"GQA group {group} does not divide the {heads} query heads")
        problem = Problem(b, heads, n, d, False, dtype, "decode", seqlen_q=queries, kv_heads=heads // group, page_size=page)
        if 2 * math.prod(problem.kv_shape) * DTYPE_BYTES[dtype] <= DECODE_MAX_CACHE_BYTES:
            problems.append(problem)
    return problems
