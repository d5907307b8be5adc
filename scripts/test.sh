#!/usr/bin/env bash
# The whole check: lint, format, types, tests, strict docs build. Run from the repository root
# after `pip install -e ".[dev,docs]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1
ruff check stableopt benchmarks tests
ruff format --check stableopt benchmarks tests
mypy stableopt benchmarks
python -m pytest -q -p no:cacheprovider
bash scripts/build_docs.sh
