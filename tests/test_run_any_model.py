"""`adaptinf run` on a user's model and data that are not the built-in ones: a random 4-layer BERT of
another width and a small 3-label file whose labels carry no signal. Every method of the quick preset
runs (its structure, written for the 6-layer MiniLM, adapted to the model with notes), and the report
says that dense is at the majority-class rate instead of comparing methods with it."""

from __future__ import annotations

import csv
import json
import random

import pytest
import yaml

from adaptinf.cli import main
from adaptinf.preset import read_preset


@pytest.fixture(scope="module")
def four_layer_hf_dir(random_bert_dir):
    return random_bert_dir(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96)


@pytest.fixture(scope="module")
def noise_csv(tmp_path_factory):
    """90 review texts with labels drawn at random from three classes (nothing to learn)."""
    from adaptinf.data import rotten_tomatoes

    texts, _ = rotten_tomatoes(seed=0).train
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "noise.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for t in texts[:90]:
            w.writerow([t, rng.choice(["x", "y", "z"])])
    return path


@pytest.mark.slow
def test_quick_preset_runs_every_method_on_another_model_and_flags_a_chance_level_dense(four_layer_hf_dir, noise_csv,
                                                                                      tmp_path, capsys):
    raw = read_preset("quick")
    raw.update(model=str(four_layer_hf_dir), max_length=32, note="", data={"max_train_samples": 48},
               train={"epochs": 1, "batch_size": 16, "lr": 1.0e-3, "save_every": 2},
               evaluate={"batch_size": 32, "refine_rounds": 0},
               latency={"samples": 16, "repeats": 1, "warmup": 0})
    raw["methods"]["planer"]["set"].update(proxy_samples=8, latency_repeats=1)
    preset = tmp_path / "quick-on-4-layers.yaml"
    preset.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "out"
    code = main(["run", "--preset", str(preset), "--data", str(noise_csv), "--out", str(out), "--no-progress",
                 "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    points = json.loads((out / "report" / "points.json").read_text())
    assert {p["method"] for p in points} == {"dense", "ee", "sweet", "multi-model", "sharcs", "acm", "planer"}
    # the preset's multi-model exits [1, 6] fitted to 4 layers, said in the terminal and the report
    assert "multi-model: exits [1, 6] -> [1, 4]" in err
    md = (out / "report" / "report.md").read_text()
    assert "multi-model: exits [1, 6] -> [1, 4]" in md
    assert json.loads((out / "methods" / "multi-model" / "model" / "config.json").read_text())["method_config"]["exits"] == [1, 4]
    # dense learned nothing: the run and the report say so, and claim no point "within N points of dense"
    assert "majority class" in err and "within 5 points of always predicting the majority class" in md
    assert "No point is chosen against dense" in md
