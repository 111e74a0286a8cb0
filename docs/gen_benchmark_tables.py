"""Print the markdown tables of docs/benchmarks.md from the JSON files under benchmarks/results/.

    python docs/gen_benchmark_tables.py benchmarks/results/cpu-epyc-*.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    record = json.load(open(path))
    rows = defaultdict(dict)
    for r in record["results"]:
        rows[(r["head_dim"], r["causal"], r["mode"], r["seqlen"])][r["backend"]] = r
    backends = sorted({b for row in rows.values() for b in row}, key=lambda b: (b.startswith("torch"), b))
    header = "| D | causal | mode | N | " + " | ".join(f"{b} GFLOP/s" for b in backends) + " | portattn / best peer |"
    lines = [f"`{record['command']}` -- {record['date']}, {record['device']['name']}, " + ", ".join(
        f"{k} {v}" for k, v in record["versions"].items() if v), "", header, "|" + "---|" * (header.count("|") - 1)]
    for (d, causal, mode, n), row in sorted(rows.items()):
        ratios = [f"{r['ratio_to_best_peer']:.2f}x" for r in row.values() if r["role"] == "portattn" and r["ratio_to_best_peer"]]
        cells = [f"{row[b]['gflops']:.1f}" if b in row and row[b]["gflops"] else "-" for b in backends]
        lines.append(f"| {d} | {int(causal)} | {mode} | {n} | " + " | ".join(cells) + f" | {', '.join(ratios)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n\n".join(table(path) for path in sys.argv[1:]))
