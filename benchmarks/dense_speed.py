"""How fast the dense model can be on this CPU: every dense reference in one interleaved run.

Times, on 128 review test texts at batch 1 and 32 (the same samples for every case):
`transformers` as loaded (batches in drawn order), adaptinf dense padded (same batches), adaptinf
dense at its best (padding-free, length-bucketed batches), and what a user deploying on CPU would
pick: adaptinf dense int8 and ONNX Runtime fp32 / int8 (length-bucketed), and adaptinf dense
compiled (`torch.compile`, inductor with frozen weights; compiled before timing). Each row carries the
machine's measured matmul rate and the case's achieved share of it.

    .venv/bin/python benchmarks/dense_speed.py --threads 2 --out results/dense-speed

Writes bench.csv/json and bench.md in --out; the last line printed is
`best_dense_vs_transformers b1=<x> b32=<y>` (adaptinf's best fp32 dense against `transformers`,
ratio of medians in this run).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from adaptinf.bench import format_table, run_bench, write_bench
from adaptinf.data import encode, rotten_tomatoes
from adaptinf.references import against_best, bench_batches, dense_references


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6",
                   help="a dense model directory, or a built-in / HF checkpoint name (fresh head: speed only)")
    p.add_argument("--samples", type=int, default=128, help="test texts per batch size")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's choice)")
    p.add_argument("--no-onnx", action="store_true", help="leave out the ONNX Runtime references")
    p.add_argument("--no-compile", action="store_true", help="leave out dense compiled (torch.compile, ~1 min per shape)")
    p.add_argument("--out", default="results/dense-speed")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from adaptinf.steps import dense_from_pretrained

    task = rotten_tomatoes(0)
    if Path(args.model, "config.json").exists():
        from adaptinf.registry import load_model

        dense = load_model(args.model)
    else:
        dense, _ = dense_from_pretrained(args.model, task.labels, 64, 0.1, 0)
    dense.eval()
    enc = encode(*task.test, dense.tokenizer, dense.spec.max_length, warn=False)
    bucketed, drawn = bench_batches(enc, (1, 32), args.samples, seed=0, pad_id=dense.spec.encoder.pad_token_id)
    with tempfile.TemporaryDirectory() as tmp:
        refs = dense_references(dense, drawn, onnx=not args.no_onnx, workdir=tmp, threads=torch.get_num_threads(),
                                compile=not args.no_compile)
        rows = run_bench(refs.cases, bucketed, repeats=args.repeats, warmup=args.warmup, reference="transformers",
                         **refs.bench_kwargs())
    rows = against_best(rows)
    out = Path(args.out)
    write_bench(rows, out)
    table = format_table(rows)
    (out / "bench.md").write_text(table + "\n")
    print(table)
    by = {(r.case, r.batch_size): r for r in rows}
    mine = [c for c in ("dense", "dense padded", "dense compiled") if (c, 1) in by]
    ours = {b: min((by[(c, b)] for c in mine), key=lambda r: r.median_ms) for b in (1, 32)}
    for b in (1, 32):
        print(f"batch {b}: adaptinf's best fp32 dense is {ours[b].case!r}")
    ratio = {b: by[("transformers", b)].median_ms / ours[b].median_ms for b in (1, 32)}
    print(f"best_dense_vs_transformers b1={ratio[1]:.2f} b32={ratio[32]:.2f}")


if __name__ == "__main__":
    main()
