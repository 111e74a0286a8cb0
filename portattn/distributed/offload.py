"""KV streamed from host memory: attention over K/V larger than a GPU memory budget (FastAttention's
CPU-GPU cooperation), forward only.

q lives on the compute device; K/V (B, H_kv, Nk, D) live in host memory (pinned). The keys are cut
into chunks of ``chunk_keys``; each chunk is copied to one of two reused device buffers on a copy
stream while the compute stream attends the previous chunk (double buffering), and every chunk's
``(O, LSE)`` is merged into fp32 (fp64 for fp64) accumulators by LSE (``merge.py``). Two CUDA events
per buffer order the streams: ``ready[s]`` (the copy into buffer s is done; the compute stream waits
for it) and ``free[s]`` (the compute stream has finished reading buffer s; the copy of the chunk after
next waits for it before overwriting). The device holds at most two chunks of K and V, so the chunk
can be chosen from a memory budget.

Causal masking puts query ``i`` at key position ``Nk - Nq + i`` (``align="bottom-right"``, a KV cache:
decode with Nq = 1, or prefill of Nq new tokens whose keys are the last Nq of the cache) or at ``i``
(``"top-left"``). For a chunk of keys ``[a, b)`` the queries fall in three groups: rows whose position
is before ``a`` see nothing of it (skipped), rows whose position is at least ``b - 1`` see all of it (one
non-causal call), and the rows in between see a causal prefix of it -- exactly what a bottom-right call
of those rows against the chunk gives, since the last of those rows sits at the chunk's last key.
Chunks after the last query's position are never copied.

On a CPU (q, k, v all host tensors) or with K/V already on q's device, chunks are views: the same
chunking and merging run without copies (that is how the tests check the chunk logic without a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import ALIGNS, accumulation_dtype, check_features, check_shapes, prepared
from .merge import merge_into

MODE = "attention_host_kv"
ALLOWED = ("softcap", "key_padding_mask", "align")
REFUSED = {
    "window": "not implemented for streamed K/V (each chunk would need its own shifted band); run "
              "portattn.attention on the window's keys, which fit a budget more easily",
    "alibi_slopes": "ALiBi's bias needs each key's global position, which the per-chunk calls do not see",
}
_COPY_STREAMS: dict = {}


@dataclass(frozen=True)
class Piece:
    """One call of a chunk: query rows [q0, q1) against chunk-local keys [0, keys), causal bottom-right or full."""

    q0: int
    q1: int
    causal: bool


def chunk_pieces(a: int, b: int, nq: int, offset: int, causal: bool) -> list[Piece]:
    """The calls needed for keys [a, b) when query i sits at key position ``offset + i``; causal chunks end at
    or before the last query's position (``b <= offset + nq``), later keys being seen by no query."""
    assert not causal or b <= offset + nq, (a, b, nq, offset)
    if not causal:
        return [Piece(0, nq, False)]
    pieces = []
    first = min(max(0, a - offset), nq)  # rows before it sit before key a: they see nothing here
    last = min(max(0, b - offset), nq)   # rows from it on sit at or after key b - 1: they see the whole chunk
    if last > first:  # row last - 1 sits at key b - 1: bottom-right of rows [first, last) against the chunk
        pieces.append(Piece(first, last, True))
    if nq > last:
        pieces.append(Piece(last, nq, False))
    return pieces


def choose_chunk(nk: int, bytes_per_key: int, chunk_keys, memory_budget) -> int:
    """Keys per chunk: ``chunk_keys``, else the most whose two K/V buffers fit ``memory_budget`` bytes."""
    if chunk_keys is not None:
        if not isinstance(chunk_keys, int) or isinstance(chunk_keys, bool) or chunk_keys < 1:
            raise ValueError(f"chunk_keys must be a positive int, got {chunk_keys!r}")
    if memory_budget is not None:
        if not isinstance(memory_budget, int) or isinstance(memory_budget, bool) or memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
        fits = memory_budget // (2 * bytes_per_key)
        if fits < 1:
            raise ValueError(f"memory_budget={memory_budget} bytes cannot hold two buffers of one key: one key of K "
                             f"and V takes {bytes_per_key} bytes (B x H_kv x (D_k + D_v) x element size), so the "
                             f"budget must be at least {2 * bytes_per_key}")
        if chunk_keys is not None and min(chunk_keys, nk) > fits:
            raise ValueError(f"chunk_keys={chunk_keys} needs {2 * bytes_per_key * chunk_keys} bytes for two K/V "
                             f"buffers, more than memory_budget={memory_budget}; at most {fits} keys fit")
        if chunk_keys is None:
            chunk_keys = fits
    if chunk_keys is None:
        chunk_keys = nk
    return max(1, min(chunk_keys, nk))


def attention_host_kv(q, k, v, *, causal=False, chunk_keys=None, memory_budget=None, backend="auto", scale=None,
                      return_lse=False, **features):
    """``portattn.attention(q, k, v, ...)`` with K/V streamed from host memory in chunks, merged by LSE.

    ``q`` (B, H, Nq, D) is on the compute device (a CUDA tensor; a CPU tensor runs the same chunks on the
    CPU); ``k``, ``v`` (B, H_kv, Nk, D) are host tensors, pinned (``k.pin_memory()``) for asynchronous
    copies: unpinned ones are pinned for this call only (a host copy of all of K/V each call, so pin once
    for repeated calls). Views of a pinned cache such as ``cache[:, :, :length]`` are pinned; their rows
    must be contiguous (last two strides D, 1). The host waits for the last copy before returning, so the
    host K/V may be written again as soon as the call returns.

    ``chunk_keys`` keys are on the device at a time, twice (one chunk attended, the next one arriving);
    with ``memory_budget`` (bytes) instead the chunk is the longest whose two K and V buffers fit:
    ``memory_budget // (2 * B * H_kv * (D_k + D_v) * element size)`` keys; with neither, a quarter of the
    device's free memory is the budget (on a CPU: all keys in one chunk).

    ``causal=True`` aligns queries bottom-right to the keys by default (query i at key Nk - Nq + i: decode
    with Nq = 1, prefill against a cache); ``align="top-left"`` puts query i at key i. Also ``softcap`` and
    ``key_padding_mask`` (B, Nk) bool; window, ALiBi, masks and dropout are refused. H a multiple of H_kv is
    GQA. Forward only: inputs that require grad are refused (call under ``torch.no_grad()`` or detach).
    Returns ``out`` like q (and with ``return_lse`` the (B, H, Nq) LSE, float32; float64 for float64).
    """
    features = check_features(features, ALLOWED, REFUSED, MODE)
    align = features.pop("align", "bottom-right")
    if align not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
    _check_inputs(q, k, v)
    nq, nk = q.shape[-2], k.shape[-2]
    padding = features.pop("key_padding_mask", None)
    if padding is not None:
        if not isinstance(padding, torch.Tensor) or padding.dtype != torch.bool or tuple(padding.shape) != (
                k.shape[0], nk):
            raise ValueError(f"key_padding_mask must be a bool (B, Nk) = {(k.shape[0], nk)} tensor, True for real "
                             f"keys; got {getattr(padding, 'shape', type(padding).__name__)}")
        padding = padding.to(q.device)
    offset = nk - nq if align == "bottom-right" else 0
    visible = min(nk, offset + nq) if causal else nk  # keys after the last query's position are never copied
    bytes_per_key = k.shape[0] * k.shape[1] * (k.shape[-1] + v.shape[-1]) * k.element_size()
    if memory_budget is None and chunk_keys is None and q.device.type == "cuda":
        memory_budget = int(torch.cuda.mem_get_info(q.device)[0] // 4)
    chunk = choose_chunk(max(visible, 1), bytes_per_key, chunk_keys, memory_budget)
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    bounds = [(a, min(a + chunk, visible)) for a in range(0, visible, chunk)]
    attend = _Attend(q, out, lse, offset, bool(causal), scale, backend, features.get("softcap"), padding)
    with torch.no_grad():
        if not bounds:
            pass  # no key is visible to any query: zeros and an LSE of -inf
        elif k.device == q.device:
            for a, b in bounds:
                attend(a, b, k[..., a:b, :], v[..., a:b, :])
        else:
            _stream(k, v, bounds, chunk, attend, q.device)
    out = out.to(q.dtype)
    if not return_lse:
        return out
    return out, lse if acc == torch.float64 else lse.to(torch.float32)


def _check_inputs(q, k, v) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{MODE} takes torch tensors; {name} is {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N, D), got shape {tuple(x.shape)}")
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{MODE} is forward only and {name} requires grad: call it under torch.no_grad() or "
                             f"pass {name}.detach()")
    check_shapes(q, k, v)
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        raise ValueError(f"q, k and v must have one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != v.device:
        raise ValueError(f"k and v must be on one device; got {k.device} and {v.device}")
    if k.device != q.device and k.device.type != "cpu":
        raise ValueError(f"k and v must be in host memory (or on q's device, {q.device}); they are on {k.device}: "
                         f"move them with .cpu().pin_memory(), or q to {k.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q must be a CUDA or CPU tensor, got {q.device}")


class _Attend:
    """Attends q to one chunk of keys and merges the result into the running (out, lse)."""

    def __init__(self, q, out, lse, offset, causal, scale, backend, softcap, padding):
        self.q, self.out, self.lse, self.offset, self.causal = q, out, lse, offset, causal
        self.scale, self.backend, self.padding = scale, backend, padding
        self.features = {} if softcap is None else {"softcap": softcap}

    def __call__(self, a, b, k_c, v_c):
        nq = self.q.shape[-2]
        for piece in chunk_pieces(a, b, nq, self.offset, self.causal):
            q_p = self.q if (piece.q0, piece.q1) == (0, nq) else self.q[..., piece.q0:piece.q1, :].contiguous()
            features = dict(self.features)
            if piece.causal:
                features["align"] = "bottom-right"
            if self.padding is not None:
                features["key_padding_mask"] = self.padding[:, a:b].contiguous()
            call, extras = prepared(q_p, k_c, v_c, needs_grad=False, causal=piece.causal, window=None,
                                    scale=self.scale, backend=self.backend, features=features)
            o, l = call.forward(q_p, k_c, v_c, extras)
            merge_into(self.out[..., piece.q0:piece.q1, :], self.lse[..., piece.q0:piece.q1], o, l)


def _copy_stream(device):
    stream = _COPY_STREAMS.get(device)
    if stream is None:
        stream = _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return stream


def _host_source(x):
    """``x`` pinned with contiguous (N, D) rows, copied (once, for this call) when it is not."""
    if x.stride(-1) != 1 or (x.shape[-2] > 1 and x.stride(-2) != x.shape[-1]):
        x = x.contiguous()
    if not x.is_pinned():
        x = x.pin_memory()
    return x


def _copy_rows(dst, src) -> None:
    """Asynchronous copy of host rows into a contiguous device buffer: one copy when the host slice is contiguous,
    else one per (batch, head) -- a strided host source would go through a pageable temporary, synchronously."""
    if src.is_contiguous():
        dst.copy_(src, non_blocking=True)
        return
    for bi in range(src.shape[0]):
        for hi in range(src.shape[1]):
            dst[bi, hi].copy_(src[bi, hi], non_blocking=True)


def _stream(k, v, bounds, chunk, attend, device):
    """Double-buffered upload of each chunk on a copy stream, attended on the current stream."""
    k, v = _host_source(k), _host_source(v)
    compute, copy = torch.cuda.current_stream(device), _copy_stream(device)
    slabs = k.shape[0] * k.shape[1]
    buffers = [tuple(torch.empty(slabs * chunk * x.shape[-1], dtype=x.dtype, device=device) for x in (k, v))
               for _ in range(min(2, len(bounds)))]
    ready = [torch.cuda.Event() for _ in buffers]
    free = [torch.cuda.Event() for _ in buffers]
    copy.wait_stream(compute)  # the buffers were allocated on the compute stream

    def upload(i):
        a, b = bounds[i]
        slot = i % 2
        views = []
        with torch.cuda.stream(copy):
            if i >= 2:
                copy.wait_event(free[slot])  # chunk i - 2 has been attended: its buffer may be overwritten
            for src, flat in zip((k, v), buffers[slot]):
                dst = flat[:slabs * (b - a) * src.shape[-1]].view(*src.shape[:2], b - a, src.shape[-1])
                _copy_rows(dst, src[..., a:b, :])
                views.append(dst)
            ready[slot].record(copy)
        return views

    pending = upload(0)
    for i, (a, b) in enumerate(bounds):
        k_c, v_c = pending
        if i + 1 < len(bounds):
            pending = upload(i + 1)  # enqueued before chunk i's attention: the copy overlaps it
        compute.wait_event(ready[i % 2])
        attend(a, b, k_c, v_c)
        free[i % 2].record(compute)
    for flat in (x for pair in buffers for x in pair):
        if flat.is_cuda:
            flat.record_stream(copy)  # the copy stream wrote them: the allocator waits for it before reusing them
    ready[(len(bounds) - 1) % 2].synchronize()  # every copy has read the host K/V: the caller may write them
