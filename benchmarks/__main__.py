"""``python -m benchmarks``: the benchmark command (see :mod:`benchmarks.cli`)."""

from benchmarks.cli import main

raise SystemExit(main(prog="python -m benchmarks"))
