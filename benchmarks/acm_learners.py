"""How many learners do an ACM model's tokens use? (ACM's "2-3 of 4 suffice", issue 18)

For a trained ACM classifier (e.g. a run folder's methods/acm/model), two answers:

- **after distillation** (the paper's claim): the gate-phase labels, the share of tokens for which k
  learners are "sufficient" under the model's label rule, per module, read from the training folder's
  gates/<module>.json (`--train`, default: the model folder's sibling train/);
- **at inference**: at each knob value given (or the run's chosen one from its summary.json), the
  share of real tokens that run k learners per module, their mean, and the CLS row apart from the
  other tokens (for a ViT: the patches), on a split's samples.

    .venv/bin/python benchmarks/acm_learners.py /work/runs/vision-full/methods/acm/model --knob 0 \\
        --out benchmarks/results/vision-full/acm-learners.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adaptinf.registry import load_model
from adaptinf.steps import encode_split, load_task, recorded_task


def label_shares(train_dir: Path, names: list[str]) -> dict:
    """Per module: {k: share} of the gate-phase "sufficient k" labels (empty when not there)."""
    found = {}
    for n in names:
        f = train_dir / "gates" / f"{n}.json"
        if f.is_file():
            found[n] = json.loads(f.read_text()).get("sufficient_k_share")
    return found


def _mean(hist: torch.Tensor) -> float:
    return float((hist * torch.arange(hist.shape[-1])).sum() / hist.sum().clamp_min(1))


@torch.inference_mode()
def usage(model, enc, knob, batch_size: int = 128) -> dict:
    """Per module: the share of real tokens at each k, its mean, for CLS and for the other tokens."""
    from adaptinf.data import eval_batches

    n_mod, top = len(model.names), model.config.learners
    cls = torch.zeros(n_mod, top + 1, dtype=torch.float64)
    rest = torch.zeros_like(cls)
    correct = total = 0
    for b in eval_batches(enc, batch_size, pad_id=model.spec.encoder.pad_token_id, sort_by_length=True):
        out = model(b.input_ids, b.attention_mask, knob=knob)
        k = out.extras["k"].long()  # [modules, b, s], 0 on padding
        real = b.attention_mask.bool()
        first = torch.zeros_like(real)
        first[:, 0] = True
        for m in range(n_mod):
            cls[m] += torch.bincount(k[m][real & first], minlength=top + 1).double()
            rest[m] += torch.bincount(k[m][real & ~first], minlength=top + 1).double()
        correct += int((out.logits.argmax(-1) == b.labels).sum())
        total += len(b.labels)
    per = {}
    for m, name in enumerate(model.names):
        both = cls[m] + rest[m]
        per[name] = {"share_per_k": (both / both.sum()).tolist(), "mean_k": _mean(both),
                     "mean_k_cls": _mean(cls[m]), "mean_k_other": _mean(rest[m])}
    all_tokens = (cls + rest).sum(0)
    return {"knob": knob, "accuracy": correct / max(total, 1), "n": total, "modules": per,
            "share_per_k": (all_tokens / all_tokens.sum()).tolist(), "mean_k": _mean(all_tokens)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a trained ACM model directory")
    p.add_argument("--train", default=None, help="its training folder (default: MODEL/../train)")
    p.add_argument("--knob", type=float, action="append", default=None,
                   help="gate bias values to measure (repeatable; default: the model's saved knob)")
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    if model.method != "acm":
        raise SystemExit(f"{args.model} is a {model.method!r} model, not an ACM one")
    from adaptinf.settings import TaskSettings

    recorded = {k: v for k, v in (recorded_task(args.model) or {}).items() if k != "data_digest"}
    task = load_task(TaskSettings.from_dict(recorded))
    enc = encode_split(model, task, args.split, args.max_samples, 0)
    train_dir = Path(args.train) if args.train else Path(args.model).resolve().parent / "train"
    knobs = args.knob or [model.knob]
    report = {"model": args.model, "split": args.split, "learners": model.config.learners,
              "label_rule": model.config.label_rule, "after_distillation": label_shares(train_dir, model.names),
              "inference": [usage(model, enc, k) for k in knobs]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name, share in report["after_distillation"].items():
        print(f"labels {name}: " + " ".join(f"k={k} {100 * v:.0f}%" for k, v in share.items()))
    for u in report["inference"]:
        print(f"knob {u['knob']}: accuracy {100 * u['accuracy']:.2f}, mean k {u['mean_k']:.2f} of {model.config.learners}; "
              + "; ".join(f"{n} {m['mean_k']:.2f} (CLS {m['mean_k_cls']:.2f})" for n, m in u["modules"].items()))


if __name__ == "__main__":
    main()
