"""Run presets: typed settings of `adaptinf run`, read from YAML (adaptinf/presets/*.yaml) and validated.

A preset names the model, the task, the dense baseline's training, and per method: where it starts
from (the fine-tuned dense model or the pretrained one), its config fields (`set`, what
`adaptinf convert --set` takes), its training overrides and, optionally, the knob values to evaluate.
Flags of `adaptinf run` override some fields; the resolved settings are saved beside the results.

Every unknown key is an error naming where it is and what is allowed. A method the preset lists that
is not registered is allowed only if it is known to be on its way (`PENDING_METHODS`); the run then
skips it with a warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from adaptinf.settings import DEFAULT_MODEL, TaskSettings, default_model, is_image_data
from adaptinf.settings import TrainConfig

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "quick"  # `adaptinf run` without --preset on a text task
DEFAULT_VISION_PRESET = "vision-quick"  # ... and on an image task (fashion-mnist, a folder of images)
# per modality: the quick and the full preset, named in the error of a preset run on the other modality
PRESETS_FOR = {"text": ("quick", "full"), "image": ("vision-quick", "vision-full")}
PENDING_METHODS: tuple[str, ...] = ()  # may appear in a preset before they are registered; the run skips them
SOURCES = ("dense", "pretrained")


def builtin_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def default_preset(data: str | None) -> str:
    """The preset `adaptinf run` uses without --preset: vision-quick for an image task (a built-in
    one or a folder of images), else quick (also when no task is given: the preset's own)."""
    return DEFAULT_VISION_PRESET if data is not None and is_image_data(data) else DEFAULT_PRESET


def model_modality(name: str) -> str | None:
    """What a model takes, "image" or "text", for a name as `adaptinf run --model` takes it (a built-in
    name, or a Hugging Face checkpoint directory, by its config.json's model_type); None when it cannot
    be told without loading it (an unknown name or an unreadable directory: the loader's error says why)."""
    from adaptinf.hf import BUILTIN_CONFIGS, BUILTIN_MODELS, SUPPORTED_MODEL_TYPES

    if name in BUILTIN_CONFIGS:
        return "image" if BUILTIN_CONFIGS[name].get("image_size") else "text"
    if name in BUILTIN_MODELS:
        return "text"
    try:
        model_type = json.loads((Path(name) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if model_type == "vit":
        return "image"
    return "text" if model_type in SUPPORTED_MODEL_TYPES else None


def check_modality(cfg: RunConfig, preset_model: str | None, model_given: bool) -> str | None:
    """Refuse a run whose model and task do not go together: ValueError naming the preset to use.

    `preset_model` is the model the preset itself names (None: it names none, so it fits either
    modality), `model_given` whether --model replaced it.
    A text preset's recipe (a short fine-tuning of pretrained weights, early exits from the pretrained
    model) cannot train a from-scratch ViT, and a vision preset's a text model: a preset run on the
    other modality's task is an error naming the presets of that modality (or leaving --preset out).
    With an explicit --model of the task's modality that has pretrained weights (a ViT checkpoint
    with a text preset), the preset's recipe is used as asked: the returned note says so (None: no
    note)."""
    from adaptinf.hf import BUILTIN_CONFIGS

    data_kind = "image" if is_image_data(cfg.task.data) else "text"
    model_kind = model_modality(cfg.model)
    preset_kind = model_modality(preset_model) if preset_model else None
    quick, full = PRESETS_FOR[data_kind]
    use = f"use --preset {quick} (or {full}), or leave --preset out to get {quick} for this task"
    what = "images" if data_kind == "image" else "text"
    if model_kind is not None and model_kind != data_kind:
        if model_given:
            raise ValueError(f"--model {cfg.model} is {'a vision' if model_kind == 'image' else 'a text'} model but "
                             f"task {cfg.task.data} is {what}; pass a {'vision' if data_kind == 'image' else 'text'} "
                             f"model (e.g. {default_model(cfg.task.data)}) or leave --model out")
        raise ValueError(f"preset {cfg.preset!r} is a {'vision' if model_kind == 'image' else 'text'} preset "
                         f"(model {cfg.model}) but task {cfg.task.data} is {what}; {use}")
    if preset_kind is not None and preset_kind != data_kind:  # a model of the task's kind given to the other kind's preset
        if cfg.model in BUILTIN_CONFIGS:
            raise ValueError(f"preset {cfg.preset!r} is a {'text' if preset_kind == 'text' else 'vision'} preset: its "
                             f"recipe does not train {cfg.model}, which starts from random weights (trained from "
                             f"scratch); {use}")
        return (f"preset {cfg.preset!r} was written for {'text' if preset_kind == 'text' else 'images'} "
                f"(model {preset_model}); running its recipe with {cfg.model} on {cfg.task.data} as asked")
    return None


# --- field readers ----------------------------------------------------------------------------------


def did_you_mean(unknown, known) -> str:
    """" (did you mean 'x'?)" for the names in `unknown` that are close to one in `known` (difflib);
    "" when none is."""
    known = [str(k) for k in known]
    close = [(str(u), difflib.get_close_matches(str(u), known, n=1)) for u in unknown]
    close = [(u, m[0]) for u, m in close if m]
    if not close:
        return ""
    if len(close) == 1:
        return f" (did you mean {close[0][1]!r}?)"
    return " (did you mean " + ", ".join(f"{m!r} for {u!r}" for u, m in close) + "?)"


def method_config(method: str, sets: dict, where: str):
    """The config of the registered `method` from its fields `sets` (what `adaptinf convert --set`
    and a preset's `set:` give), or ValueError starting with `where`: an unknown field with the
    close known ones, a value of the wrong type naming the field and the type it expects."""
    from adaptinf.registry import get_method

    cls = get_method(method).Config
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in set(sets) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown fields {unknown} of method {method!r}{did_you_mean(unknown, known)}; "
                         f"known: {', '.join(known)}")
    try:
        return cls.from_dict(dict(sets))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _check_keys(d: Any, where: str, allowed) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__} {d!r}")
    unknown = sorted(set(d) - set(allowed), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}{did_you_mean(unknown, allowed)}; "
                         f"allowed: {sorted(allowed)}")
    return d


def _int(v, where: str, minimum: int | None = None, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where} must be an integer{' or null' if optional else ''}, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{where} must be at least {minimum}, got {v}")
    return v


def _float(v, where: str, optional: bool = False) -> float | None:
    if v is None and optional:
        return None
    if isinstance(v, str):  # YAML 1.1 reads 8e-5 (no dot) as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where} must be a number{' or null' if optional else ''}, got {v!r}")
    return float(v)


def _fraction(v, where: str) -> float:
    f = _float(v, where)
    if not 0 < f < 1:
        raise ValueError(f"{where} must lie strictly between 0 and 1, got {f}")
    return f


def _str(v, where: str, optional: bool = False, choices=None) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise ValueError(f"{where} must be a non-empty string{' or null' if optional else ''}, got {v!r}")
    if choices is not None and v not in choices:
        raise ValueError(f"{where} must be one of {list(choices)}, got {v!r}")
    return v


def _bool(v, where: str, optional: bool = False) -> bool | None:
    if v is None and optional:
        return None
    if not isinstance(v, bool):
        raise ValueError(f"{where} must be true or false, got {v!r}")
    return v


def _text(v, where: str) -> str:
    """Free text (a description or a note): anything, shown as a string; null is empty."""
    return str(v or "")


_READERS = {int: _int, float: _float, str: _str, bool: _bool}


def _field_type(hint) -> tuple[type | None, bool]:
    """(the scalar type of a field's annotation or None, whether it may be null)."""
    args = hint.__args__ if isinstance(hint, types.UnionType) else (hint,)
    scalars = [a for a in args if a in _READERS]
    return (scalars[0] if len(scalars) == 1 else None), type(None) in args


def _read(cls, d: dict, prefix: str, rename: dict[str, str] | None = None) -> dict:
    """Keyword arguments of dataclass `cls` from the preset mapping `d`: every scalar field whose key
    (its name, or `rename[name]`) is in `d`, read by its type's reader (`_int`, `_float`, `_str`, `_bool`)
    with the field's metadata as the reader's bounds (minimum=, choices=), or by the field's own
    metadata["read"]; a field `d` leaves out keeps the dataclass's default. `prefix` starts the field's
    name in errors (e.g. "quick: evaluate.")."""
    hints = get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        key = (rename or {}).get(f.name, f.name)
        kind, optional = _field_type(hints[f.name])
        if key in d and kind is not None:
            if "read" in f.metadata:
                kw[f.name] = f.metadata["read"](d[key], f"{prefix}{key}")
            else:
                kw[f.name] = _READERS[kind](d[key], f"{prefix}{key}", optional=optional, **f.metadata)
    return kw


def _section(cls, d: Any, where: str):
    """An instance of dataclass `cls` from the preset mapping `d` at `where` (every key one of its fields)."""
    d = _check_keys(d, where, [f.name for f in dataclasses.fields(cls)])
    return cls(**_read(cls, d, f"{where}."))


# --- settings -----------------------------------------------------------------------------------------


_TRAIN = TrainConfig()  # the preset's training defaults are the trainer's own
_POSITIVE = {"minimum": 1}  # field metadata: the bounds `_read` checks


@dataclass
class TrainSettings:
    """Training of the dense baseline or of a method: the fields of `adaptinf.settings.TrainConfig` a
    preset sets (the seed comes from the run; evaluation batch size and logging keep their defaults)."""

    epochs: int = field(default=_TRAIN.epochs, metadata=_POSITIVE)
    batch_size: int = field(default=_TRAIN.batch_size, metadata=_POSITIVE)
    lr: float = _TRAIN.lr
    weight_decay: float = _TRAIN.weight_decay
    warmup_ratio: float = _TRAIN.warmup_ratio
    max_grad_norm: float = _TRAIN.max_grad_norm
    save_every: int = field(default=_TRAIN.save_every, metadata=_POSITIVE)
    min_steps: int = _TRAIN.min_steps
    max_steps: int = _TRAIN.max_steps
    eval_every: int = _TRAIN.eval_every
    patience: int = _TRAIN.patience

    def __post_init__(self) -> None:
        self.to_train_config(0)  # validates every field

    def to_train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(seed=seed, **dataclasses.asdict(self))

    def updated(self, d: dict | None, where: str) -> TrainSettings:
        """A copy with the fields of `d` (a preset mapping) replaced, type-checked."""
        d = _check_keys(d, where, [f.name for f in dataclasses.fields(self)])
        kw = _read(TrainSettings, d, f"{where}.")
        try:
            return dataclasses.replace(self, **kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


@dataclass
class MethodSettings:
    """One method of a run.

    source: "dense" converts the fine-tuned dense baseline; "pretrained" starts from the pretrained
        model with fresh heads (as the early-exit papers do).
    set: the method's config fields (`adaptinf convert --set key=value`).
    train: training of what the method adds (the run's defaults, overridden per method).
    knobs: knob values to evaluate (None: the method's own sweep).
    """

    name: str
    source: str = field(default="dense", metadata={"choices": SOURCES})
    set: dict[str, Any] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    knobs: list[float] | None = None

    def check_config(self) -> None:
        """Raise ValueError if `set` is not a valid config of the (registered) method."""
        method_config(self.name, self.set, f"methods.{self.name}.set")


@dataclass
class EvalSettings:
    batch_size: int = field(default=64, metadata=_POSITIVE)
    # per split (validation, test); None: the whole split
    max_samples: int | None = field(default=None, metadata=_POSITIVE)
    # rounds of midpoints where neighbouring knob values' GFLOPs differ by more than refine_gap of
    # the costliest point (decided on validation, by cost only; test uses the same knob values)
    refine_rounds: int = field(default=3, metadata={"minimum": 0})
    refine_gap: float = field(default=0.05, metadata={"read": _fraction})


@dataclass
class LatencySettings:
    """Latency of chosen points (each method's cheapest within `max_drop` accuracy points of dense on
    validation, else its most accurate) at batch 1 and 32, interleaved with dense in one run."""

    samples: int = field(default=128, metadata=_POSITIVE)  # test samples per timing round and batch size
    repeats: int = field(default=5, metadata=_POSITIVE)
    warmup: int = field(default=2, metadata={"minimum": 0})
    max_drop: float = 1.0  # accuracy points
    compare_hf: bool = False  # also time transformers' BertForSequenceClassification with the dense weights
    int8: bool = True  # also time dense int8 and each chosen point's int8 form (and measure its test accuracy)
    onnx: bool = True  # also time the dense model in ONNX Runtime, fp32 and dynamic int8
    compile: bool = False  # also time dense compiled by torch.compile (about a minute of compiling per shape class)


@dataclass
class RunConfig:
    """Everything `adaptinf run` does, resolved (preset + flags)."""

    preset: str  # the preset's `name`
    description: str = field(default="", metadata={"read": _text})
    note: str = field(default="", metadata={"read": _text})  # shown at the top of the report (e.g. "trained on a subset")
    estimated_minutes: float | None = None
    model: str = DEFAULT_MODEL
    max_length: int = field(default=64, metadata={"minimum": 2})
    task: TaskSettings = field(default_factory=TaskSettings)
    max_train_samples: int | None = field(default=None, metadata=_POSITIVE)  # the preset's data.max_train_samples
    train: TrainSettings = field(default_factory=TrainSettings)  # defaults of the dense baseline and every method
    dense: TrainSettings = field(default_factory=TrainSettings)
    methods: list[MethodSettings] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it does not run
    evaluate: EvalSettings = field(default_factory=EvalSettings)
    latency: LatencySettings = field(default_factory=LatencySettings)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def method(self, name: str) -> MethodSettings:
        return next(m for m in self.methods if m.name == name)

    def dense_budget(self, n_train: int) -> tuple[TrainSettings, dict[str, int]]:
        """The dense baseline's training settings, given at least the training budget of the
        most-trained method (it still stops on validation with `patience`), and every method's budget
        in samples seen. A method converted from the dense model counts the dense training it starts
        from too; its own phases count as passes over the training data (`method_samples`)."""
        own = self.dense.to_train_config(0).total_steps(n_train) * self.dense.batch_size
        budgets = {m.name: method_samples(m, n_train) + (own if m.source == "dense" else 0) for m in self.methods}
        need = max(budgets.values(), default=0)
        steps = -(-need // self.dense.batch_size)  # ceil
        if steps <= self.dense.to_train_config(0).total_steps(n_train):
            return self.dense, budgets
        return dataclasses.replace(self.dense, min_steps=steps, max_steps=max(self.dense.max_steps, steps)
                                   if self.dense.max_steps else 0), budgets


def method_samples(ms: MethodSettings, n_train: int) -> int:
    """Training samples a method's recipe sees on `n_train` samples: its fine-tuning steps times the
    batch size, plus its own passes over the data (ACM's distillation and gate epochs, PLANER's router
    epochs, candidate distillations and router refits; SHARCS's epochs are its fine-tuning, its router
    fit runs on cached features)."""
    from adaptinf.registry import get_method

    tc = ms.train.to_train_config(0)
    cfg = get_method(ms.name).Config.from_dict(dict(ms.set))
    passes = getattr(cfg, "distill_epochs", 0) + getattr(cfg, "gate_epochs", 0) + getattr(cfg, "router_epochs", 0)
    finetune = getattr(cfg, "finetune", True)
    tuned = tc.total_steps(n_train) * tc.batch_size if finetune else 0
    extra = 0
    if finetune and not getattr(cfg, "architecture", ()) and getattr(cfg, "candidates", 1) > 1:
        # PLANER's short distillation of each searched candidate before picking (an upper bound: fewer
        # candidates may fit the target)
        extra += cfg.candidates * cfg.candidate_steps * tc.batch_size
    if finetune:
        extra += 2 * min(getattr(cfg, "router_refit_samples", 0), n_train)  # PLANER's two router refits on the student
    return tuned + passes * n_train + extra


def settings_hash(*parts) -> str:
    """A short stable hash of JSON-ready settings."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- reading a preset ---------------------------------------------------------------------------------

TOP_KEYS = ("name", "description", "note", "estimated_minutes", "model", "max_length", "data", "train", "dense",
            "methods", "evaluate", "latency")
DATA_KEYS = ("name", "text_column", "label_column", "group_column", "seed", "max_train_samples")
METHOD_KEYS = ("source", "set", "train", "knobs")


def preset_path(name_or_path: str) -> Path:
    """The YAML file of a built-in preset name, or a path to the user's own preset."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if p.is_dir():
            raise ValueError(f"preset {p} is a folder; give a .yaml file")
        if not p.is_file():
            raise ValueError(f"preset file {p} does not exist")
        return p
    builtin = PRESETS_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        hint = (" (a preset file's name ends in .yaml or .yml)" if p.is_file()
                else did_you_mean([name_or_path], builtin_presets()))
        raise ValueError(f"unknown preset {name_or_path!r}{hint}; built-in presets: {', '.join(builtin_presets())} "
                         "(or pass a path to a .yaml file)")
    return builtin


def read_preset(name_or_path: str) -> dict:
    import yaml

    path = preset_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"preset {path} is not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"preset {path} must hold a mapping at the top level")
    return raw


def _read_methods(raw: Any, train: TrainSettings, name: str) -> list[MethodSettings]:
    """The preset's `methods` mapping (method name -> settings), each checked; registered or pending."""
    from adaptinf.registry import list_methods

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: methods must be a mapping method name -> settings, got {type(raw).__name__}")
    known = set(list_methods()) | set(PENDING_METHODS)
    methods = []
    for m, d in raw.items():
        where = f"{name}: methods.{m}"
        if m == "dense":
            raise ValueError(f"{where}: the dense baseline always runs; set its training under 'dense'")
        if m not in known:
            raise ValueError(f"{where}: unknown method {m!r}{did_you_mean([m], sorted(known))}; "
                             f"registered: {', '.join(list_methods())}"
                             + (f"; pending: {', '.join(PENDING_METHODS)}" if PENDING_METHODS else ""))
        d = _check_keys(d, where, METHOD_KEYS)
        sets = d.get("set") or {}
        if not isinstance(sets, dict):
            raise ValueError(f"{where}.set must be a mapping of config fields, got {sets!r}")
        knobs = d.get("knobs")
        if knobs is not None:
            if not isinstance(knobs, list) or not knobs:
                raise ValueError(f"{where}.knobs must be a non-empty list of numbers or null, got {knobs!r}")
            knobs = [_float(k, f"{where}.knobs[{i}]") for i, k in enumerate(knobs)]
        ms = MethodSettings(name=str(m), **_read(MethodSettings, d, f"{where}."), set=dict(sets),
                            train=train.updated(d.get("train"), f"{where}.train"), knobs=knobs)
        if m in list_methods():
            ms.check_config()
        methods.append(ms)
    return methods


def parse_preset(raw: dict, name: str = "preset") -> RunConfig:
    """A RunConfig from a preset mapping, every key and type checked. Methods are kept as listed,
    registered or pending (see `select_methods`). A setting the preset leaves out keeps its
    dataclass's default."""
    _check_keys(raw, name, TOP_KEYS)
    data = _check_keys(raw.get("data"), f"{name}: data", DATA_KEYS)
    train = TrainSettings().updated(raw.get("train"), f"{name}: train")
    return RunConfig(
        **{"preset": name, **_read(RunConfig, raw, f"{name}: ", rename={"preset": "name"})},
        task=TaskSettings(**_read(TaskSettings, data, f"{name}: data.", rename={"data": "name"})),
        **_read(RunConfig, data, f"{name}: data."),  # the one RunConfig field under data: max_train_samples
        train=train,
        dense=train.updated(raw.get("dense"), f"{name}: dense"),
        methods=_read_methods(raw.get("methods"), train, name),
        evaluate=_section(EvalSettings, raw.get("evaluate"), f"{name}: evaluate"),
        latency=_section(LatencySettings, raw.get("latency"), f"{name}: latency"),
    )


def select_methods(cfg: RunConfig, requested: str | list[str] | None = "all") -> tuple[list[MethodSettings], dict[str, str]]:
    """The methods a run trains, in order, and the skipped ones with the reason.

    "all" (or None): the preset's methods that are registered; the others are skipped with a reason.
    A list of names: each must be registered (dense is implied and ignored); a method the preset does
    not configure runs with its default config, from the dense model, with the preset's training.
    """
    from adaptinf.registry import list_methods

    registered = [m for m in list_methods() if m != "dense"]
    by_name = {m.name: m for m in cfg.methods}
    skipped: dict[str, str] = {}
    if requested is None or requested == "all" or requested == ["all"]:
        chosen = [m for m in cfg.methods if m.name in registered]
        for m in cfg.methods:
            if m.name not in registered:
                skipped[m.name] = "not registered in this version of adaptinf (listed by the preset; it will run once registered)"
        for name in registered:
            if name not in by_name:
                skipped[name] = (f"registered but not configured by preset {cfg.preset!r}; run it with its default "
                                 f"settings with --methods {name},... or add it to the preset")
        return chosen, skipped
    names = requested.split(",") if isinstance(requested, str) else list(requested)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("--methods is empty; pass 'all' or comma-separated method names")
    unknown = [n for n in names if n not in registered and n != "dense"]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} in --methods{did_you_mean(unknown, registered)}; "
                         f"registered: {', '.join(registered)} (or 'all')")
    chosen = []
    for n in dict.fromkeys(names):
        if n == "dense":
            continue
        chosen.append(by_name.get(n) or MethodSettings(name=n, train=dataclasses.replace(cfg.train)))
    return chosen, skipped


def resolve(
    preset: str | None = DEFAULT_PRESET,
    methods: str | list[str] | None = "all",
    model: str | None = None,
    data: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    group_column: str | None = None,
    seed: int | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    epochs: int | None = None,
) -> RunConfig:
    """The run's settings: the preset (None: `default_preset(data)`), then the given overrides (None
    leaves the preset's value). A preset that names no model gets the task's default model
    (`adaptinf.settings.default_model`: vit-tiny for images, else MiniLM-L6)."""
    preset = default_preset(data) if preset is None else preset
    raw = read_preset(preset)
    cfg = parse_preset(raw, name=Path(preset).name if Path(preset).suffix else preset)
    task = cfg.task
    if data is not None and data != task.data:  # another data set: the preset's columns are not its columns
        task = TaskSettings(data=data)
    cfg.task = TaskSettings(
        data=task.data,
        text_column=text_column or task.text_column,
        label_column=label_column or task.label_column,
        group_column=group_column or task.group_column,
        seed=task.seed if seed is None else seed,
    )
    if model is not None:
        cfg.model = model
    elif "model" not in raw:
        cfg.model = default_model(cfg.task.data)
    if max_train_samples is not None:
        cfg.max_train_samples = _int(max_train_samples, "--max-train-samples", 1)
    if max_eval_samples is not None:
        cfg.evaluate.max_samples = _int(max_eval_samples, "--max-eval-samples", 1)
    if epochs is not None:
        _int(epochs, "--epochs", 1)
        cfg.train = dataclasses.replace(cfg.train, epochs=epochs)
        cfg.dense = dataclasses.replace(cfg.dense, epochs=epochs)
        for m in cfg.methods:
            m.train = dataclasses.replace(m.train, epochs=epochs)
    cfg.methods, cfg.skipped = select_methods(cfg, methods)
    return cfg


def write_resolved(cfg: RunConfig, out_dir: str | Path) -> tuple[Path, Path]:
    """Save the resolved settings as resolved.yaml and resolved.json in out_dir."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    y, j = out / "resolved.yaml", out / "resolved.json"
    y.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    j.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
    return y, j
