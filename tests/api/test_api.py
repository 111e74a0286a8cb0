"""The public API's promises: array types, dtypes, layouts, LSE, autograd, explain, backends."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import portattn
from portattn import reference

torch = pytest.importorskip("torch", reason="the API's torch promises need torch")
numba = pytest.importorskip("numba", reason="these tests run the numba backend")


def qkv(shape=(2, 3, 37, 32), seqlen_k=None, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    b, h, n, d = shape
    k_shape = (b, h, seqlen_k or n, d)
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(k_shape).astype(dtype), rng.standard_normal(k_shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_in_numpy_out(dtype):
    q, k, v = qkv(dtype=dtype)
    out, lse = portattn.attention(q, k, v, return_lse=True)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == q.shape
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32 and lse.shape == q.shape[:3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_torch_in_torch_out(dtype):
    q, k, v = (torch.from_numpy(x).to(dtype) for x in qkv())
    out, lse = portattn.attention(q, k, v, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.device == q.device
    assert lse.dtype == torch.float32 and tuple(lse.shape) == tuple(q.shape[:3])


def test_matches_torch_sdpa_including_causal_alignment():
    q, k, v = (torch.from_numpy(x) for x in qkv((1, 2, 50, 64), seqlen_k=70))
    for causal in (False, True):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        got = portattn.attention(q, k, v, causal=causal)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_bnhd_layout_is_the_transpose():
    q, k, v = qkv()
    want = portattn.attention(q, k, v)
    got = portattn.attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), layout="bnhd")
    assert got.shape == (2, 37, 3, 32)
    np.testing.assert_allclose(got.transpose(0, 2, 1, 3), want, atol=1e-6)


def test_custom_scale():
    q, k, v = qkv()
    got = portattn.attention(q, k, v, scale=0.3)
    want, _ = reference.attention_forward(q, k, v, scale=0.3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rows_without_keys_are_zero_with_minus_infinite_lse():
    q, k, v = qkv(seqlen_k=1)
    k, v = k[:, :, :0], v[:, :, :0]
    out, lse = portattn.attention(q, k, v, return_lse=True)
    assert not np.isnan(out).any() and (out == 0).all() and np.isneginf(lse).all()


def test_gradcheck_in_float64():
    """torch's finite-difference gradcheck through the numba backward kernel, float64."""
    q, k, v = (torch.from_numpy(x).double().requires_grad_() for x in qkv((1, 2, 9, 8), seqlen_k=11))
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c: portattn.attention(a, b, c, causal=causal, backend="numba"), (q, k, v))


def test_no_grad_skips_autograd():
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in qkv())
    with torch.no_grad():
        out = portattn.attention(q, k, v)
    assert out.grad_fn is None


def test_explain_is_readable_and_complete():
    q, k, v = qkv()
    explanation = portattn.explain(q, k, v, causal=True)
    assert explanation.chosen == "numba" and explanation.plan is not None
    text = str(explanation)
    assert "backend: numba" in text and "tile plan" in text and "why:" in text
    assert "reference: could run it, but auto never picks it on cpu" in text


def test_explain_reports_impossible_calls_without_raising():
    q, k, v = qkv((1, 1, 4, 1100))
    explanation = portattn.explain(q, k, v, backend="numba")
    assert explanation.chosen is None and "head dim 1100" in str(explanation)


def test_backends_and_available_backends():
    statuses = {status.name: status for status in portattn.backends()}
    assert statuses["numba"].usable and statuses["reference"].usable
    assert portattn.available_backends() == [name for name, status in statuses.items() if status.usable]


def test_plan_for_a_catalog_device():
    plan = portattn.plan(seqlen_q=4096, head_dim=128, device="h100")
    assert plan.target == "gpu" and plan.block_q * plan.block_k > 0 and plan.reasons


def test_import_needs_only_numpy():
    """With torch, numba, scipy and pyopencl hidden, portattn imports and says what is missing."""
    code = (
        "import sys\n"
        "for name in ('torch', 'numba', 'scipy', 'threadpoolctl', 'pyopencl', 'triton', 'cupy'):\n"
        "    sys.modules[name] = None\n"
        "import portattn\n"
        "status = {s.name: s for s in portattn.backends()}\n"
        "assert not status['numba'].usable, status['numba']\n"
        "print(status['numba'])\n"
        "print(portattn.available_backends())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "numba: unavailable: numba is not installed" in result.stdout
    assert "['reference']" in result.stdout


def test_attention_s_feature_keywords_are_the_input_path_s():
    """``attention`` spells its feature keywords out; they must be exactly inputs.FEATURE_KEYWORDS, with
    the same defaults."""
    import inspect

    from portattn import inputs

    parameters = inspect.signature(portattn.attention).parameters
    for name, default in inputs.FEATURE_KEYWORDS.items():
        assert name in parameters and parameters[name].default == default, name
    core = {"q", "k", "v", "causal", "scale", "backend", "layout", "return_lse", "autotune"}
    assert set(parameters) - core == set(inputs.FEATURE_KEYWORDS)


def test_repeated_calls_with_scalar_options_reuse_their_checks_and_keep_them_apart():
    """A call whose options are scalars (causal with align, window, softcap: every layer of a Hugging Face
    model) is served from the cache of checked calls, as the checked path computes it; calls differing in one
    option are not mixed up."""
    from portattn import api

    q = torch.randn(1, 2, 9, 16, dtype=torch.float64) * 3
    k = torch.randn(1, 2, 13, 16, dtype=torch.float64) * 3
    calls = [dict(causal=True, align="bottom-right"), dict(causal=True), dict(window=(3, 0), align="bottom-right"),
             dict(window=(5, 0), align="bottom-right"), dict(causal=True, softcap=5.0), dict(causal=True, softcap=50.0)]
    results = []
    for options in calls:
        api._PREPARED.clear()
        first = portattn.attention(q, k, k, backend="reference", **options)  # checked and prepared
        key = api._call_key(q, k, k, options.get("causal", False), None, "reference", "bhnd",
                            options.get("align", "top-left"), options.get("window"), options.get("softcap"))
        assert key in api._PREPARED
        torch.testing.assert_close(portattn.attention(q, k, k, backend="reference", **options), first, rtol=0, atol=0)
        results.append(first)
    for i, a in enumerate(results):
        for b in results[i + 1:]:
            assert (a - b).abs().max() > 1e-3


def test_repeated_calls_with_feature_arrays_reuse_their_checks_but_read_each_call_s_arrays():
    """A call with masks (a padded batch: every layer, every step) is served from the cache of checked calls by
    its arrays' metadata, but each call's own mask values count; a mask of another shape, dtype or one that
    requires grad is checked afresh (and refused where it must be), never served."""
    from portattn import api

    api._PREPARED.clear()
    q, k = torch.randn(2, 2, 5, 16, dtype=torch.float64), torch.randn(2, 2, 7, 16, dtype=torch.float64)
    paddings = [torch.ones(2, 7, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)]
    paddings[1][0, :3] = False
    masks = [torch.rand(5, 7) > 0.3, torch.rand(5, 7) > 0.3]
    for m in masks:
        m[:, -1] = True
    for _ in range(2):  # the second round is served from the cache
        for padding in paddings:
            got = portattn.attention(q, k, k, causal=True, align="bottom-right", key_padding_mask=padding,
                                     backend="reference")
            expected = portattn.attention(q, k, k, attn_mask=_causal_bottom_right(5, 7) & padding[:, None, None, :],
                                          backend="reference")
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        for m in masks:
            expected = torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=m)
            torch.testing.assert_close(portattn.attention(q, k, k, attn_mask=m, backend="reference"), expected)
    assert len(api._PREPARED) == 3  # one checked call per mask shape and options: padding, (2, 1, 5, 7), (5, 7)
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        portattn.attention(q, k, k, key_padding_mask=torch.ones(2, 6, dtype=torch.bool), backend="reference")
    with pytest.raises(ValueError, match="requires grad"):
        portattn.attention(q, k, k, attn_mask=torch.zeros(5, 7, dtype=torch.float64, requires_grad=True),
                           backend="reference")
    with pytest.raises(ValueError, match="dropout_seed"):
        portattn.attention(q, k, k, attn_mask=masks[0], dropout_p=0.5, backend="reference")


def _causal_bottom_right(rows: int, keys: int):
    return torch.arange(keys)[None, :] <= torch.arange(rows)[:, None] + keys - rows


def test_selecting_a_backend_asks_only_the_backends_it_needs(monkeypatch):
    """A named backend is asked alone, and auto asks in priority order until one can run the call: another
    backend's reasons can cost a plan of its own (opencl's took milliseconds), on every new shape. Every
    backend is asked only when the call fails, for the message."""
    from portattn import dispatch
    from portattn.backends import registry
    from portattn.inputs import spec_from_arrays

    asked = []
    for name, backend in registry().items():
        original = backend.not_supported_reasons
        monkeypatch.setattr(backend, "not_supported_reasons",
                            lambda spec, name=name, original=original: asked.append(name) or original(spec))
    spec = spec_from_arrays(*(torch.randn(1, 2, 7, 16) for _ in range(3)))
    dispatch._select.cache_clear()
    assert dispatch.select(spec, "numba").name == "numba" and asked == ["numba"]
    asked.clear()
    chosen = dispatch.select(spec, "auto").name
    ranked = sorted((n for n, b in registry().items() if b.auto_priority.get("cpu") is not None),
                    key=lambda n: -registry()[n].auto_priority["cpu"])
    assert asked == ranked[:ranked.index(chosen) + 1]
    asked.clear()
    with pytest.raises(ValueError, match="backends that can"):
        dispatch.select(spec_from_arrays(*(torch.randn(1, 2, 7, 16) for _ in range(3)), causal=True,
                                         dropout_p=0.5, dropout_seed=1), "opencl")
    assert set(asked) == set(registry())
    dispatch._select.cache_clear()
