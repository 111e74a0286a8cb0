"""attention_host_kv (K/V streamed from host memory in chunks, merged by LSE) against one portattn.attention
call over all keys: on the CPU the chunks are views (the chunk split, causal offsets and merge are what is
tested); with a CUDA device the double-buffered upload and the memory budget are tested too."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import portattn  # noqa: E402
from portattn.distributed import attention_host_kv  # noqa: E402
from portattn.distributed.offload import chunk_pieces, choose_chunk  # noqa: E402

BACKEND = "numba"
TOL = {torch.float64: 1e-11, torch.float32: 2e-5}


def _qkv(nq, nk, dtype=torch.float64, heads=4, kv_heads=2, batch=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nq, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, nk, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, nk, dim, generator=g, dtype=dtype)
    return q, k, v


def _lse_oracle(q, k, causal, align, scale=None, padding=None, softcap=None):
    """float64 log-sum-exp of the visible scores, -inf where a row sees nothing."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    nq, nk = q.shape[-2], k.shape[-2]
    if causal:
        offset = nk - nq if align == "bottom-right" else 0
        i = torch.arange(nq)[:, None] + offset
        s = s.masked_fill(torch.arange(nk)[None, :] > i, float("-inf"))
    if padding is not None:
        s = s.masked_fill(~padding[:, None, None, :], float("-inf"))
    return torch.logsumexp(s, dim=-1)


def _check(q, k, v, *, causal, chunk_keys=None, memory_budget=None, align="bottom-right", **features):
    want = portattn.attention(q, k, v, causal=causal, align=align, backend=BACKEND, **features)
    got, lse = attention_host_kv(q, k, v, causal=causal, align=align, chunk_keys=chunk_keys,
                                 memory_budget=memory_budget, backend=BACKEND, return_lse=True, **features)
    tol = TOL[q.dtype]
    assert got.dtype == q.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    oracle = _lse_oracle(q, k, causal, align, padding=features.get("key_padding_mask"),
                         softcap=features.get("softcap"))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(oracle))
    finite = torch.isfinite(oracle)
    torch.testing.assert_close(lse[finite].double(), oracle[finite], atol=tol, rtol=tol)
    return got, lse


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq", [1, 6, 37])
def test_chunks_equal_one_call(dtype, causal, nq):
    q, k, v = _qkv(nq, 37, dtype)
    for chunk in (1, 5, 8, 37, 64):  # 5 and 8 do not divide 37
        _check(q, k, v, causal=causal, chunk_keys=chunk)


@pytest.mark.parametrize("nq", [5, 50])  # fewer queries than keys, and more (rows that see no key at all)
def test_causal_alignments(nq):
    q, k, v = _qkv(nq, 23)
    for align in ("bottom-right", "top-left"):
        for chunk in (4, 23):
            _check(q, k, v, causal=True, align=align, chunk_keys=chunk)


def test_gqa_and_mqa():
    for heads, kv_heads in ((8, 2), (4, 1), (3, 3)):
        q, k, v = _qkv(3, 29, heads=heads, kv_heads=kv_heads)
        _check(q, k, v, causal=True, chunk_keys=6)


def test_softcap_and_key_padding():
    q, k, v = _qkv(4, 21)
    padding = torch.ones(2, 21, dtype=torch.bool)
    padding[0, 3:] = False  # batch 0: three real keys, all in the first chunk
    padding[1, :15] = False  # batch 1: the last chunks only
    _check(q, k, v, causal=True, chunk_keys=5, key_padding_mask=padding)
    _check(q, k, v, causal=False, chunk_keys=5, softcap=2.0)


def test_memory_budget_chooses_the_chunk():
    q, k, v = _qkv(2, 40)
    per_key = 2 * 2 * (16 + 16) * 8  # B x H_kv x (D_k + D_v) x 8 bytes
    assert choose_chunk(40, per_key, None, 2 * per_key * 7) == 7
    assert choose_chunk(40, per_key, None, 2 * per_key * 7 + 2 * per_key - 1) == 7
    assert choose_chunk(40, per_key, None, 10 ** 9) == 40
    assert choose_chunk(40, per_key, 9, None) == 9
    assert choose_chunk(40, per_key, None, None) == 40
    _check(q, k, v, causal=True, memory_budget=2 * per_key * 7)


def test_pieces_cover_each_visible_pair_once():
    for nq, nk, align in ((1, 9, "bottom-right"), (4, 9, "bottom-right"), (9, 9, "top-left"), (12, 9, "bottom-right"),
                          (3, 9, "top-left")):
        offset = nk - nq if align == "bottom-right" else 0
        visible = min(nk, offset + nq)
        for chunk in (1, 2, 4, 9):
            seen = torch.zeros(nq, nk, dtype=torch.long)
            for a in range(0, visible, chunk):
                b = min(a + chunk, visible)
                for p in chunk_pieces(a, b, nq, offset, True):
                    rows = torch.arange(p.q0, p.q1)[:, None]
                    local = torch.arange(b - a)[None, :]
                    ok = local <= rows - p.q0 + (b - a) - (p.q1 - p.q0) if p.causal else torch.ones_like(local + rows,
                                                                                                          dtype=bool)
                    seen[p.q0:p.q1, a:b] += ok.long()
            want = (torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + offset).long()
            assert torch.equal(seen, want), (nq, nk, align, chunk)


def test_bad_inputs_are_refused_with_reasons():
    q, k, v = _qkv(2, 10)
    with pytest.raises(ValueError, match="forward only"):
        attention_host_kv(q.clone().requires_grad_(), k, v)
    with pytest.raises(ValueError, match="does not run window"):
        attention_host_kv(q, k, v, window=(4, 0))
    with pytest.raises(ValueError, match="does not run alibi_slopes"):
        attention_host_kv(q, k, v, alibi_slopes=torch.ones(4))
    with pytest.raises(ValueError, match="does not run attn_mask"):
        attention_host_kv(q, k, v, attn_mask=torch.ones(2, 10, dtype=torch.bool))
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        attention_host_kv(q, k, v, bogus=1)
    with pytest.raises(ValueError, match="chunk_keys must be a positive int"):
        attention_host_kv(q, k, v, chunk_keys=0)
    with pytest.raises(ValueError, match="memory_budget=10 bytes cannot hold two buffers of one key"):
        attention_host_kv(q, k, v, memory_budget=10)
    with pytest.raises(ValueError, match="more than memory_budget"):
        attention_host_kv(q, k, v, chunk_keys=8, memory_budget=2 * 2 * 2 * 32 * 8 * 4)
    with pytest.raises(ValueError, match="multiple of k's"):
        attention_host_kv(q[:, :3], k, v)
    with pytest.raises(ValueError, match="one dtype"):
        attention_host_kv(q.float(), k, v)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        attention_host_kv(q, k, v, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="align must be one of"):
        attention_host_kv(q, k, v, causal=True, align="middle")
    with pytest.raises(TypeError, match="takes torch tensors"):
        attention_host_kv(q.numpy(), k, v)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the streamed path copies "
                                                                "pinned host K/V to the GPU on a copy stream")


def _streamed_peak(q, k_host, v_host, causal, budget):
    """(out, lse, peak GPU memory the streamed call added)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    got, lse = attention_host_kv(q, k_host, v_host, causal=causal, memory_budget=budget, return_lse=True)
    torch.cuda.synchronize()
    return got, lse, torch.cuda.max_memory_allocated() - base


@cuda
@pytest.mark.parametrize("causal,nq", [(True, 1), (True, 300), (False, 64)])
def test_streamed_equals_on_gpu_and_stays_in_budget(causal, nq):
    """The streamed result equals the all-on-GPU call, and the GPU memory it takes does not grow with the
    keys: twice the keys through the same budget peak at the same bytes, far below the K/V's own. (Beside
    the two K/V buffers a chunk's attention takes a workspace of q's size -- its key splits' partials --
    which the H100 run showed is several q-sized buffers, so the bound is the growth, not a sum.)"""
    device = torch.device("cuda")
    dtype = torch.float16
    batch, heads, kv_heads, dim, nk = 1, 8, 2, 64, 20000
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, nq, dim, generator=g).to(device, dtype)
    k_host = torch.randn(batch, kv_heads, 2 * nk, dim, generator=g).to(dtype).pin_memory()
    v_host = torch.randn(batch, kv_heads, 2 * nk, dim, generator=g).to(dtype).pin_memory()
    per_key = batch * kv_heads * 2 * dim * 2
    budget = 2 * per_key * 3000  # 3000 keys per chunk: 7 chunks, the last one short
    peaks = []
    for keys in (nk, 2 * nk):
        k, v = k_host[:, :, :keys].contiguous().pin_memory(), v_host[:, :, :keys].contiguous().pin_memory()
        want, want_lse = portattn.attention(q, k.to(device), v.to(device), causal=causal, align="bottom-right",
                                            return_lse=True)
        got, lse, peak = _streamed_peak(q, k, v, causal, budget)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lse, want_lse, atol=1e-3, rtol=1e-3)
        peaks.append(peak)
        # the same call twice gives the same bits (buffers reused without a race)
        assert torch.equal(attention_host_kv(q, k, v, causal=causal, memory_budget=budget), got)
    assert peaks[1] <= peaks[0] + (64 << 10), peaks  # twice the keys, the same device memory
    assert peaks[1] < 2 * nk * per_key / 2, (peaks, 2 * nk * per_key)  # well below the K/V it streamed


@cuda
def test_unpinned_host_kv_and_other_gpu():
    q, k, v = _qkv(2, 50, torch.float32)
    out = attention_host_kv(q.cuda(), k, v, chunk_keys=16)  # pinned for the call
    torch.testing.assert_close(out.cpu(), portattn.attention(q, k, v, backend=BACKEND), atol=2e-5, rtol=2e-5)
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="must be in host memory"):
            attention_host_kv(q.cuda(0), k.cuda(1), v.cuda(1))


class _FakeCuda:
    """Stand-ins for torch.cuda's streams and events that log the order of what the streamed path asks for;
    the copies themselves run synchronously on the CPU."""

    def __init__(self, monkeypatch):
        self.log = []
        fake = self

        class Event:
            count = 0

            def __init__(self):
                self.name = f"e{Event.count}"
                Event.count += 1

            def record(self, stream):
                fake.log.append(("record", self.name, stream.name))

            def synchronize(self):
                fake.log.append(("host waits", self.name))

        class Stream:
            def __init__(self, device=None, name="copy"):
                self.name = name

            def wait_stream(self, other):
                fake.log.append(("stream waits stream", self.name, other.name))

            def wait_event(self, event):
                fake.log.append(("wait", self.name, event.name))

        class Within:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                fake.log.append(("enter", self.stream.name))

            def __exit__(self, *exc):
                fake.log.append(("exit", self.stream.name))

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "stream", Within)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(name="compute"))


def test_streaming_protocol_with_fake_streams(monkeypatch):
    """The double-buffered upload on fake streams: each attended chunk holds its own keys (the copy of the
    next chunk went to the other buffer), and the copy into a buffer waits for the attention of the chunk
    that used it two steps before."""
    from portattn.distributed import offload

    fake = _FakeCuda(monkeypatch)
    monkeypatch.setattr(offload, "_host_source", lambda x: x)
    monkeypatch.setattr(offload, "_COPY_STREAMS", {})
    _, k, v = _qkv(1, 23)
    k = k[:, :, :, :]  # a view: rows contiguous, as a slice of a cache would be
    bounds = [(a, min(a + 5, 23)) for a in range(0, 23, 5)]
    seen = []

    def attend(a, b, k_c, v_c):
        assert torch.equal(k_c, k[..., a:b, :]) and torch.equal(v_c, v[..., a:b, :]), (a, b)
        assert k_c.is_contiguous() and v_c.is_contiguous()
        fake.log.append(("attend", a))
        seen.append((a, b))

    offload._stream(k, v, bounds, 5, attend, torch.device("cpu"))
    assert seen == bounds
    log = list(fake.log)
    _, k1, v1 = _qkv(1, 12, batch=1, kv_heads=1)  # one slab: each chunk is one contiguous copy
    offload._stream(k1, v1, [(0, 5), (5, 10), (10, 12)], 5,
                    lambda a, b, k_c, v_c: None if torch.equal(k_c, k1[..., a:b, :]) and torch.equal(
                        v_c, v1[..., a:b, :]) else pytest.fail(f"chunk {a}:{b}"), torch.device("cpu"))
    attends = [i for i, e in enumerate(log) if e[0] == "attend"]
    records = [e for e in log if e[0] == "record"]
    ready = [e[1] for e in records if e[2] == "copy"][:2]  # ready[0], ready[1]
    free = sorted({e[1] for e in records if e[2] == "compute"})
    assert log[0] == ("stream waits stream", "copy", "compute")
    for chunk, at in enumerate(attends):
        slot = chunk % 2
        assert ("wait", "compute", ready[slot]) == log[at - 1]  # the compute stream waits for this chunk's copy
        assert log[at + 1] == ("record", free[slot], "compute")  # then frees the buffer
    enters = [i for i, e in enumerate(log) if e == ("enter", "copy")]
    assert len(enters) == len(bounds)
    for chunk, at in enumerate(enters):
        if chunk >= 2:  # the copy into a buffer waits for the chunk two before to be attended
            assert log[at + 1] == ("wait", "copy", free[chunk % 2])
            assert attends[chunk - 2] < at
        if chunk >= 1:  # chunk i + 1 is enqueued before chunk i is attended: the copy overlaps it
            assert at < attends[chunk - 1]
    assert log[-1] == ("host waits", ready[(len(bounds) - 1) % 2])
