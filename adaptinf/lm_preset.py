"""Language-model presets of `adaptinf run` (issue 19): typed settings read from YAML, validated.

An LM preset says `kind: language-model` at its top (`adaptinf/presets/lm-*.yaml`); a classifier
preset (`adaptinf.preset`) has no `kind`. It names the built-in decoder trained from scratch (with
DecoderConfig overrides), the tokenizer's vocabulary, the corpus (`austen` or a .txt file) with
optional token caps, the training of the dense LM and of each method (`LMTrainConfig` fields: `train`
holds the defaults, `dense` and each method's `train` override them), and the methods:

    methods:
      planer-0.7:                 # the entry's name: its folder and its name in every table
        method: planer            # a registry name (adaptinf.lm_methods.LM_METHODS); default: the entry's name
        set: {latency_target: 0.7}   # fields of the method's <X>LMConfig
        train: {epochs: 2}        # LMTrainConfig overrides
        knobs: null               # the knob values to evaluate (default: the model's knob_values())

`dense_continue` (default true): after the dense stage, the dense best also trains on with `train`'s
settings for the most-trained method's epochs, and the reference dense model is whichever of the two
has the lower validation perplexity (false: the dense stage's best, as before).

`max_ppl_increase_pct` is the selection rule: each method's cheapest point (FLOPs/token) whose
validation perplexity is within that many percent of dense's. Every unknown key is an error naming
where it is and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptinf.preset import _bool, _check_keys, _float, _int, _str, _text, did_you_mean, read_preset
from adaptinf.settings import LM_TASKS

LM_PRESET_KIND = "language-model"
DEFAULT_LM_PRESET = "lm-quick"
LM_PRESETS = ("lm-quick", "lm-full")
TOP_KEYS = ("kind", "name", "description", "note", "estimated_minutes", "model", "decoder", "vocab_size", "data",
            "train", "dense", "dense_continue", "methods", "evaluate", "max_ppl_increase_pct", "latency")
DATA_KEYS = ("name", "seed", "max_train_tokens", "max_eval_tokens")
METHOD_KEYS = ("method", "set", "train", "knobs")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_lm_task(data: str | None) -> bool:
    """A language-modelling corpus: a built-in one (`austen`) or a .txt file."""
    return data is not None and (data in LM_TASKS or data.lower().endswith(".txt"))


def is_lm_preset(raw: dict) -> bool:
    return isinstance(raw, dict) and raw.get("kind") == LM_PRESET_KIND


def lm_run_requested(preset: str | None, data: str | None) -> bool:
    """Whether `adaptinf run` with these --preset and --task runs a language model: the task is a
    language-modelling corpus, or the preset is an LM preset (a mismatch is `resolve_lm`'s error)."""
    return is_lm_task(data) or (preset is not None and is_lm_preset(read_preset(preset)))


def lm_train_fields() -> dict[str, Any]:
    """The `LMTrainConfig` fields a preset sets and their defaults (the seed comes from data.seed)."""
    from adaptinf.recipes.lm import LMTrainConfig

    return {f.name: f.default for f in dataclasses.fields(LMTrainConfig) if f.name != "seed"}


def train_config(fields: dict, seed: int):
    from adaptinf.recipes.lm import LMTrainConfig

    return LMTrainConfig(**fields, seed=seed)


def _train(base: dict, d: Any, where: str) -> dict:
    """`base` (LMTrainConfig fields) with the preset mapping `d` replacing some, type-checked."""
    defaults = lm_train_fields()
    d = _check_keys(d, where, list(defaults))
    out = dict(base)
    for k, v in d.items():
        kind = type(defaults[k])
        if kind is float:
            v = _float(v, f"{where}.{k}")
        elif kind is int:
            v = _int(v, f"{where}.{k}")
        else:
            v = _str(v, f"{where}.{k}")
        out[k] = v
    try:
        train_config(out, 0)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return out


@dataclass
class LMDataSettings:
    name: str = LM_TASKS[0]  # `austen` or the absolute path of a .txt file
    seed: int = 0
    max_train_tokens: int | None = None  # the training stream cut to its first N tokens (None: all)
    max_eval_tokens: int | None = None  # validation and test cut to their first N + 1 tokens

    def digest(self) -> str:
        """The corpus by content: a file's sha256 (edited in place: other data), else its name."""
        if not os.path.isfile(self.name):
            return self.name
        import hashlib

        h = hashlib.sha256()
        with open(self.name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "sha256:" + h.hexdigest()


@dataclass
class LMMethodSettings:
    name: str  # the entry's name (folder, tables)
    method: str  # the registry name
    set: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # LMTrainConfig fields (without seed)
    knobs: list[float | int | None] | None = None  # checked by the model's check_knob when evaluated


@dataclass
class LMLatencySettings:
    """Scoring one window of the model's seq_len tokens and generating `new_tokens` greedy tokens after
    a `prompt_tokens`-token prompt, at each batch size, dense and every chosen point interleaved."""

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    prompt_tokens: int = 16
    new_tokens: int = 128
    repeats: int = 5
    warmup: int = 2


@dataclass
class LMRunConfig:
    preset: str
    description: str = ""
    note: str = ""
    estimated_minutes: float | None = None
    model: str = "gpt-tiny"
    decoder: dict[str, Any] = field(default_factory=dict)  # DecoderConfig overrides
    vocab_size: int = 4096
    data: LMDataSettings = field(default_factory=LMDataSettings)
    train: dict[str, Any] = field(default_factory=lm_train_fields)
    dense: dict[str, Any] = field(default_factory=lm_train_fields)
    dense_continue: bool = True  # also train the dense best on with `train` for the methods' epochs (run_lm)
    methods: list[LMMethodSettings] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    eval_batch_size: int = 16
    max_ppl_increase_pct: float = 5.0
    latency: LMLatencySettings = field(default_factory=LMLatencySettings)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def method(self, name: str) -> LMMethodSettings:
        return next(m for m in self.methods if m.name == name)


# --- methods: resolved lazily (the registry names a module that may not be there) ---------------------


def recipe_module(method: str):
    """The recipe of LM method `method`: adaptinf.recipes.lm_<method, '-' as '_'> (its `fit`)."""
    name = "adaptinf.recipes.lm_" + method.replace("-", "_")
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"language-model method {method!r} has no recipe in this adaptinf ({name}: {e})") from e
    if not callable(getattr(module, "fit", None)):
        raise ValueError(f"{name} has no fit(model, data, cfg, out_dir, ...)")
    return module


def method_config_class(cls):
    """The method's config class, `<X>LMConfig` beside `<X>LM` (None when there is none)."""
    return getattr(sys.modules.get(cls.__module__), cls.__name__ + "Config", None)


def method_config(ms: LMMethodSettings, where: str):
    """The method's config from `set` (its <X>LMConfig.from_dict; the dict when it has no such class);
    ValueError starting with `where`."""
    from adaptinf.lm_methods import lm_method

    config_cls = method_config_class(lm_method(ms.method))
    if config_cls is None or not hasattr(config_cls, "from_dict"):
        return dict(ms.set)
    try:
        return config_cls.from_dict(dict(ms.set))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}.set: {e}") from None


def method_unavailable(ms: LMMethodSettings) -> str | None:
    """Why the method cannot run in this adaptinf (its class or recipe missing), else None."""
    from adaptinf.lm_methods import lm_method

    try:
        lm_method(ms.method)
        recipe_module(ms.method)
    except ValueError as e:
        return str(e)
    return None


# --- reading ------------------------------------------------------------------------------------------


def _read_methods(raw: Any, train: dict, where: str) -> list[LMMethodSettings]:
    from adaptinf.lm_methods import LM_METHODS

    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: methods must be a mapping entry name -> settings, got {type(raw).__name__}")
    out = []
    for name, d in raw.items():
        at = f"{where}: methods.{name}"
        if not isinstance(name, str) or not _NAME.match(name) or name == "dense":
            raise ValueError(f"{at}: an entry's name is a folder name (letters, digits, '.', '_', '-') other than "
                             "'dense' (the baseline always runs; set its training under 'dense')")
        d = _check_keys(d, at, METHOD_KEYS)
        method = d.get("method", name)
        if method not in LM_METHODS or method == "dense":
            known = [m for m in LM_METHODS if m != "dense"]
            raise ValueError(f"{at}.method: unknown language-model method {method!r}{did_you_mean([method], known)}; "
                             f"known: {', '.join(known)}" + ("" if "method" in d else " (name it with method: ...)"))
        sets = d.get("set") or {}
        if not isinstance(sets, dict):
            raise ValueError(f"{at}.set must be a mapping of config fields, got {sets!r}")
        knobs = d.get("knobs")
        if knobs is not None:
            if not isinstance(knobs, list) or not knobs:
                raise ValueError(f"{at}.knobs must be a non-empty list of numbers (null in it: full compute) or "
                                 f"null, got {knobs!r}")
            # an integer stays one (PLANER's knob counts experts); null is the method's full compute
            knobs = [k if k is None or (isinstance(k, int) and not isinstance(k, bool)) else _float(k, f"{at}.knobs[{i}]")
                     for i, k in enumerate(knobs)]
        out.append(LMMethodSettings(name, method, dict(sets), _train(train, d.get("train"), f"{at}.train"), knobs))
    return out


def _read_latency(d: Any, where: str) -> LMLatencySettings:
    d = _check_keys(d, where, [f.name for f in dataclasses.fields(LMLatencySettings)])
    lat = LMLatencySettings()
    sizes = d.get("batch_sizes", lat.batch_sizes)
    if not isinstance(sizes, list) or not sizes:
        raise ValueError(f"{where}.batch_sizes must be a non-empty list of positive integers, got {sizes!r}")
    lat.batch_sizes = [_int(b, f"{where}.batch_sizes[{i}]", 1) for i, b in enumerate(sizes)]
    for k, least in (("prompt_tokens", 1), ("new_tokens", 1), ("repeats", 1), ("warmup", 0)):
        if k in d:
            setattr(lat, k, _int(d[k], f"{where}.{k}", least))
    return lat


def _read_data(d: Any, where: str) -> LMDataSettings:
    d = _check_keys(d, where, DATA_KEYS)
    out = LMDataSettings()
    if "name" in d:
        out.name = _str(d["name"], f"{where}.name")
    if "seed" in d:
        out.seed = _int(d["seed"], f"{where}.seed")
    for k in ("max_train_tokens", "max_eval_tokens"):
        if k in d:
            setattr(out, k, _int(d[k], f"{where}.{k}", 16, optional=True))
    return out


def parse_lm_preset(raw: dict, name: str = "preset") -> LMRunConfig:
    """An LMRunConfig from an LM preset mapping, every key and type checked (methods not yet resolved)."""
    if not is_lm_preset(raw):
        raise ValueError(f"{name} is not a language-model preset (it lacks 'kind: {LM_PRESET_KIND}')")
    _check_keys(raw, name, TOP_KEYS)
    train = _train(lm_train_fields(), raw.get("train"), f"{name}: train")
    cfg = LMRunConfig(preset=_str(raw.get("name", name), f"{name}: name"),
                      description=_text(raw.get("description"), ""), note=_text(raw.get("note"), ""),
                      estimated_minutes=_float(raw.get("estimated_minutes"), f"{name}: estimated_minutes", optional=True),
                      model=_str(raw.get("model", "gpt-tiny"), f"{name}: model"),
                      decoder=dict(_check_keys(raw.get("decoder"), f"{name}: decoder", _decoder_fields())),
                      vocab_size=_int(raw.get("vocab_size", 4096), f"{name}: vocab_size", 257),
                      data=_read_data(raw.get("data"), f"{name}: data"), train=train,
                      dense=_train(train, raw.get("dense"), f"{name}: dense"),
                      dense_continue=_bool(raw.get("dense_continue", True), f"{name}: dense_continue"),
                      methods=_read_methods(raw.get("methods"), train, name),
                      eval_batch_size=_int(_check_keys(raw.get("evaluate"), f"{name}: evaluate", ["batch_size"])
                                           .get("batch_size", 16), f"{name}: evaluate.batch_size", 1),
                      max_ppl_increase_pct=_float(raw.get("max_ppl_increase_pct", 5.0), f"{name}: max_ppl_increase_pct"),
                      latency=_read_latency(raw.get("latency"), f"{name}: latency"))
    if not 0 <= cfg.max_ppl_increase_pct <= 1000:
        raise ValueError(f"{name}: max_ppl_increase_pct is a percentage of dense's perplexity (0-1000), "
                         f"got {cfg.max_ppl_increase_pct}")
    _check_model(cfg, name)
    return cfg


def _decoder_fields() -> list[str]:
    from adaptinf.decoder import DecoderConfig

    return [f for f in DecoderConfig.__dataclass_fields__ if f not in ("vocab_size", "bos_token_id", "eos_token_id")]


def _check_model(cfg: LMRunConfig, where: str) -> None:
    """The built-in model with the decoder overrides, and every window within its context."""
    from adaptinf.lm import builtin_lm_config

    try:
        dcfg = builtin_lm_config(cfg.model, cfg.vocab_size, 0.0, 0, cfg.decoder)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: model/decoder: {e}") from None
    for label, t in [("dense", cfg.dense)] + [(f"methods.{m.name}.train", m.train) for m in cfg.methods]:
        if t["seq_len"] > dcfg.max_positions:
            raise ValueError(f"{where}: {label}: seq_len {t['seq_len']} exceeds the model's context of "
                             f"{dcfg.max_positions} tokens")
    if cfg.latency.prompt_tokens >= dcfg.max_positions:
        raise ValueError(f"{where}: latency.prompt_tokens {cfg.latency.prompt_tokens} leaves no room to generate in the "
                         f"model's context of {dcfg.max_positions} tokens")


# --- resolving (preset + flags) ----------------------------------------------------------------------


def _task_mismatch(preset: str, raw: dict, data: str | None) -> None:
    """A classifier preset with an LM task, or an LM preset with a classification task: a clear error."""
    if not is_lm_preset(raw):
        raise ValueError(f"preset {preset!r} is a classifier preset but task {data} is a language-modelling corpus; "
                         f"use --preset {LM_PRESETS[0]} (or {LM_PRESETS[1]}), or leave --preset out to get "
                         f"{DEFAULT_LM_PRESET}")
    if data is not None and not is_lm_task(data):
        raise ValueError(f"preset {preset!r} is a language-model preset but task {data} is a classification task; "
                         "use --preset quick (or full; vision-quick for images), or give a language-modelling corpus "
                         f"({', '.join(LM_TASKS)} or a .txt file) with --task")


def _select(cfg: LMRunConfig, methods: str | None) -> None:
    """Keep the methods asked for (`all`: the preset's that can run; the others skipped with the reason)."""
    if methods is None or methods.strip() in ("", "all"):
        if methods is not None and not methods.strip():
            raise ValueError("--methods is empty; pass 'all' or comma-separated entry names of the preset")
        chosen = cfg.methods
        explicit = False
    else:
        names = [n.strip() for n in methods.split(",") if n.strip() and n.strip() != "dense"]
        known = [m.name for m in cfg.methods]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown} in --methods{did_you_mean(unknown, known)}; preset "
                             f"{cfg.preset!r} has {', '.join(known) or 'none'} (or 'all')")
        chosen, explicit = [cfg.method(n) for n in dict.fromkeys(names)], True
    kept = []
    for ms in chosen:
        why = method_unavailable(ms)
        if why and explicit:
            raise ValueError(f"--methods {ms.name}: {why}")
        if why:
            cfg.skipped[ms.name] = why
            continue
        method_config(ms, f"{cfg.preset}: methods.{ms.name}")  # a bad field fails here, before any work
        kept.append(ms)
    cfg.methods = kept


def resolve_lm(preset: str | None = None, data: str | None = None, methods: str | None = "all",
               model: str | None = None, seed: int | None = None, epochs: int | None = None) -> LMRunConfig:
    """The LM run's settings: the preset (default lm-quick), then the flags (None keeps the preset's)."""
    preset = DEFAULT_LM_PRESET if preset is None else preset
    raw = read_preset(preset)
    _task_mismatch(preset, raw, data)
    cfg = parse_lm_preset(raw, name=Path(preset).name if Path(preset).suffix else preset)
    if data is not None:
        cfg.data.name = data
    if cfg.data.name not in LM_TASKS:
        p = Path(cfg.data.name)
        if not p.is_file():
            raise ValueError(f"--task {cfg.data.name}: " + ("a folder, not a text file" if p.is_dir() else
                             "no such file") + f"; give a UTF-8 .txt file or a built-in corpus ({', '.join(LM_TASKS)})")
        cfg.data.name = os.path.abspath(p)
    if seed is not None:
        cfg.data.seed = _int(seed, "--seed")
    if model is not None:
        from adaptinf.lm import BUILTIN_LMS

        if model not in BUILTIN_LMS:
            raise ValueError(f"--model {model}: a language-model run trains a built-in decoder from scratch; "
                             f"one of {', '.join(BUILTIN_LMS)}")
        cfg.model = model
    if epochs is not None:
        _int(epochs, "--epochs", 1)
        for t in [cfg.train, cfg.dense] + [m.train for m in cfg.methods]:
            t["epochs"] = epochs
    _check_model(cfg, cfg.preset)
    _select(cfg, methods)
    return cfg


def write_resolved_lm(cfg: LMRunConfig, out: Path) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    d = cfg.to_dict()
    (out / "resolved.yaml").write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
    (out / "resolved.json").write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
