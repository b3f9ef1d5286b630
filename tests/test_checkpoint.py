"""Saved models: safetensors only, and a clear ValueError for every way a checkpoint can be wrong;
the same for Hugging Face checkpoint directories given as a base model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptinf import hf
from adaptinf.backbone import EncoderConfig
from adaptinf.checkpoint import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, read_config, save_model
from adaptinf.registry import load_model
from adaptinf.methods.dense import DenseClassifier
from adaptinf.model import ModelSpec


@pytest.fixture
def saved(tiny_dense, tmp_path) -> Path:
    return save_model(tiny_dense, tmp_path / "model")


def edit_config(directory: Path, **changes) -> None:
    path = directory / CONFIG_FILE
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def test_saved_directory_holds_safetensors_and_json_only(saved, tiny_dense, tiny_batch):
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    pickles = [p for p in saved.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")]
    assert not pickles
    assert not list(saved.rglob("*.tmp")), "atomic writes left a temporary file behind"
    state = load_file(str(saved / WEIGHTS_FILE))  # reads without pickle
    assert state.keys() == tiny_dense.state_dict().keys()
    cfg = json.loads((saved / CONFIG_FILE).read_text())
    assert cfg["format"] == "adaptinf" and cfg["format_version"] == FORMAT_VERSION and cfg["method"] == "dense"
    with torch.no_grad():
        assert torch.equal(load_model(saved)(**tiny_batch).logits, tiny_dense(**tiny_batch).logits)


def test_saving_twice_overwrites(saved, tiny_dense, tiny_batch):
    with torch.no_grad():
        tiny_dense.classifier.bias.add_(1.0)
    save_model(tiny_dense, saved)
    with torch.no_grad():
        assert torch.equal(load_model(saved)(**tiny_batch).logits, tiny_dense(**tiny_batch).logits)


def test_tokenizer_is_saved_and_reattached(tiny_dense, minilm_tokenizer, tmp_path):
    tiny_dense.tokenizer = minilm_tokenizer
    d = save_model(tiny_dense, tmp_path / "m")
    assert (d / "tokenizer.json").is_file()
    loaded = load_model(d)
    assert loaded.tokenizer("a fine film")["input_ids"] == minilm_tokenizer("a fine film")["input_ids"]
    assert load_model(d, with_tokenizer=False).tokenizer is None


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_file_instead_of_directory(saved):
    with pytest.raises(ValueError, match="is a file; pass the model directory"):
        load_model(saved / WEIGHTS_FILE)


def test_missing_config(saved):
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(ValueError, match="config.json not found: not an adaptinf model directory"):
        load_model(saved)


@pytest.mark.parametrize("text", ['{"format": "adaptinf", ', "", "\xff\xfe not text"])
def test_corrupt_json(saved, text):
    (saved / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(saved)


def test_json_that_is_not_an_object(saved):
    (saved / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON list, not an object"):
        load_model(saved)


def test_hugging_face_checkpoint_is_not_an_adaptinf_model(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / CONFIG_FILE).write_text(json.dumps({"model_type": "bert", "hidden_size": 384}))
    with pytest.raises(ValueError, match="not an adaptinf model directory .*Hugging Face checkpoint"):
        load_model(d)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_format_version(saved, version):
    edit_config(saved, format_version=version)
    with pytest.raises(ValueError, match=f"format version {version!r}; this adaptinf reads version {FORMAT_VERSION}"):
        load_model(saved)


@pytest.mark.parametrize("key", ["method", "method_config", "spec"])
def test_missing_config_entries(saved, key):
    edit_config(saved, **{key: None})
    with pytest.raises(ValueError, match=f"missing '{key}'"):
        load_model(saved)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"method_config": "dense"}, "'method_config' should be a JSON object"),
        ({"spec": {"encoder": 3, "labels": ["a", "b"], "max_length": 8}}, "model spec is malformed"),
        ({"spec": {"labels": ["a", "b"]}}, "model spec is missing field 'encoder'"),
        ({"method_config": {"classifier_dropout": 0.1, "extra": 1}}, "unknown fields \\['extra'\\]"),
        ({"method_config": {"classifier_dropout": 2.0}}, "classifier_dropout must be in"),
        ({"knob": 0.5}, "no inference-time knob"),
    ],
)
def test_malformed_config_entries(saved, changes, match):
    edit_config(saved, **changes)
    with pytest.raises(ValueError, match=match):
        load_model(saved)


def test_unknown_method(saved):
    edit_config(saved, method="quantum")
    with pytest.raises(ValueError, match="unknown method 'quantum'; available: dense"):
        load_model(saved)


def test_expect_method_mismatch(saved):
    with pytest.raises(ValueError, match="holds a 'dense' model, expected 'early-exit'"):
        load_model(saved, expect_method="early-exit")
    assert load_model(saved, expect_method="dense").method == "dense"


def test_weights_of_another_shape(saved, tiny_spec, tmp_path):
    wider = ModelSpec(dataclasses.replace(tiny_spec.encoder, hidden_size=48), tiny_spec.labels, tiny_spec.max_length)
    other = save_model(DenseClassifier(wider), tmp_path / "wider")
    (saved / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="has shape .*48.*the config implies .*32"):
        load_model(saved)


def test_weights_of_another_depth(saved, tiny_spec, tmp_path):
    deeper = ModelSpec(dataclasses.replace(tiny_spec.encoder, num_hidden_layers=3), tiny_spec.labels, tiny_spec.max_length)
    other = save_model(DenseClassifier(deeper), tmp_path / "deeper")
    (saved / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="does not match a 'dense' model .*unexpected \\['encoder.blocks.2"):
        load_model(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights(saved, damage):
    path = saved / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not safetensors" * 8, "empty": b""}[damage])
    with pytest.raises(ValueError, match="model.safetensors cannot be read .*the checkpoint is corrupt"):
        load_model(saved)


def test_missing_weights_file(saved):
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match="model.safetensors not found; the checkpoint is incomplete"):
        load_model(saved)


def test_missing_tensor(saved):
    state = load_file(str(saved / WEIGHTS_FILE))
    del state["classifier.weight"]
    save_file(state, str(saved / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="missing \\['classifier.weight'\\]"):
        load_model(saved)


def test_read_config_returns_the_saved_metadata(saved):
    cfg = read_config(saved)
    assert cfg["spec"]["labels"] == ["neg", "pos"] and cfg["knob"] is None


# --- Hugging Face checkpoint directories (the base model of `finetune`) ---------------------------


def tiny_hf_checkpoint(directory: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(directory)
    return directory


def test_resolve_model_path_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in model \\(minilm-l6, vit-tiny\\) nor an existing directory"):
        hf.resolve_model_path(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass the checkpoint directory"):
        hf.resolve_model_path(tmp_path / "file.txt")
    with pytest.raises(ValueError, match="has no config.json"):
        hf.resolve_model_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither model.safetensors nor pytorch_model.bin"):
        hf.resolve_model_path(tmp_path)


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2}))
    save_file({"dummy": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    assert hf.resolve_model_path(tmp_path) == tmp_path  # the layout is fine; the architecture is not
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        hf.load_encoder(tmp_path)


def test_unreadable_hf_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    save_file({"dummy": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="cannot read the config of checkpoint"):
        hf.load_encoder(tmp_path)


def test_hf_checkpoint_loads_and_corrupt_weights_fail(tmp_path):
    d = tiny_hf_checkpoint(tmp_path / "bert")
    enc, path = hf.load_encoder(d)
    assert path == d and enc.cfg == EncoderConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32,
                                                   max_position_embeddings=32)
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="cannot load the weights of checkpoint"):
        hf.load_encoder(d)


def test_builtin_model_resolves():
    path = hf.resolve_model_path("minilm-l6")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
