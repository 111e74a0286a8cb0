"""The ``portattn`` command: info, plan and a tiny bench, called through ``cli.main``."""

from __future__ import annotations

import json

import pytest

from portattn.cli import main
from portattn.tiling.probe import probe_cpu


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
    argv = ["bench", "--seqlen", "256", "--head-dim", "32", "--repeats", "2", "--json", str(path)]
    assert main(argv) == 0
    assert "numba" in capsys.readouterr().out
    record = json.loads(path.read_text())
    assert record["device"]["name"] == probe_cpu().name
    assert {"python", "numpy", "torch", "numba", "portattn"} <= set(record["versions"])
    assert record["command"].endswith(" ".join(argv))
    numba_rows = [r for r in record["results"] if r["backend"] == "numba"]
    assert len(numba_rows) == 1
    row = numba_rows[0]
    assert (row["seqlen"], row["head_dim"], row["mode"]) == (256, 32, "fwd")
    assert row["median_ms"] > 0 and row["gflops"] > 0
    assert row["plan"].startswith("block ")


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


def test_time_interleaved_takes_turns():
    from portattn import bench

    order = []
    times = bench.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 2, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a"]
    assert {name: len(t) for name, t in times.items()} == {"a": 2, "b": 2}
