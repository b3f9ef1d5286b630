"""What the one-layer benchmarks (acm_layer.py, planer_layer.py) share: the token states entering
layer 1's FFN for batches of real validation samples, interleaved timing of cases, and the
results files stamped with machine, threads, torch version, batch size and lengths."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from adaptinf.backbone import attention_bias
from adaptinf.bench import interleaved_rounds, machine_name, time_call, warm_up
from adaptinf.data import encode, eval_batches, rotten_tomatoes


def parser(description: str, model_help: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("model", help=model_help)
    p.add_argument("--out", default=default_out)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=8, help="validation batches timed per case and repeat")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    return p


def load_model(path: str, cls, threads: int | None):
    """The model at `path` as `cls` (a method class): itself, or a dense model converted with the
    method's default config (timing depends on shapes, not on trained weights); sets torch threads."""
    import adaptinf

    if threads:
        torch.set_num_threads(threads)
    model = adaptinf.load(path)
    if not isinstance(model, cls):
        if model.method != "dense":
            raise SystemExit(f"{path} holds a {model.method!r} model; give a {cls.method} model or a dense model to convert")
        tokenizer, model = model.tokenizer, cls.from_dense(model, cls.Config())
        model.tokenizer = tokenizer
    return model.eval()


def ffn_inputs(model, args) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(states [b*s, d] entering layer 1's FFN, real-token mask [b*s] bool, lengths [b]) per batch of
    validation samples in split order, padded to the batch's longest sample."""
    task = rotten_tomatoes(0)
    enc = encode(*task.validation, model.tokenizer, args.max_length, warn=False)
    block = model.encoder.blocks[0]
    inputs = []
    with torch.inference_mode():
        for i, b in enumerate(eval_batches(enc, args.batch_size, sort_by_length=False)):
            if i == args.batches:
                break
            x = block.attention(model.encoder.embed(b.input_ids, None), attention_bias(b.attention_mask, torch.float32))
            inputs.append((x.reshape(-1, x.shape[-1]).contiguous(), b.attention_mask.reshape(-1).bool(), b.attention_mask.sum(1)))
    return inputs


def time_cases(cases: dict[str, Callable], inputs: list[tuple], repeats: int) -> dict[str, list[float]]:
    """ms per batch of every case (called as fn(*input[:2])) over `inputs`, per repeat, with the
    package's timing protocol (`adaptinf.bench`): one warm-up pass on two batches, then rounds that
    time every case once in an order rotated by the round."""

    def over(fn: Callable, batches: list[tuple]) -> Callable[[], None]:
        def run() -> None:
            for x, real, *_ in batches:
                fn(x, real)
        return run

    with torch.inference_mode():
        warm_up({name: over(fn, inputs[:2]) for name, fn in cases.items()}, passes=1)
        timers = {name: (lambda run=over(fn, inputs): time_call(run) / len(inputs)) for name, fn in cases.items()}
        return interleaved_rounds(timers, repeats)


def write_results(args, times: dict[str, list[float]], inputs: list[tuple], reference: str, extra: dict) -> None:
    """results.json and results.md in args.out: the median ms per batch of each case and its ratio
    to the `reference` case of the same run."""
    lengths = torch.cat([ln for *_, ln in inputs])
    ref_ms = statistics.median(times[reference])
    rows = [{"case": name, "ms_per_batch": round(statistics.median(t), 4),
             "ratio_vs_dense_ffn": round(statistics.median(t) / ref_ms, 3)} for name, t in times.items()]
    results = {
        "machine": machine_name(), "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "python_version": platform.python_version(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "layer": 0, **extra,
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
