"""Training of the early exit family (EE, SWEET, Multi-Model): every exit fine-tuned with the
model's own loss (the sum of the exits' losses: cross-entropy, plus distillation from the last exit
when `distill_weight` > 0), the best epoch kept on validation, then each exit's temperature fitted
(`MultiExitClassifier.calibrate`) on a split that does not pick the threshold.

Calibration (`EarlyExitConfig.calibration`): "holdout" (the default) leaves a seeded slice of the
training split (`calibration_fraction`, at least one sample) out of training and fits the
temperatures on it, so validation, which picks the epoch and the threshold, never sees them
fitted; "validation" fits them on validation as before (slightly optimistic: the threshold is then
chosen on the samples the temperatures were fitted to).

With policy "learned" the recipe then fits the exit decider (`fit_decider`) on the same split, after
the temperatures (its features use them). `fit_decider` also works on an already trained model of
any policy: it switches the model to "learned" and fits the decider, the backbone untouched.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from adaptinf.data import Encoded
from adaptinf.methods.early_exit import DECIDER_FEATURES, MultiExitClassifier
from adaptinf.recipes.finetune import finetune_then_load_best
from adaptinf.settings import TrainConfig

# below this many held-out samples the temperatures are noisy: said once
FEW_CALIBRATION_SAMPLES = 100


def split_calibration(train: Encoded, fraction: float, seed: int) -> tuple[Encoded, Encoded]:
    """(the samples to train on, the calibration slice): round(fraction * n) samples (at least 1,
    leaving at least 1 to train on) drawn with `seed`, each part in the split's order."""
    n = len(train)
    if n < 2:
        raise ValueError(f"a calibration slice needs at least 2 training samples, got {n}; "
                         "use --set calibration=validation")
    k = min(max(1, round(fraction * n)), n - 1)
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]] = True

    def part(mask: torch.Tensor) -> Encoded:
        idx = mask.nonzero().squeeze(1)
        return Encoded([train.ids[i] for i in idx.tolist()], train.labels[idx])

    return part(~held), part(held)


def fit(model: MultiExitClassifier, train: Encoded, val: Encoded, cfg: TrainConfig, out_dir: str | os.PathLike,
        progress: bool = True, restart: bool = False) -> dict:
    """Train every exit with `finetune` (resumable from out_dir); the epoch kept is the best by the
    model's selection score (the mean accuracy over its exits) on `val`; then calibrate on the
    held-out slice of `train` (or on `val`, per the config). Returns a summary."""
    where = model.config.calibration
    if where == "holdout":
        train, calib = split_calibration(train, model.config.calibration_fraction, cfg.seed)
        if len(calib) < FEW_CALIBRATION_SAMPLES:
            warnings.warn(f"{model.method}: temperatures fitted on {len(calib)} held-out training samples "
                          f"(fewer than {FEW_CALIBRATION_SAMPLES}: noisy); raise calibration_fraction or "
                          "use --set calibration=validation")
    else:
        calib = val
    result = finetune_then_load_best(model, train, val, cfg, out_dir, progress=progress, restart=restart)
    calibrated = model.calibrate(calib, batch_size=cfg.eval_batch_size)
    decided = fit_decider(model, calib, cfg.eval_batch_size) if model.config.policy == "learned" else {}
    return {
        "best_val_score": result.best_val_score,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from_step,
        "n_train": len(train),
        "calibration": "train-holdout" if where == "holdout" else "validation",
        "n_calibration": len(calib),
        "temperature": calibrated["temperature"],
        "calibration_nll_before": calibrated["nll_before"],
        "calibration_nll_after": calibrated["nll_after"],
        "calibration_exit_accuracy": calibrated["exit_accuracy"],
        **{f"decider_{k}": v for k, v in decided.items()},
    }


def decider_data(model: MultiExitClassifier, exit_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the learned decider sees and must predict, from every exit's logits [n_exits, n, C]:
    features [n_exits - 1, n, F] (`MultiExitClassifier.decider_features`, chained exit to exit as at
    inference) and targets [n_exits - 1, n] (1.0 where exit i's prediction equals the last exit's)."""
    last = exit_logits[-1].argmax(dim=-1)  # [n]
    xs, ys, memo = [], [], None
    with torch.no_grad():
        for i in range(model.num_exits - 1):
            x, memo = model.decider_features(i, exit_logits[i].to(model.temperature.device), memo)
            xs.append(x.cpu())
            ys.append((exit_logits[i].argmax(dim=-1) == last).float())
    if not xs:  # a single exit: nothing to decide
        return torch.zeros(0, exit_logits.shape[1], len(DECIDER_FEATURES)), torch.zeros(0, exit_logits.shape[1])
    return torch.stack(xs), torch.stack(ys)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, steps: int = 200) -> tuple[torch.Tensor, float]:
    """A logistic regression of y [n] (0/1) on x [n, F] by L-BFGS on the mean BCE + l2 * |w|^2/2 over
    standardised features (constant ones ignored), folded back: ([F + 1] weights then bias on the
    raw features, the mean BCE reached). Fitted in float64."""
    x, y = x.double(), y.double()
    mean, std = x.mean(dim=0), x.std(dim=0, correction=0)
    scale = torch.where(std > 1e-8, 1.0 / std.clamp_min(1e-8), torch.zeros_like(std))  # constant: weight 0
    xs = (x - mean) * scale  # [n, F]
    prior = y.mean().clamp(1e-6, 1 - 1e-6)
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64)
    w[-1] = torch.log(prior / (1 - prior))  # start from the base rate
    w.requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ w[:-1] + w[-1], y) + 0.5 * l2 * w[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(objective)
    w = w.detach()
    bce = float(F.binary_cross_entropy_with_logits(xs @ w[:-1] + w[-1], y))
    raw = w[:-1] * scale  # w . (x - mean) * scale = (w * scale) . x - (w * scale) . mean
    return torch.cat([raw, (w[-1] - raw @ mean)[None]]), bce


def fit_decider(model: MultiExitClassifier, calib: Encoded, batch_size: int = 64, l2: float = 1e-2,
                steps: int = 200, exit_logits: torch.Tensor | None = None) -> dict:
    """Fit the "learned" exit policy's decider on `calib` (the temperatures' split; never the one
    that picks the threshold) and switch `model` to that policy: per exit but the last, a logistic
    model of P(exit i's prediction == the last exit's) on `decider_features`. The backbone, heads
    and temperatures are untouched (fit the temperatures first: the features use them).
    `exit_logits`: every exit's logits on `calib` when already computed ([n_exits, n, C]).

    Returns per exit: the share of samples consistent with the last exit, the BCE of that constant
    rate (the prior) and the BCE of the fitted decider, on `calib`."""
    if len(calib) == 0:
        raise ValueError("fitting the exit decider needs calibration samples, got an empty split")
    z = model.exit_logits(calib, batch_size)[0] if exit_logits is None else exit_logits
    if z.shape[:2] != (model.num_exits, len(calib)):
        raise ValueError(f"exit_logits must be [n_exits={model.num_exits}, n={len(calib)}, C], got {list(z.shape)}")
    if model.config.policy != "learned":
        model.set_policy("learned")
    x, y = decider_data(model, z)
    rows, report = [], {"consistent": [], "bce_prior": [], "bce": []}
    for i in range(model.num_exits - 1):
        w, bce = fit_logistic(x[i], y[i], l2, steps)
        rate = float(y[i].mean())
        prior = 0.0 if rate in (0.0, 1.0) else -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
        rows.append(w)
        report["consistent"].append(rate)
        report["bce_prior"].append(prior)
        report["bce"].append(bce)
    rows.append(torch.zeros(len(DECIDER_FEATURES) + 1, dtype=torch.float64))  # the last exit decides nothing
    with torch.no_grad():
        model.decider.copy_(torch.stack(rows))
    return report
