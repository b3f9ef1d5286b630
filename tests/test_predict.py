"""Prediction: `model.predict(texts)` and `adaptinf predict` on files (streaming, bad rows, no lost output)."""

from __future__ import annotations

import json

import pytest

import adaptinf
from adaptinf.checkpoint import save_model
from adaptinf.cli import main
from adaptinf.predict import predict_file
from adaptinf.registry import get_method
from adaptinf.steps import dense_from_pretrained

TEXTS = ["a gorgeous, moving film", "flat and dull", "the plot never quite comes together", "fun!"]


@pytest.fixture(scope="module")
def models(tiny_hf_dir, tmp_path_factory):
    """Saved tiny models (untrained heads): dense, early exit at a fixed threshold, ACM."""
    d = tmp_path_factory.mktemp("models")
    dense, _ = dense_from_pretrained(str(tiny_hf_dir), ("neg", "pos"), 32, 0.1, 0)
    save_model(dense, d / "dense")
    ee = get_method("ee").from_dense(dense, get_method("ee").Config())
    ee.tokenizer = dense.tokenizer
    ee.set_knob(0.6)
    save_model(ee, d / "ee")
    acm = get_method("acm").from_dense(dense, get_method("acm").Config(learners=2))
    acm.tokenizer = dense.tokenizer
    save_model(acm, d / "acm")
    return d


def test_predict_api_returns_label_confidence_and_compute(models):
    ee = adaptinf.load(models / "ee")
    assert ee.knob == 0.6  # the knob saved with the model is the one predict uses
    preds = ee.predict(TEXTS, batch_size=3)
    assert len(preds) == len(TEXTS)
    for p in preds:
        assert p.label in ("neg", "pos") and 0.5 <= p.confidence <= 1.0 and p.gflops > 0 and p.error is None
        assert p.compute["exit_layer"] in ee.exit_layers
    # the same answers one at a time (batching and sorting by length change nothing)
    assert [p.to_dict() for p in preds] == [ee.predict([t])[0].to_dict() for t in TEXTS]
    acm = adaptinf.load(models / "acm").predict(TEXTS)
    assert all(0.0 <= p.compute["executed_fraction"] <= 1.0 and 0 <= p.compute["mean_k"] <= 2 for p in acm)


def test_predict_api_handles_bad_entries(models):
    model = adaptinf.load(models / "dense")
    preds = model.predict(["", "   ", "word " * 400, 3, "fine"])
    assert [p.error for p in preds] == ["empty text", "empty text", None, "not a text (int)", None]
    assert preds[2].truncated and not preds[4].truncated and preds[4].label is not None
    with pytest.raises(ValueError, match="list of texts"):
        model.predict("one text")
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(TEXTS, batch_size=0)


def test_predict_file_txt_with_bad_lines(models, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(b"a gorgeous, moving film\n\nflat and dull\n\xff\xfe not utf-8\n" + b"long " * 500 + b"\nlast\n")
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(models / "ee"), "--input", str(src), "--output", str(out), "--batch-size", "2",
                 "--chunk-size", "2", "--no-progress"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[1]["error"] == "line 2: empty text" and "not valid UTF-8" in recs[3]["error"]
    assert recs[4]["truncated"] and recs[0]["label"] in ("neg", "pos") and "exit_layer" in recs[0]["compute"]
    err = capsys.readouterr().err
    assert "1 texts were longer" in err and "2 rows could not be predicted" in err
    # an existing output is never overwritten by accident
    assert main(["predict", str(models / "ee"), "--input", str(src), "--output", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_predict_file_csv_and_jsonl(models, tmp_path, capsys):
    model = adaptinf.load(models / "dense")
    csv_in = tmp_path / "in.csv"
    csv_in.write_text('id,review\n7,"great, really"\n8,\n9,"multi\nline"\n', encoding="utf-8")
    counts = predict_file(model, csv_in, tmp_path / "c.jsonl", text_column="review", id_column="id", progress=False)
    recs = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["7", "8", "9"] and counts["predicted"] == 2 and recs[1]["error"]
    jl = tmp_path / "in.jsonl"
    jl.write_text('{"text": "good"}\n{oops\n\n{"other": 1}\n["x"]\n{"text": "bad"}\n')
    predict_file(model, jl, tmp_path / "j.jsonl", progress=False)
    recs = [json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 4, 5, 6]
    assert [r["error"] is None for r in recs] == [True, False, False, False, True]
    assert "not valid JSON" in recs[1]["error"] and "no field 'text'" in recs[2]["error"]
    capsys.readouterr()
    assert main(["predict", str(models / "dense"), "--input", str(csv_in), "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "no column 'text'" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
    assert main(["predict", str(models / "dense"), "--input", str(tmp_path / "no.txt"), "--output",
                 str(tmp_path / "x.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_failure_halfway_keeps_what_was_written(models, tmp_path, monkeypatch):
    import adaptinf.predict as predict

    model = adaptinf.load(models / "dense")
    src = tmp_path / "in.txt"
    src.write_text("".join(f"text number {i}\n" for i in range(7)))
    real, calls = predict.predict_texts, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "predict_texts", flaky)
    with pytest.raises(ValueError, match="the 4 records before them are in"):
        predict_file(model, src, tmp_path / "p.jsonl", chunk_size=2, progress=False)
    recs = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["line"] for r in recs] == [1, 2, 3, 4] and all(r["label"] for r in recs)
