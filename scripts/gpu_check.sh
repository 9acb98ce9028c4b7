#!/usr/bin/env bash
# The check to run on a single-GPU machine: no Ray, no vLLM. Prints the time and peak memory of a
# GRPO learner step (with its MFU), of MedSAM2 propagation and of transformers rollout, at the
# paper's shape (python -m bench.gpu_check; its --help lists the options). Needs, in the Python
# on PATH: torch with CUDA, transformers, peft, DeepSpeed, sam2 and the project's requirements.
#   bash scripts/gpu_check.sh [--layers 8] [--peak-tflops T] 2>&1 | tee gpu-check.txt
#   bash scripts/gpu_check.sh --benchmarks    # also bench.learner and bench.reward_server on CUDA
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: nvidia-smi not found: this check needs an NVIDIA GPU and its driver" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python - <<'PY'
import importlib.util
import sys

needed = ("torch", "transformers", "peft", "deepspeed", "sam2", "scipy", "skimage", "hydra")
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(f"gpu_check: {sys.executable} lacks {', '.join(missing)}")
import torch

if not torch.cuda.is_available():
    sys.exit(
        f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'}) "
        "sees no GPU; check the driver against the CUDA version torch was built for"
    )
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
benchmarks=0
args=()
for arg in "$@"; do
  if [[ $arg == --benchmarks ]]; then benchmarks=1; else args+=("$arg"); fi
done
python -m bench.gpu_check --device cuda ${args[@]+"${args[@]}"}
if ((benchmarks)); then
  # The comparisons that need no vLLM or Ray: per-completion vs grouped learner pass, and the
  # reward scorer's group path vs MedSAM2's per-anchor procedure at 512 px.
  python -m bench.learner --shape paper --repeats 3
  python -m bench.reward_server --device cuda --no-workers --image-size 512 --groups 4 --repeats 3
fi
