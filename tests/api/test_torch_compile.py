"""portattn under torch.compile, torch.library.opcheck and CUDA graphs: the custom ops of
``portattn/torch_ops.py``, what ``portattn.attention`` runs while it is traced.

On CPU tensors the numba backend (and opencl where its kernels build); the CUDA tests (triton, cupy)
skip without a GPU and run on the GPU machine.
"""

from __future__ import annotations

import inspect

import pytest

import portattn

torch = pytest.importorskip("torch", reason="torch.compile needs torch")
pytest.importorskip("numba", reason="the CPU tests run the numba backend")

from torch.library import opcheck  # noqa: E402

from portattn import torch_ops  # noqa: E402
from portattn.autograd import NOT_TWICE  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def qkv(b=1, h=2, nq=24, nk=None, d=16, kv_heads=None, dtype=torch.float32, device="cpu", grad=True, layout="bhnd"):
    gen = torch.Generator().manual_seed(0)
    shape = lambda heads, n: (b, n, heads, d) if layout == "bnhd" else (b, heads, n, d)  # noqa: E731
    q = torch.randn(shape(h, nq), generator=gen)
    k, v = (torch.randn(shape(kv_heads or h, nk or nq), generator=gen) for _ in range(2))
    return tuple(x.to(device=device, dtype=dtype).requires_grad_(grad) for x in (q, k, v))


class Block(torch.nn.Module):
    """A projection, portattn's attention, a projection: what a model's attention layer compiles into."""

    def __init__(self, d=16, **options):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)
        self.options = options

    def forward(self, q, k, v):
        return self.proj(portattn.attention(self.proj(q), k, v, **self.options))


def grads_of(fn, q, k, v):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    return out, grads


def assert_close(got, want, atol=1e-5, rtol=1e-5):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def _usable(name):  # a backend by name, or a skip with its own reasons (as conftest's usable_backend)
    from portattn.backends import registry

    backend = registry()[name]
    if not backend.usable:
        pytest.skip(f"{name} is not usable here: " + "; ".join(backend.unavailable_reasons()))
    return name


CPU_BACKENDS = ["numba", "opencl", "triton"]  # triton: its CPU interpreter (TRITON_INTERPRET=1 without a GPU)


def _cpu_backend(name):
    if name == "triton":
        from portattn.backends.triton import launch

        if not launch.interpreting():
            pytest.skip("triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1, set without a GPU)")
    return _usable(name)


# ------------------------------------------------------------------------------------------------
# torch.compile on CPU tensors


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fullgraph_compile_matches_eager_forward_and_backward(backend):
    backend = _cpu_backend(backend)
    torch.manual_seed(0)
    block = Block(causal=True, backend=backend)
    q, k, v = qkv()
    want, want_grads = grads_of(block, q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)  # inductor: a graph break or an untraceable call raises
    got, got_grads = grads_of(compiled, q, k, v)
    assert_close((got, *got_grads), (want, *want_grads))


def test_no_graph_break_and_the_op_is_in_the_graph():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(Block(causal=True, backend="numba"))(*qkv())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    code = "\n".join(graph.code for graph in explanation.graphs)
    assert "portattn.attention_forward" in code


def _graph_ops(fn, *args):
    """The ops of the forward and backward graphs AOTAutograd makes of ``fn``."""
    seen = []

    def collect(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    out = torch.compile(fn, backend=aot_autograd(fw_compiler=collect, bw_compiler=collect), fullgraph=True)(*args)
    out.sum().backward()
    return seen


def test_compiled_backward_runs_the_backward_op():
    ops = _graph_ops(lambda q, k, v: portattn.attention(q, k, v, causal=True, backend="numba"), *qkv())
    assert "portattn.attention_forward.default" in ops and "portattn.attention_backward.default" in ops


@pytest.mark.parametrize("options", [
    dict(layout="bnhd", causal=True, scale=0.3),
    dict(kv_heads=1, align="bottom-right", causal=True, nk=40),
    dict(window=(5, 0), softcap=20.0),
    dict(mask="bool", alibi=True),
    dict(mask="additive", key_padding=True),
    dict(dropout_p=0.2, dropout_seed=7),
    dict(dtype=torch.float64, causal=True),
    dict(dtype=torch.bfloat16),
], ids=["bnhd-scale", "gqa-bottom-right", "window-softcap", "bool-mask-alibi", "additive-mask-padding", "dropout",
        "float64", "bfloat16"])
def test_compiled_features_match_eager(options):
    options = dict(options)
    shape = {name: options.pop(name) for name in ("kv_heads", "nk", "dtype") if name in options}
    q, k, v = qkv(**shape, layout=options.get("layout", "bhnd"))
    nq, nk = 24, shape.get("nk", 24)
    gen = torch.Generator().manual_seed(1)
    if options.pop("mask", None) == "bool":
        options["attn_mask"] = torch.rand(nq, nk, generator=gen) > 0.3
    elif "key_padding" in options:
        options["attn_mask"] = torch.randn(1, 2, nq, nk, generator=gen).to(q.dtype)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.tensor([0.5, 0.25])
    if options.pop("key_padding", False):
        options["key_padding_mask"] = torch.arange(nk)[None] < nk - 3
    fn = lambda q, k, v: portattn.attention(q, k, v, backend="numba", **options)  # noqa: E731
    want, want_grads = grads_of(fn, q, k, v)
    torch._dynamo.reset()
    got, got_grads = grads_of(torch.compile(fn, backend="aot_eager", fullgraph=True), q, k, v)
    tolerance = dict(atol=2e-2, rtol=2e-2) if q.dtype == torch.bfloat16 else {}
    assert_close((got, *got_grads), (want, *want_grads), **tolerance)


def test_compiled_return_lse_is_float32_and_not_differentiable():
    fn = lambda q, k, v: portattn.attention(q, k, v, backend="numba", return_lse=True)  # noqa: E731
    q, k, v = qkv(dtype=torch.float64)
    want_out, want_lse = fn(q, k, v)
    torch._dynamo.reset()
    out, lse = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 24) and not lse.requires_grad
    assert_close((out, lse), (want_out, want_lse))


def test_compiled_dynamic_shapes():
    """With dynamic=True the sizes are symbolic while traced: the checks wait for the real call."""
    fn = lambda q, k, v: portattn.attention(q, k, v, causal=True, backend="numba")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", dynamic=True, fullgraph=True)
    for n in (24, 40):
        q, k, v = qkv(nq=n)
        assert_close(grads_of(compiled, q, k, v)[1], grads_of(fn, q, k, v)[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(causal=1), r"causal must be True or False, got 1"),
    (dict(scale="big"), r"scale must be a finite number or None"),
    (dict(window=(4,)), r"window must be \(left, right\)"),
    (dict(window=(-3, 2)), r"window must be \(left, right\) with non-negative ints or None"),
    (dict(backend="nope"), r"unknown backend 'nope'"),
    (dict(align="bottom"), r"unknown causal alignment 'bottom'"),
    (dict(softcap=0.0), r"softcap must be a positive finite number"),
    (dict(dropout_p=0.1), r"dropout_p = 0.1 needs dropout_seed"),
    (dict(attn_mask=torch.ones(9, 10, dtype=torch.bool)), r"attn_mask has shape \(9, 10\); it must broadcast"),
    (dict(block_size=(16, 16)), r"block_size was given without block_mask"),
])
def test_compiled_calls_are_checked_while_traced(kwargs, message):
    q, k, v = qkv(grad=False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: portattn.attention(q, k, v, **kwargs), backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=message):
        compiled(q, k, v)


def test_the_traced_path_forwards_every_keyword():
    """``portattn.attention`` hands every keyword it has to ``torch_ops.attention`` when traced."""
    source = inspect.getsource(portattn.api.attention)
    hook = source[source.index("if _traced(q):"):source.index("features = dict(")]
    keywords = [name for name, p in inspect.signature(portattn.attention).parameters.items() if p.kind == p.KEYWORD_ONLY]
    missing = [name for name in keywords if f"{name}={name}" not in hook]
    assert not missing, f"portattn.attention's traced path drops {missing}"


def test_fake_tensors_take_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = (torch.empty(2, 3, 17, 8) for _ in range(3))
        out, lse = portattn.attention(q, k, v, layout="bnhd", backend="numba", return_lse=True)
    assert out.shape == (2, 3, 17, 8) and lse.shape == (2, 17, 3) and lse.dtype == torch.float32


def test_torch_export():
    q, k, v = qkv(grad=False)
    block = Block(causal=True, backend="numba")
    program = torch.export.export(block, (q, k, v))
    assert "portattn.attention_forward" in str(program.graph)
    assert_close((program.module()(q, k, v),), (block(q, k, v),))


# ------------------------------------------------------------------------------------------------
# opcheck: schema, fake implementation, autograd registration, AOT dispatch (static and dynamic)

def _op_args(q, k, v, masks=(None,) * 4, *, causal=False, scale=None, backend="numba", layout="bhnd",
             align="top-left", window=None, softcap=None, block_size=None, dropout_p=0.0, dropout_seed=None):
    return (q, k, v, *masks, causal, scale, backend, layout, align, window, softcap, block_size, dropout_p, dropout_seed,
            None, any(x.requires_grad for x in (q, k, v)), False)


def _opcheck_cases():
    q, k, v = qkv()
    gq, gk, gv = qkv(h=4, kv_heads=2, nk=31)
    bq, bk, bv = qkv(layout="bnhd")
    dq, dk, dv = qkv(dtype=torch.float64)
    mask = torch.rand(24, 24, generator=torch.Generator().manual_seed(2)) > 0.2
    slopes = torch.tensor([0.5, 0.25])
    return {
        "plain-causal": _op_args(q, k, v, causal=True),
        "gqa-bottom-right-window": _op_args(gq, gk, gv, causal=True, align="bottom-right", window=[8, -1]),
        "bnhd-scale": _op_args(*(x.transpose(1, 2) for x in (bq, bk, bv)), layout="bnhd", scale=0.3),
        "mask-alibi-softcap": _op_args(q, k, v, (mask.expand(1, 2, 24, 24), slopes.expand(1, 2), None, None),
                                       softcap=30.0),
        "float64-dropout": _op_args(dq, dk, dv, dropout_p=0.25, dropout_seed=3),
        "no-grad": _op_args(*(x.detach() for x in (q, k, v)), causal=True),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck_forward(case):
    opcheck(torch.ops.portattn.attention_forward.default, _opcheck_cases()[case])


def test_opcheck_backward():
    q, k, v = qkv(grad=False)
    args = _op_args(q, k, v, causal=True)
    out, lse = torch.ops.portattn.attention_forward(*args)
    grad_out = torch.randn_like(out)
    opcheck(torch.ops.portattn.attention_backward.default, (grad_out, q, k, v, out, lse, *args[3:]))


def test_fake_outputs_are_shaped_as_the_real_ones():
    for name, args in _opcheck_cases().items():
        real = torch.ops.portattn.attention_forward(*args)
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = torch.ops.portattn.attention_forward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                          for a in args))
        for r, f in zip(real, fake):
            assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), name


# ------------------------------------------------------------------------------------------------
# double backward: a clear error, never a silent wrong or missing gradient

@pytest.mark.parametrize("path", ["eager", "op", "compiled"])
def test_double_backward_raises(path):
    q, k, v = qkv()
    fn = lambda q, k, v: portattn.attention(q, k, v, causal=True, backend="numba")  # noqa: E731
    if path == "op":
        fn = lambda q, k, v: torch_ops.attention(q, k, v, causal=True, backend="numba")  # noqa: E731
    elif path == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = fn(q, k, v)
    dq, = torch.autograd.grad(out.sum(), q, create_graph=True)
    # compiled: AOTAutograd refuses double backward itself, with its own message
    message = "does not currently support double backward" if path == "compiled" else NOT_TWICE[:40]
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(dq.sum(), (q, k, v))
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(fn(q, k, v).sum(), q, create_graph=True)[0].sum().backward()
    assert NOT_TWICE.startswith("portattn's backward is not differentiable twice")


def test_single_backward_with_create_graph_still_gives_the_gradients():
    q, k, v = qkv()
    out = portattn.attention(q, k, v, backend="numba")
    with_graph = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    out = portattn.attention(q, k, v, backend="numba")
    assert_close(with_graph, torch.autograd.grad(out.sum(), (q, k, v)))


# ------------------------------------------------------------------------------------------------
# the eager path's cache: a repeated call with other metadata is checked and planned again

def test_repeated_calls_are_still_checked_and_replanned():
    q, k, v = qkv(grad=False)
    portattn.attention(q, k, v, backend="numba")
    with pytest.raises(TypeError, match="different dtypes"):
        portattn.attention(q, k.double(), v, backend="numba")
    with pytest.raises(ValueError, match="same sequence length"):
        portattn.attention(q, k, v[:, :, :5], backend="numba")
    q2, k2, v2 = qkv(nq=40, grad=False)
    want = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    torch.testing.assert_close(portattn.attention(q2, k2, v2, causal=True, backend="numba"), want, atol=1e-5, rtol=1e-5)
    half = portattn.attention(*(x.half() for x in (q, k, v)), backend="numba")
    assert half.dtype == torch.float16


def test_the_op_checks_too():
    q, k, v = qkv(grad=False)
    torch_ops.attention(q, k, v, backend="numba")
    with pytest.raises(TypeError, match="different dtypes"):
        torch_ops.attention(q, k.double(), v, backend="numba")
    with pytest.raises(TypeError, match="causal must be True or False"):
        torch_ops.attention(q, k, v, causal=1, backend="numba")


# ------------------------------------------------------------------------------------------------
# CUDA: compile and CUDA-graph capture (the GPU machine)

CUDA_BACKENDS = ["triton", "cupy"]


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_fullgraph_compile_matches_eager(backend):
    backend = _usable(backend)
    torch.manual_seed(0)
    block = Block(d=64, causal=True, backend=backend).to("cuda", torch.float16)
    q, k, v = qkv(h=4, nq=256, d=64, dtype=torch.float16, device="cuda")
    want, want_grads = grads_of(block, q, k, v)
    torch._dynamo.reset()
    got, got_grads = grads_of(torch.compile(block, fullgraph=True), q, k, v)
    assert_close((got, *got_grads), (want, *want_grads), atol=2e-2, rtol=2e-2)


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    backend = _usable(backend)
    fn = lambda q, k, v: portattn.attention(q, k, v, causal=True, backend=backend)  # noqa: E731
    static = [x.detach().clone() for x in qkv(h=8, nq=128, d=64, dtype=torch.float16, device="cuda")]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: the call's plan, kernel compilation, caches
        for _ in range(3):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        for x in static:
            x.copy_(torch.randn(x.shape, generator=gen, device="cuda", dtype=x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, fn(*static), atol=2e-3, rtol=2e-3)


@needs_cuda
def test_cuda_compile_reduce_overhead():
    """mode="reduce-overhead": inductor's CUDA graphs around the op."""
    backend = _usable("triton")
    fn = lambda q, k, v: portattn.attention(q, k, v, causal=True, backend=backend)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for seed in range(3):
        q, k, v = (x.detach() for x in qkv(h=8, nq=128, d=64, dtype=torch.float16, device="cuda"))
        q = q + seed
        torch.testing.assert_close(compiled(q, k, v).clone(), fn(q, k, v), atol=2e-3, rtol=2e-3)


@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_opcheck(backend):
    backend = _usable(backend)
    q, k, v = qkv(h=4, nq=64, d=64, dtype=torch.float16, device="cuda")
    opcheck(torch.ops.portattn.attention_forward.default, _op_args(q, k, v, causal=True, backend=backend))
