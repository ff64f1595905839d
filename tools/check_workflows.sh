#!/usr/bin/env bash
# Validate every GitHub workflow against the workflow schema and audit it with zizmor (both from
# PyPI, offline). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
workflows=(.github/workflows/*.yml .github/workflows/*.yaml)
if [ ${#workflows[@]} -eq 0 ]; then
  echo "no workflows found" >&2
  exit 1
fi
uvx --quiet check-jsonschema==0.39.0 --builtin-schema vendor.github-workflows "${workflows[@]}"
uvx --quiet zizmor==1.32.0 --offline --min-severity medium "${workflows[@]}"
