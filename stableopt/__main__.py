"""``python -m stableopt``: the command line (see :mod:`stableopt.cli`)."""

from stableopt.cli import main

raise SystemExit(main())
