#!/usr/bin/env bash
# README's commands, in its order, on the embedded default (about 12 minutes on 2 cores): set-up,
# the default run, predict with its policy (no frame flags: they come from medvol.json), a
# manifest of "your own" scans built with data.manifest, and evaluate on it. Stops at the first
# command that fails. Everything goes under the folder given (default: runs/walkthrough).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_dir=$(bash "$repo/scripts/setup.sh" | tail -n 1)
# shellcheck disable=SC1091
source "$env_dir/bin/activate"
cd "$repo"
out=${1:-runs/walkthrough}
step() { printf '\n== %s\n' "$*"; }

step "quick start: python -m cluster.default_run --out-dir $out"
python -m cluster.default_run --out-dir "$out"

step "segment a scan with the default run's policy"
python -m evaluation.predict --image "$out/phantoms/images/ctorg_0003.nii.gz" \
  --query "the liver" --adapter "$out/grpo/adapter" --out-dir "$out/predict"
test -s "$out/predict/mask.nii.gz" && test -s "$out/predict/evidence.json"

step "your own data: images and label maps in two folders, a labels map, data.manifest"
own="$out/own"
python -m data.phantoms --out-dir "$own/source" --cases 8 --seed 1 --volume-shape 32 96 96
mkdir -p "$own/imagesTr" "$own/labelsTr"
cp "$own"/source/images/*.nii.gz "$own/imagesTr/"
cp "$own"/source/labels/*.nii.gz "$own/labelsTr/"
python -c "import json, sys; from data.phantoms import LABELS; \
json.dump({'background': 0, **LABELS}, open(sys.argv[1], 'w'))" "$own/labels.json"
python -m data.manifest --images "$own/imagesTr" --labels "$own/labelsTr" \
  --labels-json "$own/labels.json" --out-file "$own/manifest.jsonl" --suite mydata \
  --test-fraction 0.5 --seed 0

step "evaluate the default run's policy on them"
python -m evaluation.evaluate --config configs/tiny.yaml "output_dir=$out" \
  "data.manifest=$own/manifest.jsonl" "data.cache_dir=$own/cache" \
  --adapter "SFT+RL=$out/grpo/adapter" --out-dir "$own/eval"
test -s "$own/eval/table.md"
step "done: every command ran"
