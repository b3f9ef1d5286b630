"""The error boundary of `adaptinf`: a user's bad input ends in one `error: ...` line and exit status 2,
before any work and without touching what existed; --debug / ADAPTINF_DEBUG=1 show the traceback, and
an internal error always does."""

from __future__ import annotations

import json

import pytest
import torch

from adaptinf.cli import _attach_negative_values, main
from conftest import make_tiny_spec

QUIET = ["--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_tokenizer, user_csv):
    """A tiny dense model and its early-exit conversion (untrained), saved with MiniLM's tokenizer and
    the user's file as their task: {"dense": dir, "ee": dir}."""
    from adaptinf.checkpoint import save_model
    from adaptinf.methods.dense import DenseClassifier
    from adaptinf.registry import get_method
    from adaptinf.settings import TaskSettings
    from adaptinf.steps import recorded_settings

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    dense = DenseClassifier(make_tiny_spec(vocab_size=30522, labels=("bad", "good", "meh"))).eval()
    dense.tokenizer = minilm_tokenizer
    ee_cls = get_method("ee")
    ee = ee_cls.from_dense(dense, ee_cls.Config())
    ee.tokenizer = minilm_tokenizer
    task = recorded_settings(TaskSettings(data=str(user_csv), text_column="review", label_column="verdict"))
    dirs = {"dense": root / "dense", "ee": root / "ee"}
    for name, model in (("dense", dense), ("ee", ee)):
        save_model(model, dirs[name], extra={"task": task})
    return dirs


def _error(capsys) -> str:
    """The one line the command wrote to stderr (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _keep_me(path):
    path.write_text("keep me")
    return path


# the commands that write a folder, each with what it needs besides --out
OUT_COMMANDS = {
    "finetune": lambda m: ["finetune"],
    "convert": lambda m: ["convert", str(m["dense"]), "--method", "ee"],
    "evaluate": lambda m: ["evaluate", str(m["ee"])],
    "bench": lambda m: ["bench", str(m["dense"])],
    "run": lambda m: ["run"],
    "select": lambda m: ["select", str(m["dense"]), "--max-gflops", "1"],
    "report": lambda m: ["report", str(m["dense"])],
}


@pytest.mark.parametrize("command", sorted(OUT_COMMANDS))
def test_an_out_that_is_a_file_is_refused_before_any_work(command, models, tmp_path, capsys):
    blocker = _keep_me(tmp_path / "notes.txt")
    assert main([*OUT_COMMANDS[command](models), "--out", str(blocker)]) == 2
    assert f"--out {blocker} is a file; give a folder" in _error(capsys)
    assert main([*OUT_COMMANDS[command](models), "--out", str(blocker / "sub")]) == 2
    assert f"{blocker} is a file, not a folder" in _error(capsys)
    assert blocker.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [blocker]


def test_an_out_that_cannot_be_written_names_the_folder(models, tmp_path, capsys, monkeypatch):
    import adaptinf.evaluate

    out = tmp_path / "locked"
    # tests run as root, where permission bits do not stop writes: say the folder above is not writable
    monkeypatch.setattr("os.access", lambda path, mode: False)
    assert main(["evaluate", str(models["ee"]), "--out", str(out / "points"), *QUIET]) == 2
    assert f"--out {out / 'points'} cannot be written: no permission to write in {tmp_path}" in _error(capsys)
    monkeypatch.undo()

    def denied(points, out_dir):  # a folder that turns out unwritable while the command works
        raise PermissionError(13, "Permission denied", str(out_dir / "points.csv"))

    monkeypatch.setattr(adaptinf.evaluate, "write_points", denied)
    assert main(["evaluate", str(models["ee"]), "--split", "validation", "--knobs", "0.5", "--max-samples", "8",
                 "--out", str(out), *QUIET]) == 2
    err = _error(capsys)
    assert f"--out {out} cannot be written ({out / 'points.csv'}): permission denied" in err
    assert "choose another folder" in err


@pytest.mark.parametrize("exc, message", [
    (lambda o: FileExistsError(17, "File exists", str(o)), "--out {o} is a file; give a folder"),
    (lambda o: FileExistsError(17, "File exists", str(o.parent)), "--out {o}: {p} is a file, not a folder"),
    (lambda o: FileExistsError(17, "File exists", str(o / "x")), "--out {o}: {o}/x already exists and is not a folder"),
    (lambda o: NotADirectoryError(20, "Not a directory", str(o / "a" / "b")),
     "--out {o}: {o}/a/b: a part of it is not a folder"),
    (lambda o: PermissionError(13, "Permission denied"), "--out {o} cannot be written: permission denied"),
    (lambda o: PermissionError(13, "Permission denied", str(o.parent / "in.csv")), "{p}/in.csv: permission denied"),
    (lambda o: FileNotFoundError(2, "No such file or directory", str(o / "x")), "--out {o}: {o}/x does not exist"),
])
def test_path_errors_while_working_name_the_path(exc, message, models, tmp_path, capsys, monkeypatch):
    import adaptinf.registry

    out = tmp_path / "o"

    def load_model(*args, **kwargs):
        raise exc(out)

    monkeypatch.setattr(adaptinf.registry, "load_model", load_model)
    assert main(["evaluate", str(models["ee"]), "--out", str(out), *QUIET]) == 2
    assert message.format(o=out, p=tmp_path) in _error(capsys)


def test_debug_shows_the_traceback_and_internal_errors_always_do(models, tmp_path, capsys, monkeypatch):
    import adaptinf.registry

    blocker = _keep_me(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        main(["--debug", "evaluate", str(models["ee"]), "--out", str(blocker)])
    monkeypatch.setenv("ADAPTINF_DEBUG", "1")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        main(["evaluate", str(models["ee"]), "--out", str(blocker)])
    monkeypatch.delenv("ADAPTINF_DEBUG")

    def fails(exc):
        def load_model(*args, **kwargs):
            raise exc
        monkeypatch.setattr(adaptinf.registry, "load_model", load_model)

    out = ["--out", str(tmp_path / "o"), *QUIET]
    fails(FileNotFoundError(2, "No such file or directory", str(tmp_path / "gone" / "config.json")))
    assert main(["evaluate", str(models["ee"]), *out]) == 2
    assert f"{tmp_path / 'gone' / 'config.json'} does not exist" in _error(capsys)
    fails(IsADirectoryError(21, "Is a directory", str(tmp_path)))
    assert main(["evaluate", str(models["ee"]), *out]) == 2
    assert f"{tmp_path} is a folder; give a file" in _error(capsys)
    for internal in (RuntimeError("a bug"), KeyError("x"), OSError(28, "No space left on device")):
        fails(internal)
        with pytest.raises(type(internal)):
            main(["evaluate", str(models["ee"]), *out])
    fails(KeyboardInterrupt())
    assert main(["evaluate", str(models["ee"]), *out]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and blocker.read_text() == "keep me"


def test_negative_knob_lists(models, tmp_path, capsys):
    assert _attach_negative_values(["evaluate", "--knobs", "-1,2", "--knob", "-.5", "--out", "-x"]) == [
        "evaluate", "--knobs=-1,2", "--knob=-.5", "--out", "-x"]
    for i, knobs in enumerate((["--knobs", "-1,2"], ["--knobs=-1,2"])):
        out = tmp_path / f"points{i}"
        assert main(["evaluate", str(models["ee"]), *knobs, "--split", "validation", "--max-samples", "8",
                     "--out", str(out), *QUIET]) == 0
        assert sorted(p["knob"] for p in json.loads((out / "points.json").read_text())) == [-1.0, 2.0]
    for i, knob in enumerate((["--knob", "-1,2"], ["--knob=-1,2"])):
        out = tmp_path / f"bench{i}"
        assert main(["bench", str(models["ee"]), *knob, "--batch-sizes", "1", "--samples", "2", "--repeats", "1",
                     "--warmup", "0", "--out", str(out), *QUIET]) == 0
        assert {r["case"] for r in json.loads((out / "bench.json").read_text())} == {"ee:ee@-1", "ee:ee@2"}
    assert main(["evaluate", str(models["ee"]), "--knobs", "-1,x", "--out", str(tmp_path / "bad"), *QUIET]) == 2
    assert "--knobs expects comma-separated numbers, got '-1,x'" in _error(capsys)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("argv, flag", [
    (["bench", "{dense}", "--samples", "0"], "--samples"),
    (["bench", "{dense}", "--repeats", "0"], "--repeats"),
    (["bench", "{dense}", "--warmup", "-1"], "--warmup"),
    (["evaluate", "{ee}", "--latency", "--latency-samples", "0"], "--latency-samples"),
    (["evaluate", "{ee}", "--latency", "--repeats", "-3"], "--repeats"),
    (["evaluate", "{ee}", "--max-samples", "0"], "--max-samples"),
    (["evaluate", "{ee}", "--batch-size", "0"], "--batch-size"),
    (["finetune", "--epochs", "0"], "--epochs"),
    (["run", "--max-eval-samples", "0"], "--max-eval-samples"),
])
def test_counts_below_their_least_value_are_refused(argv, flag, models, tmp_path, capsys):
    argv = [a.format(**{k: str(v) for k, v in models.items()}) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "o"), *QUIET]) == 2
    least = 0 if flag == "--warmup" else 1
    assert f"{flag} must be at least {least}, got" in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_finetune_refuses_an_adaptinf_model_directory(models, tmp_path, capsys):
    d = str(models["dense"])
    assert main(["finetune", "--model", d, "--out", str(tmp_path / "o"), *QUIET]) == 2
    assert _error(capsys) == (
        f"error: {d} is an adaptinf model directory; finetune starts from a pretrained model (built-in name or "
        f"Hugging Face checkpoint); to add a method to it use `adaptinf convert {d} --method M`")
    assert main(["run", "--model", d, "--out", str(tmp_path / "o"), *QUIET]) == 2
    assert f"{d} is an adaptinf model directory; run starts from a pretrained model" in _error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method, pair, message", [
    ("acm", "beta=abc", "AcmConfig.beta expects a number, got 'abc'"),
    ("ee", "classifier_dropout=abc", "EarlyExitConfig.classifier_dropout expects a number, got 'abc'"),
    ("acm", "bta=0.5", "unknown fields ['bta'] of method 'acm' (did you mean 'beta'?); known: learners,"),
    ("ee", "exit=[1]", "(did you mean 'exits'?)"),
])
def test_bad_set_values_fail_before_any_work(method, pair, message, models, tmp_path, capsys, monkeypatch):
    import adaptinf.steps

    def no_work(*args, **kwargs):
        raise AssertionError("the source was loaded before --set was checked")

    monkeypatch.setattr(adaptinf.steps, "load_source", no_work)
    assert main(["convert", str(models["dense"]), "--method", method, "--set", pair, "--out", str(tmp_path / "o"),
                 *QUIET]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_an_unknown_method_suggests_a_close_one(models, tmp_path, capsys):
    assert main(["convert", str(models["dense"]), "--method", "acn", "--out", str(tmp_path / "o")]) == 2
    assert "unknown method 'acn'" in (err := _error(capsys)) and "(did you mean 'acm'?)" in err


@pytest.mark.parametrize("change, message", [
    ({"modle": "minilm-l6"}, "unknown key(s) ['modle'] (did you mean 'model'?)"),
    ({"data": {"seeed": 1}}, "data: unknown key(s) ['seeed'] (did you mean 'seed'?)"),
    ({"train": {"epoch": 1}}, "train: unknown key(s) ['epoch'] (did you mean 'epochs'?)"),
    ({"evaluate": {"batchsize": 8}}, "evaluate: unknown key(s) ['batchsize'] (did you mean 'batch_size'?)"),
    ({"latency": {"sample": 8}}, "latency: unknown key(s) ['sample'] (did you mean 'samples'?)"),
    ({"methods": {"ee": {"sourc": "dense"}}}, "methods.ee: unknown key(s) ['sourc'] (did you mean 'source'?)"),
    ({"methods": {"acm": {"set": {"bta": 1}}}}, "methods.acm.set: unknown fields ['bta'] of method 'acm' "
                                                "(did you mean 'beta'?)"),
    ({"methods": {"acn": {}}}, "unknown method 'acn' (did you mean 'acm'?)"),
    ({"methods": {"acm": {"set": {"beta": "abc"}}}}, "methods.acm.set: AcmConfig.beta expects a number, got 'abc'"),
    ({"train": {"lr": "abc"}}, "train.lr must be a number, got 'abc'"),
    ({"latency": {"repeats": 2.5}}, "latency.repeats must be an integer, got 2.5"),
])
def test_bad_preset_files_are_one_line_errors(change, message, tmp_path, capsys):
    import yaml

    from adaptinf.preset import read_preset

    preset = tmp_path / "mine.yaml"
    preset.write_text(yaml.safe_dump({**read_preset("quick"), **change}))
    before = preset.read_text()
    out = tmp_path / "run"
    out.mkdir()
    kept = _keep_me(out / "notes.txt")
    assert main(["run", "--preset", str(preset), "--out", str(out), *QUIET]) == 2
    assert message in _error(capsys)
    assert preset.read_text() == before and sorted(out.iterdir()) == [kept] and kept.read_text() == "keep me"


def test_finetune_warns_when_a_scratch_model_gets_the_text_recipe(tmp_path, capsys, monkeypatch):
    """vit-tiny has random weights: the text defaults (lr 5e-5, 2 epochs) get a loud warning; a
    from-scratch recipe does not."""
    import adaptinf.steps

    calls = []
    monkeypatch.setattr(adaptinf.steps, "finetune_dense", lambda *a, **k: calls.append(a[2]))
    assert main(["finetune", "--task", "fashion-mnist", "--out", str(tmp_path / "a")]) == 0
    assert "starts from random weights" in capsys.readouterr().err
    assert main(["finetune", "--task", "fashion-mnist", "--lr", "1e-3", "--epochs", "12", "--out", str(tmp_path / "b")]) == 0
    assert "random weights" not in capsys.readouterr().err
    assert calls[1].lr == 1e-3 and calls[1].epochs == 12
