"""Every bad input gets a clear error, raised before any kernel runs."""

from __future__ import annotations

import numpy as np
import pytest

import portattn
from portattn.backends import registry

torch = pytest.importorskip("torch", reason="device and dtype mismatches are built from torch tensors")


@pytest.fixture(autouse=True)
def no_kernel_may_run(monkeypatch):
    """Any backend's forward or backward running during these tests is a failure: checks come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    for backend in registry().values():
        monkeypatch.setattr(type(backend), "forward", forbidden)
        monkeypatch.setattr(type(backend), "backward", forbidden)


def arrays(*shapes, dtype=np.float32):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape).astype(dtype) for shape in shapes]


QKV = ((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16))


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), r"q must be 4-D .*got shape \(2, 8, 16\) \(3-D\)"),
        (((1, 2, 8, 16), (1, 2, 8, 16, 1), (1, 2, 8, 16)), r"k must be 4-D"),
        (((1, 2, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16)), r"batch size B .*got 1, 2, 2"),
        (((1, 2, 8, 16), (1, 3, 8, 16), (1, 3, 8, 16)), r"k and v have 3 heads and q has 2: the query heads must be a multiple"),
        (((1, 4, 8, 16), (1, 2, 8, 16), (1, 1, 8, 16)), r"k and v must have the same number of heads .*got 2 and 1"),
        (((1, 2, 8, 16), (1, 2, 8, 32), (1, 2, 8, 16)), r"head dim D .*got 16, 32, 16"),
        (((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), r"k has 8 keys, v has 9 values"),
        (((0, 2, 8, 16), (0, 2, 8, 16), (0, 2, 8, 16)), r"B, H and D must be >= 1"),
    ],
)
def test_shape_errors_name_the_argument(shapes, message):
    with pytest.raises(ValueError, match=message):
        portattn.attention(*arrays(*shapes))


def test_layout_is_part_of_the_shape_message():
    q, k, v = arrays((1, 8, 2, 16), (1, 9, 2, 32), (1, 9, 2, 32))
    with pytest.raises(ValueError, match=r"head dim D in layout 'bnhd' \(B, N, H, D\): got 16, 32, 32"):
        portattn.attention(q, k, v, layout="bnhd")


def test_dtype_mismatch():
    q, k, v = arrays(*QKV)
    with pytest.raises(TypeError, match=r"different dtypes \(q: float32, k: float16, v: float32\); cast them to one dtype"):
        portattn.attention(q, k.astype(np.float16), v)


def test_integer_dtype():
    q, k, v = (x.astype(np.int32) for x in arrays(*QKV))
    with pytest.raises(TypeError, match=r"dtype int32; portattn takes float64, float32, float16, bfloat16"):
        portattn.attention(q, k, v)


def test_not_an_array():
    q, k, v = arrays(*QKV)
    with pytest.raises(TypeError, match=r"q must be a numpy.ndarray or a torch.Tensor, got builtins.list"):
        portattn.attention(q.tolist(), k, v)


def test_mixed_array_kinds():
    q, k, v = arrays(*QKV)
    with pytest.raises(TypeError, match=r"different array types .*q: numpy, k: torch"):
        portattn.attention(q, torch.from_numpy(k), v)


def test_device_mismatch():
    q, k, v = (torch.from_numpy(x) for x in arrays(*QKV))
    with pytest.raises(ValueError, match=r"different devices \(q: cpu, k: meta, v: cpu\); move them to one device"):
        portattn.attention(q, k.to("meta"), v)


def test_no_backend_for_the_device():
    """A device no backend runs on is refused with every backend's reason (meta tensors themselves never get
    here: ``attention`` gives their shapes through the custom op's fake implementation, as SDPA does)."""
    from portattn import dispatch, inputs

    q, k, v = (torch.empty(shape, device="meta") for shape in QKV)
    spec = inputs.spec_from_arrays(q, k, v)
    with pytest.raises(ValueError, match=r"no backend can run .* on meta automatically:\n[\s\S]*numba: data is on meta; numba runs on cpu"):
        dispatch.select(spec, "auto")


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda-magic'; use 'auto' or one of: reference, numba"):
        portattn.attention(*arrays(*QKV), backend="cuda-magic")


def test_unknown_layout():
    with pytest.raises(ValueError, match=r"unknown layout 'nhd'; use 'bhnd' .*'bnhd'"):
        portattn.attention(*arrays(*QKV), layout="nhd")


@pytest.mark.parametrize("scale", ["0.1", float("nan"), float("inf"), True])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match=r"scale must be a finite number or None"):
        portattn.attention(*arrays(*QKV), scale=scale)


def test_causal_must_be_bool():
    with pytest.raises(TypeError, match=r"causal must be True or False, got 'yes'"):
        portattn.attention(*arrays(*QKV), causal="yes")


def test_refusal_lists_reasons_and_alternatives():
    pytest.importorskip("numba", reason="the refusal under test is numba's")
    q, k, v = arrays((1, 1, 4, 1100), (1, 1, 4, 1100), (1, 1, 4, 1100))
    with pytest.raises(ValueError) as error:
        portattn.attention(q, k, v, backend="numba")
    message = str(error.value)
    assert "backend 'numba' cannot run fp32-full-1x1x4x1100" in message
    assert "head dim 1100 is outside numba's range 1..1024" in message
    assert "backends that can: reference" in message


def test_explain_rejects_unknown_backend_too():
    with pytest.raises(ValueError, match="unknown backend"):
        portattn.explain(*arrays(*QKV), backend="nope")


def test_plan_for_unknown_device():
    with pytest.raises(ValueError, match=r"h900"):
        portattn.plan(seqlen_q=1024, head_dim=64, device="h900")


def test_spec_checks_its_own_fields():
    with pytest.raises(ValueError, match="head_dim must be a positive integer"):
        portattn.AttentionSpec(batch=1, heads=1, seqlen_q=4, seqlen_k=4, head_dim=0)
    with pytest.raises(TypeError, match="dtype 'int8' is not supported"):
        portattn.AttentionSpec(batch=1, heads=1, seqlen_q=4, seqlen_k=4, head_dim=8, dtype="int8")
