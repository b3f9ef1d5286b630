"""Training of the early exit family (EE, SWEET, Multi-Model): every exit fine-tuned with the
model's own loss (the sum of the exits' cross-entropies), the best epoch kept on validation, then
each exit's temperature fitted on validation (`MultiExitClassifier.calibrate`)."""

from __future__ import annotations

import os

from adaptinf.data import Encoded
from adaptinf.methods.early_exit import MultiExitClassifier
from adaptinf.recipes.finetune import finetune_then_load_best
from adaptinf.settings import TrainConfig


def fit(model: MultiExitClassifier, train: Encoded, val: Encoded, cfg: TrainConfig, out_dir: str | os.PathLike,
        progress: bool = True, restart: bool = False) -> dict:
    """Train every exit with `finetune` (resumable from out_dir); the epoch kept is the best by the
    model's selection score (the mean accuracy over its exits); then calibrate on `val`. Returns a summary."""
    result = finetune_then_load_best(model, train, val, cfg, out_dir, progress=progress, restart=restart)
    calib = model.calibrate(val, batch_size=cfg.eval_batch_size)
    return {
        "best_val_score": result.best_val_score,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "resumed_from_step": result.resumed_from_step,
        "n_train": len(train),
        **calib,
    }
