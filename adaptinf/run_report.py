"""The report of `adaptinf run`: the standard report (adaptinf.report) plus what the run adds: its
settings, the latency of the chosen points with their Pareto front, separate plots per cost axis,
skipped or failed methods, and what each stage did."""

from __future__ import annotations

from pathlib import Path

from adaptinf.evaluate import OperatingPoint, pareto_front
from adaptinf.preset import RunConfig
from adaptinf.report import knob_label, markdown_table, plot_tradeoff, write_report


def write_run_report(points: list[OperatingPoint], cfg: RunConfig, out: Path, result, timed: dict) -> Path:
    report_dir = Path(out) / "report"
    notes = [f"Preset **{cfg.preset}**: {cfg.description}" if cfg.description else f"Preset **{cfg.preset}**."]
    if cfg.note:
        notes.append(f"> {cfg.note}")
    sub = f"a seeded {cfg.max_train_samples:,}-sample subset of the training split" if cfg.max_train_samples else "the whole training split"
    notes.append(f"Model `{cfg.model}`, data `{cfg.task.data}` (seed {cfg.task.seed}), trained on {sub}; "
                 "every setting in `resolved.yaml`. Rerunning the same `adaptinf run` command reuses finished "
                 "stages and resumes an interrupted one.")
    for m, why in result.skipped.items():
        notes.append(f"**Skipped** `{m}`: {why}.")
    for m, err in result.failed.items():
        notes.append(f"**Failed** `{m}`: {err} (see `methods/{m}/error.txt`).")
    notes = [line for n in notes for line in (n, "")][:-1]  # one paragraph each
    paths = write_report(points, report_dir, title=f"adaptinf run: {cfg.preset}", split="test", notes=notes,
                         max_drop=cfg.latency.max_drop / 100)
    test = [p for p in points if p.split == "test"]
    plot_tradeoff(test, report_dir / "accuracy_vs_gflops.png", title="accuracy vs GFLOPs (test)", axes=("gflops",))
    lines = ["", "## Latency at the chosen points", ""]
    timed_pts = [p for p in test if p.latency_ms_b1 is not None]
    if any(p.method != "dense" for p in timed_pts):
        plot_tradeoff(timed_pts, report_dir / "accuracy_vs_latency.png", title="accuracy vs latency (test)",
                      axes=("latency_ms_b1", "latency_ms_b32"))
        lines += [
            "Each method timed at one point: its cheapest within "
            f"{cfg.latency.max_drop:g} accuracy point(s) of dense on validation, or its most accurate on validation "
            "when none is within; dense and every chosen point interleaved in one run (`latency/bench.csv`).",
            "",
            "![accuracy vs latency](accuracy_vs_latency.png)",
            "",
        ]
        rows = []
        for p in sorted(timed_pts, key=lambda p: p.latency_ms_b1):
            why = timed.get((p.model, p.knob), {}).get("why", "")
            rows.append([p.method, knob_label(p), f"{100 * p.accuracy:.2f}", f"{p.gflops:.3f}",
                         f"{p.latency_ms_b1:.2f}", f"{p.latency_ms_b32:.2f}", f"{p.speedup_b1:.2f}×",
                         f"{p.speedup_b32:.2f}×", why])
        lines += markdown_table(["method", "knob", "test acc (%)", "GFLOPs/sample", "b1 (ms)", "b32 (ms)",
                                 "speed-up b1", "speed-up b32", "chosen as"], rows, align="llrrrrrrl")
        front = pareto_front(timed_pts, x="latency_ms_b1")
        lines += ["", "Pareto front over the timed points (accuracy vs latency at batch 1): "
                  + ", ".join(f"{p.method} {knob_label(p)}" for p in front) + "."]
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
