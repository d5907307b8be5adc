#!/usr/bin/env bash
# The strict docs build: any warning (a broken link, a docstring that does not match its
# signature) fails it. Not --quiet: with it, mkdocs drops the warnings and strict mode passes.
# Usage: bash scripts/build_docs.sh [SITE_DIR] [MKDOCS_YML]
set -uo pipefail
export NO_MKDOCS_2_WARNING=1
site="${1:-${TMPDIR:-/tmp}/stableopt-site}"
config="${2:-mkdocs.yml}"
log="$(mktemp)"
mkdocs build --strict --site-dir "$site" --config-file "$config" >"$log" 2>&1
status=$?
grep -v '^INFO' "$log"
rm -f "$log"
exit "$status"
