#!/usr/bin/env bash
# The embedded default, end to end, on a fresh machine: set-up, then phantoms -> SFT -> GRPO on a
# local Ray head (ray job submit) with MLflow -> evaluation table. Extra arguments go to
# `python -m cluster.default_run` (e.g. --steps 20).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_dir=$(bash "$repo/scripts/setup.sh" | tail -n 1)
# shellcheck disable=SC1091
source "$env_dir/bin/activate"
cd "$repo"
python -m cluster.default_run "$@"
