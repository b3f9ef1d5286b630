"""The dense baseline: the whole encoder, pooler and a linear classifier, for every sample."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adaptinf import flops
from adaptinf.backbone import Encoder, attention_bias
from adaptinf.model import AdaptiveClassifier, ClassifierOutput, MethodConfig, ModelSpec
from adaptinf.registry import register


@dataclass
class DenseConfig(MethodConfig):
    classifier_dropout: float = 0.1

    def validate(self) -> None:
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(f"DenseConfig.classifier_dropout must be in [0, 1), got {self.classifier_dropout}")


@register
class DenseClassifier(AdaptiveClassifier):
    """BERT-style sequence classifier: encoder -> pooler -> dropout -> Linear."""

    method = "dense"
    Config = DenseConfig
    description = "the fine-tuned dense model every method is measured against"

    def __init__(self, spec: ModelSpec, config: DenseConfig | None = None):
        super().__init__(spec, config or DenseConfig())
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

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> ClassifierOutput:
        h = self.encoder.embed(input_ids, token_type_ids)  # [b, s, d]
        h = self.encoder.run_blocks(h, attention_bias(attention_mask, h.dtype))
        logits = self.classifier(self.dropout(self.encoder.pool(h)))  # [b, C]
        cost = flops.dense_model(flops.lengths_of(attention_mask), self.spec.encoder, self.spec.num_labels)
        return ClassifierOutput(logits=logits, flops=cost.to(torch.float64))
