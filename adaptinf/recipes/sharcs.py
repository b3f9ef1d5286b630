"""Training of SHARCS (the model: `adaptinf.methods.sharcs`).

`fit` first sorts heads, FFN neurons and residual dimensions by importance on a seeded training
subset (`SharcsClassifier.reorder`), then:

- trains every width on every batch (the sandwich rule: the loss sums the widths' losses, the
  narrow widths distilled from the full width's detached prediction; `SharcsClassifier.loss`), so
  each optimizer step sees every width, as the reference's one-GPU-per-width training does;
- at the end of each epoch scores every training sample at every width in eval mode (no dropout):
  its true-class probability, kept in the hardness history [epochs, n_w, n]; then validates every
  width; the best epoch by mean per-width validation accuracy is kept (with `cfg.patience`, the run
  stops after that many epochs without a better score);
- fits the router on the kept epoch's model: ordinal labels (`ordinal_labels`) from the last
  `window` scores up to that epoch, against the cached router inputs (layer k's mask-aware mean;
  `train_router`). A seeded tenth of the training samples is held out of the router
  fit: the router epoch with the lowest BCE on it is kept, and that BCE is reported next to a
  prior-only router's (does the router predict hardness at all?).

Output directory:
    last/                training state after the last finished epoch (resume point)
    best/                the kept model, router fitted (an `adaptinf.load`-able model directory)
    history.safetensors  every training sample's true-class probability per epoch and width [epochs, n_w, n]
    reorder.json         the importance reordering's summary (the weights resume with last/)
    metrics.csv          one row per epoch
    router.json          the router fit: label shares, BCE on the held-out tenth vs prior-only
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
from adaptinf.backbone import attention_bias
from adaptinf.data import Encoded, collate, eval_batches
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

ROUTER_HELD_OUT = 0.1  # share of the training samples kept out of the router fit, to measure it

# --- importance reordering (before training) ----------------------------------------------------------


@torch.enable_grad()
def importance(model: SharcsClassifier, enc: Encoded, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Gradient x activation importance on labelled data (DynaBERT / Michel et al.), from the
    full-width model in eval mode:

    - "heads" [L - k, heads]: sum over batches of |sum over tokens and head dims of a * dL/da|,
      a the attention output before the output projection;
    - "neurons" [L - k, d_ff]: the same for the FFN's GELU outputs;
    - "hidden" [d]: the same for the residual stream, summed over the states from layer k's
      output on (where the residual is sliced).
    """
    was_training = model.training
    model.eval()
    blocks = model.adaptive_blocks
    cfg = model.spec.encoder
    heads = torch.zeros(len(blocks), cfg.num_attention_heads, dtype=torch.float64)
    neurons = torch.zeros(len(blocks), cfg.intermediate_size, dtype=torch.float64)
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    acts: dict[str, list] = {}

    def keep_input(kind: str, j: int):
        def hook(module, args):
            acts[kind][j] = args[0]
        return hook

    def keep_output(module, args, out):
        acts["hidden"].append(out)

    hooks = [model.encoder.blocks[model.router_layer - 1].register_forward_hook(keep_output)]
    for j, block in enumerate(blocks):
        hooks.append(block.attention.out.register_forward_pre_hook(keep_input("heads", j)))
        hooks.append(block.ffn.down.register_forward_pre_hook(keep_input("neurons", j)))
        hooks.append(block.register_forward_hook(keep_output))
    try:
        for batch in eval_batches(enc, batch_size, model.spec.encoder.pad_token_id):
            acts.update(heads=[None] * len(blocks), neurons=[None] * len(blocks), hidden=[])
            h = model.encoder.embed(batch.input_ids)
            h = model.encoder.run_blocks(h, attention_bias(batch.attention_mask, h.dtype))
            loss = F.cross_entropy(model.classifier(model.encoder.pool(h)), batch.labels, reduction="sum")
            flat = acts["heads"] + acts["neurons"] + acts["hidden"]
            # a * dL/da summed over the batch's tokens, per feature ([b, s, f] -> [f]); pads have zero gradient
            score = [(a.detach() * g).sum(dim=(0, 1)).double() for a, g in zip(flat, torch.autograd.grad(loss, flat))]
            n = len(blocks)
            for j in range(n):
                heads[j] += score[j].view(cfg.num_attention_heads, cfg.head_dim).sum(dim=1).abs()
                neurons[j] += score[n + j].abs()
            hidden += sum(x.abs() for x in score[2 * n :])
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {"heads": heads, "neurons": neurons, "hidden": hidden}


def reorder(model: SharcsClassifier, enc: Encoded, batch_size: int = 32) -> dict[str, Any]:
    """Score on `enc` (`importance`) and sort heads, neurons and (when the residual shrinks)
    residual dimensions most important first (`SharcsClassifier.permute`). Returns a JSON-ready summary."""
    scores = importance(model, enc, batch_size)
    heads = scores["heads"].argsort(dim=1, descending=True, stable=True)
    neurons = scores["neurons"].argsort(dim=1, descending=True, stable=True)
    hidden = scores["hidden"].argsort(descending=True, stable=True) if model.config.shrink_residual else None
    model.permute(heads, neurons, hidden)

    def kept_share(s: torch.Tensor, order: torch.Tensor, n: int) -> float:
        return float(s.gather(-1, order[..., :n]).sum() / s.sum().clamp_min(1e-30))

    return {
        "importance_samples": len(enc),
        # share of the total importance that each width's slice keeps, after reordering
        "kept_importance": {
            str(sh.width): {
                "heads": kept_share(scores["heads"], heads, sh.heads),
                "neurons": kept_share(scores["neurons"], neurons, sh.ffn),
                **({"hidden": kept_share(scores["hidden"], hidden, sh.hidden)} if hidden is not None else {}),
            }
            for sh in model.shapes
        },
    }


# --- the router fit (after training, on cached features) ----------------------------------------------


def train_router(model: SharcsClassifier, features: torch.Tensor, targets: torch.Tensor, epochs: int | None = None,
               lr: float | None = None, batch_size: int = 64, seed: int = 0,
               held_out: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, list[float]]:
    """Fit the router alone, from a fresh seeded start, on cached features [n, d] (`width_pass`)
    against multi-hot targets [n, n_w] (BCE, AdamW, shuffled batches); the layers below it are
    unchanged. With `held_out` (features, targets), the epoch with the lowest BCE on it is kept
    (early stopping; the largest width's label, always 1, is left out of that BCE). Returns the
    mean training BCE of each epoch ("fit") and the held-out BCE after each ("held_out").
    Defaults: config.router_fit_epochs, config.router_lr."""
    epochs = model.config.router_fit_epochs if epochs is None else epochs
    lr = model.config.router_lr if lr is None else lr
    x, y = features.detach().clone().float(), targets.detach().clone().float()  # out of inference mode
    if held_out is not None:
        hx, hy = held_out[0].detach().clone().float(), held_out[1].detach().clone().float()
    was_training = model.router.training
    model.router.train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a fresh start (as __init__), so refitting gives the same router
        for lin in (model.router[0], model.router[2]):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.02)
            lin.bias.zero_()
    opt = torch.optim.AdamW(model.router.parameters(), lr=lr, weight_decay=0.01)
    history: dict[str, list[float]] = {"fit": [], "held_out": []}
    best, best_state = float("inf"), None
    with torch.enable_grad():
        for _ in range(epochs):
            order, total = torch.randperm(len(x), generator=gen), 0.0
            for j in range(0, len(x), batch_size):
                rows = order[j : j + batch_size]
                loss = F.binary_cross_entropy_with_logits(model.router(x[rows]), y[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(rows)
            history["fit"].append(total / len(x))
            if held_out is not None:
                with torch.no_grad():
                    bce = float(F.binary_cross_entropy_with_logits(model.router(hx)[:, :-1], hy[:, :-1]))
                history["held_out"].append(bce)
                if bce < best:
                    best, best_state = bce, {k: v.clone() for k, v in model.router.state_dict().items()}
    if best_state is not None:
        model.router.load_state_dict(best_state)
    model.router.train(was_training)
    return history


# --- hardness labels ---------------------------------------------------------------------------------


def ordinal_labels(confidences: torch.Tensor, intervals) -> torch.Tensor:
    """Monotone multi-hot allowed widths [n, n_w] (bool) from W scores of every width [W, n_w, n]
    (true-class probabilities; NaN = not scored).

    Width i is allowed when its own probability is >= lo_i (the interval's lower end) in each of
    the W scores; then a sample allowed at a width is allowed at every larger one, and the largest
    width is always allowed.
    """
    lo = torch.tensor([lo for lo, _ in intervals], dtype=confidences.dtype)  # [n_w]
    ok = (confidences >= lo[None, :, None]).all(dim=0).T  # [n, n_w]; NaN compares False
    ok[:, -1] = True
    return ok.int().cummax(dim=1).values.bool()


def prior_bce(targets: torch.Tensor, prior: torch.Tensor) -> float:
    """Mean BCE of a router that predicts each width's label share `prior` [n_w] for every sample."""
    p = prior.clamp(1e-6, 1 - 1e-6).expand_as(targets)
    return float(F.binary_cross_entropy(p, targets.float()))


# --- the recipe --------------------------------------------------------------------------------------


def fit(model: SharcsClassifier, train: Encoded, val: Encoded, cfg: TrainConfig, out_dir: str | os.PathLike,
        progress: bool = True, restart: bool = False) -> dict:
    """Train every width (see the module doc) after importance reordering, keep the best epoch on
    validation, then fit its router (the model is left with those weights, in eval mode).
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
    summary = reorder(model, subset, batch_size=cfg.eval_batch_size)
    path.write_text(json.dumps(summary) + "\n")
    return summary


def _start(model: SharcsClassifier, train: Encoded, val: Encoded, cfg: TrainConfig, out: Path):
    """Check/record the run's settings, build the optimizer and restore the resume point:
    (optimizer, hardness history [epochs, n_w, n], position dict)."""
    settings = {"train": cfg.to_dict(), "n_train": len(train), "n_val": len(val), "method": model.method,
                "method_config": model.config.to_dict()}
    cfg_path = out / "train_config.json"
    guard_settings(cfg_path, settings, write=False)
    torch.manual_seed(cfg.seed)
    model.train()
    opt = make_optimizer(model, cfg)
    history = torch.full((cfg.epochs, model.num_widths, len(train)), float("nan"))
    position = load_state(out, model, opt)
    if position is None:
        write_json_atomic(cfg_path, settings)
        position = {"epoch": 0, "global_step": 0, "best": -1.0, "best_epoch": -1}
    else:
        epoch = position["epoch"]
        history[:epoch] = load_file(str(out / "history.safetensors"))["history"][:epoch]
    return opt, history, position


def _train(model: SharcsClassifier, train: Encoded, val: Encoded, cfg: TrainConfig, out: Path, progress: bool) -> dict:
    """Epochs of every-width training, each followed by the hardness scoring of the training set and
    validation; then the router fit on the kept epoch. Epoch-granular resume state in out/last (the
    label window is counted in epochs, so `min_steps`/`max_steps`/`eval_every` do not apply)."""
    opt, history, pos = _start(model, train, val, cfg, out)
    epoch, step, best, best_epoch = pos["epoch"], pos["global_step"], pos["best"], pos["best_epoch"]
    since_best, stopped = pos.get("since_best", 0), pos.get("stopped", False)
    resumed_from = step
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    log_rows = []
    while epoch < cfg.epochs and not stopped:
        losses, step = _train_epoch(model, opt, train, epoch, step, steps_per_epoch, cfg, progress)
        history[epoch] = _hardness(model, train, cfg, progress)
        row = _epoch_row(model, val, epoch, step, losses, history[epoch], train.labels, cfg, progress)
        log_rows.append(row)
        _append_metrics(out / "metrics.csv", row)
        if row["val_score"] > best:
            best, best_epoch, since_best = row["val_score"], epoch, 0
            save_model(model, out / "best", extra={"val_score": best, "epoch": epoch + 1})
        else:
            since_best += 1
        stopped = bool(cfg.patience) and since_best >= cfg.patience  # early stop on validation, per epoch
        epoch += 1
        save_tensors_atomic({"history": history}, out / "history.safetensors")
        save_state(out, model, opt, {"epoch": epoch, "step_in_epoch": 0, "global_step": step, "best": best,
                                     "best_epoch": best_epoch, "since_best": since_best, "stopped": stopped})
    load_best(model, out)
    router = fit_router(model, train, history[: best_epoch + 1], cfg, progress)
    save_model(model, out / "best", extra={"val_score": best, "epoch": best_epoch + 1, "router": router})
    write_json_atomic(out / "router.json", router)
    model.eval()
    return {"best_val_score": best, "best_epoch": best_epoch + 1, "steps": step,
            "resumed_from_step": resumed_from, "epochs": log_rows, "stopped_early": stopped, "router": router}


def _train_epoch(model: SharcsClassifier, opt, train: Encoded, epoch: int, step: int, steps_per_epoch: int,
                 cfg: TrainConfig, progress: bool) -> tuple[torch.Tensor, int]:
    """One epoch, every width on every batch. Returns (summed loss per width (CE for the full width,
    the distillation loss for the others), samples) [n_w + 1] (float64) and the global step."""
    pad, n_w = model.spec.encoder.pad_token_id, model.num_widths
    sums = torch.zeros(n_w + 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(train), generator=gen)
    model.train()
    for i in tqdm(range(steps_per_epoch), desc=f"sharcs epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False):
        start, end = (epoch + i / steps_per_epoch) / cfg.epochs, (epoch + (i + 1) / steps_per_epoch) / cfg.epochs
        set_lr(opt, lr_schedule(start, end, cfg.lr, cfg.warmup_ratio))
        rows = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        batch = collate(train, rows.tolist(), pad)
        opt.zero_grad(set_to_none=True)
        o = model(batch.input_ids, batch.attention_mask, knob=None)  # every width: extras["width_logits"]
        o.aux_loss = None  # the router is fitted after training, on hardness labels
        model.loss(o, batch.labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        step += 1
        with torch.no_grad():
            z = o.extras["width_logits"].detach().float()  # [n_w, m, C]
            ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), batch.labels.repeat(n_w), reduction="none")
            sums[:n_w] += ce.view(n_w, -1).sum(1).double()
            sums[n_w] += len(rows)
    return sums, step


def _hardness(model: SharcsClassifier, train: Encoded, cfg: TrainConfig, progress: bool) -> torch.Tensor:
    """Every training sample's true-class probability at every width, eval mode: [n_w, n]."""
    logits = model.width_pass(train, cfg.eval_batch_size, progress)["logits"]  # [n_w, n, C]
    return logits.softmax(-1).gather(2, train.labels[None, :, None].expand(model.num_widths, -1, 1))[..., 0]


def fit_router(model: SharcsClassifier, train: Encoded, history: torch.Tensor, cfg: TrainConfig,
               progress: bool = False) -> dict[str, Any]:
    """Fit `model`'s router on ordinal labels from the last `window` rows of `history`
    [epochs, n_w, n] (rows never scored are skipped), on the cached router inputs of `train`. A
    seeded tenth of the samples is kept out of the fit: it picks the router epoch (early stopping),
    and its BCE is reported next to the BCE of a router that knows only the label shares (prior).
    Returns a JSON-ready summary."""
    c = model.config
    scored = history[~torch.isnan(history).all(dim=2).all(dim=1)]
    window = scored[-c.window :]
    targets = ordinal_labels(window, c.confidence_intervals)  # [n, n_w]
    features = model.width_pass(train, cfg.eval_batch_size, progress, widths=False)["features"]
    n = len(train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7))
    held = perm[: int(round(ROUTER_HELD_OUT * n))] if n >= 20 else perm[:0]
    fit_rows = perm[len(held) :]
    held_out = (features[held], targets[held]) if len(held) else None
    losses = train_router(model, features[fit_rows], targets[fit_rows], seed=cfg.seed, held_out=held_out)
    summary: dict[str, Any] = {"window_epochs": len(window), "label_share": targets.float().mean(0).tolist(),
                               "fit_bce": losses["fit"][-1] if losses["fit"] else None}
    if len(held):
        prior = targets[fit_rows].float().mean(0)
        # the largest width's label is always 1: the BCE of the widths that carry information
        summary.update(held_out_bce=min(losses["held_out"]) if losses["held_out"] else None,
                       router_epoch=losses["held_out"].index(min(losses["held_out"])) + 1 if losses["held_out"] else 0,
                       held_out_prior_bce=prior_bce(targets[held, :-1].float(), prior[:-1]), held_out=len(held))
    if progress:
        tqdm.write(f"router: label shares {[round(s, 3) for s in summary['label_share']]}, "
                   f"held-out BCE {summary.get('held_out_bce', float('nan')):.4f} "
                   f"(prior only {summary.get('held_out_prior_bce', float('nan')):.4f})")
    return summary


def _epoch_row(model: SharcsClassifier, val: Encoded, epoch: int, step: int, losses: torch.Tensor,
               hardness: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig, progress: bool) -> dict[str, Any]:
    """Validate at every width; the epoch's metrics row (printed when `progress`)."""
    n_w = model.num_widths
    report = model.validation_report(val, cfg.eval_batch_size)
    row = {"epoch": epoch + 1, "step": step, "train_ce_per_width": (losses[:n_w] / losses[n_w]).tolist(),
           "train_eval_accuracy_per_width": (hardness > 0.5).double().mean(1).tolist() if model.spec.num_labels == 2
           else None,
           "train_mean_confidence_per_width": hardness.double().mean(1).tolist(),
           "val_score": report["score"], "val_width_accuracy": report["width_accuracy"]}
    if progress:
        tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: val width accuracy {[round(a, 4) for a in report['width_accuracy']]}, "
                   f"train CE per width {[round(x, 4) for x in row['train_ce_per_width']]}")
    return row


def _append_metrics(path: Path, row: dict) -> None:
    """One row of metrics.csv (lists as JSON), the header first when the file is new."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
