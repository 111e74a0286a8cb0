"""`TilePlan`: the planner's answer, which every backend executes as given."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TilePlan:
    """Block sizes and launch shape for one problem on one device, with the reasons for each.

    ``block_q`` x ``block_k`` is the score tile one work unit holds at a time. A GPU work unit is a
    thread block of ``warps`` warps (``threads`` threads); a CPU work unit is one task run by one of
    ``threads`` worker threads. ``key_splits > 1`` means the key loop of each query block is cut in
    that many pieces run in parallel and merged by log-sum-exp (flash-decoding).
    """

    device: str
    target: str  # "gpu" or "cpu": which family of rules made it
    block_q: int
    block_k: int
    head_dim_padded: int  # head dim rounded up to what the matrix unit / vector width takes
    warps: int  # GPU: warps per block; CPU: 1
    threads: int  # GPU: threads per block; CPU: worker threads
    stages: int  # K/V buffers in flight (software pipelining); 1 = load, then compute
    key_splits: int
    work_units: int  # parallel units of the forward pass: batch*heads*query blocks*key splits
    sram_bytes: int  # per work unit: shared memory (GPU) or cache working set (CPU)
    registers_per_thread: int  # GPU estimate; CPU: 0
    backward_block_q: int
    backward_block_k: int
    backward_work_units: int  # batch*heads*key blocks
    backward_sram_bytes: int
    backward_dq_separate: bool  # dQ in its own pass over query blocks (True) or summed in the dK/dV pass
    backward_warps: int  # GPU: warps per backward block; CPU: 1
    backward_stages: int  # GPU: pipeline stages of the backward's streamed tiles; CPU: 1
    hbm_bytes: int  # predicted forward DRAM traffic for these blocks
    hbm_bytes_lower_bound: int  # the Theta(N^2 d^2 / M) bound for this device's SRAM
    matrix_unit: str | None
    reasons: tuple[str, ...]
    vector_width: int = 0  # OpenCL: lanes of a work-item's score vectors (tiling/opencl.py O1); 0 elsewhere
    head_dim_chunk: int = 0  # OpenCL: head-dim columns of K/V the forward stages at a time (O3); 0 = all
    item_rows: int = 0  # OpenCL: score rows of a forward work-item's register tile (O1); 0 elsewhere
    item_vectors: int = 0  # OpenCL: score column vectors of a forward work-item's register tile (O1); 0 elsewhere

    def summary(self) -> str:
        """One line: the numbers a kernel is launched with."""
        launch = f"{self.warps} warps ({self.threads} threads), {self.stages} stages" if self.target == "gpu" else f"{self.threads} threads"
        split = f", key loop split {self.key_splits}x" if self.key_splits > 1 else ""
        chunk = f", K/V staged {self.head_dim_chunk} head-dim columns at a time" if self.head_dim_chunk else ""
        return (
            f"block {self.block_q}x{self.block_k} (q x k), head dim padded to {self.head_dim_padded}, "
            f"{launch}{split}{chunk}, {self.work_units} work units; backward {self.backward_block_q}x{self.backward_block_k}"
            + (f" with {self.backward_warps} warps, {self.backward_stages} stages" if self.target == "gpu" else "")
            + ("" if self.backward_dq_separate else ", dQ fused (atomic adds)" if self.target == "gpu" else ", dQ in the key pass")
        )

    def describe(self) -> str:
        """The plan, its resource use, its predicted traffic and every reason, for people."""
        mib = 1024 * 1024
        ratio = self.hbm_bytes / self.hbm_bytes_lower_bound if self.hbm_bytes_lower_bound else float("nan")
        lines = [
            f"tile plan for {self.device} ({self.target} rules)",
            f"  {self.summary()}",
            f"  SRAM per unit: {self.sram_bytes / 1024:.1f} KiB forward, {self.backward_sram_bytes / 1024:.1f} KiB backward"
            + (f"; ~{self.registers_per_thread} registers per thread" if self.registers_per_thread else ""),
            f"  predicted forward traffic: {self.hbm_bytes / mib:.2f} MiB ({ratio:.2f}x the N^2 d^2 / M bound"
            f" of {self.hbm_bytes_lower_bound / mib:.2f} MiB)",
        ]
        if self.matrix_unit:
            lines.append(f"  matrix unit: {self.matrix_unit}")
        lines.append("  why:")
        lines.extend(f"    - {reason}" for reason in self.reasons)
        return "\n".join(lines)
