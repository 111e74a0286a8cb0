"""Numba CPU kernels: FlashAttention-2 forward and backward over (B, H, N, D) float arrays, with
every feature of ``portattn.extras`` (GQA, alignment, windows, masks, ALiBi, softcap, block
sparsity, key padding, packed sequences, key splits, dropout).

Each parallel task owns one tile of rows (``prange`` over batch x heads x blocks), streams the other
operand through in blocks, and keeps only tile-sized scratch: memory is linear in N. The GEMMs on
tiles go through the BLAS that blas.py chose (``gemm``: MKL's or OpenBLAS's sgemm, numba's dgemm, MKL's
bf16 GEMM for bfloat16 bits); the softmax runs in log2 space with the scale folded in, as the GPU
kernels do, so one ``exp2`` per score. State names follow the other backends: ``m_i`` (running max),
``l_i`` (running sum), ``acc`` (unnormalized output).

Features cost nothing where they do not act. Causality and windows become key ranges: a tile visits
only the key blocks its rows can see (``_key_range``; the backward's key pass only the query tiles
that see its keys, ``_query_range``) and a row works on a column range, never on masked copies.
Block-sparse tiles that the block mask empties are skipped before any load. Only features that
change single scores (softcap, ALiBi, attn_mask, key padding) take a per-row pass,
``_feature_row``; a plain call skips it with one flag. Dropout draws from a counter
(``_dropout_row_key``/``_dropout_uniform``), so the backward and ``dropout_keep`` redraw the very
same mask without storing it. Masked scores inside a visited row are -inf, whose weight is exactly 0.

BLAS runs single-threaded inside the tasks: numba's worker threads already use every core, and a
multi-threaded BLAS inside each of them oversubscribes the machine. MKL is set per task
(``blas_threads_local``); OpenBLAS, which has no per-thread setting, is limited by the caller (launch.py).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import errors, njit, prange, types
from llvmlite import ir
from numba.extending import intrinsic, overload
from numba.np.linalg import ensure_blas

from . import blas
from .operands import float32_from_bits

ensure_blas()  # numba's BLAS helper (``gemm`` calls it for float64 as np.dot does) finds SciPy's BLAS
blas.chosen()  # binds the names the float32 and bfloat16 products call

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# 2**f on [-0.5, 0.5]: 1 + f * P(f), the minimax polynomial of Cephes' exp2f (relative error
# ~1e-7, float32's own rounding). Written out so LLVM vectorizes it; libm's exp is a scalar call.
_EXP2_P = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3,
           5.550332471162809e-2, 2.402264791363012e-1, 6.931472028550421e-1)
# Below this exp2 gives exactly 0. Not at float32's normal limit (2**-126): weights that small times V's
# values are subnormal, and subnormal operands cost the GEMMs microcode assists -- a padded decoding step,
# whose hidden keys all got 2**-125, ran 2.6x slower (MKL's sgemv at 100+ cycles per element). A weight
# under 2**-100 of the row's largest (which is 1) never shows in a float32 sum.
_EXP2_FLOOR = -100.0


@intrinsic
def _fast_max(typingctx, a, b):
    """max(a, b) as LLVM's ``maxnum`` with fast-math flags: unlike numba's ``max`` (a compare and a
    select without flags), a loop of these vectorizes into a ``vmaxps`` reduction -- 0.02 against 0.49
    ns per element on this project's Zen 4. NaN is not propagated (see ``row_max``)."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        value = context.get_value_type(signature.return_type)
        maxnum = builder.module.declare_intrinsic("llvm.maxnum", [value], ir.FunctionType(value, [value, value]))
        return builder.call(maxnum, args, fastmath=("fast",))

    return a(a, b), codegen


@njit(fastmath=False)
def _is_nan(x):
    """Outside fastmath, which folds ``x != x`` to False."""
    return x != x


@njit(inline="always", fastmath=True)
def row_max(row, lo, hi):
    """max(row[lo:hi]) (hi > lo) in one vectorized pass; NaN when the row holds a NaN (the sum beside
    the max carries it: a NaN score must reach O and the LSE, never be dropped by ``maxnum``)."""
    part = row[lo:hi]  # indices from 0: numba's wraparound test on a maybe-negative j blocks vectorizing
    top = part[0]
    total = part[0] - part[0]  # zero of the row's dtype (a float64 0.0 would widen the loop)
    for j in range(part.size):
        top = _fast_max(top, part[j])
        total += part[j]
    return top if not _is_nan(total) else total


@intrinsic
def gemm(typingctx, a, b, c, transpose_a, transpose_b, alpha, beta):
    """``c = alpha * op(a) @ op(b) + beta * c``, op(x) = x.T where ``transpose_x``, on 2-D row-major arrays whose rows
    are contiguous (any row stride: slices of bigger tiles), through the BLAS of blas.py: float32 by its
    SGEMM (MKL's or OpenBLAS's), float64 by numba's own helper (as ``np.dot``), and bfloat16 bits (uint16
    ``a`` and ``b``, float32 ``c``) by MKL's bf16 x bf16 -> float32 GEMM. Unlike ``np.dot(a, b, out)`` it
    accumulates (``beta`` = 1: no product tile and no pass to add it) and scales in the product. Shapes
    are the caller's to get right."""
    arrays = (a, b, c)
    if not all(isinstance(x, types.Array) and x.ndim == 2 for x in arrays):
        return None
    bits = a.dtype == b.dtype == types.uint16 and c.dtype == types.float32
    if not (bits or a.dtype == b.dtype == c.dtype and c.dtype in (types.float32, types.float64)):
        return None
    if bits and not blas.chosen().bfloat16:  # the bf16 name is bound to nothing: a call would jump to address 0
        raise errors.TypingError(f"bfloat16 tile products need MKL; the BLAS here is {blas.chosen().name}")
    signature = types.intc(a, b, c, transpose_a, transpose_b, alpha, beta)

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        a_arr, b_arr, c_arr = (context.make_array(ty)(context, builder, value)
                               for ty, value in zip(signature.args[:3], args[:3]))
        intp = context.get_value_type(types.intp)

        def shape(arr, axis):
            return cgutils.unpack_tuple(builder, arr.shape, 2)[axis]

        def leading(arr, ty):  # the row stride in elements: BLAS's leading dimension
            item = intp(context.get_abi_sizeof(context.get_data_type(ty.dtype)))
            row_stride = builder.sdiv(cgutils.unpack_tuple(builder, arr.strides, 2)[0], item)
            cols = shape(arr, 1)
            # a single row may carry any stride; BLAS wants ld >= the row length
            at_least = builder.select(builder.icmp_signed(">", cols, intp(1)), cols, intp(1))
            return builder.select(builder.icmp_signed(">", row_stride, cols), row_stride, at_least)

        flags = [context.cast(builder, value, ty, types.boolean) for value, ty in zip(args[3:5], signature.args[3:5])]
        rows, cols = shape(c_arr, 0), shape(c_arr, 1)
        inner = builder.select(flags[0], shape(a_arr, 0), shape(a_arr, 1))
        lds = [leading(arr, ty) for arr, ty in zip((a_arr, b_arr, c_arr), signature.args[:3])]
        scalar = context.get_value_type(c.dtype)  # alpha and beta in c's dtype (float32 for bf16 bits too)
        alpha_value, beta_value = (context.cast(builder, value, ty, c.dtype) for value, ty in zip(args[5:7], signature.args[5:7]))
        data = [builder.bitcast(arr.data, cgutils.voidptr_t) for arr in (a_arr, b_arr, c_arr)]
        if bits:
            _call_gemm_bf16(builder, flags, rows, cols, inner, alpha_value, beta_value, data, lds)
        else:
            _call_fortran_gemm(context, builder, c.dtype, scalar, flags, rows, cols, inner, alpha_value, beta_value,
                               data, lds)
        return context.get_constant(types.intc, 0)

    return signature, codegen


def _call_gemm_bf16(builder, flags, rows, cols, inner, alpha, beta, data, lds):
    """cblas_gemm_bf16bf16f32(RowMajor, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)."""
    from numba.core import cgutils

    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i32] * 6 + [ir.FloatType(), cgutils.voidptr_t, i32, cgutils.voidptr_t, i32,
                                                      ir.FloatType(), cgutils.voidptr_t, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, blas.GEMM_BF16)
    ops = [builder.select(flag, i32(112), i32(111)) for flag in flags]  # CblasTrans, CblasNoTrans
    small = [builder.trunc(x, i32) for x in (rows, cols, inner, *lds)]
    builder.call(fn, (i32(101), *ops, *small[:3], alpha, data[0], small[3], data[1], small[4], beta, data[2], small[5]))


def _call_fortran_gemm(context, builder, dtype, scalar, flags, rows, cols, inner, alpha, beta, data, lds):
    """Row-major C = op(A) op(B) as the column-major C^T = op(B)^T op(A)^T that Fortran BLAS computes:
    float32 through blas.py's SGEMM (every argument by pointer), float64 through numba's helper."""
    from numba.core import cgutils
    from numba.np.linalg import check_blas_return

    char = ir.IntType(8)
    op_a, op_b = (builder.select(flag, char(ord("t")), char(ord("n"))) for flag in flags)
    if dtype == types.float64:
        intp = context.get_value_type(types.intp)
        fnty = ir.FunctionType(ir.IntType(32), [char, char, char, intp, intp, intp, cgutils.voidptr_t, cgutils.voidptr_t,
                                                intp, cgutils.voidptr_t, intp, cgutils.voidptr_t, cgutils.voidptr_t, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        slots = [builder.bitcast(cgutils.alloca_once_value(builder, x), cgutils.voidptr_t) for x in (alpha, beta)]
        result = builder.call(fn, (char(ord("d")), op_b, op_a, cols, rows, inner, slots[0], data[1], lds[1], data[0],
                                   lds[0], slots[1], data[2], lds[2]))
        check_blas_return(context, builder, result)
        return
    i32 = ir.IntType(32)
    by_pointer = [cgutils.alloca_once_value(builder, x) for x in
                  (op_b, op_a, *(builder.trunc(n, i32) for n in (cols, rows, inner)), alpha,
                   builder.trunc(lds[1], i32), builder.trunc(lds[0], i32), beta, builder.trunc(lds[2], i32))]
    p_op_b, p_op_a, p_cols, p_rows, p_inner, p_alpha, p_ldb, p_lda, p_beta, p_ldc = by_pointer
    fnty = ir.FunctionType(ir.VoidType(), [char.as_pointer()] * 2 + [i32.as_pointer()] * 3 + [
        scalar.as_pointer(), cgutils.voidptr_t, i32.as_pointer(), cgutils.voidptr_t, i32.as_pointer(),
        scalar.as_pointer(), cgutils.voidptr_t, i32.as_pointer()])
    fn = cgutils.get_or_insert_function(builder.module, fnty, blas.SGEMM)
    builder.call(fn, (p_op_b, p_op_a, p_cols, p_rows, p_inner, p_alpha, data[1], p_ldb, data[0], p_lda, p_beta, data[2],
                      p_ldc))


@intrinsic
def packed_gemm(typingctx, a, b_pairs, c, accumulate):
    """``c (+)= a @ B`` on torch's bfloat16 micro-kernel (blas.py; AMX): ``a`` (m, k) bfloat16 bits, ``B`` (k, n)
    given VNNI-paired as ``b_pairs`` (k / 2, n) uint32, each holding B[2i, j] (low half) and B[2i + 1, j],
    float32 ``c`` (m, n); every row contiguous, any row stride. k = 2 * b_pairs.shape[0] must be even and
    ``a`` that wide (an odd k stops the process: the caller pads). Only where ``blas.packed_tiles()``."""
    if not (all(isinstance(x, types.Array) and x.ndim == 2 for x in (a, b_pairs, c)) and a.dtype == types.uint16
            and b_pairs.dtype == types.uint32 and c.dtype == types.float32):
        return None
    if blas.chosen().could_pack is None:  # the names are bound to nothing: a call would jump to address 0
        raise errors.TypingError(f"packed bfloat16 tiles need torch's CPU library; the BLAS here is {blas.chosen().name}")

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        arrays = [context.make_array(ty)(context, builder, value) for ty, value in zip(signature.args[:3], args[:3])]
        i64 = ir.IntType(64)

        def leading(arr, item):  # the row stride in elements
            return builder.sdiv(cgutils.unpack_tuple(builder, arr.strides, 2)[0], i64(item))

        rows, cols = cgutils.unpack_tuple(builder, arrays[2].shape, 2)
        pairs = cgutils.unpack_tuple(builder, arrays[1].shape, 2)[0]
        inner = builder.mul(pairs, i64(2))
        flag = context.cast(builder, args[3], signature.args[3], types.boolean)
        ptr = cgutils.voidptr_t
        fnty = ir.FunctionType(ir.VoidType(), [i64] * 6 + [ir.IntType(1), ptr, ptr, ptr, ir.IntType(1)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, blas.BRGEMM_BF16)
        builder.call(fn, (rows, cols, inner, leading(arrays[0], 2), leading(arrays[1], 4), leading(arrays[2], 4), flag,
                          *(builder.bitcast(arr.data, ptr) for arr in arrays), ir.IntType(1)(1)))
        return context.get_dummy_value()

    return types.none(a, b_pairs, c, accumulate), codegen


@intrinsic
def release_tiles(typingctx):
    """Give back this thread's AMX tile state after ``packed_gemm`` calls (torch's ``brgemm_release``): the
    thread is one of numba's workers, whose next task may run other AMX code (MKL's bf16 GEMM)."""

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(1)]),
                                            blas.BRGEMM_RELEASE)
        builder.call(fn, [ir.IntType(1)(1)])
        return context.get_dummy_value()

    return types.none(), codegen


def exp2_shifted(row, scale, shift, out):
    """``out[j] = 2 ** (scale * row[j] - shift)``; returns the sum of those values. ``out`` is ``row`` itself
    (in place: any other float array is ignored) or, for bfloat16 products, a row of bfloat16 bits that gets
    the values rounded to nearest even (no pass of its own). (``scale``: scores from a GEMM that could not
    scale them, ``packed_gemm``; else 1.)"""
    raise NotImplementedError("only callable from numba-compiled code")


# float32 constants throughout: a float64 one would promote the loops and halve their lanes
_P0, _P1, _P2, _P3, _P4, _P5 = (np.float32(c) for c in _EXP2_P)
_FLOOR32, _HALF32, _ONE32, _ZERO32 = np.float32(_EXP2_FLOOR), np.float32(0.5), np.float32(1.0), np.float32(0.0)


@njit(inline="always", fastmath=True)
def _exp2_float32(x):
    """2**x for float32 x: 2**t = 2**n * 2**f with n = round(t), f in [-0.5, 0.5]; the polynomial gives 2**f,
    and 2**n is the float whose exponent field is n + 127, made in a register (a second pass adding n << 23
    to the stored bits cost 1.6x). (np.floor, not math.floor: the latter returns int64, which AVX2 cannot
    convert in vectors.)"""
    below = x < _FLOOR32  # with fastmath a NaN may land either side; exp2(NaN) stays NaN below
    if below:
        x = _FLOOR32
    n = np.floor(x + _HALF32)
    f = x - n
    p = _ONE32 + f * (((((_P0 * f + _P1) * f + _P2) * f + _P3) * f + _P4) * f + _P5)
    p *= float32_from_bits(np.int32(np.int32(np.int32(n) + np.int32(127)) << np.int32(23)))
    return _ZERO32 if below else p  # exactly 0, never a subnormal-making 2**-100 (``_EXP2_FLOOR``)


@overload(exp2_shifted, inline="always")
def _exp2_shifted_impl(row, scale, shift, out):
    if row.dtype == types.float32 and out.dtype == types.uint16:
        def exp2_into_bits(row, scale, shift, out):
            total, factor = _ZERO32, np.float32(scale)
            for j in range(row.size):
                p = _exp2_float32(row[j] * factor - shift)
                out[j] = bfloat16_bits(p)
                total += p
            return total

        return exp2_into_bits

    # ``out`` is ``row`` (the contract): written through ``row`` alone, since stores through a second array
    # object that LLVM cannot prove the same kept the loop scalar (the float32 forward ran at half speed)
    if row.dtype == types.float32:
        def exp2_float32(row, scale, shift, out):  # one pass over the row, the sum in the same loop
            total, factor = _ZERO32, np.float32(scale)
            for j in range(row.size):
                p = _exp2_float32(row[j] * factor - shift)
                row[j] = p
                total += p
            return total

        return exp2_float32

    def exp2_generic(row, scale, shift, out):  # float64: accuracy over speed
        for j in range(row.size):
            row[j] = np.exp2(row[j] * scale - shift)
        return row.sum()

    return exp2_generic


@intrinsic
def blas_threads_local(typingctx, threads):
    """Set this thread's BLAS threads (MKL's per-thread setting: numba's workers must not each start
    MKL's own pool) and return the previous setting, to restore at the end of the task: the calling
    thread is one of numba's workers and keeps its setting after the kernel. A no-op under OpenBLAS,
    which ``launch.run_with`` limits for the whole call (blas.py)."""
    if not isinstance(threads, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        from numba.core import cgutils

        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [i32]), blas.THREADS_LOCAL)
        return builder.call(fn, [context.cast(builder, args[0], signature.args[0], types.int32)])

    return types.int32(threads), codegen


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM vectorize the calling function's loops with 512-bit registers where the CPU has them.
    Its cost model keeps Intel's AVX-512 cores at 256 bits by default (``prefer-vector-width``, against
    the clock drop of older Xeons); on the project's Sapphire Rapids the exp2 pass of a 256 x 512 score
    tile took 38 us in 256-bit vectors, 25 in 512-bit ones. Called inside a ``prange`` body it marks the
    outlined task function, so only the kernels' loops are affected, never a user's numba code.
    (llvmlite accepts only flag attributes, hence ``set.add``: an LLVM string attribute is valid IR.)"""

    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _bits_of(typingctx, x):
    """The uint32 bit pattern of the float32 ``x`` (a register bitcast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


def operand_like(x, tile, scratch):
    """The float32 ``tile`` as a GEMM with ``x`` takes it: ``tile`` itself, or, when ``x`` holds bfloat16
    bits, ``tile`` rounded (to nearest even) into bfloat16 bits in ``scratch`` -- P and dS enter the bf16
    products as the GPU kernels' do, while every sum stays float32."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(operand_like, inline="always")
def _operand_like_impl(x, tile, scratch):
    if x.dtype != types.uint16:
        return lambda x, tile, scratch: tile

    def narrowed(x, tile, scratch):
        rows, cols = tile.shape
        out = scratch[: rows * cols].reshape(rows, cols)
        for r in range(rows):
            for c in range(cols):
                out[r, c] = bfloat16_bits(tile[r, c])
        return out

    return narrowed


_ROUND_BIT, _ROUND_HALF = np.uint32(1), np.uint32(0x7FFF)


@njit(inline="always")
def bfloat16_bits(x):
    """The float32 ``x`` rounded to nearest even bfloat16, as its bits. Arithmetic NaNs (0x7FC00000) stay
    NaN; the kernels' tiles hold no other."""
    value = _bits_of(x)
    return np.uint16((value + _ROUND_HALF + ((value >> np.uint32(16)) & _ROUND_BIT)) >> np.uint32(16))


# Tile scratch rows lie ``block + ROW_PAD`` elements apart, never a power of two: with 512 float32 scores
# (2 KiB) per row, the 16 rows a GEMM micro-kernel stores at once all fall in the same L1 cache sets. A
# 256 x 512 x 64 bfloat16 score product took 45.6 us into rows 512 apart, 17.1 us into rows 528 apart (one
# measurement on the project's Xeon VM, whose micro-kernel times vary ~2x with the buffers' placement).
ROW_PAD = 16


@njit(parallel=True, cache=True)
def pair_keys(k_words, block_k, out):
    """K^T VNNI-paired per key block, the right operand of the score product on ``packed_gemm``:
    ``out[b, h, kb, i, n]`` = K[b, h, kb * block_k + n, 2i] (low half) and K[..., 2i + 1], read from ``k_words``,
    K's bfloat16 bits viewed as (B, H, N, D / 2) uint32 pairs -- so the packing is a transpose of words.
    Zero past the keys."""
    batch, heads, seqlen, _ = k_words.shape
    blocks = out.shape[2]
    for task in prange(batch * heads * blocks):
        b, h, kb = task // (heads * blocks), (task // blocks) % heads, task % blocks
        j0 = kb * block_k
        tile = out[b, h, kb]
        cols = min(block_k, seqlen - j0)
        for i in range(tile.shape[0]):
            tile[i, cols:] = 0
        for n0 in range(0, cols, 16):  # 16 keys at a time: their rows stay in L1 while each pair row is written
            n1 = min(n0 + 16, cols)
            words = k_words[b, h, j0 + n0:j0 + n1]
            for i in range(tile.shape[0]):
                for n in range(n1 - n0):
                    tile[i, n0 + n] = words[n, i]


@njit(parallel=True, cache=True)
def pair_values(v, out):
    """V VNNI-paired, the right operand of P V on ``packed_gemm``: ``out[b, h, c, d]`` = V[b, h, 2c, d] (low
    half) and V[b, h, 2c + 1, d], from V's bfloat16 bits; an odd last key is paired with 0."""
    batch, heads, seqlen, head_dim = v.shape
    pairs = out.shape[2]
    for task in prange(batch * heads):
        b, h = task // heads, task % heads
        for c in range(pairs):
            low, paired = v[b, h, 2 * c], out[b, h, c]
            if 2 * c + 1 < seqlen:
                high = v[b, h, 2 * c + 1]
                for d in range(head_dim):
                    paired[d] = np.uint32(low[d]) | (np.uint32(high[d]) << np.uint32(16))
            else:
                for d in range(head_dim):
                    paired[d] = np.uint32(low[d])


def _weights_row(k_pairs, row, p_bits, r, width):
    """Where the forward's exp2 pass writes row r's weights P: over its scores ``row`` (the GEMM path), or into
    ``p_bits`` as bfloat16 bits ``width`` wide (the packed path, when ``k_pairs`` is given)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_weights_row, inline="always")
def _weights_row_impl(k_pairs, row, p_bits, r, width):
    if isinstance(k_pairs, types.NoneType):
        return lambda k_pairs, row, p_bits, r, width: row
    return lambda k_pairs, row, p_bits, r, width: p_bits[r, :width]


def _unit(x):
    """1 in the type of the float ``x`` (a float64 1.0 would widen float32 row loops)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_unit, inline="always")
def _unit_impl(x):
    if x == types.float32:
        return lambda x: np.float32(1.0)
    return lambda x: 1.0


def bits_scratch(x, size):
    """Room for a tile of ``size`` bfloat16 bits when ``x`` holds them (``operand_like``), else none."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(bits_scratch, inline="always")
def _bits_scratch_impl(x, size):
    if x.dtype != types.uint16:
        return lambda x, size: np.empty(0, np.uint16)
    return lambda x, size: np.empty(size, np.uint16)


# --- what a call adds to plain attention ---------------------------------------------------------

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2
BLOCKS_NONE, BLOCKS_ALL, BLOCKS_MIXED = 0, 1, 2  # how much of a tile the block mask keeps

# splitmix64's increment and finalizer constants (Steele, Lea & Flood, 2014), for the dropout counter
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


class Features(NamedTuple):
    """Everything beyond q, k and v that the kernels need, as one numba-typed argument.

    launch.py builds it: arrays are read-only, C-contiguous and of fixed dtypes, with 1-element
    dummies for absent features, so every call of one compute dtype runs the same compiled kernels
    (numba specializes on types, not values). Axes the API broadcast are cut back to length 1 and
    indexed through ``_bc``, so a broadcast mask is never materialized.
    """

    group_size: int  # query heads per K/V head (GQA): query head h reads K/V head h // group_size
    causal: bool
    bottom_right: bool  # query i sits at key position i + Nk - Nq (else i)
    window_left: int  # keys before the query's position that it sees; -1: unbounded
    window_right: int  # keys after it; -1: unbounded
    softcap: float  # 0.0: none
    alibi: bool
    slopes: np.ndarray  # (B or 1, H or 1) of the compute dtype
    mask_kind: int  # MASK_NONE, MASK_BOOL or MASK_ADDITIVE
    bool_mask: np.ndarray  # (B or 1, H or 1, Nq or 1, Nk or 1) bool: True = attend
    additive_mask: np.ndarray  # the same axes, the compute dtype: added to the scores
    key_padding: bool
    padding: np.ndarray  # (B, Nk) bool: True = a real key
    sparse_q: int  # block_mask granularity (queries, keys); 0: no block mask
    sparse_k: int
    block_mask: np.ndarray  # (B or 1, H or 1, query blocks, key blocks) bool
    dropout_p: float  # 0.0: no dropout
    dropout_seed: int
    varlen: bool  # packed sequences: arrays are (1, H, total, D), sequence b at rows cu[b]:cu[b + 1]
    cu_q: np.ndarray  # int64 (B + 1,) row offsets (varlen)
    cu_k: np.ndarray
    row_pass: bool  # some score needs per-element work: softcap, ALiBi, attn_mask or key padding


@njit(inline="always")
def _ceil_div(a, b):
    return -(-a // b)


@njit(inline="always")
def _bc(index, size):
    """``index`` along an axis that may have been broadcast (and is then kept at length 1)."""
    return index if size > 1 else 0


@njit(inline="always")
def _sequences(feat, batch):
    """How many sequences the batch holds: the batch axis, or the packed ones (varlen)."""
    return feat.cu_q.size - 1 if feat.varlen else batch


@njit(inline="always")
def _longest(cu, total, varlen):
    """Nq (or Nk): the array's length, or the longest packed sequence's."""
    if not varlen:
        return total
    longest = 0
    for b in range(cu.size - 1):
        longest = max(longest, cu[b + 1] - cu[b])
    return longest


@njit(inline="always")
def _sequence(feat, b, total_q, total_k):
    """(first row, Nq, first key row, Nk) of sequence b in the arrays (whole arrays unless varlen)."""
    if feat.varlen:
        return feat.cu_q[b], feat.cu_q[b + 1] - feat.cu_q[b], feat.cu_k[b], feat.cu_k[b + 1] - feat.cu_k[b]
    return 0, total_q, 0, total_k


@njit(inline="always")
def _query_offset(feat, seqlen_q, seqlen_k):
    """Key position of query 0: 0 top-left, Nk - Nq bottom-right."""
    return seqlen_k - seqlen_q if feat.bottom_right else 0


@njit(inline="always")
def _key_range(feat, first_position, last_position, seqlen_k):
    """Keys [lo, hi) that causality and the window let queries at positions first..last see
    (hi <= lo: none). Everything outside is skipped, never computed and masked."""
    lo, hi = 0, seqlen_k
    if feat.causal:
        hi = min(hi, last_position + 1)
    if feat.window_right >= 0:
        hi = min(hi, last_position + feat.window_right + 1)
    if feat.window_left >= 0:
        lo = max(lo, first_position - feat.window_left)
    return lo, hi


@njit(inline="always")
def _query_range(feat, first_key, last_key, seqlen_q, offset):
    """Queries [lo, hi) that may see some key of first..last: ``_key_range`` solved for the query
    (the backward's key pass streams only these)."""
    lo, hi = 0, seqlen_q
    if feat.causal:  # position >= first_key
        lo = max(lo, first_key - offset)
    if feat.window_right >= 0:  # position + right >= first_key
        lo = max(lo, first_key - feat.window_right - offset)
    if feat.window_left >= 0:  # position - left <= last_key
        hi = min(hi, last_key + feat.window_left - offset + 1)
    return lo, hi


@njit(inline="always")
def _row_columns(feat, position, seqlen_k, j0, cols):
    """Columns [lo, hi) of the key block starting at j0 that the query at ``position`` may see."""
    lo, hi = _key_range(feat, position, position, seqlen_k)
    return max(0, lo - j0), min(cols, hi - j0)


@njit(inline="always")
def _block_range(lo, hi, block_k, split, splits):
    """Key blocks [first, last) of split ``split`` of the blocks that cover keys [lo, hi)."""
    if hi <= lo:
        return 0, 0
    block_lo, block_hi = lo // block_k, _ceil_div(hi, block_k)
    per_split = _ceil_div(block_hi - block_lo, splits)
    first = block_lo + split * per_split
    return first, min(first + per_split, block_hi)


@njit(inline="always")
def _block_state(feat, b, h, i0, i1, j0, j1):
    """Whether the block mask keeps none, all or part of tile rows i0:i1 x keys j0:j1. Tiles are
    planned inside one sparse block (planner rule S1); a tile that straddles several (a tuned
    plan) is masked key by key (BLOCKS_MIXED)."""
    if feat.sparse_q == 0:
        return BLOCKS_ALL
    blocks = feat.block_mask[_bc(b, feat.block_mask.shape[0]), _bc(h, feat.block_mask.shape[1])]
    kept = 0
    for x in range(i0 // feat.sparse_q, (i1 - 1) // feat.sparse_q + 1):
        for y in range(j0 // feat.sparse_k, (j1 - 1) // feat.sparse_k + 1):
            kept += blocks[x, y]
    seen = ((i1 - 1) // feat.sparse_q - i0 // feat.sparse_q + 1) * ((j1 - 1) // feat.sparse_k - j0 // feat.sparse_k + 1)
    return BLOCKS_NONE if kept == 0 else BLOCKS_ALL if kept == seen else BLOCKS_MIXED


@njit(inline="always")
def _slope_log2(feat, b, h):
    """ALiBi slope of (b, h) in the kernels' log2 units."""
    return feat.slopes[_bc(b, feat.slopes.shape[0]), _bc(h, feat.slopes.shape[1])] * LOG2E


@njit(fastmath=False)
def _feature_row(row, c_lo, c_hi, feat, b, h, i, position, j0, slope_log2, check_blocks, cap_grad):
    """Turn the raw scores ``row[c_lo:c_hi]`` of query i (log2 units: scale * log2(e) * q.k) against
    keys j0 + c into final ones: softcap, then ALiBi, then the additive mask; keys hidden by the
    bool mask, the key padding or (``check_blocks``) the block mask become -inf. With softcap,
    ``cap_grad[c]`` gets its derivative 1 - tanh^2 (used by the backward).

    Returns (row max, whether any score is finite). Compiled without fastmath, which would let
    LLVM assume that no value is infinite.
    """
    s0, s1 = feat.bool_mask.shape[0], feat.bool_mask.shape[1]
    bool_row = feat.bool_mask[_bc(b, s0), _bc(h, s1), _bc(i, feat.bool_mask.shape[2])]
    add_row = feat.additive_mask[_bc(b, feat.additive_mask.shape[0]), _bc(h, feat.additive_mask.shape[1]),
                                 _bc(i, feat.additive_mask.shape[2])]
    padding_row = feat.padding[_bc(b, feat.padding.shape[0])]
    block_row = feat.block_mask[_bc(b, feat.block_mask.shape[0]), _bc(h, feat.block_mask.shape[1]),
                                i // max(1, feat.sparse_q)]
    top = row[c_lo]
    found = False
    for c in range(c_lo, c_hi):
        j = j0 + c
        s = row[c] * 1.0  # float64 while modified
        if feat.softcap > 0.0:
            t = np.tanh(s * LN2 / feat.softcap)
            cap_grad[c] = 1.0 - t * t
            s = feat.softcap * t * LOG2E
        if feat.alibi:
            s -= slope_log2 * abs(position - j)
        if feat.mask_kind == MASK_ADDITIVE:
            s += add_row[_bc(j, add_row.size)] * LOG2E
        hidden = (feat.mask_kind == MASK_BOOL and not bool_row[_bc(j, bool_row.size)]) \
            or (feat.key_padding and not padding_row[j]) \
            or (check_blocks and not block_row[j // feat.sparse_k])
        row[c] = -np.inf if hidden else s
        if row[c] != row[c]:  # a NaN score: the row's max, and so its O and LSE, are NaN (the math, not zeros)
            top = row[c]
            found = True
        elif row[c] > -np.inf and (not found or row[c] > top):
            top = row[c]
            found = True
    return top, found


# --- dropout: a counter-based generator ------------------------------------------------------------


@njit(inline="always")
def _mix64(z):
    """splitmix64's finalizer: a bijection of uint64 whose output bits all depend on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _dropout_row_key(seed, b, h, i):
    """The counter of row (b, h, i): mix(mix(mix(seed + G(b+1)) + G(h+1)) + G(i+1)), G the golden
    gamma 0x9E3779B97F4A7C15, in uint64 arithmetic (wrapping). One per row, outside the key loop."""
    z = _mix64(np.uint64(seed) + _GAMMA * np.uint64(b + 1))
    z = _mix64(z + _GAMMA * np.uint64(h + 1))
    return _mix64(z + _GAMMA * np.uint64(i + 1))


@njit(inline="always")
def _dropout_uniform(row_key, j):
    """Uniform in [0, 1) for key j of a row: the top 53 bits of mix(row_key + G(j+1)) / 2**53."""
    return np.float64(_mix64(row_key + _GAMMA * np.uint64(j + 1)) >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(inline="always")
def _dropout_row(row, c_lo, c_hi, feat, b, h, i, j0):
    """Keep each weight of ``row[c_lo:c_hi]`` with probability 1 - p, scaled by 1 / (1 - p)."""
    row_key = _dropout_row_key(feat.dropout_seed, b, h, i)
    inverse = 1.0 / (1.0 - feat.dropout_p)
    for c in range(c_lo, c_hi):
        row[c] = row[c] * inverse if _dropout_uniform(row_key, j0 + c) >= feat.dropout_p else 0.0


@njit(parallel=True, cache=True)
def dropout_keep(feat, keep):
    """The (B, H, Nq, Nk) bool mask of kept weights, from the kernels' own counter (for tests):
    keep[b, h, i, j] = uniform(b, h, i, j) >= p, with b the sequence and i, j its own rows and
    keys when varlen."""
    batch, heads, seqlen_q, seqlen_k = keep.shape
    for task in prange(batch * heads * seqlen_q):
        b, h, i = task // (heads * seqlen_q), (task // seqlen_q) % heads, task % seqlen_q
        row_key = _dropout_row_key(feat.dropout_seed, b, h, i)
        for j in range(seqlen_k):
            keep[b, h, i, j] = _dropout_uniform(row_key, j) >= feat.dropout_p


@njit(inline="always")
def _scaled_into(target, source, factor):
    """``target[:] = source * factor`` for rows, with no temporary: ``target[:] = source / l`` allocates a
    row per call, which was a third of a small tile's time (0.8 of 2.6 us for 16 x 16 x 64)."""
    for d in range(source.size):
        target[d] = source[d] * factor


@njit(fastmath=False)
def _has_keys(lse):
    """False for a row that saw no key (LSE -inf); outside fastmath, which may fold inf tests away."""
    return lse > -np.inf


# --- forward ----------------------------------------------------------------------------------------


@njit(parallel=True, fastmath=True, cache=True)
def forward(q, k, v, out, lse, feat, q_factor, block_q, block_k, key_splits, k_pairs=None, v_pairs=None):
    """O and LSE (natural log) for (B, H, N, D) arrays into ``out``/``lse`` (both of q's dtype, float32
    for bfloat16 bits).

    q, k and v are float arrays, or bfloat16 bits (uint16) whose products run on blas.py's bf16 GEMM,
    the weights rounded to bfloat16 for P V. The score GEMM multiplies by ``q_factor`` (the softmax
    scale times log2(e)) as it writes: the scores come out ready for ``exp2``, with no pass over a
    score tile to scale them and no scaled copy of q. K/V head h // group_size serves query head h
    (GQA). A query tile visits only the key blocks its rows can see (causal, window) and that the
    block mask keeps; a row's score work beyond the GEMM is a column range, plus ``_feature_row``
    when a feature touches single scores.

    With ``key_splits > 1`` each query tile's key blocks are cut in that many independent tasks
    whose partial results are merged by log-sum-exp afterwards (flash-decoding).

    Given ``k_pairs``/``v_pairs`` (bfloat16 bits only: ``pair_keys``/``pair_values`` of k and v, packed once
    per call; a positive ``q_factor``, an even head dim and ``block_k``, no varlen), both products run on
    ``packed_gemm``, which cannot scale: the row passes multiply the raw scores by ``q_factor``.
    """
    batch, heads, total_q, head_dim = q.shape
    total_k = k.shape[2]
    sequences = _sequences(feat, batch)
    query_blocks = _ceil_div(_longest(feat.cu_q, total_q, feat.varlen), block_q)
    part_out = np.empty((key_splits, batch, heads, total_q, head_dim), out.dtype) if key_splits > 1 else out[None]
    part_lse = np.empty((key_splits, batch, heads, total_q), lse.dtype) if key_splits > 1 else lse[None]
    tasks = sequences * heads * query_blocks * key_splits
    for task in prange(tasks):
        split = task % key_splits
        query_block = (task // key_splits) % query_blocks
        bh = task // (key_splits * query_blocks)
        b, h = bh // heads, bh % heads
        q0, seqlen_q, k0, seqlen_k = _sequence(feat, b, total_q, total_k)
        i0 = query_block * block_q
        if i0 >= seqlen_q:  # a shorter packed sequence: no such tile
            continue
        wide_vectors()
        threads = blas_threads_local(1)
        i1 = min(i0 + block_q, seqlen_q)
        rows = i1 - i0
        ab = 0 if feat.varlen else b  # the arrays' batch index
        hk = h // feat.group_size
        offset = _query_offset(feat, seqlen_q, seqlen_k)
        lo, hi = _key_range(feat, i0 + offset, i1 - 1 + offset, seqlen_k)
        first, last = _block_range(lo, hi, block_k, split, key_splits)
        slope_log2 = _slope_log2(feat, b, h)

        acc = np.zeros((rows, head_dim), out.dtype)
        m_i = np.full(rows, -np.inf, out.dtype)
        l_i = np.zeros(rows, out.dtype)
        scores = np.empty(rows * (block_k + ROW_PAD), out.dtype)
        cap_grad = np.empty(block_k, out.dtype)  # unused by the forward
        weight_bits = bits_scratch(v, rows * block_k)
        # P as packed_gemm takes it: bfloat16 bits that the exp2 pass writes (rows ROW_PAD apart, an even width)
        p_bits = np.empty((0 if k_pairs is None else rows, block_k + ROW_PAD), np.uint16)
        q_tile = q[ab, h, q0 + i0:q0 + i1]
        score_scale = _unit(q_factor) if k_pairs is None else q_factor  # what the score GEMM left undone
        for key_block in range(first, last):
            j0 = key_block * block_k
            j1 = min(j0 + block_k, seqlen_k)
            cols = j1 - j0
            blocks = _block_state(feat, b, h, i0, i1, j0, j1)
            if blocks == BLOCKS_NONE:  # an empty sparse block: never loaded, never multiplied
                continue
            row_pass = feat.row_pass or blocks == BLOCKS_MIXED
            tile = scores[: rows * (cols + ROW_PAD)].reshape(rows, cols + ROW_PAD)
            s = tile[:, :cols]  # for the GEMMs; the row passes read ``tile``'s rows, which vectorize
            if k_pairs is None:
                gemm(q_tile, k[ab, hk, k0 + j0:k0 + j1], s, False, True, q_factor, 0.0)
            else:
                packed_gemm(q_tile, k_pairs[ab, hk, key_block, :, :cols], s, False)
            width = cols + cols % 2  # packed_gemm's inner size is even: a 0 weight meets the 0 paired with an odd last key
            for r in range(rows):
                i = i0 + r
                c_lo, c_hi = _row_columns(feat, i + offset, seqlen_k, j0, cols)
                row = tile[r, :cols]
                weights = _weights_row(k_pairs, row, p_bits, r, width)
                if c_hi <= c_lo:
                    weights[:] = 0
                    continue
                row_scale = score_scale
                if row_pass:  # features work on scores in log2 units
                    if row_scale != 1.0:
                        _scaled_into(row[c_lo:c_hi], row[c_lo:c_hi], row_scale)
                        row_scale = _unit(q_factor)
                    top, found = _feature_row(row, c_lo, c_hi, feat, b, h, i, i + offset, j0, slope_log2,
                                              blocks == BLOCKS_MIXED, cap_grad)
                    if not found:  # every key of this block is masked for the row
                        weights[:] = 0
                        continue
                else:
                    top = row_max(row, c_lo, c_hi) * row_scale
                m_new = max(m_i[r], top)
                alpha = np.exp2(m_i[r] - m_new)  # 0 on the first visible block (m_i = -inf)
                l_i[r] = l_i[r] * alpha + exp2_shifted(row[c_lo:c_hi], row_scale, m_new, weights[c_lo:c_hi])
                if c_lo > 0 or c_hi < weights.size:  # the causal diagonal, a window edge, an odd last key
                    weights[:c_lo] = 0
                    weights[c_hi:] = 0
                m_i[r] = m_new
                if alpha != 1.0:  # the max moved: rescale what was summed under the old one
                    acc[r] *= alpha
                if feat.dropout_p > 0.0:  # after l_i: the LSE is that of the undropped weights (not packed: launch.py)
                    _dropout_row(row, c_lo, c_hi, feat, b, h, i, j0)
            if k_pairs is None:
                v_tile = v[ab, hk, k0 + j0:k0 + j1]
                gemm(operand_like(v_tile, s, weight_bits), v_tile, acc, False, False, 1.0, 1.0)  # acc += P V, in the product
            else:
                packed_gemm(p_bits[:, :width], v_pairs[ab, hk, j0 // 2:(j0 + width) // 2], acc, True)
        for r in range(rows):
            at = q0 + i0 + r
            if l_i[r] > 0.0:
                _scaled_into(part_out[split, ab, h, at], acc[r], 1.0 / l_i[r])
                part_lse[split, ab, h, at] = (m_i[r] + np.log2(l_i[r])) * LN2
            else:  # no visible key: zeros and -inf, never NaN
                part_out[split, ab, h, at] = 0.0
                part_lse[split, ab, h, at] = -np.inf
        if k_pairs is not None:
            release_tiles()
        blas_threads_local(threads)
    if key_splits > 1:
        _merge_splits(part_out, part_lse, out, lse)


@njit(parallel=True, cache=True)  # no fastmath: splits that saw no key carry LSE -inf
def _merge_splits(part_out, part_lse, out, lse):
    """out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s(lse_s); empty rows stay zero."""
    splits, batch, heads, seqlen_q, _ = part_out.shape
    for row in prange(batch * heads * seqlen_q):
        b = row // (heads * seqlen_q)
        h = (row // seqlen_q) % heads
        i = row % seqlen_q
        top = -np.inf
        for s in range(splits):
            top = max(top, part_lse[s, b, h, i])
        out[b, h, i] = 0.0
        if top == -np.inf:
            lse[b, h, i] = -np.inf
            continue
        total = 0.0
        for s in range(splits):
            total += np.exp(part_lse[s, b, h, i] - top)
        for s in range(splits):
            weight = np.exp(part_lse[s, b, h, i] - top) / total
            out[b, h, i] += weight * part_out[s, b, h, i]
        lse[b, h, i] = top + np.log(total)


# --- backward ---------------------------------------------------------------------------------------


@njit(inline="always")
def _probabilities_and_ds(q_scaled_tile, q_factor, k_tile, v_tile, do_tile, lse_log2, has_keys, delta, feat, b, h, i0,
                          j0, offset, seqlen_k, slope_log2, blocks, p, dp, cap_grad):
    """Recompute P = exp2(scores - LSE * log2e) for one tile (the forward's scores: same column
    ranges, same ``_feature_row``), then dS = P * (dP - delta) into ``dp``, times softcap's
    derivative. With dropout, dP is masked and scaled as the forward's weights were and ``p`` ends
    up holding the dropped weights (what dV takes), while dS uses the undropped ones. The scores are
    ``q_factor`` * ``q_scaled_tile`` K^T (see ``backward_key_pass``)."""
    rows, cols = p.shape
    gemm(q_scaled_tile, k_tile, p, False, True, q_factor, 0.0)
    gemm(do_tile, v_tile, dp, False, True, 1.0, 0.0)
    row_pass = feat.row_pass or blocks == BLOCKS_MIXED
    for r in range(rows):
        # dS is written as dp[r, c], not through a row view: numba's 2-D indexing keeps this loop
        # vectorized (a view of dp's row beside p's cost the backward ~25%)
        i = i0 + r
        c_lo, c_hi = _row_columns(feat, i + offset, seqlen_k, j0, cols)
        row = p[r]
        if c_hi <= c_lo or not has_keys[r]:
            row[:] = 0.0
            dp[r] = 0.0
            continue
        if row_pass:
            _, found = _feature_row(row, c_lo, c_hi, feat, b, h, i, i + offset, j0, slope_log2,
                                    blocks == BLOCKS_MIXED, cap_grad)
            if not found:
                row[:] = 0.0
                dp[r] = 0.0
                continue
        exp2_shifted(row[c_lo:c_hi], 1.0, lse_log2[r], row[c_lo:c_hi])
        row[:c_lo] = 0.0
        row[c_hi:] = 0.0
        if feat.dropout_p > 0.0:
            row_key = _dropout_row_key(feat.dropout_seed, b, h, i)
            inverse = 1.0 / (1.0 - feat.dropout_p)
            for c in range(c_lo, c_hi):
                kept = inverse if _dropout_uniform(row_key, j0 + c) >= feat.dropout_p else 0.0
                dp[r, c] = row[c] * (dp[r, c] * kept - delta[r])
                row[c] *= kept
        else:  # over every column: zeros where P is zero
            for c in range(cols):
                dp[r, c] = row[c] * (dp[r, c] - delta[r])
        if feat.softcap > 0.0:
            for c in range(c_lo, c_hi):
                dp[r, c] *= cap_grad[c]
        if c_lo > 0 or c_hi < cols:  # outside the columns P is zero, so dS is too
            dp[r, :c_lo] = 0.0
            dp[r, c_hi:] = 0.0


@njit(inline="always")
def _load_lse(lse, ab, h, at, rows, lse_log2, has_keys):
    """A tile's LSE rows in log2 units, and which rows saw any key."""
    for r in range(rows):
        has_keys[r] = _has_keys(lse[ab, h, at + r])
        lse_log2[r] = lse[ab, h, at + r] * LOG2E if has_keys[r] else 0.0


@njit(parallel=True, fastmath=True, cache=True)
def backward_key_pass(q, q_scaled, q_factor, k, v, do, lse, delta, dq, dk, dv, scale, feat, block_q, block_k,
                      key_blocks_per_task, accumulate_dq):
    """dK, dV (and dQ when ``accumulate_dq``) for (B, H, N, D) arrays; ``delta`` = rowsum(dO * O).

    A task owns ``key_blocks_per_task`` consecutive key blocks of one K/V head and streams, for
    each query head of its group (GQA: summed, K/V never repeated), the query tiles that can see
    them (causal and window bound the range; block-sparse skips empty tiles). dQ may only be
    accumulated here when a task owns all of a head's key blocks, so no two tasks add into the
    same dQ rows. The scores are ``q_factor`` * ``q_scaled`` K^T in log2 units (see ``forward``):
    float arrays come with q_scaled = q times scale times log2(e) and a factor of 1, bfloat16 bits
    (uint16; dq, dk, dv float32) with q_scaled = q and that factor. ``scale`` is a scalar of dq's dtype.
    """
    batch, kv_heads, total_k, head_dim = k.shape
    total_q = q.shape[2]
    group = feat.group_size
    sequences = _sequences(feat, batch)
    key_blocks = _ceil_div(_longest(feat.cu_k, total_k, feat.varlen), block_k)
    tasks_per_head = _ceil_div(key_blocks, key_blocks_per_task)
    for task in prange(sequences * kv_heads * tasks_per_head):
        bh = task // tasks_per_head
        b, hk = bh // kv_heads, bh % kv_heads
        q0, seqlen_q, k0, seqlen_k = _sequence(feat, b, total_q, total_k)
        ab = 0 if feat.varlen else b
        offset = _query_offset(feat, seqlen_q, seqlen_k)
        first = (task % tasks_per_head) * key_blocks_per_task
        p = np.empty(block_q * block_k, dq.dtype)
        dp = np.empty(block_q * block_k, dq.dtype)
        lse_log2 = np.empty(block_q, dq.dtype)
        has_keys = np.empty(block_q, np.bool_)
        cap_grad = np.empty(block_k, dq.dtype)
        weight_bits, ds_bits = bits_scratch(do, block_q * block_k), bits_scratch(q, block_q * block_k)
        wide_vectors()
        threads = blas_threads_local(1)
        for key_block in range(first, min(first + key_blocks_per_task, key_blocks)):
            j0 = key_block * block_k
            if j0 >= seqlen_k:  # a shorter packed sequence
                break
            j1 = min(j0 + block_k, seqlen_k)
            cols = j1 - j0
            dk_acc = np.zeros((cols, head_dim), dq.dtype)
            dv_acc = np.zeros((cols, head_dim), dq.dtype)
            q_lo, q_hi = _query_range(feat, j0, j1 - 1, seqlen_q, offset)  # only these queries see the keys
            for h in range(hk * group, (hk + 1) * group):
                slope_log2 = _slope_log2(feat, b, h)
                for query_block in range(q_lo // block_q, _ceil_div(q_hi, block_q) if q_hi > q_lo else 0):
                    i0 = query_block * block_q
                    i1 = min(i0 + block_q, seqlen_q)
                    rows = i1 - i0
                    blocks = _block_state(feat, b, h, i0, i1, j0, j1)
                    if blocks == BLOCKS_NONE:
                        continue
                    pt = p[: rows * cols].reshape(rows, cols)
                    ds = dp[: rows * cols].reshape(rows, cols)
                    _load_lse(lse, ab, h, q0 + i0, rows, lse_log2, has_keys)
                    _probabilities_and_ds(q_scaled[ab, h, q0 + i0:q0 + i1], q_factor, k[ab, hk, k0 + j0:k0 + j1],
                                          v[ab, hk, k0 + j0:k0 + j1], do[ab, h, q0 + i0:q0 + i1], lse_log2, has_keys,
                                          delta[ab, h, q0 + i0:q0 + i1], feat, b, h, i0, j0, offset, seqlen_k,
                                          slope_log2, blocks, pt, ds, cap_grad)
                    do_tile, q_tile = do[ab, h, q0 + i0:q0 + i1], q[ab, h, q0 + i0:q0 + i1]
                    ds_operand = operand_like(q_tile, ds, ds_bits)
                    # accumulated in the products (beta = 1), dQ scaled there too (alpha)
                    gemm(operand_like(do_tile, pt, weight_bits), do_tile, dv_acc, True, False, 1.0, 1.0)
                    gemm(ds_operand, q_tile, dk_acc, True, False, 1.0, 1.0)
                    if accumulate_dq:
                        gemm(ds_operand, k[ab, hk, k0 + j0:k0 + j1], dq[ab, h, q0 + i0:q0 + i1], False, False, scale, 1.0)
            for c in range(cols):
                _scaled_into(dk[ab, hk, k0 + j0 + c], dk_acc[c], scale)
            dv[ab, hk, k0 + j0:k0 + j1] = dv_acc
        blas_threads_local(threads)


@njit(parallel=True, fastmath=True, cache=True)
def backward_query_pass(q_scaled, q_factor, k, v, do, lse, delta, dq, scale, feat, block_q, block_k):
    """dQ alone, a task per query tile over the key blocks it can see: used when tasks of the key
    pass share heads."""
    batch, heads, total_q, head_dim = q_scaled.shape
    total_k = k.shape[2]
    sequences = _sequences(feat, batch)
    query_blocks = _ceil_div(_longest(feat.cu_q, total_q, feat.varlen), block_q)
    for task in prange(sequences * heads * query_blocks):
        bh = task // query_blocks
        b, h = bh // heads, bh % heads
        q0, seqlen_q, k0, seqlen_k = _sequence(feat, b, total_q, total_k)
        i0 = (task % query_blocks) * block_q
        if i0 >= seqlen_q:
            continue
        i1 = min(i0 + block_q, seqlen_q)
        rows = i1 - i0
        ab = 0 if feat.varlen else b
        hk = h // feat.group_size
        offset = _query_offset(feat, seqlen_q, seqlen_k)
        slope_log2 = _slope_log2(feat, b, h)
        p = np.empty(rows * block_k, dq.dtype)
        dp = np.empty(rows * block_k, dq.dtype)
        dq_acc = np.zeros((rows, head_dim), dq.dtype)
        lse_log2 = np.empty(rows, dq.dtype)
        has_keys = np.empty(rows, np.bool_)
        cap_grad = np.empty(block_k, dq.dtype)
        ds_bits = bits_scratch(k, rows * block_k)
        wide_vectors()
        threads = blas_threads_local(1)
        _load_lse(lse, ab, h, q0 + i0, rows, lse_log2, has_keys)
        lo, hi = _key_range(feat, i0 + offset, i1 - 1 + offset, seqlen_k)
        first, last = _block_range(lo, hi, block_k, 0, 1)
        for key_block in range(first, last):
            j0 = key_block * block_k
            j1 = min(j0 + block_k, seqlen_k)
            cols = j1 - j0
            blocks = _block_state(feat, b, h, i0, i1, j0, j1)
            if blocks == BLOCKS_NONE:
                continue
            pt = p[: rows * cols].reshape(rows, cols)
            ds = dp[: rows * cols].reshape(rows, cols)
            k_tile = k[ab, hk, k0 + j0:k0 + j1]
            _probabilities_and_ds(q_scaled[ab, h, q0 + i0:q0 + i1], q_factor, k_tile, v[ab, hk, k0 + j0:k0 + j1],
                                  do[ab, h, q0 + i0:q0 + i1], lse_log2, has_keys, delta[ab, h, q0 + i0:q0 + i1], feat,
                                  b, h, i0, j0, offset, seqlen_k, slope_log2, blocks, pt, ds, cap_grad)
            gemm(operand_like(k_tile, ds, ds_bits), k_tile, dq_acc, False, False, 1.0, 1.0)
        for r in range(rows):
            _scaled_into(dq[ab, h, q0 + i0 + r], dq_acc[r], scale)
        blas_threads_local(threads)
