"""`AttentionSpec`, the framework-free description of one attention call, and every input check.

An attention call is validated here, once, before any backend or kernel sees it: the checks look
only at shapes, dtypes and devices (read through :mod:`portattn.arrays`), and each failure names
the argument at fault and what would have worked. The spec is plain data, so the planner and the
CLI can build one without arrays (``AttentionSpec(batch=1, heads=16, ...)``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

# bytes per element of every dtype portattn takes
DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}

LAYOUTS = {
    "bhnd": "(batch, heads, seqlen, head_dim), as torch's scaled_dot_product_attention takes 4-D inputs",
    "bnhd": "(batch, seqlen, heads, head_dim), as flash-attention",
}
DTYPES = tuple(DTYPE_BYTES)  # "float64", "float32", "float16", "bfloat16"
ALIGNMENTS = {
    "top-left": "query i sits at key position i (torch SDPA's is_causal)",
    "bottom-right": "query i sits at key position i + Nk - Nq: the last query sees the last key (flash-attention, KV-cache decoding)",
}
MASK_KINDS = ("bool", "additive")
# scale and softcap multiply float32 scores (by log2(e) too): beyond this they overflow to inf
FLOAT32_LIMIT = 1e37
# a window side this long reaches past any key a sequence can have: treated as unbounded (and what the
# cupy and opencl kernels are given for an unbounded side)
WINDOW_UNBOUNDED_FROM = 1 << 29
DEFAULT_BLOCK_SIZE = (128, 128)  # block-sparse granularity when none is given (FlexAttention's default)
DECODING_MAX_QUERIES = 16  # Nq up to this against a longer key set is a decoding call

# Every feature a call may use beyond plain attention, with what it means; backends declare the
# subset they run (``Capabilities.features``) and the capability table is generated from that.
FEATURES = {
    "gqa": "GQA/MQA: k, v with fewer heads than q (H_q a multiple of H_kv), never repeated in memory",
    "bottom_right": "causal/window alignment 'bottom-right' (query i at key position i + Nk - Nq)",
    "window": "sliding window (left, right) around each query's position; key blocks outside it are skipped",
    "bool_mask": "attn_mask of booleans (True = attend), broadcast from (Nq, Nk) up to (B, H, Nq, Nk)",
    "additive_mask": "attn_mask of floats added to the scores, broadcast from (Nq, Nk) up to (B, H, Nq, Nk)",
    "alibi": "ALiBi: slopes (H,) or (B, H); -slope * |query position - key position| added in-kernel",
    "softcap": "softcap: scores -> softcap * tanh(scores / softcap) (Gemma 2)",
    "block_sparse": "block_mask over (block_q, block_k) blocks; empty blocks are never loaded",
    "key_padding": "key_padding_mask (B, Nk), True = a real key, for padded batches",
    "varlen": "packed sequences with cu_seqlens_q / cu_seqlens_k (flash-attention's varlen convention)",
    "decoding": "Nq of 1-16 against a long key set, the key loop split across work units and merged by LSE",
    "dropout": "dropout on the attention weights with an explicit seed, the same mask in the backward",
}


def default_dtype(device_kind: str) -> str:
    """The dtype a problem gets when none is named: float32 on CPUs, float16 on accelerators."""
    return "float32" if device_kind == "cpu" else "float16"


@dataclass(frozen=True)
class AttentionSpec:
    """One attention problem: sizes, dtype, options and where the data lives.

    Shapes are always given in the ``bhnd`` sense (``seqlen_q`` queries, ``seqlen_k`` keys per
    head); ``layout`` records how the caller's arrays are laid out in memory.
    """

    batch: int
    heads: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: str = "float32"
    causal: bool = False
    scale: float | None = None  # None: 1/sqrt(head_dim)
    layout: str = "bhnd"
    device: str = "cpu"  # where the arrays live: "cpu", "cuda:0", ...
    array_kind: str = "numpy"  # "numpy" or "torch"
    requires_grad: bool = False
    # features (FEATURES); the arrays they need travel beside the spec in ``Extras``
    kv_heads: int | None = None  # None: as many as ``heads``; fewer: GQA/MQA
    align: str = "top-left"  # where queries sit among the keys, for causal, window and ALiBi (ALIGNMENTS)
    window: tuple[int | None, int | None] | None = None  # (left, right) keys around a query's position; None: unbounded
    mask: str | None = None  # attn_mask kind: "bool" or "additive" (MASK_KINDS)
    alibi: bool = False
    softcap: float | None = None
    block_size: tuple[int, int] | None = None  # block-sparse: the (queries, keys) granularity of block_mask
    key_padding: bool = False
    varlen: bool = False  # batch = number of packed sequences; seqlen_q/k = the longest of them
    dropout_p: float = 0.0
    compute_device: str | None = None  # ``device=``: where host arrays are computed on ("opencl:P:D"); None: the backend's default

    def __post_init__(self) -> None:
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        check_options(self)

    @property
    def group_size(self) -> int:
        """Query heads per K/V head (1 without GQA): query head h reads K/V head h // group_size."""
        return self.heads // self.kv_heads

    def query_offset(self, seqlen_q: int | None = None, seqlen_k: int | None = None) -> int:
        """Key position of query 0: 0 top-left, Nk - Nq bottom-right (per sequence when varlen)."""
        nq = self.seqlen_q if seqlen_q is None else seqlen_q
        nk = self.seqlen_k if seqlen_k is None else seqlen_k
        return nk - nq if self.align == "bottom-right" else 0

    @property
    def features(self) -> frozenset[str]:
        """The FEATURES this call uses."""
        used = {
            "gqa": self.kv_heads != self.heads,
            "bottom_right": self.align == "bottom-right" and (self.causal or self.window is not None or self.alibi),
            "window": self.window is not None,
            "bool_mask": self.mask == "bool",
            "additive_mask": self.mask == "additive",
            "alibi": self.alibi,
            "softcap": self.softcap is not None,
            "block_sparse": self.block_size is not None,
            "key_padding": self.key_padding,
            "varlen": self.varlen,
            "decoding": self.seqlen_q <= DECODING_MAX_QUERIES < self.seqlen_k,
            "dropout": self.dropout_p > 0.0,
        }
        return frozenset(name for name, on in used.items() if on)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def device_kind(self) -> str:
        return self.device.split(":", 1)[0]

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def flops_forward(self) -> int:
        """Matmul FLOPs as flash-attention's benchmark counts them (halved when causal)."""
        flops = 4 * self.batch * self.heads * self.seqlen_q * self.seqlen_k * self.head_dim
        return flops // 2 if self.causal else flops

    def with_(self, **changes) -> "AttentionSpec":
        return replace(self, **changes)

    def label(self) -> str:
        """A short id such as ``fp16-causal-2x3x113x64`` (used in test ids and tables)."""
        short = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[self.dtype]
        mask = "causal" if self.causal else "full"
        n = f"{self.seqlen_q}" if self.seqlen_q == self.seqlen_k else f"{self.seqlen_q}q{self.seqlen_k}k"
        heads = f"{self.heads}" if self.kv_heads == self.heads else f"{self.heads}/{self.kv_heads}"
        extra = "".join(f"+{name}" for name in sorted(self.features - {"gqa", "decoding"}))
        return f"{short}-{mask}-{self.batch}x{heads}x{n}x{self.head_dim}{extra}"


def check_options(spec: AttentionSpec) -> None:
    """Checks that need no arrays: sizes, dtype, layout and scale."""
    for name in ("batch", "heads", "head_dim"):
        value = getattr(spec, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("seqlen_q", "seqlen_k"):
        value = getattr(spec, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if spec.dtype not in DTYPES:
        raise TypeError(f"dtype {spec.dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if not isinstance(spec.layout, str) or spec.layout not in LAYOUTS:
        known = "; ".join(f"{name!r} {meaning}" for name, meaning in LAYOUTS.items())
        raise ValueError(f"unknown layout {spec.layout!r}; use {known}")
    if spec.scale is not None:
        if isinstance(spec.scale, bool) or not isinstance(spec.scale, (int, float)) or not math.isfinite(spec.scale):
            raise ValueError(f"scale must be a finite number or None (for 1/sqrt(head_dim)), got {spec.scale!r}")
        if abs(spec.scale) > FLOAT32_LIMIT:  # the kernels scale scores in float32: inf - inf would be NaN
            raise ValueError(f"scale {spec.scale!r} overflows the float32 scores every backend computes; "
                             f"use |scale| <= {FLOAT32_LIMIT:g}")
    _check_features(spec)
    if spec.compute_device is not None and not (
            isinstance(spec.compute_device, str) and re.fullmatch(r"opencl(:\d+:\d+)?", spec.compute_device)):
        raise ValueError(f"device must be None or an OpenCL device 'opencl' or 'opencl:P:D' (platform P, device D, "
                         f"as `portattn info` lists them), got {spec.compute_device!r}")


def _check_features(spec: AttentionSpec) -> None:
    if not isinstance(spec.kv_heads, int) or spec.kv_heads < 1 or spec.heads % spec.kv_heads:
        raise ValueError(f"k and v have {spec.kv_heads} heads and q has {spec.heads}: the query heads must be a "
                         "multiple of the key/value heads (GQA/MQA), e.g. 8 query heads over 8, 4, 2 or 1 K/V heads")
    if not isinstance(spec.align, str) or spec.align not in ALIGNMENTS:
        known = "; ".join(f"{name!r}: {meaning}" for name, meaning in ALIGNMENTS.items())
        raise ValueError(f"unknown causal alignment {spec.align!r}; use {known}")
    if spec.window is not None:
        ok = isinstance(spec.window, tuple) and len(spec.window) == 2 and all(
            side is None or (isinstance(side, int) and not isinstance(side, bool) and side >= 0) for side in spec.window)
        if not ok:
            raise ValueError(f"window must be (left, right) with non-negative ints or None (unbounded) on each side, "
                             f"e.g. (256, 0); got {spec.window!r}")
    if spec.mask is not None and spec.mask not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {spec.mask!r}; use one of {MASK_KINDS}")
    if spec.softcap is not None:
        if isinstance(spec.softcap, bool) or not isinstance(spec.softcap, (int, float)) or not spec.softcap > 0 \
                or not math.isfinite(spec.softcap) or spec.softcap > FLOAT32_LIMIT:
            raise ValueError(f"softcap must be a positive finite number (e.g. 50.0) or None, at most {FLOAT32_LIMIT:g} (its float32 scores overflow beyond), got {spec.softcap!r}")
    if spec.block_size is not None:
        ok = isinstance(spec.block_size, tuple) and len(spec.block_size) == 2 and all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 16 and b & (b - 1) == 0 for b in spec.block_size)
        if not ok:
            raise ValueError(f"block_size must be (queries, keys), powers of two >= 16, e.g. (128, 128); got {spec.block_size!r}")
    if isinstance(spec.dropout_p, bool) or not isinstance(spec.dropout_p, (int, float)) or not 0.0 <= spec.dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a probability in [0, 1), got {spec.dropout_p!r}")
