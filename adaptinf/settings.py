"""Plain settings dataclasses shared by the commands, presets and recipes (a leaf: no torch).

`TrainConfig` is how a model is trained, `TaskSettings` which task it is trained on; the defaults
written here are the only copy (the CLI flags and the presets read them from these classes).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

DEFAULT_MODEL = "minilm-l6"
DEFAULT_DATA = "rotten-tomatoes"
DEFAULT_VISION_MODEL = "vit-tiny"  # the default model of an image task
IMAGE_TASKS = ("fashion-mnist",)  # built-in image tasks (adaptinf.data.BUILTIN_TASKS has every built-in task)
LM_TASKS = ("austen",)  # built-in language-modelling corpora (`adaptinf train-lm`; adaptinf.corpus.lm_corpus)
BUILTIN_TASK_NAMES = (DEFAULT_DATA, *IMAGE_TASKS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)  # train / validation / test


def from_known_fields(cls, d: dict):
    """`cls(**d)` for a dataclass `cls`, refusing keys that are not its fields (one ValueError naming
    them and the known ones): the `from_dict` of every saved config. A non-object is a TypeError
    (as `cls(**d)` gives), which the loaders report as a malformed config."""
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__}.from_dict takes a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown} (known: {', '.join(sorted(known))})")
    return cls(**d)


def check_fractions(fractions) -> None:
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be three positive numbers summing to 1, got {list(fractions)}")


def find_asset_dir(env: str, names, candidates, how_to_get: str) -> Path:
    """The folder holding every file in `names` for an offline data package: `$env` when set (a
    ValueError when it lacks one), else the first of `candidates` that has them all; else a
    ValueError of `how_to_get` and the folders looked in."""
    given = os.environ.get(env)
    if given:
        missing = [n for n in names if not (Path(given) / n).is_file()]
        if missing:
            raise ValueError(f"{env}={given} lacks {missing}; {how_to_get}, or unset {env}")
        return Path(given)
    candidates = list(candidates)
    for d in candidates:
        if all((Path(d) / n).is_file() for n in names):
            return Path(d)
    raise ValueError(f"{how_to_get}, or set {env} to a folder holding {list(names)}; looked in "
                     + ", ".join(map(str, candidates)))


def is_image_data(data: str) -> bool:
    """Whether a task (its --data) is made of images: a built-in image task or a folder."""
    return data in IMAGE_TASKS or (data not in BUILTIN_TASK_NAMES and os.path.isdir(data))


def default_model(data: str) -> str:
    """The model a task is fine-tuned from when none is given: vit-tiny for images, else MiniLM-L6."""
    return DEFAULT_VISION_MODEL if is_image_data(data) else DEFAULT_MODEL


def image_folder_files(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """(class name, file) of every image of a folder `DIR/<class name>/*.png|jpg|...`, classes sorted
    by name and files by name within each; hidden entries are skipped. ValueError for a folder that
    is not one, has no class sub-folders or only one, or a class folder without images."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = any(f.suffix.lower() in IMAGE_SUFFIXES for f in root.iterdir())
        raise ValueError(f"{root} has no class sub-folders" + (" (its images lie at the top)" if loose else "")
                         + f"; an image task is a folder with one sub-folder of images per class: {root}/<class>/*.png")
    if len(classes) < 2:
        raise ValueError(f"{root} has one class sub-folder ({classes[0].name!r}); classification needs at least two")
    out = []
    for d in classes:
        files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")
                       and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {d} has no images ({', '.join(IMAGE_SUFFIXES)})")
        out += [(d.name, f) for f in files]
    return out


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
        if self.data not in BUILTIN_TASK_NAMES and os.path.exists(self.data):
            # a file (or image folder) is recorded by its absolute path, so a model evaluated from
            # another folder reads the same data, not one of the same name there
            self.data = os.path.abspath(self.data)

    def data_digest(self) -> str:
        """What the data is, by content: the sha256 of the data file (a file edited in place under the
        same name gets another digest); of an image folder, the sha256 over its images' relative paths
        and contents, in the loader's order (a renamed, added, removed or edited image changes it; a
        copy or a touched file does not); else the built-in task's name."""
        if self.data in BUILTIN_TASK_NAMES:
            return self.data
        if os.path.isdir(self.data):
            h = hashlib.sha256()
            for _, f in image_folder_files(self.data):
                h.update(f"{f.relative_to(self.data).as_posix()}\0{f.stat().st_size}\0".encode())
                _hash_file(h, f)
            return "sha256:" + h.hexdigest()
        if not os.path.isfile(self.data):
            return self.data
        h = hashlib.sha256()
        _hash_file(h, self.data)
        return "sha256:" + h.hexdigest()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskSettings:
        known = {k: d[k] for k in ("data", "text_column", "label_column", "group_column", "seed") if d.get(k) is not None}
        return cls(**known)


def _hash_file(h, path) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


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


