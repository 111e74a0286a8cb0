"""Side-by-side timing of portattn's backends and their peers, for ``portattn bench``.

    problems    what is timed: ``Problem`` (shape, mask, dtype, pass or decoding), FLOP and byte counts, the grids
    contenders  inputs per array kind, portattn's backends set up as ``Timed`` (callable, clock, memory)
    peers       torch's SDPA kernels and FlexAttention, the same way
    timing      clocks (host, CUDA events), interleaved repeats, memory probes
    run         the grid: set up, warm up, time in turns, ratios to the best peer
    report      the table, the JSON record and reading it back
    plot        throughput against N per (head dim, mask, pass, dtype), matplotlib
    progress    the progress line on stderr

Every contender runs in one process on the same inputs so that ratios compare like with like.
"""

from __future__ import annotations

from ..timing import CudaEventClock, HostClock, reason, repeats_within, time_callable, time_interleaved
from . import plot, progress
from .contenders import (
    Inputs,
    Timed,
    default_backends,
    default_device,
    kvcache_call,
    make_inputs,
    opencl_label,
    paged_cache,
    portattn_call,
    portattn_timed,
)
from .peers import MATH_MAX_SEQLEN, known_peers, peer_names, peer_timed, warm_flex
from .problems import (
    BACKWARD_FLOP_FACTOR,
    MODES,
    QUICK_HEAD_DIMS,
    QUICK_SEQLENS,
    Problem,
    decode_grid,
    default_grid,
    flash_shape,
    grid,
)
from .report import (
    TABLE_COLUMNS,
    command_line,
    environment,
    format_table,
    read_json,
    report,
    result_from_record,
    result_record,
    unit_for,
    write_json,
)
from .run import Result, add_ratios, run_grid, run_problem, setup

__all__ = [
    "plot",
    "progress",
    "Inputs",
    "Timed",
    "default_backends",
    "default_device",
    "kvcache_call",
    "make_inputs",
    "paged_cache",
    "opencl_label",
    "portattn_call",
    "portattn_timed",
    "MATH_MAX_SEQLEN",
    "known_peers",
    "peer_names",
    "peer_timed",
    "warm_flex",
    "BACKWARD_FLOP_FACTOR",
    "MODES",
    "QUICK_HEAD_DIMS",
    "QUICK_SEQLENS",
    "Problem",
    "decode_grid",
    "default_grid",
    "flash_shape",
    "grid",
    "TABLE_COLUMNS",
    "command_line",
    "environment",
    "format_table",
    "read_json",
    "report",
    "result_from_record",
    "result_record",
    "unit_for",
    "write_json",
    "Result",
    "add_ratios",
    "run_grid",
    "run_problem",
    "setup",
    "CudaEventClock",
    "HostClock",
    "reason",
    "repeats_within",
    "time_callable",
    "time_interleaved",
]
