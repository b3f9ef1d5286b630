"""The analysis scripts behind the vision results (benchmarks/budget_table.py, benchmarks/acm_learners.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from test_vit_methods import TOKENS, image_batch, vit_dense

from adaptinf.data import Encoded
from adaptinf.evaluate import OperatingPoint, add_reductions
from adaptinf.methods.acm import AcmClassifier, AcmConfig


def _script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pt(method, knob, split, acc, gflops):
    return OperatingPoint(method=method, model=method, knob_name="k", knob=knob, split=split, accuracy=acc,
                          gflops=gflops, n=100)


def test_budget_table_takes_each_methods_best_point_at_or_under_the_budget():
    pts = [_pt("dense", None, s, 0.90, 1.0) for s in ("validation", "test")]
    for split, shift in (("validation", 0.0), ("test", -0.01)):
        pts += [_pt("a", 0.1, split, 0.88 + shift, 0.5), _pt("a", 0.2, split, 0.80 + shift, 0.25),
                _pt("b", 0.1, split, 0.89 + shift, 0.6), _pt("b", 0.2, split, 0.70 + shift, 0.4)]
    report = _script("budget_table").table(add_reductions(pts), [1.5, 2.0, 4.0, 10.0])
    rows = {r["reduction_at_least"]: r for r in report["rows"]}
    assert rows[1.5]["leader"] == "b" and abs(rows[1.5]["lead_points"] - 1.0) < 1e-9
    assert rows[2.0]["leader"] == "a" and rows[2.0]["methods"]["a"]["knob"] == 0.1
    assert rows[2.0]["methods"]["a"]["test_accuracy"] == 0.87  # the same knob's test point
    assert rows[4.0]["methods"]["b"] is None and rows[4.0]["leader"] == "a" and rows[4.0]["lead_points"] is None
    assert rows[10.0]["leader"] is None


def test_acm_learners_counts_every_real_token_once():
    model = AcmClassifier.from_dense(vit_dense(), AcmConfig(learners=4)).eval()
    batch = image_batch(6, seed=3)
    enc = Encoded(batch["input_ids"], torch.tensor([0, 1, 2, 0, 1, 2]))
    script = _script("acm_learners")
    low, high = script.usage(model, enc, knob=-100.0, batch_size=4), script.usage(model, enc, knob=100.0, batch_size=4)
    assert high["mean_k"] < low["mean_k"]  # a bias toward fewer learners runs fewer
    for u in (low, high):
        assert u["n"] == 6
        for m in u["modules"].values():
            assert abs(sum(m["share_per_k"]) - 1) < 1e-9
        # every module saw the 6 samples' TOKENS tokens: the per-k shares are counts over 6 * TOKENS
        counts = torch.tensor(u["share_per_k"]) * 6 * TOKENS * len(model.names)
        assert torch.allclose(counts, counts.round(), atol=1e-6)
    assert low["mean_k"] == 4.0  # a large negative bias: every token runs every learner
