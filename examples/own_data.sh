#!/usr/bin/env bash
# Your own CT scans through the paper's recipe (configs/paper.yaml): a manifest from your image
# and label folders -> SFT cold start -> GRPO on Ray -> evaluation. Set the paths below or in
# the environment (IMAGES=... LABELS=... bash examples/own_data.sh). Every stage reads and
# writes under OUT: GRPO starts from OUT/sft/adapter, evaluation rows are base, SFT and SFT+RL.
set -euo pipefail

IMAGES=${IMAGES:-/data/my_ct/imagesTr}             # NIfTI files or DICOM series folders
LABELS=${LABELS:-/data/my_ct/labelsTr}             # NIfTI label maps, paired by name
LABELS_JSON=${LABELS_JSON:-/data/my_ct/dataset.json}  # nnU-Net's dataset.json or {name: value}
MANIFEST=${MANIFEST:-/data/my_ct/manifest.jsonl}   # written by the first stage when absent
MODEL=${MODEL:-/mnt/models/Qwen3-VL-4B-Instruct}
MEDSAM2=${MEDSAM2:-/mnt/models/MedSAM2_latest.pt}
OUT=${OUT:-/mnt/runs/my_ct}                        # adapters, checkpoints, tables, logs
CACHE=${CACHE:-$OUT/cache}                         # prepared volumes
MLFLOW=${MLFLOW:-sqlite:///$OUT/mlflow.db}         # or an MLflow server, http://host:5000
PYTHON=${PYTHON:-python}                           # the environment's, e.g. <env>/bin/python

cd "$(dirname "${BASH_SOURCE[0]}")/.."
run=(
  --config configs/paper.yaml
  "output_dir=$OUT"
  "data.manifest=$MANIFEST"
  "data.cache_dir=$CACHE"
  "model.path=$MODEL"
  "reward.checkpoint=$MEDSAM2"
  "tracking.tracking_uri=$MLFLOW"
  "cluster.scale_file=$OUT/reward_workers"
)

if [[ ! -f $MANIFEST ]]; then
  "$PYTHON" -m data.manifest --images "$IMAGES" --labels "$LABELS" \
    --labels-json "$LABELS_JSON" --out-file "$MANIFEST"
fi
"$PYTHON" -m learner.sft "${run[@]}"
"$PYTHON" -m cluster.grpo "${run[@]}"
"$PYTHON" -m evaluation.evaluate --compare SFT:SFT+RL "${run[@]}"
