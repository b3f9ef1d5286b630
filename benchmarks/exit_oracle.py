"""What limits an early-exit model: its exits' accuracy, or its exit decision? (issue 17)

For a trained early-exit model (EE, SWEET or Multi-Model, e.g. a run folder's methods/ee/model) and
its dense model, on validation and test (every sample), from one pass that keeps every exit's logits
(`MultiExitClassifier.exit_logits`):

- each exit's own accuracy;
- the **consistency oracle**: each sample stops at the first exit whose prediction equals the last
  exit's (CALM's consistency target): the last exit's accuracy at the least cost any decision rule
  that keeps the last exit's answers can reach;
- the **correctness oracle**: the first exit that is right (the last exit when none is): the best
  accuracy and the least cost any decision rule can reach with these exits;
- the model's own decision (its confidence measure, temperatures as trained) at every knob value:
  the cheapest point within `--max-drop` points of dense on validation, and its test accuracy.

If an oracle sits within the drop at a much larger FLOPs reduction than the confidence rule, the
decision rule is the limit; if even the consistency oracle is short of the target, the exits are.
Costs are the model's own `cost` (blocks run at each sample's real length plus the exit heads
evaluated), reductions against the dense model's FLOPs on the same samples.

    .venv/bin/python benchmarks/exit_oracle.py /work/runs/full/methods/ee/model /work/runs/full/dense/best \\
        --points /work/runs/full/points/ee/points.json --out benchmarks/results/issue17-exit-oracle/ee.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adaptinf import flops
from adaptinf.registry import load_model
from adaptinf.steps import encode_split, load_task, recorded_task


def oracle_exits(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[n] the first exit whose prediction equals `target` [n] (the last exit where none does), from
    all exits' logits z [n_exits, n, C]."""
    hit = z.argmax(-1) == target[None, :]  # [E, n]
    hit[-1] = True
    return hit.int().argmax(0)  # the first True


def split_report(model, dense, enc, knobs) -> dict:
    z, lengths = model.exit_logits(enc, batch_size=128)
    y, n = enc.labels, len(enc)
    rows = torch.arange(n)
    dense_cost = float(flops.dense_model(lengths, model.spec.encoder, model.spec.num_labels).double().sum())
    with torch.inference_mode():
        dense_acc = float(torch.cat([dense(b.input_ids, b.attention_mask).logits.argmax(-1) for b in
                                     _batches(enc)]).eq(_labels(enc)).double().mean())

    def point(exit_index: torch.Tensor) -> dict:
        acc = float((z[exit_index, rows].argmax(-1) == y).double().mean())
        cost = float(model.cost(exit_index, lengths).sum())
        share = torch.bincount(exit_index, minlength=model.num_exits).double() / n
        return {"accuracy": acc, "flops_reduction": dense_cost / cost, "exit_share": share.tolist()}

    return {
        "n": n, "dense_accuracy": dense_acc,
        "exit_accuracy": (z.argmax(-1) == y[None, :]).double().mean(1).tolist(),
        "consistency_oracle": point(oracle_exits(z, z[-1].argmax(-1))),
        "correctness_oracle": point(oracle_exits(z, y)),
        "rule": {str(k): point(model.exit_decisions(z, k)) for k in knobs},
    }


def _batches(enc):
    from adaptinf.data import eval_batches

    return list(eval_batches(enc, 128, pad_id=0, sort_by_length=True))


def _labels(enc) -> torch.Tensor:
    return torch.cat([b.labels for b in _batches(enc)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a trained early-exit model directory (ee, sweet or multi-model)")
    p.add_argument("dense", help="the dense model directory it was converted from")
    p.add_argument("--max-drop", type=float, default=1.0, help="points below dense's validation accuracy allowed")
    p.add_argument("--points", default=None,
                   help="a run's points.json for this model: its knob values (with the run's refinements) are swept")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, dense = load_model(args.model).eval(), load_model(args.dense).eval()
    if not hasattr(model, "exit_logits"):
        raise SystemExit(f"{args.model} is a {model.method!r} model, not an early-exit one")
    from adaptinf.settings import TaskSettings

    recorded = {k: v for k, v in (recorded_task(args.dense) or {}).items() if k != "data_digest"}
    task = load_task(TaskSettings.from_dict(recorded))
    knobs = [k for k in model.knob_values() if k is not None]
    if args.points:
        knobs = sorted({float(pt["knob"]) for pt in json.loads(Path(args.points).read_text()) if pt["knob"] is not None})
    knobs.append(None)
    report = {"model": args.model, "dense": args.dense, "method": model.method,
              "exit_layers": list(model.exit_layers)}
    for split in ("validation", "test"):
        report[split] = split_report(model, dense, encode_split(model, task, split, None, 0), knobs)
    val, test = report["validation"], report["test"]
    floor = val["dense_accuracy"] - args.max_drop / 100
    within = [k for k, pt in val["rule"].items() if pt["accuracy"] >= floor]
    if within:
        best = max(within, key=lambda k: val["rule"][k]["flops_reduction"])
        report["chosen"] = {"knob": best, "val": val["rule"][best], "test": test["rule"][best]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for split in ("validation", "test"):
        r = report[split]
        print(f"{split}: dense {100 * r['dense_accuracy']:.2f}; exits "
              + " / ".join(f"{100 * a:.1f}" for a in r["exit_accuracy"]))
        for name in ("consistency_oracle", "correctness_oracle"):
            o = r[name]
            print(f"  {name}: {100 * o['accuracy']:.2f} at {o['flops_reduction']:.2f}x")
    if "chosen" in report:
        c = report["chosen"]
        print(f"rule: knob {c['knob']}: val {100 * c['val']['accuracy']:.2f} at {c['val']['flops_reduction']:.2f}x, "
              f"test {100 * c['test']['accuracy']:.2f} at {c['test']['flops_reduction']:.2f}x")


if __name__ == "__main__":
    main()
