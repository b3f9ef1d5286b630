"""One PLANER MoE layer's time against the number of active experts, next to the dense FFN it replaces.

Input: the token states entering layer 1's FFN for batches of real validation samples in split order
(review task, MiniLM-L6 tokenizer, padded to the batch's longest sample), from a saved PLANER model
(its trained routers pick the experts) or a fresh conversion of a dense model (untrained routers:
the expert mix differs, the shapes do not). Cases, timed interleaved (round-robin, median of
repeats): the dense FFN on every position (as the dense model runs it), the dense FFN on the real
tokens only, the MoE layer (router, top-k selection, grouped experts on the real tokens) at
top-k 1, 2 (25% of 8 experts), 4 and 8 with each expert-execution path (`torch._grouped_mm`, and
the portable per-expert loop with its one host sync), and the router alone. The ratio column is
each case's time over the dense FFN's in the same run.

    .venv/bin/python benchmarks/planer_layer.py runs/planer-moe8 --out benchmarks/results/planer-layer --threads 2

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
from adaptinf.methods.planer import PlanerClassifier, PlanerConfig, grouped_experts, grouped_mm_works, select_experts


def load_planer(path: str) -> PlanerClassifier:
    import adaptinf

    model = adaptinf.load(path)
    if isinstance(model, PlanerClassifier):
        return model
    if model.method != "dense":
        raise SystemExit(f"{path} holds a {model.method!r} model; give a PLANER model or a dense model to convert")
    planer = PlanerClassifier.from_dense(model, PlanerConfig())
    planer.tokenizer = model.tokenizer
    return planer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a PLANER model directory, or a dense one (converted here, routers untrained)")
    p.add_argument("--out", default="results/planer-layer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="validation batches timed per case and repeat")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_planer(args.model).eval()
    task = rotten_tomatoes(0)
    enc = encode(*task.validation, model.tokenizer, args.max_length, warn=False)
    block, router = model.encoder.blocks[0], model.routers[0]
    ffn = block.ffn
    e = model.config.num_experts
    impls = ["grouped_mm", "loop"] if grouped_mm_works("cpu", torch.float32) else ["loop"]

    with torch.inference_mode():
        inputs = []
        for i, b in enumerate(eval_batches(enc, args.batch_size, sort_by_length=False)):
            if i == args.batches:
                break
            x = block.attention(model.encoder.embed(b.input_ids, None), attention_bias(b.attention_mask, torch.float32))
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            real = b.attention_mask.reshape(-1).nonzero().squeeze(1)
            inputs.append((flat, real, b.attention_mask.sum(1)))

        def dense_case(x, real):
            return ffn.down(F.gelu(ffn.up(x)))

        def dense_real_case(x, real):  # the same FFN on the real tokens only (gathered), no padding
            return torch.zeros_like(x).index_copy_(0, real, ffn.down(F.gelu(ffn.up(x.index_select(0, real)))))

        def moe_case(k, impl):
            def run(x, real):
                xr = x.index_select(0, real)
                sel = select_experts(router(xr), k, None)
                y = grouped_experts(xr, sel, ffn.up.weight, ffn.up.bias, ffn.down.weight, impl=impl) + ffn.down.bias
                return torch.zeros_like(x).index_copy_(0, real, y)
            return run

        def router_case(x, real):
            return select_experts(router(x.index_select(0, real)), 2, None)

        cases = {"dense FFN": dense_case, "dense FFN, real tokens only": dense_real_case}
        for k in (1, 2, 4, e):
            for impl in impls:
                cases[f"MoE top-{k} of {e} ({impl})"] = moe_case(k, impl)
        cases["router + top-2 selection"] = router_case
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
        "model": args.model, "layer": 0, "experts": e, "hidden": ffn.up.in_features, "intermediate": ffn.up.out_features,
        "batch_size": args.batch_size, "batches": len(inputs), "repeats": args.repeats, "max_length": args.max_length,
        "mean_real_length": round(float(lengths.float().mean()), 2),
        "mean_padded_length": round(inputs[0][0].shape[0] / args.batch_size, 2), "rows": rows,
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
