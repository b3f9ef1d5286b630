"""`adaptinf run`'s cache and `adaptinf select` never silently reuse or overwrite the wrong thing:
the data by content, missing outputs, malformed markers, exports into a run, paths out of a run, and
a recorded data file that is gone."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import pytest

import adaptinf
from adaptinf.cli import main
from adaptinf.run import STAGE_FILE, read_marker
from adaptinf.selection import Budget, export
from adaptinf.settings import TaskSettings
from test_run import run_args, tiny_preset, write_yaml


def statuses(out: Path) -> dict[str, str]:
    return {s["name"]: s["status"] for s in json.loads((out / "run.json").read_text())["stages"]}


@pytest.fixture(scope="module")
def safety_run(tiny_hf_dir, user_csv, tmp_path_factory):
    """A finished run with one method (ee) on the user CSV: (run folder, preset path)."""
    d = tmp_path_factory.mktemp("safety")
    preset = write_yaml(d / "tiny.yaml", tiny_preset(tiny_hf_dir))
    out = d / "run"
    assert main(run_args(preset, user_csv, out, "--methods", "ee")) == 0
    return out, preset


@pytest.fixture
def run_copy(safety_run, tmp_path) -> Path:
    """A copy of the finished run to change (its stages are cached: same settings, same data file)."""
    out = tmp_path / "run"
    shutil.copytree(safety_run[0], out)
    return out


# --- 1. the data by content -----------------------------------------------------------------------------


def test_a_data_file_edited_in_place_reruns_every_stage(tiny_hf_dir, user_csv, tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    shutil.copy(user_csv, data)
    preset = write_yaml(tmp_path / "tiny.yaml", tiny_preset(tiny_hf_dir))
    out = tmp_path / "run"
    assert main(run_args(preset, data, out, "--methods", "dense")) == 0
    digest = TaskSettings(data=str(data)).data_digest()
    assert json.loads((out / "dense" / "best" / "config.json").read_text())["extra"]["task"]["data_digest"] == digest

    rows = list(csv.reader(data.open()))
    flip = {"bad": "good", "good": "meh", "meh": "bad"}
    with data.open("w", newline="") as f:  # every label flipped, same name
        csv.writer(f).writerows([rows[0]] + [[i, t, flip[y]] for i, t, y in rows[1:]])

    # the model says its data changed when it is evaluated on the file it recorded
    with pytest.warns(UserWarning, match="the data file changed since the model was trained"):
        assert main(["evaluate", str(out / "dense" / "best"), "--out", str(tmp_path / "pts"), "--no-progress"]) == 0

    capsys.readouterr()
    assert main(run_args(preset, data, out, "--methods", "dense")) == 0
    assert "cached" not in capsys.readouterr().err
    assert set(statuses(out).values()) == {"ran"}
    recorded = json.loads((out / "dense" / "best" / "config.json").read_text())["extra"]["task"]
    assert recorded["data_digest"] == TaskSettings(data=str(data)).data_digest() != digest
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*truncated")
        assert main(["evaluate", str(out / "dense" / "best"), "--out", str(tmp_path / "pts2"), "--no-progress"]) == 0


def test_every_saved_model_records_the_data_digest(safety_run, user_csv):
    out, _ = safety_run
    digest = TaskSettings(data=str(user_csv)).data_digest()
    assert digest.startswith("sha256:")
    for model in (out / "dense" / "best", out / "methods" / "ee" / "model"):
        assert json.loads((model / "config.json").read_text())["extra"]["task"]["data_digest"] == digest


# --- 2. missing outputs ---------------------------------------------------------------------------------


def test_a_stage_whose_outputs_are_missing_runs_again(run_copy, safety_run, user_csv, capsys):
    out, preset = run_copy, safety_run[1]
    shutil.rmtree(out / "methods" / "ee" / "model")
    (out / "points" / "dense" / "points.json").unlink()
    capsys.readouterr()
    assert main(run_args(preset, user_csv, out, "--methods", "ee")) == 0
    err = capsys.readouterr().err
    assert "model/config.json, model/model.safetensors are missing" in err and "points.json is missing" in err
    # what uses a result made again is made again too; the dense model itself is still cached
    assert statuses(out) == {"dense: fine-tune": "cached", "dense: evaluate": "ran", "ee: convert and train": "ran",
                             "ee: evaluate": "ran", "latency at chosen points": "ran"}
    assert adaptinf.load(out / "methods" / "ee" / "model").method == "ee"
    assert (out / "points" / "dense" / "points.json").is_file()


# --- 3. malformed markers -------------------------------------------------------------------------------


@pytest.mark.parametrize("content, why", [
    (b"[]", "JSON list, not an object"),
    (b'"done"', "JSON str, not an object"),
    (b"\xff\xfe\x00garbage", "cannot be read (UnicodeDecodeError)"),
    (b"{not json", "cannot be read (JSONDecodeError)"),
    (b'{"key": "k", "state": "done", "seconds": "long"}', "['seconds'] have the wrong type"),
])
def test_a_malformed_marker_is_not_done(tmp_path, capsys, content, why):
    marker = tmp_path / STAGE_FILE
    marker.write_bytes(content)
    assert read_marker(marker) is None
    assert f"warning: ignoring the stage marker {marker}: " in capsys.readouterr().err
    marker.write_bytes(content)
    read_marker(marker)
    assert why in capsys.readouterr().err


def test_a_run_with_malformed_markers_reruns_those_stages(run_copy, safety_run, user_csv, capsys):
    out, preset = run_copy, safety_run[1]
    (out / "methods" / "ee" / STAGE_FILE).write_text("[]")
    (out / "latency" / STAGE_FILE).write_bytes(b"\xff\xfe")
    capsys.readouterr()
    assert main(run_args(preset, user_csv, out, "--methods", "ee")) == 0
    err = capsys.readouterr().err
    assert f"ignoring the stage marker {out / 'methods' / 'ee' / STAGE_FILE}" in err
    assert f"ignoring the stage marker {out / 'latency' / STAGE_FILE}" in err
    assert statuses(out) == {"dense: fine-tune": "cached", "dense: evaluate": "cached", "ee: convert and train": "ran",
                             "ee: evaluate": "ran", "latency at chosen points": "ran"}


# --- 4. select never writes into a run, nor over a model ------------------------------------------------


def test_select_refuses_an_output_inside_a_run(run_copy, tmp_path, capsys):
    best = run_copy / "dense" / "best"
    before = {f: (best / f).read_bytes() for f in ("config.json", "model.safetensors")}
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "run.json").write_text("{}")
    (other / "dense").mkdir()
    targets = {best: f"the run's model folder {best.resolve()}", run_copy: f"the run folder {run_copy.resolve()}",
               run_copy / "report" / "sel": f"the run's stage folder {(run_copy / 'report').resolve()}",
               run_copy / "methods" / "ee" / "model" / "sub": "the run's model folder",
               other: f"the run folder {other.resolve()}",
               other / "dense" / "m": f"the run's stage folder {(other / 'dense').resolve()}"}
    for target, what in targets.items():
        capsys.readouterr()
        assert main(["select", str(run_copy), "--max-drop", "100", "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"--out {target} is {what}" in err and "pick a folder outside the run" in err, err
    assert {f: (best / f).read_bytes() for f in before} == before
    assert not (run_copy / "report" / "sel").exists() and not (other / "dense" / "m").exists()
    # a new folder beside the stages is no part of them (the README's RUN/selected)
    assert main(["select", str(run_copy), "--max-drop", "100", "--out", str(run_copy / "selected")]) == 0


def test_select_refuses_to_overwrite_a_model_unless_asked(run_copy, tmp_path, capsys):
    sel = tmp_path / "sel"
    assert main(["select", str(run_copy), "--max-drop", "100", "--out", str(sel)]) == 0
    capsys.readouterr()
    assert main(["select", str(run_copy), "--max-drop", "0", "--out", str(sel)]) == 2
    assert f"--out {sel} already holds a model (config.json, model.safetensors)" in capsys.readouterr().err
    _, chosen, _ = export(run_copy, Budget(max_drop=0), sel, overwrite=True)
    assert json.loads((sel / "config.json").read_text())["extra"]["selected"]["val_accuracy"] == chosen.accuracy


# --- 5. paths read from a run stay in the run -----------------------------------------------------------


def test_select_does_not_follow_a_model_dir_out_of_the_run(run_copy, tmp_path, capsys):
    shutil.copytree(run_copy / "methods" / "ee" / "model", tmp_path / "elsewhere")
    points_file = run_copy / "report" / "points.json"
    points = json.loads(points_file.read_text())
    points_file.write_text(json.dumps([{**p, "model_dir": "../elsewhere"} if p["method"] == "ee" else p
                                       for p in points]))
    capsys.readouterr()
    assert main(["select", str(run_copy), "--max-drop", "100", "--out", str(tmp_path / "sel")]) == 2
    err = capsys.readouterr().err
    assert "'../elsewhere'" in err and f"outside the run folder {run_copy.resolve()}" in err
    assert not (tmp_path / "sel").exists()
    out, chosen, _ = export(run_copy, Budget(max_drop=100), tmp_path / "sel", allow_outside=True)
    assert chosen.method == "ee"  # the cheapest point
    assert json.loads((out / "config.json").read_text())["extra"]["selected"]["model_dir"] == str(run_copy / "../elsewhere")


# --- 6. a recorded data file that is gone ---------------------------------------------------------------


def test_a_missing_recorded_data_file_names_the_model_and_suggests_data(safety_run, user_csv, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(safety_run[0] / "dense" / "best", model)
    cfg = json.loads((model / "config.json").read_text())
    gone = str(tmp_path / "moved-away.csv")
    cfg["extra"]["task"]["data"] = gone
    (model / "config.json").write_text(json.dumps(cfg))
    message = f"the model at {model} was trained on {gone}, which does not exist here; pass --data FILE"
    capsys.readouterr()
    assert main(["evaluate", str(model), "--out", str(tmp_path / "pts"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert main(["convert", str(model), "--method", "ee", "--out", str(tmp_path / "ee"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    # --data replaces the recorded file (the recorded columns still apply)
    assert main(["evaluate", str(model), "--data", str(user_csv), "--out", str(tmp_path / "pts"), "--no-progress"]) == 0


def test_select_flags_reach_export(monkeypatch, tmp_path):
    """`select --overwrite --allow-outside-run` are passed to selection.export (named in its messages)."""
    import adaptinf.selection as selection
    from adaptinf.cli import main

    seen = {}

    def fake_export(run_dir, budget, out, overwrite=False, allow_outside=False):
        seen.update(overwrite=overwrite, allow_outside=allow_outside)
        raise ValueError("stop here")

    monkeypatch.setattr(selection, "export", fake_export)
    assert main(["select", str(tmp_path), "--max-drop", "1", "--out", str(tmp_path / "sel")]) == 2
    assert seen == {"overwrite": False, "allow_outside": False}
    assert main(["select", str(tmp_path), "--max-drop", "1", "--out", str(tmp_path / "sel"), "--overwrite",
                 "--allow-outside-run"]) == 2
    assert seen == {"overwrite": True, "allow_outside": True}
