"""Side-by-side timing of portattn backends and their peers, for ``portattn bench``.

This module owns the measuring: a grid of problems, one timed callable per (backend, problem),
the median of repeats after a warm-up run, throughput in GFLOP/s counted as flash-attention's
benchmark counts it (forward = 4·B·H·Nq·Nk·D, halved when causal; forward+backward = 3.5×
forward), each row's ratio to the best peer on the same problem, a plain-text table and a JSON
record. Everything runs in one process so ratios compare like with like.

Peers are the attention kernels portattn is held against on the same device: on a CPU, torch's
``scaled_dot_product_attention`` restricted to its flash kernel; on CUDA, the SDPA backends
(cuDNN, flash, memory-efficient). torch is imported only inside the functions that use it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .spec import AttentionSpec

MODES = ("fwd", "fwd+bwd")
BACKWARD_FLOP_FACTOR = 3.5  # forward+backward FLOPs as a multiple of forward (flash-attention's count)
QUICK_SEQLENS = (512, 1024, 2048)
QUICK_HEAD_DIMS = (64,)


@dataclass(frozen=True)
class Problem:
    """One timed shape: (batch, heads, seqlen, head_dim) inputs, a mask and a pass."""

    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    dtype: str
    mode: str  # "fwd" or "fwd+bwd"

    def spec(self, device: str = "cpu") -> AttentionSpec:
        return AttentionSpec(
            batch=self.batch,
            heads=self.heads,
            seqlen_q=self.seqlen,
            seqlen_k=self.seqlen,
            head_dim=self.head_dim,
            dtype=self.dtype,
            causal=self.causal,
            device=device,
            requires_grad=self.mode == "fwd+bwd",
        )

    @property
    def flops(self) -> float:
        forward = self.spec().flops_forward
        return forward * BACKWARD_FLOP_FACTOR if self.mode == "fwd+bwd" else float(forward)


@dataclass
class Result:
    """The timing of one backend or peer on one problem (``error`` set when it could not run)."""

    name: str
    role: str  # "portattn" or "peer"
    problem: Problem
    times_s: list[float] = field(default_factory=list)
    plan: str | None = None  # TilePlan.summary() for portattn backends
    error: str | None = None
    ratio_to_best_peer: float | None = None  # this row's GFLOP/s over the best peer's; >1 = faster
    best_peer: str | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_s) * 1e3 if self.times_s else None

    @property
    def gflops(self) -> float | None:
        return self.problem.flops / (self.median_ms * 1e-3) / 1e9 if self.times_s else None


def grid(seqlens, head_dims, *, causal: bool, modes, dtype: str, heads: int = 8, batch: int = 1) -> list[Problem]:
    """Every (mode, head_dim, seqlen) combination, in table order."""
    return [Problem(batch, heads, n, d, causal, dtype, mode) for mode in modes for d in head_dims for n in seqlens]


def time_callable(fn: Callable[[], object], repeats: int, *, warmup: int = 1, sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds per call of ``fn``, ``repeats`` times (may be 0), after ``warmup`` untimed calls.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so asynchronous
    devices are timed to completion.
    """
    wait = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    wait()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        wait()
        times.append(time.perf_counter() - start)
    return times


# ----------------------------------------------------------------------------------------------
# inputs and the callables that are timed


def make_inputs(problem: Problem, device: str = "cpu", seed: int = 0):
    """(q, k, v, grad_out): numpy arrays on the CPU, torch tensors elsewhere; standard normal."""
    rng = np.random.default_rng(seed)
    shape = (problem.batch, problem.heads, problem.seqlen, problem.head_dim)
    host_dtype = "float32" if problem.dtype == "bfloat16" else problem.dtype
    arrays = [rng.standard_normal(shape, dtype=np.float32).astype(host_dtype) for _ in range(4)]
    if device == "cpu" and problem.dtype != "bfloat16":
        return tuple(arrays)
    import torch

    return tuple(torch.from_numpy(a).to(device=device, dtype=getattr(torch, problem.dtype)) for a in arrays)


def portattn_call(name: str, problem: Problem, inputs):
    """(timed callable, plan summary) for portattn backend ``name`` through ``api.prepare``.

    Raises ``ValueError`` with the backend's reasons when it cannot run the problem.
    """
    from .api import prepare

    q, k, v, grad_out = inputs
    call = prepare(q, k, v, causal=problem.causal, backend=name)
    if problem.mode == "fwd":
        return (lambda: call.forward(q, k, v)), call.plan.summary()

    def forward_backward():
        out, lse = call.forward(q, k, v)
        return call.backward(grad_out, q, k, v, out, lse)

    return forward_backward, call.plan.summary()


def _torch_sdpa_call(problem: Problem, inputs, device: str, sdpa_backend: str):
    """A callable running torch's SDPA restricted to one of its kernels (``SDPBackend`` name)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    q, k, v, grad_out = (torch.as_tensor(x, device=device) for x in inputs)
    kernel = getattr(SDPBackend, sdpa_backend)
    if problem.mode == "fwd":

        def forward():
            with torch.no_grad(), sdpa_kernel([kernel]):
                return scaled_dot_product_attention(q, k, v, is_causal=problem.causal)

        return forward
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]

    def forward_backward():
        with sdpa_kernel([kernel]):
            out = scaled_dot_product_attention(*leaves, is_causal=problem.causal)
            return torch.autograd.grad(out, leaves, grad_out)

    return forward_backward


# Peers by device kind: (row name, SDPA kernel name).
_PEERS = {
    "cpu": (("torch-sdpa-flash", "FLASH_ATTENTION"),),
    "cuda": (
        ("torch-sdpa-cudnn", "CUDNN_ATTENTION"),
        ("torch-sdpa-flash", "FLASH_ATTENTION"),
        ("torch-sdpa-efficient", "EFFICIENT_ATTENTION"),
    ),
}


def peer_names(device: str) -> list[str]:
    """The peers timed on ``device``: empty when torch (or the device in torch) is missing."""
    kind = device.split(":", 1)[0]
    try:
        import torch
    except ImportError:
        return []
    if kind == "cuda" and not torch.cuda.is_available():
        return []
    return [name for name, _ in _PEERS.get(kind, ())]


def peer_call(name: str, problem: Problem, inputs, device: str):
    kind = device.split(":", 1)[0]
    sdpa_backend = dict(_PEERS[kind])[name]
    return _torch_sdpa_call(problem, inputs, device, sdpa_backend)


def _sync_for(device: str):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return None


# ----------------------------------------------------------------------------------------------
# the grid


def default_backends(device: str, named=()) -> list[str]:
    """Usable backends ``auto`` may pick on ``device``'s kind, then any named ones, without repeats."""
    from .backends import registry

    kind = device.split(":", 1)[0]
    chosen = [name for name, b in registry().items() if kind in b.auto_priority and b.usable]  # no GPU probe for a CPU run
    return chosen + [name for name in named if name not in chosen]


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 1, sync=None) -> dict[str, list[float]]:
    """Seconds per call for each of ``fns``, their repeats interleaved (a, b, c, b, c, a, ...).

    On a shared machine the load drifts over seconds; taking turns spreads that drift over every
    contender instead of charging it to whichever ran during the slow spell, so ratios stay fair.
    """
    names = list(fns)
    for name in names:
        time_callable(fns[name], 0, warmup=warmup, sync=sync)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(max(1, repeats)):
        shift = repeat % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            times[name].extend(time_callable(fns[name], 1, warmup=0, sync=sync))
    return times


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_problem(problem: Problem, backends, peers, *, device: str = "cpu", repeats: int = 7) -> list[Result]:
    """Every backend and peer on one problem, on the same inputs, timed in turns; ratios filled in."""
    inputs = make_inputs(problem, device)
    results, fns = [], {}
    for role, names in (("portattn", backends), ("peer", peers)):
        for name in names:
            result = Result(name, role, problem)
            try:
                if role == "portattn":
                    fn, result.plan = portattn_call(name, problem, inputs)
                else:
                    fn = peer_call(name, problem, inputs, device)
                fn()  # a first call here, so a kernel that fails is reported, not timed
            except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
                result.error = _first_line(error)
            else:
                fns[len(results)] = fn
            results.append(result)
    for index, times in time_interleaved(fns, repeats, warmup=0, sync=_sync_for(device)).items():
        results[index].times_s = times
    add_ratios(results)
    return results


def run_grid(problems, backends, peers, *, device: str = "cpu", repeats: int = 7, progress: Callable[[Result], None] | None = None) -> list[Result]:
    results = []
    for problem in problems:
        for result in run_problem(problem, backends, peers, device=device, repeats=repeats):
            if progress is not None:
                progress(result)
            results.append(result)
    return results


def add_ratios(results: list[Result]) -> None:
    """Each timed row's GFLOP/s over the best peer's on the same problem."""
    best: dict[Problem, Result] = {}
    for r in results:
        if r.role == "peer" and r.gflops is not None and (r.problem not in best or r.gflops > best[r.problem].gflops):
            best[r.problem] = r
    for r in results:
        peer = best.get(r.problem)
        if peer is not None and r.gflops is not None:
            r.ratio_to_best_peer = r.gflops / peer.gflops
            r.best_peer = peer.name


# ----------------------------------------------------------------------------------------------
# output


TABLE_COLUMNS = ("backend", "N", "D", "causal", "mode", "median ms", "GFLOP/s", "vs best peer", "plan")


def _row(r: Result) -> tuple[str, ...]:
    p = r.problem
    head = (r.name, str(p.seqlen), str(p.head_dim), "1" if p.causal else "0", p.mode)
    if r.error is not None:
        return head + ("-", "-", "-", f"not run: {r.error}")
    ratio = f"{r.ratio_to_best_peer:.2f}x" if r.ratio_to_best_peer is not None else "-"
    return head + (f"{r.median_ms:.2f}", f"{r.gflops:.1f}", ratio, r.plan or "")


def format_table(results: list[Result]) -> str:
    """A fixed-width table, one row per result; the plan column is left unpadded at the end."""
    rows = [TABLE_COLUMNS] + [_row(r) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS) - 1)]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.rjust(w) if 0 < i < len(widths) and i != 4 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 4)
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, str | None]:
    """Versions of what the timings depend on (None: not installed)."""
    from . import __version__

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "numba": _version("numba"),
        "scipy": _version("scipy"),
        "portattn": __version__,
    }


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
        "median_ms": r.median_ms,
        "times_ms": [t * 1e3 for t in r.times_s],
        "gflops": r.gflops,
        "ratio_to_best_peer": r.ratio_to_best_peer,
        "best_peer": r.best_peer,
        "plan": r.plan,
        "error": r.error,
    }


def report(results: list[Result], device, *, command: str, repeats: int) -> dict:
    """The JSON-ready record of a run: device, versions, date, command and every row."""
    return {
        "device": {"name": device.name, "kind": device.kind, "arch": device.arch, "description": device.describe()},
        "versions": environment(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "platform": platform.platform(),
        "timing": f"median of {repeats} repeats after one warm-up run, backends taking turns per repeat, time.perf_counter, one process",
        "flops": "forward 4*B*H*Nq*Nk*D (halved when causal); forward+backward 3.5x forward",
        "results": [result_record(r) for r in results],
    }


def write_json(path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def command_line(argv: list[str] | None) -> str:
    """The command as typed: ``portattn ...`` or ``python -m portattn ...``."""
    import shlex

    program = sys.argv[0] if sys.argv else "portattn"
    prog = "python -m portattn" if program.endswith("__main__.py") else Path(program).name or "portattn"
    if argv is None:
        argv = sys.argv[1:]
    elif not program.endswith(("portattn", "__main__.py")):
        prog = "portattn"  # called as main([...]) from Python
    return " ".join([prog] + [shlex.quote(str(a)) for a in argv])
