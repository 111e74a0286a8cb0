"""Launching the Hopper forward (``hopper_kernels.py``): which calls it serves, its configuration, and
``hopper_forward``, which allocates O and the LSE and launches it.

``TritonBackend.forward`` runs it for a spec ``serves`` accepts on a device of compute capability 9.x
(plain attention, causal or not, GQA, fp16/bf16, head dim 64/128/256, at least ``MIN_FLOPS`` of work),
with ``config_for``'s configuration: on the H100 it was 1.01-1.20x the portable forward at every point of
flash-attention's grid (``benchmarks/results/h100-hopper-forward.json``). The LSE it returns is the one
``attention_forward`` returns (natural log, float32, (B, H, Nq)), so the backward runs unchanged.
Tensors whose strides TMA cannot take (``tma_ready``: 16-byte aligned base and strides, last stride 1)
run the same kernel with pointer loads, through any strides.
"""

from __future__ import annotations

import contextvars
import functools
from typing import NamedTuple

from .launch import LOG2E, interpreting, on_device, precision_for

HOPPER_MAJOR = 9
HEAD_DIMS = (64, 128, 256)
DTYPES = ("float16", "bfloat16")
LOADS = ("host", "device", "pointer")


class HopperConfig(NamedTuple):
    """One configuration of the Hopper forward: tile sizes and launch options, and the variant switches
    ``hopper_kernels.py`` describes."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    warp_specialize: bool = False  # tl.range(warp_specialize=True) on the unmasked key loop
    loads: str = "host"  # "host" / "device" TMA descriptors, or "pointer" loads (LOADS)
    split_q: bool = False  # two query sub-tiles of block_m / 2 rows, ping-ponging
    defer_pv: bool = False  # each tile's P V issued after the next tile's QK^T, beside its softmax (not with split_q)
    lazy_rescale: float = 0.0  # > 0: rescale O only when a row max grew by more than this (log2 units)

    def label(self) -> str:
        """A short id such as ``128x64-w8-s3-host+lazy8``."""
        switches = [name for name, on in (("ws", self.warp_specialize), ("split", self.split_q),
                                          ("defer", self.defer_pv)) if on]
        if self.lazy_rescale > 0:
            switches.append(f"lazy{self.lazy_rescale:g}")
        return f"{self.block_m}x{self.block_n}-w{self.num_warps}-s{self.num_stages}-{'+'.join([self.loads, *switches])}"

    def problems(self) -> list[str]:
        """Why this configuration cannot run (empty when it can)."""
        found = []
        if self.loads not in LOADS:
            found.append(f"loads={self.loads!r} is none of {LOADS}")
        if self.split_q and self.defer_pv:
            found.append("split_q and defer_pv are exclusive")
        if self.split_q and self.block_m < 32:
            found.append("split_q needs block_m >= 32 (two sub-tiles of >= 16 rows)")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                found.append(f"{name}={value} is not a power of two >= 16")
        return found


DEFAULT = HopperConfig()


# Below this much work (``spec.flops_forward``: FLOPs, halved when causal) the portable forward serves the
# call: a Hopper launch goes through Triton's JIT and builds four TMA descriptors, ~50 us more host time
# per call than the portable forward's direct relaunch (``host_overhead`` in the H100 record), more than
# its faster kernel saves on a smaller problem. 2^35 is a batch-1 causal prefill of 2048 tokens over 32
# heads of 128 (~90 us of kernel at 400 TFLOP/s); the flash grid's smallest points, e.g. (16, 32, 1024,
# 64) causal, are 2^36.
MIN_FLOPS = 1 << 35


def config_for(spec) -> HopperConfig:
    """The configuration for ``spec``, from the H100 sweep of flash-attention's grid (each rule's pick was
    the best of 57-69 configurations after re-timing, or within 3% of it; docs/tiling.md, H1-H3):

    * H1 D = 64: 64 x 128 tiles, 4 warps, 2 stages; 3 stages when causal and N >= 8192 (long causal rows
      keep the deeper pipeline busy).
    * H2 D = 128: 128 x 64, 4 warps, 2 stages; causal 64 x 64, 3 stages (smaller query blocks waste less
      of the diagonal and balance the SMs).
    * H3 D = 256: 128 x 64, 8 warps, 2 stages (a 128 x 256 float32 accumulator needs 8 warps' registers).
    """
    if spec.head_dim <= 64:
        stages = 3 if spec.causal and max(spec.seqlen_q, spec.seqlen_k) >= 8192 else 2
        return DEFAULT._replace(block_m=64, block_n=128, num_warps=4, num_stages=stages)
    if spec.head_dim <= 128:
        if spec.causal:
            return DEFAULT._replace(block_m=64, block_n=64, num_warps=4, num_stages=3)
        return DEFAULT._replace(block_m=128, block_n=64, num_warps=4, num_stages=2)
    return DEFAULT._replace(block_m=128, block_n=64, num_warps=8, num_stages=2)


def ineligible(spec, capability: tuple[int, int] | None = None) -> list[str]:
    """Why the Hopper forward does not serve ``spec`` (empty when it does): plain attention, causal or
    not (top-left, or bottom-right), GQA, float16/bfloat16, head dim 64/128/256, a positive scale,
    torch tensors on a CUDA device (of compute capability 9.x when ``capability`` is given), or on the
    CPU under TRITON_INTERPRET=1."""
    found = []
    if capability is not None and capability[0] != HOPPER_MAJOR:
        found.append(f"compute capability {capability[0]}.{capability[1]} is not Hopper (9.x)")
    if spec.array_kind != "torch":
        found.append("torch tensors only")
    if spec.device_kind != "cuda" and not interpreting():
        found.append("a CUDA device only (or any under TRITON_INTERPRET=1)")
    if spec.dtype not in DTYPES:
        found.append(f"dtype {spec.dtype} (float16, bfloat16 only)")
    if spec.head_dim not in HEAD_DIMS:
        found.append(f"head dim {spec.head_dim} (64, 128, 256 only)")
    extra = spec.features - {"gqa", "bottom_right", "decoding"}
    if extra:
        found.append("features " + ", ".join(sorted(extra)) + " (plain, causal and GQA only)")
    if spec.softmax_scale <= 0:
        found.append("a scale <= 0 (the kernel takes max(s) * scale for max(s * scale))")
    return found


def eligible(spec, capability: tuple[int, int] | None = None) -> bool:
    return not ineligible(spec, capability)


def serves(spec, capability: tuple[int, int] | None) -> bool:
    """True when ``TritonBackend.forward`` runs ``spec`` on the Hopper forward: ``eligible`` on a device of
    compute capability 9.x, with at least ``MIN_FLOPS`` of work."""
    return capability is not None and eligible(spec, capability) and spec.flops_forward >= MIN_FLOPS


def tma_ready(*tensors) -> bool:
    """True when TMA can read every tensor as the kernel asks: 16-byte aligned base, last stride 1,
    other strides multiples of 16 bytes (the per-head base of "device" descriptors then stays aligned)."""
    for x in tensors:
        size = x.element_size()
        strides = x.stride()
        if x.data_ptr() % 16 or strides[-1] != 1 or any(s * size % 16 for s in strides[:-1]):
            return False
    return True


@functools.lru_cache(maxsize=None)
def kernels():
    from . import hopper_kernels  # imports triton: compiled on first launch of each specialization

    return hopper_kernels


def hopper_forward(q, k, v, causal: bool, scale: float, config: HopperConfig = DEFAULT, *,
                   bottom_right: bool = False):
    """(out, lse) of attention on (B, H, Nq, D) q and (B, H_kv, Nk, D) k, v (H a multiple of H_kv):
    out (B, H, Nq, D) contiguous in q's dtype, lse float32 (B, H, Nq), natural log. ``bottom_right``
    aligns the causal diagonal to the last key (query i sees keys j <= i + Nk - Nq)."""
    import torch

    problems = config.problems()
    if problems:
        raise ValueError(f"HopperConfig {config}: " + "; ".join(problems))
    batch, heads, seqlen_q, head_dim = q.shape
    seqlen_k = k.shape[2]
    out = torch.empty((batch, heads, seqlen_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or seqlen_k == 0:  # no key at all (or nothing to compute): O = 0, LSE = -inf
        return out.zero_(), lse.fill_(float("-inf"))
    kernel, grid, args, meta = launch_arguments(q, k, v, out, lse, causal, scale, config, bottom_right)
    launch = functools.partial(kernel[grid], *args, **meta)
    with on_device(q):
        if meta["LOADS"] == "device" and not interpreting():
            contextvars.copy_context().run(_with_scratch, launch, q.device)  # the caller's allocator stays set
        else:
            launch()
    return out, lse


def launch_arguments(q, k, v, out, lse, causal: bool, scale: float, config: HopperConfig, bottom_right: bool = False):
    """``(kernel, grid, args, meta)`` of the launch ``hopper_forward`` makes (benchmarks compile from it
    too). Pointer loads replace TMA where ``tma_ready`` refuses the tensors."""
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    loads = config.loads if config.loads == "pointer" or tma_ready(q, k, v, out) else "pointer"
    q_rows = config.block_m // 2 if config.split_q else config.block_m
    tensors = [_operand(x, rows, head_dim, loads)
               for x, rows in ((q, q_rows), (k, config.block_n), (v, config.block_n), (out, q_rows))]
    meta = dict(HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=bool(causal),
                BOTTOM_RIGHT=bool(causal and bottom_right and seqlen_q != seqlen_k), LOADS=loads,
                SPLIT_Q=config.split_q, DEFER_PV=config.defer_pv, LAZY_TAU=float(config.lazy_rescale),
                WARP_SPECIALIZE=config.warp_specialize,
                UPCAST=precision_for(str(q.dtype).removeprefix("torch.")) == "upcast",
                num_warps=config.num_warps, num_stages=config.num_stages)
    grid = (-(-seqlen_q // config.block_m), batch * heads)
    args = (*tensors, lse, heads, heads // kv_heads, seqlen_q, seqlen_k, scale * LOG2E)
    return kernels().hopper_attention_forward, grid, args, meta


def _operand(x, rows: int, head_dim: int, loads: str):
    """A kernel argument: a (B, H, N, D) TMA descriptor of ``rows`` x D blocks for "host" loads, else
    the view (tensor, strides)."""
    if loads != "host":
        return x, tuple(x.stride())
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, head_dim])


def _with_scratch(launch, device) -> None:
    """Run ``launch`` with an allocator for the global scratch that "device" descriptors live in (128
    bytes per descriptor and program, from torch's caching allocator on the launch's stream). Called in a
    copied context: Triton keeps the allocator in a ContextVar, so the caller's own setting is untouched."""
    import torch
    import triton

    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    launch()
