"""Prediction: `model.predict(texts)` and `adaptinf predict` on files (streaming, bad rows, no lost output;
the input is never destroyed, what cannot be read or written is a one-line error, and a rerun of an
interrupted job resumes to the exact output of one uninterrupted run)."""

from __future__ import annotations

import gzip
import json
import os
import pathlib

import pytest

import adaptinf
import adaptinf.predict as predict
from adaptinf.checkpoint import save_model
from adaptinf.cli import main
from adaptinf.predict import predict_file, state_path
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


# --- safety: the input is never destroyed, clear errors, resume ---------------------------------------

ROWS = ["a gorgeous, moving film", "", "flat and dull", "the plot never quite comes together", "fun!", "   ",
        "word " * 60, "so so", "a triumph", "i walked out", "last one"]


def _predict(model_dir, src, out, *extra) -> int:
    return main(["predict", str(model_dir), "--input", str(src), "--output", str(out), "--batch-size", "2",
                 "--chunk-size", "3", "--no-progress", *extra])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "in.txt"
    p.write_text("".join(t + "\n" for t in ROWS), encoding="utf-8")
    return p


@pytest.fixture
def reference(models, src, tmp_path):
    """The output of one uninterrupted run."""
    out = tmp_path / "reference.jsonl"
    assert _predict(models / "dense", src, out) == 0
    assert not state_path(out).exists()
    return out.read_bytes()


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_an_output_that_is_the_input_is_refused_even_with_overwrite(models, src, tmp_path, capsys, link):
    before = src.read_bytes()
    out = tmp_path / "out.jsonl"
    os.link(src, out) if link == "hard" else out.symlink_to(src)
    for extra in ([], ["--overwrite"]):
        assert _predict(models / "dense", src, out, *extra) == 2
        assert "is the input file" in _one_line_error(capsys)
        assert src.read_bytes() == before and out.read_bytes() == before
    assert not state_path(out).exists()


def test_a_compressed_input_is_refused(models, tmp_path, capsys):
    data = gzip.compress(b"".join(t.encode() + b"\n" for t in ROWS))
    for name in ("in.txt.gz", "in.txt"):  # by its name, and by its first bytes
        p = tmp_path / name
        p.write_bytes(data)
        assert _predict(models / "dense", p, tmp_path / "out.jsonl") == 2
        err = _one_line_error(capsys)
        assert "gzip-compressed" in err and "decompress it first" in err and str(p) in err
        assert p.read_bytes() == data and not (tmp_path / "out.jsonl").exists()


def test_an_output_that_cannot_be_created_is_a_one_line_error(models, src, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    out = blocker / "sub" / "out.jsonl"
    assert _predict(models / "dense", src, out) == 2
    err = _one_line_error(capsys)
    assert str(out) in err and f"{blocker} is a file, not a folder" in err and blocker.read_text() == "keep me"
    assert _predict(models / "dense", src, tmp_path) == 2  # a folder
    assert "is a folder" in _one_line_error(capsys)

    def denied(*args, **kwargs):  # tests run as root, where permission bits do not stop writes
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "mkdir", denied)
    assert _predict(models / "dense", src, tmp_path / "locked" / "out.jsonl") == 2
    err = _one_line_error(capsys)
    assert "Permission denied" in err and str(tmp_path / "locked" / "out.jsonl") in err
    monkeypatch.undo()
    monkeypatch.setattr(pathlib.Path, "write_text", denied)  # the resume state next to the output
    assert _predict(models / "dense", src, tmp_path / "out.jsonl") == 2
    assert "Permission denied" in _one_line_error(capsys)


def _interrupt_after(monkeypatch, calls: int, exc: BaseException) -> None:
    """predict_texts raises `exc` on its `calls`-th call (one call per chunk)."""
    real, seen = predict.predict_texts, []

    def flaky(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "predict_texts", flaky)


def test_ctrl_c_then_rerun_resumes_to_the_uninterrupted_output(models, src, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.jsonl"
    _interrupt_after(monkeypatch, 3, KeyboardInterrupt())
    assert _predict(models / "dense", src, out) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert len(out.read_bytes().splitlines()) == 6 and reference.startswith(out.read_bytes())
    state = json.loads(state_path(out).read_text())
    assert state["input"]["sha256"] and state["model"]["method"] == "dense" and state["settings"]["chunk_size"] == 3
    monkeypatch.undo()
    real, calls = predict.predict_texts, []
    monkeypatch.setattr(predict, "predict_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _predict(models / "dense", src, out) == 0
    assert len(calls) == 2  # the two chunks left, not the two already written
    assert out.read_bytes() == reference and not state_path(out).exists()
    assert f"{len(ROWS)} records written" in capsys.readouterr().out
    # finished: a rerun is refused as before, and --overwrite writes the same again
    assert _predict(models / "dense", src, out) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert _predict(models / "dense", src, out, "--overwrite") == 0 and out.read_bytes() == reference


def test_a_failure_then_rerun_resumes(models, src, reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.jsonl"
    _interrupt_after(monkeypatch, 2, RuntimeError("out of memory"))
    assert _predict(models / "dense", src, out) == 2
    assert "rerun the same command to resume" in _one_line_error(capsys)
    monkeypatch.undo()
    assert _predict(models / "dense", src, out) == 0 and out.read_bytes() == reference


@pytest.mark.parametrize("kept", [0, 4, 7, len(ROWS)])
def test_kill_9_mid_line_then_rerun_resumes(models, src, reference, tmp_path, monkeypatch, kept):
    """A kill leaves `kept` complete records and half of the next one (or, at the end, the state file
    not yet removed): the cut line is dropped, the rest predicted again."""
    out = tmp_path / "out.jsonl"
    _interrupt_after(monkeypatch, 2, KeyboardInterrupt())
    assert _predict(models / "dense", src, out) == 130  # leaves this job's state file
    monkeypatch.undo()
    lines = reference.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:kept]) + (lines[kept][:9] if kept < len(lines) else b""))
    assert _predict(models / "dense", src, out) == 0
    assert out.read_bytes() == reference and not state_path(out).exists()


def test_resume_from_csv_with_ids(models, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("id,review\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(ROWS)), encoding="utf-8")
    common = ["--text-column", "review", "--id-column", "id"]
    assert _predict(models / "ee", src, tmp_path / "ref.jsonl", *common) == 0
    reference = (tmp_path / "ref.jsonl").read_bytes()
    out = tmp_path / "out.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_after(mp, 3, KeyboardInterrupt())
        assert _predict(models / "ee", src, out, *common) == 130
    out.write_bytes(reference[: reference.index(b"\n", 200) + 40])  # complete records, then half of one
    assert _predict(models / "ee", src, out, *common) == 0 and out.read_bytes() == reference


def test_another_jobs_partial_output_is_refused_without_overwrite(models, src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.jsonl"
    _interrupt_after(monkeypatch, 2, KeyboardInterrupt())
    assert _predict(models / "dense", src, out) == 130
    monkeypatch.undo()
    capsys.readouterr()
    partial = out.read_bytes()
    assert _predict(models / "ee", src, out) == 2  # another model
    err = _one_line_error(capsys)
    assert "partial output of another job" in err and "another model" in err and "--overwrite" in err
    assert _predict(models / "dense", src, out, "--batch-size", "4") == 2  # another setting
    assert "--batch-size 2, now 4" in _one_line_error(capsys)
    other = tmp_path / "other.txt"
    other.write_text("something else\n")
    assert _predict(models / "dense", other, out) == 2  # another input
    assert "other input" in _one_line_error(capsys)
    assert out.read_bytes() == partial
    # with --overwrite the other job starts over, to its own uninterrupted output
    assert _predict(models / "ee", src, out, "--overwrite") == 0
    assert _predict(models / "ee", src, tmp_path / "ee.jsonl") == 0
    assert out.read_bytes() == (tmp_path / "ee.jsonl").read_bytes() and not state_path(out).exists()
