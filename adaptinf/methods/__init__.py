"""One file per method. Importing this package registers every built-in method."""

from adaptinf.methods import acm, dense, early_exit, planer, sharcs  # noqa: F401
