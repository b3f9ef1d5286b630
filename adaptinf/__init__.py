"""adaptinf: convert a transformer classifier into an adaptive one and measure what it saves.

Importing this package is light: torch and the model classes load, matplotlib and transformers
do not until a command needs them.
"""

from __future__ import annotations

from adaptinf.version import __version__

__all__ = ["__version__", "list_methods", "load"]


def list_methods() -> list[str]:
    """Names of the methods in the catalogue (`adaptinf.registry.METHODS`), the dense baseline first."""
    from adaptinf.registry import list_methods as _list

    return _list()


def load(path):
    """Load a saved adaptinf model directory (config.json + model.safetensors + tokenizer)."""
    from adaptinf.registry import load_model

    return load_model(path)
