"""The dense baseline: the whole encoder, its pooling and a linear classifier, for every sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adaptinf import flops
from adaptinf.hf import BERT_FIELDS, hf_weight_names, weight_names
from adaptinf.backbone import Encoder
from adaptinf.model import AT_DEFAULT, AdaptiveClassifier, ClassifierOutput, MethodConfig, ModelSpec


@dataclass
class DenseConfig(MethodConfig):
    classifier_dropout: float = 0.1

    def validate(self) -> None:
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"DenseConfig.classifier_dropout must be in [0, 1), got {self.classifier_dropout}")


class DenseClassifier(AdaptiveClassifier):
    """Sequence classifier: encoder -> `Encoder.pool` -> dropout -> Linear. Pooling as the encoder's
    family does: BERT's tanh pooler on the CLS row; a ViT's final LayerNorm on it (and no pooler)."""

    method = "dense"
    Config = DenseConfig
    description = "the fine-tuned dense model every method is measured against"

    def __init__(self, spec: ModelSpec, config: DenseConfig | None = None):
        super().__init__(spec, config)
        self.encoder = Encoder(spec.encoder)
        self.dropout = nn.Dropout(self.config.classifier_dropout)
        self.classifier = nn.Linear(spec.encoder.hidden_size, spec.num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @classmethod
    def from_dense(cls, dense: AdaptiveClassifier, config: DenseConfig) -> DenseClassifier:
        if not isinstance(dense, DenseClassifier):
            raise ValueError(f"conversion needs a dense model, got method {dense.method!r}")
        model = cls(dense.spec, config)
        model.load_state_dict(dense.state_dict())
        return model

    def forward(self, input_ids, attention_mask, token_type_ids=None, knob=AT_DEFAULT) -> ClassifierOutput:
        self.run_knob(knob)  # dense has no knob: anything but None is refused
        h = self.encoder.embed(input_ids, token_type_ids)  # [b, s, d]
        h = self.encoder.run_blocks(h, self.token_mask(attention_mask, h.dtype))  # padding-free at inference
        logits = self.classifier(self.dropout(self.encoder.pool(h)))  # [b, C]
        cost = flops.dense_model(flops.lengths_of(attention_mask), self.spec.encoder, self.spec.num_labels)
        return ClassifierOutput(logits=logits, flops=cost.to(torch.float64))

    @torch.no_grad()
    def to_hf(self):
        """This model as a `transformers.BertForSequenceClassification` (SDPA attention), logits equal;
        a ViT as a `ViTForImageClassification` (`_to_hf_vit`).

        The inverse of `adaptinf.hf.copy_weights_from_hf`: the fused q/k/v projection is split back
        into query/key/value, and the pooler and classifier are copied as they are. The result is in
        eval mode on this model's device and dtype; `adaptinf bench --compare-hf` times it against ours.
        """
        from transformers import BertConfig, BertForSequenceClassification

        cfg = self.spec.encoder
        if cfg.is_vision:
            return self._to_hf_vit()
        hf_config = BertConfig(**{f: getattr(cfg, f) for f in BERT_FIELDS}, hidden_act="gelu",
                               classifier_dropout=self.config.classifier_dropout, num_labels=self.spec.num_labels,
                               attn_implementation="sdpa")
        enc = self.encoder
        sd = {f"bert.{key}": tensor for tensor, key in hf_weight_names(enc)}
        sd.update({
            "bert.pooler.dense.weight": enc.pooler.dense.weight,
            "bert.pooler.dense.bias": enc.pooler.dense.bias,
            "classifier.weight": self.classifier.weight,
            "classifier.bias": self.classifier.bias,
        })
        ref = self.classifier.weight
        hf_model = BertForSequenceClassification(hf_config).to(device=ref.device, dtype=ref.dtype)
        hf_model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
        return hf_model.eval()


    def _to_hf_vit(self):
        """A ViT as `transformers.ViTForImageClassification` (SDPA attention), logits equal: the
        inverse of `adaptinf.hf.load_encoder`'s copy (the patch Linear back to a Conv2d, the CLS token
        and position table to their [1, ...] shapes). It takes `pixel_values` (bytes / 255, then
        normalised per channel: what our `PatchEmbeddings` does inside); `adaptinf.bench.hf_case`
        turns our uint8 patch rows into them. A ViT with a pooler has no such head (it refuses)."""
        from transformers import ViTConfig, ViTForImageClassification

        cfg = self.spec.encoder
        if cfg.pooler:
            raise ValueError("a ViT with a pooler has no transformers ViTForImageClassification equivalent "
                             "(it classifies the final LayerNorm's CLS row)")
        if cfg.hidden_act != "gelu":
            raise ValueError(f"ViTForImageClassification export needs hidden_act 'gelu', got {cfg.hidden_act!r}")
        hf_config = ViTConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                              num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                              hidden_act="gelu", hidden_dropout_prob=cfg.hidden_dropout_prob,
                              attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
                              layer_norm_eps=cfg.layer_norm_eps, image_size=cfg.image_size, patch_size=cfg.patch_size,
                              num_channels=cfg.num_channels, qkv_bias=True, num_labels=self.spec.num_labels,
                              attn_implementation="sdpa")
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        shapes = {"embeddings.patch_embeddings.projection.weight": (d, c, p, p), "embeddings.cls_token": (1, 1, d),
                  "embeddings.position_embeddings": (1, -1, d)}
        sd = {f"vit.{key}": t.reshape(shapes[key]) if key in shapes else t
              for t, key in weight_names(self.encoder, "vit")}
        sd.update({"classifier.weight": self.classifier.weight, "classifier.bias": self.classifier.bias})
        ref = self.classifier.weight
        hf_model = ViTForImageClassification(hf_config).to(device=ref.device, dtype=ref.dtype)
        hf_model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
        hf_model.image_mean, hf_model.image_std = cfg.image_mean, cfg.image_std  # for `bench.hf_case`'s pixel_values
        return hf_model.eval()


def to_hf_sequence_classifier(dense: AdaptiveClassifier):
    """`dense.to_hf()`, refusing a model that is not dense (adaptive methods have no transformers equivalent)."""
    if not isinstance(dense, DenseClassifier):
        raise ValueError(
            f"to_hf_sequence_classifier needs a dense model (DenseClassifier), got {type(dense).__name__}; "
            "adaptive methods have no transformers equivalent"
        )
    return dense.to_hf()
