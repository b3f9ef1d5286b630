"""Training of the early exit family (EE, SWEET, Multi-Model): every exit fine-tuned with the
model's own loss (the sum of the exits' losses: cross-entropy, plus distillation from the last exit
when `distill_weight` > 0), the best epoch kept on validation, then each exit's temperature fitted
(`MultiExitClassifier.calibrate`) on a split that does not pick the threshold.

Calibration (`EarlyExitConfig.calibration`): "holdout" (the default) leaves a seeded slice of the
training split (`calibration_fraction`, at least one sample) out of training and fits the
temperatures on it, so validation, which picks the epoch and the threshold, never sees them
fitted; "validation" fits them on validation as before (slightly optimistic: the threshold is then
chosen on the samples the temperatures were fitted to).
"""

from __future__ import annotations

import os
import warnings

import torch

from adaptinf.data import Encoded
from adaptinf.methods.early_exit import MultiExitClassifier
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
    }
