"""The report of `adaptinf run`: the standard report (adaptinf.report) plus what the run adds: its
settings, the latency of the chosen points with their Pareto front (each point's accuracy with its
95% interval and whether it is distinguishable from dense's), separate plots per cost axis, skipped
or failed methods, and what each stage did. When dense is within `SANITY_MARGIN` of the majority
class the chosen points are each method's most accurate, and the text says so."""

from __future__ import annotations

from pathlib import Path

from adaptinf.evaluate import (
    SANITY_MARGIN,
    OperatingPoint,
    SplitBaseline,
    dense_problems,
    pareto_front,
    split_baselines,
)
from adaptinf.preset import RunConfig
from adaptinf.report import (
    acc_cell,
    interval_cell,
    knob_label,
    markdown_table,
    overlap_line,
    plot_tradeoff,
    reference_line,
    versus_dense,
    write_report,
)

_DASH = "—"


def write_run_report(points: list[OperatingPoint], cfg: RunConfig, out: Path, result, timed: dict,
                     baselines: dict[str, SplitBaseline] | None = None, margin: float = SANITY_MARGIN) -> Path:
    """report/report.md of a run (and its plots); `baselines`: the majority-class and chance rates per
    split (default: what the points recorded), `margin`: how far dense must beat the majority class
    for the report to compare points with it."""
    baselines = split_baselines(points) if baselines is None else baselines
    report_dir = Path(out) / "report"
    notes = [f"Preset **{cfg.preset}**: {cfg.description}" if cfg.description else f"Preset **{cfg.preset}**."]
    if cfg.note:
        notes.append(f"> {cfg.note}")
    sub = (f"at most {cfg.max_train_samples:,} samples of the training split (a seeded subset when it is larger)"
           if cfg.max_train_samples else "the whole training split")
    notes.append(f"Model `{cfg.model}`, data `{cfg.task.data}` (seed {cfg.task.seed}), trained on {sub}; "
                 "every setting in `resolved.yaml`. Rerunning the same `adaptinf run` command reuses finished "
                 "stages and resumes an interrupted one.")
    for n in getattr(result, "notes", []):
        notes.append(f"**Note** {n}.")
    for m, why in result.skipped.items():
        notes.append(f"**Skipped** `{m}`: {why}.")
    for m, err in result.failed.items():
        notes.append(f"**Failed** `{m}`: {err} (see `methods/{m}/error.txt`).")
    notes = [line for n in notes for line in (n, "")][:-1]  # one paragraph each
    paths = write_report(points, report_dir, title=f"adaptinf run: {cfg.preset}", split="test", notes=notes,
                         max_drop=cfg.latency.max_drop / 100, baselines=baselines, margin=margin)
    test = [p for p in points if p.split == "test"]
    plot_tradeoff(test, report_dir / "accuracy_vs_gflops.png", title="accuracy vs GFLOPs (test)", axes=("gflops",))
    lines = ["", "## Latency at the chosen points", ""]
    timed_pts = [p for p in test if p.latency_ms_b1 is not None]
    if any(p.method != "dense" for p in timed_pts):
        plot_tradeoff(timed_pts, report_dir / "accuracy_vs_latency.png", title="accuracy vs latency (test)",
                      axes=("latency_ms_b1", "latency_ms_b32"))
        sane = not dense_problems(points, baselines, margin)
        lines += _latency_section(points, timed_pts, timed, cfg.latency.max_drop, sane, baselines, margin)
        lines += _int8_section(Path(out) / "latency" / "int8.json", points)
        bench_md = Path(out) / "latency" / "bench.md"
        if bench_md.is_file():
            lines += ["", "Benchmark rows:", "", bench_md.read_text().strip()]
    else:
        lines += ["No adaptive model was timed (no method ran)."]
    lines += ["", "## Stages", ""]
    stages = [[r.name, r.status + (f": {r.error}" if r.error else ""), f"{r.seconds:.0f}"] for r in result.stages]
    lines += markdown_table(["stage", "status", "seconds"], stages, align="llr")
    lines += ["", "Status *cached*: finished by an earlier run with the same settings (its time shown).", ""]
    md = paths["report"]
    md.write_text(md.read_text() + "\n".join(lines))
    return md


def _latency_section(points: list[OperatingPoint], timed_pts: list[OperatingPoint], timed: dict, max_drop: float,
                     sane: bool, baselines: dict[str, SplitBaseline], margin: float) -> list[str]:
    """How the timed points were chosen, their table (accuracy with its 95% interval and whether it is
    distinguishable from dense's) and their Pareto front over latency at batch 1."""
    how = (f"its cheapest within {max_drop:g} accuracy point(s) of dense on validation, or its most accurate on "
           "validation when none is within" if sane else
           f"its most accurate on validation (dense is within {100 * margin:g} points of the majority class, so "
           "no point is chosen as close to dense)")
    lines = [f"Each method timed at one point: {how}; dense and every chosen point interleaved in one run "
             "(`latency/bench.csv`) on length-bucketed batches. Speed-ups are against the fastest fp32 dense "
             "reference at each batch size (adaptinf dense padding-free or padded, `transformers`, ONNX Runtime "
             "fp32; named in the benchmark rows' last column), so a method does not win by padding removal alone.", "", "![accuracy vs latency](accuracy_vs_latency.png)", "",
             reference_line(points, "test", baselines), ""]
    dense = next((p for p in timed_pts if p.method == "dense"), None)
    rows, pairs = [], []
    for p in sorted(timed_pts, key=lambda p: p.latency_ms_b1):
        why = timed.get((p.model, p.knob), {}).get("why", "")
        vs = _DASH if dense is None or p is dense else versus_dense(p, dense)
        if dense is not None and p is not dense:
            pairs.append((p, dense))
        rows.append([p.method, knob_label(p), acc_cell(p), interval_cell(p), vs, f"{p.gflops:.3f}",
                     f"{p.latency_ms_b1:.2f}", f"{p.latency_ms_b32:.2f}", f"{p.speedup_b1:.2f}×",
                     f"{p.speedup_b32:.2f}×", why])
    lines += markdown_table(["method", "knob", "test acc (%)", "95% CI (%)", "vs dense", "GFLOPs/sample", "b1 (ms)",
                             "b32 (ms)", "speed-up b1", "speed-up b32", "chosen as"], rows, align="llrrlrrrrrl")
    if pairs:
        lines += ["", overlap_line(pairs)]
    front = pareto_front(timed_pts, x="latency_ms_b1")
    lines += ["", "Pareto front over the timed points (accuracy vs latency at batch 1): "
              + ", ".join(f"{p.method} {knob_label(p)}" for p in front) + "."]
    return lines



def _int8_section(path: Path, points: list[OperatingPoint]) -> list[str]:
    """The int8 forms (dense int8, ONNX Runtime int8, each chosen point's): test accuracy against the
    fp32 dense model's and speed-ups against the fastest int8 dense and against `transformers`."""
    import json

    if not path.is_file():
        return []
    dense = next((p for p in points if p.split == "test" and p.method == "dense" and p.knob is None), None)
    rows = []
    for r in json.loads(path.read_text()):
        acc = r["test_accuracy"]
        drop = _DASH if acc is None or dense is None else f"{100 * (acc - dense.accuracy):+.2f}"
        cells = [r["name"], _DASH if r["knob"] is None else f"{r['knob']:g}",
                 _DASH if acc is None else f"{100 * acc:.2f}", drop,
                 f"{r['latency_ms_b1']:.2f}", f"{r['latency_ms_b32']:.2f}"]
        for b in ("b1", "b32"):
            v = r[f"speedup_vs_best_int8_{b}"]
            cells.append(_DASH if v is None else f"{v:.2f}× ({r[f'best_int8_{b}']})")
        for b in ("b1", "b32"):
            v = r[f"speedup_vs_transformers_{b}"]
            cells.append(_DASH if v is None else f"{v:.2f}×")
        rows.append(cells)
    return ["", "### int8 forms", "",
            "Each timed model with dynamic int8 Linear layers (`--quantize int8`; code that slices weights "
            "stays fp32), in the same interleaved run; speed-ups against the fastest int8 dense reference "
            "(adaptinf dense int8 or ONNX Runtime int8) and against `transformers` (fp32, as loaded).", "",
            *markdown_table(["model", "knob", "test acc (%)", "vs fp32 dense (pt)", "b1 (ms)", "b32 (ms)",
                             "vs best int8 b1", "vs best int8 b32", "vs transformers b1", "vs transformers b32"],
                            rows, align="llrrrrrrrr")]
