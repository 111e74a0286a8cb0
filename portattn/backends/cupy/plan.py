"""Planner rules for hand-written WMMA kernels (the ``cupy`` backend): exact shared memory, register estimates.

A Triton kernel's tiles are free powers of two and its compiler places the data; a raw CUDA kernel
fixes who holds what, so its plan can say exactly how many bytes of shared memory each kernel takes.
The kernels in ``portattn/backends/cupy/kernels/attention.cu`` give each warp 16 rows (one WMMA
fragment high) and lay shared memory out as the functions below compute; the .cu file
``static_assert``s that its own layout arithmetic equals the figure planned here, and the CI test
``tests/backends/test_cupy_compile.py`` assembles every planned variant for sm_70/sm_75 with
``ptxas -v`` and holds the registers it reports against ``forward_registers``/``backward_registers``.

Rules (W for WMMA), stated where they act:
  * W1 fp16 on sm_70+ and bf16 on sm_80+ (WMMA has no bf16 before Ampere); float32 has no
       16x16x16 fragment and is refused by the backend, not planned.
  * W2 head dim padded to a multiple of 16 (a fragment's k), not to a power of two.
  * W3 a block of ``warps`` warps owns 16 x warps rows (queries in the forward and the dQ pass, keys
       in the dK/dV pass) and streams ``block_k`` (forward) / ``block_n`` (backward) of the other side.
  * W4 shared memory, exactly: operand tiles with rows padded by 8 elements (an odd multiple of 16 B:
       conflict-free fragment loads), ``stages`` streamed K/V (or Q/dO) buffers, per-warp float32
       score scratch, its 16-bit probabilities and one float per row; every region 128-B aligned.
       The float32 epilogue staging reuses the stream buffers. Must fit the per-block opt-in limit.
  * W5 registers: the float32 accumulators (8 per thread per 16x16 fragment) plus operand
       fragments held across the loop, plus a fixed overhead; must stay at or under 255 (the
       per-thread limit), or the kernel is not planned (the backend refuses with this reason).
  * W6 stages: 2 where cp.async exists (sm_80+), else 1 (Volta/Turing copy through registers).
  * W7 ranking: fill the device, then tiles of at least ``MIN_TILE_SIDE`` on both sides, then up to
       ``MIN_RESIDENT_WARPS`` warps resident per SM (counted over the blocks that fit its shared
       memory and registers: a warp waiting on its softmax step is hidden only by other warps), then
       4 warps, then block_k 64, then more stages.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ...devices.description import DeviceSpec
from ...tiling.plan import BackwardTiling, ForwardTiling, TilePlan, assemble_plan

if TYPE_CHECKING:
    from ...spec import AttentionSpec

ROWS_PER_WARP = 16  # one WMMA fragment high
ROW_PAD = 8  # elements added to each operand row: stride becomes an odd multiple of 16 B (W4)
SCORE_PAD = 4  # float32 score rows: likewise
ALIGN = 128  # bytes: every shared-memory region starts on a 128-B line
MAX_REGISTERS = 255  # per thread, every architecture since Kepler
REGISTER_OVERHEAD = 48  # indices, pointers, strides, softmax state, the row map (W5; calibrated by ptxas)
MIN_RESIDENT_WARPS = 8  # W7: two 4-warp blocks per SM
MIN_TILE_SIDE = 32  # W7: smaller tiles re-read K/V (or Q/dO) per 16 rows and issue one-fragment products
FORWARD_WARPS = (4, 8, 2, 1)
FORWARD_BLOCK_K = (64, 32, 128, 16)
BACKWARD_WARPS = (4, 2, 8, 1)
BACKWARD_BLOCK_N = (64, 32, 16)
Q_IN_REGISTERS_MAX_HEAD_DIM = 128  # above this the Q fragments would crowd out the O accumulators


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def padded_head_dim(head_dim: int) -> int:
    """W2."""
    return max(16, -(-head_dim // 16) * 16)


def _tile(rows: int, head_dim_pad: int) -> int:
    return _align(rows * (head_dim_pad + ROW_PAD) * 2)


def _scratch(columns: int) -> int:
    """Per warp: float32 scores, their 16-bit probabilities, one float per row."""
    return _align(16 * (columns + SCORE_PAD) * 4) + _align(16 * (columns + ROW_PAD) * 2) + _align(16 * 4)


def _staging(warps: int, head_dim_pad: int) -> int:
    return _align(warps * 16 * (head_dim_pad + 4) * 4)


def forward_smem_bytes(head_dim_pad: int, warps: int, block_k: int, stages: int) -> int:
    """W4 for ``attention_forward``: Q tile + max(K/V stages, output staging) + per-warp scratch."""
    rows = ROWS_PER_WARP * warps
    stream = max(stages * 2 * _tile(block_k, head_dim_pad), _staging(warps, head_dim_pad))
    return _tile(rows, head_dim_pad) + stream + warps * _scratch(block_k)


def backward_smem_bytes(head_dim_pad: int, warps: int, block_n: int, stages: int) -> int:
    """W4 for both backward kernels: the owned pair of tiles (K, V or Q, dO) + max(stages of the streamed
    pair with their LSE/delta, staging) + per-warp scratch."""
    rows = ROWS_PER_WARP * warps
    stage = 2 * _tile(block_n, head_dim_pad) + 2 * _align(block_n * 4)
    return 2 * _tile(rows, head_dim_pad) + max(stages * stage, _staging(warps, head_dim_pad)) + warps * _scratch(block_n)


def q_in_registers(head_dim_pad: int) -> bool:
    return head_dim_pad <= Q_IN_REGISTERS_MAX_HEAD_DIM


def forward_registers(head_dim_pad: int, block_k: int) -> int:
    """W5 for ``attention_forward``: O accumulators, Q fragments (when held), P fragments, one S accumulator."""
    fragments = head_dim_pad // 16
    q_held = fragments * 8 if q_in_registers(head_dim_pad) else 8
    return fragments * 8 + q_held + (block_k // 16) * 8 + 8 + REGISTER_OVERHEAD


def backward_registers(head_dim_pad: int, block_n: int = 64) -> int:
    """W5 for the dK/dV kernel (the dQ kernel holds one accumulator set instead of two): dK and dV
    accumulators, the S (then dP) accumulators of a 16 x block_n tile, one operand pair in flight."""
    return 2 * (head_dim_pad // 16) * 8 + (block_n // 16) * 8 + 2 * 8 + REGISTER_OVERHEAD


def _resident_blocks(device: DeviceSpec, smem: int, registers: int, warps: int) -> int:
    """W7: blocks of this kernel one SM holds at once, by its shared memory and its registers."""
    return min(device.sram_per_unit // smem, device.registers_per_unit // (registers * 32 * warps))


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


@functools.lru_cache(maxsize=1024)
def plan(spec: "AttentionSpec", device: DeviceSpec) -> TilePlan:
    """W1-W7 for one problem on one device, as a ``TilePlan``: ``warps``/``block_k``/``stages`` are the
    forward's, ``sram_bytes`` its exact shared memory; ``backward.warps`` x 16 rows are owned and
    ``backward.block_q`` streamed by both backward kernels (``backward`` None: no backward fits, and
    the last reason says why). Raises ValueError when no forward tiling fits."""
    pad = padded_head_dim(spec.head_dim)
    stages_options = (2, 1) if device.has_async_copy else (1,)  # W6
    limit = device.sram_per_block
    query_blocks = {warps: spec.batch * spec.heads * _blocks(spec.seqlen_q, ROWS_PER_WARP * warps) for warps in FORWARD_WARPS}
    candidates = []
    for warps in FORWARD_WARPS:
        if 32 * warps > device.max_threads_per_block:
            continue
        for block_k in FORWARD_BLOCK_K:
            registers = forward_registers(pad, block_k)
            if registers > MAX_REGISTERS:
                continue
            for stages in stages_options:
                smem = forward_smem_bytes(pad, warps, block_k, stages)
                if smem > limit:
                    continue
                resident = _resident_blocks(device, smem, registers, warps)
                rank = (query_blocks[warps] >= device.compute_units, min(warps * 16, block_k) >= MIN_TILE_SIDE,
                        min(resident * warps, MIN_RESIDENT_WARPS), warps == 4,
                        block_k == 64, stages, -FORWARD_WARPS.index(warps), -FORWARD_BLOCK_K.index(block_k))
                candidates.append((rank, warps, block_k, stages, smem, registers, resident))
    if not candidates:
        raise ValueError(f"W4/W5: no WMMA tiling of head dim {spec.head_dim} fits {device.name} "
                         f"({limit} B of shared memory per block, {MAX_REGISTERS} registers per thread)")
    _, warps, block_k, stages, smem, registers, resident = max(candidates)
    unit = device.matrix_unit_for(spec.dtype)
    reasons = [
        f"W2 head dim {spec.head_dim} padded to {pad} (WMMA fragments are 16 wide)",
        f"W3/W7 forward: {warps} warps own {ROWS_PER_WARP * warps} query rows and stream {block_k} keys, {stages} stage(s) "
        f"(W6); {len(candidates)} tilings fit",
        f"W4 forward shared memory {smem} B of {limit} B per block, {resident} block(s) resident per SM",
        f"W5 forward ~{registers} registers per thread"
        + (" (Q operand fragments held in registers)" if q_in_registers(pad) else " (Q fragments re-read from shared memory)"),
    ]
    backward, why_backward = _plan_backward(pad, device, stages_options)
    reasons.append(why_backward)
    forward = ForwardTiling(block_q=ROWS_PER_WARP * warps, block_k=block_k, head_dim_padded=pad, warps=warps,
                            threads=32 * warps, stages=stages, work_units=query_blocks[warps], sram_bytes=smem,
                            registers_per_thread=registers)
    return assemble_plan(spec, device, target="gpu", forward=forward, backward=backward, reasons=reasons,
                         matrix_unit=f"wmma.m16n16k16 over {unit.name}" if unit else "wmma.m16n16k16")


def _plan_backward(pad: int, device: DeviceSpec, stages_options) -> tuple[BackwardTiling | None, str]:
    """The backward tiling (``block_q`` streamed rows, ``block_k`` owned rows) and its reason; None when none fits.

    W7 for the backward: tiles of at least ``MIN_TILE_SIDE`` a side, then ``MIN_RESIDENT_WARPS`` resident warps (on the H100 at head dim 128 a
    64-row streamed tile in 2 stages took 130 KiB, leaving one 4-warp block per SM, and ran at 0.7x
    SDPA's memory-efficient kernel), then streamed tiles of 64 rows up to head dim 64 and 32 above (half the
    S/dP accumulators where dK and dV already hold 128 registers), then 4 warps, then more stages."""
    candidates = []
    for warps in BACKWARD_WARPS:
        if 32 * warps > device.max_threads_per_block:
            continue
        for block_n in BACKWARD_BLOCK_N:
            registers = backward_registers(pad, block_n)
            if registers > MAX_REGISTERS:
                continue
            for stages in stages_options:
                smem = backward_smem_bytes(pad, warps, block_n, stages)
                if smem > device.sram_per_block:
                    continue
                resident = _resident_blocks(device, smem, registers, warps)
                preferred = 64 if pad <= 64 else 32
                rank = (min(warps * 16, block_n) >= MIN_TILE_SIDE, min(resident * warps, MIN_RESIDENT_WARPS),
                        block_n == preferred, warps == 4, stages, block_n)
                candidates.append((rank, warps, block_n, stages, smem, registers, resident))
    if not candidates:
        registers = backward_registers(pad, min(BACKWARD_BLOCK_N))
        why = (f"W4/W5 backward: no tiling; dK and dV accumulators for head dim {pad} need ~{registers} registers "
               f"per thread (limit {MAX_REGISTERS}), or no tile fits {device.sram_per_block} B of shared memory per block")
        return None, why
    _, warps, block_n, stages, smem, registers, resident = max(candidates)
    why = (f"W3-W7 backward: {warps} warps own {ROWS_PER_WARP * warps} keys (dK/dV) or queries (dQ) and stream {block_n}, "
           f"{stages} stage(s), {smem} B shared memory ({resident} block(s) per SM), ~{registers} registers; "
           "dQ in a kernel of its own (no atomics)")
    return BackwardTiling(block_q=block_n, block_k=ROWS_PER_WARP * warps, warps=warps, stages=stages, dq_separate=True,
                          sram_bytes=smem), why
