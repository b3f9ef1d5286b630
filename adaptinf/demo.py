"""`make demo`: the main job on the built-in model and data, sized for a 2-core machine.

Steps (each is a plain `adaptinf` command, printed before it runs, so a user can rerun any of them):
1. finetune MiniLM-L6 on a seeded subset of the review task's training split (resumes if interrupted);
2. evaluate every saved model on validation and test, with latency at batch 1 and 32;
3. bench our dense forward against transformers' BertForSequenceClassification (same weights);
4. report: markdown table + trade-off plot.

This demo trains on a subset for time; the README's results come from a full run.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from adaptinf.cli import main as cli


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
    _run(["report", str(out / "points"), "--out", str(out / "report"),
          "--title", f"adaptinf demo: dense MiniLM-L6 fine-tuned on {args.train_samples} review snippets ({args.epochs} epoch)"])
    print(f"\ndemo finished in {time.time() - t0:.0f} s; report: {out / 'report' / 'report.md'}, "
          f"plot: {out / 'report' / 'tradeoff.png'}, latency vs transformers: {out / 'bench' / 'bench.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
