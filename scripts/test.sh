#!/usr/bin/env bash
# Builds (or reuses) the environment, then runs the whole test suite, slow end-to-end tests
# included, and the linter. Extra arguments go to pytest (e.g. `-k rewards`, `-m "not slow"`).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_dir=$(bash "$repo/scripts/setup.sh" | tail -n 1)
# shellcheck disable=SC1091
source "$env_dir/bin/activate"
cd "$repo"
ruff check .
python -m pytest "$@"
