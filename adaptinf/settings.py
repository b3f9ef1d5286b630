"""Plain settings dataclasses shared by the commands, presets and recipes (a leaf: no torch).

`TrainConfig` is how a model is trained, `TaskSettings` which task it is trained on; the defaults
written here are the only copy (the CLI flags and the presets read them from these classes).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field, fields

DEFAULT_MODEL = "minilm-l6"
DEFAULT_DATA = "rotten-tomatoes"


@dataclass
class TaskSettings:
    """Which task a model is trained and evaluated on; recorded in every saved model as extra.task."""

    data: str = DEFAULT_DATA
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("data", "text_column", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"TaskSettings.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.group_column is not None and not isinstance(self.group_column, str):
            raise ValueError(f"TaskSettings.group_column must be a string or None, got {self.group_column!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TaskSettings.seed must be an integer, got {self.seed!r}")
        if self.data != DEFAULT_DATA and os.path.exists(self.data):
            # a file is recorded by its absolute path, so a model evaluated from another folder reads
            # the same file, not one of the same name there
            self.data = os.path.abspath(self.data)

    def data_digest(self) -> str:
        """What the data is, by content: the sha256 of the data file (a file edited in place under the
        same name gets another digest), or the built-in task's name."""
        if not os.path.isfile(self.data):
            return self.data
        h = hashlib.sha256()
        with open(self.data, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskSettings:
        known = {k: d[k] for k in ("data", "text_column", "label_column", "group_column", "seed") if d.get(k) is not None}
        return cls(**known)


def _flag(default, help: str):
    """A field that is also a command-line training flag (`adaptinf finetune/convert --NAME`); its help
    text lives here, beside its default."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """How a model is trained: AdamW with linear warm-up and decay (`adaptinf.recipes.finetune`)."""

    epochs: int = _flag(2, "passes over the training split")
    batch_size: int = _flag(32, "global batch size (split across processes under torchrun)")
    lr: float = _flag(5e-5, "peak AdamW learning rate")
    weight_decay: float = _flag(0.01, "AdamW weight decay (not on biases and LayerNorms)")
    warmup_ratio: float = _flag(0.1, "fraction of steps of linear warm-up")
    max_grad_norm: float = _flag(1.0, "gradient clipping norm (over all parameters)")
    seed: int = 0  # the task's seed (`--seed` is a data flag)
    eval_batch_size: int = 64
    save_every: int = _flag(50, "steps between resume checkpoints")
    log_every: int = 10
    min_steps: int = _flag(0, "at least this many optimizer steps: a small data set gets more epochs (0: epochs alone)")
    max_steps: int = _flag(0, "at most this many optimizer steps: a large data set gets fewer epochs (0: no cap)")
    eval_every: int = _flag(0, "steps between validations, the best kept (0: at the end of every epoch)")
    patience: int = _flag(0, "stop after this many validations without a better score (0: never stop early)")

    def total_steps(self, n_train: int) -> int:
        """The step budget on `n_train` samples: `epochs` passes, raised to `min_steps`, capped at `max_steps`."""
        steps = max(self.min_steps, self.epochs * math.ceil(n_train / self.batch_size))
        return min(steps, self.max_steps) if self.max_steps else steps

    @classmethod
    def flags(cls) -> dict[str, str]:
        """Field name -> help text of the fields that are command-line flags, in field order."""
        return {f.name: f.metadata["help"] for f in fields(cls) if "help" in f.metadata}

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "max_grad_norm": self.max_grad_norm > 0,
            "eval_batch_size": self.eval_batch_size >= 1,
            "save_every": self.save_every >= 1,
            "log_every": self.log_every >= 1,
            "min_steps": self.min_steps >= 0,
            "max_steps": self.max_steps >= 0 and (not self.max_steps or self.max_steps >= self.min_steps),
            "eval_every": self.eval_every >= 0,
            "patience": self.patience >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name} has an invalid value {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


