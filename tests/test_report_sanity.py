"""A report a person can trust: dense beside the majority class and chance, a warning (and no "within N
points of dense") when dense is near the majority class, 95% Wilson intervals, identical rows merged."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from conftest import make_tiny_spec

from adaptinf.data import Encoded
from adaptinf.evaluate import (
    SANITY_MARGIN,
    DenseNotAboveMajority,
    OperatingPoint,
    SplitBaseline,
    add_reductions,
    cheapest_within_drop,
    dense_problems,
    evaluate_model,
    read_points,
    split_baselines,
    wilson_interval,
    write_points,
)
from adaptinf.methods.dense import DenseClassifier
from adaptinf.report import collapse_rows, knob_label, render_markdown, versus_dense, write_report
from adaptinf.run import _warn_if_dense_is_weak, choose_latency_points


def pt(method, gflops, acc, split="test", knob=None, n=200, majority=0.6, model=None, **kw) -> OperatingPoint:
    return OperatingPoint(method, model or f"{method} (tiny)", "threshold" if knob is not None else None, knob, split,
                          acc, gflops, n, majority=majority, num_labels=3, **kw)


def run_points(dense_val: float, dense_test: float, majority: float = 0.6) -> list[OperatingPoint]:
    """Dense and one ee model (knobs 0.5..0.9) on validation and test, every point given `majority`."""
    points = []
    for split, d in (("validation", dense_val), ("test", dense_test)):
        points.append(pt("dense", 4.0, d, split=split, majority=majority))
        for k, (g, a) in zip((0.5, 0.6, 0.7, 0.8, 0.9), ((1.0, d - 0.10), (1.0, d - 0.10), (2.0, d - 0.005),
                                                         (2.0, d - 0.005), (3.0, d))):
            points.append(pt("ee", g, a, split=split, knob=k, majority=majority))
    return add_reductions(points)


# --- Wilson interval ------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n, low, high", [
    (0, 10, 0.0, 0.2775),  # upper bound z² / (n + z²)
    (10, 10, 0.7225, 1.0),
    (1, 10, 0.0179, 0.4042),
    (50, 100, 0.4038, 0.5962),
])
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = wilson_interval(k / n, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_interval_shrinks_with_n_and_rejects_nonsense():
    widths = [(lambda lo, hi: hi - lo)(*wilson_interval(0.8, n)) for n in (10, 100, 1000, 10000)]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.02
    for acc, n in ((0.5, 0), (1.5, 10), (-0.1, 10)):
        with pytest.raises(ValueError, match="wilson_interval"):
            wilson_interval(acc, n)


# --- baselines recorded with the points -----------------------------------------------------------


def test_split_baseline_from_labels():
    b = SplitBaseline.from_labels("test", [0, 1, 1, 2, 1, 0, 1, 1], num_labels=3)
    assert (b.split, b.n, b.majority, b.chance) == ("test", 8, 5 / 8, pytest.approx(1 / 3))
    assert SplitBaseline.from_labels("x", torch.tensor([1, 1, 0]), 2).majority == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one label"):
        SplitBaseline.from_labels("x", [], 2)


def test_evaluate_model_records_the_majority_rate(tmp_path):
    torch.manual_seed(0)
    model = DenseClassifier(make_tiny_spec(vocab_size=50, labels=("a", "b", "c"))).eval()
    labels = torch.tensor([2, 2, 2, 0, 1, 2, 2, 0, 2, 1])
    enc = Encoded([[1 + i, 2, 3][: 1 + i % 3] for i in range(10)], labels)
    (p,) = evaluate_model(model, enc, "test", progress=False)
    assert (p.majority, p.num_labels) == (pytest.approx(0.6), 3)
    assert split_baselines([p]) == {"test": SplitBaseline("test", 10, pytest.approx(0.6), pytest.approx(1 / 3))}
    csv_path, json_path = write_points([p], tmp_path)
    row = json.loads(json_path.read_text())[0]
    assert (row["accuracy_low"], row["accuracy_high"]) == pytest.approx(wilson_interval(p.accuracy, 10))
    with csv_path.open() as f:
        assert float(next(csv.DictReader(f))["accuracy_high"]) == pytest.approx(row["accuracy_high"])
    assert read_points([json_path]) == [p]  # the interval is derived, not read back


def test_old_points_files_stay_readable(tmp_path):
    old = {"method": "dense", "model": "dense", "knob_name": None, "knob": None, "split": "test", "accuracy": 0.8,
           "gflops": 1.0, "n": 50, "latency_ms_b1": None, "latency_ms_b32": None, "speedup_b1": None,
           "speedup_b32": None, "flops_reduction": None, "realisation_b32": None, "model_dir": None, "extras": {}}
    f = tmp_path / "points.json"
    f.write_text(json.dumps([old]))
    (p,) = read_points([f])
    assert p.majority is None and p.num_labels is None and split_baselines([p]) == {}
    md = render_markdown([p], "old", "test")
    assert "majority class unknown" in md and "WARNING" not in md and "80.00 [" in md


# --- the sanity check -----------------------------------------------------------------------------


def test_dense_problems_flags_dense_near_the_majority_class():
    assert dense_problems(run_points(0.80, 0.81)) == []
    assert dense_problems(run_points(0.80, 0.81), margin=0.25) != []  # the margin is a parameter
    weak = dense_problems(run_points(0.80, 0.62))  # test: 2 points above the majority rate
    assert len(weak) == 1 and weak[0].startswith("test: dense 62.00% vs majority class 60.00%")
    assert len(dense_problems(run_points(0.55, 0.60))) == 2  # below or at the majority rate, on both splits
    assert dense_problems(run_points(0.80, 0.62), baselines={}) == []  # no majority known: nothing to say
    assert SANITY_MARGIN == 0.05


def test_within_drop_selection_is_refused_when_dense_is_at_the_majority_rate():
    sane, weak = run_points(0.80, 0.81), run_points(0.61, 0.60)
    assert [v.knob for v, _, _ in cheapest_within_drop(sane, 0.01)] == [0.7]  # unchanged when dense is sane
    with pytest.raises(DenseNotAboveMajority, match="within 1 point"):
        cheapest_within_drop(weak, 0.01)
    assert len(cheapest_within_drop(weak, 0.01, margin=None)) == 1  # unchecked on request
    # the latency stage still times one point per model: its most accurate, not "within the drop"
    assert [(t.knob, why) for t, why in choose_latency_points(sane, 0.01)] == [
        (0.7, "cheapest within 1 pt of dense (validation)")]
    assert [(t.knob, why) for t, why in choose_latency_points(weak, 0.01)] == [
        (0.9, "most accurate (dense is near the majority class)")]


def test_report_warns_at_the_top_and_names_no_point_within_dense(tmp_path, capsys):
    points = run_points(0.61, 0.60)
    md = write_report(points, tmp_path / "r", title="weak")["report"].read_text()
    top = md.split("\n\n")[1]
    assert top.startswith("**WARNING: dense is within 5 points of always predicting the majority class")
    assert top.endswith("the comparisons below are not meaningful.**")
    assert "Cheapest point within" not in md and "indistinguishable" not in md
    assert "## No point is chosen against dense" in md and 'no point is called "within 1 point(s) of dense"' in md
    assert "| always the majority class | 60.00 | 60.00 |" in md and "| chance (1 / labels) | 33.33 | 33.33 |" in md
    _warn_if_dense_is_weak(points, split_baselines(points))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("WARNING: dense is within 5 points") and "report's comparisons" in err[0]


def test_report_of_a_sane_dense_shows_intervals_and_overlap(tmp_path, capsys):
    points = run_points(0.80, 0.81)
    md = write_report(points, tmp_path / "r", title="sane")["report"].read_text()
    assert "WARNING" not in md and "## Cheapest point within 1 accuracy point(s) of dense" in md
    assert "Reference on test: dense 81.00% [75.0, 85.8]; always predicting the majority class 60.00%; " \
           "chance (1/3 labels) 33.33%." in md
    row = next(line for line in md.split("## Cheapest point")[1].splitlines() if line.startswith("| ee |"))
    assert "| 79.50 | 80.50 | +0.50 | [74.5, 85.4] |" in row and "| indistinguishable |" in row
    assert "Statistically indistinguishable from dense on test (95% intervals overlap dense's 81.00 [75.0, 85.8], " \
           "n=200): ee (tiny) threshold=0.7." in md
    _warn_if_dense_is_weak(points, split_baselines(points))
    assert capsys.readouterr().err == ""


def test_versus_dense():
    dense = pt("dense", 4.0, 0.80, n=1000)
    assert versus_dense(pt("ee", 1.0, 0.79, n=1000), dense) == "indistinguishable"
    assert versus_dense(pt("ee", 1.0, 0.70, n=1000), dense) == "below"
    assert versus_dense(pt("ee", 1.0, 0.90, n=1000), dense) == "above"


# --- merging identical rows -----------------------------------------------------------------------


def test_collapse_merges_consecutive_identical_knob_values_only():
    points = [pt("dense", 4.0, 0.8)]
    points += [pt("ee", 1.0, 0.70, knob=k) for k in (0.5, 0.55, 0.6, 0.62)]  # identical: one row
    points += [pt("ee", 2.0, 0.75, knob=0.7)]  # distinct
    points += [pt("ee", 1.0, 0.70, knob=0.8)]  # same as 0.5-0.62, but not consecutive with them
    points += [pt("ee", 3.0, 0.80001, knob=0.9), pt("ee", 3.0, 0.80004, knob=0.95)]  # same to the displayed precision
    points += [pt("sharcs", 1.0, 0.70, knob=0.5, model="sharcs (tiny)")]  # another model is never merged in
    cells = lambda p: [p.method, p.model, knob_label(p), f"{100 * p.accuracy:.2f}", f"{p.gflops:.3f}"]  # noqa: E731
    rows = collapse_rows(points, cells)
    assert [(r[0], r[2]) for r in rows] == [
        ("dense", "—"), ("ee", "threshold=0.5–0.62 (4 values)"), ("ee", "threshold=0.8"), ("ee", "threshold=0.7"),
        ("ee", "threshold=0.9–0.95 (2 values)"), ("sharcs", "threshold=0.5")]


def test_report_table_collapses_but_files_keep_every_point(tmp_path):
    points = run_points(0.80, 0.81)
    paths = write_report(points, tmp_path / "r")
    md = paths["report"].read_text()
    table = md.split("## Operating points")[1].split("## Pareto front")[0]
    knobs = [line.split(" | ")[2] for line in table.splitlines() if line.startswith("| ee |")]
    assert knobs == ["threshold=0.5–0.6 (2 values)", "threshold=0.7–0.8 (2 values)", "threshold=0.9"]
    assert "6 operating points from 2 models (the operating-points table shows them in 4 rows" in md
    assert len(read_points([paths["json"]])) == len(points)
    assert paths["csv"].read_text().count("\n") == len(points) + 1


# --- end to end: a run whose dense baseline learns nothing ---------------------------------------


def test_run_on_random_labels_warns_and_chooses_nothing_against_dense(tiny_hf_dir, user_csv, tmp_path, capsys):
    from test_run import run_args, tiny_preset, write_yaml

    from adaptinf.cli import main

    rng = random.Random(0)
    with user_csv.open() as f:
        texts = [r["review"] for r in csv.DictReader(f)]
    data = tmp_path / "random.csv"
    with data.open("w", newline="") as f:  # labels drawn at random, whatever the text: nothing to learn
        w = csv.writer(f)
        w.writerow(["review", "verdict"])
        for t in texts:
            w.writerow([t, rng.choices(["bad", "good", "meh"], weights=[70, 15, 15])[0]])
    preset = write_yaml(tmp_path / "p.yaml", {**tiny_preset(tiny_hf_dir), "methods": {"ee": {"source": "pretrained"}}})
    out = tmp_path / "out"
    assert main(run_args(preset, data, out)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "within 5 points of always predicting the majority class" in warnings[0]
    md = (out / "report" / "report.md").read_text()
    assert md.split("\n\n")[1].startswith("**WARNING: dense is within 5 points")
    assert "Cheapest point within" not in md and "## No point is chosen against dense" in md
    assert "| always the majority class |" in md and "most accurate (dense is near the majority class)" in md
    points = json.loads((out / "report" / "points.json").read_text())
    assert all(p["majority"] is not None and p["num_labels"] == 3 and p["accuracy_low"] <= p["accuracy"]
               for p in points)
