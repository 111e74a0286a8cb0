"""CuPy arrays in, CuPy arrays out: through DLPack, without copies.

The GPU tests need cupy, torch with CUDA and triton, and skip (saying which is missing) elsewhere;
the first tests need none of them and run everywhere.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import portattn
from portattn import arrays


def test_describe_rejects_other_objects_and_names_cupy():
    message = r"q must be a numpy.ndarray or a torch.Tensor, got builtins.list; a cupy.ndarray or a pyopencl.array.Array is accepted too"
    with pytest.raises(TypeError, match=message):
        arrays.describe([[1.0]], "q")
    with pytest.raises(TypeError, match=r"k must be .*got builtins.object.*cupy.ndarray"):
        portattn.attention(np.zeros((1, 1, 2, 4), np.float32), object(), np.zeros((1, 1, 2, 4), np.float32))


def test_import_portattn_does_not_import_cupy():
    code = "import sys, portattn, portattn.arrays, portattn.api; assert 'cupy' not in sys.modules, 'cupy was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- on a CUDA machine with cupy -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy", reason="cupy is not installed (pip install cupy-cuda13x on a CUDA machine)")
    torch = pytest.importorskip("torch", reason="cupy arrays are computed on through torch (DLPack)")
    pytest.importorskip("triton", reason="cupy arrays live on a GPU and the triton backend is the CUDA one")
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - no driver, no device: a skip, not a failure
        pytest.skip(f"cupy sees no CUDA device: {error}")
    if devices == 0 or not torch.cuda.is_available():
        pytest.skip("cupy arrays need a CUDA GPU that both cupy and torch can see")
    return cupy


@pytest.fixture(scope="module")
def torch(cp):
    import torch

    return torch


def qkv(cp, shape=(2, 3, 70, 64), seqlen_k=None, dtype="float16", seed=0):
    rng = np.random.default_rng(seed)
    b, h, n, d = shape
    k_shape = (b, h, seqlen_k or n, d)
    return tuple(cp.asarray(rng.standard_normal(s).astype(dtype)) for s in (shape, k_shape, k_shape))


def sdpa(torch, q, k, v, causal=False):
    q, k, v = (torch.from_dlpack(x) for x in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cupy_float16_matches_torch_sdpa(cp, torch, causal):
    q, k, v = qkv(cp, seqlen_k=90)
    out, lse = portattn.attention(q, k, v, causal=causal, return_lse=True)
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float16 and out.shape == q.shape
    assert isinstance(lse, cp.ndarray) and lse.dtype == cp.float32 and lse.shape == q.shape[:3]
    torch.testing.assert_close(torch.from_dlpack(out), sdpa(torch, q, k, v, causal), atol=2e-3, rtol=2e-3)
    qt, kt = (torch.from_dlpack(x).float() for x in (q, k))
    scores = qt @ kt.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1), float("-inf"))
    torch.testing.assert_close(torch.from_dlpack(lse), torch.logsumexp(scores, dim=-1), atol=1e-4, rtol=1e-4)


def test_cupy_float32(cp, torch):
    q, k, v = qkv(cp, dtype="float32")
    out = portattn.attention(q, k, v)
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float32
    torch.testing.assert_close(torch.from_dlpack(out), sdpa(torch, q, k, v), atol=1e-4, rtol=1e-4)


def test_cupy_inputs_reach_torch_without_a_copy(cp, torch):
    q, _, _ = qkv(cp)
    device = f"cuda:{q.device.id}"
    as_torch = arrays.convert(q, "torch", device)
    assert as_torch.data_ptr() == q.data.ptr and as_torch.device == torch.device(device)
    # a transposed (bnhd) view stays a view: same memory, strides carried over (cupy counts bytes)
    view = arrays.bhnd_view(q.transpose(0, 2, 1, 3), "bnhd")
    as_torch = arrays.convert(view, "torch", device)
    assert as_torch.data_ptr() == q.data.ptr
    assert tuple(s * q.itemsize for s in as_torch.stride()) == view.strides
    # and results come back to cupy without a copy
    result = torch.empty((2, 3, 70, 64), dtype=torch.float16, device=device)
    back = arrays.restore(result, "cupy", "float16", device)
    assert isinstance(back, cp.ndarray) and back.data.ptr == result.data_ptr()


@pytest.mark.parametrize("contiguous", [False, True], ids=["view", "contiguous"])
def test_cupy_bnhd_layout(cp, torch, contiguous):
    q, k, v = qkv(cp)
    want = portattn.attention(q, k, v)
    bnhd = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]
    if contiguous:
        bnhd = [cp.ascontiguousarray(x) for x in bnhd]
    got = portattn.attention(*bnhd, layout="bnhd")
    assert isinstance(got, cp.ndarray) and got.shape == (2, 70, 3, 64)
    cp.testing.assert_allclose(got.transpose(0, 2, 1, 3), want, atol=1e-3, rtol=1e-3)


def test_result_lives_on_the_inputs_device(cp, torch):
    index = cp.cuda.runtime.getDeviceCount() - 1  # the last GPU: not the current one when there are several
    with cp.cuda.Device(index):
        q, k, v = qkv(cp)
    out, lse = portattn.attention(q, k, v, return_lse=True)
    assert out.device.id == index and lse.device.id == index
    assert portattn.explain(q, k, v).spec.device == f"cuda:{index}"


def test_cupy_describe_and_errors(cp, torch):
    q, k, v = qkv(cp)
    info = arrays.describe(q, "q")
    assert (info.kind, info.shape, info.dtype, info.requires_grad) == ("cupy", q.shape, "float16", False)
    assert info.device == f"cuda:{q.device.id}"
    with pytest.raises(TypeError, match=r"different array types .*q: cupy, k: torch"):
        portattn.attention(q, torch.from_dlpack(k), v)
    with pytest.raises(TypeError, match=r"lives on a GPU .*cupy.asnumpy.*CUDA backend"):
        arrays.convert(q, "numpy")
    with pytest.raises(ValueError, match=rf"data is on cuda:{q.device.id}"):
        portattn.attention(q, k, v, backend="reference")
