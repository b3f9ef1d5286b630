"""Interim: the early_exit recipe still lives on the model class (moved here by the layering work)."""

from __future__ import annotations


def fit(model, train, val, cfg, out_dir, progress: bool = True, restart: bool = False) -> dict:
    return model.fit(train, val, cfg, out_dir, progress=progress, restart=restart)
