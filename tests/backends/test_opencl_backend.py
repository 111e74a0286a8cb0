"""The ``opencl`` backend beyond the conformance suite: pyopencl arrays stay on their device, the
device is chosen by ``device=`` or ``$PORTATTN_OPENCL_DEVICE``, and wrong choices fail before any kernel."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import portattn
from portattn import reference

cl = pytest.importorskip("pyopencl", reason="the opencl backend needs pyopencl (pip install 'portattn[opencl]')")
cla = pytest.importorskip("pyopencl.array")


@pytest.fixture(scope="module")
def queue(usable_backend):
    from portattn.backends import opencl_runtime

    usable_backend("opencl")
    return opencl_runtime.queue_for(opencl_runtime.choose())


def _inputs(shape=(1, 2, 37, 24), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]


def _reference(q, k, v, causal=False):
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    return reference.attention_forward(q, k, v, scale=q.shape[-1] ** -0.5, causal=causal)[0]


def test_pyopencl_arrays_stay_on_their_device(queue):
    host = _inputs()
    q, k, v = (cla.to_device(queue, x) for x in host)
    out, lse = portattn.attention(q, k, v, backend="opencl", causal=True, return_lse=True)
    assert isinstance(out, cla.Array) and isinstance(lse, cla.Array)
    assert out.context == q.context and out.dtype == np.float32 and lse.shape == (1, 2, 37)
    np.testing.assert_allclose(out.get(), _reference(*host, causal=True), atol=2e-5)


def test_auto_picks_opencl_for_pyopencl_arrays(queue):
    q, k, v = (cla.to_device(queue, x) for x in _inputs())
    assert portattn.explain(q, k, v).chosen == "opencl"


def test_bnhd_views_of_pyopencl_arrays(queue):
    host = [x.transpose(0, 2, 1, 3).copy() for x in _inputs()]  # (B, N, H, D)
    q, k, v = (cla.to_device(queue, x) for x in host)
    out = portattn.attention(q, k, v, backend="opencl", layout="bnhd")
    want = _reference(*(x.transpose(0, 2, 1, 3) for x in host)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(out.get(), want, atol=2e-5)


def test_device_argument_and_environment_variable(queue, monkeypatch):
    from portattn.backends import opencl_runtime

    label = opencl_runtime.choose()
    q, k, v = _inputs()
    want = _reference(q, k, v)
    np.testing.assert_allclose(portattn.attention(q, k, v, backend="opencl", device=label), want, atol=2e-5)
    monkeypatch.setenv(opencl_runtime.ENVIRONMENT_VARIABLE, label.removeprefix("opencl:"))
    assert opencl_runtime.choose() == label
    np.testing.assert_allclose(portattn.attention(q, k, v, backend="opencl"), want, atol=2e-5)


def test_unknown_devices_are_named_errors(queue, monkeypatch):
    from portattn.backends import opencl_runtime

    q, k, v = _inputs()
    with pytest.raises(ValueError, match="matches no OpenCL device; found: opencl:"):
        opencl_runtime.choose("opencl:9:9")
    monkeypatch.setenv(opencl_runtime.ENVIRONMENT_VARIABLE, "no-such-device")
    with pytest.raises(ValueError, match="PORTATTN_OPENCL_DEVICE 'no-such-device' matches no OpenCL device"):
        opencl_runtime.choose()
    with pytest.raises(ValueError, match="device must be None or an OpenCL device"):
        portattn.attention(q, k, v, backend="opencl", device="cuda:0")


def test_other_backends_refuse_device_argument(queue):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="numba computes where the data lives"):
        portattn.attention(q, k, v, backend="numba", device="opencl:0:0")


def test_float64_is_refused_with_its_reason(queue):
    q, k, v = (x.astype(np.float64) for x in _inputs())
    with pytest.raises(ValueError, match="dtype float64 is not supported; opencl takes"):
        portattn.attention(q, k, v, backend="opencl")


def test_programs_are_built_once_per_options(queue):
    from portattn.backends import opencl_runtime

    q, k, v = _inputs()
    portattn.attention(q, k, v, backend="opencl")
    before = opencl_runtime.program.cache_info().misses
    portattn.attention(q, k, v, backend="opencl")
    assert opencl_runtime.program.cache_info().misses == before


@pytest.mark.parametrize(
    "head_dim, chunk, causal",
    [(128, 32, False), (128, 64, True), (72, 16, True)],
    ids=["d128-chunk32", "d128-chunk64-causal", "d72-chunk16-causal"],
)
def test_forward_staging_head_dim_chunks(queue, head_dim, chunk, causal):
    """The forward that stages K and V a chunk of head-dim columns at a time (the plan GPUs with small
    local memory get at large head dims) matches the whole-row one and the reference; forced here on
    the default device, whose own plan stages all columns."""
    from portattn.api import prepare
    from portattn.backends import registry
    from portattn.tiling import opencl as rules

    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 37, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 53, head_dim)).astype(np.float32) for _ in range(2))
    call = prepare(q, k, v, backend="opencl", causal=causal)
    plan = registry()["opencl"].retile(call.plan, {"head_dim_chunk": chunk})
    assert plan is not None and rules.forward_grid(plan, head_dim).chunk == chunk
    assert plan.sram_bytes < call.plan.sram_bytes  # the K^T buffer holds a chunk, not all of D
    out = dataclasses.replace(call, plan=plan).forward(q, k, v)[0]
    want = reference.attention_forward(q, k, v, scale=head_dim**-0.5, causal=causal)[0]
    np.testing.assert_allclose(out, want, atol=3e-5)
