"""evaluate (predict_all, evaluate_model, points files, Pareto front) and report (markdown, plot)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_spec

from adaptinf import flops
from adaptinf.data import Encoded
from adaptinf.evaluate import (
    OperatingPoint,
    add_reductions,
    cheapest_within_drop,
    evaluate_model,
    pareto_front,
    predict_all,
    read_points,
    refine_knobs,
    write_points,
)
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import AT_DEFAULT, ClassifierOutput
from adaptinf.report import summary, write_report

SPEC = make_tiny_spec(vocab_size=100, labels=("a", "b"))
LENGTHS = [5, 17, 2, 32, 9, 9, 1, 24, 13, 3, 30, 7]


@pytest.fixture
def dense() -> DenseClassifier:
    torch.manual_seed(0)
    return DenseClassifier(SPEC).eval()


@pytest.fixture
def enc() -> Encoded:
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 100, (n,), generator=g).tolist() for n in LENGTHS]
    return Encoded(ids, torch.tensor([i % 2 for i in range(len(LENGTHS))], dtype=torch.int64))


def one_by_one(model, enc: Encoded) -> torch.Tensor:
    with torch.no_grad():
        rows = [model(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.int64)).logits[0] for x in enc.ids]
    return torch.stack(rows)


class KnobbedDense(DenseClassifier):
    """A dense model with a fake knob scaling its reported cost (not registered)."""

    method = "fake-knob"
    knob_name = "scale"

    def knob_values(self):
        return [0.25, 0.5, 1.0]

    def forward(self, input_ids, attention_mask, token_type_ids=None, knob=AT_DEFAULT) -> ClassifierOutput:
        knob = self.run_knob(knob)
        if knob == 99.0:
            raise RuntimeError("boom")
        out = super().forward(input_ids, attention_mask, token_type_ids)
        scale = 1.0 if knob is None else knob
        exit_layer = (attention_mask.sum(1) > 10).long() + 1  # [b] 1 or 2
        return ClassifierOutput(out.logits, out.flops * scale, extras={"exit_layer": exit_layer})


# --- evaluate --------------------------------------------------------------------------------------


def test_predict_all_keeps_order_and_flops(dense, enc):
    logits, cost = predict_all(dense, enc, batch_size=5)
    assert logits.dtype == torch.float32 and logits.shape == (len(enc), 2)
    assert cost.dtype == torch.float64 and cost.shape == (len(enc),)
    torch.testing.assert_close(logits, one_by_one(dense, enc), atol=1e-5, rtol=1e-5)
    expected = flops.dense_model(torch.tensor(LENGTHS), SPEC.encoder, SPEC.num_labels).to(torch.float64)
    torch.testing.assert_close(cost, expected, atol=0, rtol=0)


def test_evaluate_model_accuracy_and_gflops(dense, enc):
    pred = one_by_one(dense, enc).argmax(1)
    # labels right on the first 7 samples, wrong on the rest: accuracy 7/12
    enc.labels = torch.where(torch.arange(len(enc)) < 7, pred, 1 - pred)
    (p,) = evaluate_model(dense, enc, "test", batch_size=4, progress=False)
    assert p.accuracy == pytest.approx(7 / 12)
    assert (p.method, p.model, p.knob_name, p.knob, p.split, p.n) == ("dense", "dense", None, None, "test", 12)
    dense_cost = flops.dense_model(torch.tensor(LENGTHS), SPEC.encoder, SPEC.num_labels).double()
    assert p.gflops == pytest.approx(dense_cost.mean().item() / 1e9)


def test_evaluate_model_rejects_unlabelled(dense, enc):
    enc.labels[3] = -1
    with pytest.raises(ValueError, match="no label"):
        evaluate_model(dense, enc, "test", progress=False)


def test_knob_sweep_restores_knob_and_records_shares(enc):
    torch.manual_seed(0)
    model = KnobbedDense(SPEC).eval()
    model.set_knob(0.5)
    model.train()
    points = evaluate_model(model, enc, "validation", name="fake (tiny)", progress=False)
    assert [p.knob for p in points] == [0.25, 0.5, 1.0]
    assert all(p.knob_name == "scale" and p.model == "fake (tiny)" for p in points)
    assert points[0].gflops == pytest.approx(points[2].gflops / 4)
    assert len({p.accuracy for p in points}) == 1
    long = sum(n > 10 for n in LENGTHS) / len(LENGTHS)
    assert points[0].extras["shares"]["exit_layer"] == pytest.approx({"1": 1 - long, "2": long})
    json.dumps([p.to_dict() for p in points])
    assert model.knob == 0.5 and model.training
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_model(model, enc, "test", knobs=[0.25, 99.0], progress=False)
    assert model.knob == 0.5


class StepDense(KnobbedDense):
    """Cost is the dense cost at knob >= 0.6 and a tenth of it below: a curve with one jump."""

    def knob_values(self):
        return [1.0, 0.5, 0.0]  # a descending grid

    def forward(self, input_ids, attention_mask, token_type_ids=None, knob=AT_DEFAULT) -> ClassifierOutput:
        knob = self.run_knob(knob)
        out = DenseClassifier.forward(self, input_ids, attention_mask, token_type_ids)
        return ClassifierOutput(out.logits, out.flops * (1.0 if knob >= 0.6 else 0.1))


def test_refine_knobs_bisects_only_where_the_cost_jumps():
    points = [pt("x", 1.0, 0.7, knob=0.0), pt("x", 1.02, 0.7, knob=1.0), pt("x", 4.0, 0.8, knob=2.0),
              pt("x", 4.1, 0.8, knob=4.0), pt("dense", 4.0, 0.8)]
    assert refine_knobs(points, 0.05) == [1.5]  # 1 -> 2 jumps by 3 of 4.1; the others by < 5%
    assert refine_knobs(points, 0.5) == [1.5] and refine_knobs(points, 0.9) == []
    assert refine_knobs(points, 0.05, between=lambda a, b: None) == []
    assert refine_knobs(points[:1], 0.05) == [] and refine_knobs([], 0.05) == []


def test_evaluate_model_refines_the_jump_and_keeps_knob_order(enc):
    torch.manual_seed(0)
    model = StepDense(SPEC).eval()
    plain = evaluate_model(model, enc, "validation", progress=False)
    assert [p.knob for p in plain] == [1.0, 0.5, 0.0]
    points = evaluate_model(model, enc, "validation", progress=False, refine_rounds=3)
    # 0.75, then 0.625, then 0.5625: the jump now lies between 0.5625 and 0.625
    assert [p.knob for p in points] == [1.0, 0.75, 0.625, 0.5625, 0.5, 0.0]
    small, full = points[-1].gflops, points[0].gflops
    assert [p.gflops == pytest.approx(full) for p in points] == [True, True, True, False, False, False]
    assert points[3].gflops == pytest.approx(small)
    assert model.knob is None
    # one round adds one value; rounds stop early once nothing is left to refine
    assert [p.knob for p in evaluate_model(model, enc, "test", progress=False, refine_rounds=1)] == [1.0, 0.75, 0.5, 0.0]
    assert len(evaluate_model(model, enc, "test", knobs=[0.0, 0.1], progress=False, refine_rounds=5)) == 2
    with pytest.raises(ValueError, match="refine_rounds"):
        evaluate_model(model, enc, "test", progress=False, refine_rounds=-1)
    with pytest.raises(ValueError, match="refine_gap"):
        evaluate_model(model, enc, "test", progress=False, refine_rounds=1, refine_gap=1.5)


# --- points files and the Pareto front -------------------------------------------------------------


def pt(method, gflops, acc, split="test", knob=None, **kw) -> OperatingPoint:
    knob_name = "threshold" if knob is not None else None
    return OperatingPoint(method, f"{method} (tiny)", knob_name, knob, split, acc, gflops, 100, **kw)


POINTS = [
    pt("dense", 4.0, 0.80, latency_ms_b1=2.0, latency_ms_b32=20.0),
    pt("ee", 1.0, 0.70, knob=0.5, latency_ms_b1=0.8, latency_ms_b32=9.0),
    pt("ee", 2.0, 0.78, knob=0.8, latency_ms_b1=1.2, latency_ms_b32=14.0),
    pt("ee", 3.0, 0.77, knob=0.9, latency_ms_b1=1.9, latency_ms_b32=19.0),  # dominated by ee@0.8
    pt("sharcs", 1.5, 0.69, knob=0.25),  # dominated by ee@0.5
    pt("sharcs", 2.5, 0.79, knob=0.5),
    pt("acm", 5.0, 0.81, knob=1.0),
    pt("ee", 1.0, 0.72, split="validation", knob=0.5),
]


def test_pareto_front():
    front = pareto_front(POINTS, x="gflops")
    assert [(p.method, p.gflops) for p in front] == [
        ("ee", 1.0),
        ("ee", 2.0),
        ("sharcs", 2.5),
        ("dense", 4.0),
        ("acm", 5.0),
    ]
    lat = pareto_front(POINTS[:7], x="latency_ms_b1")  # points without latency are skipped
    assert [p.latency_ms_b1 for p in lat] == [0.8, 1.2, 2.0]
    assert pareto_front([], x="gflops") == []
    with pytest.raises(ValueError, match="x must be one of"):
        pareto_front(POINTS, x="accuracy")


def test_add_reductions():
    points = [pt("ee", 2.0, 0.7, speedup_b32=1.5), pt("dense", 4.0, 0.8)]
    add_reductions(points, 4.0)
    assert points[0].flops_reduction == 2.0 and points[0].realisation_b32 == pytest.approx(0.75)
    assert points[1].flops_reduction == 1.0 and points[1].realisation_b32 is None
    with pytest.raises(ValueError, match="dense_gflops"):
        add_reductions(points, 0.0)


def test_add_reductions_against_the_dense_point_of_each_split():
    points = [pt("ee", 2.0, 0.7), pt("dense", 4.0, 0.8), pt("ee", 1.0, 0.7, split="validation"),
              pt("dense", 5.0, 0.8, split="validation"), pt("ee", 1.0, 0.7, split="calibration")]
    assert add_reductions(points) is points
    assert [p.flops_reduction for p in points] == [2.0, 1.0, 5.0, 1.0, None]  # no dense on calibration


def test_points_round_trip(tmp_path):
    points = [*POINTS, pt("ee", 1.0, 0.7, knob=0.5, model_dir="runs/ee", extras={"shares": {"exit": {"1": 1.0}}})]
    csv_path, json_path = write_points(points, tmp_path / "out")
    assert csv_path.read_text().count("\n") == len(points) + 1
    assert read_points([json_path]) == points
    assert read_points([tmp_path / "out"]) == points  # a directory holding points.json


def test_read_points_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_points([tmp_path / "missing.json"])
    with pytest.raises(ValueError, match="no points.json"):
        read_points([tmp_path])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid points JSON"):
        read_points([bad])
    bad.write_text(json.dumps([{"method": "ee"}]))
    with pytest.raises(ValueError, match="point 0.*missing fields"):
        read_points([bad])


def both_splits() -> list[OperatingPoint]:
    """Validation and test points of dense and two ee models (test accuracy differs from validation)."""
    val = [pt("dense", 4.0, 0.80, split="validation"),
           pt("ee", 1.0, 0.70, split="validation", knob=0.5), pt("ee", 2.0, 0.791, split="validation", knob=0.8),
           pt("ee", 3.0, 0.80, split="validation", knob=0.9),
           OperatingPoint("ee", "other", "threshold", 0.9, "validation", 0.60, 3.0, 100)]
    test = [pt("dense", 4.0, 0.82), pt("ee", 1.0, 0.75, knob=0.5), pt("ee", 2.0, 0.79, knob=0.8, speedup_b32=1.6),
            pt("ee", 3.0, 0.83, knob=0.9), OperatingPoint("ee", "other", "threshold", 0.9, "test", 0.61, 3.0, 100)]
    return val + test


def test_cheapest_within_drop_is_chosen_on_validation_and_reported_on_test():
    points = both_splits()
    picked = cheapest_within_drop(points, 0.01)
    assert len(picked) == 1  # model "other" has no point within one point of dense
    val, test, dense = picked[0]
    assert (val.split, val.knob, test.split, test.knob) == ("validation", 0.8, "test", 0.8)
    assert test.accuracy == 0.79 and dense.accuracy == 0.82  # reported on test even though it drops 3 points there
    assert [v.knob for v, _, _ in cheapest_within_drop(points, 0.0)] == [0.9]
    assert len(cheapest_within_drop(points, 0.25)) == 2
    with pytest.raises(ValueError, match="exactly one dense point on split 'test'"):
        cheapest_within_drop([p for p in points if not (p.method == "dense" and p.split == "test")], 0.01)
    with pytest.raises(ValueError, match="max_drop"):
        cheapest_within_drop(points, -0.1)
    # the same dense model evaluated twice (two points files) counts once; two different dense results do not
    assert len(cheapest_within_drop(points + [pt("dense", 4.0, 0.80, split="validation")], 0.01)) == 1
    with pytest.raises(ValueError, match="exactly one dense point on split 'validation'"):
        cheapest_within_drop(points + [pt("dense", 4.0, 0.81, split="validation")], 0.01)


# --- report ----------------------------------------------------------------------------------------


def test_write_report(tmp_path):
    points = add_reductions([OperatingPoint.from_dict(p.to_dict()) for p in POINTS], 4.0)
    paths = write_report(points, tmp_path / "report", title="tiny report", notes=["made-up numbers"])
    md = paths["report"].read_text()
    assert md.startswith("# tiny report") and "made-up numbers" in md
    main, front = md.split("## Pareto front (accuracy vs GFLOPs)")
    test_points = [p for p in POINTS if p.split == "test"]
    rows = [line for line in main.splitlines() if line.startswith("| ") and "(tiny)" in line]
    assert len(rows) == len(test_points)
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == ["dense", "ee", "ee", "ee", "sharcs", "sharcs", "acm"]
    assert sum("(tiny)" in line for line in front.splitlines()) == 5
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert len(read_points([paths["json"]])) == len(POINTS)  # every split is kept in the files
    with pytest.raises(ValueError, match="no operating points on split 'calibration'"):
        write_report(points, tmp_path / "x", split="calibration")
    assert "Cheapest point" not in md  # the points have no validation dense point to choose against


def test_report_tables_for_early_exit(tmp_path):
    points = both_splits()
    points[6].extras = {"exit_accuracy": [0.6, 0.79], "exit_layers": [3, 6]}
    md = write_report(points, tmp_path / "r", max_drop=0.01)["report"].read_text()
    drop = md.split("## Cheapest point within 1 accuracy point(s) of dense")[1]
    row = [line for line in drop.splitlines() if line.startswith("| ee |")]
    assert len(row) == 1 and "| threshold=0.8 |" in row[0] and "| 79.10 | 79.00 | +3.00 |" in row[0] and "| 1.60× |" in row[0]
    exits = md.split("## Accuracy of each exit on its own")[1]
    assert "| layer 3 (%) | layer 6 (%) |" in exits and "| ee | ee (tiny) | 3,6 | 60.00 | 79.00 |" in exits
    # models with other exits line up layer by layer (another model with exits 1, 3 beside 3, 6)
    points[9].extras = {"exit_accuracy": [0.5, 0.7], "exit_layers": [1, 3]}
    exits = write_report(points, tmp_path / "r2")["report"].read_text().split("## Accuracy of each exit on its own")[1]
    assert "| layer 1 (%) | layer 3 (%) | layer 6 (%) |" in exits
    assert "| ee | ee (tiny) | 3,6 |  | 60.00 | 79.00 |" in exits and "| ee | other | 1,3 | 50.00 | 70.00 |  |" in exits


def test_summary_json_names_each_methods_cheapest_point_within_the_drop(tmp_path):
    points = both_splits() + [pt("sharcs", 1.0, 0.60, split="validation", knob=0.1), pt("sharcs", 1.0, 0.62, knob=0.1)]
    path = write_report(points, tmp_path / "r", max_drop=0.01)["summary"]
    s = json.loads(path.read_text())
    assert path.name == "summary.json" and s["refused"] is None and s["max_drop_points"] == 1
    assert set(s["methods"]) == {"ee", "sharcs"} and s["methods"]["sharcs"] is None  # nothing within 1 point
    ee = s["methods"]["ee"]  # chosen on validation (knob 0.8 is 0.9 below dense there), reported on test
    assert ee["knob"] == 0.8 and ee["val_acc"] == 79.1 and ee["test_acc"] == 79.0 and ee["test_drop"] == 3.0
    assert ee["flops_reduction"] == 2.0 and ee["speedup_b32"] == 1.6 and ee["speedup_b1"] is None
    assert s["dense"] == {"val_acc": 80.0, "test_acc": 82.0, "gflops": 4.0}
    # a wider drop admits the cheapest point of every model; a method keeps the cheapest of its models
    assert summary(points, 0.25)["methods"]["ee"]["knob"] == 0.5
    assert summary(points, 0.25)["methods"]["sharcs"]["flops_reduction"] == 4.0


def test_summary_json_refuses_when_dense_is_near_the_majority_class():
    points = both_splits()
    for p in points:
        p.majority, p.num_labels = 0.79, 2
    s = summary(points, 0.01)
    assert s["refused"] and "majority class" in s["refused"] and s["methods"] == {"ee": None}


def test_import_is_light():
    code = "import sys, adaptinf.evaluate, adaptinf.report; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
