"""What every adaptive model is: a classifier with a typed output, a cost per sample and a knob.

`AdaptiveClassifier` is the base of the dense model and of every method's model. A method
subclasses it and declares its `Config` dataclass (a `MethodConfig`); its entry in the catalogue
(`adaptinf.registry.METHODS`) makes it subject to the contract tests.

The knob is an argument of the forward pass (`model(ids, mask, knob=0.9)`); `model.knob` is only the
operating point a saved model is served at, used when the call gives none (`AT_DEFAULT`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adaptinf.backbone import EncoderConfig, Layout, attention_bias, token_layout

from adaptinf.data import eval_batches

if TYPE_CHECKING:
    from adaptinf.data import Encoded


class _AtDefault:
    def __repr__(self) -> str:
        return "AT_DEFAULT"


AT_DEFAULT: Any = _AtDefault()  # forward's `knob` when not given: the model's operating point (`model.knob`)


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
        if not 2 <= self.max_length <= self.encoder.max_positions:
            raise ValueError(
                f"ModelSpec.max_length must be in [2, {self.encoder.max_positions}] "
                f"(the positions the backbone has), got {self.max_length}"
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


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_SCALAR_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def check_field_types(obj) -> None:
    """ValueError naming the field and the type it expects, for every field whose annotation is a plain
    scalar (`int`, `float`, `bool`, `str`, optionally `| None`) and whose value is of another type
    (e.g. `--set beta=abc`). Other annotations (tuples, ...) are left to the class's own checks."""
    for f in dataclasses.fields(obj):
        kinds = [k.strip() for k in str(f.type).split("|")]
        optional = "None" in kinds
        kinds = [k for k in kinds if k != "None"]
        if len(kinds) != 1 or kinds[0] not in _SCALARS:
            continue
        v = getattr(obj, f.name)
        if v is None and optional:
            continue
        ok = isinstance(v, _SCALARS[kinds[0]]) and (kinds[0] == "bool" or not isinstance(v, bool))
        if not ok:
            want = _SCALAR_WORDS[kinds[0]] + (" or null" if optional else "")
            raise ValueError(f"{type(obj).__name__}.{f.name} expects {want}, got {v!r}")


def option(default: Any, help: str) -> Any:
    """A config field documented where it is declared (`dataclasses.field` with metadata["help"])."""
    return field(default=default, metadata={"help": help})


@dataclass
class MethodConfig:
    """Base of every method's config: a validated, JSON-serialisable dataclass."""

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix. Subclasses extend this."""

    def __post_init__(self) -> None:
        try:
            self.validate()  # the class's own messages first (they name the allowed range)
        except TypeError:  # a value of the wrong type reached a comparison, e.g. --set beta=abc
            check_field_types(self)
            raise
        check_field_types(self)

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

    def __init__(self, spec: ModelSpec, config: MethodConfig | None = None):
        super().__init__()
        config = self.Config() if config is None else config  # the method's defaults
        if not isinstance(config, self.Config):
            raise ValueError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.spec = spec
        self.config = config
        self.knob: float | None = None
        self.tokenizer = None  # attached by adaptinf.load / the CLI
        self.packed = True  # padding-free execution at inference (`token_mask`); a runtime choice, not saved

    def token_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | Layout:
        """What the blocks take as their mask: in eval mode with `packed` a `Layout` (computation on
        real tokens only, outputs equal), else the additive bias [b, 1, 1, s] (training: unchanged)."""
        if self.packed and not self.training:
            return token_layout(attention_mask, dtype)
        return attention_bias(attention_mask, dtype)

    def set_packed(self, packed: bool) -> AdaptiveClassifier:
        """Padding-free (True, the default) or padded (False) execution at inference; returns self."""
        for m in self.modules():  # sub-models too (Multi-Model's cascade)
            if isinstance(m, AdaptiveClassifier):
                m.packed = bool(packed)
        return self

    # --- to implement -------------------------------------------------------------------------
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
        knob: float | None = AT_DEFAULT,
    ) -> ClassifierOutput:
        """`knob`: the inference-time knob for this call (None: full budget / the method's own
        decision); not given, the model's operating point `self.knob`. Resolve it with `run_knob`."""
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

    def check_knob(self, value: float | None) -> float | None:
        """Validate a knob value (ValueError naming the rule) and return it normalised. Subclasses extend this."""
        if self.knob_name is None and value is not None:
            raise ValueError(f"method {self.method!r} has no inference-time knob; got {value!r}")
        return value

    def run_knob(self, knob: float | None) -> float | None:
        """The knob a forward pass runs at: `knob` checked, or the operating point when AT_DEFAULT."""
        return self.knob if knob is AT_DEFAULT else self.check_knob(knob)

    def set_knob(self, value: float | None) -> None:
        """Set the operating point: the knob a saved model is served at when a call gives none."""
        self.knob = self.check_knob(value)

    # --- training -------------------------------------------------------------------------------
    def loss(self, out: ClassifierOutput, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Task loss (+ the method's auxiliary loss). `reduction='sum'` is used by distributed training."""
        loss = F.cross_entropy(out.logits, labels, reduction=reduction)
        if out.aux_loss is not None:
            loss = loss + (out.aux_loss * labels.shape[0] if reduction == "sum" else out.aux_loss)
        return loss

    def selection_score(self, val: Encoded, batch_size: int = 64) -> float:
        """Model selection on validation (higher is better): the epoch `finetune` keeps as best.
        Default: accuracy of `logits` at full budget (knob None). Methods with several predictions per
        sample override it."""
        return accuracy(self, val, batch_size, self.spec.encoder.pad_token_id, knob=None)[0]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

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
    def predict(self, inputs: list, batch_size: int = 32, progress: bool = False) -> list:
        """Label, confidence, GFLOPs and per-sample compute (exit layer, width, learners, ...) for
        each text (a vision model: each image path, or a uint8 image batch), at the model's current
        knob; see `adaptinf.predict.predict_texts` / `predict_images`."""
        from adaptinf.predict import is_vision, predict_images, predict_texts

        if is_vision(self):
            return predict_images(self, inputs, batch_size=batch_size, progress=progress)
        return predict_texts(self, inputs, batch_size=batch_size, progress=progress)


@torch.inference_mode()
def accuracy(model: AdaptiveClassifier, enc: Encoded, batch_size: int = 64, pad_id: int = 0,
             knob: float | None = AT_DEFAULT) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the model on an encoded split, at `knob` (default: the
    model's operating point). Eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    try:
        for b in eval_batches(enc, batch_size, pad_id):
            out = model(b.input_ids, b.attention_mask, knob=knob)
            correct += int((out.logits.argmax(-1) == b.labels).sum())
            loss += float(F.cross_entropy(out.logits, b.labels, reduction="sum"))
            n += len(b.labels)
    finally:
        model.train(was_training)
    return correct / n, loss / n
