"""The peers of ``portattn bench``: the attention kernels portattn is held against on a device.

On a CPU, torch's ``scaled_dot_product_attention`` restricted to its flash kernel (its math kernel
on request); on CUDA, SDPA's cuDNN, flash, memory-efficient and math kernels and
``torch.compile(flex_attention)`` (causal through a block mask), with ``enable_gqa`` where K/V have
fewer heads. Decoding problems give the peers the cache as contiguous (B, H_kv, Nk, D) tensors, paged
or not: none of them reads pages. Each is set up as a
``contenders.Timed`` on the problem's torch tensors; a peer this torch lacks is skipped with the
reason, and one that cannot run a shape raises when set up. torch is imported only when used.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing

from .. import timing
from .contenders import Inputs, Timed, device_kind, torch_device_timing
from .problems import Problem

MATH_MAX_SEQLEN = 8192  # SDPA's math kernel builds the N x N scores: beyond this it takes tens of GB and minutes


def _sdpa(kernel_name: str):
    """A peer factory: torch's SDPA restricted to one ``SDPBackend`` kernel."""

    def make(problem: Problem, inputs: Inputs):
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        kernel = getattr(SDPBackend, kernel_name, None)
        if kernel is None:
            raise ValueError(f"torch {torch.__version__} has no SDPBackend.{kernel_name}")
        if kernel_name == "MATH":
            _check_math_fits(problem, inputs.device)

        group = problem.spec().group_size
        # decoding without a causal mask: the G query heads of a KV group see the same keys, so they go in as
        # G x Nq rows of one head against the cache's H_kv heads -- how inference engines call SDPA, reading
        # K/V once (with enable_gqa, SDPA's kernels repeat K/V to H heads first: G times the traffic)
        packed = problem.decoding and group > 1 and not problem.causal

        def forward(q, k, v):
            with sdpa_kernel([kernel]):
                if packed:
                    batch, heads, n_q, dim = q.shape
                    rows = q.reshape(batch, heads // group, group * n_q, dim)
                    return scaled_dot_product_attention(rows, k, v).reshape(batch, heads, n_q, v.shape[-1])
                if group > 1:  # enable_gqa only where needed: torch before 2.5 lacks the keyword
                    return scaled_dot_product_attention(q, k, v, is_causal=problem.causal, enable_gqa=True)
                return scaled_dot_product_attention(q, k, v, is_causal=problem.causal)

        return _torch_pass(forward, problem, inputs)

    return make


def _check_math_fits(problem: Problem, device: str) -> None:
    """SDPA's math kernel keeps the N x N scores (and, for the backward, the probabilities): refuse
    shapes whose score matrices would not fit in half the free device memory, or N > MATH_MAX_SEQLEN."""
    if problem.seqlen > MATH_MAX_SEQLEN:
        raise ValueError(f"math materializes the N x N scores: skipped above N = {MATH_MAX_SEQLEN}")
    if device_kind(device) != "cuda":
        return
    import torch

    itemsize = torch.finfo(getattr(torch, problem.dtype)).bits // 8
    copies = 6 if problem.backward else 3  # scores, masked scores, probabilities; and their gradients
    need = problem.batch * problem.heads * problem.queries * problem.seqlen * itemsize * copies
    free, _ = torch.cuda.mem_get_info(device)
    if need > free / 2:
        raise ValueError(f"math materializes the N x N scores: ~{need / 2**30:.0f} GiB > half the free {free / 2**30:.0f} GiB")


def _torch_pass(forward, problem: Problem, inputs: Inputs) -> Timed:
    """A Timed running ``forward(q, k, v)`` (no grad), or forward+backward through torch.autograd."""
    import torch

    q, k, v, grad_out = inputs.torch()
    if not problem.backward:  # a forward ("fwd", "decode")

        def fn():
            with torch.no_grad():
                return forward(q, k, v)

    else:
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]

        def fn():
            out = forward(*leaves)
            return torch.autograd.grad(out, leaves, grad_out)

    return Timed(fn, *torch_device_timing(fn, inputs.device))


_FLEX = {}


def flex_callables(device: str):
    """``make(causal, n)`` -> ``torch.compile(flex_attention)`` callable on ``device``, causal through a
    block mask (one per N, kept).

    Compiled with static shapes (``dynamic=False``) and recompile limits above any grid's size, so
    every shape gets its own specialized kernel, as a user running one shape would: with the default
    limit of 8, dynamo would fall back to dynamic-shape or eager code part-way through the grid."""
    if device in _FLEX:
        return _FLEX[device]
    import torch
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    for limit in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, 1024)
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def make(causal: bool, n: int, gqa: bool = False):
        if causal and n not in masks:
            masks[n] = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, n, n, device=device)
        block_mask = masks.get(n) if causal else None
        if gqa:
            return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)
        return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)

    _FLEX[device] = make
    return make


def _flex(problem: Problem, inputs: Inputs) -> Timed:
    if problem.causal and problem.queries != problem.seqlen:
        raise ValueError("the flex peer's causal block mask is for Nq = Nk")
    forward = flex_callables(inputs.device)(problem.causal, problem.seqlen, gqa=problem.spec().group_size > 1)
    return _torch_pass(forward, problem, inputs)


def _flex_available() -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as error:
        return f"no FlexAttention in this torch ({timing.reason(error)})"
    return None


def _sdpa_available(kernel_name: str) -> str | None:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError as error:
        return f"no torch.nn.attention.SDPBackend ({timing.reason(error)})"
    return None if hasattr(SDPBackend, kernel_name) else f"this torch has no SDPBackend.{kernel_name}"


# Peers by device kind: name -> (factory, availability check, timed by default).
PEERS = {
    "cpu": {
        "torch-sdpa-flash": (_sdpa("FLASH_ATTENTION"), lambda: _sdpa_available("FLASH_ATTENTION"), True),
        "torch-sdpa-math": (_sdpa("MATH"), lambda: _sdpa_available("MATH"), False),
    },
    "cuda": {
        "torch-sdpa-cudnn": (_sdpa("CUDNN_ATTENTION"), lambda: _sdpa_available("CUDNN_ATTENTION"), True),
        "torch-sdpa-flash": (_sdpa("FLASH_ATTENTION"), lambda: _sdpa_available("FLASH_ATTENTION"), True),
        "torch-sdpa-efficient": (_sdpa("EFFICIENT_ATTENTION"), lambda: _sdpa_available("EFFICIENT_ATTENTION"), True),
        "torch-sdpa-math": (_sdpa("MATH"), lambda: _sdpa_available("MATH"), True),
        "torch-flex": (_flex, _flex_available, True),
    },
}


def known_peers(device: str) -> list[str]:
    return list(PEERS.get(device_kind(device), {}))


def peer_names(device: str, named=None, skipped: dict | None = None) -> list[str]:
    """The peers timed on ``device`` (``named``: these instead of the default ones); those missing here
    (no torch, no CUDA in torch, no FlexAttention in this torch) go into ``skipped`` as {name: why}."""
    table = PEERS.get(device_kind(device), {})
    wanted = list(named) if named is not None else [name for name, (_, _, default) in table.items() if default]
    note = skipped if skipped is not None else {}
    try:
        import torch
    except ImportError:
        note.update({name: "torch is not installed" for name in wanted})
        return []
    if device_kind(device) == "cuda" and not torch.cuda.is_available():
        note.update({name: "torch sees no CUDA device" for name in wanted})
        return []
    chosen = []
    for name in wanted:
        why = table[name][1]() if name in table else f"not a peer on {device_kind(device)} (known: {', '.join(table)})"
        if why:
            note[name] = why
        else:
            chosen.append(name)
    return chosen


def peer_timed(name: str, problem: Problem, inputs: Inputs) -> Timed:
    factory = PEERS[device_kind(inputs.device)][name][0]
    return factory(problem, inputs)


# ----------------------------------------------------------------------------------------------
# compiling FlexAttention ahead of the timed process


def _flex_warm_worker(device: str, problems: list[Problem]) -> int:
    """Compile flex for some problems in a worker process: inductor's on-disk caches then serve the
    timing process, so compilation (a minute a shape, on one core) is spread over the CPU's cores."""
    import torch

    for problem in problems:
        try:
            timed = _flex(problem, Inputs(problem, device))
            timed.fn()
        except Exception:  # noqa: BLE001 - reported when the timing process sets it up
            pass
        torch.cuda.empty_cache()
    return len(problems)


def warm_flex(problems: list[Problem], device: str, workers: int) -> None:
    """Compile flex for every problem in ``workers`` spawned processes (best effort: any failure
    leaves the compilation to the timing process)."""
    shares = [share for share in (problems[i::workers] for i in range(workers)) if share]
    try:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(len(shares), mp_context=context) as pool:
            list(pool.map(_flex_warm_worker, [device] * len(shares), shares))
    except Exception:  # noqa: BLE001 - a speed-up only
        pass
