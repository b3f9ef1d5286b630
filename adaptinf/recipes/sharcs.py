"""Training of SHARCS (the model: `adaptinf.methods.sharcs`), as the SHARCS paper (Salehi et al.) does.

`fit` first sorts heads, FFN neurons and residual dimensions by importance on a seeded training
subset (`SharcsClassifier.reorder`), then trains every width and the router together:

- per epoch, each sample's router label (the widths it may use, multi-hot) comes from its last
  `window` epochs of true-class confidence (`hardness_labels`); the first `window` epochs are
  warm-up (label: the largest width only);
- each sample trains at one of its allowed widths this epoch, one width per batch (`epoch_plan`);
- loss: task_weight * CE at the batch's width + router_weight * BCE(router logits, label);
- after each epoch: validation at every width (`SharcsClassifier.validation_report`); the best
  epoch by mean per-width accuracy, among the epochs whose router saw hardness labels (the last
  epoch when training is no longer than the warm-up), is kept.

Output directory:
    last/                training state after the last finished epoch (resume point)
    best/                the best epoch's model (an `adaptinf.load`-able model directory)
    history.safetensors  the true-class confidence of every sample per epoch [epochs, n]
    reorder.json         the importance reordering's summary (the weights resume with last/)
    metrics.csv          one row per epoch
    train_config.json    the settings the run was started with (a resume must match them)
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from adaptinf.checkpoint import save_model, save_tensors_atomic, write_json_atomic
from adaptinf.data import Encoded, collate
from adaptinf.methods.sharcs import SharcsClassifier
from adaptinf.recipes.finetune import (
    dist_info,
    guard_settings,
    has_state,
    load_best,
    load_state,
    lr_schedule,
    make_optimizer,
    save_state,
    set_lr,
)
from adaptinf.settings import TrainConfig

# --- hardness labels and the batch plan --------------------------------------------------------------


def hardness_labels(confidences: torch.Tensor, intervals) -> torch.Tensor:
    """Multi-hot allowed widths [n, n_w] (bool) from the last W true-class confidences [W, n].

    Width i is allowed when every confidence lies in [lo_i, hi_i) (hi = 1 includes 1); a sample
    with no allowed width gets the largest one alone.
    """
    allowed = []
    for lo, hi in intervals:
        upper = torch.ones_like(confidences, dtype=torch.bool) if hi >= 1.0 else confidences < hi
        allowed.append(((confidences >= lo) & upper).all(dim=0))
    out = torch.stack(allowed, dim=1)  # [n, n_w]
    out[~out.any(dim=1), -1] = True
    return out


def epoch_plan(assigned: torch.Tensor, n_widths: int, batch_size: int, oversample: bool,
               generator: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """The batches of one epoch: (width index, sample indices) each, one width per batch.

    `assigned` [n] is the width index each sample trains at this epoch. Each width's bucket is
    shuffled and cut into batches; with `oversample`, a smaller bucket is repeated (whole shuffled
    copies, then a random part) up to the size of the largest. Batches of all widths are shuffled
    together, so widths alternate through the epoch.
    """
    buckets = [torch.nonzero(assigned == i).flatten() for i in range(n_widths)]
    target = max(len(b) for b in buckets)
    batches = []
    for i, bucket in enumerate(buckets):
        if len(bucket) == 0:
            continue
        size = target if oversample else len(bucket)
        reps = [bucket[torch.randperm(len(bucket), generator=generator)] for _ in range(math.ceil(size / len(bucket)))]
        rows = torch.cat(reps)[:size]
        batches += [(i, rows[j : j + batch_size]) for j in range(0, size, batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[j] for j in order]


def _labels_and_plan(model: SharcsClassifier, history: torch.Tensor, epoch: int,
                     cfg: TrainConfig) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Epoch `epoch`'s router labels [n, n_w] (bool) and its batch plan, from the confidence history."""
    c, n, n_w = model.config, history.shape[1], model.num_widths
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    if epoch < c.window:  # warm-up: the largest width only
        targets = torch.zeros(n, n_w, dtype=torch.bool)
        targets[:, -1] = True
        train_at = torch.ones(n, n_w, dtype=torch.bool) if c.warmup_all_widths else targets
    else:
        targets = hardness_labels(history[epoch - c.window : epoch], c.confidence_intervals)
        train_at = targets.int().cummax(dim=1).values.bool() if c.nested_training else targets
    # each sample trains at one of its allowed widths, uniformly at random
    assigned = torch.multinomial(train_at.float(), 1, generator=gen).flatten()  # [n]
    return targets, epoch_plan(assigned, n_w, cfg.batch_size, c.oversample, gen)


# --- the recipe --------------------------------------------------------------------------------------


def fit(model: SharcsClassifier, train: Encoded, val: Encoded, cfg: TrainConfig, out_dir: str | os.PathLike,
        progress: bool = True, restart: bool = False) -> dict:
    """Train every width and the router as the paper does (see the module doc), after importance
    reordering; keep the best epoch on validation (loaded back into `model`, left in eval mode).
    Resumable per epoch from out_dir. Returns a JSON-ready summary."""
    _, world = dist_info()
    if world > 1:
        raise ValueError("sharcs trains in a single process; run `adaptinf convert` without torchrun")
    if len(train) == 0 or len(val) == 0:
        raise ValueError("training and validation sets must not be empty")
    out = Path(out_dir)
    if restart:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    reorder = _reorder(model, train, cfg, out)
    result = _train(model, train, val, cfg, out, progress)
    return {**({"reorder": reorder} if reorder is not None else {}), **result, "n_train": len(train)}


def _reorder(model: SharcsClassifier, train: Encoded, cfg: TrainConfig, out: Path) -> dict | None:
    """Importance reordering on a seeded subset of `train` (its summary, kept in out/reorder.json);
    on a resume, the saved summary (the reordered weights come back with the resume state)."""
    path = out / "reorder.json"
    if has_state(out) and path.is_file():
        return json.loads(path.read_text())
    if model.config.importance_samples == 0:
        return None
    g = torch.Generator().manual_seed(cfg.seed)
    keep = torch.randperm(len(train), generator=g)[: model.config.importance_samples].sort().values
    subset = Encoded([train.ids[i] for i in keep.tolist()], train.labels[keep])
    summary = model.reorder(subset, batch_size=cfg.eval_batch_size)
    path.write_text(json.dumps(summary) + "\n")
    return summary


def _start(model: SharcsClassifier, train: Encoded, val: Encoded, cfg: TrainConfig, out: Path):
    """Check/record the run's settings, build the optimizer and restore the resume point:
    (optimizer, confidence history [epochs, n], position dict)."""
    settings = {"train": cfg.to_dict(), "n_train": len(train), "n_val": len(val), "method": model.method,
                "method_config": model.config.to_dict()}
    cfg_path = out / "train_config.json"
    guard_settings(cfg_path, settings, write=False)
    torch.manual_seed(cfg.seed)
    model.train()
    opt = make_optimizer(model, cfg)
    history = torch.full((cfg.epochs, len(train)), float("nan"))  # true-class confidence per epoch and sample
    position = load_state(out, model, opt)
    if position is None:
        write_json_atomic(cfg_path, settings)
        position = {"epoch": 0, "global_step": 0, "best": -1.0, "best_epoch": -1}
    else:
        epoch = position["epoch"]
        history[:epoch] = load_file(str(out / "history.safetensors"))["history"][:epoch]
    return opt, history, position


def _train(model: SharcsClassifier, train: Encoded, val: Encoded, cfg: TrainConfig, out: Path, progress: bool) -> dict:
    """The training loop: per epoch, labels from the confidence history, one width per batch,
    task + router loss, then validation (with `cfg.patience`, the run stops after that many epochs
    without a better score). Epoch-granular resume state in out/last. The epochs are SHARCS's budget:
    its label window is counted in epochs, so `min_steps`/`max_steps`/`eval_every` do not apply."""
    opt, history, pos = _start(model, train, val, cfg, out)
    epoch, step, best, best_epoch = pos["epoch"], pos["global_step"], pos["best"], pos["best_epoch"]
    since_best, stopped = pos.get("since_best", 0), pos.get("stopped", False)
    resumed_from = step
    first_selectable = min(model.config.window, cfg.epochs - 1)  # epochs whose router saw hardness labels
    log_rows = []
    while epoch < cfg.epochs and not stopped:
        targets, plan = _labels_and_plan(model, history, epoch, cfg)
        losses, step = _train_epoch(model, opt, train, targets, plan, history, epoch, step, cfg, progress)
        row = _epoch_row(model, val, cfg, epoch, step, losses, targets, plan, progress)
        log_rows.append(row)
        _append_metrics(out / "metrics.csv", row)
        if epoch >= first_selectable and row["val_score"] > best:
            best, best_epoch, since_best = row["val_score"], epoch, 0
            save_model(model, out / "best", extra={"val_score": best, "epoch": epoch + 1})
        elif epoch >= first_selectable:
            since_best += 1
        stopped = bool(cfg.patience) and since_best >= cfg.patience  # early stop on validation, per epoch
        epoch += 1
        save_tensors_atomic({"history": history}, out / "history.safetensors")
        save_state(out, model, opt, {"epoch": epoch, "step_in_epoch": 0, "global_step": step, "best": best,
                                     "best_epoch": best_epoch, "since_best": since_best, "stopped": stopped})
    load_best(model, out)
    model.eval()
    return {"best_val_score": best, "best_epoch": best_epoch + 1, "steps": step,
            "resumed_from_step": resumed_from, "epochs": log_rows, "stopped_early": stopped}


def _train_epoch(model: SharcsClassifier, opt, train: Encoded, targets: torch.Tensor, plan: list, history: torch.Tensor,
                 epoch: int, step: int, cfg: TrainConfig, progress: bool) -> tuple[torch.Tensor, int]:
    """One epoch of `plan`; records each sample's true-class confidence in history[epoch].
    Returns (summed task loss, summed router loss, samples) [3] (float64) and the global step."""
    pad = model.spec.encoder.pad_token_id
    sums = torch.zeros(3, dtype=torch.float64)  # task, router, samples
    model.train()
    for i, (wi, rows) in enumerate(tqdm(plan, desc=f"sharcs epoch {epoch + 1}/{cfg.epochs}",
                                        disable=not progress, leave=False)):
        # the schedule by fraction of training done: steps per epoch vary with the width buckets
        start, end = (epoch + i / len(plan)) / cfg.epochs, (epoch + (i + 1) / len(plan)) / cfg.epochs
        set_lr(opt, lr_schedule(start, end, cfg.lr, cfg.warmup_ratio))
        batch = collate(train, rows.tolist(), pad)
        opt.zero_grad(set_to_none=True)
        o = model(batch.input_ids, batch.attention_mask, knob=None, width=wi, router_targets=targets[rows].float())
        model.loss(o, batch.labels).backward()
        task, router_loss = float(F.cross_entropy(o.logits.detach(), batch.labels)), float(o.aux_loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        step += 1
        with torch.no_grad():
            history[epoch, rows] = o.logits.float().softmax(-1).gather(1, batch.labels[:, None])[:, 0]  # [m]
        sums += torch.tensor([task * len(rows), router_loss * len(rows), len(rows)], dtype=torch.float64)
    return sums, step


def _epoch_row(model: SharcsClassifier, val: Encoded, cfg: TrainConfig, epoch: int, step: int, losses: torch.Tensor,
               targets: torch.Tensor, plan: list, progress: bool) -> dict[str, Any]:
    """Validate at every width; the epoch's metrics row (printed when `progress`)."""
    report = model.validation_report(val, cfg.eval_batch_size)
    row = {"epoch": epoch + 1, "step": step, "train_task_loss": float(losses[0] / losses[2]),
           "train_router_loss": float(losses[1] / losses[2]), "val_score": report["score"],
           "val_routed_accuracy": report["routed_accuracy"],
           "label_share": [float(x) for x in targets.float().mean(0)],
           "batches_per_width": [sum(1 for w, _ in plan if w == i) for i in range(model.num_widths)],
           "val_width_accuracy": report["width_accuracy"], "val_routed_share": report["routed_share"]}
    if progress:
        tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: val width accuracy "
                   f"{[round(a, 4) for a in report['width_accuracy']]}, routed {report['routed_accuracy']:.4f} "
                   f"(shares {[round(s, 3) for s in report['routed_share']]})")
    return row


def _append_metrics(path: Path, row: dict) -> None:
    """One row of metrics.csv (lists as JSON), the header first when the file is new."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
