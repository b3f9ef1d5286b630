"""What a two-model Multi-Model cascade (a 1-layer model, then the 6-layer one) could reach, simulated
from models already trained, with no training.

    python benchmarks/results/issue17-early-exit/mm_cascade_sim.py SWEET_DIR DENSE_DIR --out FILE.json

SWEET's first exit is trained by its own cross-entropy alone (the state is detached after it, so the
embeddings, layer 1 and its head see no other loss): it is what Multi-Model's 1-layer model is, up
to the seed. The dense model is what its 6-layer model is. A sample that escalates pays for both
(embeddings twice, 1 + 6 layers, both heads), as in `MultiModelClassifier`. The exit-1 temperature is
fitted on validation (as the SWEET model's own); the threshold is the cheapest of a fixed grid whose
validation accuracy is within 1 point of the dense model's own validation accuracy; test reported.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from adaptinf import flops
from adaptinf.data import encode
from adaptinf.methods.early_exit import fit_temperature
from adaptinf.registry import load_model
from adaptinf.settings import TaskSettings
from adaptinf.steps import load_task


@torch.inference_mode()
def dense_logits(model, enc, batch_size=64):
    from adaptinf.data import eval_batches

    out = torch.empty(len(enc), model.spec.num_labels)
    for b in eval_batches(enc, batch_size, pad_id=model.spec.encoder.pad_token_id):
        out[b.index] = model(b.input_ids, b.attention_mask).logits.float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweet")
    ap.add_argument("dense")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    small, dense = load_model(args.sweet).eval(), load_model(args.dense).eval()
    assert small.exit_layers[0] == 1, "the first exit must sit after layer 1"
    task = load_task(TaskSettings(), labels=small.spec.labels)
    cfg, c = small.spec.encoder, small.spec.num_labels
    res = {"sweet": args.sweet, "dense": args.dense}
    data = {}
    for s in ("validation", "test"):
        enc = encode(*task.split(s), small.tokenizer, small.spec.max_length, warn=False)
        z1, lengths = small.exit_logits(enc)
        zd = dense_logits(dense, enc)
        c1 = flops.embeddings(lengths, cfg) + flops.block(lengths, cfg) + flops.head(cfg, c) + lengths * cfg.hidden_size
        cd = flops.dense_model(lengths, cfg, c)
        data[s] = (z1[0], zd, enc.labels, c1.double(), cd.double())
        res[f"{s}_exit1_acc"] = float((z1[0].argmax(-1) == enc.labels).double().mean())
        res[f"{s}_dense_acc"] = float((zd.argmax(-1) == enc.labels).double().mean())
        res[f"{s}_dense_gflops"] = float(cd.double().mean()) / 1e9
    t = fit_temperature(data["validation"][0], data["validation"][2])[0]
    res["exit1_temperature_validation"] = t
    rows = []
    for knob in [round(float(v), 4) for v in np.arange(0.5, 1.0, 0.0005)]:
        row = {"knob": knob}
        for s, (z1, zd, y, c1, cd) in data.items():
            stop = (z1 / t).softmax(-1).amax(-1) >= knob
            pred = torch.where(stop, z1.argmax(-1), zd.argmax(-1))
            row[f"{s}_acc"] = float((pred == y).double().mean())
            row[f"{s}_gflops"] = float(torch.where(stop, c1, c1 + cd).mean()) / 1e9
            row[f"{s}_share_exit1"] = float(stop.double().mean())
        rows.append(row)
    ok = [r for r in rows if r["validation_acc"] >= res["validation_dense_acc"] - 0.01]
    best = min(ok, key=lambda r: r["validation_gflops"]) if ok else None
    if best:
        best["flops_reduction_test"] = res["test_dense_gflops"] / best["test_gflops"]
        best["test_drop_points"] = 100 * (res["test_dense_acc"] - best["test_acc"])
    res["chosen"] = best
    # the share of samples the 1-layer model must stop for 2x fewer FLOPs than dense, on test
    c1m, cdm = float(data["test"][3].double().mean()), float(data["test"][4].double().mean())
    res["share_needed_for_2x"] = (c1m + cdm - cdm / 2) / cdm
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
