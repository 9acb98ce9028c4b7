#!/usr/bin/env bash
# The paper's recipe on M3D-Seg (AbdomenCT-1k, KiTS23 and CT-ORG) with configs/paper.yaml:
# manifest -> SFT cold start -> GRPO on Ray -> evaluation. Set the paths below or in the
# environment (OUT=/mnt/runs/try2 bash examples/paper.sh). Every stage reads and writes under
# OUT: GRPO starts from OUT/sft/adapter, evaluation rows are base, SFT and SFT+RL of OUT.
# On a multi-node cluster run this on the head node (GRPO joins RAY_ADDRESS when it is set) or
# submit the GRPO stage as a Ray job (deploy/rayjob.yaml).
set -euo pipefail

M3D_ROOT=${M3D_ROOT:-/mnt/data/M3D_Seg}         # M3D-Seg as downloaded (subsets 0003 0004 0012)
MANIFEST=${MANIFEST:-$M3D_ROOT/manifest.jsonl}  # written by the first stage when absent
MODEL=${MODEL:-/mnt/models/Qwen3-VL-4B-Instruct}
MEDSAM2=${MEDSAM2:-/mnt/models/MedSAM2_latest.pt}
OUT=${OUT:-/mnt/runs/paper}                     # adapters, checkpoints, tables, logs
CACHE=${CACHE:-/mnt/cache/medvol}               # prepared volumes, shared between runs
MLFLOW=${MLFLOW:-sqlite:///$OUT/mlflow.db}      # or an MLflow server, http://host:5000
PYTHON=${PYTHON:-python}                        # the environment's, e.g. <env>/bin/python

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
  "$PYTHON" -m data.m3dseg --root "$M3D_ROOT" --out-file "$MANIFEST"
fi
"$PYTHON" -m learner.sft "${run[@]}"
"$PYTHON" -m cluster.grpo "${run[@]}"
"$PYTHON" -m evaluation.evaluate --compare SFT:SFT+RL "${run[@]}"
