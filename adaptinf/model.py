"""What every adaptive model is: a classifier with a typed output, a cost per sample and a knob.

`AdaptiveClassifier` is the base of the dense model and of every method's model. A method
subclasses it, declares its `Config` dataclass (a `MethodConfig`), registers itself
(`adaptinf.registry.register`) and so becomes subject to the contract tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adaptinf.backbone import EncoderConfig

if TYPE_CHECKING:
    from adaptinf.data import Encoded
    from adaptinf.train import TrainConfig


@dataclass(frozen=True)
class ModelSpec:
    """What a classifier is for: its backbone shape, its label set and its input length."""

    encoder: EncoderConfig
    labels: tuple[str, ...]
    max_length: int = 128
    base_model: str = ""

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ValueError(f"ModelSpec.labels needs at least 2 labels, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"ModelSpec.labels has duplicates: {list(self.labels)}")
        if not 2 <= self.max_length <= self.encoder.max_position_embeddings:
            raise ValueError(
                f"ModelSpec.max_length must be in [2, {self.encoder.max_position_embeddings}] "
                f"(the backbone's max_position_embeddings), got {self.max_length}"
            )

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        return {
            "encoder": self.encoder.to_dict(),
            "labels": list(self.labels),
            "max_length": self.max_length,
            "base_model": self.base_model,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        try:
            return cls(
                encoder=EncoderConfig.from_dict(d["encoder"]),
                labels=tuple(str(x) for x in d["labels"]),
                max_length=int(d["max_length"]),
                base_model=str(d.get("base_model", "")),
            )
        except KeyError as e:
            raise ValueError(f"model spec is missing field {e}") from e
        except TypeError as e:  # a field of the wrong JSON type, e.g. "encoder": 3
            raise ValueError(f"model spec is malformed: {e}") from e


@dataclass
class MethodConfig:
    """Base of every method's config: a validated, JSON-serialisable dataclass."""

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix. Subclasses extend this."""

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        """JSON-native: tuples become lists, so the dict equals itself read back from JSON (a resumed
        training run compares its saved settings with the current ones)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> MethodConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)} (known: {sorted(known)})")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)


@dataclass
class ClassifierOutput:
    """What a forward pass returns.

    logits: [b, num_labels] final prediction logits.
    flops: [b] FLOPs each sample actually spent (see adaptinf.flops for the convention).
    aux_loss: method-specific training loss term to add to the task loss (or None).
    extras: method-specific tensors (exit logits, router probabilities, chosen widths, ...).
    """

    logits: torch.Tensor
    flops: torch.Tensor
    aux_loss: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class SweepPoint(NamedTuple):
    """One knob value's result over a whole split, from `AdaptiveClassifier.sweep_offline`.

    predictions: [n] predicted label ids, in the order of the split.
    flops: [n] FLOPs each sample would spend at this knob (float64), exactly as `forward` reports.
    extras: per-sample integer tensors [n] (summarised by `evaluate` as shares per value, like the
        integer extras of a forward pass) and JSON-ready values (copied onto the operating point).
    """

    knob: float | None
    predictions: torch.Tensor
    flops: torch.Tensor
    extras: dict[str, Any]


class AdaptiveClassifier(nn.Module):
    """Base class: subclasses set `method`, `Config`, and implement `forward` and `from_dense`."""

    method: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    knob_name: ClassVar[str | None] = None  # e.g. "threshold"; None when the method has no knob
    description: ClassVar[str] = ""
    needs_training: ClassVar[bool] = False  # True: `adaptinf convert` calls `fit` after `from_dense`

    def __init__(self, spec: ModelSpec, config: MethodConfig):
        super().__init__()
        if not isinstance(config, self.Config):
            raise ValueError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.spec = spec
        self.config = config
        self.knob: float | None = None
        self.tokenizer = None  # attached by adaptinf.load / the CLI

    # --- to implement -------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> ClassifierOutput:
        raise NotImplementedError

    @classmethod
    def from_dense(cls, dense: AdaptiveClassifier, config: MethodConfig) -> AdaptiveClassifier:
        """Build this method's model from a (fine-tuned) dense classifier, before any method training."""
        raise NotImplementedError

    # --- knob -----------------------------------------------------------------------------------
    def knob_values(self) -> list[float | None]:
        """The knob values `evaluate` sweeps to trace the accuracy/cost curve."""
        return [None]

    def knob_between(self, a: float, b: float) -> float | None:
        """A knob value between two of `knob_values()` (to trace a jump in the curve), or None when
        there is none (an integer knob with nothing between)."""
        return (a + b) / 2

    def set_knob(self, value: float | None) -> None:
        if self.knob_name is None and value is not None:
            raise ValueError(f"method {self.method!r} has no inference-time knob; got {value!r}")
        self.knob = value

    # --- training -------------------------------------------------------------------------------
    def loss(self, out: ClassifierOutput, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Task loss (+ the method's auxiliary loss). `reduction='sum'` is used by distributed training."""
        loss = F.cross_entropy(out.logits, labels, reduction=reduction)
        if out.aux_loss is not None:
            loss = loss + (out.aux_loss * labels.shape[0] if reduction == "sum" else out.aux_loss)
        return loss

    def selection_score(self, val: Encoded, batch_size: int = 64) -> float:
        """Model selection on validation (higher is better): the epoch `finetune` keeps as best.
        Default: accuracy of `logits`. Methods with several predictions per sample override it."""
        from adaptinf.train import accuracy

        return accuracy(self, val, batch_size, self.spec.encoder.pad_token_id)[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def fit(
        self,
        train: Encoded,
        val: Encoded,
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        progress: bool = True,
        restart: bool = False,
    ) -> dict | None:
        """Train what the method needs after `from_dense` (called by `adaptinf convert` when
        `needs_training` is set), leaving the model ready to save.

        `val` is the validation split (model selection, calibration, thresholds; never the test
        split). `out_dir` holds the resumable training state: rerunning with the same arguments
        continues an interrupted run. Returns a JSON-ready summary (recorded in the saved model's
        config), or None when there is nothing to train (the default).
        """
        return None

    # --- evaluation -----------------------------------------------------------------------------
    def sweep_offline(
        self, enc: Encoded, knobs: list[float | None], batch_size: int = 64, progress: bool = False
    ) -> list[SweepPoint] | None:
        """Results at every knob value from fewer passes than one forward per knob, or None.

        `adaptinf.evaluate.evaluate_model` uses this when it returns a list (one `SweepPoint` per
        knob, in order); a method that implements it must give exactly the predictions and FLOPs
        its `forward` gives at each knob. The default (None) makes evaluate run `forward` per knob.
        """
        return None

    # --- prediction -----------------------------------------------------------------------------
    def predict(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> list:
        """Label, confidence, GFLOPs and per-sample compute (exit layer, width, learners, ...) for
        each text, at the model's current knob; see `adaptinf.predict.predict_texts`."""
        from adaptinf.predict import predict_texts

        return predict_texts(self, texts, batch_size=batch_size, progress=progress)
