"""Training per-token exits on a trained decoder (`adaptinf.lm_methods.early_exit`).

One phase: continued training of the converted model (`EarlyExitLM.from_dense`) on the training
split, minimising `EarlyExitLM.training_loss` (the exits' weighted cross-entropy, optionally the
distillation of each exit from the last layer) with `adaptinf.recipes.lm.train_lm`, which handles
resuming, Ctrl-C, out/best and metrics.csv. Validation perplexity is measured at the model's knob
when `fit` is called (None, the default: the last layer's, i.e. the exits must not cost the model
its full-compute perplexity; set a threshold first to pick the checkpoint at that operating point).
"""

from __future__ import annotations

import os

from adaptinf.corpus import LMData
from adaptinf.lm_methods.early_exit import EarlyExitLM
from adaptinf.recipes.lm import LMTrainConfig, LMTrainResult, train_lm


def fit(model: EarlyExitLM, data: LMData, cfg: LMTrainConfig, out_dir: str | os.PathLike, *, progress: bool = True,
        restart: bool = False, stop_after_steps: int | None = None) -> LMTrainResult:
    """Train `model`'s exits (and the decoder under them) on `data.train`; out_dir/best loads with
    `adaptinf.lm.load_lm` as an `EarlyExitLM`. Resumes from out_dir/last (other settings are refused)."""
    if not isinstance(model, EarlyExitLM):
        raise ValueError(f"lm_early_exit.fit trains an EarlyExitLM (EarlyExitLM.from_dense(dense)), "
                         f"got {type(model).__name__}")
    settings = {"early_exit": model.method_config(), "knob": model.knob}
    return train_lm(model, data, cfg, out_dir, progress=progress, restart=restart, stop_after_steps=stop_after_steps,
                    save_extra={"method": model.method}, extra_settings=settings)
