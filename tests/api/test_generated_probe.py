"""A generated probe: hundreds of bad calls across every argument, array kind and backend, each raising
``ValueError``/``TypeError`` that names the argument before any kernel runs; and valid edge calls
(broadcasts, strides, empty axes, huge windows, extreme but finite scales) against the float64
reference.

Each bad call is one mutation of a valid call: (argument, what it is set to, the words the error must
contain). The grid is every mutation x {numpy, torch} x every backend name, so a check that exists
for one path only (torch's cache key, a backend's own refusal) cannot hide.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import portattn
from portattn.backends import registry

torch = pytest.importorskip("torch", reason="the probe builds torch tensors beside numpy arrays")

BACKENDS = ["auto", "reference", "numba", "triton", "opencl", "cupy"]
KINDS = ["numpy", "torch"]
Q, KV = (1, 2, 9, 16), (1, 2, 11, 16)


def _array(shape, kind, dtype="float32", fill=None):
    x = np.random.default_rng(len(shape)).standard_normal(shape).astype(dtype) if fill is None else np.full(shape, fill, dtype)
    return torch.from_numpy(x) if kind == "torch" else x


def _bool(shape, kind):
    x = np.ones(shape, bool)
    return torch.from_numpy(x) if kind == "torch" else x


# (name, builder(kind) -> keyword changes, words the message must contain); q/k/v changes use "q", "k", "v"
MUTATIONS = [
    ("q 3-D", lambda kind: {"q": _array((2, 9, 16), kind)}, "q must be 4-D"),
    ("q 5-D", lambda kind: {"q": _array((1, 1, 2, 9, 16), kind)}, "q must be 4-D"),
    ("k 3-D", lambda kind: {"k": _array((2, 11, 16), kind)}, "k must be 4-D"),
    ("v 2-D", lambda kind: {"v": _array((11, 16), kind)}, "v must be 4-D"),
    ("k dtype", lambda kind: {"k": _array(KV, kind, "float64")}, "dtypes"),
    ("v dtype", lambda kind: {"v": _array(KV, kind, "float16")}, "dtypes"),
    ("q int", lambda kind: {"q": _array(Q, kind, "int32"), "k": _array(KV, kind, "int32"), "v": _array(KV, kind, "int32")}, "dtype"),
    ("head dim", lambda kind: {"k": _array((1, 2, 11, 8), kind), "v": _array((1, 2, 11, 8), kind)}, "head dim"),
    ("batch", lambda kind: {"k": _array((2, 2, 11, 16), kind), "v": _array((2, 2, 11, 16), kind)}, "batch"),
    ("k v heads", lambda kind: {"v": _array((1, 1, 11, 16), kind)}, "same number of heads"),
    ("k v length", lambda kind: {"v": _array((1, 2, 10, 16), kind)}, "sequence length"),
    ("gqa", lambda kind: {"q": _array((1, 3, 9, 16), kind)}, "multiple"),
    ("kv no heads", lambda kind: {"k": _array((1, 0, 11, 16), kind), "v": _array((1, 0, 11, 16), kind)}, "0 heads"),
    ("no batch", lambda kind: {"q": _array((0, 2, 9, 16), kind), "k": _array((0, 2, 11, 16), kind),
                                "v": _array((0, 2, 11, 16), kind)}, "empty"),
    ("mixed kinds", lambda kind: {"k": _array(KV, "numpy" if kind == "torch" else "torch")}, "array types"),
    ("causal int", lambda kind: {"causal": 1}, "causal"),
    ("causal str", lambda kind: {"causal": "yes"}, "causal"),
    ("causal list", lambda kind: {"causal": [True]}, "causal"),
    ("causal none", lambda kind: {"causal": None}, "causal"),
    ("scale nan", lambda kind: {"scale": float("nan")}, "scale"),
    ("scale inf", lambda kind: {"scale": float("inf")}, "scale"),
    ("scale str", lambda kind: {"scale": "0.1"}, "scale"),
    ("scale bool", lambda kind: {"scale": True}, "scale"),
    ("scale huge", lambda kind: {"scale": 1e300}, "scale"),
    ("scale list", lambda kind: {"scale": [0.25]}, "scale"),
    ("layout", lambda kind: {"layout": "nhbd"}, "layout"),
    ("layout int", lambda kind: {"layout": 3}, "layout"),
    ("layout list", lambda kind: {"layout": ["bhnd"]}, "layout"),
    ("align", lambda kind: {"align": "middle"}, "alignment"),
    ("align list", lambda kind: {"align": ["top-left"]}, "alignment"),
    ("align none", lambda kind: {"align": None}, "alignment"),
    ("window one side", lambda kind: {"window": (4,)}, "window"),
    ("window negative", lambda kind: {"window": (-2, 0)}, "window"),
    ("window float", lambda kind: {"window": (1.5, 0)}, "window"),
    ("window str", lambda kind: {"window": "4,0"}, "window"),
    ("window bool", lambda kind: {"window": (True, 0)}, "window"),
    ("mask shape", lambda kind: {"attn_mask": _bool((9, 12), kind)}, "attn_mask"),
    ("mask rank", lambda kind: {"attn_mask": _bool((1, 1, 2, 9, 11), kind)}, "attn_mask"),
    ("mask batch", lambda kind: {"attn_mask": _bool((3, 1, 9, 11), kind)}, "attn_mask"),
    ("mask int", lambda kind: {"attn_mask": _array((9, 11), kind, "int32")}, "attn_mask"),
    ("mask kind", lambda kind: {"attn_mask": _bool((9, 11), "numpy" if kind == "torch" else "torch")}, "attn_mask"),
    ("slopes shape", lambda kind: {"alibi_slopes": _array((3,), kind)}, "alibi_slopes"),
    ("slopes 3-D", lambda kind: {"alibi_slopes": _array((1, 2, 1), kind)}, "alibi_slopes"),
    ("slopes bool", lambda kind: {"alibi_slopes": _bool((2,), kind)}, "alibi_slopes"),
    ("softcap zero", lambda kind: {"softcap": 0.0}, "softcap"),
    ("softcap negative", lambda kind: {"softcap": -1.0}, "softcap"),
    ("softcap nan", lambda kind: {"softcap": float("nan")}, "softcap"),
    ("softcap huge", lambda kind: {"softcap": 1e300}, "softcap"),
    ("softcap str", lambda kind: {"softcap": "50"}, "softcap"),
    ("padding shape", lambda kind: {"key_padding_mask": _bool((1, 12), kind)}, "key_padding_mask"),
    ("padding float", lambda kind: {"key_padding_mask": _array((1, 11), kind)}, "key_padding_mask"),
    ("block mask shape", lambda kind: {"block_mask": _bool((2, 2), kind)}, "block_mask"),
    ("block mask float", lambda kind: {"block_mask": _array((1, 1), kind)}, "block_mask"),
    ("block size alone", lambda kind: {"block_size": (64, 64)}, "block_size"),
    ("block size odd", lambda kind: {"block_mask": _bool((1, 1), kind), "block_size": (48, 64)}, "block_size"),
    ("dropout negative", lambda kind: {"dropout_p": -0.1}, "dropout_p"),
    ("dropout one", lambda kind: {"dropout_p": 1.0}, "dropout_p"),
    ("dropout str", lambda kind: {"dropout_p": "0.1"}, "dropout_p"),
    ("dropout no seed", lambda kind: {"dropout_p": 0.1}, "dropout_seed"),
    ("dropout bad seed", lambda kind: {"dropout_p": 0.1, "dropout_seed": -3}, "dropout_seed"),
    ("dropout float seed", lambda kind: {"dropout_p": 0.1, "dropout_seed": 1.5}, "dropout_seed"),
    ("device", lambda kind: {"device": "gpu:0"}, "device"),
    ("device int", lambda kind: {"device": 0}, "device"),
]
BACKEND_MUTATIONS = [("backend unknown", {"backend": "cuda-magic"}, "backend"), ("backend list", {"backend": ["numba"]}, "backend"),
                     ("backend int", {"backend": 3}, "backend")]


@pytest.fixture(autouse=True)
def no_kernel_may_run(request, monkeypatch):
    """Bad calls must be refused before any backend's forward or backward runs."""
    if "bad" not in request.node.name:
        return

    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the bad call was refused")

    for backend in registry().values():
        monkeypatch.setattr(type(backend), "forward", forbidden)
        monkeypatch.setattr(type(backend), "backward", forbidden)


def _call(kind, backend, changes):
    arguments = {"q": _array(Q, kind), "k": _array(KV, kind), "v": _array(KV, kind), "backend": backend}
    arguments.update(changes)
    q, k, v = arguments.pop("q"), arguments.pop("k"), arguments.pop("v")
    return portattn.attention(q, k, v, **arguments)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,build,words", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_bad_call_is_refused_naming_the_argument(backend, kind, name, build, words):
    with pytest.raises((ValueError, TypeError)) as raised:
        _call(kind, backend, build(kind))
    message = str(raised.value)
    assert words in message, f"{name}: {message}"
    assert "unhashable" not in message and "Traceback" not in message


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,changes,words", BACKEND_MUTATIONS, ids=[m[0] for m in BACKEND_MUTATIONS])
def test_bad_backend_name_is_refused(kind, name, changes, words):
    with pytest.raises((ValueError, TypeError), match=words):
        _call(kind, "auto", changes)


def test_the_probe_is_large_enough():
    assert len(MUTATIONS) * len(KINDS) * len(BACKENDS) + len(BACKEND_MUTATIONS) * len(KINDS) >= 500


@pytest.mark.parametrize("kind", KINDS)
def test_bad_call_on_a_long_sequence_is_refused_fast(kind):
    """The checks read metadata only: a (1, 8, 32768, 64) call with a bad mask fails in well under 50 ms."""
    q = _array((1, 8, 32768, 64), kind, fill=0.0)
    mask = _bool((32768, 5), kind)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="attn_mask"):
        portattn.attention(q, q, q, attn_mask=mask, backend="numba")
    assert time.perf_counter() - start < 0.05


# --- valid edge calls against the float64 reference ---

def _expected(q, k, v, **options):
    as64 = [np.asarray(x, np.float64) for x in (q, k, v)]
    extra = {name: (np.asarray(x) if hasattr(x, "shape") else x) for name, x in options.items()}
    return portattn.attention(*as64, backend="reference", **extra)


EDGES = {
    "mask (Nk,)": lambda: dict(attn_mask=np.arange(11) % 3 != 0),
    "mask (Nq, 1)": lambda: dict(attn_mask=np.linspace(-1, 1, 9)[:, None].astype(np.float32)),
    "mask (1, 1)": lambda: dict(attn_mask=np.ones((1, 1), bool)),
    "mask (B, 1, 1, Nk)": lambda: dict(attn_mask=np.arange(11)[None, None, None] % 2 == 0),
    "mask (H, 1, Nk)": lambda: dict(attn_mask=np.random.default_rng(1).standard_normal((2, 1, 11)).astype(np.float32)),
    "window huge": lambda: dict(window=(2**40, 2**31)),
    "window zero": lambda: dict(window=(0, 0)),
    "causal window": lambda: dict(causal=True, window=(3, 0)),
    "bottom-right": lambda: dict(causal=True, align="bottom-right"),
    "scale tiny": lambda: dict(scale=1e-30),
    "scale large": lambda: dict(scale=50.0),
    "scale negative": lambda: dict(scale=-0.5),
    "softcap small": lambda: dict(softcap=0.5),
    "alibi": lambda: dict(alibi_slopes=np.array([0.5, 0.25], np.float32)),
    "padding": lambda: dict(key_padding_mask=np.arange(11)[None] < 7),
}
VIEWS = {
    "contiguous": lambda x: x,
    "transposed bnhd": None,  # handled in the test: layout="bnhd" views
    "reversed keys": lambda x: x[:, :, ::-1],
    "every other head dim": None,
}


@pytest.mark.parametrize("backend", ["numba", "triton", "opencl"])
@pytest.mark.parametrize("edge", list(EDGES))
@pytest.mark.parametrize("view", ["contiguous", "bnhd", "reversed"])
def test_valid_edge_call_matches_the_reference(usable_backend, backend, edge, view):
    usable_backend(backend)
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal(Q).astype(np.float32), *(rng.standard_normal(KV).astype(np.float32) for _ in range(2))
    options = EDGES[edge]()
    if view == "reversed":
        k, v = k[:, :, ::-1], v[:, :, ::-1]  # negative strides
    expected = _expected(q, k, v, **options)
    if view == "bnhd":
        got = portattn.attention(*(np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v)), layout="bnhd",
                                 backend=backend, **options).transpose(0, 2, 1, 3)
    else:
        got = portattn.attention(q, k, v, backend=backend, **options)
    np.testing.assert_allclose(got, expected, atol=3e-5, rtol=3e-5, err_msg=f"{backend} {edge} {view}")


@pytest.mark.parametrize("backend", ["numba", "triton", "opencl", "reference"])
@pytest.mark.parametrize("shape", [((1, 2, 0, 16), (1, 2, 11, 16)), ((1, 2, 9, 16), (1, 2, 0, 16))], ids=["no-queries", "no-keys"])
def test_empty_sequence_axes(usable_backend, backend, shape):
    usable_backend(backend)
    q = np.ones(shape[0], np.float32)
    k = v = np.ones(shape[1], np.float32)
    out, lse = portattn.attention(q, k, v, backend=backend, return_lse=True)
    assert out.shape == shape[0] and lse.shape == shape[0][:3]
    assert (out == 0).all() and np.isneginf(lse).all()
