#!/usr/bin/env bash
# README's commands, in its order, on the embedded default (about 20 minutes on 2 cores): set-up,
# the default run, predict with its policy (no frame flags: they come from medvol.json), with
# --samples, the review loop (evaluate the training scans, accept one corrected anchor through
# the page's requests, SFT on it), a manifest of "your own" scans built with data.manifest, and
# evaluate on it. Stops at the first
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

step "self-consistency: 5 sampled answers, their voxel majority and agreement"
python -m evaluation.predict --image "$out/phantoms/images/ctorg_0003.nii.gz" \
  --query "the liver" --adapter "$out/grpo/adapter" --out-dir "$out/predict-samples" --samples 5
python -c "import json, sys; e = json.load(open(sys.argv[1])); \
assert e['num_samples'] == 5 and 0 <= e['agreement'] <= 1, e" \
  "$out/predict-samples/evidence.json"

step "review, correct, train on the correction: evaluate the training scans, accept one anchor"
run=(--config configs/tiny.yaml "output_dir=$out" "data.manifest=$out/phantoms/manifest.jsonl"
  "data.cache_dir=$out/cache")
python -m evaluation.evaluate "${run[@]}" --split train --no-oracle \
  --adapter "SFT+RL=$out/grpo/adapter" --samples 4 --out-dir "$out/review-train"
python -m evaluation.review "$out/review-train" "${run[@]}" --port 8799 &
review=$!
trap 'kill $review 2>/dev/null || true' EXIT
# What a reviewer does on the page (sort, open the worst case, draw the box, Propagate,
# Accept), as its two requests: here the box drawn is the true one.
python - "$out" <<'PY'
import json, sys, time, urllib.parse, urllib.request
import numpy as np
from common.config import load_run_config
from data.dataset import VolumeDataset
from data.targets import evidence_target

out = sys.argv[1]
base = "http://127.0.0.1:8799"
for _ in range(600):
    try:
        cases = json.load(urllib.request.urlopen(base + "/api/cases"))["cases"]
        break
    except OSError:
        time.sleep(1)
worst = min((c for c in cases if c["dsc"] is not None), key=lambda c: c["dsc"])
view = json.load(urllib.request.urlopen(base + "/api/case?case=" + urllib.parse.quote(worst["id"])))
cfg = load_run_config("configs/tiny.yaml", [f"data.manifest={out}/phantoms/manifest.jsonl",
                                            f"data.cache_dir={out}/cache"])
_, prepared = VolumeDataset(cfg.data.manifest, cfg.data).by_id(view["sample_id"])
anchor = evidence_target(prepared, 1, np.random.default_rng(0), cfg.data.min_box_area)
body = {"case": worst["id"], "key_slice": anchor.key_slice,
        "boxes": [list(b) for b in anchor.boxes]}
for path in ("/api/propagate", "/api/accept"):
    request = urllib.request.Request(base + path, json.dumps(body).encode())
    answer = json.load(urllib.request.urlopen(request))
print(f"accepted {worst['id']}: DSC {worst['dsc']:.3f} -> {answer['dsc']:.3f}")
PY
kill $review
test -s "$out/review-train/corrections.jsonl"
python -m learner.sft "${run[@]}" "output_dir=$out/corrected" \
  --corrections "$out/review-train/corrections.jsonl"
test -s "$out/corrected/sft/adapter/adapter_model.safetensors"

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
