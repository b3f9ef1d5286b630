"""The method registry: name -> model class. Registering a method subjects it to the contract tests."""

from __future__ import annotations

from adaptinf.model import AdaptiveClassifier

_METHODS: dict[str, type[AdaptiveClassifier]] = {}


def register(cls: type[AdaptiveClassifier]) -> type[AdaptiveClassifier]:
    """Class decorator: `@register` on an AdaptiveClassifier subclass with a unique `method` name."""
    if not cls.method:
        raise ValueError(f"{cls.__name__} must set the class attribute `method` before registering")
    if cls.method in _METHODS and _METHODS[cls.method] is not cls:
        raise ValueError(f"method {cls.method!r} is already registered by {_METHODS[cls.method].__name__}")
    _METHODS[cls.method] = cls
    return cls


def _ensure_loaded() -> None:
    import adaptinf.methods  # noqa: F401  (importing registers the built-in methods)


def list_methods() -> list[str]:
    """Registered method names, the dense baseline first."""
    _ensure_loaded()
    return sorted(_METHODS, key=lambda n: (n != "dense", n))


def get_method(name: str) -> type[AdaptiveClassifier]:
    _ensure_loaded()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return _METHODS[name]
