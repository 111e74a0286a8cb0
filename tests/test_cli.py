"""The ``portattn`` command: info, plan and a tiny bench, called through ``cli.main``."""

from __future__ import annotations

import json

import pytest

from portattn.cli import main
from portattn.devices.probe import probe_cpu


def test_info_names_the_cpu_and_numba(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert probe_cpu().name in out
    assert "numba" in out
    assert "reference" in out


def test_info_features_prints_a_capability_table(capsys):
    assert main(["info", "--features"]) == 0
    out = capsys.readouterr().out
    assert "capabilities:" in out and "head dims" in out
    assert "features:" in out and "block_sparse" in out and "dropout" in out


def test_plan_for_a_catalog_device_shows_block_sizes(capsys):
    assert main(["plan", "--device", "h100", "--seqlen", "4096", "--head-dim", "128"]) == 0
    out = capsys.readouterr().out
    assert "block " in out and "(q x k)" in out
    assert "H100" in out


def test_plan_for_an_unknown_device_exits_2_with_a_message(capsys):
    assert main(["plan", "--device", "no-such-gpu", "--seqlen", "128", "--head-dim", "64"]) == 2
    captured = capsys.readouterr()
    assert "unknown device 'no-such-gpu'" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_bench_writes_json_with_a_numba_row(tmp_path, capsys):
    pytest.importorskip("numba", reason="the numba backend needs numba (pip install 'portattn[numba]')")
    path = tmp_path / "r.json"
    argv = ["bench", "--device", "cpu", "--seqlen", "256", "--head-dim", "32", "--no-causal", "--repeats", "2", "--json", str(path)]
    assert main(argv) == 0
    assert "numba" in capsys.readouterr().out
    record = json.loads(path.read_text())
    assert record["device"]["name"] == probe_cpu().name
    assert {"python", "numpy", "torch", "triton", "cupy", "pyopencl", "numba", "portattn"} <= set(record["versions"])
    assert record["command"].endswith(" ".join(argv))
    assert "host clock" in record["timing"] and record["memory"] and record["complete"] is True
    numba_rows = [r for r in record["results"] if r["backend"] == "numba"]
    assert len(numba_rows) == 1
    row = numba_rows[0]
    assert (row["seqlen"], row["head_dim"], row["mode"], row["causal"]) == (256, 32, "fwd", False)
    assert row["median_ms"] > 0 and row["gflops"] > 0 and len(row["times_ms"]) == 2
    assert row["plan"].startswith("block ")
    assert row["clock"] == "host clock"
    if row["memory_bytes"] is not None:  # Linux: the call's output alone is 256 KiB
        assert row["memory_bytes"] >= 256 * 8 * 32 * 4


def test_bench_json_plot_and_redraw_from_json(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    pytest.importorskip("numba", reason="the numba backend needs numba (pip install 'portattn[numba]')")
    saved, drawn = tmp_path / "r.json", tmp_path / "plots" / "p.png"
    argv = ["bench", "--device", "cpu", "--seqlen", "64", "128", "--head-dim", "16", "--repeats", "2", "--no-peers",
            "--backend", "numba", "--json", str(saved), "--plot", str(drawn)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # both masks by default: one figure per (head dim, mask, mode), named after --plot
    figures = [tmp_path / "plots" / "p-d16-full-fwd.png", tmp_path / "plots" / "p-d16-causal-fwd.png"]
    for figure in figures:
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
        assert f"wrote {figure}" in out
    assert not drawn.exists()
    record = json.loads(saved.read_text())
    assert {(r["seqlen"], r["causal"]) for r in record["results"] if r["backend"] == "numba"} == {
        (64, False), (128, False), (64, True), (128, True)}

    again = tmp_path / "again.png"
    assert main(["bench", "--from-json", str(saved), "--plot", str(again), "--plans"]) == 0
    out = capsys.readouterr().out
    assert "numba" in out and "GFLOP/s" in out and "block " in out
    assert (tmp_path / "again-d16-full-fwd.png").exists() and (tmp_path / "again-d16-causal-fwd.png").exists()


def test_bench_dtypes_time_one_grid_per_dtype_and_the_table_names_each(tmp_path, capsys):
    """``--dtypes`` is not decoding's alone: attention's grid is timed in each dtype, and the table's dtype
    column tells the rows apart (it used to drop every dtype but the default, silently)."""
    pytest.importorskip("numba", reason="the numba backend needs numba (pip install 'portattn[numba]')")
    saved = tmp_path / "r.json"
    argv = ["bench", "--device", "cpu", "--seqlen", "64", "--head-dim", "16", "--repeats", "2", "--no-peers", "--causal",
            "--backend", "numba", "--dtypes", "float32", "bfloat16", "--json", str(saved)]
    assert main(argv) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("numba ")]
    assert [line[6] for line in lines] == ["float32", "bfloat16"]
    record = json.loads(saved.read_text())
    assert [r["dtype"] for r in record["results"] if r["backend"] == "numba"] == ["float32", "bfloat16"]


def test_bench_decode_times_the_kvcache_entry_contiguous_and_paged(tmp_path, capsys):
    """``--decode``: attention_with_kvcache on a contiguous and a paged cache (pages shuffled) against
    the CPU peer, rated in GB/s; the record keeps the decoding fields, and redraws from JSON."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    pytest.importorskip("numba", reason="the numba backend needs numba (pip install 'portattn[numba]')")
    saved, drawn = tmp_path / "d.json", tmp_path / "d.png"
    argv = ["bench", "--device", "cpu", "--decode", "--batch", "2", "--seqlen", "96", "--head-dim", "32", "--group", "4",
            "--page-size", "0", "16", "--repeats", "2", "--json", str(saved), "--plot", str(drawn)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and "decode paged 16" in out
    rows = [r for r in json.loads(saved.read_text())["results"] if r["backend"] == "numba"]
    assert {(r["mode"], r["seqlen_q"], r["seqlen"], r["heads"], r["kv_heads"], r["page_size"]) for r in rows} == {
        ("decode", 1, 96, 32, 8, 0), ("decode", 1, 96, 32, 8, 16)}
    for row in rows:
        assert row["error"] is None and row["gbps"] > 0
        assert row["bytes_moved"] == 4 * (2 * 2 * 32 * 1 * 32 + 2 * 2 * 8 * 96 * 32)
    for layout in ("contiguous", "paged16"):
        assert (tmp_path / f"d-d32-float32-{layout}-g4.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "--from-json", str(saved)]) == 0
    assert "decode paged 16" in capsys.readouterr().out


def test_paged_cache_pages_are_shuffled_and_found_by_the_table():
    import numpy as np

    from portattn import bench

    cache = np.arange(2 * 48 * 3 * 4, dtype=np.float32).reshape(2, 48, 3, 4)
    pages, same, table = bench.paged_cache(cache, cache, 16)
    assert pages.shape == (6, 16, 3, 4) and table.shape == (2, 3) and table.dtype == np.int32
    assert sorted(table.ravel().tolist()) == list(range(6)) and table.ravel().tolist() != list(range(6))
    for b in range(2):
        np.testing.assert_array_equal(np.concatenate([pages[slot] for slot in table[b]]), cache[b])
    with pytest.raises(ValueError, match="divides"):
        bench.paged_cache(cache, cache, 10)


def test_bench_from_json_rejects_a_file_that_is_not_a_record(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"peers": []}')
    assert main(["bench", "--from-json", str(other)]) == 2
    assert "not a portattn bench record" in capsys.readouterr().err


def test_bench_shows_why_a_backend_refuses_and_goes_on(capsys):
    pytest.importorskip("numba", reason="the numba backend needs numba (pip install 'portattn[numba]')")
    # cupy takes CUDA tensors only: on CPU inputs it refuses, here and on a GPU machine alike
    argv = ["bench", "--device", "cpu", "--seqlen", "64", "--head-dim", "16", "--no-causal", "--repeats", "2", "--no-peers",
            "--backend", "numba", "cupy", "--plans"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    cupy = [line for line in lines if line.startswith("cupy ")]
    numba = [line for line in lines if line.startswith("numba ")]
    assert len(cupy) == 1 and "not run: backend 'cupy' cannot run" in cupy[0] and "cupy runs on cuda" in cupy[0]
    assert len(numba) == 1 and "not run" not in numba[0] and "block " in numba[0]


def test_bench_a_contender_that_raises_anything_becomes_a_row(monkeypatch):
    from portattn import bench

    problem = bench.Problem(1, 2, 64, 16, False, "float32", "fwd")
    calls = []

    def flaky_fn():
        calls.append(1)
        if len(calls) > 3:
            raise MemoryError("out of memory on the fourth call")

    def fake_timed(name, problem, inputs):
        if name == "broken":
            raise KeyError("not a ValueError: setup raised something else")
        fn = flaky_fn if name == "flaky" else (lambda: None)
        return bench.Timed(fn, bench.HostClock(), None, lambda: (123, "counted"), plan=f"plan of {name}")

    monkeypatch.setattr(bench.run, "portattn_timed", fake_timed)
    results = bench.run_problem(problem, ["broken", "flaky", "fine"], [], device="cpu", repeats=4, warmup=1)
    broken, flaky, fine = results
    assert "not a ValueError" in broken.error and not broken.times_s
    assert flaky.error == "out of memory on the fourth call" and not flaky.times_s
    assert fine.error is None and len(fine.times_s) == 4 and fine.memory_bytes == 123 and fine.plan == "plan of fine"
    table = bench.format_table(results)
    assert "not run: out of memory on the fourth call" in table and "123 B" in table


def test_bench_default_grids():
    from portattn import bench

    gpu = bench.default_grid("cuda")
    assert len(gpu) == 6 * 2 * 2 * 2
    assert {p.dtype for p in gpu} == {"float16"} and {p.mode for p in gpu} == {"fwd", "fwd+bwd"}
    assert {p.causal for p in gpu} == {False, True}
    assert all(p.batch * p.seqlen == 16384 and p.heads * p.head_dim == 2048 for p in gpu)
    cpu = bench.default_grid("cpu")
    assert {(p.batch, p.heads, p.dtype, p.mode) for p in cpu} == {(1, 8, "float32", "fwd")}
    assert sorted({p.seqlen for p in cpu}) == [512, 1024, 2048, 4096] and {p.causal for p in cpu} == {False, True}
    quick = bench.default_grid("cpu", quick=True)
    assert [(p.seqlen, p.head_dim, p.causal, p.mode) for p in quick] == [(512, 64, False, "fwd"), (1024, 64, False, "fwd"), (2048, 64, False, "fwd")]
    causal_only = bench.default_grid("cuda", quick=True, masks=(True,), heads=4)
    assert {(p.batch, p.heads, p.causal) for p in causal_only} == {(1, 4, True)}
    assert bench.Problem(2, 32, 8192, 64, True, "float16", "fwd").label() == "2x32x8192x64-causal-fwd"
    decode = bench.decode_grid("cuda")
    assert {p.mode for p in decode} == {"decode"} and {p.page_size for p in decode} == {0, 16}
    assert {p.heads // p.kv_heads for p in decode} == {1, 4, 8} and {p.dtype for p in decode} == {"float16", "bfloat16"}
    assert max(p.seqlen for p in decode if p.batch == 1) == 131072
    assert all(2 * p.batch * p.kv_heads * p.seqlen * p.head_dim * 2 <= bench.problems.DECODE_MAX_CACHE_BYTES for p in decode)
    assert decode[0].label() == "1x32q32kv-1x1024x64-decode"
    assert bench.Problem(8, 32, 4096, 128, False, "float16", "decode", 1, 8, 16).label() == "8x32q8kv-1x4096x128-decode-paged16"
    with pytest.raises(ValueError, match="does not divide"):
        bench.decode_grid("cpu", groups=(5,))


def test_bench_figure_names():
    from pathlib import Path

    from portattn.bench.plot import figure_paths

    one = figure_paths("out/x.png", [(64, False, "fwd", "float16")])
    assert one == {(64, False, "fwd", "float16"): Path("out/x.png")}
    several = figure_paths("out/x.png", [(64, False, "fwd", "float16"), (128, True, "fwd+bwd", "float16")])
    assert several[(128, True, "fwd+bwd", "float16")] == Path("out/x-d128-causal-fwdbwd.png")
    assert several[(64, False, "fwd", "float16")] == Path("out/x-d64-full-fwd.png")


def test_bench_progress_line_per_problem_when_not_a_terminal(monkeypatch):
    import io

    from portattn import bench

    stream = io.StringIO()
    problems = bench.grid((32, 64), (16,), causal=False, modes=("fwd",), dtype="float32", heads=2)
    timed = bench.Timed(lambda: None, bench.HostClock(), None, lambda: (None, "n/a"))
    monkeypatch.setattr(bench.run, "portattn_timed", lambda name, problem, inputs: timed)
    bench.run_grid(problems, ["stub"], [], repeats=1, progress=bench.progress.ProgressBar(stream))
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("bench [1/2]") and "1x2x32x16-full-fwd" in lines[0]
    assert lines[1].startswith("bench [2/2]") and lines[2].startswith("bench: 2 problem(s)")
    assert "\r" not in stream.getvalue()


def test_process_peak_sees_a_call_that_allocates():
    from pathlib import Path

    import numpy as np

    from portattn import timing

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS is measured through Linux's /proc/self/clear_refs")
    size = 64 * 2**20
    grown, how = timing.process_peak(lambda: np.ones(size // 8))
    assert grown >= size * 0.9, (grown, how)
    small, _ = timing.process_peak(lambda: None)
    assert small < size / 4


def test_opencl_buffers_counts_what_a_call_creates(usable_backend):
    usable_backend("opencl")  # skips with the backend's own reasons (no pyopencl, no device)
    import numpy as np

    from portattn import timing
    from portattn.backends.opencl import runtime as opencl_runtime

    queue = opencl_runtime.queue_for(opencl_runtime.choose())
    import pyopencl as cl
    import pyopencl.array as cla

    made, how = timing.opencl_buffers(lambda: (cla.empty(queue, (1000,), np.float32), cla.zeros(queue, (24,), np.float64)), queue)
    assert made == 4000 + 192 and "pyopencl.Buffer" in how
    assert cl.Buffer.__name__ == "Buffer"  # restored


def test_bench_ratios_and_table_without_timing():
    from portattn import bench

    problem = bench.Problem(1, 8, 1024, 64, False, "float32", "fwd")
    mine = bench.Result("numba", "portattn", problem, times_s=[0.02, 0.02, 0.03], plan="block 64x64")
    peer = bench.Result("torch-sdpa-flash", "peer", problem, times_s=[0.01])
    skipped = bench.Result("other", "portattn", problem, error="cannot run it")
    results = [mine, peer, skipped]
    bench.add_ratios(results)
    assert mine.ratio_to_best_peer == pytest.approx(0.5)
    assert peer.ratio_to_best_peer == pytest.approx(1.0)
    assert mine.gflops == pytest.approx(problem.flops / 0.02 / 1e9)
    table = bench.format_table(results)
    assert "0.50x" in table and "not run: cannot run it" in table and "block 64x64" in table


def test_time_callable_warms_up_then_times_each_repeat():
    from portattn import bench

    calls = []
    times = bench.time_callable(lambda: calls.append(1), 3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_time_interleaved_gives_slow_contenders_fewer_repeats_and_keeps_errors():
    from portattn import bench

    order = []
    errors = {}

    def bad():
        raise RuntimeError("second line follows\n  - the reason")

    times = bench.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b"), "bad": bad},
                                   {"a": 3, "b": 1, "bad": 2}, warmup=0, errors=errors)
    assert order == ["a", "b", "a", "a"]
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 1, "bad": 0}
    assert errors == {"bad": "second line follows the reason"}
    assert bench.repeats_within(0.5, 30, budget_s=3.0) == 6
    assert bench.repeats_within(2.0, 30, budget_s=3.0) == 5 and bench.repeats_within(0.001, 30, budget_s=3.0) == 30


def test_device_clock_times_short_calls_back_to_back():
    import time

    from portattn import bench

    calls = []

    def two_ms():
        calls.append(1)
        time.sleep(0.002)

    clock = bench.HostClock(None, "host clock + sync", target_s=0.01)
    first = clock(two_ms)  # one call, which sizes the batch
    assert len(calls) == 1 and first >= 0.002 and 2 <= clock.calls <= 5
    per_call = clock(two_ms)
    assert len(calls) == 1 + clock.calls and 0.002 <= per_call < first * 3
    assert clock.name == f"host clock + sync, {clock.calls} calls back to back per timing"
    plain = bench.HostClock()
    plain(two_ms), plain(two_ms)
    assert plain.calls == 1 and plain.name == "host clock"


def test_time_interleaved_takes_turns():
    from portattn import bench

    order = []
    times = bench.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 2, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a"]
    assert {name: len(t) for name, t in times.items()} == {"a": 2, "b": 2}


def test_decode_peer_packs_gqa_queries_and_matches_enable_gqa():
    """``bench --decode``'s SDPA peer calls SDPA as engines do, the G query heads of a KV group as G x Nq
    rows against the cache's own heads (K/V read once, not repeated to H heads): the same result as
    enable_gqa, and the same as portattn's KV-cache call on those inputs."""
    torch = pytest.importorskip("torch")
    import numpy as np

    import portattn
    from portattn.bench.contenders import Inputs
    from portattn.bench.peers import peer_timed
    from portattn.bench.problems import decode_grid

    problem = decode_grid("cpu", batches=(2,), seqlens=(300,), head_dims=(32,), groups=(4,), dtypes=("float32",),
                          page_sizes=(0,), queries=3)[0]
    inputs = Inputs(problem, "cpu")
    q, k, v, _ = inputs.torch()
    got = peer_timed("torch-sdpa-flash", problem, inputs).fn()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert problem.kv_heads < problem.heads and tuple(got.shape) == tuple(q.shape)
    np.testing.assert_allclose(got.numpy(), portattn.attention(q.numpy(), k.numpy(), v.numpy()), atol=1e-5)
