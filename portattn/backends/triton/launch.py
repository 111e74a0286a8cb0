"""Launching the Triton kernels: tensor views (tensor, strides), the ``Features`` tuple and constexpr
flags a call's spec and extras give, block-sparse lists, the LSE merge of key splits, and ``run``,
which relaunches a kernel compiled before without Triton's per-launch argument binding."""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import NamedTuple

from ...extras import NONE
from ...memo import by_identity

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def kernels():
    from . import kernels as triton_kernels  # compiled on first launch of each constexpr specialization, then cached

    return triton_kernels

def in_precision(q) -> str:
    """tl.dot's input precision for tensor ``q``'s dtype (``precision_for``)."""
    return precision_for(str(q.dtype).removeprefix("torch."))


def precision_for(dtype: str) -> str:
    """tl.dot's input precision: IEEE float32 for float32 inputs; for 16-bit inputs Triton ignores it.
    "upcast" (bfloat16 under the interpreter only) widens the operands first: the Triton 3.x
    interpreter's tl.dot returns garbage for bfloat16 operands; on a GPU they go to the tensor cores."""
    if dtype == "float32":
        return "ieee"
    if dtype == "bfloat16" and interpreting():
        return "upcast"
    return "tf32"


class ForwardLaunch(NamedTuple):
    """What a forward launch takes that follows from the spec and plan alone, worked out once per pair:
    a repeated small call then only allocates its outputs and launches."""

    kernel: object  # attention_forward_features when a feature is on, else the featureless attention_forward
    featured: bool
    splits: int
    grid: tuple
    scalars: tuple  # heads, seqlen_q, seqlen_k, scale * log2(e), keys per split
    meta: dict  # constexprs (the feature flags among them when featured) and launch options


@by_identity
def forward_launch(spec, plan, store_lse: bool = True) -> ForwardLaunch:
    """``store_lse=False``: a call that needs O alone (inference); with one split its LSE is then not written."""
    key_blocks = -(-spec.seqlen_k // plan.block_k)
    splits = max(1, min(plan.key_splits, key_blocks))
    keys_per_split = -(-key_blocks // splits) * plan.block_k
    flags = feature_flags(spec, by_keys=False, atomic_dq=False)
    featured = any(flags.values())
    meta = dict(HEAD_DIM=spec.head_dim, BLOCK_M=plan.block_q, BLOCK_N=plan.block_k, BLOCK_D=plan.head_dim_padded,
                CAUSAL=spec.causal, IN_PRECISION=precision_for(spec.dtype), STORE_LSE=store_lse or splits > 1,
                num_warps=plan.warps, num_stages=plan.stages)
    return ForwardLaunch(
        kernel=kernels().attention_forward_features if featured else kernels().attention_forward,
        featured=featured, splits=splits,
        grid=(-(-spec.seqlen_q // plan.block_q), spec.batch * spec.heads, splits),
        scalars=(spec.heads, spec.seqlen_q, spec.seqlen_k, spec.softmax_scale * LOG2E, keys_per_split),
        meta={**flags, **meta} if featured else meta,
    )

def strides(x, varlen: bool = False):
    """(batch, head, row, col) strides; varlen tensors are (1, H, total, D) whose rows are found from
    cu_seqlens, so their batch stride is 0 (the kernels index batch by sequence)."""
    strides = tuple(x.stride())
    return (0, *strides[1:]) if varlen else strides

def view(x, varlen: bool = False):
    """A (batch, head, row, col) tensor as the kernels take it: one argument, (tensor, strides)."""
    return x, strides(x, varlen)

def lse_strides(lse, varlen: bool):
    """(batch, head) strides of a (B, H, N) float32 LSE/delta whose rows are contiguous."""
    return (0 if varlen else lse.stride(0), lse.stride(1))

def features(spec, extras, *, by_keys: bool, atomic_dq: bool = False):
    """``feature_arguments``, cached when the call has no feature arrays (``extras is NONE``): then
    they follow from the spec alone, and a repeated plain call must not rebuild them."""
    if extras is NONE:
        return spec_features(spec, by_keys, atomic_dq)
    return feature_arguments(spec, extras, by_keys=by_keys, atomic_dq=atomic_dq)

@functools.lru_cache(maxsize=1024)
def spec_features(spec, by_keys: bool, atomic_dq: bool):
    return feature_arguments(spec, NONE, by_keys=by_keys, atomic_dq=atomic_dq)

def feature_arguments(spec, extras, *, by_keys: bool, atomic_dq: bool = False):
    """The kernels' ``Features`` tuple (kernels.py) and constexpr flags (the sparse block sizes among
    them) for a call; every flag off, and placeholders, for a plain call, so it compiles as before.
    ``by_keys``: block-sparse lists per sparse key block (the dK/dV pass) instead of per query block;
    ``atomic_dq``: that pass also sums dQ."""
    torch = torch_module()
    left, right = spec.window if spec.window is not None else (None, None)
    mask = extras.attn_mask if spec.mask is not None else None
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same strides: the kernels read bytes
    slopes = extras.alibi_slopes if spec.alibi else None
    pad = extras.key_padding_mask.view(torch.uint8) if spec.key_padding else None
    sparse = spec.block_size is not None
    sp_idx, sp_num = sparse_lists(extras.block_mask, spec, by_keys) if sparse else (None, None)
    dropout = spec.dropout_p > 0
    values = kernels().Features(
        spec.group_size,
        extras.cu_seqlens_q if spec.varlen else None, extras.cu_seqlens_k if spec.varlen else None,
        left or 0, right or 0,
        spec.softcap * LOG2E if spec.softcap is not None else 0.0,
        slopes, *(slopes.stride() if slopes is not None else (0, 0)),
        mask, *(mask.stride() if mask is not None else (0, 0, 0, 0)),
        pad, *(pad.stride() if pad is not None else (0, 0)),
        sp_idx, *(sp_idx.stride()[:3] if sparse else (0, 0, 0)),
        sp_num, *(sp_num.stride()[:2] if sparse else (0, 0)),
        int(extras.dropout_seed) if dropout else 0, float(spec.dropout_p), 1.0 / (1.0 - spec.dropout_p),
    )
    return values, feature_flags(spec, by_keys=by_keys, atomic_dq=atomic_dq)


def feature_flags(spec, *, by_keys: bool, atomic_dq: bool) -> dict:
    """The constexpr feature flags of a call (``feature_arguments``): they follow from the spec alone."""
    left, right = spec.window if spec.window is not None else (None, None)
    sparse = spec.block_size is not None
    return dict(
        GQA=spec.group_size > 1,
        VARLEN=spec.varlen,
        # bottom-right with as many queries as keys places them as top-left does (a model's prefill): no flag, so a
        # plain causal prefill launches the featureless kernel; varlen sequences may still differ in length
        BOTTOM_RIGHT=(spec.align == "bottom-right" and (spec.causal or spec.window is not None or spec.alibi)
                      and (spec.varlen or spec.seqlen_q != spec.seqlen_k)),
        HAS_LEFT=left is not None,
        HAS_RIGHT=right is not None,
        SOFTCAP=spec.softcap is not None,
        ALIBI=spec.alibi,
        MASK_KIND={None: 0, "bool": 1, "additive": 2}[spec.mask],
        KEY_PADDING=spec.key_padding,
        SPARSE=sparse,
        # the tiles of kept blocks need the elementwise mask only where a causal/window edge or the end
        # of the keys can cut through them (the dK/dV pass: also for the atomic dQ, which reads past-the-end keys)
        SPARSE_MASKED=sparse and (
            spec.causal or spec.window is not None or (atomic_dq if by_keys else spec.seqlen_k % spec.block_size[1] != 0)),
        SPARSE_Q=spec.block_size[0] if sparse else 0,
        SPARSE_K=spec.block_size[1] if sparse else 0,
        DROPOUT=spec.dropout_p > 0,
    )


def sparse_lists(block_mask, spec, by_keys: bool):
    """Block-sparse iteration lists from a bool (B, H, QB, KB) block mask (a broadcast view): per row
    (query block; key block when ``by_keys``) the indices of its kept blocks in increasing order,
    padded after ``count`` (int32 (B, H, R, C) and (B, H, R)). Blocks that the causal/window rules
    leave wholly invisible are dropped here, so the kernels never visit them. Computed once per
    distinct (b, h) -- broadcast axes stay stride 0 -- with a stable sort of the dropped-flags."""
    torch = torch_module()
    distinct = tuple(slice(0, 1) if block_mask.stride(axis) == 0 else slice(None) for axis in range(2))
    kept = block_mask[distinct]
    reach = block_reach(spec, kept.shape[2], kept.shape[3], kept.device)
    if reach is not None:
        kept = kept & reach
    if by_keys:
        kept = kept.transpose(-1, -2)
    kept = kept.contiguous()
    count = kept.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~kept).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    b, h = block_mask.shape[:2]
    return order.expand(b, h, *order.shape[2:]), count.expand(b, h, count.shape[2])

def block_reach(spec, query_blocks: int, key_blocks: int, device):
    """(QB, KB) bool: the sparse blocks that hold at least one (query, key) pair the causal and window
    rules allow (a superset where both edges cut one block; the kernels mask inside); None if no rule."""
    if not spec.causal and spec.window is None:
        return None
    torch = torch_module()
    block_q, block_k = spec.block_size
    rows = torch.arange(query_blocks, device=device) * block_q
    first = rows + spec.query_offset()  # positions of each query block's first and last row
    last = torch.clamp(rows + block_q, max=spec.seqlen_q) - 1 + spec.query_offset()
    keys = torch.arange(key_blocks, device=device) * block_k
    key_last = torch.clamp(keys + block_k, max=spec.seqlen_k) - 1
    reach = torch.ones((query_blocks, key_blocks), dtype=torch.bool, device=device)
    left, right = spec.window if spec.window is not None else (None, None)
    if spec.causal:
        reach &= keys[None, :] <= last[:, None]
    if right is not None:
        reach &= keys[None, :] <= last[:, None] + right
    if left is not None:
        reach &= key_last[None, :] >= first[:, None] - left
    return reach

# Compiled kernels of earlier launches, by (kernel, spec, plan, GPU, the shapes, strides and 16-byte alignment of
# the caller's tensors): what Triton specializes a launch on, for calls whose other arguments follow from the
# spec and plan alone. Values: (spec, plan -- held, so that no other object takes their ids --, the launch).
_COMPILED: dict[tuple, tuple] = {}
_COMPILED_MAX = 4096
# The same compiled kernels by what Triton itself specializes a launch on (``signature``): a call with a new
# spec -- a decoding step, one key longer than the last -- mostly launches a kernel compiled before.
_BY_SIGNATURE: dict[tuple, tuple] = {}


def run(kernel, grid, args: tuple, meta: dict, reuse=None) -> None:
    """``kernel[grid](*args, **meta)``. With ``reuse = (spec, plan, tensors)`` -- a launch whose arguments
    other than ``tensors`` (the caller's, whose strides and alignment vary) follow from spec and plan (or
    whatever object stands for the rest of the launch, e.g. ``ForwardLaunch``), and whose other tensors are
    fresh contiguous allocations -- a repeat launch runs the kernel Triton compiled the first time directly:
    JITFunction.run binds and specializes every argument on each launch, tens of microseconds that are most of
    a small call's time. A launch with a new spec or plan looks its kernel up by Triton's own specialization of
    the arguments (``signature``), so it is compiled or bound through the JIT only when Triton would compile
    it. Launch hooks (profilers) take the full path."""
    if reuse is None:
        kernel[grid](*args, **meta)
        return
    spec, plan, tensors = reuse
    # Triton specializes tensors on dtype (fixed by the spec) and 16-byte alignment, integers (the strides
    # among them) on their value being 1 or a multiple of 16: keying on the strides themselves covers that,
    # and on the shapes the integers a launch reads off them (a paged cache's page count)
    # and the GPU: a kernel is loaded on each device it runs on
    device = tensors[0].get_device()
    key = (id(kernel), id(spec), id(plan), device, *[(t.shape, t.stride(), t.data_ptr() % 16 == 0) for t in tensors])
    entry = _COMPILED.get(key)
    if entry is None or _launch_hooks():
        if not _DIRECT or interpreting() or _launch_hooks():
            kernel[grid](*args, **meta)
            return
        launcher, launched = _find_compiled(kernel, grid, args, meta, device)
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.clear()
        entry = _COMPILED[key] = (spec, plan, launcher)
        if launched:
            return
    grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
    try:
        entry[2](grid_x, grid_y, grid_z, device, args)
    except (TypeError, AttributeError) as error:
        # the launcher's calling convention is Triton's internal (checked against 3.4-3.9); one that takes other
        # arguments refuses them before anything is launched: take Triton's own path from now on, and say so
        _direct_launch_failed(error)
        kernel[grid](*args, **meta)


def _find_compiled(kernel, grid, args: tuple, meta: dict, device: int):
    """(the direct launcher of ``kernel``'s compiled specialization for these arguments, whether finding it
    launched the kernel): from ``_BY_SIGNATURE``, else compiled (or bound) by Triton's JIT, which launches it."""
    by_signature = signature(args)
    by_signature = by_signature and (id(kernel), device, tuple(meta.items()), by_signature)
    found = _BY_SIGNATURE.get(by_signature) if by_signature else None
    if found is not None and found[0] is kernel:
        return found[1], False
    compiled = kernel[grid](*args, **meta)
    # the launcher takes every parameter, constexprs included, in the kernel's order
    found = (kernel, direct_launcher(compiled, tuple(meta[name] for name in kernel.arg_names[len(args):])))
    if by_signature:
        if len(_BY_SIGNATURE) >= _COMPILED_MAX:
            _BY_SIGNATURE.clear()
        _BY_SIGNATURE[by_signature] = found
    return found[1], True


def direct_launcher(compiled, constexprs: tuple):
    """``launch(grid_x, grid_y, grid_z, device, args)`` for a kernel Triton compiled: its launcher, called on the
    device's current stream as ``CompiledKernel`` calls it. Where the launcher's Python wrapper is one this module
    knows to do nothing but allocate scratch memory (``_PASS_THROUGH_WRAPPERS``) and the kernel needs none, its C
    entry is called directly: the wrapper costs about a microsecond per launch, a tenth of a small call's launch."""
    launcher, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    stream = _driver().active.get_current_stream  # bound once: each lookup through the driver costs
    if _pass_through(launcher):
        c_launch, cooperative, pdl = launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl

        def launch(grid_x, grid_y, grid_z, device, args):
            c_launch(grid_x, grid_y, grid_z, stream(device), function, cooperative, pdl, None, None, metadata, None,
                     None, None, *args, *constexprs)
    else:
        def launch(grid_x, grid_y, grid_z, device, args):
            launcher(grid_x, grid_y, grid_z, stream(device), function, metadata, None, None, None, *args, *constexprs)
    return launch


# The Python wrappers of Triton's CUDA launcher (``CudaLauncher.__call__``, by its source) that only allocate
# scratch memory and pass everything on to the C launch: Triton 3.6's (checked there; any other wrapper is called)
_PASS_THROUGH_WRAPPERS = frozenset({"""    def __call__(self, gridX, gridY, gridZ, stream, function, *args):

        def allocate_scratch(size, align, allocator):
            if size > 0:
                grid_size = gridX * gridY * gridZ
                alloc_size = grid_size * self.num_ctas * size
                alloc_fn = allocator.get()
                return alloc_fn(alloc_size, align, stream)
            return None

        global_scratch = allocate_scratch(self.global_scratch_size, self.global_scratch_align, _allocation._allocator)
        profile_scratch = allocate_scratch(self.profile_scratch_size, self.profile_scratch_align,
                                           _allocation._profile_allocator)
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                    global_scratch, profile_scratch, *args)
"""})


def _pass_through(launcher) -> bool:
    """True when ``launcher``'s wrapper is a known pass-through and its kernel needs no scratch memory."""
    if getattr(launcher, "global_scratch_size", 1) or getattr(launcher, "profile_scratch_size", 1):
        return False
    return _wrapper_source(type(launcher)) in _PASS_THROUGH_WRAPPERS


@functools.lru_cache(maxsize=None)
def _wrapper_source(launcher_type) -> str | None:
    import inspect

    try:
        return inspect.getsource(launcher_type.__call__)
    except (OSError, TypeError):
        return None


_I32 = range(-2**31, 2**31)
_I64 = range(-2**63, 2**63)


def signature(args) -> tuple | None:
    """What Triton (3.x) specializes a kernel on among positional arguments ``args``: a tensor's dtype and
    whether its address is 16-byte aligned; an integer's type (i32, i64, u64) and whether it is 1 or a
    multiple of 16; a float or bool by type alone; None as such; tuples element by element. None when an
    argument is of another kind (its launch then takes Triton's JIT, which knows it)."""
    key = []
    for x in args:
        kind = type(x)
        if kind is int:
            key.append("1" if x == 1 else (x in _I32, x in _I64, x % 16 == 0))
        elif kind is float:
            key.append("fp32")
        elif kind is bool:
            key.append("i1")
        elif x is None:
            key.append(None)
        elif isinstance(x, tuple):
            inner = signature(x)
            if inner is None:
                return None
            key.append(inner)
        elif hasattr(x, "data_ptr") and hasattr(x, "dtype"):
            key.append((x.dtype, x.data_ptr() % 16 == 0))
        else:
            return None
    return tuple(key)


_DIRECT = True  # False once a direct relaunch was refused: every launch then goes through JITFunction.run


def _direct_launch_failed(error: Exception) -> None:
    global _DIRECT
    _DIRECT = False
    import warnings

    warnings.warn(f"portattn: this Triton ({_triton().__version__}) refused a direct relaunch of a compiled kernel "
                  f"({error}); launching through triton's JIT from now on (correct, with more host time per call)",
                  RuntimeWarning, stacklevel=3)


def _launch_hooks() -> bool:
    """True when a launch hook (a profiler's) is set: such launches take Triton's own path, which calls it."""
    runtime = _triton().knobs.runtime
    return _hooked(runtime.launch_enter_hook) or _hooked(runtime.launch_exit_hook)


def _hooked(hook) -> bool:
    # Triton up to 3.4 keeps one hook or None; later ones a HookChain that is never None, empty when unhooked
    return hook is not None and bool(getattr(hook, "calls", True))


@functools.lru_cache(maxsize=None)
def _triton():
    import triton

    return triton


@functools.lru_cache(maxsize=None)
def _driver():
    from triton.runtime import driver

    return driver


def torch_module():
    import torch

    return torch

def partial_strides(part_out, varlen: bool):
    """(batch, head, row, col) strides of a (splits, B, N, H, D) float32 partial output (the layout
    ``decode.merge_splits`` reads), as the forward kernel writes it; varlen: batch stride 0, as ``strides``."""
    _, batch, row, head, col = part_out.stride()
    return (0 if varlen else batch, head, row, col)


INTERPRETER_TURN = threading.RLock()  # a lock is a context manager: `with on_device(x):` takes it


def on_device(x):
    """Launch on the tensor's GPU (Triton launches on the current device); no switch when it is current."""
    import torch

    if not x.is_cuda:
        # Triton's interpreter swaps triton.language's functions while it runs a kernel: two threads
        # interpreting at once break each other ("Did you forget to add @triton.jit?"), so they take turns
        return INTERPRETER_TURN
    if x.get_device() == torch.cuda.current_device():
        return _STAY
    return torch.cuda.device(x.device)


_STAY = contextlib.nullcontext()  # reusable: one for every launch on the current device
