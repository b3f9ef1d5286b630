"""Issue 17, SHARCS: per-width accuracy, the routed curve, the router's gain over a random split with
the same width shares, the cheapest point within 1 point of dense (chosen on validation), and router
refits with other label thresholds (the widths' logits do not depend on the router: one pass per split).

python benchmarks/results/issue17-sharcs/analyze.py MODEL_DIR TRAIN_DIR --dense-val ACC --dense-test ACC
    --dense-gflops-val G --dense-gflops-test G [--max-train-samples N] [--refit "0.8,0.5;0.9,0.6" --window W]
"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import load_file

from adaptinf.recipes.sharcs import ROUTER_HELD_OUT, ordinal_labels, prior_bce, train_router
from adaptinf.registry import load_model
from adaptinf.settings import TaskSettings
from adaptinf.steps import encode_split, load_task

torch.set_num_threads(1)
KNOBS = [0.0, 0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
         0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0]


def curve(model, router_logits, logits, lengths, labels, knobs):
    """Per knob: accuracy, GFLOPs, shares, random-split accuracy with the same shares."""
    acc_w = (logits.argmax(-1) == labels).double().mean(1)  # [n_w]
    rows = torch.arange(len(labels))
    out = []
    for k in knobs:
        ch = model.route(router_logits, k)
        acc = float((logits[ch, rows].argmax(-1) == labels).double().mean())
        share = torch.bincount(ch, minlength=model.num_widths).double() / len(labels)
        rand = float((share * acc_w).sum())
        out.append({"knob": k, "acc": 100 * acc, "gflops": float(model.cost(ch, lengths).mean()) / 1e9,
                    "share": [round(float(s), 4) for s in share], "random": 100 * rand, "gain": 100 * (acc - rand)})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("train_dir")
    ap.add_argument("--dense-val", type=float, required=True)
    ap.add_argument("--dense-test", type=float, required=True)
    ap.add_argument("--dense-gflops-val", type=float, required=True)
    ap.add_argument("--dense-gflops-test", type=float, required=True)
    ap.add_argument("--max-train-samples", type=int, default=None)
    ap.add_argument("--refit", default="", help="label lower ends per narrow width, variants split by ';'")
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    model = load_model(a.model).eval()
    task = load_task(TaskSettings(), labels=model.spec.labels)
    enc = {s: encode_split(model, task, s, a.max_train_samples if s == "train" else None, 0)
           for s in ("validation", "test")}
    passes = {s: model.width_pass(e, 64) for s, e in enc.items()}
    dense = {"validation": (a.dense_val, a.dense_gflops_val), "test": (a.dense_test, a.dense_gflops_test)}
    report = {"width_accuracy": {s: (100 * (p["logits"].argmax(-1) == enc[s].labels).double().mean(1)).tolist()
                                 for s, p in passes.items()}}
    n_w = model.num_widths
    width_gf = {s: [float(model.cost(torch.full_like(p["lengths"], i), p["lengths"]).mean()) / 1e9 for i in range(n_w)]
                for s, p in passes.items()}
    report["width_gflops"] = width_gf
    variants = {"trained": None}
    for v in filter(None, a.refit.split(";")):
        variants[v] = [float(x) for x in v.split(",")]
    train = fitted = None
    results = {}
    for name, lows in variants.items():
        extra = {}
        if lows is not None:
            if train is None:
                train = encode_split(model, task, "train", a.max_train_samples, 0)
                fitted = model.width_pass(train, 64, widths=False)["features"]
                hist = load_file(f"{a.train_dir}/history.safetensors")["history"]
                best = json.load(open(f"{a.model}/config.json"))["extra"]["training"]["best_epoch"]
                hist = hist[:best]
            w = a.window or model.config.window
            intervals = [(lo, 1.0) for lo in lows] + [(0.0, 1.0)]
            y = ordinal_labels(hist[-w:], intervals)
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(7))
            held, fit = perm[: int(round(ROUTER_HELD_OUT * len(train)))], perm[int(round(ROUTER_HELD_OUT * len(train))):]
            train_router(model, fitted[fit], y[fit], held_out=(fitted[held], y[held]))
            with torch.no_grad():
                z = model.router(fitted[held])
            extra = {"label_share": y.float().mean(0).tolist(),
                     "held_out_bce": float(torch.nn.functional.binary_cross_entropy_with_logits(z[:, :-1], y[held, :-1].float())),
                     "held_out_prior_bce": prior_bce(y[held, :-1].float(), y[fit].float().mean(0)[:-1])}
            with torch.no_grad():
                routers = {s: model.router(p["features"]) for s, p in passes.items()}
        else:
            routers = {s: p["router"] for s, p in passes.items()}
        cur = {s: curve(model, routers[s], passes[s]["logits"], passes[s]["lengths"], enc[s].labels, KNOBS)
               for s in passes}
        # the cheapest knob within 1 point of dense on validation, then test at that knob
        ok = [(c["gflops"], i) for i, c in enumerate(cur["validation"]) if c["acc"] >= dense["validation"][0] - 1.0]
        pick = None
        if ok:
            _, i = min(ok)
            v, t = cur["validation"][i], cur["test"][i]
            pick = {"knob": v["knob"], "val": v["acc"], "test": t["acc"], "test_drop": dense["test"][0] - t["acc"],
                    "reduction_val": dense["validation"][1] / v["gflops"], "reduction_test": dense["test"][1] / t["gflops"],
                    "share_test": t["share"], "gain_val": v["gain"], "gain_test": t["gain"]}
        results[name] = {**extra, "curve": cur, "pick": pick}
        print(f"== {name} {json.dumps(extra)}")
        for cv, ct in zip(cur["validation"], cur["test"]):
            print(f"  t={cv['knob']:<6} val {cv['acc']:.2f} ({cv['gflops']:.3f} GF, gain {cv['gain']:+.2f}, share {cv['share']})"
                  f" | test {ct['acc']:.2f} ({ct['gflops']:.3f} GF, gain {ct['gain']:+.2f}, share {ct['share']})")
        print(f"  pick: {json.dumps(pick)}")
    report["variants"] = results
    print("width accuracy", json.dumps(report["width_accuracy"]), "width GF", json.dumps(width_gf))
    if a.out:
        json.dump(report, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
