"""`make demo`: the main job on the built-in model and data, sized for a 2-core machine.

Steps (each is a plain `adaptinf` command, printed before it runs, so a user can rerun any of them):
1. finetune MiniLM-L6 on a seeded subset of the review task's training split (resumes if interrupted);
2. evaluate the dense model on validation and test, with latency at batch 1 and 32;
3. bench our dense forward against transformers' BertForSequenceClassification (same weights);
4. convert MiniLM-L6 with each early-exit method (ee, sweet, multi-model), trained on the same
   subset, and evaluate every exit threshold on validation and test;
5. bench, in one run, the dense model and each early-exit model at its cheapest threshold within
   1 accuracy point of dense on validation;
6. report: markdown table (every method), Pareto front, each exit's accuracy, trade-off plot.

This demo trains on a subset for time; the README's results come from a full run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from adaptinf.cli import main as cli
from adaptinf.evaluate import cheapest_within_drop, read_points


def _run(args: list[str]) -> None:
    print(f"\n$ adaptinf {shlex.join(args)}", flush=True)
    rc = cli(args)
    if rc:
        sys.exit(rc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaptinf.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    p.add_argument("--train-samples", type=int, default=2000, help="training subset size (default 2000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    threads = ["--threads", str(args.threads)] if args.threads else []
    _run(["finetune", "--out", str(out / "dense"), "--epochs", str(args.epochs), "--lr", "8e-5",
          "--max-train-samples", str(args.train_samples), "--save-every", "20", *threads])
    model = str(out / "dense" / "best")
    _run(["evaluate", model, "--split", "both", "--latency", "--latency-samples", "64", "--repeats", "5",
          "--name", "dense (MiniLM-L6)", "--out", str(out / "points"), *threads])
    _run(["bench", model, "--compare-hf", "--samples", "64", "--repeats", "5", "--out", str(out / "bench"), *threads])
    early = []
    for method, extra in (("ee", []), ("sweet", []), ("multi-model", ["--set", "exits=[2,4,6]"])):
        early.append(str(out / method))
        _run(["convert", "minilm-l6", "--method", method, *extra, "--out", early[-1], "--epochs", str(args.epochs),
              "--lr", "8e-5", "--max-train-samples", str(args.train_samples), "--save-every", "20", *threads])
    _run(["evaluate", *early, "--split", "both", "--out", str(out / "points-early-exit"), *threads])
    picked = cheapest_within_drop(read_points([out / "points", out / "points-early-exit"]), 0.01)
    if picked:
        _run(["bench", model, *[f"{t.model_dir}@{t.knob!r}" for _, t, _ in picked], "--samples", "64",
              "--repeats", "5", "--out", str(out / "bench-early-exit"), *threads])
    _run(["report", str(out / "points"), str(out / "points-early-exit"), "--out", str(out / "report"),
          "--title", f"adaptinf demo: MiniLM-L6 methods trained on {args.train_samples} review snippets ({args.epochs} epoch)"])
    print(f"\ndemo finished in {time.time() - t0:.0f} s; report: {out / 'report' / 'report.md'}, "
          f"plot: {out / 'report' / 'tradeoff.png'}, latency vs transformers: {out / 'bench' / 'bench.csv'}, "
          f"early exit vs dense: {out / 'bench-early-exit' / 'bench.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
