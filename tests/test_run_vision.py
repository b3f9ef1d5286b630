"""`adaptinf run` on images end to end (issue 18): every method of the vision preset on a folder of
synthetic images with a tiny random ViT (a transformers ViTForImageClassification checkpoint), then
`select` and `predict` on image files; and how `adaptinf run` picks its preset for an image task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import adaptinf
from adaptinf.cli import main
from adaptinf.preset import check_modality, default_preset, model_modality, parse_preset, read_preset, resolve
from adaptinf.registry import list_methods

# four classes: which quadrant of an 8x8 image holds a bright 4x4 block (one patch of a patch-4 ViT),
# over dark noise; folder classes are sorted by name
QUADRANTS = {"bottom-left": (4, 0), "bottom-right": (4, 4), "top-left": (0, 0), "top-right": (0, 4)}
SIZE, PER_CLASS = 8, 75
METHODS = [m for m in list_methods() if m != "dense"]


def write_quadrant_folder(root: Path, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, (r, c) in QUADRANTS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 100, (SIZE, SIZE), dtype=np.uint8)
            img[r:r + 4, c:c + 4] = rng.integers(150, 256, (4, 4), dtype=np.uint8)
            Image.fromarray(img, "L").save(root / name / f"{i:03d}.png")
    return root


def save_tiny_vit(directory: Path) -> Path:
    """A random 2-layer ViT for 8x8 grayscale images (patch 4: 4 patches + CLS), as transformers
    saves a ViTForImageClassification, with its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=SIZE, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(do_resize=False, image_mean=[0.5], image_std=[0.5]).save_pretrained(directory)
    return directory


def tiny_vision_preset(model_dir: Path) -> dict:
    """vision-quick's methods (their structure fitted to the tiny ViT by the run) with tiny training,
    evaluation and timing."""
    raw = read_preset("vision-quick")
    methods = {m: {k: v for k, v in d.items() if k in ("source", "set", "knobs")} for m, d in raw["methods"].items()}
    methods["sharcs"]["set"] = {**methods["sharcs"]["set"], "window": 1, "importance_samples": 64}
    methods["sharcs"]["knobs"] = [0, 0.5, 1]
    methods["acm"]["set"] = {**methods["acm"]["set"], "distill_epochs": 1, "gate_epochs": 1}
    methods["acm"]["knobs"] = [-1, 0, 1]
    methods["planer"]["set"] = {**methods["planer"]["set"], "proxy_samples": 16, "latency_repeats": 1,
                                "candidates": 1, "router_refit_samples": 64}
    return {
        "name": "tiny-vision", "description": "tiny ViT on synthetic quadrant images",
        "note": "a tiny random ViT on a few hundred synthetic images",
        "model": str(model_dir),
        "data": {"name": "fashion-mnist"},  # replaced by --task DIR
        "train": {"epochs": 1, "batch_size": 16, "lr": 1.0e-3, "weight_decay": 0.05, "save_every": 5},
        "dense": {"epochs": 6},
        "evaluate": {"batch_size": 32, "refine_rounds": 0},
        "latency": {"samples": 16, "repeats": 1, "warmup": 0, "max_drop": 5, "compare_hf": True,
                    "int8": True, "onnx": True},
        "methods": methods,
    }


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    """One run of every method on an image folder: (run dir, image folder)."""
    d = tmp_path_factory.mktemp("vision")
    folder = write_quadrant_folder(d / "images")
    model = save_tiny_vit(d / "vit")
    preset = d / "tiny-vision.yaml"
    preset.write_text(yaml.safe_dump(tiny_vision_preset(model), sort_keys=False))
    out = d / "out"
    assert main(["run", "--preset", str(preset), "--task", str(folder), "--out", str(out), "--no-progress",
                 "--threads", "1"]) == 0
    return out, folder


def test_every_method_trains_evaluates_and_is_reported_on_images(vision_run):
    out, folder = vision_run
    resolved = yaml.safe_load((out / "resolved.yaml").read_text())
    assert resolved["task"]["data"] == str(folder.resolve())
    assert sorted(m["name"] for m in resolved["methods"]) == sorted(METHODS)
    assert all(m["source"] == "dense" for m in resolved["methods"])

    points = json.loads((out / "report" / "points.json").read_text())
    for split in ("validation", "test"):
        assert {p["method"] for p in points if p["split"] == split} == {"dense", *METHODS}, split
    dense = {p["split"]: p for p in points if p["method"] == "dense"}
    # an easy task: dense far above chance (0.25) on 30 held-out images of each split
    assert dense["validation"]["accuracy"] >= 0.6 and dense["test"]["accuracy"] >= 0.6, dense
    for m in ("sharcs", "acm"):  # swept knobs: cheaper points than dense among them
        assert min(p["gflops"] for p in points if p["method"] == m) < dense["test"]["gflops"], m
    timed = {p["method"] for p in points if p["latency_ms_b1"] is not None}
    assert timed == {"dense", *METHODS}

    summary = json.loads((out / "report" / "summary.json").read_text())
    assert set(summary["methods"]) == set(METHODS)
    for f in ("report.md", "points.csv", "tradeoff.png", "accuracy_vs_gflops.png", "accuracy_vs_latency.png"):
        assert (out / "report" / f).stat().st_size > 0, f
    md = (out / "report" / "report.md").read_text()
    assert "a tiny random ViT on a few hundred synthetic images" in md and "## Pareto front" in md
    bench = {r["case"] for r in json.loads((out / "latency" / "bench.json").read_text())}
    assert {"dense", "dense int8", "onnxruntime fp32", "transformers"} <= bench  # transformers: ViTForImageClassification
    run = json.loads((out / "run.json").read_text())
    assert not run["failed"] and all(s["status"] == "ran" for s in run["stages"])
    # the preset's multi-model exits [1, 6] fitted to the 2-layer ViT (a note of the run)
    assert json.loads((out / "methods" / "multi-model" / ".stage.json").read_text())["info"]["set"]["exits"] == [1, 2]
    model = adaptinf.load(out / "methods" / "ee" / "model")
    assert model.spec.labels == tuple(sorted(QUADRANTS)) and model.spec.encoder.image_size == SIZE


def test_select_and_predict_image_files(vision_run, tmp_path, capsys):
    out, folder = vision_run
    # the cheapest point within 5 points of dense on validation (dense itself at worst; PLANER's
    # architecture depends on measured latency, so which method it is may vary from run to run)
    assert main(["select", str(out), "--max-drop", "5", "--out", str(tmp_path / "sel")]) == 0
    selected = json.loads((tmp_path / "sel" / "config.json").read_text())["extra"]["selected"]
    dense_val = next(p["accuracy"] for p in json.loads((out / "report" / "points.json").read_text())
                     if p["method"] == "dense" and p["split"] == "validation")
    assert selected["val_accuracy"] >= dense_val - 0.05
    assert (tmp_path / "sel" / "preprocessor_config.json").is_file()  # the image processor travels with the model

    # a folder of images: every image under it, one record each, labels from the task's label set
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", str(tmp_path / "sel"), "--input", str(folder), "--output", str(preds),
                 "--no-progress", "--threads", "1"]) == 0
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(records) == len(QUADRANTS) * PER_CLASS
    assert {r["label"] for r in records} <= set(QUADRANTS) and not any(r["error"] for r in records)
    assert all(Path(r["image"]).is_file() and r["gflops"] > 0 for r in records)
    # a trained model on an easy task: its predictions mostly name each image's class folder
    right = sum(Path(r["image"]).parent.name == r["label"] for r in records)
    assert right / len(records) >= 0.6, (selected, right)
    # the Python API: the selected model predicts image paths the same
    model = adaptinf.load(tmp_path / "sel")
    paths = [Path(r["image"]) for r in records[:5]]
    assert [p.label for p in model.predict(paths, batch_size=2)] == [r["label"] for r in records[:5]]

    # a list of image paths, one of them unreadable: an error record for it, the others predicted
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    listing = tmp_path / "list.txt"
    first = sorted((folder / "top-left").iterdir())[:2]
    listing.write_text("".join(f"{p}\n" for p in [*first, bad]))
    preds2 = tmp_path / "preds2.jsonl"
    assert main(["predict", str(out / "methods" / "acm" / "model"), "--input", str(listing),
                 "--output", str(preds2), "--no-progress", "--threads", "1"]) == 0
    records = [json.loads(line) for line in preds2.read_text().splitlines()]
    assert [r["error"] is None for r in records] == [True, True, False]
    assert all(r["label"] in QUADRANTS for r in records[:2])


# --- which preset and model `adaptinf run` picks for an image task ------------------------------------------


@pytest.mark.parametrize("name", ["vision-quick", "vision-full"])
def test_vision_presets_train_vit_tiny_from_scratch(name):
    cfg = parse_preset(read_preset(name), name)
    assert cfg.model == "vit-tiny" and cfg.task.data == "fashion-mnist"
    assert {m.name for m in cfg.methods} == set(METHODS) and all(m.source == "dense" for m in cfg.methods)
    assert cfg.dense.lr >= 5e-4 and cfg.dense.epochs >= 10  # a from-scratch recipe, not a short fine-tuning
    assert cfg.latency.compare_hf is True  # transformers ViTForImageClassification beside our dense
    assert "subset" in cfg.note if name == "vision-quick" else cfg.max_train_samples is None
    # the methods' structure fits vit-tiny as written (no field adapted)
    from adaptinf.hf import load_encoder
    from adaptinf.structure import adapt

    enc = load_encoder("vit-tiny")[0].cfg
    for m in cfg.methods:
        assert adapt(m.name, m.set, enc)[1] == [], m.name


class Stop(Exception):
    """Raised by the stand-in for `adaptinf.run.run`: the settings were seen, nothing trains."""


def capture_run(monkeypatch) -> list:
    """The RunConfigs `adaptinf run` resolves, instead of running them (the call raises `Stop`)."""
    import adaptinf.run

    seen = []

    def fake_run(cfg, out, **kw):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(adaptinf.run, "run", fake_run)
    return seen


def test_run_without_preset_picks_the_vision_preset_for_images(monkeypatch, tmp_path):
    write_quadrant_folder(tmp_path / "imgs", per_class=2)
    for task, data in [("fashion-mnist", "fashion-mnist"), (str(tmp_path / "imgs"), str(tmp_path / "imgs"))]:
        seen = capture_run(monkeypatch)
        with pytest.raises(Stop):
            main(["run", "--task", task, "--out", str(tmp_path / "o"), "--no-progress"])
        assert seen[0].preset == "vision-quick" and seen[0].model == "vit-tiny" and seen[0].task.data == data
    seen = capture_run(monkeypatch)
    with pytest.raises(Stop):
        main(["run", "--preset", "vision-quick", "--out", str(tmp_path / "o"), "--no-progress"])
    assert seen[0].task.data == "fashion-mnist" and seen[0].model == "vit-tiny"
    seen = capture_run(monkeypatch)
    with pytest.raises(Stop):
        main(["run", "--out", str(tmp_path / "o"), "--no-progress"])
    assert seen[0].preset == "quick" and seen[0].model == "minilm-l6"
    assert default_preset(None) == "quick" and default_preset("rotten-tomatoes") == "quick"


@pytest.mark.parametrize("argv, message", [
    (["--preset", "quick", "--task", "fashion-mnist"],
     "preset 'quick' is a text preset (model minilm-l6) but task fashion-mnist is images; use --preset vision-quick"),
    (["--preset", "full", "--task", "fashion-mnist", "--model", "vit-tiny"],
     "its recipe does not train vit-tiny, which starts from random weights (trained from scratch); use --preset vision-quick"),
    (["--preset", "vision-quick", "--task", "rotten-tomatoes"],
     "preset 'vision-quick' is a vision preset (model vit-tiny) but task rotten-tomatoes is text; use --preset quick"),
    (["--task", "fashion-mnist", "--model", "minilm-l6"],
     "--model minilm-l6 is a text model but task fashion-mnist is images; pass a vision model (e.g. vit-tiny)"),
])
def test_a_preset_of_the_other_modality_is_a_clear_error(argv, message, tmp_path, capsys, monkeypatch):
    seen = capture_run(monkeypatch)
    assert main(["run", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err and not seen


def test_a_vit_checkpoint_with_a_text_preset_runs_with_a_note(tmp_path):
    vit = save_tiny_vit(tmp_path / "vit")
    assert model_modality(str(vit)) == "image" and model_modality("minilm-l6") == "text"
    assert model_modality(str(tmp_path / "missing")) is None
    cfg = resolve("quick", model=str(vit), data="fashion-mnist")
    note = check_modality(cfg, "minilm-l6", model_given=True)
    assert "preset 'quick' was written for text (model minilm-l6)" in note
    # a preset that names no model takes the task's default model
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"name": "bare", "methods": {"ee": {"source": "dense"}}}))
    assert resolve(str(bare), data="fashion-mnist").model == "vit-tiny"
    assert resolve(str(bare)).model == "minilm-l6"
