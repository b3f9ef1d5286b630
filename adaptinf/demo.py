"""`python -m adaptinf.demo`: what `make demo` runs, `adaptinf run --preset quick` (see adaptinf.run).

Kept as an alias; flags after it are passed on, e.g. `python -m adaptinf.demo --out results/demo --threads 2`.
"""

from __future__ import annotations

import sys

from adaptinf.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in args:
        args += ["--out", "results/demo"]
    return cli(["run", "--preset", "quick", *args])


if __name__ == "__main__":
    sys.exit(main())
