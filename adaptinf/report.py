"""A side-by-side report of every method's accuracy/cost trade-off: markdown tables, CSV/JSON, a plot.

matplotlib is imported only when `plot_tradeoff` draws (importing adaptinf stays light), and the figure
is drawn on an Agg canvas without touching pyplot's global backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adaptinf.evaluate import OperatingPoint, cheapest_within_drop, pareto_front, write_points

# Stable style per method: known methods first, in this order; others follow alphabetically.
KNOWN_METHODS = ("dense", "ee", "sweet", "multi-model", "sharcs", "acm", "planer")
_COLORS = (
    "#1f77b4",  # blue
    "#ff7f0e",  # orange
    "#2ca02c",  # green
    "#d62728",  # red
    "#9467bd",  # purple
    "#8c564b",  # brown
    "#e377c2",  # pink
    "#17becf",  # cyan
    "#bcbd22",  # olive
    "#7f7f7f",  # grey
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">", "p", "*")
_LINESTYLES = ("-", "--", ":", "-.")
_DASH = "—"


def method_order(methods) -> list[str]:
    """Known methods in their fixed order, then the others alphabetically."""
    ms = set(methods)
    return [m for m in KNOWN_METHODS if m in ms] + sorted(ms - set(KNOWN_METHODS))


def method_styles(methods) -> dict[str, tuple[str, str]]:
    """(color, marker) per method; known methods always get the same style, dense is a black star."""
    methods = list(methods)
    styles: dict[str, tuple[str, str]] = {"dense": ("black", "*")}
    for i, m in enumerate(KNOWN_METHODS[1:]):
        styles[m] = (_COLORS[i % len(_COLORS)], _MARKERS[i % len(_MARKERS)])
    offset = len(KNOWN_METHODS) - 1
    others = sorted(set(methods) - set(KNOWN_METHODS))
    for j, m in enumerate(others):
        k = offset + j
        styles[m] = (_COLORS[k % len(_COLORS)], _MARKERS[k % len(_MARKERS)])
    return {m: styles[m] for m in method_order(methods)}


def _sort_key(p: OperatingPoint):
    order = {m: i for i, m in enumerate(KNOWN_METHODS)}
    return (order.get(p.method, len(order)), p.method, p.model, p.gflops, p.knob if p.knob is not None else 0.0)


def _label(method: str, model: str) -> str:
    return model if model.startswith(method) else f"{method} ({model})"


# --- markdown --------------------------------------------------------------------------------------


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _num(v: float | None, fmt: str, suffix: str = "") -> str:
    return _DASH if v is None else f"{v:{fmt}}{suffix}"


def knob_label(p: OperatingPoint) -> str:
    """The point's knob as a table cell: "threshold=0.8", the bare value when the knob has no name,
    a dash for a point without a knob."""
    if p.knob is None:
        return _DASH
    return f"{p.knob_name}={p.knob:g}" if p.knob_name else f"{p.knob:g}"


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """The lines of a markdown table, cells escaped (a "|" kept inside its cell, newlines as spaces).

    align: one letter per column, "l" (left) or "r" (right); default the first three columns left,
    the others right."""
    align = align or "l" * min(3, len(header)) + "r" * (len(header) - 3)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align must give 'l' or 'r' for each of the {len(header)} columns, got {align!r}")
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return lines


def _points_table(points: list[OperatingPoint]) -> list[str]:
    header = [
        "method",
        "model",
        "knob",
        "accuracy (%)",
        "GFLOPs/sample",
        "FLOPs reduction",
        "latency b1 (ms)",
        "latency b32 (ms)",
        "speed-up b1",
        "speed-up b32",
        "realisation b32",
    ]
    rows = [
        [
            p.method,
            p.model,
            knob_label(p),
            f"{100 * p.accuracy:.2f}",
            f"{p.gflops:.3f}",
            _num(p.flops_reduction, ".2f", "×"),
            _num(p.latency_ms_b1, ".2f"),
            _num(p.latency_ms_b32, ".2f"),
            _num(p.speedup_b1, ".2f", "×"),
            _num(p.speedup_b32, ".2f", "×"),
            _num(p.realisation_b32, ".2f"),
        ]
        for p in points
    ]
    return markdown_table(header, rows)


def _front_table(points: list[OperatingPoint]) -> list[str]:
    header = ["method", "model", "knob", "accuracy (%)", "GFLOPs/sample", "FLOPs reduction"]
    rows = [
        [p.method, p.model, knob_label(p), f"{100 * p.accuracy:.2f}", f"{p.gflops:.3f}",
         _num(p.flops_reduction, ".2f", "×")]
        for p in points
    ]
    return markdown_table(header, rows)


def _within_drop_table(points: list[OperatingPoint], max_drop: float) -> list[str]:
    """The cheapest point per model within `max_drop` of dense, chosen on validation, shown on test."""
    try:
        picked = cheapest_within_drop(points, max_drop)
    except ValueError:
        return []
    header = ["method", "model", "knob", "val acc (%)", "test acc (%)", "test drop vs dense (pt)", "GFLOPs/sample",
              "FLOPs reduction", "speed-up b1", "speed-up b32", "realisation b32"]
    rows = [
        [t.method, t.model, knob_label(t), f"{100 * v.accuracy:.2f}", f"{100 * t.accuracy:.2f}",
         f"{100 * (d.accuracy - t.accuracy):+.2f}", f"{t.gflops:.3f}", _num(d.gflops / t.gflops if t.gflops else None, ".2f", "×"),
         _num(t.speedup_b1, ".2f", "×"), _num(t.speedup_b32, ".2f", "×"), _num(t.realisation_b32, ".2f")]
        for v, t, d in picked
    ]
    return [
        f"## Cheapest point within {100 * max_drop:g} accuracy point(s) of dense",
        "",
        "Chosen on the validation split (the knob with the fewest GFLOPs whose validation accuracy is at most "
        f"{100 * max_drop:g} point(s) below dense's), reported on test.",
        "",
        *(markdown_table(header, rows) if rows else ["No model has a point within this drop on validation."]),
        "",
    ]


def _exit_accuracy_table(points: list[OperatingPoint]) -> list[str]:
    """Each individual exit's accuracy, for models whose points carry `extras["exit_accuracy"]`."""
    seen: dict[tuple[str, str], OperatingPoint] = {}
    for p in points:
        if isinstance(p.extras.get("exit_accuracy"), list):
            seen.setdefault((p.method, p.model), p)
    if not seen:
        return []
    n = max(len(p.extras["exit_accuracy"]) for p in seen.values())
    header = ["method", "model", "exit layers", *[f"exit {i + 1} (%)" for i in range(n)]]
    rows = []
    for p in seen.values():
        acc = [f"{100 * a:.2f}" for a in p.extras["exit_accuracy"]]
        layers = p.extras.get("exit_layers")
        rows.append([p.method, p.model, ",".join(map(str, layers)) if layers else "-", *acc, *[""] * (n - len(acc))])
    return ["## Accuracy of each exit on its own", "", *markdown_table(header, rows), ""]


def render_markdown(
    points: list[OperatingPoint], title: str, split: str, notes: list[str] | None = None, plot: str | None = None,
    max_drop: float = 0.01,
) -> str:
    """The report's markdown: the points of `split` (sorted by method, model, GFLOPs), their Pareto
    front, each exit's own accuracy (early-exit models) and, when the points cover validation and
    test, the cheapest point per model within `max_drop` of dense; `plot` is the relative path of a
    figure to embed."""
    shown = sorted((p for p in points if p.split == split), key=_sort_key)
    sizes = sorted({p.n for p in shown})
    lines = [f"# {title}", ""]
    if notes:
        lines += [*notes, ""]
    lines += [
        f"Split: **{split}** ({', '.join(str(n) for n in sizes)} samples); "
        f"{len(shown)} operating points from {len({(p.method, p.model) for p in shown})} models.",
        "",
        "GFLOPs are analytic (padding excluded), averaged per sample. FLOPs reduction = dense GFLOPs / GFLOPs. "
        "Latencies are measured, in ms per batch of 1 or 32; speed-up = dense latency / latency (same run); "
        "realisation = measured speed-up at batch 32 / FLOPs reduction.",
        "",
        *([f"![accuracy vs cost]({plot})", ""] if plot else []),
        "## Operating points",
        "",
        *_points_table(shown),
        "",
        "## Pareto front (accuracy vs GFLOPs)",
        "",
        "Points no other point beats on both accuracy and GFLOPs, across all methods.",
        "",
        *_front_table(pareto_front(shown, x="gflops")),
        "",
        *_exit_accuracy_table(shown),
        *(_within_drop_table(points, max_drop) if split == "test" else []),
    ]
    return "\n".join(lines)


# --- plot ------------------------------------------------------------------------------------------


_AXIS_LABELS = {
    "gflops": "mean GFLOPs / sample",
    "latency_ms_b1": "latency at batch size 1 (ms / batch)",
    "latency_ms_b32": "latency at batch size 32 (ms / batch)",
}


def plot_tradeoff(points: list[OperatingPoint], path: str | Path, title: str = "", axes: tuple[str, ...] | None = None) -> Path:
    """Accuracy vs mean GFLOPs/sample, and vs latency at batch 1 and 32 where any point has one.

    One color+marker per method, one line per (method, model) sorted by cost, dense as a black star
    with a dashed line at its accuracy, the cross-method Pareto front as a faint grey step line.
    `axes` picks the panels (any of gflops, latency_ms_b1, latency_ms_b32; default all that have data).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(points, axes)
    styles = method_styles(p.method for p in points)
    lines = _model_lines(points, styles)
    width = 7.0 if len(panels) == 1 else 5.2 * len(panels)
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (x, xlabel) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        _draw_panel(ax, points, x, xlabel, lines, styles)
    handles = _legend_handles(points, lines, styles, [x for x, _ in panels])
    # as many legend columns as fit the figure's width (entry ~ handle + label at ~0.075 in/char)
    entry_in = 0.8 + 0.075 * max(len(lab) for _, lab in handles)
    ncol = max(1, min(len(handles), int(width // entry_in)))
    fig.legend(
        [h for h, _ in handles], [lab for _, lab in handles], loc="outside lower center", ncol=ncol, frameon=False
    )
    if title:
        fig.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, bbox_inches="tight")
    return out


def _panels(points: list[OperatingPoint], axes: tuple[str, ...] | None) -> list[tuple[str, str]]:
    """(cost axis, its label) per panel to draw: the axes asked for (default all) that have data."""
    if not points:
        raise ValueError("no operating points to plot")
    if axes is not None and not set(axes) <= set(_AXIS_LABELS):
        raise ValueError(f"plot_tradeoff: axes must be drawn from {list(_AXIS_LABELS)}, got {list(axes)}")
    wanted = axes or tuple(_AXIS_LABELS)
    panels = [(x, _AXIS_LABELS[x]) for x in wanted if any(getattr(p, x) is not None for p in points)]
    if not panels:
        raise ValueError(f"no operating point has a value on the axes {list(wanted)}")
    return panels


def _model_lines(points: list[OperatingPoint], styles: dict) -> dict[tuple[str, str], tuple[list, str]]:
    """Per (method, model), in method order: its points and its line style (models of one method
    take the line styles in turn)."""
    models: dict[tuple[str, str], list[OperatingPoint]] = {}
    for p in sorted(points, key=_sort_key):
        models.setdefault((p.method, p.model), []).append(p)
    lines = {}
    for method in styles:
        for i, key in enumerate(k for k in models if k[0] == method):
            lines[key] = (models[key], _LINESTYLES[i % len(_LINESTYLES)])
    return {key: lines[key] for key in models}


def _draw_panel(ax, points: list[OperatingPoint], x: str, xlabel: str, lines: dict, styles: dict) -> None:
    """One panel: accuracy vs cost `x`, dense's accuracy as a dashed line, the Pareto front behind."""
    for d in (p for p in points if p.method == "dense"):
        ax.axhline(100 * d.accuracy, color="black", linestyle=(0, (5, 4)), linewidth=0.9, alpha=0.6, zorder=1)
    front = pareto_front(points, x=x)
    if len(front) > 1:
        ax.step([getattr(p, x) for p in front], [100 * p.accuracy for p in front], where="post", color="0.6",
                linewidth=5, alpha=0.35, solid_capstyle="round", zorder=1.5)
    for (method, _), (pts, linestyle) in lines.items():
        pts = sorted((p for p in pts if getattr(p, x) is not None), key=lambda p: getattr(p, x))
        if not pts:
            continue
        color, marker = styles[method]
        xs, ys = [getattr(p, x) for p in pts], [100 * p.accuracy for p in pts]
        if method == "dense":
            ax.plot(xs, ys, linestyle="none", marker="*", markersize=17, color="black",
                    markeredgecolor="white", markeredgewidth=0.8, zorder=5)
        else:
            ax.plot(xs, ys, linestyle=linestyle, marker=marker, color=color,
                    markersize=5.5, linewidth=1.5, markeredgecolor="white", markeredgewidth=0.5, zorder=3)
    xs_all = [getattr(p, x) for p in points if getattr(p, x) is not None]
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.minorticks_on()


def _legend_handles(points: list[OperatingPoint], lines: dict, styles: dict, xs: list[str]) -> list[tuple[Any, str]]:
    """(handle, label) per model line, plus the Pareto front where any panel draws one."""
    from matplotlib.lines import Line2D

    handles = []
    for (method, model), (_, linestyle) in lines.items():
        color, marker = styles[method]
        if method == "dense":
            h = Line2D([], [], linestyle=(0, (5, 4)), color="black", marker="*", markersize=13, linewidth=0.9)
        else:
            h = Line2D([], [], linestyle=linestyle, color=color, marker=marker, markersize=6)
        handles.append((h, _label(method, model)))
    if any(len(pareto_front(points, x=x)) > 1 for x in xs):
        handles.append((Line2D([], [], color="0.6", linewidth=5, alpha=0.35), "Pareto front (all methods)"))
    return handles


# --- everything ------------------------------------------------------------------------------------


def write_report(
    points: list[OperatingPoint],
    out_dir: str | Path,
    title: str = "adaptinf report",
    split: str = "test",
    notes: list[str] | None = None,
    max_drop: float = 0.01,
) -> dict[str, Path]:
    """Write report.md and tradeoff.png for the points of `split`, and points.csv/points.json with all
    points (every split). Returns {"report": ..., "csv": ..., "json": ..., "plot": ...}."""
    if not points:
        raise ValueError("no operating points to report")
    shown = [p for p in points if p.split == split]
    if not shown:
        have = sorted({p.split for p in points})
        raise ValueError(f"no operating points on split {split!r}; the points cover splits {have}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = write_points(points, out, stem="points")
    plot_path = plot_tradeoff(shown, out / "tradeoff.png", title=f"{title} ({split})")
    md = render_markdown(points, title, split, notes, plot=plot_path.name, max_drop=max_drop)
    md_path = out / "report.md"
    md_path.write_text(md, encoding="utf-8")
    return {"report": md_path, "csv": csv_path, "json": json_path, "plot": plot_path}
