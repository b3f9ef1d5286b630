"""The catalogue: every method, by name, with its model class and its training recipe.

`METHODS` is written out here, the one place a newcomer sees every method. Entries are checked by
the contract tests (tests/test_contract.py). The model classes (`adaptinf.methods`) know nothing of
training or disk; the recipes (`adaptinf.recipes`) train them; this module sits above both, and so
does loading a saved model by its method name (`load_model`, `adaptinf.load`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from adaptinf.checkpoint import load_weights, read_config
from adaptinf.methods.acm import AcmClassifier
from adaptinf.methods.dense import DenseClassifier
from adaptinf.methods.early_exit import EarlyExitClassifier, MultiModelClassifier, SweetClassifier
from adaptinf.methods.planer import PlanerClassifier
from adaptinf.methods.sharcs import SharcsClassifier
from adaptinf.model import AdaptiveClassifier, ModelSpec
from adaptinf.recipes import acm as acm_recipe
from adaptinf.recipes import early_exit as early_exit_recipe
from adaptinf.recipes import planer as planer_recipe
from adaptinf.recipes import sharcs as sharcs_recipe

# fit(model, train, val, cfg, out_dir, progress=True, restart=False) -> JSON-ready summary
Recipe = Callable[..., dict]


@dataclass(frozen=True)
class Method:
    """A catalogue entry: the model class (config, conversion, forward, knob, cost) and the recipe
    that trains what conversion adds (None: the converted model is ready as it is)."""

    model: type[AdaptiveClassifier]
    fit: Recipe | None = None


METHODS: dict[str, Method] = {
    "dense": Method(DenseClassifier),
    "ee": Method(EarlyExitClassifier, early_exit_recipe.fit),
    "sweet": Method(SweetClassifier, early_exit_recipe.fit),
    "multi-model": Method(MultiModelClassifier, early_exit_recipe.fit),
    "sharcs": Method(SharcsClassifier, sharcs_recipe.fit),
    "acm": Method(AcmClassifier, acm_recipe.fit),
    "planer": Method(PlanerClassifier, planer_recipe.fit),
}


def list_methods() -> list[str]:
    """Method names, the dense baseline first."""
    return sorted(METHODS, key=lambda n: (n != "dense", n))


def _entry(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return METHODS[name]


def get_method(name: str) -> type[AdaptiveClassifier]:
    """The model class of method `name` (ValueError naming the known methods otherwise)."""
    return _entry(name).model


def get_recipe(name: str) -> Recipe | None:
    """The training recipe of method `name`, or None when conversion alone makes the model."""
    return _entry(name).fit


def needs_training(name: str) -> bool:
    return get_recipe(name) is not None


def load_model(directory: str | os.PathLike, expect_method: str | None = None, with_tokenizer: bool = True) -> AdaptiveClassifier:
    """Rebuild a saved model without re-running conversion; the tokenizer is attached when present.
    A vision model gets its image processor (`preprocessor_config.json`, checked against the model's
    image and patch size and channels; made from them when the file is absent)."""
    d = Path(directory)
    cfg = read_config(d)
    if expect_method is not None and cfg["method"] != expect_method:
        raise ValueError(f"{d} holds a {cfg['method']!r} model, expected {expect_method!r}")
    cls = get_method(cfg["method"])
    model = cls(ModelSpec.from_dict(cfg["spec"]), cls.Config.from_dict(cfg["method_config"]))
    load_weights(model, d, cfg["method"])
    model.set_knob(cfg.get("knob"))
    model.eval()
    if not with_tokenizer:
        return model
    if getattr(model.spec.encoder, "image_size", 0):  # a vision model: never a stale text tokenizer
        model.tokenizer = _image_processor(d, model.spec.encoder)
    elif (d / "tokenizer.json").is_file():
        from adaptinf.hf import load_tokenizer

        model.tokenizer = load_tokenizer(d)
    return model


def _image_processor(d: Path, cfg):
    """The processor saved in `d`, which must fit the encoder config `cfg`; made from `cfg` when absent."""
    from adaptinf.images import PROCESSOR_FILE, ImageProcessor

    want = ImageProcessor.for_encoder(cfg)
    if not (d / PROCESSOR_FILE).is_file():
        return want
    saved = ImageProcessor.from_pretrained(d)
    if saved != want:
        raise ValueError(f"{d / PROCESSOR_FILE} ({saved.describe()}) does not fit the model ({want.describe()}); "
                         f"the checkpoint is inconsistent: delete {PROCESSOR_FILE} or re-save the model")
    return saved
