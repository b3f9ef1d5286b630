"""Exploratory (issue 17): would a decider that reads the exit's hidden state, not only its logits,
predict consistency with the last exit better? (CALM's learned classifier reads the hidden state.)

For the full preset's EE model: per exit, the vector its classifier reads (the exit head's pooled,
tanh'd summary, d = 384), captured by a forward hook; a logistic model on it (+ the logit
features of `decider_features`), L2-regularised, fitted on the recipe's calibration slice (5% of the
training split, seed 0), scored on validation and test by AUC for "exit i's prediction == the last
exit's", against the calibrated max-prob alone and the logit-only decider.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/exit_hidden_probe.py
"""

import json
import sys

import torch

from adaptinf.data import eval_batches
from adaptinf.recipes.early_exit import decider_data, fit_logistic, split_calibration
from adaptinf.registry import load_model
from adaptinf.settings import TaskSettings
from adaptinf.steps import encode_split, load_task, recorded_task

torch.set_num_threads(1)
OUT = "benchmarks/results/issue17-exit-oracle/ee-hidden-probe.json"
model = load_model("/work/runs/full/methods/ee/model").eval()
rec = {k: v for k, v in (recorded_task("/work/runs/full/dense/best") or {}).items() if k != "data_digest"}
task = load_task(TaskSettings.from_dict(rec))
_, calib = split_calibration(encode_split(model, task, "train", None, 0), model.config.calibration_fraction, 0)
enc = {"calibration": calib, "validation": encode_split(model, task, "validation", None, 0),
       "test": encode_split(model, task, "test", None, 0)}


@torch.inference_mode()
def pooled_and_logits(e):
    caught = {}
    hooks = [h.classifier.register_forward_hook(lambda m, a, o, i=i: caught.__setitem__(i, a[0]))
             for i, h in enumerate(model.heads)]
    H = torch.empty(model.num_exits, len(e), model.spec.encoder.hidden_size)
    Z = torch.empty(model.num_exits, len(e), model.spec.num_labels)
    try:
        for b in eval_batches(e, 128, pad_id=model.spec.encoder.pad_token_id, sort_by_length=True):
            Z[:, b.index] = model.all_exit_logits(b.input_ids, b.attention_mask).float()
            for i in range(model.num_exits):
                H[i, b.index] = caught[i].float()
    finally:
        for h in hooks:
            h.remove()
    return H, Z


def auc(score, target):
    pos, neg = score[target > 0.5], score[target <= 0.5]
    return float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())


data = {s: pooled_and_logits(e) for s, e in enc.items()}
model.set_policy("learned")
feats = {s: decider_data(model, data[s][1]) for s in enc}  # ([E-1, n, F], [E-1, n])
report = {"l2": {}, "note": __doc__.splitlines()[0]}
for l2 in (1e-1, 1.0, 10.0):
    rows = []
    for i in range(model.num_exits - 1):
        x = {s: torch.cat([data[s][0][i], feats[s][0][i]], 1) for s in enc}
        w, _ = fit_logistic(x["calibration"], feats["calibration"][1][i], l2=l2)
        row = {"exit": i}
        for s in ("validation", "test"):
            t = feats[s][1][i]
            row[s] = {"auc_hidden": auc(x[s].double() @ w[:-1], t), "auc_max_prob": auc(feats[s][0][i][:, 0], t)}
        rows.append(row)
        print(l2, i, {s: {k: round(v, 3) for k, v in row[s].items()} for s in ("validation", "test")}, flush=True)
    report["l2"][str(l2)] = rows
with open(OUT, "w") as f:
    json.dump(report, f, indent=2)
