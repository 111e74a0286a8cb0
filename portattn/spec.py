"""`AttentionSpec`, the framework-free description of one attention call, and every input check.

An attention call is validated here, once, before any backend or kernel sees it: the checks look
only at shapes, dtypes and devices (read through :mod:`portattn.arrays`), and each failure names
the argument at fault and what would have worked. The spec is plain data, so the planner and the
CLI can build one without arrays (``AttentionSpec(batch=1, heads=16, ...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .tiling.device import DTYPE_BYTES

LAYOUTS = {
    "bhnd": "(batch, heads, seqlen, head_dim), as torch's scaled_dot_product_attention",
    "bnhd": "(batch, seqlen, heads, head_dim), as flash-attention",
}
DTYPES = tuple(DTYPE_BYTES)  # "float64", "float32", "float16", "bfloat16"


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

    def __post_init__(self) -> None:
        check_options(self)

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
        return f"{short}-{mask}-{self.batch}x{self.heads}x{n}x{self.head_dim}"


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
    if spec.layout not in LAYOUTS:
        known = "; ".join(f"{name!r} {meaning}" for name, meaning in LAYOUTS.items())
        raise ValueError(f"unknown layout {spec.layout!r}; use {known}")
    if spec.scale is not None:
        if isinstance(spec.scale, bool) or not isinstance(spec.scale, (int, float)) or not math.isfinite(spec.scale):
            raise ValueError(f"scale must be a finite number or None (for 1/sqrt(head_dim)), got {spec.scale!r}")


def spec_from_arrays(q, k, v, *, causal: bool = False, scale: float | None = None, layout: str = "bhnd") -> AttentionSpec:
    """Validate ``q``, ``k``, ``v`` and the options together; return the spec of the call.

    Raises ``TypeError`` for unsupported array types or dtypes and ``ValueError`` for everything
    else, each naming the argument and what would work.
    """
    from . import arrays  # arrays imports optional frameworks lazily; keep this module import-light

    if layout not in LAYOUTS:
        known = "; ".join(f"{name!r} {meaning}" for name, meaning in LAYOUTS.items())
        raise ValueError(f"unknown layout {layout!r}; use {known}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    infos = {name: arrays.describe(x, name) for name, x in (("q", q), ("k", k), ("v", v))}
    _check_same(infos, "kind", "array types", "pass q, k and v as the same kind of array")
    _check_same(infos, "device", "devices", "move them to one device")
    _check_same(infos, "dtype", "dtypes", "cast them to one dtype")
    for name, info in infos.items():
        if len(info.shape) != 4:
            raise ValueError(f"{name} must be 4-D {LAYOUTS[layout]}, got shape {info.shape} ({len(info.shape)}-D)")
    batch, heads, seqlen_q, head_dim = _bhnd(infos["q"].shape, layout)
    kb, kh, seqlen_k, kd = _bhnd(infos["k"].shape, layout)
    vb, vh, vn, vd = _bhnd(infos["v"].shape, layout)
    axis = {"bhnd": "(B, H, N, D)", "bnhd": "(B, N, H, D)"}[layout]
    for what, qs, ks, vs in (("batch size B", batch, kb, vb), ("head count H", heads, kh, vh), ("head dim D", head_dim, kd, vd)):
        if not qs == ks == vs:
            raise ValueError(f"q, k and v must share the {what} in layout {layout!r} {axis}: got {qs}, {ks}, {vs}")
    if vn != seqlen_k:
        raise ValueError(f"k and v must have the same sequence length: k has {seqlen_k} keys, v has {vn} values")
    if batch == 0 or heads == 0 or head_dim == 0:
        raise ValueError(f"q has an empty batch, head or head_dim axis (shape {infos['q'].shape}); B, H and D must be >= 1")
    dtype = infos["q"].dtype
    if dtype not in DTYPES:
        raise TypeError(f"q, k, v have dtype {dtype}; portattn takes {', '.join(DTYPES)}")
    return AttentionSpec(
        batch=batch,
        heads=heads,
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=head_dim,
        dtype=dtype,
        causal=causal,
        scale=None if scale is None else _as_scale(scale),
        layout=layout,
        device=infos["q"].device,
        array_kind=infos["q"].kind,
        requires_grad=any(info.requires_grad for info in infos.values()),
    )


def _as_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a finite number or None (for 1/sqrt(head_dim)), got {scale!r}")
    return float(scale)


def _bhnd(shape: tuple[int, ...], layout: str) -> tuple[int, int, int, int]:
    b, x, y, d = shape
    return (b, x, y, d) if layout == "bhnd" else (b, y, x, d)


def _check_same(infos: dict, field: str, what: str, fix: str) -> None:
    values = {name: getattr(info, field) for name, info in infos.items()}
    if len(set(values.values())) > 1:
        listed = ", ".join(f"{name}: {value}" for name, value in values.items())
        raise (TypeError if field in ("kind", "dtype") else ValueError)(f"q, k and v have different {what} ({listed}); {fix}")
