"""The kernels' operands and results at the numba backend's boundary: a caller's arrays made C-contiguous
in the compute dtype (16-bit floats widened, q scaled), bfloat16 results narrowed back to bits.

bfloat16 tensors arrive as uint16 views of their bits (``arrays.to_numpy_bits``; numpy has no bfloat16)
and widen by a shift; float16 arrays are viewed as bits too and widen through a 65536-entry table (numba
has no float16 type), the one the decode kernels use. bfloat16 results go back as bits, rounded to
nearest even as torch rounds.

All of it runs serially on the calling thread, by design. Neither torch's ``.float()`` nor a parallel
region here: each parallel region is a fork and a join, and on a machine where another process holds a
core the join waits out a scheduler time slice -- an empty numba region took 5-8 ms on this project's
2-core machine under such load, and torch's conversions between numba kernels (two OpenMP runtimes, each
spinning after its regions) took ~7 ms each for 1 MB tensors. Serial, a 1 MB bfloat16 tensor widens in
~0.05 ms, and the largest grid point's (8 x 8192 x 128) in a few ms: under 1% of its kernels.
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_QUIET_NAN = np.uint32(0x7FC0)  # a NaN stays a NaN (torch's scalar conversion makes this one)
_ROUND = np.uint32(0x7FFF)


@functools.lru_cache(maxsize=None)
def widen_table(dtype: str) -> np.ndarray:
    """float32 value of every 16-bit pattern of ``dtype`` (float16 or bfloat16), indexed by the bits."""
    bits = np.arange(65536, dtype=np.uint32)
    if dtype == "bfloat16":
        return (bits << 16).view(np.float32)
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (a register bitcast, no memory)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(bits), codegen


def _value(x, table):
    """An element as the compute dtype: uint16 bits through ``table`` (float16) or, with no table,
    shifted into a float32's top half (bfloat16, exactly); float arrays' elements as they are."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_value, inline="always")
def _value_impl(x, table):
    if x != types.uint16:
        return lambda x, table: x
    if isinstance(table, types.NoneType):  # a shift vectorizes; the table's gather is ~10x slower
        return lambda x, table: float32_from_bits(np.int32(np.int32(x) << np.int32(16)))
    return lambda x, table: table[x]


@njit(fastmath=True, cache=True)
def widen(x, table, factor, out):
    """``out = value(x) * factor`` over (B, H, N, D) arrays, ``x`` read in place whatever its strides
    (a transposed view is never copied first)."""
    batch, heads, rows, dim = x.shape
    for b in range(batch):
        for h in range(heads):
            for i in range(rows):
                source, target = x[b, h, i], out[b, h, i]
                for d in range(dim):
                    target[d] = _value(source[d], table) * factor


@njit(fastmath=True, cache=True)
def row_dots(a, b, table, out):
    """``out[z, h, i] = sum_d value(a) * value(b)``: the backward's delta = rowsum(dO * O), read from the
    caller's arrays (O is never widened: delta is all the kernels take of it)."""
    batch, heads, rows, dim = a.shape
    for z in range(batch):
        for h in range(heads):
            for i in range(rows):
                left, right = a[z, h, i], b[z, h, i]
                total = out[z, h, i] * 0.0  # zero of the compute dtype: a float64 0.0 would widen the loop
                for d in range(dim):
                    total += _value(left[d], table) * _value(right[d], table)
                out[z, h, i] = total


@njit(cache=True)
def narrow_bfloat16(bits, out):
    """``out`` = the bfloat16 bits of float32 values given as their uint32 ``bits`` (flat arrays):
    rounded to nearest, ties to even, as torch rounds; a NaN stays a (quiet) NaN."""
    for i in range(bits.size):
        x = bits[i]
        if x & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000):
            out[i] = _QUIET_NAN
        else:
            out[i] = (x + _ROUND + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
