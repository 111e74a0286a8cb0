"""Throughput against sequence length, one PNG per (head dim, mask, pass, dtype), from a bench record;
for decoding, bandwidth per (batch, keys) point, one PNG per (head dim, dtype, cache layout, GQA group).

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
    if any(r.problem.decoding for r in results):
        return _plot_decoding(record, results, path)
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
        mask = "causal" if causal else "no mask"
        title = f"D = {d}, {mask}, {mode}, {dtype}, {_sizes(results, key)}"
        written.append(_draw(record, groups[key], file, title, xlabel="sequence length N", ylabel=unit, log_x=True))
    return written


def _plot_decoding(record: dict, results: list[Result], path) -> list[Path]:
    """Decoding: GB/s (the cache read) per (batch, keys) point, one figure per (head dim, dtype, cache
    layout, GQA group): ``<stem>-d<D>-<dtype>-<contiguous|paged16>-g<group>.png``."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.gbps is not None:
            p = r.problem
            key = (p.head_dim, p.dtype, p.page_size, p.heads // (p.kv_heads or p.heads))
            groups[key][(r.role, r.name)].append(((p.batch, p.seqlen), r.gbps))
    path = Path(path)
    written = []
    for (d, dtype, page, group), series in sorted(groups.items()):
        layout = f"paged{page}" if page else "contiguous"
        file = path.with_name(f"{path.stem}-d{d}-{dtype}-{layout}-g{group}{path.suffix or '.png'}")
        title = f"decoding, D = {d}, {dtype}, {layout} cache, GQA group {group}"
        written.append(_draw(record, series, file, title, xlabel="batch x keys", ylabel="GB/s (K/V read once)",
                             log_x=False))
    return written


def _draw(record: dict, series: dict, file: Path, title: str, *, xlabel: str, ylabel: str, log_x: bool) -> Path:
    """One figure: a line per contender (portattn solid, peers dashed) over ``series`` {(role, name):
    [(x, y)]}; x is a number (log2 axis) or a (batch, keys) pair (categorical, in order)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xs = sorted({x for points in series.values() for x, _ in points})
    position = {x: x if log_x else i for i, x in enumerate(xs)}
    for (role, name), points in sorted(series.items(), key=lambda item: (item[0][0] != "portattn", item[0][1])):
        points.sort()
        style = dict(linestyle="-", marker="o", linewidth=2) if role == "portattn" else dict(linestyle="--", marker="s", linewidth=1.2)
        axes.plot([position[x] for x, _ in points], [y for _, y in points], label=name if role == "peer" else f"portattn {name}",
                  **style)
    if log_x:
        axes.set_xscale("log", base=2)
    axes.set_xticks([position[x] for x in xs], [str(x) if log_x else f"{x[0]}x{x[1] // 1024}k" for x in xs],
                    rotation=0 if log_x else 45)
    axes.minorticks_off()
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.set_title(f"{record.get('device', {}).get('name', '?')}\n{title}", fontsize=10)
    axes.legend(fontsize=8)
    file.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(file, dpi=120)
    return file
