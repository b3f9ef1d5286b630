"""A learned exit decision on a trained early-exit model, without retraining it (issue 17).

`benchmarks/exit_oracle.py` showed that the exits of the full preset's EE and Multi-Model allow far
more than the max-softmax rule uses (consistency oracle EE 3.70x at the last exit's accuracy, rule
2.40x). This fits the "learned" exit policy (`adaptinf.recipes.early_exit.fit_decider`: per exit a
logistic model of P(exit i predicts what the last exit predicts) on cheap features of the logits)
on the same held-out calibration slice of the training split the recipe fitted the temperatures on
(`split_calibration` with the model's `calibration_fraction`, seed 0), then sweeps both rules on
validation and test from one pass per split that keeps every exit's logits:

- "max-softmax": the model as trained (its temperatures), on the same knob grid as before plus a
  uniform one, so the comparison is on equal terms;
- "learned": the fitted decider, knob = the probability threshold.

For each rule the cheapest point within `--max-drop` points of dense on validation, with its test
accuracy and FLOPs reduction (the model's own `cost`, the decider's dot products included, against
the dense model's FLOPs on the same samples). A check runs the real batched forward (compaction) at
the chosen knob on validation and compares its exits with the offline `exit_decisions`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/exit_decider.py /work/runs/full/methods/ee/model \\
        /work/runs/full/dense/best --out benchmarks/results/issue17-exit-oracle/ee-decider.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from adaptinf import flops
from adaptinf.data import Encoded, eval_batches
from adaptinf.methods.early_exit import DECIDER_FEATURES
from adaptinf.recipes.early_exit import decider_data, fit_decider, split_calibration
from adaptinf.registry import load_model
from adaptinf.settings import TaskSettings
from adaptinf.steps import encode_split, load_task, recorded_task


def cached_exit_logits(model, enc, path: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's logits [n_exits, n, C] and real lengths [n], read from `path` when there."""
    if path is not None and path.is_file():
        z, lengths = torch.load(path)
        if z.shape[:2] == (model.num_exits, len(enc)):
            return z, lengths
    z, lengths = model.exit_logits(enc, batch_size=128)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((z, lengths), path)
    return z, lengths


@torch.inference_mode()
def dense_accuracy(dense, enc) -> float:
    batches = eval_batches(enc, 128, pad_id=dense.spec.encoder.pad_token_id, sort_by_length=True)
    right = sum(int((dense(b.input_ids, b.attention_mask).logits.argmax(-1) == b.labels).sum()) for b in batches)
    return right / len(enc)


def sweep(model, z, lengths, y, knobs, dense_cost) -> dict[str, dict]:
    rows = torch.arange(z.shape[1])
    out = {}
    for k in knobs:
        exit_index = model.exit_decisions(z, k)
        acc = float((z[exit_index, rows].argmax(-1) == y).double().mean())
        cost = float(model.cost(exit_index, lengths).sum())
        share = torch.bincount(exit_index, minlength=model.num_exits).double() / len(y)
        out[str(k)] = {"accuracy": acc, "flops_reduction": dense_cost / cost, "exit_share": share.tolist()}
    return out


def chosen(val: dict, test: dict, floor: float) -> dict | None:
    within = [k for k, pt in val.items() if pt["accuracy"] >= floor]
    if not within:
        return None
    best = max(within, key=lambda k: (val[k]["flops_reduction"], val[k]["accuracy"]))
    return {"knob": best, "val": val[best], "test": test[best]}


def auc(score: torch.Tensor, target: torch.Tensor) -> float | None:
    """The probability that a random positive scores above a random negative (ties: half)."""
    pos, neg = score[target > 0.5], score[target <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return None
    return float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())


def decider_bce(model, z) -> list[dict]:
    """Per exit but the last, on a split's logits: the decider's BCE and the constant-rate BCE, and
    how well it ranks consistent samples first (AUC) against the calibrated max-prob alone."""
    x, t = decider_data(model, z)
    out = []
    for i in range(model.num_exits - 1):
        w = model.decider[i].double()
        logit = x[i].double() @ w[:-1] + w[-1]
        rate = float(t[i].mean())
        prior = torch.full_like(logit, float(np.log(max(rate, 1e-6) / max(1 - rate, 1e-6))))
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        out.append({"consistent": rate, "bce": float(bce(logit, t[i].double())),
                    "bce_prior": float(bce(prior, t[i].double())),
                    "accuracy_at_0.5": float(((logit >= 0) == (t[i] > 0.5)).double().mean()),
                    "auc": auc(logit, t[i]), "auc_max_prob": auc(x[i][:, 0], t[i])})
    return out


@torch.inference_mode()
def forward_matches_offline(model, enc, z, knob: float, n: int = 256) -> dict:
    """The real batched forward (compaction, batches of 32) at `knob` against `exit_decisions` on
    the first `n` samples of `enc`."""
    sub = Encoded(enc.ids[:n], enc.labels[:n])
    offline = model.exit_decisions(z[:, :n], knob)
    online = torch.empty(len(sub), dtype=torch.int64)
    for b in eval_batches(sub, 32, pad_id=model.spec.encoder.pad_token_id, sort_by_length=True):
        online[b.index] = model(b.input_ids, b.attention_mask, knob=knob).extras["exit"]
    return {"n": len(sub), "same_exit": float((online == offline).double().mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a trained early-exit model directory (ee, sweet or multi-model)")
    p.add_argument("dense", help="the dense model directory it was converted from")
    p.add_argument("--max-drop", type=float, default=1.0, help="points below dense's validation accuracy allowed")
    p.add_argument("--seed", type=int, default=0, help="the seed of the calibration slice (the recipe's train seed)")
    p.add_argument("--l2", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--cache", default=None, help="a folder to keep every split's exit logits in (reruns skip the model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, dense = load_model(args.model).eval(), load_model(args.dense).eval()
    recorded = {k: v for k, v in (recorded_task(args.dense) or {}).items() if k != "data_digest"}
    task = load_task(TaskSettings.from_dict(recorded))
    _, calib = split_calibration(encode_split(model, task, "train", None, 0), model.config.calibration_fraction,
                                 args.seed)
    enc = {"calibration": calib, "validation": encode_split(model, task, "validation", None, 0),
           "test": encode_split(model, task, "test", None, 0)}
    cache = Path(args.cache) if args.cache else None
    logits = {s: cached_exit_logits(model, e, cache / f"{model.method}-{s}.pt" if cache else None) for s, e in enc.items()}
    dense_acc = {s: dense_accuracy(dense, enc[s]) for s in ("validation", "test")}
    dense_cost = {s: float(flops.dense_model(logits[s][1], model.spec.encoder, model.spec.num_labels).double().sum())
                  for s in ("validation", "test")}
    floor = dense_acc["validation"] - args.max_drop / 100
    uniform = [round(float(v), 4) for v in np.arange(0.0, 1.0, 0.005)] + [round(float(v), 4) for v in
                                                                          1 - np.geomspace(5e-3, 1e-5, 20)]
    report = {"model": args.model, "dense": args.dense, "method": model.method, "exit_layers": list(model.exit_layers),
              "n": {s: len(e) for s, e in enc.items()}, "dense_accuracy": dense_acc, "max_drop": args.max_drop,
              "calibration": {"fraction": model.config.calibration_fraction, "seed": args.seed,
                              "temperature": model.temperature.tolist()}}
    for policy in ("max-softmax", "learned"):
        if policy == "learned":
            fitted = fit_decider(model, calib, l2=args.l2, steps=args.steps, exit_logits=logits["calibration"][0])
            report["decider"] = {"features": list(DECIDER_FEATURES), "weights": model.decider.tolist(), "l2": args.l2, "steps": args.steps,
                                 "calibration": fitted,
                                 **{s: decider_bce(model, logits[s][0]) for s in ("validation", "test")}}
        low = 0.0 if policy == "learned" else 1 / model.spec.num_labels  # max-softmax: from 1/C
        knobs = sorted({k for k in model.knob_values() if k is not None} | {round(low + (1 - low) * u, 6) for u in uniform})
        curves = {s: sweep(model, *logits[s], enc[s].labels, knobs, dense_cost[s]) for s in ("validation", "test")}
        best = chosen(curves["validation"], curves["test"], floor)
        if best is not None:
            best["forward_check"] = forward_matches_offline(model, enc["validation"], logits["validation"][0],
                                                            float(best["knob"]))
        report[policy] = {"chosen": best, **curves}
    report["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{model.method}: dense val {100 * dense_acc['validation']:.2f} test {100 * dense_acc['test']:.2f}")
    for policy in ("max-softmax", "learned"):
        c = report[policy]["chosen"]
        if c is None:
            print(f"  {policy}: no point within {args.max_drop} of dense on validation")
            continue
        print(f"  {policy}: knob {c['knob']}: val {100 * c['val']['accuracy']:.2f} at {c['val']['flops_reduction']:.2f}x, "
              f"test {100 * c['test']['accuracy']:.2f} at {c['test']['flops_reduction']:.2f}x "
              f"(forward = offline on {100 * c['forward_check']['same_exit']:.1f}%)")


if __name__ == "__main__":
    main()
