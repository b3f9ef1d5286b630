"""Where an early-exit model's temperatures are fitted, and what it does to the operating point.

    python benchmarks/results/issue17-early-exit/exit_analysis.py MODEL_DIR --out FILE.json [--threads 1]

For one saved ee / sweet / multi-model model on the built-in review task (seed 0): every exit's
logits on validation and test (and on the held-out calibration slice of the training split when the
model was trained with calibration "holdout"), then, for each set of per-exit temperatures
- "saved": what the recipe fitted (the model as saved),
- "validation": fitted on validation (the split that also picks the threshold),
- "holdout": fitted on the held-out training slice (only for a model trained with it: its training
  summary says calibration "train-holdout"),
- "none": T = 1,
the cheapest max-softmax threshold of one fixed grid whose validation accuracy is within
`--max-drop` points of dense (dense val 83.81 / test 83.68, 0.5702 test GFLOPs: the full preset's
dense of `benchmarks/results/early-exit-full`; with `--reference last-exit`, of the model's own last
exit), and its test accuracy and FLOPs reduction against dense's GFLOPs. The same
grid (0.5 to 1 in steps of 0.0005) for every set, so the sets are compared like for like; it is finer
than `adaptinf evaluate --refine 3`, whose points are the reported ones.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from adaptinf.checkpoint import read_config
from adaptinf.data import encode, subsample
from adaptinf.methods.early_exit import fit_temperature
from adaptinf.recipes.early_exit import split_calibration
from adaptinf.registry import load_model
from adaptinf.settings import TaskSettings
from adaptinf.steps import load_task

DENSE = {"val": 0.8381099922540666, "test": 0.8368136117556071, "test_gflops": 0.5702417355730859}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-drop", type=float, default=1.0)
    ap.add_argument("--reference", choices=["dense", "last-exit"], default="dense",
                    help="accuracy the drop is measured from: the full preset's dense, or the model's own last "
                         "exit (for models trained on a subset, far below dense); FLOPs always against dense")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    task = load_task(TaskSettings(), labels=model.spec.labels)
    enc = {s: encode(*task.split(s), model.tokenizer, model.spec.max_length, warn=False) for s in ("validation", "test")}
    z = {s: model.exit_logits(e) for s, e in enc.items()}  # (logits [n_exits, n, C], lengths [n])
    saved = model.temperature.clone()
    temps = {"saved": saved, "none": torch.ones_like(saved)}
    temps["validation"] = torch.tensor([fit_temperature(z["validation"][0][i], enc["validation"].labels)[0]
                                        for i in range(model.num_exits)], dtype=torch.float32)
    # a model saved before held-out calibration has no "calibration" in its training summary
    training = (read_config(args.model).get("extra") or {}).get("training") or {}
    if training.get("calibration") == "train-holdout":
        # the training samples the recipe saw (a --max-train-samples subset is drawn as steps.encode_split does)
        n = training["n_train"] + training["n_calibration"]
        train = encode(*subsample(task.split("train"), n, 0), model.tokenizer, model.spec.max_length, warn=False)
        _, calib = split_calibration(train, model.config.calibration_fraction, 0)
        zc, _ = model.exit_logits(calib)
        temps["holdout"] = torch.tensor([fit_temperature(zc[i], calib.labels)[0] for i in range(model.num_exits)],
                                        dtype=torch.float32)
    ref = dict(DENSE)
    if args.reference == "last-exit":
        ref["val"], ref["test"] = (float((z[s][0][-1].argmax(-1) == enc[s].labels).double().mean())
                                   for s in ("validation", "test"))
    grid = [round(float(v), 4) for v in np.arange(0.5, 1.0, 0.0005)] + [1.01]
    result = {"model": args.model, "method": model.method, "exit_layers": list(model.exit_layers),
              "exit_accuracy": {s: (z[s][0].argmax(-1) == enc[s].labels).double().mean(1).tolist() for s in enc},
              "reference": {"kind": args.reference, **ref}, "max_drop_points": args.max_drop, "temperatures": {}, "chosen": {}}
    for name, t in temps.items():
        with torch.no_grad():
            model.temperature.copy_(t)
        rows = []
        for knob in grid:
            row = {"knob": knob}
            for s, key in (("validation", "val"), ("test", "test")):
                logits, lengths = z[s]
                exit_index = model.exit_decisions(logits, knob)
                pred = logits[exit_index, torch.arange(len(lengths))].argmax(-1)
                row[f"{key}_acc"] = float((pred == enc[s].labels).double().mean())
                row[f"{key}_gflops"] = float(model.cost(exit_index, lengths).mean()) / 1e9
                if s == "test":
                    row["test_exit_shares"] = np.bincount(exit_index.numpy(), minlength=model.num_exits).tolist()
            rows.append(row)
        ok = [r for r in rows if r["val_acc"] >= ref["val"] - args.max_drop / 100]
        best = min(ok, key=lambda r: (r["val_gflops"], -r["val_acc"])) if ok else None
        if best is not None:
            best = {**best, "test_drop_points": 100 * (ref["test"] - best["test_acc"]),
                    "flops_reduction_test": DENSE["test_gflops"] / best["test_gflops"]}
        result["temperatures"][name] = t.tolist()
        result["chosen"][name] = best
        print(name, [round(v, 3) for v in t.tolist()], json.dumps(best))
    with torch.no_grad():
        model.temperature.copy_(saved)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
