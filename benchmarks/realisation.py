"""How much of each method's FLOPs saving shows up as wall-clock speed, against the best dense.

Realisation = measured speed-up / analytic FLOPs reduction. It is mostly a property of execution:
every method is converted from the dense model (MiniLM-L6 with a fresh head, or `--dense DIR`; no
method training) unless a trained model is given (`--trained DIR`; needed where an untrained
method cannot reach the target, e.g. early exit, whose copied heads are not confident), and run at the knob whose analytic FLOPs reduction on the timed batches is nearest
`--target` (default 2x). Each is timed beside every dense reference (`adaptinf.references`) on 128
review test texts at batch 1 and 32 in one interleaved run; speed-ups are against the fastest fp32
dense reference (and against adaptinf's eager padding-free dense).

    .venv/bin/python benchmarks/realisation.py --threads 2 --out benchmarks/results/realisation

Writes bench.csv/json, bench.md and realisation.md (one row per method and batch size).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from adaptinf.bench import format_table, model_case, run_bench, write_bench
from adaptinf.data import encode, rotten_tomatoes
from adaptinf.references import against_best, bench_batches, dense_references
from adaptinf.registry import get_method, list_methods


def flops_reduction(model, dense, batches, knob) -> float:
    with torch.inference_mode():
        ours = sum(float(model(b.input_ids, b.attention_mask, knob=knob).flops.sum()) for b in batches)
        ref = sum(float(dense(b.input_ids, b.attention_mask).flops.sum()) for b in batches)
    return ref / ours


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=2.0, help="FLOPs reduction to pick each method's knob at")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", default=",".join(m for m in list_methods() if m != "dense"))
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--dense", default=None, help="a trained dense model directory (default: MiniLM-L6, fresh head)")
    p.add_argument("--trained", action="append", default=[], metavar="DIR",
                   help="a trained method's model directory, used instead of converting that method (repeatable)")
    p.add_argument("--out", default="results/realisation")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from adaptinf.steps import dense_from_pretrained

    task = rotten_tomatoes(0)
    from adaptinf.registry import load_model

    dense = load_model(args.dense) if args.dense else dense_from_pretrained("minilm-l6", task.labels, 64, 0.1, 0)[0]
    dense.eval()
    trained = {m.method: m for m in (load_model(d) for d in args.trained)}
    enc = encode(*task.test, dense.tokenizer, 64, warn=False)
    batches, drawn = bench_batches(enc, (1, 32), args.samples, seed=0)
    picked = {}
    with tempfile.TemporaryDirectory() as tmp:
        refs = dense_references(dense, drawn, onnx=not args.no_onnx, workdir=tmp, compile=not args.no_compile)
        for name in args.methods.split(","):
            cls = get_method(name)
            torch.manual_seed(0)
            model = (trained.get(name) or cls.from_dense(dense, cls.Config())).eval()
            knobs = [k for k in model.knob_values() if k is not None] or [None]
            red = {k: flops_reduction(model, dense, batches[32], k) for k in knobs}
            knob = min(red, key=lambda k: abs(red[k] - args.target))
            picked[name] = (knob, red[knob])
            refs.add(name, model_case(model, knob))
        rows = against_best(run_bench(refs.cases, batches, repeats=args.repeats, reference="dense", **refs.bench_kwargs()))
    out = Path(args.out)
    write_bench(rows, out)
    (out / "bench.md").write_text(format_table(rows) + "\n")
    by = {(r.case, r.batch_size): r for r in rows}
    lines = ["| method | knob | FLOPs reduction (b32 batches) | batch | speed-up vs best dense (which) | realisation vs best "
             "| speed-up vs eager dense | realisation vs eager dense |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for name, (knob, _) in picked.items():
        for b in (1, 32):
            r = by[(name, b)]
            red = r.flops_reduction_vs_reference
            lines.append(f"| {name} | {knob if knob is None else f'{knob:g}'} | {red:.2f}x | {b} "
                         f"| {r.speedup_vs_best:.2f}x ({r.best_reference}) | {r.speedup_vs_best / red:.2f} "
                         f"| {r.speedup_vs_reference:.2f}x | {r.realisation:.2f} |")
    r0 = rows[0]
    lines += ["", f"{r0.machine}, {r0.torch_threads} threads, torch {r0.torch_version}; {args.samples} review test "
              f"texts per batch size, median of {args.repeats} interleaved rounds; {r0.timestamp}. Methods converted "
              "from the dense model unless trained ones were given: " + (", ".join(sorted(trained)) or "none") + "."]
    (out / "realisation.md").write_text("\n".join(lines) + "\n")
    print(format_table(rows))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
