"""`TilePlan`: the planner's answer, which every backend executes as given, and its parts.

A planner -- the generic one in ``planner.py`` or a backend's rules in ``backends/<name>/plan.py`` --
chooses a `ForwardTiling` and a `BackwardTiling` (or none, when no backward tiling fits) and hands
them to `assemble_plan`, which adds what follows from the choice for every planner alike (the IO
model's traffic figures, the backward's work units) and builds the `TilePlan`. The plan's forward
figures are its own fields; its backward is a `BackwardPlan` in ``TilePlan.backward``, or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..devices.description import DeviceSpec
from ..spec import DTYPE_BYTES
from . import iomodel

if TYPE_CHECKING:  # the spec module imports tiling; importing it back at run time would be circular
    from ..spec import AttentionSpec

BACKWARD = "backward."  # the prefix that names a `BackwardPlan` field in a change (``"backward.block_q"``)


@dataclass(frozen=True)
class ForwardTiling:
    """A planner's forward choice, as `assemble_plan` takes it; each field is the `TilePlan` field of the same name."""

    block_q: int
    block_k: int
    head_dim_padded: int
    warps: int
    threads: int
    stages: int
    work_units: int  # with the key splits counted
    sram_bytes: int
    registers_per_thread: int = 0
    key_splits: int = 1


@dataclass(frozen=True)
class BackwardTiling:
    """A planner's backward choice, as `assemble_plan` takes it.

    A work unit owns ``block_k`` keys (dK, dV accumulate there) and streams query blocks of
    ``block_q``; a dQ pass of its own mirrors it (owns ``block_k`` queries, streams ``block_q`` keys).
    """

    block_q: int
    block_k: int
    warps: int  # GPU: warps per backward block; CPU: 1
    stages: int  # GPU: pipeline stages of the backward's streamed tiles; CPU: 1
    dq_separate: bool  # dQ in its own pass over query blocks (True) or summed in the dK/dV pass
    sram_bytes: int


@dataclass(frozen=True)
class BackwardPlan(BackwardTiling):
    """The backward part of a `TilePlan`: the planner's `BackwardTiling` and its work units."""

    work_units: int  # batch*heads*key blocks


@dataclass(frozen=True)
class TilePlan:
    """Block sizes and launch shape for one problem on one device, with the reasons for each.

    ``block_q`` x ``block_k`` is the score tile one work unit holds at a time. A GPU work unit is a
    thread block of ``warps`` warps (``threads`` threads); a CPU work unit is one task run by one of
    ``threads`` worker threads. ``key_splits > 1`` means the key loop of each query block is cut in
    that many pieces run in parallel and merged by log-sum-exp (flash-decoding). ``backward`` is
    None when no backward tiling fits (the last reason says why). Backends with fields of their own
    subclass it (``backends/opencl/plan.py``). Build plans with `assemble_plan`.
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
    backward: BackwardPlan | None
    hbm_bytes: int  # predicted forward DRAM traffic for these blocks
    hbm_bytes_lower_bound: int  # the Theta(N^2 d^2 / M) bound for this device's SRAM
    matrix_unit: str | None
    reasons: tuple[str, ...]

    def value(self, name: str) -> object:
        """A field by name, ``backward.<field>`` for the backward's (the names autotuning sweeps).
        Raises ValueError for a backward field of a plan without a backward."""
        if name.startswith(BACKWARD):
            if self.backward is None:
                raise ValueError(f"the plan has no backward tiling to read {name!r} from")
            return getattr(self.backward, name[len(BACKWARD):])
        return getattr(self, name)

    def with_changes(self, changes: Mapping[str, object]) -> TilePlan:
        """This plan with some fields replaced: plain names are this plan's fields, ``backward.<field>``
        its `BackwardPlan`'s (an autotuning candidate). Nothing is recomputed; a backend's ``retile``
        does that. Raises ValueError when backward fields are changed on a plan without a backward, and
        TypeError for an unknown name."""
        backward = {name[len(BACKWARD):]: value for name, value in changes.items() if name.startswith(BACKWARD)}
        plain = {name: value for name, value in changes.items() if not name.startswith(BACKWARD)}
        if backward:
            if self.backward is None:
                raise ValueError(f"the plan has no backward tiling to change ({', '.join(sorted(backward))})")
            plain["backward"] = dataclasses.replace(self.backward, **backward)
        return dataclasses.replace(self, **plain)

    def _launch_notes(self) -> str:
        """Subclasses: what ``summary`` adds after the forward's launch shape."""
        return ""

    def summary(self) -> str:
        """One line: the numbers a kernel is launched with."""
        launch = f"{self.warps} warps ({self.threads} threads), {self.stages} stages" if self.target == "gpu" else f"{self.threads} threads"
        split = f", key loop split {self.key_splits}x" if self.key_splits > 1 else ""
        forward = (f"block {self.block_q}x{self.block_k} (q x k), head dim padded to {self.head_dim_padded}, "
                   f"{launch}{split}{self._launch_notes()}, {self.work_units} work units; ")
        b = self.backward
        if b is None:
            return forward + "no backward tiling fits"
        return (
            forward + f"backward {b.block_q}x{b.block_k}"
            + (f" with {b.warps} warps, {b.stages} stages" if self.target == "gpu" else "")
            + ("" if b.dq_separate else ", dQ fused (atomic adds)" if self.target == "gpu" else ", dQ in the key pass")
        )

    def describe(self) -> str:
        """The plan, its resource use, its predicted traffic and every reason, for people."""
        mib = 1024 * 1024
        ratio = self.hbm_bytes / self.hbm_bytes_lower_bound if self.hbm_bytes_lower_bound else float("nan")
        backward = f"{self.backward.sram_bytes / 1024:.1f} KiB backward" if self.backward else "no backward"
        lines = [
            f"tile plan for {self.device} ({self.target} rules)",
            f"  {self.summary()}",
            f"  SRAM per unit: {self.sram_bytes / 1024:.1f} KiB forward, {backward}"
            + (f"; ~{self.registers_per_thread} registers per thread" if self.registers_per_thread else ""),
            f"  predicted forward traffic: {self.hbm_bytes / mib:.2f} MiB ({ratio:.2f}x the N^2 d^2 / M bound"
            f" of {self.hbm_bytes_lower_bound / mib:.2f} MiB)",
        ]
        if self.matrix_unit:
            lines.append(f"  matrix unit: {self.matrix_unit}")
        lines.append("  why:")
        lines.extend(f"    - {reason}" for reason in self.reasons)
        return "\n".join(lines)


def assemble_plan(
    spec: AttentionSpec,
    device: DeviceSpec,
    *,
    target: str,
    forward: ForwardTiling,
    backward: BackwardTiling | None,
    reasons: Sequence[str],
    matrix_unit: str | None = None,
) -> TilePlan:
    """The `TilePlan` of a planner's choices for ``spec`` on ``device``: ``forward``'s fields as they
    are, ``backward`` (None: no backward tiling fits) with its work units (batch x heads x blocks of
    ``backward.block_k`` keys), the IO model's predicted forward traffic for these blocks and its lower
    bound for the device's SRAM (``iomodel``). ``target`` names the family of rules ("gpu" or "cpu").
    Every planner, generic or a backend's, builds its plans here."""
    batch_heads = spec.batch * spec.heads
    e = DTYPE_BYTES[spec.dtype]
    traffic = iomodel.forward_bytes(
        batch_heads=batch_heads, seqlen_q=spec.seqlen_q, seqlen_k=spec.seqlen_k, head_dim=spec.head_dim,
        element_bytes=e, block_q=forward.block_q, causal=spec.causal, key_splits=forward.key_splits,
    )
    bound = iomodel.lower_bound_bytes(
        batch_heads=batch_heads, seqlen_q=spec.seqlen_q, seqlen_k=spec.seqlen_k, head_dim=spec.head_dim,
        element_bytes=e, sram_bytes=device.sram_per_block,
    )
    if backward is not None:
        backward = BackwardPlan(**_fields(backward, BackwardTiling),
                                work_units=batch_heads * -(-spec.seqlen_k // backward.block_k))
    return TilePlan(
        device=device.name, target=target, **_fields(forward, ForwardTiling), backward=backward, hbm_bytes=traffic,
        hbm_bytes_lower_bound=bound, matrix_unit=matrix_unit, reasons=tuple(reasons),
    )


def _fields(value, cls) -> dict:
    """``value``'s fields of dataclass ``cls`` (a subclass's own left out), unconverted."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(cls)}
