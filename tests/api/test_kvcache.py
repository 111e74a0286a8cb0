"""``attention_with_kvcache``: paged against contiguous against the float64 reference, on every usable
backend, with the cache edge cases decoding meets: empty and one-key caches, pages out of order, odd
page counts, sequences ending on a page boundary, new keys crossing a page, page sizes 1 to 256.

The expected values never go through the function under test: each sequence's keys are appended by
hand to a float64 copy, and plain ``attention`` (reference backend, bottom-right causal) computes it.
"""

from __future__ import annotations

import numpy as np
import pytest

import portattn

BACKENDS = ["numba", "triton", "opencl", "cupy", "reference"]
TOLERANCE = {"float64": 1e-10, "float32": 3e-5, "float16": 3e-3}


def _expected(q, cache_k, cache_v, old, new_k, new_v, causal, window=None, softcap=None, alibi_slopes=None):
    outs, lses = [], []
    for b, length in enumerate(old):
        keys = np.concatenate([cache_k[b, :length], new_k[b]]) if new_k is not None else cache_k[b, :length]
        values = np.concatenate([cache_v[b, :length], new_v[b]]) if new_v is not None else cache_v[b, :length]
        out, lse = portattn.attention(q[b:b + 1].astype(np.float64), keys[None].astype(np.float64),
                                      values[None].astype(np.float64), layout="bnhd", causal=causal, align="bottom-right",
                                      window=window, softcap=softcap, alibi_slopes=alibi_slopes, backend="reference",
                                      return_lse=True)
        outs.append(out)
        lses.append(lse)
    return np.concatenate(outs), np.concatenate(lses)


def _paged(contiguous: np.ndarray, page_size: int, rng, spare_pages: int = 3):
    """The same cache as pages in a shuffled order, with unused pages in between, and its block table."""
    batch, capacity = contiguous.shape[:2]
    per_sequence = -(-capacity // page_size)
    total = batch * per_sequence + spare_pages
    order = rng.permutation(total)[: batch * per_sequence].reshape(batch, per_sequence).astype(np.int32)
    pages = rng.standard_normal((total, page_size, *contiguous.shape[2:])).astype(contiguous.dtype)
    padded = np.zeros((batch, per_sequence * page_size, *contiguous.shape[2:]), contiguous.dtype)
    padded[:, :capacity] = contiguous
    for b in range(batch):
        for i, page in enumerate(order[b]):
            pages[page] = padded[b, i * page_size:(i + 1) * page_size]
    return pages, order


def _paged_like(contiguous: np.ndarray, table: np.ndarray, pages_like: np.ndarray):
    """``contiguous`` in the pages ``table`` gives (the page order of another cache's ``_paged``)."""
    pages = pages_like.copy()
    page_size = pages.shape[1]
    padded = np.zeros((contiguous.shape[0], table.shape[1] * page_size, *contiguous.shape[2:]), contiguous.dtype)
    padded[:, :contiguous.shape[1]] = contiguous
    for b in range(table.shape[0]):
        for i, page in enumerate(table[b]):
            pages[page] = padded[b, i * page_size:(i + 1) * page_size]
    return pages


def _as_contiguous(pages, table, capacity):
    batch = table.shape[0]
    return np.stack([np.concatenate([pages[p] for p in table[b]])[:capacity] for b in range(batch)])


CASES = {
    # name: (page_size, capacity, cache_seqlens, new keys, Nq)
    "decode-one-new-key": (16, 48, [17, 0, 32], 1, 1),  # 32 + 1: the new key opens a page
    "empty-and-one-key": (4, 12, [0, 1, 0], 0, 1),  # a sequence with no key at all: zeros, LSE -inf
    "ends-on-page-boundary": (8, 32, [8, 16, 24], 0, 2),
    "new-keys-cross-a-page": (5, 30, [3, 9, 4], 4, 4),  # 3 + 4 crosses from page 0 into page 1
    "page-size-1": (1, 20, [7, 3, 11], 2, 1),
    "page-size-256": (256, 300, [255, 40, 1], 3, 3),
    "odd-pages-several-queries": (7, 35, [12, 20, 5], 3, 16),
    "same-lengths": (16, 40, [20, 20, 20], 1, 2),  # contiguous: attended in place, no gather
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_paged_and_contiguous_match_the_reference(usable_backend, backend, case, causal):
    dtype = "float64" if backend == "reference" else "float16" if backend == "cupy" else "float32"
    usable_backend(backend)
    page_size, capacity, old, n_new, n_query = CASES[case]
    rng = np.random.default_rng(len(case))
    batch, heads, kv_heads, dim = len(old), 4, 2, 32
    q = rng.standard_normal((batch, n_query, heads, dim)).astype(dtype)
    cache_k, cache_v = (rng.standard_normal((batch, capacity, kv_heads, dim)).astype(dtype) for _ in range(2))
    new_k, new_v = ((rng.standard_normal((batch, n_new, kv_heads, dim)).astype(dtype) for _ in range(2))
                    if n_new else (None, None))
    expected, expected_lse = _expected(q, cache_k, cache_v, old, new_k, new_v, causal)
    seqlens = np.asarray(old, np.int32)
    device = "cuda" if backend in ("triton", "cupy") and _cuda() else None

    pages_k, table = _paged(cache_k, page_size, rng)
    pages_v = _paged_like(cache_v, table, pages_k)
    runs = {"contiguous": (cache_k.copy(), cache_v.copy(), None), "paged": (pages_k, pages_v, table)}
    for layout, (ck, cv, bt) in runs.items():
        args = [q, ck, cv, seqlens, bt, new_k, new_v]
        if device:
            import torch

            args = [None if a is None else torch.from_numpy(a).to(device) for a in args]
        out, lse = portattn.attention_with_kvcache(*args[:5], k=args[5], v=args[6], causal=causal, return_lse=True,
                                                   backend=backend)
        if device:
            out, lse, ck_after = out.cpu().numpy(), lse.cpu().numpy(), args[1].cpu().numpy()
            cv_after = args[2].cpu().numpy()
        else:
            ck_after, cv_after = ck, cv
        tol = TOLERANCE[dtype]
        np.testing.assert_allclose(out.astype(np.float64), expected, atol=tol, rtol=tol, err_msg=layout)
        finite = np.isfinite(expected_lse)
        assert (np.isfinite(lse) == finite).all(), layout
        np.testing.assert_allclose(lse[finite], expected_lse[finite], atol=tol, rtol=tol, err_msg=layout)
        if n_new:  # the new keys were written in place, where the cache keeps position p
            seen = ck_after if bt is None else _as_contiguous(ck_after, bt, capacity)
            seen_v = cv_after if bt is None else _as_contiguous(cv_after, bt, capacity)
            for b, start in enumerate(old):
                np.testing.assert_array_equal(seen[b, start:start + n_new], new_k[b], err_msg=layout)
                np.testing.assert_array_equal(seen_v[b, start:start + n_new], new_v[b], err_msg=layout)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_window_and_softcap_follow_the_keys_present():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 3, 2, 16))
    cache_k, cache_v = rng.standard_normal((2, 2, 30, 2, 16))
    new_k, new_v = rng.standard_normal((2, 2, 2, 2, 16))
    old = [10, 25]
    expected, _ = _expected(q, cache_k, cache_v, old, new_k, new_v, True, window=(4, 0), softcap=5.0)
    out = portattn.attention_with_kvcache(q, cache_k.copy(), cache_v.copy(), np.asarray(old, np.int32), k=new_k, v=new_v,
                                          causal=True, window=(4, 0), softcap=5.0, backend="reference")
    np.testing.assert_allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("change,message", [
    (dict(cache_seqlens=np.asarray([31, 0], np.int32)), "cache_seqlens must lie in"),
    (dict(cache_seqlens=np.asarray([3, 0], np.int64)), "cache_seqlens must be an int or an int32"),
    (dict(cache_seqlens=np.asarray([29, 0], np.int32), k=np.zeros((2, 2, 1, 8)), v=np.zeros((2, 2, 1, 8))), "reach 31"),
    (dict(k=np.zeros((2, 1, 1, 8))), "give k and v together"),
    (dict(k=np.zeros((2, 1, 2, 8)), v=np.zeros((2, 1, 2, 8))), "must be \\(B, Nnew, H_kv, D\\)"),
    (dict(block_table=np.zeros((2, 3), np.int64)), "block_table must be int32"),
    (dict(block_table=np.full((2, 3), 9, np.int32)), "outside the cache's 2 pages"),
])
def test_bad_cache_arguments_are_named_before_any_kernel(change, message):
    q = np.zeros((2, 1, 2, 8))
    cache = np.zeros((2, 30, 1, 8))
    args = dict(cache_seqlens=np.asarray([3, 0], np.int32), block_table=None, k=None, v=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        portattn.attention_with_kvcache(q, cache, cache.copy(), args.pop("cache_seqlens"), args.pop("block_table"),
                                        backend="reference", **args)


# The decode kernels (numba, and triton in its interpreter here): each case names what it exercises.
DECODE_CASES = {
    # name: (GQA group, Nq, page size (0: contiguous), lengths after the append, new keys, causal, dtype, extras)
    "gqa4-one-query-paged16-split": (4, 1, 16, [600, 1, 37], 1, False, "float32", {}),  # 600 keys: two splits, merged
    "gqa1-causal-contiguous-ragged": (1, 3, 0, [5, 40, 3], 0, True, "float16", {}),
    "gqa4-odd-pages-window-softcap-alibi": (4, 2, 7, [20, 9, 33], 2, True, "bfloat16",
                                            dict(window=(5, 0), softcap=4.0, alibi=True)),
    "page-size-1-sixteen-queries": (2, 16, 1, [30, 16, 17], 0, True, "float32", {}),
    "page-256-empty-sequences": (4, 1, 256, [0, 300, 0], 0, False, "float32", {}),
}
# normwise, as the conformance suite measures: 4 units of the output's rounding plus float32 accumulation
DECODE_TOLERANCE = {"float32": 3e-5, "float16": 4 * 2.0**-11 + 1e-4, "bfloat16": 4 * 2.0**-8 + 1e-4}


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_kernels_read_the_cache_in_place(usable_backend, backend, case, split_decoding):
    torch = pytest.importorskip("torch")
    usable_backend(backend)
    group, n_query, page_size, lengths, n_new, causal, dtype, extras = DECODE_CASES[case]
    rng = np.random.default_rng(len(case))
    batch, kv_heads, dim = len(lengths), 2, 32
    heads = group * kv_heads
    capacity = max(lengths) + 5
    old = [n - n_new for n in lengths]
    q = rng.standard_normal((batch, n_query, heads, dim))
    cache_k, cache_v = (rng.standard_normal((batch, capacity, kv_heads, dim)) for _ in range(2))
    new_k, new_v = ((rng.standard_normal((batch, n_new, kv_heads, dim)) for _ in range(2)) if n_new else (None, None))
    slopes = rng.uniform(0.05, 0.5, heads) if extras.get("alibi") else None
    options = dict(window=extras.get("window"), softcap=extras.get("softcap"))
    # the expected values from the inputs as the kernel sees them (rounded to the dtype)
    dt = getattr(torch, dtype)
    rounded = [None if x is None else torch.from_numpy(x).to(dt).double().numpy() for x in (q, cache_k, cache_v, new_k, new_v)]
    expected, expected_lse = _expected(*rounded[:3], old, *rounded[3:], causal, alibi_slopes=slopes, **options)
    if page_size:
        pages_k, table = _paged(cache_k, page_size, rng)
        pages_v = _paged_like(cache_v, table, pages_k)
        ck, cv, bt = pages_k, pages_v, torch.from_numpy(table)
    else:
        ck, cv, bt = cache_k, cache_v, None
    device = _device_for(torch, backend)
    as_torch = (lambda x: None if x is None else torch.from_numpy(np.ascontiguousarray(x)).to(device, dt))
    args = dict(k=as_torch(new_k), v=as_torch(new_v), causal=causal, return_lse=True, backend=backend,
                alibi_slopes=None if slopes is None else torch.from_numpy(slopes).float().to(device), **options)
    call = (as_torch(q), as_torch(ck), as_torch(cv), torch.tensor(old, dtype=torch.int32, device=device),
            None if bt is None else bt.to(device))
    route = portattn.kvcache.explain_with_kvcache(*call, **{k: a for k, a in args.items() if k != "return_lse"})
    assert route.plan is not None, str(route)  # the decode kernel, not the gather
    out, lse = (x.cpu() for x in portattn.attention_with_kvcache(*call, **args))
    assert out.dtype == dt and tuple(out.shape) == (batch, n_query, heads, dim) and lse.dtype == torch.float32
    error = np.abs(out.double().numpy() - expected).max() / max(1.0, np.abs(expected).max())
    assert error <= DECODE_TOLERANCE[dtype], error
    finite = np.isfinite(expected_lse)
    assert (np.isfinite(lse.numpy()) == finite).all()
    assert np.abs(lse.numpy()[finite] - expected_lse[finite]).max(initial=0.0) <= 3e-5 * max(1.0, np.abs(expected_lse[finite]).max(initial=1.0))
    empty = np.asarray(lengths) == 0
    assert (out[torch.from_numpy(empty)] == 0).all()  # a sequence with no key: zeros (and LSE -inf, checked above)


def test_gathering_backends_say_why():
    q, cache = np.zeros((2, 1, 2, 8)), np.zeros((2, 30, 1, 8))
    route = portattn.kvcache.explain_with_kvcache(q, cache, cache, np.asarray([3, 7], np.int32), backend="reference")
    assert route.plan is None and "no kernel that reads a KV cache in place" in str(route)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_lengths_left_on_the_device_give_the_same_answer(usable_backend, backend, monkeypatch, split_decoding):
    """On a GPU, a call without new keys reads neither cache_seqlens nor block_table back (no sync): the plan
    comes from the shapes and the kernels cut each sequence's keys themselves. Simulated here by treating the
    CPU tensors as device-resident."""
    torch = pytest.importorskip("torch")
    usable_backend(backend)
    on = _device_for(torch, backend)
    rng = np.random.default_rng(7)
    q = torch.from_numpy(rng.standard_normal((3, 2, 4, 16)).astype(np.float32))
    cache = rng.standard_normal((3, 700, 2, 16)).astype(np.float32)
    pages, table = _paged(cache, 16, rng)
    pages, table = torch.from_numpy(pages).to(on), torch.from_numpy(table).to(on)
    seqlens = torch.tensor([700, 0, 290], dtype=torch.int32, device=on)
    host = portattn.attention_with_kvcache(q.to(on), pages, pages, seqlens, table, causal=True, return_lse=True,
                                           backend=backend)
    monkeypatch.setattr(portattn.kvcache, "_on_gpu", lambda x: True)
    device = portattn.attention_with_kvcache(q.to(on), pages, pages, seqlens, table, causal=True, return_lse=True,
                                             backend=backend)
    for a, b in zip(host, device):
        np.testing.assert_allclose(a.cpu().numpy(), b.cpu().numpy(), atol=1e-6, rtol=1e-6)
    expected, _ = _expected(q.double().numpy(), cache, cache, [700, 0, 290], None, None, True)
    np.testing.assert_allclose(device[0].double().cpu().numpy(), expected, atol=3e-5)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_a_full_cache_on_the_device_needs_no_lengths(usable_backend, backend, monkeypatch):
    """cache_seqlens=None with q on a GPU (simulated) takes the route that reads nothing back, and a torch
    kernel gets no lengths array at all (it takes the capacity; no host-to-device copy per step): the
    answer is the one given explicit full lengths."""
    torch = pytest.importorskip("torch")
    usable_backend(backend)
    from portattn.backends.triton import decode

    on = _device_for(torch, backend)
    rng = np.random.default_rng(5)
    q = torch.from_numpy(rng.standard_normal((2, 1, 4, 16)).astype(np.float32)).to(on)
    cache = torch.from_numpy(rng.standard_normal((2, 300, 2, 16)).astype(np.float32)).to(on)
    full = torch.full((2,), 300, dtype=torch.int32, device=on)
    explicit = portattn.attention_with_kvcache(q, cache, cache, full, causal=True, backend=backend)
    seen = []
    launch = decode._launch
    monkeypatch.setattr(decode, "_launch", lambda *a, **kw: seen.append(a[5]) or launch(*a, **kw))
    monkeypatch.setattr(portattn.kvcache, "_on_gpu", lambda x: True)
    implied = portattn.attention_with_kvcache(q, cache, cache, None, causal=True, backend=backend)
    torch.testing.assert_close(implied, explicit, rtol=1e-6, atol=1e-6)
    assert seen == ([None] if backend == "triton" else [])


def _device_for(torch, backend: str) -> str:
    """Where a backend's torch inputs live: triton's on the GPU when there is one (else its interpreter's CPU)."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def test_repeated_calls_reuse_checks_but_not_values(usable_backend):
    """Decoding repeats a call with tensors of the same shapes every step: the checks that read only
    metadata are reused (nothing re-validated), while the values -- cache_seqlens' range, block_table's
    pages -- and a changed option are checked on every call."""
    torch = pytest.importorskip("torch")
    usable_backend("numba")
    from portattn import kvcache

    rng = np.random.default_rng(3)
    q = torch.from_numpy(rng.standard_normal((2, 1, 4, 16)).astype(np.float32))
    cache = rng.standard_normal((2, 40, 2, 16)).astype(np.float32)
    pages, table = _paged(cache, 8, rng)
    pages, table = torch.from_numpy(pages), torch.from_numpy(table)
    lengths = torch.tensor([40, 17], dtype=torch.int32)
    kvcache._CHECKED.clear()
    first = portattn.attention_with_kvcache(q, pages, pages, lengths, table, causal=True, backend="numba")
    assert len(kvcache._CHECKED) == 1
    again = portattn.attention_with_kvcache(q, pages, pages, lengths, table, causal=True, backend="numba")
    assert len(kvcache._CHECKED) == 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    expected, _ = _expected(q.double().numpy(), cache, cache, [40, 17], None, None, True)
    np.testing.assert_allclose(again.double().numpy(), expected, atol=3e-5)
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        portattn.attention_with_kvcache(q, pages, pages, torch.tensor([41, 0], dtype=torch.int32), table, backend="numba")
    with pytest.raises(ValueError, match="outside the cache"):
        portattn.attention_with_kvcache(q, pages, pages, lengths, table + 100, backend="numba")
    with pytest.raises(ValueError, match="window"):
        portattn.attention_with_kvcache(q, pages, pages, lengths, table, window=(-5, 0), backend="numba")
    with pytest.raises(ValueError, match="softcap"):
        portattn.attention_with_kvcache(q, pages, pages, lengths, table, softcap=-1.0, backend="numba")
