"""Saved models: a directory with `config.json` (versioned), `model.safetensors` and the tokenizer
(a text model: Hugging Face's tokenizer files) or the image processor (a vision model:
`preprocessor_config.json`, `adaptinf.images.ImageProcessor`).

Never pickle. This module is the on-disk format only (it knows no method): `save_model`,
`read_config` and `load_weights` validate the format, version and every tensor's shape, and fail with
a message that says what is wrong and what to do. Loading a model by its method name is
`adaptinf.registry.load_model` (`adaptinf.load`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adaptinf.images import PROCESSOR_FILE, ImageProcessor
from adaptinf.model import AdaptiveClassifier
from adaptinf.version import __version__

FORMAT = "adaptinf"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} not found: not an adaptinf model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_model(model: AdaptiveClassifier, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `model` (and its tokenizer or image processor, if attached) to `directory`; returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    # Tied or shared tensors are stored once per name; safetensors refuses aliasing, so clone.
    save_tensors_atomic({k: v.clone() for k, v in state.items()}, out / WEIGHTS_FILE, metadata={"format": FORMAT})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out)
    # a tokenizer or processor left from an earlier save would be attached to this model on load
    vision = isinstance(model.tokenizer, ImageProcessor)
    stale = (TOKENIZER_FILES if model.tokenizer is None or vision else ()) + (() if vision else (PROCESSOR_FILE,))
    for name in stale:
        (out / name).unlink(missing_ok=True)
    write_json_atomic(
        out / CONFIG_FILE,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "adaptinf_version": __version__,
            "method": model.method,
            "method_config": model.config.to_dict(),
            "spec": model.spec.to_dict(),
            "knob": model.knob,
            **({"extra": extra} if extra else {}),
        },
    )
    return out


def read_config(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    if not d.exists():
        raise ValueError(f"model directory {d} does not exist")
    if not d.is_dir():
        raise ValueError(f"{d} is a file; pass the model directory (holding {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = _read_json(d / CONFIG_FILE)
    if not isinstance(cfg, dict):
        raise ValueError(f"{d / CONFIG_FILE} holds a JSON {type(cfg).__name__}, not an object; the checkpoint is corrupt")
    if cfg.get("format") != FORMAT:
        hint = " (it looks like a Hugging Face checkpoint: use it as --model for `adaptinf finetune`)" if "model_type" in cfg else ""
        raise ValueError(f"{d} is not an adaptinf model directory{hint}")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{d} has checkpoint format version {version!r}; this adaptinf reads version {FORMAT_VERSION}. "
            "Re-create it with this version of adaptinf."
        )
    if cfg.get("kind", "classifier") != "classifier":  # e.g. "causal-lm": adaptinf.lm reads those
        raise ValueError(f"{d} holds a language model ({cfg['kind']}), not a classifier; use `adaptinf generate` "
                         "or adaptinf.lm.load_lm")
    for key, kind in (("method", str), ("method_config", dict), ("spec", dict)):
        if key not in cfg:
            raise ValueError(f"{d / CONFIG_FILE} is missing {key!r}; the checkpoint is corrupt")
        if not isinstance(cfg[key], kind):
            raise ValueError(f"{d / CONFIG_FILE}: {key!r} should be a JSON {'string' if kind is str else 'object'}; the checkpoint is corrupt")
    return cfg


def load_weights(model: AdaptiveClassifier, directory: str | os.PathLike, method: str) -> None:
    """Load `directory`'s weights into `model` (built from its config), checking every name and shape."""
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{weights} not found; the checkpoint is incomplete")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} cannot be read ({e}); the checkpoint is corrupt") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match a {method!r} model with this config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{weights}: tensor {k!r} has shape {tuple(v.shape)}, the config implies {tuple(expected[k].shape)}")
    model.load_state_dict(state)
