"""The `adaptinf` command: help texts, clean errors, and the whole flow on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from adaptinf.cli import build_parser, main

COMMANDS = ["run", "select", "predict", "finetune", "convert", "evaluate", "bench", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_complete_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"adaptinf {command}" in text and "--out" in text or command == "convert"
    for action in build_parser()._subparsers._group_actions[0].choices[command]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "adaptinf.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in COMMANDS)


def test_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["finetune", "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["finetune", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "points.json"), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err


def test_full_flow_on_a_user_file(tiny_hf_dir, user_csv, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--data", str(user_csv), "--text-column", "review", "--label-column", "verdict"]
    assert main(["finetune", "--model", str(tiny_hf_dir), *common, "--out", str(run), "--epochs", "1",
                 "--batch-size", "16", "--max-length", "32", "--no-progress", "--threads", "1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["steps"] == 5
    cfg = json.loads((run / "best" / "config.json").read_text())
    assert cfg["spec"]["labels"] == ["bad", "good", "meh"] and cfg["extra"]["task"]["text_column"] == "review"

    # rerunning the finished command resumes (nothing left to do) instead of starting over
    assert main(["finetune", "--model", str(tiny_hf_dir), *common, "--out", str(run), "--epochs", "1",
                 "--batch-size", "16", "--max-length", "32", "--no-progress", "--threads", "1"]) == 0
    assert json.loads((run / "summary.json").read_text())["resumed_from_step"] == 5

    # an unknown method is a clear error; dense converts to an identical copy
    capsys.readouterr()
    assert main(["convert", str(run / "best"), "--method", "nonsense", "--out", str(tmp_path / "x")]) == 2
    assert "unknown method 'nonsense'" in capsys.readouterr().err
    assert main(["convert", str(run / "best"), "--method", "dense", "--out", str(tmp_path / "copy")]) == 0

    # evaluate uses the task recorded in the model; latency is measured against dense in one run
    pts = tmp_path / "points"
    assert main(["evaluate", str(run / "best"), "--split", "both", "--latency", "--latency-samples", "32",
                 "--repeats", "2", "--out", str(pts), "--no-progress", "--threads", "1"]) == 0
    points = json.loads((pts / "points.json").read_text())
    assert {p["split"] for p in points} == {"validation", "test"}
    test_pt = next(p for p in points if p["split"] == "test")
    # against the fastest dense reference (padding-free or padded): dense itself is at most 1x
    assert test_pt["latency_ms_b1"] > 0 and 0 < test_pt["speedup_b32"] <= 1.0 + 1e-9

    assert main(["bench", str(run / "best"), str(tmp_path / "copy"), "--compare-hf", "--samples", "32",
                 "--repeats", "2", "--warmup", "1", "--out", str(tmp_path / "bench"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert {r["case"] for r in rows} == {"dense", "dense:copy", "transformers"}
    assert all(r["torch_version"] and r["torch_threads"] >= 1 and r["machine"] for r in rows)

    # --knobs applies to models that have a knob: a dense model among them is evaluated once, not refused
    assert main(["evaluate", str(run / "best"), "--knobs", "0.5,1", "--split", "validation", "--out",
                 str(tmp_path / "pk"), "--no-progress", "--threads", "1"]) == 0
    knobbed = json.loads((tmp_path / "pk" / "points.json").read_text())
    assert len(knobbed) == 1 and knobbed[0]["knob"] is None

    assert main(["report", str(pts), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "dense" in md and (tmp_path / "report" / "tradeoff.png").stat().st_size > 5000

    # a file whose labels fall outside the model's label set is refused by evaluate
    bad = tmp_path / "bad.csv"
    bad.write_text("review,verdict\nfine film,good\nawful,terrible\nok,meh\n")
    capsys.readouterr()
    assert main(["evaluate", str(run / "best"), "--data", str(bad), "--out", str(tmp_path / "p2"), "--no-progress"]) == 2
    assert "outside the label set" in capsys.readouterr().err
