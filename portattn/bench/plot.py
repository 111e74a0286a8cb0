"""Throughput against sequence length, one PNG per (head dim, mask, pass, dtype), from a bench record.

matplotlib is imported here only (``--plot`` is optional); figures are drawn on ``Figure`` objects
with the Agg canvas, never through pyplot's global state. portattn's backends are solid lines,
peers dashed, so the comparison reads at a glance.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .report import unit_for
from .run import Result


def require_matplotlib() -> None:
    """Raise ``RuntimeError`` with the install line when matplotlib is missing (checked before a run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"--plot needs matplotlib: pip install matplotlib ({error})") from error


def figure_paths(path, keys) -> dict:
    """{key: file}: ``path`` itself for a single figure, else ``<stem>-d<D>-<full|causal>-<fwd|fwdbwd>.png``
    beside it (with ``-<dtype>`` when the record holds more than one dtype)."""
    path = Path(path)
    keys = sorted(keys)
    if len(keys) == 1:
        return {keys[0]: path}
    several_dtypes = len({key[3] for key in keys}) > 1
    suffix = path.suffix or ".png"
    paths = {}
    for d, causal, mode, dtype in keys:
        name = f"{path.stem}-d{d}-{'causal' if causal else 'full'}-{mode.replace('+', '')}"
        paths[(d, causal, mode, dtype)] = path.with_name(name + (f"-{dtype}" if several_dtypes else "") + suffix)
    return paths


def _sizes(results: list[Result], key) -> str:
    """How B and H were chosen for a figure's problems: fixed, or flash-attention's B·N = const."""
    problems = {r.problem for r in results if (r.problem.head_dim, r.problem.causal, r.problem.mode, r.problem.dtype) == key}
    batches, heads = {p.batch for p in problems}, {p.heads for p in problems}
    tokens = {p.batch * p.seqlen for p in problems}
    h = "H = " + "/".join(str(x) for x in sorted(heads))
    if len(batches) == 1:
        return f"B = {batches.pop()}, {h}"
    return f"B·N = {tokens.pop()}, {h}" if len(tokens) == 1 else f"B varies, {h}"


def plot(record: dict, results: list[Result], path) -> list[Path]:
    """Draw the record's timed rows; returns the files written (none when nothing was timed)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    unit = unit_for(record.get("device", {}).get("kind", "cpu"))
    scale = 1e3 if unit == "TFLOP/s" else 1.0
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.gflops is not None:
            p = r.problem
            groups[(p.head_dim, p.causal, p.mode, p.dtype)][(r.role, r.name)].append((p.seqlen, r.gflops / scale))
    written = []
    for key, file in figure_paths(path, groups.keys()).items():
        d, causal, mode, dtype = key
        figure = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        seqlens = set()
        for (role, name), points in sorted(groups[key].items(), key=lambda item: (item[0][0] != "portattn", item[0][1])):
            points.sort()
            seqlens.update(n for n, _ in points)
            style = dict(linestyle="-", marker="o", linewidth=2) if role == "portattn" else dict(linestyle="--", marker="s", linewidth=1.2)
            axes.plot([n for n, _ in points], [y for _, y in points], label=name if role == "peer" else f"portattn {name}", **style)
        axes.set_xscale("log", base=2)
        axes.set_xticks(sorted(seqlens), [str(n) for n in sorted(seqlens)])
        axes.minorticks_off()
        axes.set_xlabel("sequence length N")
        axes.set_ylabel(unit)
        axes.set_ylim(bottom=0)
        axes.grid(True, alpha=0.3)
        mask = "causal" if causal else "no mask"
        device = record.get("device", {}).get("name", "?")
        axes.set_title(f"{device}\nD = {d}, {mask}, {mode}, {dtype}, {_sizes(results, key)}", fontsize=10)
        axes.legend(fontsize=8)
        file.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(file, dpi=120)
        written.append(file)
    return written
