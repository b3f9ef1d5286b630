"""adaptinf: convert a transformer classifier into an adaptive one and measure what it saves.

Importing this package is light: torch and the model classes load, matplotlib and transformers
do not until a command needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "list_methods", "load"]


def list_methods() -> list[str]:
    """Names of the registered methods, the dense baseline first."""
    from adaptinf.registry import list_methods as _list

    return _list()


def load(path):
    """Load a saved adaptinf model directory (config.json + model.safetensors + tokenizer)."""
    from adaptinf.checkpoint import load_model

    return load_model(path)
