"""The Hopper forward (``portattn/backends/triton/hopper.py``) against the float64 reference: O and the
LSE for lengths that are no multiple of any block (37, 70), causal and not, GQA, bottom-right, each
load path (host and device TMA descriptors, pointers) and each variant switch.

Where it runs: natively on a CUDA device (the tiles a Hopper would use), else in Triton's CPU
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without a GPU) with small tiles, so the
loops run several key tiles, both masked and unmasked. The interpreter of Triton 3.6 and 3.9 runs
tensor descriptors (host ``TensorDescriptor`` and ``tl.make_tensor_descriptor``) as masked pointer
loads, so the TMA paths' indexing is checked here too; only the TMA hardware itself needs the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from conformance.checks import check_close, check_lse  # tests/ is on sys.path (pytest's rootdir)
from conformance.tolerances import BOUNDS

from portattn import api, reference
from portattn.inputs import spec_from_arrays

torch = pytest.importorskip("torch")
hopper = pytest.importorskip("portattn.backends.triton.hopper", reason="the Hopper forward's host code")


@pytest.fixture(scope="module")
def usable(usable_backend):
    """Skips, with the triton backend's own reasons, where neither a CUDA device nor the interpreter runs it."""
    return usable_backend("triton")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _config(**switches) -> hopper.HopperConfig:
    """Real Hopper tiles on a GPU; small ones in the interpreter (several tiles at these lengths, and fast)."""
    if _device() == "cuda":
        return hopper.DEFAULT._replace(**switches)
    return hopper.HopperConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)._replace(**switches)


def _inputs(b, h, kvh, nq, nk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, heads, n, d, generator=gen).to(dtype).to(_device())
               for heads, n in ((h, nq), (kvh, nk), (kvh, nk)))
    return q, k, v


def _expected(q, k, v, causal, align, scale):
    spec = spec_from_arrays(q, k, v, causal=causal, align=align, scale=scale)
    arrays = [x.detach().cpu().double().numpy() for x in (q, k, v)]
    return reference.attention_forward(*arrays, scale=spec.softmax_scale, spec=spec)


def _check(q, k, v, causal, config, align="top-left", scale=None):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out, lse = hopper.hopper_forward(q, k, v, causal, scale, config, bottom_right=align == "bottom-right")
    want_out, want_lse = _expected(q, k, v, causal, align, scale)
    bound = BOUNDS[str(q.dtype).removeprefix("torch.")]
    assert out.dtype == q.dtype and out.is_contiguous() and lse.dtype == torch.float32
    check_close("out", out, want_out, bound.out)
    check_lse(lse, want_lse, bound.lse)
    return out, lse


CONFIGS = {
    "host": dict(loads="host"),
    "device": dict(loads="device"),
    "pointer": dict(loads="pointer"),
    "defer": dict(defer_pv=True),
    "lazy": dict(lazy_rescale=8.0),
    "defer-lazy": dict(defer_pv=True, lazy_rescale=8.0),
    "split": dict(split_q=True),
    "split-lazy-pointer": dict(split_q=True, lazy_rescale=8.0, loads="pointer"),
}


@pytest.mark.parametrize("n", [37, 70])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(usable, name, causal, n):
    q, k, v = _inputs(2, 3, 3, n, n, 64, torch.float16)
    _check(q, k, v, causal, _config(**CONFIGS[name]))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dim_128(usable, causal):
    q, k, v = _inputs(1, 2, 2, 70, 70, 128, torch.float16)
    _check(q, k, v, causal, _config(defer_pv=True))


def test_head_dim_256(usable):
    q, k, v = _inputs(1, 2, 2, 37, 37, 256, torch.float16)
    config = hopper.config_for(spec_from_arrays(q, k, v, causal=True)) if _device() == "cuda" else _config()
    _check(q, k, v, True, config)


@pytest.mark.parametrize("name", ["host", "defer", "split"])
def test_gqa_bottom_right(usable, name):
    """4 query heads on 2 K/V heads; Nq != Nk both ways, bottom-right: with Nq > Nk the first rows see
    no key at all (O = 0, LSE = -inf)."""
    for nq, nk in ((37, 70), (70, 37)):
        q, k, v = _inputs(2, 4, 2, nq, nk, 64, torch.float16, seed=nq)
        out, lse = _check(q, k, v, True, _config(**CONFIGS[name]), align="bottom-right")
        if nq > nk:
            assert torch.isneginf(lse[:, :, : nq - nk]).all() and not out[:, :, : nq - nk].any()


def test_bfloat16(usable):
    q, k, v = _inputs(1, 2, 1, 70, 70, 64, torch.bfloat16)
    _check(q, k, v, True, _config(defer_pv=True, lazy_rescale=8.0))


def test_large_scores_with_lazy_rescale(usable):
    """Scores of a few hundred (log2 units) that grow along the keys: the lazy rescale must keep P
    finite (each skipped rescale leaves P <= 2^8) and O, LSE exact."""
    q, k, v = _inputs(1, 2, 2, 70, 70, 64, torch.float16, seed=5)
    ramp = torch.linspace(0.2, 3.0, 70, device=q.device)[:, None].to(torch.float16)
    _check(q.abs(), k.abs() * ramp, v, False, _config(lazy_rescale=8.0, defer_pv=True), scale=1.0)


def test_strides_tma_cannot_take_fall_back_to_pointer_loads(usable):
    """Rows 65 halves apart (130 bytes: no multiple of 16): TMA refuses them, pointer loads read them."""
    q, k, v = (x[..., :64] for x in _inputs(1, 2, 2, 37, 37, 65, torch.float16))
    assert not hopper.tma_ready(q)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    assert hopper.launch_arguments(q, k, v, out, lse, True, 0.125, _config())[3]["LOADS"] == "pointer"
    _check(q, k, v, True, _config())


def test_lse_serves_the_existing_backward(usable):
    """The existing backward, given the Hopper forward's O and LSE, returns the reference's gradients:
    the LSE is stored as attention_forward stores it (natural log, float32, (B, H, Nq))."""
    q, k, v = _inputs(1, 2, 2, 37, 37, 64, torch.float16)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(q.dtype).to(q.device)
    out, lse = hopper.hopper_forward(q, k, v, True, 0.125, _config(defer_pv=True))
    call = api.prepare(q, k, v, causal=True, scale=0.125, backend="triton")
    _, ref_lse = call.forward(q, k, v)
    np.testing.assert_allclose(lse.cpu().numpy(), ref_lse.cpu().numpy(), rtol=1e-5, atol=1e-5)
    grads = call.backward(do, q, k, v, out, lse)
    spec = spec_from_arrays(q, k, v, causal=True, scale=0.125)
    arrays = [x.cpu().double().numpy() for x in (do, q, k, v)]
    want = reference.attention_backward(*arrays, scale=0.125, spec=spec)
    for name, got, expected in zip(("dq", "dk", "dv"), grads, want):
        check_close(name, got, expected, BOUNDS["float16"].grad)


def test_empty_inputs(usable):
    q, k, v = _inputs(1, 2, 2, 5, 0, 64, torch.float16)
    out, lse = hopper.hopper_forward(q, k, v, False, 0.125, _config())
    assert not out.any() and torch.isneginf(lse).all()


def test_config_problems_are_refused():
    assert hopper.DEFAULT.problems() == []
    bad = hopper.HopperConfig(split_q=True, defer_pv=True, block_n=48, loads="tma")
    assert len(bad.problems()) == 3
    assert bad.label() == "128x48-w8-s3-tma+split+defer"
    with pytest.raises(ValueError, match="exclusive"):
        hopper.hopper_forward(None, None, None, False, 1.0, bad)


def test_eligible_specs():
    from portattn.spec import AttentionSpec

    plain = AttentionSpec(2, 8, 1024, 1024, 128, dtype="float16", device="cuda:0", array_kind="torch")
    assert hopper.eligible(plain) and hopper.eligible(plain, (9, 0))
    assert hopper.eligible(plain.with_(causal=True, kv_heads=2, align="bottom-right", seqlen_q=900))
    assert not hopper.eligible(plain, (8, 0))
    for changes, reason in ((dict(dtype="float32"), "dtype"), (dict(head_dim=96), "head dim"),
                            (dict(window=(16, 0)), "window"), (dict(dropout_p=0.1), "dropout"),
                            (dict(device="cpu", array_kind="numpy"), "torch"), (dict(scale=-1.0), "scale")):
        reasons = hopper.ineligible(plain.with_(**changes))
        assert reasons and any(reason in r for r in reasons), (changes, reasons)


def test_serves_large_plain_calls_on_hopper_only():
    """``TritonBackend.forward`` takes the Hopper kernel for eligible calls of at least MIN_FLOPS on a 9.x
    device, and the portable forward for small ones (host time) and other devices; each rule's tiles."""
    from portattn.spec import AttentionSpec

    small = AttentionSpec(1, 8, 128, 128, 64, causal=True, dtype="float16", device="cuda:0", array_kind="torch")
    large = small.with_(heads=32, seqlen_q=2048, seqlen_k=2048, head_dim=128)  # a 7B model's 2k-token prefill
    assert large.flops_forward == hopper.MIN_FLOPS
    assert not hopper.serves(large.with_(seqlen_q=2047), (9, 0))
    assert not hopper.serves(small, (9, 0)) and hopper.serves(large, (9, 0))
    assert not hopper.serves(large, (8, 0)) and not hopper.serves(large, None)
    picks = {(d, causal): hopper.config_for(large.with_(head_dim=d, causal=causal, seqlen_q=1024, seqlen_k=1024)).label()
             for d in (64, 128, 256) for causal in (False, True)}
    assert picks == {(64, False): "64x128-w4-s2-host", (64, True): "64x128-w4-s2-host",
                     (128, False): "128x64-w4-s2-host", (128, True): "64x64-w4-s3-host",
                     (256, False): "128x64-w8-s2-host", (256, True): "128x64-w8-s2-host"}
    assert hopper.config_for(large.with_(head_dim=64, seqlen_q=8192, seqlen_k=8192)).num_stages == 3  # H1


def test_attention_runs_the_hopper_forward_where_it_serves(usable, monkeypatch):
    """With the work threshold lowered, ``portattn.attention`` on triton runs the Hopper forward (on the
    interpreter's catalog H100 or a 9.x GPU), says so in its plan, and its output and gradients (the
    portable backward on the Hopper LSE) match the portable forward's."""
    from portattn.backends import registry
    from portattn.backends.triton import _hopper_config

    backend = registry()["triton"]
    q, k, v = _inputs(1, 4, 2, 70, 70, 64, torch.float16)
    if backend.device(spec_from_arrays(q, k, v)).compute_capability[0] != hopper.HOPPER_MAJOR:
        pytest.skip("the Hopper forward serves compute capability 9.x only; this GPU is another")
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q.dtype).to(q.device)

    def run():
        api._PREPARED.clear()
        _hopper_config.cache_clear()
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = api.attention(*leaves, causal=True, backend="triton")
        out.backward(do)
        return out.detach(), [x.grad for x in leaves]

    portable_out, portable_grads = run()
    launched = []
    monkeypatch.setattr(hopper, "MIN_FLOPS", 0)
    monkeypatch.setattr(hopper, "config_for", lambda spec: _config())
    monkeypatch.setattr(hopper, "hopper_forward", lambda *a, **kw: launched.append(a[5]) or _real_forward(*a, **kw))
    out, grads = run()
    assert launched == [_config()]
    assert "H0 the forward runs the Hopper kernel" in str(api.explain(q, k, v, causal=True, backend="triton"))
    bound = BOUNDS["float16"]
    check_close("out", out, portable_out.cpu().double().numpy(), bound.out)
    for name, got, want in zip(("dq", "dk", "dv"), grads, portable_grads):
        check_close(name, got, want.cpu().double().numpy(), bound.grad)
    _hopper_config.cache_clear()


_real_forward = hopper.hopper_forward
