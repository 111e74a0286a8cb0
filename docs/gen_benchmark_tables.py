"""Print the markdown tables of docs/benchmarks.md from the JSON files under benchmarks/results/.

    python docs/gen_benchmark_tables.py benchmarks/results/cpu-epyc-*.json
    python docs/gen_benchmark_tables.py benchmarks/results/h100-flash-grid-*.json   # benchmarks/flash_grid.py output
    python docs/gen_benchmark_tables.py benchmarks/results/h100-opencl-peers.json   # benchmarks/opencl_peers.py output

A ``portattn bench`` record (``results``) gives one throughput table; a ``benchmarks/opencl_peers.py``
record (``opencl_device``) one table against torch on the same device; a ``benchmarks/flash_grid.py``
record gives a TFLOP/s table against the peers (``peers``) or the planner-sweep table (``sweep``).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    """A ``portattn bench`` record: one row per (D, mask, pass, N), a throughput column per backend and
    peer (TFLOP/s on GPUs, GFLOP/s on CPUs, as the record's ``unit`` says), then each portattn
    backend's ratio to the best peer on that row."""
    record = json.load(open(path))
    unit = record.get("unit", "GFLOP/s")
    scale = 1e-3 if unit == "TFLOP/s" else 1.0
    rows = defaultdict(dict)
    for r in record["results"]:
        rows[(r["head_dim"], r["causal"], r["mode"], r["seqlen"])][r["backend"]] = r
    backends = sorted({b for row in rows.values() for b in row}, key=lambda b: (b.startswith("torch"), b))
    ours = [b for b in backends if not b.startswith("torch")]
    header = ("| D | causal | mode | N | " + " | ".join(backends) + " | "
              + " | ".join(f"{b} / best peer" for b in ours) + " | best peer |")
    lines = [f"`{record['command']}` -- {record['date']}, {record['device']['name']}, " + ", ".join(
        f"{k} {v}" for k, v in record["versions"].items() if v), "", f"{unit}:", "", header,
        "|" + "---|" * (header.count("|") - 1)]
    for (d, causal, mode, n), row in sorted(rows.items()):
        cells = [f"{row[b]['gflops'] * scale:.1f}" if b in row and row[b]["gflops"] else "-" for b in backends]
        ratios = [f"{row[b]['ratio_to_best_peer']:.2f}x" if b in row and row[b]["ratio_to_best_peer"] else "-" for b in ours]
        best = next((r["best_peer"] for r in row.values() if r.get("best_peer")), "-")
        lines.append(f"| {d} | {int(causal)} | {mode} | {n} | " + " | ".join(cells + ratios) + f" | {best} |")
    return "\n".join(lines)


def opencl_table(record: dict) -> str:
    """A ``benchmarks/opencl_peers.py`` record: the opencl backend against torch on the same device."""
    device = record["opencl_device"]
    peak = f"; fp32 FMA peak {record['fp32_peak_tflops']} TFLOP/s" if record.get("fp32_peak_tflops") else ""
    peers = sorted({name for row in record["rows"] for name in row["peers_s"]})
    # end to end (one call, then wait) against each peer timed the same way, where the record has both clocks
    waited = [p for p in peers if any(row.get("peers_host_s", {}).get(p) and row["peers_host_s"] != row["peers_s"]
                                      for row in record["rows"])]
    header = "| dtype | (B, H, N, D) | causal | opencl TFLOP/s | " + " | ".join(f"{p} TFLOP/s" for p in peers) + " | " + \
        " | ".join(f"opencl / {p}" for p in peers) + "".join(f" | end to end / {p}" for p in waited) + " | plan |"
    lines = [f"`{record['command']}` -- {record['date']}, {device['name']} ({device['platform']}, driver {device['driver']}, "
             f"{device['local_mem_bytes'] // 1024} KiB local memory){peak}; peers on {record['peer_device']}; "
             + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v), "", header,
             "|" + "---|" * (header.count("|") - 1)]
    for row in record["rows"]:
        ours = row["flops"] / row["opencl_s"] / 1e12
        rates = [f"{row['flops'] / row['peers_s'][p] / 1e12:.2f}" if row["peers_s"].get(p) else "-" for p in peers]
        ratios = [f"{row['peers_s'][p] / row['opencl_s']:.2f}x" if row["peers_s"].get(p) else "-" for p in peers]
        ratios += [f"{row['peers_host_s'][p] / row['opencl_host_s']:.2f}x" if row.get("peers_host_s", {}).get(p) else "-"
                   for p in waited]
        plan = row["plan"].split(", 1 stages")[0].split(", head dim")[0]
        chunk = " (K/V in chunks of " + row["plan"].split("staged ")[1].split(" ")[0] + ")" if "staged" in row["plan"] else ""
        lines.append(f"| {row['dtype']} | {tuple(row['shape'])} | {int(row['causal'])} | {ours:.2f} | "
                     + " | ".join(rates + ratios) + f" | {plan}{chunk} |")
    return "\n".join(lines)


def _provenance(record: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
    return f"`{record['command']}` -- {record['date']}, {record['device']}, {versions}"


PEERS = ("sdpa-flash", "sdpa-cudnn", "flex", "sdpa-efficient", "sdpa-math")
PEER_LABELS = {"sdpa-flash": "flash", "sdpa-cudnn": "cuDNN", "flex": "flex", "sdpa-efficient": "efficient", "sdpa-math": "math"}
# the peers each backend is held against (its issue's comparison), in the order of the ratio columns
RATIO_PEERS = {"triton": ("sdpa-flash", "flex", "sdpa-cudnn"), "cupy": ("sdpa-efficient", "sdpa-flash")}


def peers_table(record: dict) -> str:
    backend = record["peers"][0].get("backend", "triton")  # records before --backend timed triton
    ours = f"portattn-{backend}"
    present = {name for row in record["peers"] for name in row["tflops"]}
    columns = (ours, *(p for p in PEERS if p in present))
    ratio_peers = [p for p in RATIO_PEERS.get(backend, PEERS) if p in present]
    header = ("| D | causal | mode | N | " + " | ".join(columns) + " | "
              + " | ".join(f"{backend} / {PEER_LABELS[p]}" for p in ratio_peers) + " |")
    lines = [_provenance(record), "", "TFLOP/s:", "", header, "|" + "---|" * (header.count("|") - 1)]
    for row in sorted(record["peers"], key=lambda r: (r["mode"], r["D"], r["causal"], r["N"])):
        cells = [f"{row['tflops'][c]:.0f}" if c in row["tflops"] else "-" for c in columns]
        ratios = [f"{row['ratios'][c]:.2f}x" if c in row["ratios"] else "-" for c in ratio_peers]
        lines.append(f"| {row['D']} | {int(row['causal'])} | {row['mode']} | {row['N']} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def _config(config: dict) -> str:
    if "block_q" in config:
        return f"{config['block_q']}x{config['block_k']} w{config['warps']} s{config['stages']}"
    def backward(name):  # "backward.<field>"; records written before the BackwardPlan type say "backward_<field>"
        return config[f"backward.{name}"] if f"backward.{name}" in config else config[f"backward_{name}"]

    dq = "sep" if backward("dq_separate") else "atomic"
    return (f"{backward('block_k')}x{backward('block_q')} w{backward('warps')} "
            f"s{backward('stages')} dQ {dq}")


def sweep_table(record: dict) -> str:
    header = "| pass | D | causal | N | plan | plan ms | best swept | best ms | plan / best speed | configs |"
    lines = [_provenance(record), "", header, "|" + "---|" * (header.count("|") - 1)]
    for row in sorted(record["sweep"], key=lambda r: (r["mode"], r["D"], r["causal"], r["N"])):
        timed = sum(1 for t in row["trials"] if t["ms"])
        lines.append(f"| {row['mode']} | {row['D']} | {int(row['causal'])} | {row['N']} | {_config(row['plan'])} | "
                     f"{row['plan_ms']:.3f} | {_config(row['best'])} | {row['best_ms']:.3f} | "
                     f"{row['plan_fraction_of_best']:.3f} | {timed} |")
    return "\n".join(lines)


def sparsity_table(record: dict) -> str:
    """A ``benchmarks/sparsity.py`` record: block-sparse and window runs against the dense one."""
    shape = record["shape"]
    lines = [f"`{record['command']}` -- {record['date']}, {record['device']}, backend {record['backend']}, "
             f"{record['dtype']}, (B, H, N, D) = ({shape['batch']}, {shape['heads']}, {shape['seqlen']}, {shape['head_dim']}), "
             + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v), "",
             "| mode | run | ms | speed-up over dense |", "|---|---|---|---|"]
    for row in record["results"]:
        lines.append(f"| {row['mode']} | {row['variant']} | {row['seconds'] * 1e3:.2f} | {row['speedup_vs_dense']:.2f}x |")
    lines += ["", *(f"{variant}: refused -- {why}" for variant, why in record.get("refused", {}).items())]
    return "\n".join(lines).rstrip()


def render(path: str) -> str:
    record = json.load(open(path))
    if "results" in record and record["results"] and "variant" in record["results"][0]:
        return sparsity_table(record)
    if "results" in record:
        return table(path)
    if "opencl_device" in record:
        return opencl_table(record)
    parts = [peers_table(record)] if record.get("peers") else []
    if record.get("sweep"):
        parts.append(sweep_table(record))
    return "\n\n".join(parts)


if __name__ == "__main__":
    print("\n\n".join(render(path) for path in sys.argv[1:]))
