"""Planner rules for the OpenCL kernels (the ``opencl`` backend): work-item register tiles, exact local memory.

The kernels in ``portattn/backends/opencl/kernels/attention.cl`` run on any OpenCL 1.2 device --
GPUs of every vendor without their matrix units, and CPUs through PoCL -- so they are FMA kernels
in the SGEMM style: a work-group is a ``TM x TN`` grid of work-items, each owning an ``RM x CN VW``
block of the score tile (4 x 4 in every plan so far) and float4 pieces of the accumulator rows. The plan fixes the grid of each program
(forward; backward, whose dK/dV and dQ kernels share one build) and the local memory it takes.

Rules (O for OpenCL), stated where they act:
  * O1 a work-item owns 4 rows (tm + TM i) x VW adjacent columns of scores, one float-VW vector per
       row: every operand read from local memory is a float4 or a VW-vector and feeds 4 VW FMAs.
       VW is the CPU device's preferred float vector width in the forward (16 under PoCL on
       AVX-512: explicit vectors are what PoCL turns into SIMD code, since its work-item loops sit
       outside the tile loops and are not vectorized), else 4 (float8 grids on the H100 swept
       at 8-13 TFLOP/s against 22 for float4: twice the registers per column for no fewer local
       loads per FMA). A program's grid is TM x TN with TM, TN powers of two; its score tile is
       ROWS x COLS = RM TM x CN VW TN. The forward kernel also takes taller and wider work-item tiles
       (RM = 8 rows, CN = 2 vectors: fewer local loads per FMA, more registers), which sweeps reach
       through the plan's ``item_rows`` / ``item_vectors``; GPU plans keep 4 x 1, CPU plans take 4 x 2
       (``CPU_ITEM_VECTORS``: eight independent FMA chains in the score product and 2 VW key columns per
       work-group tile, which PoCL on Zen 4 ran 1.3-1.6x faster than 4 x 1); on the H100 every
       forward already uses all 255 registers, and 4 x 2 matched 4 x 1 at D = 64 (22.3 against 22.2
       TFLOP/s, fp32) and spilled at D = 128 (17.5 against 19.5); 8 x 1 and 8 x 2 lost everywhere
       (benchmarks/results/h100-opencl-sweep-tiles-*.json, with NVIDIA's compiler reports).
  * O2 head dim padded to a multiple of VW TN: work-item tn owns accumulator columns in VW-wide
       pieces interleaved with its neighbours' (conflict-free local reads).
  * O3 local memory, exactly as the .cl file lays it out (``*_local_bytes``): float32 tiles, the
       forward's Q and V unpadded (Q's quads swizzled by row instead), its row partials in the P
       tile's padding; with ``DRIVER_LOCAL_BYTES`` to spare, must fit CL_DEVICE_LOCAL_MEM_SIZE
       (NVIDIA's compiler adds a few bytes of its own: 48656 reported for the 48640 that the D = 128
       forward declares). On GPUs the forward may stage
       K (and V, into a whole V tile) ``chunk`` head-dim columns at a time (``chunk_choices``): NVIDIA's OpenCL gives 48
       KiB, where a whole K^T tile at D = 128 leaves room for a Q tile of only 32 rows; chunks of
       32 let it hold 64 rows (H100, D = 128: 64 x 16 tiles in chunks at 19-26 TFLOP/s,
       against 15 for the best whole-row grid, 32 x 16). CPUs stage whole rows.
  * O4 private memory: float32 accumulators (16 per 4 x 4 block, 16 per float4 column piece of
       each accumulator row set) plus operands and a fixed overhead (``*_registers``); on GPUs it
       must stay within the per-thread register limit where any grid allows (else the compiler
       spills, which is slow but correct), on CPUs it is stack memory and not limited.
  * O5 work-group size TM x TN within CL_DEVICE_MAX_WORK_GROUP_SIZE.
  * O6 ranking, GPUs: registers within the limit, then at least one work-group per compute unit,
       then whole sub-groups (TM x TN >= the SIMD width) but at most ``GPU_MAX_THREADS`` work-items
       (small groups: more of them resident, and each barrier waits on fewer), then the most query
       rows (K and V are re-read once per query tile), then the fewest key columns, then whole rows
       (no chunk), else the smallest chunk: fewer staged quads held in registers. Measured on the
       H100 through NVIDIA's OpenCL (fp16 and fp32, N = 2048, benchmarks/results/h100-opencl-sweep-*.json):
       D = 64 128 x 8 at 20-23 TFLOP/s against 12-14 for 32 x 32; D = 128 64 x 16 as in O3, in chunks
       of 32 (which spilled 32 B and ran 19.5 TFLOP/s fp32) rather than 64 (64 B spilled, 18.7). The
       backward (four operand tiles in local memory, two accumulator sets) ranks whole sub-groups
       of at most ``GPU_MAX_THREADS`` first, registers after (a spill costs less than idle lanes),
       then the largest tile. CPUs (PoCL runs a work-group as loops on one core): at least
       ``CPU_GROUPS_PER_CORE`` work-groups per core, then one vector of columns per work-item
       (TN = 1) and ``CPU_ROWS`` rows (measured on this project's CPU machine; see CPU_ROWS), then
       the smaller head-dim padding.
  * O7 loop order of the tile products (``pieces_inner``): on GPUs, whose accumulators stay in
       registers, a product's loop over accumulator pieces runs inside its loop over keys, so
       each step's weights are read from local memory once for all pieces; PoCL keeps
       variables that live across barriers in memory, so there one piece at a time is copied
       into registers and the keys loop inside it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...devices.description import DeviceSpec
from ...tiling.plan import BackwardTiling, ForwardTiling, TilePlan, assemble_plan

if TYPE_CHECKING:
    from ...spec import AttentionSpec

GRID_SIDES = (1, 2, 4, 8, 16, 32, 64)  # O1: TM, TN (TM x TN within the work-group limit, O5)
VECTOR_WIDTHS = (16, 8, 4)  # O1: the .cl file's VW
FLOAT = 4
ROW_PAD = 4  # floats added to every local row (O3)
REGISTER_OVERHEAD = 40  # indices, pointers, row statistics (O4)
GPU_MAX_THREADS = 64  # O6: H200 sweep (benchmarks/results/h200-opencl-sweep.json): 32-64 work-items per group won
CPU_GROUPS_PER_CORE = 4
DRIVER_LOCAL_BYTES = 64  # O3: room for what a driver adds to a kernel's local memory (NVIDIA's OpenCL: 4-16 B)
MIN_CHUNK = 32  # O3: fewer head-dim columns per chunk would cost more barriers than they save
CPU_ROWS = 128  # O6: PoCL, 2-core AVX-512, (1, 8, 2048, 64) fp32: 128 x 16 tiles 91 GFLOP/s, 64 x 16 68, 32 x 32 36
CPU_ITEM_VECTORS = 2  # O1: PoCL on Zen 4 (float8, LLVM 14's znver3), (1, 8, 1024, D) fp32 against torch: 4 x 2 tiles
                      # 0.75x (D 64) / 0.73x (D 128), 4 x 1 0.45x / 0.55x, 8 x 1 0.64x (D 128), 4 x 3 0.74x, 4 x 4 0.65x


@dataclass(frozen=True)
class OpenCLPlan(TilePlan):
    """A `TilePlan` with the OpenCL forward's work-item tile: the fields ``forward_grid`` builds the forward's
    `Grid` from besides ``block_q`` x ``block_k`` (the backward's grid is fixed at float4 and 4 x 1)."""

    vector_width: int  # O1: lanes of a work-item's score vectors
    head_dim_chunk: int  # O3: head-dim columns of K/V the forward stages at a time; 0 = all
    item_rows: int  # O1: score rows of a forward work-item's register tile
    item_vectors: int  # O1: score column vectors of a forward work-item's register tile

    @classmethod
    def extend(cls, plan: TilePlan, *, vector_width: int, head_dim_chunk: int, item_rows: int,
               item_vectors: int) -> OpenCLPlan:
        """``plan`` (as ``assemble_plan`` built it) with the OpenCL fields."""
        shared = {f.name: getattr(plan, f.name) for f in dataclasses.fields(TilePlan)}
        return cls(**shared, vector_width=vector_width, head_dim_chunk=head_dim_chunk, item_rows=item_rows,
                   item_vectors=item_vectors)

    def _launch_notes(self) -> str:
        return f", K/V staged {self.head_dim_chunk} head-dim columns at a time" if self.head_dim_chunk else ""


@dataclass(frozen=True)
class Grid:
    """One program's work-group grid (O1) for a head dim."""

    tm: int
    tn: int
    head_dim: int
    vw: int = 4  # lanes of a work-item's column vectors (O1)
    program: int = 0  # 0 forward, 1 backward (the .cl file's PROGRAM)
    kc: int = 0  # O3: head-dim columns of K and V the forward stages at a time; 0 = all
    pieces_inner: bool = False  # O7: accumulator pieces in the inner loop of tile products (GPUs)
    rm: int = 4  # O1: score rows per work-item (the forward's register tile; the backward's is 4 x 1)
    cn: int = 1  # O1: column vectors per work-item

    @property
    def chunk(self) -> int:
        return self.kc or self.head_dim_padded

    @property
    def chunk_fits(self) -> bool:
        """O3: a chunk is whole accumulator pieces and divides the padded head dim."""
        return self.chunk % self.piece == 0 and self.head_dim_padded % self.chunk == 0

    @property
    def piece(self) -> int:
        """O2: head-dim columns of one accumulator piece across the work-items of a row (VW each)."""
        return self.vw * self.tn

    @property
    def rows(self) -> int:
        return self.rm * self.tm

    @property
    def cols(self) -> int:
        return self.cn * self.vw * self.tn

    @property
    def threads(self) -> int:
        return self.tm * self.tn

    @property
    def head_dim_padded(self) -> int:
        """O2."""
        return -(-self.head_dim // self.piece) * self.piece

    @property
    def chunks(self) -> int:
        return self.head_dim_padded // self.piece

    def _operand_tile(self, rows: int) -> int:
        return rows * (self.head_dim_padded + self.vw) * FLOAT

    def _score_tile(self) -> int:
        return self.rows * (self.cols + self.vw) * FLOAT

    def forward_local_bytes(self) -> int:
        """O3 for ``attention_forward``: Q tile (unpadded: its quads are swizzled instead), a K^T chunk
        (``chunk`` rows), the whole V tile (unpadded), and the P tile, whose row padding -- whole vectors,
        at least TN floats -- holds the row partials."""
        queries = self.rows * self.head_dim_padded * FLOAT
        keys = self.chunk * (self.cols + self.vw) * FLOAT
        values = self.cols * self.head_dim_padded * FLOAT
        weights = self.rows * (self.cols + self.vw * -(-self.tn // self.vw)) * FLOAT
        return queries + keys + values + weights

    def backward_local_bytes(self) -> int:
        """O3 for the backward program: the larger of the dK/dV kernel (K, V owned; Q, dO streamed;
        LSE and delta per streamed row) and the dQ kernel (Q, dO owned; K, V streamed)."""
        dkdv = 2 * self._operand_tile(self.rows) + 2 * self._operand_tile(self.cols) + self._score_tile() + 2 * self.cols * FLOAT
        dq = 2 * self._operand_tile(self.rows) + 2 * self._operand_tile(self.cols) + self._score_tile() + 2 * self.rows * FLOAT
        return max(dkdv, dq)

    def forward_registers(self) -> int:
        """O4: scores and their tanh, O accumulators, operands of one head-dim step (a row's float per
        register-tile row, four VW-vectors per column vector)."""
        scores = 2 * self.rm * self.cn * self.vw
        return scores + self.rm * self.vw * self.chunks + 4 * self.cn * self.vw + self.rm + REGISTER_OVERHEAD

    def backward_registers(self) -> int:
        """O4 for dK/dV (the larger kernel): S, dP, P and tanh blocks, dK and dV accumulators, operands."""
        return 4 * 16 + 2 * 16 * self.chunks + 32 + REGISTER_OVERHEAD

    def options(self) -> tuple[str, ...]:
        chunk = (f"-DKC={self.chunk}",) if self.program == 0 else ()
        return (f"-DPROGRAM={self.program}", f"-DTM={self.tm}", f"-DTN={self.tn}", f"-DVW={self.vw}",
                f"-DRM={self.rm}", f"-DCN={self.cn}",
                f"-DHEAD_DIM={self.head_dim}", f"-DD_PAD={self.head_dim_padded}", *chunk,
                f"-DPIECES_INNER={int(self.pieces_inner)}")


def forward_vector_width(device: DeviceSpec) -> int:
    """O1: a CPU device's preferred float vector width (PoCL on AVX-512: 16), else 4 (GPUs run the
    vector's lanes as scalars, and float4 is the widest local-memory load)."""
    if device.kind != "cpu":
        return 4
    return max((w for w in VECTOR_WIDTHS if w <= device.simd_width), default=4)


def grid_of(block_rows: int, block_cols: int, head_dim: int, vw: int = 4, program: int = 0, kc: int = 0,
            gpu: bool = False, rm: int = 4, cn: int = 1) -> Grid | None:
    """The grid whose tile is ``block_rows x block_cols`` with ``rm x cn`` vectors per work-item (staging
    ``kc`` head-dim columns at a time), or None when O1 and O3 have none."""
    tm, tn = block_rows // rm, block_cols // (vw * cn)
    if block_rows % rm or block_cols % (vw * cn) or tm not in GRID_SIDES or tn not in GRID_SIDES:
        return None
    grid = Grid(tm, tn, head_dim, vw, program, kc, pieces_inner=gpu, rm=rm, cn=cn)
    return grid if grid.chunk_fits else None


def chunk_choices(grid: Grid, device: DeviceSpec) -> tuple[int, ...]:
    """O3: the forward's head-dim chunks for a grid: all columns (0), and on GPUs -- whose local memory
    is small next to a whole K^T tile at large head dims -- every smaller whole-piece divisor of at
    least ``MIN_CHUNK`` columns."""
    if grid.program != 0 or device.kind == "cpu":
        return (0,)
    d = grid.head_dim_padded
    return (0,) + tuple(c for c in range(max(MIN_CHUNK, grid.piece), d, grid.piece) if d % c == 0)


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _rank(grid: Grid, device: DeviceSpec, local: int, registers: int, groups: int):
    if grid.program == 1:  # the backward: whole sub-groups first; spills cost less than idle lanes
        return (grid.threads >= min(device.simd_width, device.max_threads_per_block), grid.threads <= GPU_MAX_THREADS,
                registers <= device.max_registers_per_thread or device.kind == "cpu", groups >= device.compute_units,
                grid.rows * grid.cols, -abs(grid.rows - grid.cols))
    if device.kind == "cpu":
        cores = device.hardware_threads or device.compute_units
        return (groups >= CPU_GROUPS_PER_CORE * cores, grid.tn == 1, -abs(grid.rows - CPU_ROWS), -grid.head_dim_padded)
    return (registers <= device.max_registers_per_thread, groups >= device.compute_units,
            grid.threads >= device.simd_width, grid.threads <= GPU_MAX_THREADS, grid.rows, -grid.cols,
            grid.kc == 0, -grid.kc)


def item_vectors(device: DeviceSpec, program: int) -> int:
    """O1: column vectors per forward work-item: ``CPU_ITEM_VECTORS`` on CPUs (eight independent FMA chains in
    the score product, two per row, where one per row left half of the FMA units waiting on the chain's
    latency; and twice the key columns per tile to spread the softmax's per-tile steps over), else 1."""
    return CPU_ITEM_VECTORS if program == 0 and device.kind == "cpu" else 1


def _choose(spec, device: DeviceSpec, vw: int, program: int, local_of, registers_of, groups_of):
    best = None
    cn = item_vectors(device, program)
    for tm in GRID_SIDES:
        for tn in GRID_SIDES:
            whole = Grid(tm, tn, spec.head_dim, vw, program, pieces_inner=device.kind != "cpu", cn=cn)
            if whole.threads > device.max_threads_per_block:  # O5
                continue
            for kc in chunk_choices(whole, device):
                grid = dataclasses.replace(whole, kc=kc)
                local = local_of(grid)
                if local + DRIVER_LOCAL_BYTES > device.sram_per_block:  # O3
                    continue
                registers, groups = registers_of(grid), groups_of(grid)
                ranked = (_rank(grid, device, local, registers, groups), grid, local, registers, groups)
                if best is None or ranked[0] > best[0]:
                    best = ranked
    return None if best is None else best[1:]


@functools.lru_cache(maxsize=1024)
def plan(spec: "AttentionSpec", device: DeviceSpec) -> OpenCLPlan:
    """O1-O6 for one problem on one OpenCL device. ``block_q`` x ``block_k`` is the forward's score
    tile (TM = block_q / 4, TN = block_k / 4); the backward program's grid owns ``backward.block_k``
    rows (keys in dK/dV, queries in dQ) and streams ``backward.block_q`` (TM = backward.block_k / 4,
    TN = backward.block_q / 4); ``backward`` is None when no grid fits. Raises ValueError when no
    grid's local memory fits the device."""
    batch_heads = spec.batch * spec.heads
    vw = forward_vector_width(device)
    forward = _choose(spec, device, vw, 0, Grid.forward_local_bytes, Grid.forward_registers,
                      lambda g: batch_heads * _blocks(max(spec.seqlen_q, 1), g.rows))
    if forward is None:
        raise ValueError(f"O3: no OpenCL work-group tile of head dim {spec.head_dim} fits {device.name}'s "
                         f"{device.sram_per_block} B of local memory")
    grid, local, registers, groups = forward
    backward = _choose(spec, device, 4, 1, Grid.backward_local_bytes, Grid.backward_registers,
                       lambda g: spec.batch * spec.kv_heads * _blocks(max(spec.seqlen_k, 1), g.rows))
    reasons = [
        f"O1 forward: work-group of {grid.tm} x {grid.tn} work-items, each owning {grid.rm} rows x {grid.cn * vw} columns "
        f"of a {grid.rows} x {grid.cols} score tile ({grid.cn} float{vw} vector{'s' if grid.cn > 1 else ''} per row); "
        f"{groups} work-groups",
        f"O2 head dim {spec.head_dim} padded to {grid.head_dim_padded} ({grid.chunks} float{vw} accumulator pieces per "
        "row per work-item)",
        f"O3 forward local memory {local} B of {device.sram_per_block} B"
        + (f", K and V staged {grid.chunk} head-dim columns at a time" if grid.kc else ""),
        f"O4 forward ~{registers} private floats per work-item"
        + (f" (over the {device.max_registers_per_thread}-register limit: the compiler spills)"
           if device.kind == "gpu" and registers > device.max_registers_per_thread else ""),
    ]
    if backward is None:
        why = (f"O3 backward: no grid of head dim {spec.head_dim} fits {device.sram_per_block} B of local memory "
               "(K, V, Q and dO tiles at once)")
        back = None
    else:
        bgrid, blocal, bregisters, _ = backward
        spill = (f"; over the {device.max_registers_per_thread}-register limit, the compiler spills"
                 if device.kind == "gpu" and bregisters > device.max_registers_per_thread else "")
        why = (f"O1-O4 backward: {bgrid.tm} x {bgrid.tn} work-items own {bgrid.rows} keys (dK/dV) or queries (dQ) and "
               f"stream {bgrid.cols}, {blocal} B local memory, ~{bregisters} private floats{spill}; dQ in a kernel of "
               "its own (no atomics)")
        back = BackwardTiling(block_q=bgrid.cols, block_k=bgrid.rows, warps=1, stages=1, dq_separate=True,
                              sram_bytes=blocal)
    reasons.append(why)
    reasons.append("O7 tile products loop over keys outside accumulator pieces (GPU: accumulators in registers)"
                   if device.kind != "cpu" else
                   "O7 tile products loop over accumulator pieces outside keys (PoCL keeps accumulators in memory)")
    warps = max(1, grid.threads // device.simd_width) if device.kind == "gpu" else 1
    tiling = ForwardTiling(block_q=grid.rows, block_k=grid.cols, head_dim_padded=grid.head_dim_padded, warps=warps,
                           threads=grid.threads, stages=1, work_units=groups, sram_bytes=local,
                           registers_per_thread=registers if device.kind == "gpu" else 0)
    shared = assemble_plan(spec, device, target="gpu" if device.kind == "gpu" else "cpu", forward=tiling, backward=back,
                           reasons=reasons)
    return OpenCLPlan.extend(shared, vector_width=vw, head_dim_chunk=grid.kc, item_rows=grid.rm, item_vectors=grid.cn)


def forward_grid(plan: OpenCLPlan, head_dim: int) -> Grid | None:
    return grid_of(plan.block_q, plan.block_k, head_dim, plan.vector_width or 4, 0, plan.head_dim_chunk,
                   plan.target == "gpu", plan.item_rows or 4, plan.item_vectors or 1)


def backward_grid(plan: TilePlan, head_dim: int) -> Grid | None:
    b = plan.backward
    return grid_of(b.block_k, b.block_q, head_dim, 4, 1, gpu=plan.target == "gpu") if b is not None else None
