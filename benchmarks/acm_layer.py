"""One ACM layer's time against the number of executed learners, next to the dense FFN it replaces.

Input: the token states entering layer 1's FFN for batches of real validation samples in split order (review
task, MiniLM-L6 tokenizer, padded to the batch's longest sample), taken from a saved ACM model (or a
fresh conversion of a dense model: timing depends on shapes, not on trained weights). Every real
token runs k learners through the token-grouped path (`Learners.grouped`); padding runs nothing.
Cases, timed interleaved (round-robin, median of repeats): the dense FFN (up, GELU, down on every
position, as the dense model runs it), the dense FFN on the real tokens only (gathered and scattered
back: what skipping padding alone saves), the ACM learners at k = 0..N for every token, and the gate
alone. The ratio column is each case's time over the dense FFN's in the same run.

    .venv/bin/python benchmarks/acm_layer.py runs/acm-b0.4 --out benchmarks/results/acm-layer

Writes results.json and results.md (machine, threads, torch version, batch size, lengths stamped).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptinf.backbone import attention_bias

from adaptinf.bench import machine_name
from adaptinf.data import encode, eval_batches, rotten_tomatoes
from adaptinf.methods.acm import AcmClassifier, AcmConfig


def load_acm(path: str) -> AcmClassifier:
    import adaptinf

    model = adaptinf.load(path)
    if isinstance(model, AcmClassifier):
        return model
    if model.method != "dense":
        raise SystemExit(f"{path} holds a {model.method!r} model; give an ACM model or a dense model to convert")
    acm = AcmClassifier.from_dense(model, AcmConfig())
    acm.tokenizer = model.tokenizer
    return acm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="an ACM model directory, or a dense one (converted here)")
    p.add_argument("--out", default="results/acm-layer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="validation batches timed per case and repeat")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_acm(args.model).eval()
    if "ffn" not in model.config.targets:
        raise SystemExit("this benchmark times an FFN ACM; the model has no FFN ACMs")
    task = rotten_tomatoes(0)
    enc = encode(*task.validation, model.tokenizer, args.max_length, warn=False)
    block = model.encoder.blocks[0]
    mod = model.module("0.ffn")
    cfg = model.spec.encoder  # the dense FFN's shape (an ACM model keeps no dense FFN; timing needs no trained weights)
    up, down = torch.nn.Linear(cfg.hidden_size, cfg.intermediate_size), torch.nn.Linear(cfg.intermediate_size, cfg.hidden_size)
    n = mod.n

    with torch.inference_mode():
        inputs = []
        for i, b in enumerate(eval_batches(enc, args.batch_size, sort_by_length=False)):
            if i == args.batches:
                break
            x = block.attention(model.encoder.embed(b.input_ids, None), attention_bias(b.attention_mask, torch.float32))
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            real = b.attention_mask.reshape(-1).bool()
            inputs.append((flat, real, b.attention_mask.sum(1)))

        def dense_case(x, real):
            return down(F.gelu(up(x)))

        def dense_real_case(x, real):  # the same FFN on the real tokens only (gathered), no padding
            rows = real.nonzero().squeeze(1)
            return torch.zeros_like(x).index_copy_(0, rows, down(F.gelu(up(x.index_select(0, rows)))))

        def acm_case(kk):
            def run(x, real):
                k = real.to(torch.int64) * kk  # padding: 0 learners
                return mod.learners.grouped(x, k)
            return run

        def gate_case(x, real):
            return mod.pick(mod.gate(x[real]), None)

        cases = {"dense FFN": dense_case, "dense FFN, real tokens only": dense_real_case, **{f"ACM k={kk}": acm_case(kk) for kk in range(n + 1)}, "gate": gate_case}
        for fn in cases.values():  # warm-up
            for x, real, _ in inputs[:2]:
                fn(x, real)
        times = {name: [] for name in cases}
        for r in range(args.repeats):
            order = list(cases.items()) if r % 2 == 0 else list(reversed(cases.items()))
            for name, fn in order:
                t0 = time.perf_counter()
                for x, real, _ in inputs:
                    fn(x, real)
                times[name].append((time.perf_counter() - t0) * 1e3 / len(inputs))

    lengths = torch.cat([ln for _, _, ln in inputs])
    dense_ms = statistics.median(times["dense FFN"])
    rows = [{"case": name, "ms_per_batch": round(statistics.median(t), 4),
             "ratio_vs_dense_ffn": round(statistics.median(t) / dense_ms, 3)} for name, t in times.items()]
    results = {
        "machine": machine_name(), "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "python_version": platform.python_version(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "layer": 0, "learners": n, "hidden": up.in_features, "intermediate": up.out_features,
        "batch_size": args.batch_size, "batches": len(inputs), "repeats": args.repeats, "max_length": args.max_length,
        "mean_real_length": round(float(lengths.float().mean()), 2), "mean_padded_length": round(inputs[0][0].shape[0] / args.batch_size, 2),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| case | ms per batch | vs dense FFN |", "|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['ms_per_batch']:.3f} | {r['ratio_vs_dense_ffn']:.3f} |" for r in rows]
    lines += ["", f"{results['machine']}, {results['torch_threads']} threads, torch {results['torch_version']}; "
              f"batch {args.batch_size} of validation samples (mean real length {results['mean_real_length']} tokens, "
              f"max length {args.max_length}), {len(inputs)} batches x {args.repeats} repeats, median; {results['timestamp']}"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
