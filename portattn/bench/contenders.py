"""The contenders of ``portattn bench`` on one device: their inputs, and portattn's backends.

Each contender is set up on one problem as a ``Timed``: the callable that runs one call, the clock
that times it to completion, the probe that measures its memory, and (for portattn) the tile plan.
Setting up may raise -- a backend refusing the shape, a peer missing from this torch -- and the
caller (``run.run_problem``) turns that into a table row with the reason. The peers are in
``peers``.

Inputs (``Inputs``) are drawn once per problem and handed to every contender in the array kind it
computes on: numpy on a CPU, torch tensors on CUDA, pyopencl arrays on an OpenCL device (the
``opencl`` backend: on a CUDA machine NVIDIA's OpenCL driver on the same GPU, on a CPU PoCL), so
no contender is charged for copies. torch and pyopencl are imported only when used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .. import arrays, timing
from .problems import Problem

# A timing on an asynchronous device (CUDA, OpenCL) runs calls back to back for at least this long
# (timing._Clock): the host's per-call overhead then overlaps the device's work.
DEVICE_TIMING_S = 2e-3


@dataclass
class Timed:
    """One contender set up on one problem."""

    fn: Callable[[], object]  # one call (may return before an asynchronous device is done)
    clock: Callable  # times one call of fn to completion, in seconds
    sync: Callable[[], object] | None  # waits for the device (pytest-benchmark times fn + sync on the host)
    memory: Callable[[], tuple]  # one call's (bytes, method) or (None, why not)
    plan: str | None = None


def device_kind(device: str) -> str:
    return device.split(":", 1)[0]


def default_device(requested: str | None = None) -> str:
    """The live device to time: as given (``cuda`` meaning ``cuda:0``), else cuda:0 when torch sees a
    GPU, else the CPU."""
    if requested is not None:
        return "cuda:0" if requested == "cuda" else requested
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda:0" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# inputs


def make_inputs(problem: Problem, device: str = "cpu", seed: int = 0):
    """(q, k, v, grad_out), standard normal, (B, H, N, D) and k, v (B, H_kv, Nk, D): numpy arrays on the
    CPU (torch for bfloat16, which numpy lacks), torch tensors on CUDA (drawn there: the flash grid's
    inputs are 64 MiB each)."""
    shapes = (problem.shape, problem.kv_shape, problem.kv_shape, problem.shape)
    if device_kind(device) == "cuda":
        import torch

        generator = torch.Generator(device=device).manual_seed(seed)
        dtype = getattr(torch, problem.dtype)
        return tuple(torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype) for shape in shapes)
    rng = np.random.default_rng(seed)
    host_dtype = "float32" if problem.dtype == "bfloat16" else problem.dtype
    arrays = [rng.standard_normal(shape, dtype=np.float32).astype(host_dtype) for shape in shapes]
    if problem.dtype != "bfloat16":
        return tuple(arrays)
    import torch

    return tuple(torch.from_numpy(a).to(dtype=torch.bfloat16) for a in arrays)


class Inputs:
    """One problem's inputs, drawn once, in each array kind a contender asks for (made on first use)."""

    def __init__(self, problem: Problem, device: str):
        self.problem, self.device = problem, device
        self.native = make_inputs(problem, device) if device_kind(device) != "opencl" else None
        self._opencl: dict = {}

    def torch(self):
        import torch

        return tuple(torch.as_tensor(x, device=self.device if device_kind(self.device) == "cuda" else "cpu") for x in self.native)

    def opencl(self, label: str):
        """pyopencl arrays on OpenCL device ``label`` (the values of ``native`` when there are any)."""
        if label not in self._opencl:
            import pyopencl.array as cla

            from ..backends.opencl import runtime as opencl_runtime

            if self.problem.dtype not in ("float32", "float16"):
                raise ValueError(f"the bench feeds opencl float32/float16 pyopencl arrays; pyopencl has no {self.problem.dtype}")
            host = self.host()
            queue = opencl_runtime.queue_for(label)
            self._opencl = {label: (queue, tuple(cla.to_device(queue, x) for x in host))}  # one device's copy at a time
        return self._opencl[label]

    def host(self):
        if self.native is None:
            return make_inputs(self.problem, "cpu")
        return tuple(x if isinstance(x, np.ndarray) else x.detach().float().cpu().numpy().astype(self.problem.dtype)
                     for x in self.native)


# ----------------------------------------------------------------------------------------------
# portattn's backends


def default_backends(device: str, named=(), skipped: dict | None = None) -> list[str]:
    """The usable backends for ``device``, then any ``named`` ones, without repeats.

    Those ``auto`` may pick on the device's kind, and on CUDA also ``opencl`` when an OpenCL GPU is
    found (NVIDIA's driver beside CUDA). ``reference`` is never included unless named (it builds the
    N x N scores). Each backend left out goes into ``skipped`` as {name: why}.
    """
    from ..backends import registry

    kind = device_kind(device)
    chosen = []
    for name, backend in registry().items():
        wanted = kind in backend.auto_priority or (kind == "cuda" and name == "opencl")
        if not wanted:
            continue
        if not backend.usable:  # reads no GPU for a CPU run: only the backends ranked for this kind
            if skipped is not None:
                skipped[name] = "; ".join(backend.unavailable_reasons())
            continue
        if name == "opencl" and kind != "opencl":
            try:
                opencl_label(device)
            except Exception as error:  # noqa: BLE001 - pyopencl's own errors too: opencl is then left out, with why
                if skipped is not None:
                    skipped[name] = timing.reason(error)
                continue
        chosen.append(name)
    return chosen + [name for name in named if name not in chosen]


def opencl_label(device: str) -> str:
    """The OpenCL device the ``opencl`` backend is timed on for bench device ``device``.

    ``opencl:P:D`` itself; for ``cuda:N`` NVIDIA's N-th OpenCL GPU (the same GPU when the two drivers
    number them alike, as they do by default) or else the first OpenCL GPU; for ``cpu`` the first
    OpenCL CPU device (PoCL) -- unless ``$PORTATTN_OPENCL_DEVICE`` names one. ValueError when none fits.
    """
    import pyopencl as cl

    from ..backends.opencl import runtime as opencl_runtime

    if device_kind(device) == "opencl":
        return device
    if os.environ.get(opencl_runtime.ENVIRONMENT_VARIABLE):
        return opencl_runtime.choose()
    listed = opencl_runtime.devices()
    want = cl.device_type.CPU if device_kind(device) == "cpu" else cl.device_type.GPU | cl.device_type.ACCELERATOR
    fitting = [(label, d) for label, d in listed if d.type & want]
    nvidia = [item for item in fitting if "nvidia" in item[1].platform.name.lower()]
    index = int(device.split(":", 1)[1]) if device_kind(device) == "cuda" and ":" in device else 0
    if len(nvidia) > index:
        return nvidia[index][0]
    if not fitting:
        found = ", ".join(f"{label} ({d.name.strip()})" for label, d in listed) or "none"
        kind = "CPU" if device_kind(device) == "cpu" else "GPU"
        raise ValueError(f"no OpenCL {kind} device (found: {found}); set ${opencl_runtime.ENVIRONMENT_VARIABLE} to time another")
    return fitting[0][0]


def portattn_call(name: str, problem: Problem, inputs):
    """(callable, plan summary) for portattn backend ``name`` on ``inputs`` = (q, k, v, grad_out) through
    ``api.prepare`` (decoding: ``kvcache_call``); ValueError with the backend's reasons when it cannot
    run the problem."""
    from ..api import prepare

    if problem.decoding:
        return kvcache_call(name, problem, inputs)
    q, k, v, grad_out = inputs
    call = prepare(q, k, v, causal=problem.causal, backend=name)
    if not problem.backward:
        return (lambda: call.forward(q, k, v)), call.plan.summary()

    def forward_backward():
        out, lse = call.forward(q, k, v)
        return call.backward(grad_out, q, k, v, out, lse)

    return forward_backward, call.plan.summary()


def kvcache_call(name: str, problem: Problem, inputs):
    """(callable, plan summary) of ``attention_with_kvcache`` as an inference engine calls it each step:
    q as (B, Nq, H, D), the cache in flash-attn's (B, Nk, H_kv, D) layout -- the (B, H_kv, Nk, D) inputs
    seen through a transposed view, so the keys of one head stay contiguous, as in the peers' inputs --
    or, with a page size, copied into pages in shuffled order with a block table; every sequence full."""
    from ..kvcache import attention_with_kvcache

    q, k, v, _ = inputs
    if arrays.is_pyopencl(q):
        # pyopencl arrays: attention_with_kvcache takes numpy or torch caches (as flash-attn's does torch's), so
        # the opencl backend is timed as a user meets it, from host arrays copied to its device in each call
        q, k, v = (x.get() for x in (q, k, v))
    query, k_cache, v_cache = _swap12(q), _swap12(k), _swap12(v)
    block_table = None
    if problem.page_size:
        k_cache, v_cache, block_table = paged_cache(k_cache, v_cache, problem.page_size)
    lengths = np.full(problem.batch, problem.seqlen, dtype=np.int32)
    if not isinstance(q, np.ndarray):  # torch: the lengths on q's device, as an engine keeps them
        import torch

        lengths = torch.from_numpy(lengths).to(q.device)
    return (lambda: attention_with_kvcache(query, k_cache, v_cache, lengths, block_table, backend=name)), None


def _swap12(x):
    return x.transpose(1, 2) if not isinstance(x, np.ndarray) else x.transpose(0, 2, 1, 3)


def paged_cache(k_cache, v_cache, page_size: int, seed: int = 0):
    """A (B, Nk, H_kv, D) cache as pages (B * Nk / page_size, page_size, H_kv, D) in shuffled order and
    the (B, Nk / page_size) int32 block table that finds them."""
    batch, seqlen = k_cache.shape[0], k_cache.shape[1]
    if seqlen % page_size:
        raise ValueError(f"a paged cache of {seqlen} keys per sequence needs a page size that divides it, not {page_size}")
    pages = batch * seqlen // page_size
    order = np.random.default_rng(seed).permutation(pages)  # page i of the sequences lives at slot order[i]
    table = order.reshape(batch, seqlen // page_size).astype(np.int32)
    if isinstance(k_cache, np.ndarray):
        slots = np.argsort(order)
        return (*(np.ascontiguousarray(x.reshape(pages, page_size, *x.shape[2:])[slots]) for x in (k_cache, v_cache)),
                table)
    import torch

    slots = torch.from_numpy(np.argsort(order)).to(k_cache.device)
    paged = [x.reshape(pages, page_size, *x.shape[2:])[slots].contiguous() for x in (k_cache, v_cache)]
    return (*paged, torch.from_numpy(table).to(k_cache.device))


def portattn_timed(name: str, problem: Problem, inputs: Inputs) -> Timed:
    kind = device_kind(inputs.device)
    if name == "opencl":
        queue, arrays = inputs.opencl(opencl_label(inputs.device))
        fn, plan = portattn_call(name, problem, arrays)
        clock = timing.HostClock(queue.finish, "host clock + queue.finish", target_s=DEVICE_TIMING_S)
        memory = (lambda: timing.process_peak(fn, queue.finish)) if kind == "cpu" else (lambda: timing.opencl_buffers(fn, queue))
        return Timed(fn, clock, queue.finish, memory, plan)
    fn, plan = portattn_call(name, problem, inputs.native)
    return Timed(fn, *torch_device_timing(fn, inputs.device), plan)


def torch_device_timing(fn, device: str):
    """(clock, sync, memory probe) for a callable on ``device``'s torch/numpy arrays."""
    if device_kind(device) == "cuda":
        import torch

        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
        return timing.CudaEventClock(device, target_s=DEVICE_TIMING_S), sync, lambda: timing.torch_cuda_peak(fn, device)
    return timing.HostClock(None), None, lambda: timing.process_peak(fn)
