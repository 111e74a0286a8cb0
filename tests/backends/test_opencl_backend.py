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
    from portattn.backends.opencl import runtime as opencl_runtime

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
    from portattn.backends.opencl import runtime as opencl_runtime

    label = opencl_runtime.choose()
    q, k, v = _inputs()
    want = _reference(q, k, v)
    np.testing.assert_allclose(portattn.attention(q, k, v, backend="opencl", device=label), want, atol=2e-5)
    monkeypatch.setenv(opencl_runtime.ENVIRONMENT_VARIABLE, label.removeprefix("opencl:"))
    assert opencl_runtime.choose() == label
    np.testing.assert_allclose(portattn.attention(q, k, v, backend="opencl"), want, atol=2e-5)


def test_unknown_devices_are_named_errors(queue, monkeypatch):
    from portattn.backends.opencl import runtime as opencl_runtime

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
    from portattn.backends.opencl import runtime as opencl_runtime

    q, k, v = _inputs()
    portattn.attention(q, k, v, backend="opencl")
    before = opencl_runtime.program.cache_info().misses
    portattn.attention(q, k, v, backend="opencl")
    assert opencl_runtime.program.cache_info().misses == before


def test_repeated_pyopencl_calls_reuse_checks_but_not_wrong_ones(queue):
    """A pyopencl call's checks and plan are kept for the next call of the same shapes, dtypes and queue
    (api._call_key); a call that differs is checked afresh, and its errors are raised, never served."""
    from portattn import api

    host = _inputs()
    q, k, v = (cla.to_device(queue, x) for x in host)
    portattn.attention(q, k, v, backend="opencl")
    assert api._call_key(q, k, v, False, None, "opencl", "bhnd") in api._PREPARED
    np.testing.assert_allclose(portattn.attention(q, k, v, backend="opencl").get(), _reference(*host), atol=2e-5)
    wider = cla.to_device(queue, np.zeros((1, 2, 37, 32), np.float32))
    with pytest.raises(ValueError, match="head dim"):
        portattn.attention(q, wider, v, backend="opencl")
    half = cla.to_device(queue, host[1].astype(np.float16))
    with pytest.raises(TypeError, match="different dtypes"):
        portattn.attention(q, half, v, backend="opencl")


def test_scalar_arguments_are_declared_to_pyopencl(queue, monkeypatch):
    """Kernels are made with their scalar argument types declared, one per argument (pyopencl then packs
    the scalars itself: setting numpy scalars one by one cost 200 us of a call's host time)."""
    from portattn.backends.opencl import runtime as opencl_runtime

    made, original = [], opencl_runtime.kernel

    def kernel(context, options, name, scalar_dtypes=None):
        made.append((name, scalar_dtypes))
        return original(context, options, name, scalar_dtypes)

    monkeypatch.setattr(opencl_runtime, "kernel", kernel)
    q, k, v = (cla.to_device(queue, x) for x in _inputs())
    portattn.attention(q, k, v, backend="opencl")
    (name, scalar_dtypes), = made
    assert name == "attention_forward" and len(scalar_dtypes) == 33
    assert scalar_dtypes[:5] == (None,) * 5 and set(scalar_dtypes[5:17]) == {np.dtype(np.int64)}


# (rows x column vectors per work-item, loop order, chunk): the forward's register tiles beyond 4 x 1
# (4 x 2 in the CPU order, a 10 s build on PoCL, runs with --full-grid: the conformance suite runs that order)
TILE_CASES = [pytest.param(8, 1, "gpu", "smallest", id="8x1-gpu-chunked"),
              pytest.param(4, 2, "cpu", 0, id="4x2-cpu", marks=pytest.mark.full_grid),
              pytest.param(8, 2, "gpu", 0, id="8x2-gpu")]


@pytest.mark.parametrize("rows, vectors, target, chunk", TILE_CASES)
def test_forward_register_tiles(queue, rows, vectors, target, chunk):
    """Taller and wider work-item tiles (the plan's ``item_rows`` x ``item_vectors``) match the reference
    on a causal problem whose lengths are no multiple of any tile (row and key padding, per-score checks
    on the diagonal tiles), forced on the default device whatever its own plan chose."""
    from portattn.api import prepare
    from portattn.backends import registry
    from portattn.backends.opencl import plan as rules

    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 2, 37, 40)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 53, 40)).astype(np.float32) for _ in range(2))
    call = prepare(q, k, v, backend="opencl", causal=True)
    vw = call.plan.vector_width
    tn = 2  # two work-items per row, so their column vectors interleave
    changes = {"block_q": rows * 4, "block_k": vectors * vw * tn, "item_rows": rows, "item_vectors": vectors}
    grid = rules.forward_grid(dataclasses.replace(call.plan, **changes), 40)
    if chunk == "smallest":
        chunk = next(c for c in range(grid.piece, grid.head_dim_padded, grid.piece)
                     if grid.head_dim_padded % c == 0)
    plan = dataclasses.replace(registry()["opencl"].retile(call.plan, {**changes, "head_dim_chunk": chunk}), target=target)
    forward = rules.forward_grid(plan, 40)
    assert (forward.rm, forward.cn, forward.rows, forward.cols) == (rows, vectors, rows * 4, vectors * vw * tn)
    out, lse = dataclasses.replace(call, plan=plan).forward(q, k, v)
    want, want_lse = reference.attention_forward(q, k, v, scale=40**-0.5, causal=True)[:2]
    np.testing.assert_allclose(out, want, atol=3e-5, err_msg=f"{rows} x {vectors} tile, {target} loop order")
    np.testing.assert_allclose(lse, want_lse, atol=3e-5)


# (head dim, causal, chunk: smallest / largest / 0 = none, loop order): each build costs 20-50 s on PoCL, so
# the default run keeps the two chunked GPU-order builds (the paths GPUs with small local memory take) and
# --full-grid adds the CPU order and the unchunked one (which test_forward_register_tiles also reaches)
CHUNK_CASES = [
    pytest.param(128, False, "largest", "gpu", id="d128-largest-gpu"),
    pytest.param(72, True, "smallest", "gpu", id="d72-causal-smallest-gpu"),
    pytest.param(128, False, "smallest", "cpu", id="d128-smallest-cpu", marks=pytest.mark.full_grid),
    pytest.param(72, True, 0, "gpu", id="d72-causal-whole-gpu", marks=pytest.mark.full_grid),
]


@pytest.mark.parametrize("head_dim, causal, which, target", CHUNK_CASES)
def test_forward_chunks_and_loop_orders(queue, head_dim, causal, which, target):
    """The forward that stages K and V a chunk of head-dim columns at a time (the plan GPUs with small
    local memory get at large head dims), with either loop order of the tile products (GPU plans put
    accumulator pieces inside), matches the reference: forced on the default device whatever its own
    plan chose, so CI's PoCL runs the GPU code paths too."""
    from portattn.api import prepare
    from portattn.backends import registry
    from portattn.backends.opencl import plan as rules

    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 37, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 53, head_dim)).astype(np.float32) for _ in range(2))
    call = prepare(q, k, v, backend="opencl", causal=causal)
    backend = registry()["opencl"]
    whole = backend.retile(call.plan, {"head_dim_chunk": 0})
    grid = rules.forward_grid(whole, head_dim)
    chunks = [c for c in range(grid.piece, grid.head_dim_padded, grid.piece) if grid.head_dim_padded % c == 0]
    assert chunks, f"head dim {head_dim} padded to {grid.head_dim_padded} has no chunk of {grid.piece} columns"
    want = reference.attention_forward(q, k, v, scale=head_dim**-0.5, causal=causal)[0]
    chunk = {"smallest": chunks[0], "largest": chunks[-1]}.get(which, which)
    plan = dataclasses.replace(backend.retile(call.plan, {"head_dim_chunk": chunk}), target=target)
    forward = rules.forward_grid(plan, head_dim)
    assert forward.chunk == (chunk or grid.head_dim_padded) and forward.pieces_inner == (target == "gpu")
    if chunk:
        assert plan.sram_bytes < whole.sram_bytes  # the K^T buffer holds a chunk, not all of D
    out = dataclasses.replace(call, plan=plan).forward(q, k, v)[0]
    np.testing.assert_allclose(out, want, atol=3e-5, err_msg=f"chunk {chunk}, {target} loop order")


@pytest.mark.parametrize("head_dim, aligned", [(40, True), (111, False)])
def test_quads_move_whole_only_when_every_row_is_aligned(queue, head_dim, aligned):
    """ALIGNED (quads of elements as single 16- or 8-byte global accesses) is set exactly when every row
    of the call's arrays starts a multiple of 4 elements into its buffer; the conformance suite runs
    both kernels (D = 111 is the unaligned one), so here only the choice is checked."""
    from portattn.api import prepare
    from portattn.backends.opencl.launch import Call
    from portattn.extras import NONE

    q, k, v = _inputs((1, 2, 37, head_dim))
    call = prepare(q, k, v, backend="opencl")
    state = Call(call.backend._label(call.spec), q, call.spec, NONE)
    arrays = [state.upload(x) for x in (q, k, v)]
    state.align(*arrays, state.empty(q.shape))
    assert state.options[-1] == f"-DALIGNED={int(aligned)}"


@pytest.mark.parametrize("tile", [None, (64, 16, 32, "gpu"), (64, 32, 0, "gpu")], ids=["plan", "64x16-chunked", "64x32-tn8"])
def test_planned_local_memory_is_what_the_kernels_take(queue, tile):
    """The planner's local-memory sums (O3), which decide what fits a device, equal what the compiled
    forward and backward kernels report (CL_KERNEL_LOCAL_MEM_SIZE), for the device's own plan and for
    GPU-shaped grids (K^T in chunks; eight work-items per row, whose row partials need wider padding).
    PoCL reports the declared bytes; NVIDIA's compiler adds a few of its own (4 to a kernel declaring
    256 B, 16 to the forward), which the planner leaves room for (DRIVER_LOCAL_BYTES)."""
    from portattn.api import prepare
    from portattn.backends import registry
    from portattn.backends.opencl import plan as rules
    from portattn.backends.opencl import runtime as opencl_runtime
    from portattn.backends.opencl.launch import Call
    from portattn.extras import NONE

    q, k, v = _inputs((1, 2, 37, 128))
    call = prepare(q, k, v, backend="opencl")
    plan = call.plan
    if tile is not None:
        rows, cols, chunk, target = tile
        changes = {"block_q": rows, "block_k": cols, "head_dim_chunk": chunk, "vector_width": 4, "item_rows": 4,
                   "item_vectors": 1}
        plan = dataclasses.replace(registry()["opencl"].retile(plan, changes), target=target)
    if tile == (64, 32, 0, "gpu"):
        assert rules.forward_grid(plan, 128).tn == 8
    options = Call(call.backend._label(call.spec), q, call.spec, NONE).options + ("-DALIGNED=1",)
    size = cl.kernel_work_group_info.LOCAL_MEM_SIZE
    spare = 0 if queue.device.type & cl.device_type.CPU else rules.DRIVER_LOCAL_BYTES
    for grid, name, planned in ((rules.forward_grid(plan, 128), "attention_forward", plan.sram_bytes),
                                (rules.backward_grid(plan, 128), "attention_backward_dq", None),
                                (rules.backward_grid(plan, 128), "attention_backward_dkdv", None)):
        kernel = opencl_runtime.kernel(queue.context, grid.options() + options, name)
        local = kernel.get_work_group_info(size, queue.device)
        if planned is not None:
            assert planned == grid.forward_local_bytes() <= local <= planned + spare, name
        else:
            assert grid.backward_local_bytes() == plan.backward.sram_bytes, name
            assert local <= plan.backward.sram_bytes + spare, name


# (Nq, Nk): a few queries against more keys, the ``decoding`` feature (Nq <= 16 < Nk)
DECODING_CASES = [(nq, nk) for nq in (1, 4, 16) for nk in (78, 1000)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal-bottom-right"])
@pytest.mark.parametrize("nq, nk", DECODING_CASES, ids=[f"{nq}q{nk}k" for nq, nk in DECODING_CASES])
def test_decoding_runs_the_plain_kernels_without_key_splits(queue, nq, nk, causal):
    """Decoding-shaped calls are run, not refused: the ordinary kernels with a plan of one key split
    (the forward's work-group walks all of its keys), forward and backward (through autograd, GQA,
    bottom-right causal as a KV cache has it) against the float64 reference backend."""
    torch = pytest.importorskip("torch")
    from portattn.api import prepare

    gen = torch.Generator().manual_seed(nq * 1009 + nk)
    make = lambda heads, n: torch.randn(2, heads, n, 64, generator=gen)  # noqa: E731
    q, k, v, grad = make(4, nq), make(2, nk), make(2, nk), make(4, nq)
    options = {"causal": causal, "align": "bottom-right" if causal else "top-left"}
    call = prepare(q, k, v, backend="opencl", **options)
    assert "decoding" in call.spec.features and call.plan.key_splits == 1
    got = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = portattn.attention(*got, backend="opencl", return_lse=True, **options)
    out.backward(grad)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    want, want_lse = portattn.attention(*ref, backend="reference", return_lse=True, **options)
    want.backward(grad.double())
    np.testing.assert_allclose(out.detach().numpy(), want.detach().numpy(), atol=3e-5, rtol=1e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse.numpy(), atol=3e-5, rtol=1e-5)
    for name, x, r in zip(("dq", "dk", "dv"), got, ref):
        np.testing.assert_allclose(x.grad.numpy(), r.grad.numpy(), atol=1e-4, rtol=1e-4, err_msg=name)


def test_cpu_forward_plans_take_two_column_vectors_per_work_item():
    """O1: a CPU device's forward work-items own 4 rows x 2 VW-vectors (``CPU_ITEM_VECTORS``), so its tile is
    128 x 2 VW with one work-item per row (O6); GPU plans keep 4 x 1, and the backward stays 4 x 1 float4."""
    from portattn.backends.opencl import plan as rules
    from portattn.devices import CATALOG, DeviceSpec
    from portattn.spec import AttentionSpec

    spec = AttentionSpec(1, 8, 2048, 2048, 64)
    cpu = DeviceSpec(name="pthread-test", vendor="amd", kind="cpu", arch="opencl-3.0", compute_units=2, simd_width=8,
                     sram_per_block=1 << 20, sram_per_unit=1 << 20, registers_per_unit=256,
                     max_registers_per_thread=256, max_threads_per_block=4096, matrix_units=(),
                     compute_capability=None, has_async_copy=False, hardware_threads=2)
    p = rules.plan(spec, cpu)
    grid = rules.forward_grid(p, 64)
    assert (p.vector_width, p.item_rows, p.item_vectors) == (8, 4, rules.CPU_ITEM_VECTORS) == (8, 4, 2)
    assert (grid.tm, grid.tn, grid.rows, grid.cols, grid.pieces_inner) == (32, 1, rules.CPU_ROWS, 16, False)
    assert "4 rows x 16 columns" in p.reasons[0]
    assert rules.backward_grid(p, 64).cn == 1 and rules.backward_grid(p, 64).vw == 4
    for name in ("h100", "mi300x"):
        gpu = rules.plan(AttentionSpec(2, 16, 2048, 2048, 128, dtype="float16"), CATALOG[name])
        assert (gpu.vector_width, gpu.item_rows, gpu.item_vectors) == (4, 4, 1)
