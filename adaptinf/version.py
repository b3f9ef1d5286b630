"""The package version (a leaf: the checkpoint writer stamps it without importing the package)."""

__version__ = "0.1.0"
