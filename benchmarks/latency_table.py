"""PLANER's latency table for a saved model on this machine, and the additive model's error.

    python benchmarks/latency_table.py runs/planer --threads 2 --out table.json
"""

from __future__ import annotations

import argparse
import json

import torch

from adaptinf.recipes.latency_table import profile, validate
from adaptinf.registry import load_model


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/latency_table.py MODEL_DIR`: profile a saved PLANER model's latency table on this
    machine, print it, and report the additive model's error on a few architectures."""
    p = argparse.ArgumentParser(prog="python benchmarks/latency_table.py", description=main.__doc__)
    p.add_argument("model", help="a saved planer model directory (from `adaptinf convert --method planer`)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the model's latency_batch_size")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's latency_seq_len")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median kept)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, expect_method="planer", with_tokenizer=False)
    c = model.config
    table = profile(model, args.batch_size or c.latency_batch_size, args.seq_len or c.latency_seq_len, args.repeats)
    if args.out:
        table.save(args.out)
    print(json.dumps({k: v for k, v in table.to_dict().items() if k != "blocks"}, indent=2))
    for name, ms in table.blocks.items():
        print(f"{name:12s} {ms:9.3f} ms")
    layers = model.spec.encoder.num_hidden_layers
    e = c.num_experts
    archs = [model.architecture, ["full/dense"] * layers, [f"half/moe{max(1, e // 4)}"] * layers,
             ["full/half", "skip/dense"] * (layers // 2) + ["full/dense"] * (layers % 2)]
    check = validate(model, table, archs, args.repeats)
    for r in check["rows"]:
        print(f"predicted {r['predicted_ms']:8.2f} ms  measured {r['measured_ms']:8.2f} ms  "
              f"error {100 * r['relative_error']:+6.1f}%  {r['architecture']}")
    print(f"mean |error| {100 * check['mean_abs_relative_error']:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
