"""The language-model run's points, selection rule and report (issue 19): perplexity instead of accuracy.

An `LMPoint` is one model (the dense LM or a method's entry) at one knob value on one split:
perplexity, mean NLL and FLOPs per token (`adaptinf.lm.evaluate_perplexity`). The selection rule
(`choose_points`): per method, its cheapest point (FLOPs/token; ties to the lower perplexity) whose
VALIDATION perplexity is within `max_pct` percent of dense's, reported on test; None when no point
is within. The reference is the point named `dense` (REFERENCE); another dense model (method
`dense` under another name: the run's other dense candidate) is listed beside it but is never a
method entry.
`write_lm_report` writes report/report.md (every method's points; the chosen point per method with
validation and test perplexity, % vs dense, FLOPs reduction and the latency ratios of scoring and
generating at each timed batch size; the benchmark rows with their stamp), report/ points.csv/json,
report/summary.json and two plots: perplexity vs FLOPs/token (test) and perplexity vs generation latency
(timed points). matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptinf.report import markdown_table, method_styles

SUMMARY_VERSION = 1
REFERENCE = "dense"  # the name of the reference point (every "vs dense" is against it)
_DASH = "—"


@dataclass
class LMPoint:
    name: str  # "dense" (the reference), another dense model's name, or the preset entry's name (e.g. planer-0.7)
    method: str  # the registry name ("dense", "planer", "early-exit", "acm", ...)
    model_dir: str  # relative to the run folder
    knob: float | None
    split: str  # validation | test
    perplexity: float
    loss: float
    tokens: int
    flops_per_token: float
    ppl_vs_dense_pct: float | None = None  # (perplexity / dense's on the split - 1) * 100
    flops_reduction: float | None = None  # dense's FLOPs/token / this point's

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def write_points(points: list[LMPoint], out_dir: Path, stem: str = "points") -> tuple[Path, Path]:
    """`out_dir/<stem>.csv` and `<stem>.json` of the points."""
    from adaptinf.bench import write_rows

    return write_rows(points, LMPoint, out_dir, stem)


def read_points(paths: list[Path]) -> list[LMPoint]:
    out = []
    for p in paths:
        out += [LMPoint(**d) for d in json.loads(Path(p).read_text(encoding="utf-8"))]
    return out


def add_relative(points: list[LMPoint]) -> list[LMPoint]:
    """Fill % vs dense and FLOPs reduction against the dense point of each split."""
    dense = {p.split: p for p in points if p.name == REFERENCE}
    for p in points:
        d = dense.get(p.split)
        if d is not None:
            p.ppl_vs_dense_pct = 100.0 * (p.perplexity / d.perplexity - 1.0)
            p.flops_reduction = d.flops_per_token / p.flops_per_token if p.flops_per_token else None
    return points


def point_key(p: LMPoint) -> tuple[str, float | None]:
    return p.name, p.knob


def choose_points(points: list[LMPoint], max_pct: float) -> dict[str, tuple[LMPoint, LMPoint | None] | None]:
    """Per method entry (dense excluded): (validation point, its test twin) of its cheapest point whose
    validation perplexity is at most dense's * (1 + max_pct / 100); None when none is within."""
    val = [p for p in points if p.split == "validation"]
    dense = [p for p in val if p.name == REFERENCE]
    if len(dense) != 1:
        raise ValueError(f"the selection needs exactly one dense point on validation, found {len(dense)}")
    limit = dense[0].perplexity * (1.0 + max_pct / 100.0)
    test = {point_key(p): p for p in points if p.split == "test"}
    out: dict[str, tuple[LMPoint, LMPoint | None] | None] = {}
    for name in dict.fromkeys(p.name for p in val if p.method != "dense"):  # other dense models: no entries
        fits = [p for p in val if p.name == name and p.perplexity <= limit * (1 + 1e-12)]
        best = min(fits, key=lambda p: (p.flops_per_token, p.perplexity)) if fits else None
        out[name] = None if best is None else (best, test.get(point_key(best)))
    return out


def fallback_point(points: list[LMPoint], name: str) -> LMPoint | None:
    """A method's lowest validation perplexity point (timed when none is within the rule)."""
    val = [p for p in points if p.split == "validation" and p.name == name]
    return min(val, key=lambda p: (p.perplexity, p.flops_per_token)) if val else None


# --- latency rows (adaptinf.lm_bench's bench.json) -----------------------------------------------------


def latency_of(rows: list[dict], case: str) -> dict[str, dict]:
    """{"score_b1": row, "generate_b8": row, ...} of one case."""
    return {f"{r['workload']}_b{r['batch_size']}": r for r in rows if r["case"] == case}


def _ms(rows: dict, key: str) -> float | None:
    return rows[key]["median_ms"] if key in rows else None


def _speed(rows: dict, key: str) -> float | None:
    return rows[key]["speedup_vs_reference"] if key in rows else None


# --- summary.json --------------------------------------------------------------------------------------


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, nd)


def build_summary(points: list[LMPoint], chosen: dict, bench: list[dict], cases: dict[str, str], max_pct: float,
                  extra: dict | None = None) -> dict[str, Any]:
    """{"dense": {...}, "methods": {name: {...} | null}}: perplexities, FLOPs/token, latency (ms) and
    speed-ups against dense measured in the same run; "dense_others": {name: {...}} the other dense
    models (not the reference; none timed). `cases`: entry name -> its bench case."""
    by = {(p.name, p.knob, p.split): p for p in points}
    dv, dt = by.get((REFERENCE, None, "validation")), by.get((REFERENCE, None, "test"))
    dense_lat = latency_of(bench, "dense")
    out: dict[str, Any] = {"version": SUMMARY_VERSION, "max_ppl_increase_pct": max_pct, **(extra or {}),
                           "dense": {"val_perplexity": _r(dv.perplexity if dv else None),
                                     "test_perplexity": _r(dt.perplexity if dt else None),
                                     "flops_per_token": dt.flops_per_token if dt else None,
                                     "model_dir": dv.model_dir if dv else None,
                                     "latency_ms": {k: _r(r["median_ms"]) for k, r in dense_lat.items()}},
                           "dense_others": {}, "methods": {}}
    for v in points:
        if v.method == "dense" and v.name != REFERENCE and v.split == "validation":
            t = by.get((v.name, v.knob, "test"))
            out["dense_others"][v.name] = {
                "model_dir": v.model_dir, "val_perplexity": _r(v.perplexity),
                "test_perplexity": _r(t.perplexity if t else None), "val_ppl_vs_dense_pct": _r(v.ppl_vs_dense_pct, 2),
                "test_ppl_vs_dense_pct": _r(t.ppl_vs_dense_pct if t else None, 2)}
    for name, pick in chosen.items():
        if pick is None:
            out["methods"][name] = None
            continue
        v, t = pick
        lat = latency_of(bench, cases.get(name, ""))
        out["methods"][name] = {
            "method": v.method, "knob": v.knob, "val_perplexity": _r(v.perplexity),
            "test_perplexity": _r(t.perplexity if t else None), "val_ppl_vs_dense_pct": _r(v.ppl_vs_dense_pct, 2),
            "test_ppl_vs_dense_pct": _r(t.ppl_vs_dense_pct if t else None, 2), "flops_per_token": v.flops_per_token,
            "flops_reduction": _r(v.flops_reduction), "latency_ms": {k: _r(r["median_ms"]) for k, r in lat.items()},
            "speedup_vs_dense": {k: _r(r["speedup_vs_reference"]) for k, r in lat.items()}}
    for name in [*(extra or {}).get("failed", {}), *(extra or {}).get("skipped", {})]:
        out["methods"].setdefault(name, None)  # failed or skipped: no point
    return out


# --- report.md -----------------------------------------------------------------------------------------


def _knob(k: float | None) -> str:
    return "full" if k is None else f"{k:g}"


def _pct(x: float | None) -> str:
    return _DASH if x is None else f"{x:+.1f}%"


def _x(x: float | None) -> str:
    return _DASH if x is None else f"{x:.2f}×"


def points_table(points: list[LMPoint]) -> list[str]:
    """Every model's points: validation and test perplexity side by side, cheapest first per model."""
    test = {point_key(p): p for p in points if p.split == "test"}
    rows = []
    for p in sorted((p for p in points if p.split == "validation"),
                    key=lambda p: (p.name != REFERENCE, p.method != "dense", p.name, p.flops_per_token)):
        t = test.get(point_key(p))
        rows.append([p.name, p.method, _knob(p.knob), f"{p.perplexity:.2f}", _pct(p.ppl_vs_dense_pct),
                     f"{t.perplexity:.2f}" if t else _DASH, _pct(t.ppl_vs_dense_pct if t else None),
                     f"{p.flops_per_token / 1e6:.3f}", _x(p.flops_reduction)])
    return markdown_table(["model", "method", "knob", "val ppl", "val vs dense", "test ppl", "test vs dense",
                           "MFLOPs/token", "FLOPs reduction"], rows, align="lllrrrrrr")


def chosen_table(summary: dict, sizes: list[int]) -> list[str]:
    cols = [f"{w} b{b}" for w in ("score", "generate") for b in sizes]
    d = summary["dense"]
    label = "dense" if d.get("model_dir") in (None, "dense/best") else f"dense (`{d['model_dir']}`)"
    rows = [[label, "full", _f(d["val_perplexity"]), _f(d["test_perplexity"]), _DASH, "1.00×",
             *[_lat(d["latency_ms"].get(c.replace(" ", "_")), 1.0) for c in cols]]]
    for name, o in summary.get("dense_others", {}).items():  # not the reference: not timed
        rows.append([f"{name} (not the reference)", "full", _f(o["val_perplexity"]), _f(o["test_perplexity"]),
                     _pct(o["test_ppl_vs_dense_pct"]), "1.00×", *[_DASH for _ in cols]])
    for name, m in summary["methods"].items():
        if m is None:
            rows.append([name, _DASH, f"none within {summary['max_ppl_increase_pct']:g}%", _DASH, _DASH, _DASH,
                         *[_DASH for _ in cols]])
            continue
        rows.append([name, _knob(m["knob"]), _f(m["val_perplexity"]), _f(m["test_perplexity"]),
                     _pct(m["test_ppl_vs_dense_pct"]), _x(m["flops_reduction"]),
                     *[_lat(m["latency_ms"].get(c.replace(" ", "_")), m["speedup_vs_dense"].get(c.replace(" ", "_")))
                       for c in cols]])
    return markdown_table(["model", "knob", "val ppl", "test ppl", "test vs dense", "FLOPs reduction",
                           *[f"{c} ms (speed-up)" for c in cols]], rows, align="ll" + "r" * (4 + len(cols)))


def _f(x: float | None) -> str:
    return _DASH if x is None else f"{x:.2f}"


def _lat(ms: float | None, speed: float | None) -> str:
    return _DASH if ms is None else f"{ms:.1f} ({_x(speed)})"


def bench_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["No latency rows."]
    body = [[r["case"], r["workload"], str(r["batch_size"]), str(r["tokens"]), f"{r['median_ms']:.2f}",
             f"{r['p25_ms']:.2f}–{r['p75_ms']:.2f}", f"{r['ms_per_token']:.3f}", _x(r["speedup_vs_reference"]),
             _x(r["paired_speedup_vs_reference"])] for r in rows]
    r = rows[0]
    peak = "" if r.get("peak_gflops_per_s") is None else f"; measured fp32 matmul peak {r['peak_gflops_per_s']:.0f} GFLOP/s"
    return [*markdown_table(["case", "workload", "batch", "tokens/call", "median ms", "IQR ms", "ms/token",
                             "speed-up vs dense", "paired"], body, align="lllrrrrrr"), "",
            f"{r['machine']}, {r['device']}, {r['torch_threads']} threads, torch {r['torch_version']}, Python "
            f"{r['python_version']}; median of {r['repeats']} interleaved rounds after {r['warmup']} warm-up, "
            f"{r['timestamp']}{peak}."]


# --- plots ---------------------------------------------------------------------------------------------


def _figure(panels: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 if panels == 1 else 5.2 * panels, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _draw(ax, series: dict[str, list[tuple[float, float]]], styles: dict, dense_ppl: float | None, max_pct: float,
          xlabel: str) -> None:
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="black", linestyle=(0, (5, 4)), linewidth=0.9, alpha=0.6)
        ax.axhline(dense_ppl * (1 + max_pct / 100), color="0.5", linestyle=":", linewidth=1.0)
    for name, xy in series.items():
        xy = sorted(xy)
        color, marker = styles[name]
        if name == REFERENCE:
            ax.plot(*zip(*xy), linestyle="none", marker="*", markersize=15, color="black", label="dense")
        else:
            ax.plot(*zip(*xy), marker=marker, color=color, markersize=5, linewidth=1.4, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(True, alpha=0.35)


def plot_ppl_vs_flops(points: list[LMPoint], path: Path, max_pct: float) -> Path:
    test = [p for p in points if p.split == "test"]
    styles = method_styles(dict.fromkeys(p.name for p in test))
    fig, (ax,) = _figure(1)
    series: dict[str, list] = {}
    for p in test:
        series.setdefault(p.name, []).append((p.flops_per_token / 1e6, p.perplexity))
    dense = next((p.perplexity for p in test if p.name == REFERENCE), None)
    _draw(ax, series, styles, dense, max_pct, "MFLOPs per token (test)")
    ax.legend(fontsize=8, frameon=False)
    fig.suptitle(f"perplexity vs FLOPs (test); dotted: dense + {max_pct:g}%")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def plot_ppl_vs_latency(points: list[LMPoint], bench: list[dict], cases: dict[str, tuple[str, float | None]],
                        path: Path, max_pct: float) -> Path | None:
    """Test perplexity vs generation latency (ms per call) per batch size, the timed points only;
    `cases`: bench case -> (entry name, knob)."""
    sizes = sorted({r["batch_size"] for r in bench if r["workload"] == "generate"})
    test = {point_key(p): p for p in points if p.split == "test"}
    if not sizes or len(cases) < 2:
        return None
    styles = method_styles(dict.fromkeys(n for n, _ in cases.values()))
    fig, axes = _figure(len(sizes))
    dense = next((p.perplexity for p in test.values() if p.name == REFERENCE), None)
    for ax, b in zip(axes, sizes):
        series: dict[str, list] = {}
        for r in bench:
            if r["workload"] == "generate" and r["batch_size"] == b and r["case"] in cases and cases[r["case"]] in test:
                series.setdefault(cases[r["case"]][0], []).append((r["median_ms"], test[cases[r["case"]]].perplexity))
        _draw(ax, series, styles, dense, max_pct, f"ms to generate {bench[0]['new_tokens']} tokens, batch {b}")
    axes[0].legend(fontsize=8, frameon=False)
    fig.suptitle("perplexity (test) vs generation latency at the chosen points")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


# --- the whole report ----------------------------------------------------------------------------------


def write_lm_report(points: list[LMPoint], out: Path, *, title: str, notes: list[str], max_pct: float,
                    bench: list[dict], cases: dict[str, tuple[str, float | None]], stages: list[list[str]],
                    extra: dict | None = None) -> dict[str, Path]:
    """report/report.md, points.csv/json, summary.json and the plots of an LM run into `out`.
    `bench`: adaptinf.lm_bench rows as dicts; `cases`: bench case -> (entry name, knob)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = choose_points(points, max_pct)
    names = {n: c for c, (n, _) in cases.items()}
    summary = build_summary(points, chosen, bench, names, max_pct, extra)
    write_points(points, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    paths = {"report": out / "report.md", "summary": out / "summary.json",
             "ppl_vs_flops": plot_ppl_vs_flops(points, out / "perplexity_vs_flops.png", max_pct)}
    lat_plot = plot_ppl_vs_latency(points, bench, cases, out / "perplexity_vs_latency.png", max_pct)
    if lat_plot:
        paths["ppl_vs_latency"] = lat_plot
    sizes = sorted({r["batch_size"] for r in bench}) or [1]
    lines = [f"# {title}", "", *[x for n in notes for x in (n, "")],
             f"## Chosen points: each method's cheapest within {max_pct:g}% of dense's validation perplexity", "",
             "Chosen on validation (fewest FLOPs/token among the points whose validation perplexity is at most "
             f"dense's + {max_pct:g}%), reported on test. Latency: the median of interleaved rounds, dense and every "
             "timed point in one run; speed-ups are dense's time / the point's, measured in that run. *score*: "
             "one window of the model's context; *generate*: greedy new tokens after a short prompt.", "",
             *chosen_table(summary, sizes), ""]
    fallbacks = [c for c, (n, _) in cases.items() if n in summary["methods"] and summary["methods"][n] is None]
    if fallbacks:
        lines += ["Methods with no point within the rule were timed at their lowest validation perplexity "
                  f"({', '.join(fallbacks)}; see the benchmark rows).", ""]
    lines += ["![perplexity vs FLOPs](perplexity_vs_flops.png)", ""]
    if lat_plot:
        lines += ["![perplexity vs latency](perplexity_vs_latency.png)", ""]
    lines += ["## Every operating point", "", *points_table(points), "",
              "## Benchmark rows", "", *bench_table(bench), "", "## Stages", "",
              *markdown_table(["stage", "status", "seconds"], stages, align="llr"), "",
              "Status *cached*: finished by an earlier run with the same settings (its time shown).", ""]
    paths["report"].write_text("\n".join(lines), encoding="utf-8")
    return paths
