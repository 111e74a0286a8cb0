"""``attention_with_kvcache``: decoding against a KV cache, contiguous or paged, in flash-attn's conventions.

``flash_attn_with_kvcache`` is what inference engines call once per generated token; this module
gives it the same arguments and meaning, on numpy arrays and torch tensors:

* ``q`` is (B, Nq, H, D) -- the new queries of each sequence, usually Nq = 1.
* the cache is contiguous, ``k_cache``/``v_cache`` (B, Nmax, H_kv, D), or paged,
  (num_blocks, page_size, H_kv, D) with ``block_table`` (B, max_blocks) int32: sequence b's key
  position p lives in page ``block_table[b, p // page_size]`` at row ``p % page_size``. Pages may be
  in any order and shared by nothing else.
* ``cache_seqlens`` (B,) int32 (or one int for every sequence): the keys already in the cache; None
  means the whole cache (Nmax, or max_blocks * page_size).
* ``k``/``v`` (B, Nnew, H_kv, D), when given, are written into the cache IN PLACE at positions
  ``cache_seqlens[b] .. cache_seqlens[b] + Nnew - 1`` (across page boundaries when paged) before
  attending; the caller advances ``cache_seqlens`` itself, as with flash-attn.
* the attention then sees, for sequence b, its first ``L_b = cache_seqlens[b] + Nnew`` keys.
  ``causal`` is bottom-right aligned to them: query i sits at key position ``L_b - Nq + i`` (the
  last query sees every key), and so do ``window`` = (left, right) and ALiBi.

Two ways to run it, chosen per call (``explain_with_kvcache`` says which, and why):

* in place: the backend ``attention`` would pick (``backend=``, or ``"auto"``) has a decode kernel
  (``Backend.decode_kvcache``; today triton and numba) and the call fits it (at most
  ``tiling.decode.MAX_QUERIES`` queries per sequence, no grad). The kernel reads each sequence's keys
  where they lie -- through the block table when paged -- with the G query heads of a KV group packed
  into one tile so each K/V row is read once for the group, and the key loop split over the device as
  the decode planner says (``portattn/tiling/decode.py``), merged by log-sum-exp. Nothing is copied.
* gathered (every other backend: opencl, cupy, reference; or a call the kernel does not take): a
  contiguous cache whose sequences all hold the same number of keys is attended in place by
  ``attention`` (a view of its first L rows). Otherwise the present keys of every sequence are
  gathered in one indexed copy into a (B, H_kv, Lmax, D) buffer, right-aligned: sequence b's keys fill
  its last L_b rows, so bottom-right alignment on Lmax puts each query at its own sequence's position
  (causal, window and ALiBi distances are those of the sequence), and a key-padding mask hides the
  rows in front. One batched call on any backend with key padding.

Reading the lengths takes one device-to-host copy of ``cache_seqlens`` per call -- except on the
in-place route with ``cache_seqlens`` on a GPU (or None, with q on a GPU: every sequence holds the whole
cache, and no lengths array is made) and no ``k``/``v`` to append: then neither the lengths
nor the block table are read back (the call never waits for the device; the decode plan comes from the
shapes, each kernel program cuts its own sequence's keys), and instead of the host's errors the kernels
clamp a length to the cache's capacity and a page id to its pages (a wrong table reads wrong pages,
never outside the cache). ``explain_with_kvcache`` reads them, for the plan's exact bytes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from . import arrays, dispatch, inputs
from .api import attention
from .backends import Backend
from .memo import by_identity
from .spec import AttentionSpec
from .tiling.decode import DecodePlan


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, block_table=None, *, k=None, v=None, causal=False,
                           window=None, softcap=None, alibi_slopes=None, scale=None, return_lse=False, backend="auto"):
    """Attention of ``q`` (B, Nq, H, D) over each sequence's cached keys after appending ``k``/``v``
    (module docstring). Returns (B, Nq, H, D) of q's type, dtype and device, and with ``return_lse``
    the float32 (B, H, Nq) log-sum-exp too."""
    route = _route(q, k_cache, v_cache, cache_seqlens, block_table, k, v, backend,
                   dict(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes))
    cache = route.cache
    if route.n_new:
        cache.write(k, v, route.old, route.n_new)
    if route.in_place:
        out, lse = _decode(route, q, cache_seqlens, return_lse)
        return (out, lse) if return_lse else out
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    lengths = route.lengths
    if not cache.paged and len(set(lengths)) == 1:
        # every sequence has the same keys present: the cache rows are one (B, L, H_kv, D) view, no gather
        present = lengths[0] if lengths else 0
        return attention(q, k_cache[:, :present], v_cache[:, :present], layout="bnhd", align="bottom-right",
                         backend=backend, return_lse=return_lse, **options)
    keys, values, present = cache.gather_left_padded(lengths)
    # (B, H_kv, Lmax, D) with sequence b's keys in its last L_b rows: bottom-right alignment on Lmax then
    # puts every query at its own sequence's position, and the key padding hides the rows before them
    ops = cache.ops
    result = attention(ops.swap12(q), keys, values, align="bottom-right", key_padding_mask=present,
                       backend=backend, return_lse=return_lse, **options)
    out, lse = result if return_lse else (result, None)
    out = ops.swap12(out)
    return (out, lse) if return_lse else out


def explain_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, block_table=None, *, k=None, v=None, causal=False,
                         window=None, softcap=None, alibi_slopes=None, scale=None, backend="auto") -> KVCacheExplanation:
    """What ``attention_with_kvcache`` would do with these arguments (nothing is written): its backend,
    whether that backend reads the cache in place (with its decode plan: bytes moved, predicted time)
    or the cache is gathered (and why), and why not the other backends."""
    route = _route(q, k_cache, v_cache, cache_seqlens, block_table, k, v, backend,
                   dict(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes),
                   read_lengths=True)
    return KVCacheExplanation(route.backend.name, route.plan, tuple(route.refusals),
                              dispatch.explain(route.spec, dispatch.check_name(backend)))


@dataclass(frozen=True)
class KVCacheExplanation:
    backend: str
    plan: DecodePlan | None  # None: the cache is gathered for ``attention``
    gather_reasons: tuple[str, ...]  # why the chosen backend does not read the cache in place
    attention: dispatch.Explanation  # the dispatcher's view of the call's attention (every backend's reasons)

    def __str__(self) -> str:
        if self.plan is not None:
            head = [f"kvcache: {self.backend} reads the cache in place", *("  " + x for x in self.plan.describe().splitlines())]
        else:
            head = [f"kvcache: {self.backend} runs attention on a gathered copy of the cache, because:",
                    *(f"  - {reason}" for reason in self.gather_reasons)]
        return "\n".join(head + [str(self.attention)])


@dataclass(frozen=True)
class _Route:
    """A checked call and where it goes: the cache, the lengths before and after the append (None when they
    stay on the device), the spec of its attention (``seqlen_k`` = the cache's capacity), the backend, and
    its decode plan or why there is none."""

    cache: _Cache
    old: list
    lengths: list
    n_new: int
    spec: AttentionSpec
    extras: object
    backend: Backend
    plan: DecodePlan | None
    refusals: list

    @property
    def in_place(self) -> bool:
        return self.plan is not None


def _route(q, k_cache, v_cache, cache_seqlens, block_table, k, v, backend, options, read_lengths=False) -> _Route:
    """Every check, the backend and, when it has a decode kernel that takes the call, its plan. The lengths
    are read on the host (one device-to-host copy) unless the kernel runs, ``cache_seqlens`` lies on a GPU,
    no keys are appended and ``read_lengths`` is off: then the call never waits for the device, and the
    kernels clamp lengths and page ids to the cache (``tiling/decode.py``, D4) instead of raising."""
    key = _checks_key(q, k_cache, v_cache, cache_seqlens, block_table, k, v, backend, options)
    checked = _CHECKED.get(key) if key is not None else None
    if checked is None:
        checked = _checked(q, k_cache, v_cache, cache_seqlens, block_table, k, v, backend, options)
        if key is not None:
            if len(_CHECKED) >= _CHECKED_MAX:
                _CHECKED.clear()
            _CHECKED[key] = checked
    ops, spec, extras, chosen, refusals, n_new = checked
    cache = _Cache(k_cache, v_cache, block_table, ops, tuple(q.shape), spec.device, spec.dtype)
    batch = spec.batch
    page_size = cache.page_size if cache.paged else 0
    if not refusals and not n_new and not read_lengths and (_on_gpu(cache_seqlens) or cache_seqlens is None and _on_gpu(q)):
        old = lengths = None
        total = batch * cache.capacity
    else:
        cache.check_pages()
        old = _lengths(cache_seqlens, batch, cache.capacity)
        lengths = [length + n_new for length in old]
        if max(lengths, default=0) > cache.capacity:
            raise ValueError(f"cache_seqlens + new keys reach {max(lengths)} but the cache holds {cache.capacity} keys "
                             "per sequence; give a larger cache (or more pages in block_table)")
        total = sum(lengths)
    plan = None if refusals else _decode_plan(chosen, spec, page_size, total)
    return _Route(cache, old, lengths, n_new, spec, extras, chosen, plan, refusals)


def _checked(q, k_cache, v_cache, cache_seqlens, block_table, k, v, backend, options) -> tuple:
    """What a call's checks give that depends on its arrays' metadata and options only, not on their
    values: (ops, spec, extras, backend, why it cannot read the cache in place, new keys per sequence)."""
    ops = _Ops.of(q)
    cache = _Cache.check(q, k_cache, v_cache, block_table, ops)
    _check_seqlens(cache_seqlens, cache.q_shape[0])
    n_new = _check_new(k, v, cache, ops)
    # the attention's spec and extras, every option checked as ``attention`` checks it, from (B, capacity,
    # H_kv, D) views that copy nothing (a broadcast of one row when paged); seqlen_k = the capacity
    keys, values = (cache.present_view(x, cache.capacity) for x in (k_cache, v_cache))
    spec, extras = inputs.read_call(q, keys, values, layout="bnhd", align="bottom-right", **options)
    chosen = dispatch.select(spec, backend)
    refusals = chosen.kvcache_reasons(spec, cache.page_size if cache.paged else 0)
    return ops, spec, extras, chosen, refusals, n_new


# The value-independent checks of earlier calls, by their arguments' metadata: a model decodes token after
# token with tensors of the same shapes, and each step then skips validation, backend choice and refusals
_CHECKED: dict[tuple, tuple] = {}
_CHECKED_MAX = 1024
_SCALARS = (bool, int, float, str, type(None))


def _checks_key(q, k_cache, v_cache, cache_seqlens, block_table, k, v, backend, options) -> tuple | None:
    """What ``_checked`` depends on, for torch tensors without ALiBi slopes (whose values the extras hold);
    None for anything else (numpy arrays and odd arguments take the full path, which raises their errors).
    Flat tuples and plain loops, not generators: this runs on every decoding step."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)  # None while another thread imports torch
    if (tensor is None or options["alibi_slopes"] is not None or type(backend) is not str
            or type(q) is not tensor or type(k_cache) is not tensor or type(v_cache) is not tensor):
        return None
    key = [backend, q.shape, q.dtype, q.device, q.requires_grad, k_cache.shape, k_cache.dtype, k_cache.device,
           k_cache.requires_grad, v_cache.shape, v_cache.dtype, v_cache.device, v_cache.requires_grad]
    for x in (cache_seqlens, block_table, k, v):
        if x is None:
            key.append(None)
        elif type(x) is tensor:
            key.append((x.shape, x.dtype, x.device, x.requires_grad))
        else:
            return None
    for name, value in options.items():
        if name == "window" and type(value) is tuple:
            if not all(type(side) in _SCALARS for side in value):
                return None
        elif type(value) not in _SCALARS:
            return None
        key.append((value, type(value)))  # the type too: causal=1 hashes like True but must be refused
    return tuple(key)


@by_identity
def _decode_plan(backend, spec, page_size: int, total: int) -> DecodePlan:
    return backend.decode_plan(spec, page_size, total)


def _on_gpu(x) -> bool:
    return arrays.is_torch(x) and x.device.type != "cpu"


def _decode(route: _Route, q, cache_seqlens, need_lse: bool = True):
    """The chosen backend's decode kernel on the cache as it lies, results back in the caller's kind;
    ``(out, None)`` when the LSE is not needed, which spares a backend writing it."""
    cache, spec, backend = route.cache, route.spec, route.backend
    kind, device = backend.compute_kind, spec.device
    native = kind == "torch" and spec.array_kind == "torch"
    if cache_seqlens is None and route.lengths is None and native:
        lengths = None  # every sequence holds the whole cache: the kernel takes its capacity, no lengths array
    else:
        known = route.lengths if route.lengths is not None else [cache.capacity] * spec.batch
        lengths = cache.ops.lengths(known, cache_seqlens, route.n_new, cache.k_cache)
    if native:
        # torch tensors to a torch backend (every decoding step of a model on a GPU): nothing to convert, and
        # the kernel's results are the caller's (out in q's dtype, lse float32, on q's device)
        table = cache.block_table if cache.paged else None
        if not need_lse:
            return backend.decode_kvcache_output(q, cache.k_cache, cache.v_cache, table, lengths, spec, route.plan,
                                                 route.extras), None
        return backend.decode_kvcache(q, cache.k_cache, cache.v_cache, table, lengths, spec, route.plan, route.extras)

    def convert(x):  # host arrays stay views (bfloat16 as its bits: the numpy kernels widen them)
        return arrays.to_numpy_bits(x) if kind == "numpy" else arrays.convert(x, kind, device)

    table = None if not cache.paged else convert(cache.block_table)
    extras = route.extras.map_arrays(convert)
    out, lse = backend.decode_kvcache(convert(q), convert(cache.k_cache), convert(cache.v_cache), table,
                                      convert(lengths), spec, route.plan, extras)
    out = arrays.restore(out, spec.array_kind, spec.dtype, device)
    return out, arrays.restore(lse, spec.array_kind, "float32", device) if need_lse else None


def _check_seqlens(cache_seqlens, batch: int) -> None:
    """cache_seqlens' kind, dtype and shape (its values are read by ``_lengths``, when they are)."""
    if cache_seqlens is None or isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        return
    info = arrays.describe(cache_seqlens, "cache_seqlens")
    if info.dtype != "int32" or info.shape != (batch,):
        raise ValueError(f"cache_seqlens must be an int or an int32 array of shape (B,) = ({batch},), the keys "
                         f"already cached per sequence; got dtype {info.dtype}, shape {info.shape}")


def _lengths(cache_seqlens, batch: int, capacity: int) -> list[int]:
    """cache_seqlens as host ints, checked."""
    if cache_seqlens is None:
        return [capacity] * batch
    if isinstance(cache_seqlens, int):
        values = [cache_seqlens] * batch
    else:
        values = [int(x) for x in cache_seqlens.tolist()]  # a CUDA tensor is copied to the host here
    if any(x < 0 or x > capacity for x in values):
        raise ValueError(f"cache_seqlens must lie in [0, {capacity}] (the cache's keys per sequence); got {values}")
    return values


def _check_new(k, v, cache: "_Cache", ops: "_Ops") -> int:
    """The number of new keys per sequence (0 without k/v), after checking their shapes."""
    if (k is None) != (v is None):
        raise ValueError("give k and v together (the new keys and values to append), or neither")
    if k is None:
        return 0
    batch, _, _, head_dim = cache.q_shape
    for name, x, width in (("k", k, head_dim), ("v", v, head_dim)):
        info = arrays.describe(x, name)
        if info.kind != ops.kind or info.device != cache.device or info.dtype != cache.dtype:
            raise ValueError(f"{name} is a {info.kind} {info.dtype} array on {info.device}; pass it like k_cache "
                             f"({ops.kind} {cache.dtype} on {cache.device})")
        if len(info.shape) != 4 or info.shape[0] != batch or info.shape[2:] != (cache.kv_heads, width):
            raise ValueError(f"{name} must be (B, Nnew, H_kv, D) = ({batch}, Nnew, {cache.kv_heads}, {width}); got {info.shape}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    return int(k.shape[1])


class _Cache:
    """The KV cache of a call: where sequence b's key p lives, writing new keys in place, gathering."""

    def __init__(self, k_cache, v_cache, block_table, ops, q_shape, device, dtype):
        self.k_cache, self.v_cache, self.ops = k_cache, v_cache, ops
        self.q_shape, self.device, self.dtype = q_shape, device, dtype
        self.kv_heads = int(k_cache.shape[2])
        self.paged = block_table is not None
        if self.paged:
            self.page_size = int(k_cache.shape[1])
            self.block_table = block_table
            self.capacity = int(block_table.shape[1]) * self.page_size
        else:
            self.capacity = int(k_cache.shape[1])

    @classmethod
    def check(cls, q, k_cache, v_cache, block_table, ops) -> "_Cache":
        infos = {name: arrays.describe(x, name) for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache))}
        for name, info in infos.items():
            if len(info.shape) != 4:
                shape = "(B, Nq, H, D)" if name == "q" else "(B, Nmax, H_kv, D) or paged (num_blocks, page_size, H_kv, D)"
                raise ValueError(f"{name} must be 4-D {shape}, got shape {info.shape}")
            if info.kind != ops.kind or info.device != infos["q"].device or info.dtype != infos["q"].dtype:
                raise ValueError(f"q, k_cache and v_cache must be the same kind of array with one dtype on one device; "
                                 f"{name} is a {info.kind} {info.dtype} array on {info.device}, q a {infos['q'].kind} "
                                 f"{infos['q'].dtype} array on {infos['q'].device}")
        batch, _, heads, head_dim = infos["q"].shape
        k_shape, v_shape = infos["k_cache"].shape, infos["v_cache"].shape
        if k_shape != v_shape:
            raise ValueError(f"k_cache and v_cache must have the same shape; got {k_shape} and {v_shape}")
        if k_shape[3] != head_dim:
            raise ValueError(f"k_cache has head dim {k_shape[3]} but q has {head_dim}; they must match")
        if k_shape[2] < 1 or heads % k_shape[2]:
            raise ValueError(f"q has {heads} heads and the cache {k_shape[2]}: the query heads must be a multiple of the "
                             "cache's K/V heads (GQA/MQA)")
        if block_table is not None:
            table = arrays.describe(block_table, "block_table")
            if table.dtype != "int32" or len(table.shape) != 2 or table.shape[0] != batch:
                raise ValueError(f"block_table must be int32 (B, max_blocks) = ({batch}, max_blocks); got dtype "
                                 f"{table.dtype}, shape {table.shape}")
            if not 1 <= k_shape[1] <= 256:
                raise ValueError(f"page size (k_cache.shape[1]) must be 1 to 256, got {k_shape[1]}")
        elif k_shape[0] != batch:
            raise ValueError(f"a contiguous cache must have one row per sequence: k_cache is {k_shape}, q has batch {batch}"
                             " (pass block_table for a paged cache)")
        return cls(k_cache, v_cache, block_table, ops, infos["q"].shape, infos["q"].device, infos["q"].dtype)

    def check_pages(self) -> None:
        """Every block_table entry names a page of the cache (checked where the table lies: the host
        reads one bool, not the table)."""
        if not self.paged:
            return
        pages = int(self.k_cache.shape[0])
        outside = (self.block_table < 0) | (self.block_table >= pages)
        if bool(outside.any()):
            bad = sorted({int(p) for p in self.block_table[outside].tolist()})
            raise ValueError(f"block_table names pages {bad[:8]} outside the cache's {pages} pages")

    def present_view(self, x, longest: int):
        """A (B, longest, H_kv, D) view of cache ``x`` that copies nothing: its first rows when contiguous, a
        broadcast of one row when paged (only its shape, dtype and device are read: the attention's spec)."""
        if not self.paged:
            return x[:, :longest]
        shape = (self.q_shape[0], longest, *x.shape[2:])
        return x[:1, :1].expand(*shape) if self.ops.kind == "torch" else self.ops.numpy.broadcast_to(x[:1, :1], shape)

    def _where(self, sequence, position):
        """(first index, second index) into the cache of sequence ``sequence``'s key ``position`` (broadcast
        index arrays)."""
        if not self.paged:
            return sequence, position
        table = self.ops.as_index(self.block_table, self.k_cache)
        return table[sequence, position // self.page_size], position % self.page_size

    def write(self, k, v, old: list[int], n_new: int) -> None:
        """k, v (B, Nnew, H_kv, D) into every sequence's positions old[b] .. old[b] + Nnew - 1, in one indexed
        assignment each (pages are a sequence's own, so no two sequences write one row)."""
        ops = self.ops
        position = ops.index(old, self.k_cache)[:, None] + ops.index(list(range(n_new)), self.k_cache)[None, :]
        where = self._where(ops.index(list(range(len(old))), self.k_cache)[:, None], position)
        self.k_cache[where] = k
        self.v_cache[where] = v

    def gather_left_padded(self, lengths: list[int]):
        """Each sequence's present keys and values in one indexed copy, right-aligned: (B, H_kv, Lmax, D)
        views whose row Lmax - L_b + p holds sequence b's key p, and the (B, Lmax) bool mask of the rows
        that hold a key (the rows in front are zeros, never stale cache memory)."""
        ops = self.ops
        longest = max(lengths, default=0)
        start = ops.index([longest - n for n in lengths], self.k_cache)[:, None]  # (B, 1)
        position = ops.index(list(range(longest)), self.k_cache)[None, :] - start  # (B, Lmax); < 0: in front
        present = position >= 0
        position = position.clip(min=0)
        where = self._where(ops.index(list(range(len(lengths))), self.k_cache)[:, None], position)
        keys, values = self.k_cache[where], self.v_cache[where]  # (B, Lmax, H_kv, D) copies
        keys[~present], values[~present] = 0, 0
        return ops.swap12(keys), ops.swap12(values), present


class _Ops:
    """The few array operations this module needs, for numpy arrays and torch tensors alike."""

    def __init__(self, kind: str):
        self.kind = kind

    @classmethod
    def of(cls, q) -> "_Ops":
        kind = arrays.describe(q, "q").kind
        if kind not in ("numpy", "torch"):
            raise TypeError(f"attention_with_kvcache takes numpy arrays or torch tensors; q is a {kind} array")
        return cls(kind)


    def index(self, values: list[int], like):
        if self.kind == "torch":
            import torch

            return torch.tensor(values, dtype=torch.long, device=like.device)
        import numpy as np

        return np.asarray(values, dtype=np.int64)

    def as_index(self, x, like):
        """An int32 index array (block_table) as int64 on ``like``'s device."""
        if self.kind == "torch":
            import torch

            return x.to(device=like.device, dtype=torch.long)
        import numpy as np

        return np.asarray(x, dtype=np.int64)

    @property
    def numpy(self):
        import numpy

        return numpy

    def lengths(self, values: list[int], cache_seqlens, n_new: int, like):
        """Each sequence's keys after the append, int32 (B,) on ``like``'s device: from ``cache_seqlens``
        where it already lies there (no host-to-device copy), else from the host ints."""
        if self.kind == "torch":
            import torch

            if isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.device == like.device:
                return cache_seqlens + n_new if n_new else cache_seqlens
            return torch.tensor(values, dtype=torch.int32, device=like.device)
        return self.numpy.asarray(values, dtype=self.numpy.int32)

    def swap12(self, x):
        """(B, N, H, D) <-> (B, H, N, D), a view."""
        return x.transpose(1, 2) if self.kind == "torch" else x.transpose(0, 2, 1, 3)
