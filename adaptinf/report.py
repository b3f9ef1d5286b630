"""A side-by-side report of every method's accuracy/cost trade-off: markdown tables, CSV/JSON, a plot.

What a reader needs to trust it comes first: dense's accuracy next to always predicting the majority
class and chance on each split, and a warning at the top when dense is within `SANITY_MARGIN` of the
majority class (then no point is called "within N points of dense"). Every accuracy in the tables
has its 95% Wilson score interval beside it, whatever the split's size (at n = 10,000 it is still
about ±0.8 points, so it is never noise to drop), and the chosen points say whether their interval
overlaps dense's (statistically indistinguishable at this n; overlapping intervals are a conservative
check). The operating-points table merges consecutive knob values of one model whose row would read
the same; points.csv/json keep every point, with the interval bounds as extra columns.

matplotlib is imported only when `plot_tradeoff` draws (importing adaptinf stays light), and the figure
is drawn on an Agg canvas without touching pyplot's global backend.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from adaptinf.evaluate import (
    SANITY_MARGIN,
    OperatingPoint,
    SplitBaseline,
    cheapest_within_drop,
    dense_problems,
    pareto_front,
    sanity_warning,
    split_baselines,
    wilson_interval,
    write_points,
)

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


def acc_cell(p: OperatingPoint) -> str:
    """The point's accuracy in percent, two decimals."""
    return f"{100 * p.accuracy:.2f}"


def interval_cell(p: OperatingPoint, accuracy: float | None = None) -> str:
    """The 95% Wilson interval of the point's accuracy (or of `accuracy` over the point's n) in
    percent, one decimal: "[79.9, 84.1]"; a dash without a usable n."""
    if accuracy is not None:
        lo, hi = wilson_interval(accuracy, p.n) if p.n >= 1 else (None, None)
    else:
        lo, hi = p.interval() or (None, None)
    return _DASH if lo is None else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def versus_dense(p: OperatingPoint, dense: OperatingPoint) -> str:
    """"indistinguishable" when the two 95% intervals overlap, else "below" or "above" dense."""
    a, d = p.interval(), dense.interval()
    if a is None or d is None:
        return _DASH
    if a[0] <= d[1] and d[0] <= a[1]:
        return "indistinguishable"
    return "below" if p.accuracy < dense.accuracy else "above"


def overlap_line(pairs: list[tuple[OperatingPoint, OperatingPoint]], split: str = "test") -> str:
    """One sentence on which (point, dense) pairs have overlapping 95% intervals on `split`."""
    same = [p for p, d in pairs if versus_dense(p, d) == "indistinguishable"]
    if not pairs:
        return ""
    d = pairs[0][1]
    ref = f"dense's {acc_cell(d)} {interval_cell(d)}"
    if not same:
        return f"No chosen point's 95% interval on {split} overlaps {ref}: each differs from dense at n={d.n}."
    names = ", ".join(f"{p.model} {knob_label(p)}" for p in same)
    return (f"Statistically indistinguishable from dense on {split} (95% intervals overlap {ref}, n={d.n}): "
            f"{names}.")


def reference_line(points: list[OperatingPoint], split: str, baselines: dict[str, SplitBaseline]) -> str:
    """Dense's accuracy on `split` beside always predicting the majority class and chance there."""
    dense = next((p for p in points if p.method == "dense" and p.split == split), None)
    b = baselines.get(split)
    parts = [f"dense {acc_cell(dense)}% {interval_cell(dense)}" if dense else "no dense point"]
    if b is None:
        parts.append("majority class unknown (these points were saved without their label counts)")
    else:
        parts += [f"always predicting the majority class {100 * b.majority:.2f}%",
                  f"chance (1/{round(1 / b.chance)} labels) {100 * b.chance:.2f}%"]
    return f"Reference on {split}: " + "; ".join(parts) + "."


def reference_table(points: list[OperatingPoint], baselines: dict[str, SplitBaseline]) -> list[str]:
    """Dense, the majority class and chance side by side, one column per split (validation, test first)."""
    have = {p.split for p in points} | set(baselines)
    splits = [s for s in ("validation", "test") if s in have] + sorted(have - {"validation", "test"})
    rows = [["dense"], ["always the majority class"], ["chance (1 / labels)"], ["samples"]]
    for s in splits:
        d = next((p for p in points if p.method == "dense" and p.split == s), None)
        b = baselines.get(s)
        rows[0].append(f"{acc_cell(d)} {interval_cell(d)}" if d else _DASH)
        rows[1].append(f"{100 * b.majority:.2f}" if b else "unknown")
        rows[2].append(f"{100 * b.chance:.2f}" if b else _DASH)
        rows[3].append(str(b.n if b else d.n if d else _DASH))
    return markdown_table(["reference", *[f"{s} (%)" for s in splits]], rows, align="l" + "r" * len(splits))


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


_POINT_HEADER = ["method", "model", "knob", "accuracy (%)", "95% CI (%)", "GFLOPs/sample", "FLOPs reduction",
                 "latency b1 (ms)", "latency b32 (ms)", "speed-up b1", "speed-up b32", "realisation b32"]


def _point_cells(p: OperatingPoint) -> list[str]:
    return [p.method, p.model, knob_label(p), acc_cell(p), interval_cell(p), f"{p.gflops:.3f}",
            _num(p.flops_reduction, ".2f", "×"), _num(p.latency_ms_b1, ".2f"), _num(p.latency_ms_b32, ".2f"),
            _num(p.speedup_b1, ".2f", "×"), _num(p.speedup_b32, ".2f", "×"), _num(p.realisation_b32, ".2f")]


def knob_range(points: list[OperatingPoint]) -> str:
    """The knob cell of merged points: "threshold=0.5–0.62 (5 values)" (one point: its `knob_label`)."""
    if len(points) == 1:
        return knob_label(points[0])
    knobs = [p.knob for p in points]
    name = points[0].knob_name
    return f"{name + '=' if name else ''}{min(knobs):g}–{max(knobs):g} ({len(points)} values)"


def collapse_rows(points: list[OperatingPoint], cells: Callable[[OperatingPoint], list[str]],
                  knob_col: int = 2) -> list[list[str]]:
    """Table rows for `points` in report order (`_sort_key`), where consecutive knob values of one
    (method, model) whose `cells` are the same in every column but `knob_col` share one row, its knob
    cell a `knob_range`. A point without a knob is never merged."""
    groups: list[list[OperatingPoint]] = []
    models: dict[tuple[str, str], list[OperatingPoint]] = {}
    for p in points:
        models.setdefault((p.method, p.model), []).append(p)
    for pts in models.values():
        for p in sorted(pts, key=lambda p: (p.knob is not None, p.knob or 0.0)):
            last = groups[-1] if groups else None
            same = (last is not None and (last[0].method, last[0].model) == (p.method, p.model)
                    and p.knob is not None and last[-1].knob is not None)
            if same and _without(cells(p), knob_col) == _without(cells(last[-1]), knob_col):
                last.append(p)
            else:
                groups.append([p])
    rows = []
    for g in sorted(groups, key=lambda g: _sort_key(g[0])):
        row = cells(g[0])
        row[knob_col] = knob_range(g)
        rows.append(row)
    return rows


def _without(cells: list[str], i: int) -> list[str]:
    return cells[:i] + cells[i + 1:]


def _points_table(points: list[OperatingPoint]) -> list[str]:
    return markdown_table(_POINT_HEADER, collapse_rows(points, _point_cells))


def _front_table(points: list[OperatingPoint]) -> list[str]:
    header = ["method", "model", "knob", "accuracy (%)", "95% CI (%)", "GFLOPs/sample", "FLOPs reduction"]
    rows = [[p.method, p.model, knob_label(p), acc_cell(p), interval_cell(p), f"{p.gflops:.3f}",
             _num(p.flops_reduction, ".2f", "×")] for p in points]
    return markdown_table(header, rows)


def _refused_section(problems: list[str], max_drop: float, margin: float) -> list[str]:
    """What replaces the within-drop table when dense is no better than the majority class."""
    return [
        "## No point is chosen against dense",
        "",
        f"Dense is within {100 * margin:g} points of always predicting the majority class "
        f"({'; '.join(problems)}), so no point is called \"within {100 * max_drop:g} point(s) of dense\": a model "
        "that learned nothing would qualify. Make the baseline learn first (more training data or epochs, "
        "check the labels and the text column), then compare.",
        "",
    ]


def _within_drop_table(points: list[OperatingPoint], max_drop: float, baselines: dict[str, SplitBaseline] | None = None,
                       margin: float = SANITY_MARGIN) -> list[str]:
    """The cheapest point per model within `max_drop` of dense, chosen on validation, shown on test;
    a note instead when dense is within `margin` of the majority class."""
    baselines = split_baselines(points) if baselines is None else baselines
    problems = dense_problems(points, baselines, margin)
    if problems:
        return _refused_section(problems, max_drop, margin)
    try:
        picked = cheapest_within_drop(points, max_drop, margin=None)
    except ValueError:
        return []
    header = ["method", "model", "knob", "val acc (%)", "test acc (%)", "test drop vs dense (pt)", "test 95% CI (%)",
              "val 95% CI (%)", "vs dense (test)", "GFLOPs/sample", "FLOPs reduction", "speed-up b1", "speed-up b32",
              "realisation b32"]
    rows = [
        [t.method, t.model, knob_label(t), acc_cell(v), acc_cell(t), f"{100 * (d.accuracy - t.accuracy):+.2f}",
         interval_cell(t), interval_cell(v), versus_dense(t, d), f"{t.gflops:.3f}",
         _num(d.gflops / t.gflops if t.gflops else None, ".2f", "×"), _num(t.speedup_b1, ".2f", "×"),
         _num(t.speedup_b32, ".2f", "×"), _num(t.realisation_b32, ".2f")]
        for v, t, d in picked
    ]
    return [
        f"## Cheapest point within {100 * max_drop:g} accuracy point(s) of dense",
        "",
        "Chosen on the validation split (the knob with the fewest GFLOPs whose validation accuracy is at most "
        f"{100 * max_drop:g} point(s) below dense's), reported on test.",
        "",
        reference_line(points, "validation", baselines),
        "",
        reference_line(points, "test", baselines),
        "",
        *(markdown_table(header, rows) if rows else ["No model has a point within this drop on validation."]),
        "",
        *([overlap_line([(t, d) for _, t, d in picked]), ""] if rows else []),
    ]


def _exit_accuracy_table(points: list[OperatingPoint]) -> list[str]:
    """Each individual exit's accuracy, for models whose points carry `extras["exit_accuracy"]`."""
    seen: dict[tuple[str, str], OperatingPoint] = {}
    for p in points:
        if isinstance(p.extras.get("exit_accuracy"), list):
            seen.setdefault((p.method, p.model), p)
    if not seen:
        return []
    def layers_of(p: OperatingPoint) -> list[int] | None:
        layers = p.extras.get("exit_layers")
        ok = isinstance(layers, list) and len(layers) == len(p.extras["exit_accuracy"])
        return [int(x) for x in layers] if ok else None

    by_layer = all(layers_of(p) for p in seen.values())  # models with other exits line up layer by layer
    if by_layer:
        columns = sorted({x for p in seen.values() for x in layers_of(p)})
        header = ["method", "model", "exit layers", *[f"layer {x} (%)" for x in columns], "95% CI per exit (%)"]
    else:
        columns = list(range(max(len(p.extras["exit_accuracy"]) for p in seen.values())))
        header = ["method", "model", "exit layers", *[f"exit {i + 1} (%)" for i in columns], "95% CI per exit (%)"]
    rows = []
    for p in seen.values():
        accs, layers = p.extras["exit_accuracy"], layers_of(p)
        at = dict(zip(layers, accs)) if by_layer else dict(enumerate(accs))
        cells = [f"{100 * at[c]:.2f}" if c in at else "" for c in columns]
        cis = " ".join(interval_cell(p, a) for a in accs)
        rows.append([p.method, p.model, ",".join(map(str, layers)) if layers else "-", *cells, cis])
    return ["## Accuracy of each exit on its own", "", *markdown_table(header, rows), ""]


def _summary(shown: list[OperatingPoint], points: list[OperatingPoint], split: str,
             baselines: dict[str, SplitBaseline]) -> list[str]:
    """The lines under the title: what is shown, dense beside the majority class and chance, how to read it."""
    sizes = sorted({p.n for p in shown})
    rows = len(collapse_rows(shown, _point_cells))
    merged = (f" (the operating-points table shows them in {rows} rows: consecutive knob values of one model with "
              "the same results share a row; points.csv/json list every point)") if rows < len(shown) else ""
    return [
        f"Split: **{split}** ({', '.join(str(n) for n in sizes)} samples); "
        f"{len(shown)} operating points from {len({(p.method, p.model) for p in shown})} models{merged}.",
        "",
        "What dense is measured against: always predicting the most frequent label of the split (majority "
        "class) and picking a label at random (chance).",
        "",
        *reference_table(points, baselines),
        "",
        "Accuracies are in percent with their 95% Wilson score interval (the range the true accuracy lies in "
        "with 95% confidence, given n samples), for every split size. GFLOPs are analytic (padding excluded), "
        "averaged per sample. FLOPs reduction = dense GFLOPs / GFLOPs. Latencies are measured, in ms per batch "
        "of 1 or 32; speed-up = dense latency / latency (same run); realisation = measured speed-up at batch 32 "
        "/ FLOPs reduction.",
        "",
    ]


def render_markdown(
    points: list[OperatingPoint], title: str, split: str, notes: list[str] | None = None, plot: str | None = None,
    max_drop: float = 0.01, baselines: dict[str, SplitBaseline] | None = None, margin: float = SANITY_MARGIN,
) -> str:
    """The report's markdown: a warning first when dense is within `margin` of the majority class on
    validation or test, dense beside the majority class and chance per split (`baselines`, default
    from the points), the points of `split` (sorted by method, model, GFLOPs; identical consecutive
    knob values merged), their Pareto front, each exit's own accuracy (early-exit models) and, when
    the points cover validation and test, the cheapest point per model within `max_drop` of dense
    (or why none is chosen); `plot` is the relative path of a figure to embed."""
    baselines = split_baselines(points) if baselines is None else baselines
    shown = sorted((p for p in points if p.split == split), key=_sort_key)
    warning = sanity_warning(dense_problems(points, baselines, margin), margin)
    lines = [f"# {title}", "", *([f"**{warning}.**", ""] if warning else [])]
    if notes:
        lines += [*notes, ""]
    lines += [
        *_summary(shown, points, split, baselines),
        *([f"![accuracy vs cost]({plot})", ""] if plot else []),
        "## Operating points",
        "",
        reference_line(points, split, baselines),
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
        *(_within_drop_table(points, max_drop, baselines, margin) if split == "test" else []),
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
    majority = _plot_majority(points)
    if majority is not None:
        ax.axhline(100 * majority, color="0.45", linestyle=":", linewidth=1.2, zorder=1)
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
    majority = _plot_majority(points)
    if majority is not None:
        handles.append((Line2D([], [], color="0.45", linestyle=":", linewidth=1.2),
                        f"always the majority class ({100 * majority:.1f}%)"))
    return handles


def _plot_majority(points: list[OperatingPoint]) -> float | None:
    """The majority-class rate to draw: the points' one split's, when it lies no more than 5 points below
    the least accurate point (lower, it would only squash the curves); else None."""
    base = split_baselines(points)
    if len(base) != 1 or len({p.split for p in points}) != 1:
        return None
    majority = next(iter(base.values())).majority
    return majority if majority >= min(p.accuracy for p in points) - 0.05 else None


# --- summary.json ----------------------------------------------------------------------------------

SUMMARY_VERSION = 1


def summary(points: list[OperatingPoint], max_drop: float, baselines: dict[str, SplitBaseline] | None = None,
            margin: float = SANITY_MARGIN) -> dict[str, Any]:
    """The machine-readable headline of a report (`summary.json`): per method its cheapest point
    within `max_drop` (a fraction) of dense, chosen on validation by mean GFLOPs, reported on test;
    None for a method with no point within it. Accuracies in percent, `test_drop` in points (dense's
    test accuracy minus the point's: positive is worse), speed-ups as measured at the point (against
    the fastest dense reference of the run; None where the point was not timed). A method with
    several models (e.g. one `report` over several runs) gets the cheapest of its models' points.
    When dense is within `margin` of the majority class, or the points hold no single dense model,
    every method is None and `refused` says why."""
    methods = [m for m in method_order({p.method for p in points}) if m != "dense"]
    out: dict[str, Any] = {"version": SUMMARY_VERSION, "max_drop_points": round(100 * max_drop, 6),
                           "selection": "cheapest mean GFLOPs within max_drop_points of dense on validation, "
                                        "reported on test", "dense": None, "refused": None,
                           "methods": dict.fromkeys(methods)}
    baselines = split_baselines(points) if baselines is None else baselines
    problems = dense_problems(points, baselines, margin)
    try:
        picked = [] if problems else cheapest_within_drop(points, max_drop, margin=None)
    except ValueError as e:
        picked, problems = [], [str(e)]
    if problems:
        out["refused"] = "; ".join(problems)
        return out
    for m in methods:
        mine = [(v, t, d) for v, t, d in picked if v.method == m]
        if not mine:
            continue
        v, t, d = min(mine, key=lambda vtd: vtd[0].gflops)
        out["dense"] = {"val_acc": _pct(_dense_on(points, "validation")), "test_acc": _pct(d.accuracy),
                        "gflops": round(d.gflops, 6)}
        out["methods"][m] = {
            "model": t.model, "knob_name": t.knob_name, "knob": t.knob, "val_acc": _pct(v.accuracy),
            "test_acc": _pct(t.accuracy), "test_drop": round(100 * (d.accuracy - t.accuracy), 4),
            "gflops": round(t.gflops, 6), "flops_reduction": round(d.gflops / t.gflops, 4) if t.gflops else None,
            "speedup_b1": _round(t.speedup_b1), "speedup_b32": _round(t.speedup_b32),
        }
    if out["dense"] is None:
        dv, dt = _dense_on(points, "validation"), _dense_on(points, "test")
        out["dense"] = {"val_acc": _pct(dv), "test_acc": _pct(dt)} if dv is not None and dt is not None else None
    return out


def _dense_on(points: list[OperatingPoint], split: str) -> float | None:
    return next((p.accuracy for p in points if p.method == "dense" and p.split == split), None)


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 4)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def write_summary(points: list[OperatingPoint], path: str | Path, max_drop: float,
                  baselines: dict[str, SplitBaseline] | None = None, margin: float = SANITY_MARGIN) -> Path:
    """`summary(...)` written as JSON to `path`."""
    import json

    path = Path(path)
    path.write_text(json.dumps(summary(points, max_drop, baselines, margin), indent=2) + "\n", encoding="utf-8")
    return path


# --- everything ------------------------------------------------------------------------------------


def write_report(
    points: list[OperatingPoint],
    out_dir: str | Path,
    title: str = "adaptinf report",
    split: str = "test",
    notes: list[str] | None = None,
    max_drop: float = 0.01,
    baselines: dict[str, SplitBaseline] | None = None,
    margin: float = SANITY_MARGIN,
) -> dict[str, Path]:
    """Write report.md and tradeoff.png for the points of `split`, points.csv/points.json with all
    points (every split), and summary.json (`summary`: each method's cheapest point within `max_drop`). `baselines`: the majority-class and chance rates per split (default: what
    the points recorded); `margin`: how far dense must beat the majority class (`render_markdown`).
    Returns {"report": ..., "csv": ..., "json": ..., "plot": ..., "summary": ...}."""
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
    md = render_markdown(points, title, split, notes, plot=plot_path.name, max_drop=max_drop, baselines=baselines,
                         margin=margin)
    md_path = out / "report.md"
    md_path.write_text(md, encoding="utf-8")
    summary_path = write_summary(points, out / "summary.json", max_drop, baselines, margin)
    return {"report": md_path, "csv": csv_path, "json": json_path, "plot": plot_path, "summary": summary_path}
