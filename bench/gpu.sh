#!/usr/bin/env bash
# Kept for old instructions: the GPU entry point is scripts/gpu_check.sh; this runs it with the
# comparisons of bench.learner and bench.reward_server on CUDA as well.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/../scripts/gpu_check.sh" --benchmarks "$@"
