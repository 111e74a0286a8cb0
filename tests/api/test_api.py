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
