"""`--quantize` and `--references` on the command line, on a tiny saved model (fast, no timing claims)."""

from __future__ import annotations

import json

import pytest

from adaptinf.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory, user_csv):
    out = tmp_path_factory.mktemp("speed")
    dense = out / "dense"
    args = ["finetune", "--model", "minilm-l6", "--data", str(user_csv), "--text-column", "review", "--label-column",
            "verdict", "--epochs", "1", "--max-train-samples", "16", "--max-length", "16", "--out", str(dense),
            "--no-progress"]
    assert main(args) == 0
    ee = out / "ee"
    assert main(["convert", str(dense / "best"), "--method", "ee", "--out", str(ee), "--no-progress"]) == 0
    return out, dense / "best", ee, user_csv


def test_bench_references_and_quantised_forms(saved):
    out, dense, ee, csv = saved
    bench = out / "bench"
    assert main(["bench", str(dense), f"{ee}@0.9", "--data", str(csv), "--text-column", "review", "--label-column",
                 "verdict", "--samples", "4", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1,2",
                 "--references", "--no-compile", "--quantize", "int8", "--out", str(bench), "--no-progress"]) == 0
    rows = json.loads((bench / "bench.json").read_text())
    cases = {r["case"] for r in rows}
    for name in ("dense", "dense padded", "transformers", "dense int8", "onnxruntime fp32", "onnxruntime int8",
                 "ee:ee@0.9", "ee:ee@0.9 int8"):
        assert name in cases, (name, cases)
    by = {(r["case"], r["batch_size"]): r for r in rows}
    assert by[("ee:ee@0.9 int8", 2)]["precision"] == "int8"
    assert by[("ee:ee@0.9 int8", 2)]["best_reference"] in ("dense int8", "onnxruntime int8")
    assert by[("ee:ee@0.9", 2)]["best_reference"] in ("dense", "dense padded", "transformers", "onnxruntime fp32")
    assert all(r["peak_gflops_per_s"] > 0 and r["achieved_gflops_per_s"] > 0 for r in rows)


def test_evaluate_and_predict_quantised(saved, tmp_path):
    out, dense, ee, csv = saved
    assert main(["evaluate", str(ee), "--data", str(csv), "--text-column", "review", "--label-column", "verdict",
                 "--knobs", "0.9", "--max-samples", "8", "--quantize", "int8", "--out", str(tmp_path / "pts"),
                 "--no-progress"]) == 0
    pts = json.loads((tmp_path / "pts" / "points.json").read_text())
    assert pts and all(p["model"].endswith(" int8") for p in pts)
    with pytest.raises(SystemExit):
        main(["evaluate", str(ee), "--quantize", "fp4", "--out", str(tmp_path / "x")])
    txt = tmp_path / "in.txt"
    txt.write_text("a fine film\nawful\n")
    assert main(["predict", str(dense), "--input", str(txt), "--output", str(tmp_path / "p.jsonl"),
                 "--quantize", "int8", "--no-progress"]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
