"""What ``portattn bench`` prints and saves: the table, the JSON record, and results read back.

The JSON record holds the device, the versions the timings depend on, the date, the command, how
time and memory were measured, and one entry per (contender, problem) -- enough to redraw the
plots (``--from-json``) or the docs' tables (``docs/gen_benchmark_tables.py``) without the device.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

from .problems import Problem
from .run import Result

TABLE_COLUMNS = ("backend", "BxH", "N", "D", "causal", "mode", "dtype", "median ms", "GFLOP/s", "vs best peer", "peak mem",
                 "plan")
_LEFT = {0, 5, 6}  # backend, mode and dtype read left-aligned; numbers right-aligned


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _row(r: Result, unit: str) -> tuple[str, ...]:
    p = r.problem
    heads, seqlen, mode = f"{p.batch}x{p.heads}", str(p.seqlen), p.mode
    if p.decoding:  # B x H/H_kv, Nq x Nk, decode (paged P)
        heads, seqlen = f"{heads}/{p.kv_heads or p.heads}", f"{p.queries}x{p.seqlen}"
        mode += f" paged {p.page_size}" if p.page_size else ""
    head = (r.name, heads, seqlen, str(p.head_dim), "1" if p.causal else "0", mode, p.dtype)
    if r.error is not None:
        return head + ("-", "-", "-", "-", f"not run: {r.error}")
    rate = r.gbps if unit == "GB/s" else r.gflops / 1e3 if unit == "TFLOP/s" else r.gflops
    ratio = f"{r.ratio_to_best_peer:.2f}x" if r.ratio_to_best_peer is not None else "-"
    return head + (f"{r.median_ms:.3f}" if r.median_ms < 1 else f"{r.median_ms:.2f}", f"{rate:.1f}", ratio,
                   _size(r.memory_bytes), r.plan or "")


def format_table(results: list[Result], unit: str = "GFLOP/s", plans: bool = True) -> str:
    """A fixed-width table, one row per result; the plan (or the reason a row did not run) is last,
    unpadded. ``unit``: "GFLOP/s" (CPUs) or "TFLOP/s" (GPUs). ``plans=False`` keeps the last column
    to the reasons rows did not run (about 100 characters wide instead of 200)."""
    columns = tuple(unit if c == "GFLOP/s" else c for c in TABLE_COLUMNS)
    rows = [columns] + [_row(r, unit) for r in results]
    if not plans:
        rows = [row[:-1] + (row[-1] if row[-1].startswith("not run") else "",) for row in rows]
        rows[0] = rows[0][:-1] + ("",)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns) - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(w) if i in _LEFT else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
        if index == 0:
            lines.append(("  ".join("-" * w for w in widths) + "  " + ("-" * 4 if plans else "")).rstrip())
    return "\n".join(lines)


def unit_for(device_kind: str, decoding: bool = False) -> str:
    """TFLOP/s on GPUs, GFLOP/s on CPUs (where a TFLOP/s would read 0.1); GB/s for decoding, which is
    bound by reading the KV cache."""
    if decoding:
        return "GB/s"
    return "GFLOP/s" if device_kind == "cpu" else "TFLOP/s"


# ----------------------------------------------------------------------------------------------
# JSON


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def environment() -> dict[str, str | None]:
    """Versions of what the timings depend on (None: not installed)."""
    from ..version import __version__

    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "triton": _version("triton", "pytorch-triton"),
        "cupy": _version("cupy", "cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x"),
        "pyopencl": _version("pyopencl"),
        "numba": _version("numba"),
        "scipy": _version("scipy"),
        "portattn": __version__,
    }
    torch = sys.modules.get("torch")  # CUDA's version only when torch is already in use: no import for it
    if torch is not None and getattr(torch.version, "cuda", None):
        versions["cuda"] = torch.version.cuda
    return versions


def result_record(r: Result) -> dict:
    p = r.problem
    return {
        "backend": r.name,
        "role": r.role,
        "batch": p.batch,
        "heads": p.heads,
        "seqlen": p.seqlen,
        "head_dim": p.head_dim,
        "causal": p.causal,
        "dtype": p.dtype,
        "mode": p.mode,
        "seqlen_q": p.queries,
        "kv_heads": p.kv_heads or p.heads,
        "page_size": p.page_size,
        "bytes_moved": p.bytes_moved,
        "median_ms": r.median_ms,
        "times_ms": [t * 1e3 for t in r.times_s],
        "gflops": r.gflops,
        "tflops": r.gflops / 1e3 if r.gflops is not None else None,
        "gbps": r.gbps,
        "ratio_to_best_peer": r.ratio_to_best_peer,
        "best_peer": r.best_peer,
        "memory_bytes": r.memory_bytes,
        "memory_note": r.memory_note,
        "clock": r.clock,
        "plan": r.plan,
        "error": r.error,
    }


def result_from_record(row: dict) -> Result:
    """A ``Result`` read back from ``result_record``'s dict (older records lack the newer keys)."""
    decoding = row["mode"] == "decode"
    problem = Problem(row["batch"], row["heads"], row["seqlen"], row["head_dim"], row["causal"], row["dtype"], row["mode"],
                      seqlen_q=row.get("seqlen_q") if decoding else None, kv_heads=row.get("kv_heads") if decoding else None,
                      page_size=row.get("page_size", 0))
    return Result(row["backend"], row["role"], problem, times_s=[t / 1e3 for t in row.get("times_ms") or []],
                  plan=row.get("plan"), error=row.get("error"), ratio_to_best_peer=row.get("ratio_to_best_peer"),
                  best_peer=row.get("best_peer"), memory_bytes=row.get("memory_bytes"),
                  memory_note=row.get("memory_note"), clock=row.get("clock"))


def report(results: list[Result], device, *, command: str, repeats: int, **extra) -> dict:
    """The JSON-ready record of a run: device, versions, date, command, method and every row.
    ``extra`` adds keys (timing, memory, skipped contenders, wall time, ...)."""
    return {
        "device": {"name": device.name, "kind": device.kind, "arch": device.arch, "description": device.describe()},
        "versions": environment(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "platform": platform.platform(),
        "timing": f"median of {repeats} repeats after one warm-up run, backends taking turns per repeat, one process",
        "flops": "forward 4*B*H*Nq*Nk*D (halved when causal); forward+backward 3.5x forward",
        **extra,
        "results": [result_record(r) for r in results],
    }


def write_json(path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_json(path) -> tuple[dict, list[Result]]:
    record = json.loads(Path(path).read_text())
    if "results" not in record:
        raise ValueError(f"{path} is not a portattn bench record (no 'results')")
    return record, [result_from_record(row) for row in record["results"]]


def command_line(argv: list[str] | None) -> str:
    """The command as typed: ``portattn ...`` or ``python -m portattn ...``."""
    program = sys.argv[0] if sys.argv else "portattn"
    prog = "python -m portattn" if program.endswith("__main__.py") else Path(program).name or "portattn"
    if argv is None:
        argv = sys.argv[1:]
    elif not program.endswith(("portattn", "__main__.py")):
        prog = "portattn"  # called as main([...]) from Python
    return " ".join([prog] + [shlex.quote(str(a)) for a in argv])
