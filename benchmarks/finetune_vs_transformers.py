"""Fine-tune our backbone and `transformers`' BertForSequenceClassification side by side.

Same pretrained weights (MiniLM-L6), same classifier initialisation, same split (the review task
split by film, seed 0), same batches in the same order, same AdamW groups, warm-up/decay schedule
and clipping. The two models' training steps are interleaved, so wall-clock time per step is
compared under the same machine load. After every epoch both are evaluated on validation; the
best epoch of each is reported on test.

    .venv/bin/python benchmarks/finetune_vs_transformers.py --out results/finetune-vs-transformers

Writes results.json and results.md (machine, threads, torch version stamped).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from adaptinf.bench import machine_name
from adaptinf.data import encode, eval_batches, rotten_tomatoes, steps_per_epoch, subsample, train_batches
from adaptinf.hf import load_encoder, load_tokenizer, resolve_model_path
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import ModelSpec
from adaptinf.recipes.finetune import lr_at, make_optimizer
from adaptinf.settings import TrainConfig


@torch.inference_mode()
def accuracy(forward, enc) -> float:
    correct = 0
    for b in eval_batches(enc, 64):
        correct += int((forward(b).argmax(-1) == b.labels).sum())
    return correct / len(enc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/finetune-vs-transformers")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="initialisation, dropout and batch-order seed")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test split")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (the quick preset uses 8e-5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--models", default="adaptinf,transformers",
                   help="comma-separated subset of adaptinf,transformers (one per process: two cores, two jobs)")
    args = p.parse_args()
    wanted = args.models.split(",")
    if not wanted or set(wanted) - {"adaptinf", "transformers"}:
        p.error(f"--models: a comma-separated subset of adaptinf,transformers, not {args.models!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg = TrainConfig(epochs=args.epochs, batch_size=32, lr=args.lr, seed=args.seed)
    task = rotten_tomatoes(args.split_seed)
    tok = load_tokenizer("minilm-l6")
    train = encode(*subsample(task.train, args.max_train_samples, args.seed), tok, 64, warn=False)
    val, test = encode(*task.validation, tok, 64, warn=False), encode(*task.test, tok, 64, warn=False)

    encoder, path = load_encoder("minilm-l6")
    torch.manual_seed(args.seed)
    ours = DenseClassifier(ModelSpec(encoder.cfg, task.labels, 64, "minilm-l6"))
    ours.encoder.load_state_dict(encoder.state_dict())
    theirs = BertForSequenceClassification.from_pretrained(resolve_model_path("minilm-l6"), num_labels=2,
                                                           attn_implementation="sdpa")
    with torch.no_grad():  # same classifier start
        theirs.classifier.weight.copy_(ours.classifier.weight)
        theirs.classifier.bias.copy_(ours.classifier.bias)

    models = {
        "adaptinf": (ours, lambda b: ours(b.input_ids, b.attention_mask).logits),
        "transformers": (theirs, lambda b: theirs(input_ids=b.input_ids, attention_mask=b.attention_mask).logits),
    }
    models = {name: v for name, v in models.items() if name in wanted}
    opts = {name: make_optimizer(m, cfg) for name, (m, _) in models.items()}
    total = steps_per_epoch(len(train), cfg.batch_size) * cfg.epochs
    seconds = {name: 0.0 for name in models}
    history = {name: [] for name in models}
    best = {name: (-1.0, None, 0) for name in models}
    step = 0
    bar = tqdm(total=total, desc="finetune both", unit="step")
    for epoch in range(cfg.epochs):
        for m, _ in models.values():
            m.train()
        for batch, _, _ in train_batches(train, cfg.batch_size, cfg.seed, epoch):
            lr = lr_at(step, total, cfg)
            for name, (m, fwd) in (models.items() if step % 2 == 0 else reversed(models.items())):
                t0 = time.perf_counter()
                opt = opts[name]
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(fwd(batch), batch.labels).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.max_grad_norm)
                opt.step()
                seconds[name] += time.perf_counter() - t0
            step += 1
            bar.update(1)
        for name, (m, fwd) in models.items():
            m.eval()
            acc = accuracy(fwd, val)
            history[name].append(acc)
            if acc > best[name][0]:
                best[name] = (acc, copy.deepcopy(m.state_dict()), epoch + 1)
        bar.write(f"epoch {epoch + 1}: validation " + ", ".join(f"{n} {h[-1]:.4f}" for n, h in history.items()))
    bar.close()
    results = {
        "machine": machine_name(), "torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
        "python_version": platform.python_version(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "split": task.summary(), "seed": args.seed, "split_seed": args.split_seed, "n_train": len(train), "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "max_length": 64, "models": {},
    }
    for name, (m, fwd) in models.items():
        m.load_state_dict(best[name][1])
        m.eval()
        results["models"][name] = {
            "val_accuracy_per_epoch": history[name], "best_epoch": best[name][2],
            "test_accuracy": accuracy(fwd, test), "train_seconds": round(seconds[name], 1),
            "seconds_per_step": round(seconds[name] / total, 3),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "| model | val acc per epoch | best epoch | test acc | train s | s/step |", "|---|---|---:|---:|---:|---:|"]
    for name, r in results["models"].items():
        lines.append(f"| {name} | {', '.join(f'{a:.4f}' for a in r['val_accuracy_per_epoch'])} | {r['best_epoch']} "
                     f"| {r['test_accuracy']:.4f} | {r['train_seconds']} | {r['seconds_per_step']} |")
    lines.append("")
    lines.append(f"{results['split']}; {results['machine']}, {results['torch_threads']} threads, torch "
                 f"{results['torch_version']}; batch 32, lr {cfg.lr:g}, max length 64, {cfg.epochs} epochs; {results['timestamp']}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
