"""Adaptive language models: the methods applied to our GPT-2 style decoder (issue 19).

One file per method, as `adaptinf.methods` for classifiers, each reusing that method's building
blocks (PLANER's experts and router, ACM's learners and gate) on the decoder's blocks:
    planer.py      dense FFNs -> mixtures of experts, a latency-targeted per-layer block search
    early_exit.py  per-token exits (CALM-style confidence) with copy-state KV propagation
    acm.py         each FFN a sequence of learners, a per-token gate picks how many run
Every class subclasses `adaptinf.lm.LanguageModel` and keeps its method contract (see `adaptinf.lm`).
`LM_METHODS` maps a saved `method` name to its class, imported on first use.
"""

from __future__ import annotations

import importlib

LM_METHODS: dict[str, str] = {
    "dense": "adaptinf.lm:LanguageModel",
    "planer": "adaptinf.lm_methods.planer:PlanerLM",
    "early-exit": "adaptinf.lm_methods.early_exit:EarlyExitLM",
    "acm": "adaptinf.lm_methods.acm:AcmLM",
}


def lm_method(name: str):
    """The `LanguageModel` class of method `name` (a ValueError naming the known ones)."""
    if name not in LM_METHODS:
        raise ValueError(f"unknown language-model method {name!r}; known: {', '.join(LM_METHODS)}")
    module, cls = LM_METHODS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"language-model method {name!r} is not available in this adaptinf ({e})") from e
