"""The planner: (problem, device) -> `TilePlan`. Pure functions; every rule is stated where it acts.

Two families of rules share one selection scheme, "enumerate legal tilings, drop those that do not
fit, rank the rest by a documented key":

GPU (a thread block owns ``block_q`` query rows of one head and streams K/V blocks through SRAM)
  * G1  head dim is padded to a power of two >= 16: Triton block shapes must be powers of two and
        matrix units take k in multiples of 8 or 16; the padding is masked, never computed on.
  * G2  ``block_q`` is a multiple of the rows one warp's matrix instruction covers (16 for mma.sync
        and WMMA, 32 for AMD's 32x32 MFMA, 8 for Intel DPAS and Apple simdgroup matrices); warps
        beyond block_q / rows_per_warp share rows and split the key columns instead.
  * G3  ``block_k`` is a multiple of the matrix unit's k (P @ V contracts over keys).
  * G4  SRAM: the Q tile plus ``stages`` K and V tiles must fit the per-block shared memory.
  * G5  registers: the float32 accumulators for O (block_q x d) and S (block_q x block_k; P reuses
        them) spread over the block's threads, plus ~24 for indices and row statistics, must stay
        within the per-thread limit, or the kernel spills.
  * G6  stages: 2-3 buffers when the device copies asynchronously (cp.async/TMA): Triton's tutorial
        and FlexAttention both settle on 3 on sm_80/sm_90; 1 where there is no async copy.
  * G7  ranking: fill the device with at least one wave of blocks first, then the largest
        ``block_q`` (K/V are re-read once per query block, so traffic falls as 1/block_q -- the
        N^2 d^2 / M law), then the largest ``block_k`` (fewer loop trips, larger MMAs), then 4
        warps (Triton's default; the peers' tables use 4 or 8), 8, 2, 1, then more stages.
  * G8  when batch x heads x query blocks still cannot fill the device, split the key loop
        (flash-decoding) until it can, keeping >= 2 key blocks per split.
  * G9  matrix-unit GPUs: a preferred tile measured on the H100 (`_preferred_tile`).
  * G10 no matrix unit for the dtype (fp32 on NVIDIA, computed with IEEE FMAs): one tile product
        costs block_q x block_k x d / threads FMAs per thread, which the compiler unrolls and holds
        operand fragments for; above ``GPU_FMA_PER_THREAD`` the kernel spills and its compile time
        explodes (H100, Triton 3.6: 2048 compiles in ~10 s, 8192 in ~60 s), so larger tiles are dropped.
  * S1  block-sparse calls (``spec.block_size`` = (bq, bk)): tiles never straddle two sparse blocks,
        so block_q <= bq and block_k <= bk (powers of two, so they divide); the backward's tiles,
        whose dQ pass swaps the roles of queries and keys, stay <= min(bq, bk).
CPU (a task owns ``block_q`` query rows of one head; GEMMs on tiles go through BLAS)
  * C1  the working set -- Q tile, O accumulator, K and V tiles, the score tile -- in float32 must
        fit the core's L2, so every GEMM operand stays cache-resident (PyTorch's CPU kernel uses
        256 x 512 at d = 64, which is exactly this rule for a 1 MiB L2).
  * C2  ranking: at least 4 tasks per worker thread first (causal rows are uneven; more tasks even
        the load), then the largest ``block_q`` (fewer K/V passes), then the largest ``block_k``.
  * C3  key splits as G8 when tasks are fewer than threads.
  * C4  backward: a task owns a key block; dQ is summed in the same pass when each head is one
        task's alone (batch x heads >= 2 x threads), else computed in a pass of its own (no atomics
        on the CPU).
  * C5  causal: block_k <= block_q. The diagonal tile is multiplied whole and its masked part thrown
        away; a key block wider than the query block wastes more of it (AMD EPYC Zen 4, fp32, d = 64:
        256 x 256 ran 6-12% faster than 256 x 512 at N = 1024-8192, non-causal the two tie). Not for
        Nq <= 16 (a decoding step's few queries): the masked part is under Nq^2 / 2 scores, and 16-key
        blocks made a (4, 8, 1 q, 40 k, 32) step three tile loops per task instead of one.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from ..devices.description import DeviceSpec
from ..spec import DTYPE_BYTES
from .plan import BackwardTiling, ForwardTiling, TilePlan, assemble_plan

if TYPE_CHECKING:  # the spec module imports tiling; importing it back at run time would be circular
    from ..spec import AttentionSpec

GPU_BLOCK_Q = (128, 64, 32, 16)
GPU_BLOCK_K = (128, 64, 32, 16)
GPU_WARPS = (4, 8, 2, 1)  # G7's order of preference: 4 is Triton's default, 8 where registers need it
GPU_MAX_STAGES = 3  # G6
GPU_REGISTER_OVERHEAD = 24  # G5: indices, pointers, m_i and l_i
GPU_BACKWARD_BLOCK_K = (64, 128, 32, 16)  # B1's order
GPU_LONG_BLOCK_K = 64  # G9
GPU_SHORT_LOOP_TRIPS = 16  # G9: fewer key blocks than this per query block (on average) is a short loop
GPU_SHORT_KV_TILE_BYTES = 8 * 1024  # G9: one K (or V) tile per stage on a short loop
CPU_BLOCK_Q = (256, 128, 64, 32, 16)
CPU_BLOCK_K = (512, 256, 128, 64, 32, 16)
CPU_TASKS_PER_THREAD = 4  # C2
GPU_FMA_PER_THREAD = 2048  # G10
MIN_KEY_BLOCKS_PER_SPLIT = 2  # G8/C3: a split with one block does more merging than work


@functools.lru_cache(maxsize=4096)
def plan(spec: "AttentionSpec", device: DeviceSpec) -> TilePlan:
    """The tile plan for ``spec`` on ``device`` (GPU or CPU rules by ``device.kind``).

    Cached: both arguments are frozen, and a repeated call (a training step) should cost a lookup."""
    return _plan_cpu(spec, device) if device.kind == "cpu" else _plan_gpu(spec, device)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _fit_to_problem(sizes: tuple[int, ...], length: int, smallest: int) -> tuple[int, ...]:
    """Drop block sizes larger than the problem needs (a 128-row block for 5 rows wastes work)."""
    cap = max(smallest, next_power_of_two(max(1, length)))
    kept = tuple(s for s in sizes if s <= cap)
    return kept or (min(sizes),)


def _sparse_caps(spec) -> tuple[int, int]:
    """S1: the largest block_q and block_k a block-sparse call allows (no limit otherwise)."""
    return spec.block_size if spec.block_size is not None else (1 << 30, 1 << 30)


def _key_splits(work_units: int, target: int, key_blocks: int) -> int:
    """G8/C3: split the key loop when the parallel work is fewer than ``target`` units."""
    if work_units == 0 or work_units >= target:  # no queries: nothing to split
        return 1
    wanted = _blocks(target, max(1, work_units))
    return max(1, min(wanted, key_blocks // MIN_KEY_BLOCKS_PER_SPLIT))


def _rows_per_warp(device: DeviceSpec, dtype: str) -> int:
    unit = device.matrix_unit_for(dtype)
    if unit is None:
        return 16
    if unit.scope == "warpgroup":  # wgmma's 64 rows are shared by 4 warps: 16 rows each
        return unit.m // 4
    return min(unit.m, 32) if unit.m >= 16 else max(unit.m, 8)


def _plan_gpu(spec: "AttentionSpec", device: DeviceSpec) -> TilePlan:
    e = DTYPE_BYTES[spec.dtype]
    unit = device.matrix_unit_for(spec.dtype)
    rows_per_warp = _rows_per_warp(device, spec.dtype)
    k_multiple = unit.k if unit else 1
    head_dim = max(16, next_power_of_two(spec.head_dim))
    batch_heads = spec.batch * spec.heads
    max_threads = device.max_threads_per_block
    stage_options = range(GPU_MAX_STAGES, 1, -1) if device.has_async_copy else (1,)
    min_stages = min(stage_options)

    def sram(block_q: int, block_k: int, stages: int) -> int:
        return _gpu_sram(block_q, block_k, stages, head_dim, e)

    def registers(block_q: int, block_k: int, threads: int) -> int:
        return _gpu_registers(block_q, block_k, threads, head_dim, e, unit is not None)

    preferred_q, preferred_k, why_tile = _preferred_tile(spec, head_dim, e) if unit else (None, None, "")
    # the search depends on the lengths only through the block sizes they allow: a decoding step (one more key
    # each time) reuses the last step's search
    count, best = _gpu_forward_search(
        device, spec.dtype, head_dim, tuple(stage_options), _fit_to_problem(GPU_BLOCK_Q, spec.seqlen_q, rows_per_warp),
        _fit_to_problem(GPU_BLOCK_K, spec.seqlen_k, 16), batch_heads, spec.seqlen_q, preferred_q, preferred_k,
        _sparse_caps(spec))
    if best is None:
        smallest = 16 if 16 % rows_per_warp == 0 else rows_per_warp
        most_threads = max(w * device.simd_width for w in GPU_WARPS if w * device.simd_width <= max_threads)
        if sram(smallest, 16, min_stages) > device.sram_per_block:
            limit = (f"G4: a {smallest}x16 tile with {min_stages} stage(s) needs {sram(smallest, 16, min_stages)} B of SRAM "
                     f"and the device has {device.sram_per_block} B per block")
        else:
            limit = (f"G5: a {smallest}x16 tile needs ~{registers(smallest, 16, most_threads)} registers per thread over "
                     f"{most_threads} threads and the device allows {device.max_registers_per_thread}")
        raise ValueError(f"no tiling of head dim {spec.head_dim} ({spec.dtype}) fits {device.name}: {limit}")
    block_q, block_k, warps, stages = best
    threads = warps * device.simd_width
    query_blocks = _blocks(spec.seqlen_q, block_q)
    work = batch_heads * query_blocks
    splits = _key_splits(work, device.compute_units, _blocks(spec.seqlen_k, block_k))

    reasons = [
        f"G1 head dim {spec.head_dim} padded to {head_dim}",
        (
            f"G2/G3 matrix unit {unit.name} ({unit.m}x{unit.n}x{unit.k}, {spec.dtype}): block_q in multiples of "
            f"{rows_per_warp} rows per warp, block_k in multiples of {k_multiple}"
            if unit
            else f"G2 no matrix unit takes {spec.dtype} on {device.name}: SIMD FMAs, 16-row warp tiles"
        ),
        f"G4 SRAM {sram(block_q, block_k, stages) / 1024:.0f} KiB of {device.sram_per_block / 1024:.0f} KiB per block "
        f"(Q tile + {stages} x K/V tiles)",
        f"G5 ~{registers(block_q, block_k, threads)} registers per thread of {device.max_registers_per_thread} "
        f"(O and S accumulators{' and the Q operand' if unit else ''} over {threads} threads)",
        f"G6 {stages} stage(s): "
        + ("asynchronous copies overlap loads with math" if device.has_async_copy else "no asynchronous copy on this device"),
        f"G7 {count} tilings fit; chose {block_q}x{block_k} with {warps} warps: "
        + (
            f"{work} blocks fill {device.compute_units} compute units, and larger blocks re-read K/V less"
            if work >= device.compute_units
            else f"{work} blocks cannot fill {device.compute_units} compute units even at the smallest block_q"
        ),
    ]
    if why_tile:
        reasons.insert(-1, why_tile)
    if unit is None:
        reasons.insert(-1, f"G10 FMA tiles: {_fma_per_thread(block_q, block_k, head_dim, threads)} FMAs per thread per tile "
                           f"product (at most {GPU_FMA_PER_THREAD})")
    if splits > 1:
        reasons.append(f"G8 key loop split {splits} ways so {work * splits} units fill {device.compute_units} compute units")

    backward, why_backward = _plan_gpu_backward(
        device, head_dim, e, tuple(stage_options), unit is None, _fit_to_problem(GPU_BACKWARD_BLOCK_K, spec.seqlen_k, 16),
        spec.seqlen_q, min(_sparse_caps(spec)))
    forward = ForwardTiling(
        block_q=block_q, block_k=block_k, head_dim_padded=head_dim, warps=warps, threads=threads, stages=stages,
        work_units=work * splits, sram_bytes=sram(block_q, block_k, stages),
        registers_per_thread=registers(block_q, block_k, threads), key_splits=splits,
    )
    return assemble_plan(spec, device, target="gpu", forward=forward, backward=backward,
                         reasons=reasons + [why_backward],
                         matrix_unit=f"{unit.name} {unit.m}x{unit.n}x{unit.k}" if unit else None)


def _gpu_sram(block_q: int, block_k: int, stages: int, head_dim: int, e: int) -> int:
    """G4: the Q tile and ``stages`` K/V tiles in shared memory."""
    return block_q * head_dim * e + stages * 2 * block_k * head_dim * e


def _gpu_registers(block_q: int, block_k: int, threads: int, head_dim: int, e: int, matrix_unit: bool) -> int:
    """G5: float32 O and S accumulators, plus the Q tile held as the matrix unit's A operand (32-bit registers)."""
    q_operand = _blocks(block_q * head_dim * e, 4 * threads) if matrix_unit else 0
    return _blocks(block_q * head_dim + block_q * block_k, threads) + q_operand + GPU_REGISTER_OVERHEAD


@functools.lru_cache(maxsize=4096)
def _gpu_forward_search(device: DeviceSpec, dtype: str, head_dim: int, stage_options: tuple, block_qs: tuple,
                        block_ks: tuple, batch_heads: int, seqlen_q: int, preferred_q, preferred_k, sparse_caps: tuple):
    """G4-G7 over the block sizes the problem allows: (how many tilings fit, the chosen (block_q, block_k,
    warps, stages)), or (0, None) when none fits. Cached: it depends on the key length only through
    ``block_ks`` and the preferred tile."""
    e = DTYPE_BYTES[dtype]
    unit = device.matrix_unit_for(dtype)
    rows_per_warp = _rows_per_warp(device, dtype)
    k_multiple = unit.k if unit else 1
    cap_q, cap_k = sparse_caps
    candidates = []
    for block_q in block_qs:
        if block_q % rows_per_warp or block_q > cap_q:
            continue
        for block_k in block_ks:
            if block_k % k_multiple or block_k > cap_k:
                continue
            for warps in GPU_WARPS:
                threads = warps * device.simd_width
                if threads > device.max_threads_per_block:
                    continue
                if _gpu_registers(block_q, block_k, threads, head_dim, e, unit is not None) > device.max_registers_per_thread:
                    continue
                if unit is None and _fma_per_thread(block_q, block_k, head_dim, threads) > GPU_FMA_PER_THREAD:
                    continue
                fitting = [s for s in stage_options if _gpu_sram(block_q, block_k, s, head_dim, e) <= device.sram_per_block]
                if not fitting:
                    continue
                fills = batch_heads * _blocks(seqlen_q, block_q) >= device.compute_units
                # G7: the ranking key, largest first
                rank = (fills, block_q == preferred_q, block_k == preferred_k, block_q, block_k, -GPU_WARPS.index(warps),
                        max(fitting))
                candidates.append((rank, block_q, block_k, warps, max(fitting)))
    if not candidates:
        return 0, None
    return len(candidates), max(candidates)[1:]


def _fma_per_thread(rows: int, cols: int, head_dim: int, threads: int) -> int:
    """G10: the multiply-adds one thread unrolls for a rows x head_dim by head_dim x cols tile product."""
    return rows * cols * head_dim // threads


def _preferred_tile(spec, head_dim: int, e: int) -> tuple[int, int, str]:
    """G9 (matrix-unit GPUs): the tile G7 ranks first when it fits, from the flash-grid sweep on the H100.

    A long key loop wants 128 query rows (K/V re-read less, two warpgroups' worth of MMA rows) and
    64 keys: a 128-key S tile doubles the softmax's registers per thread for no MMA gain (wgmma's n
    reaches 256 either way). A short loop -- under ``GPU_SHORT_LOOP_TRIPS`` key blocks per query
    block on average, causal rows seeing half the keys -- is dominated by the pipeline's fill and
    drain and, when causal, by the masked half of each diagonal tile: 64 query rows and K/V tiles of
    ``GPU_SHORT_KV_TILE_BYTES`` per stage keep more, shorter programs in flight and waste less."""
    visible_keys = spec.seqlen_k / 2 if spec.causal else spec.seqlen_k
    trips = visible_keys / GPU_LONG_BLOCK_K
    if trips >= GPU_SHORT_LOOP_TRIPS:
        return 128, GPU_LONG_BLOCK_K, (f"G9 long key loop (~{trips:.0f} blocks of {GPU_LONG_BLOCK_K} keys per query block): "
                                       f"128 x {GPU_LONG_BLOCK_K} tiles preferred")
    block_k = max(16, min(GPU_LONG_BLOCK_K, GPU_SHORT_KV_TILE_BYTES // (head_dim * e)))
    return 64, block_k, (f"G9 short key loop (~{trips:.0f} blocks of {GPU_LONG_BLOCK_K} keys{', causal' if spec.causal else ''}): "
                         f"64 x {block_k} tiles ({GPU_SHORT_KV_TILE_BYTES // 1024} KiB of K/V per stage) preferred")


@functools.lru_cache(maxsize=4096)
def _plan_gpu_backward(device: DeviceSpec, head_dim: int, e: int, stage_options: tuple, fma: bool, block_ks: tuple,
                       seqlen_q: int, cap: int) -> tuple[BackwardTiling, str]:
    """Backward blocks (B1-B3) over the owned key blocks ``block_ks`` the problem allows: a block owns
    ``block_k`` keys (dK, dV accumulate in registers) and streams query blocks of ``block_q``; the dQ pass
    mirrors it (owns ``block_k`` queries, streams ``block_q`` keys). The G4/G5 checks apply with the dK, dV,
    S and dP accumulators, and G10 when ``fma`` (no matrix unit); ``cap`` is the block-sparse limit.
    Returns the tiling and its reason; cached (a decoding step reuses the last one's).

    * B1 owned keys: 64 first -- one warpgroup's MMA rows, and dK, dV for d <= 128 stay in registers
      over 4 warps; then 128, 32, 16.
    * B2 streamed rows: 32 at d <= 64 (small steps, pipelined 3 deep), 64 above (half the loop trips;
      2 stages); the H100 sweep measured both choices within 5% of the best backward configuration.
    * B3 dQ in a pass of its own (no atomics): the fused atomic form won only at N = 16384 and by
      under 10%, and lost up to 20% at N <= 4096 (sweep in benchmarks/results).
    """
    small_head = head_dim <= 64
    preferred_stages = 3 if small_head else 2
    stage_order = sorted(stage_options, key=lambda s: (s != preferred_stages, -s))

    def sram(block_q: int, block_k: int, stages: int) -> int:
        return 2 * block_k * head_dim * e + stages * 2 * block_q * head_dim * e

    block_q_order = (32, 64, 16) if small_head else (64, 32, 16)
    for block_k in block_ks:
        for block_q in _fit_to_problem(block_q_order, seqlen_q, 16):
            if max(block_q, block_k) > cap:
                continue
            for warps in GPU_WARPS:
                threads = warps * device.simd_width
                regs = _blocks(2 * block_k * head_dim + 2 * block_q * block_k, threads) + GPU_REGISTER_OVERHEAD
                if threads > device.max_threads_per_block or regs > device.max_registers_per_thread:
                    continue
                if fma and _fma_per_thread(block_q, block_k, head_dim, threads) > GPU_FMA_PER_THREAD:
                    continue
                for stages in stage_order:
                    if sram(block_q, block_k, stages) <= device.sram_per_block:
                        why = (
                            f"B1-B3 backward: blocks own {block_k} keys and stream {block_q} queries with {warps} warps, "
                            f"{stages} stage(s) (~{regs} registers, {sram(block_q, block_k, stages) / 1024:.0f} KiB SRAM); "
                            "dQ in a pass of its own over query blocks (no atomics)"
                        )
                        return BackwardTiling(block_q=block_q, block_k=block_k, warps=warps, stages=stages,
                                              dq_separate=True, sram_bytes=sram(block_q, block_k, stages)), why
    stages = min(stage_options)
    return (BackwardTiling(block_q=16, block_k=16, warps=4, stages=stages, dq_separate=True, sram_bytes=sram(16, 16, stages)),
            "backward: no tile meets G4/G5; the smallest 16x16 is used and will spill")


def _plan_cpu(spec: "AttentionSpec", device: DeviceSpec) -> TilePlan:
    lanes = max(1, device.simd_width)
    head_dim = _round_up(spec.head_dim, lanes)
    threads = device.hardware_threads or device.compute_units
    batch_heads = spec.batch * spec.heads
    cache = device.sram_per_block
    f32 = 4

    def working_set(block_q: int, block_k: int) -> int:  # C1
        return f32 * (2 * block_q * head_dim + 2 * block_k * head_dim + block_q * block_k)

    cap_q, cap_k = _sparse_caps(spec)
    candidates = []
    for block_q in _fit_to_problem(CPU_BLOCK_Q, spec.seqlen_q, 16):
        for block_k in _fit_to_problem(CPU_BLOCK_K, spec.seqlen_k, 16):
            if working_set(block_q, block_k) > cache or block_q > cap_q or block_k > cap_k:
                continue
            if spec.causal and block_k > block_q and spec.seqlen_q > CPU_BLOCK_Q[-1]:  # C5
                continue
            work = batch_heads * _blocks(spec.seqlen_q, block_q)
            rank = (work >= CPU_TASKS_PER_THREAD * threads, block_q, block_k)  # C2
            candidates.append((rank, block_q, block_k))
    if not candidates:  # a huge head dim: the smallest tiles, over the cache, are still correct
        candidates.append(((False, 16, 16), 16, 16))
    _, block_q, block_k = max(candidates)
    work = batch_heads * _blocks(spec.seqlen_q, block_q)
    splits = _key_splits(work, threads, _blocks(spec.seqlen_k, block_k))
    reasons = [
        f"C1 working set {working_set(block_q, block_k) / 1024:.0f} KiB of {cache / 1024:.0f} KiB L2 per core "
        f"(head dim {spec.head_dim} rounded to {head_dim} for {lanes}-lane vectors)",
        f"C2 chose {block_q}x{block_k} of {len(candidates)} that fit: {work} tasks for {threads} threads",
    ]
    if spec.causal and spec.seqlen_q > CPU_BLOCK_Q[-1]:
        reasons.append("C5 causal: key blocks no wider than query blocks (less of the diagonal tile computed and masked)")
    if splits > 1:
        reasons.append(f"C3 key loop split {splits} ways so {work * splits} tasks keep {threads} threads busy")

    def backward_set(bq: int, bk: int) -> int:  # K, V, dK, dV tiles; Q and dO tiles; P and dS tiles
        return f32 * (4 * bk * head_dim + 2 * bq * head_dim + 2 * bq * bk)

    bwd_q, bwd_k = block_q, block_k
    while backward_set(bwd_q, bwd_k) > cache and max(bwd_q, bwd_k) > 16:
        if bwd_k >= bwd_q and bwd_k > 16:  # halve the larger side first
            bwd_k //= 2
        else:
            bwd_q //= 2
    bwd_sram = backward_set(bwd_q, bwd_k)
    dq_separate = batch_heads < 2 * threads
    why_bwd = (
        f"C4 backward: tasks own {bwd_k} keys, stream {bwd_q} queries; dQ "
        + ("in its own pass (too few heads to give each task whole heads)" if dq_separate else "summed in the same pass (each head is one task's)")
    )
    forward = ForwardTiling(
        block_q=block_q, block_k=block_k, head_dim_padded=head_dim, warps=1, threads=threads, stages=1,
        work_units=work * splits, sram_bytes=working_set(block_q, block_k), registers_per_thread=0, key_splits=splits,
    )
    backward = BackwardTiling(block_q=bwd_q, block_k=bwd_k, warps=1, stages=1, dq_separate=dq_separate, sram_bytes=bwd_sram)
    return assemble_plan(spec, device, target="cpu", forward=forward, backward=backward, reasons=reasons + [why_bwd])
