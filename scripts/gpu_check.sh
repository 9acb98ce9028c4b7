#!/usr/bin/env bash
# The check to run on a single-GPU machine (no Ray needed): the time, peak memory and numerics of
# a GRPO learner step (with its MFU and the grouped pass's log-prob gap), of MedSAM2 propagation
# (batched vs MedSAM2's own procedure) and of rollout (transformers, and vLLM when it imports),
# at the paper's shape (python -m bench.gpu_check; its --help lists the options).
#   bash scripts/gpu_check.sh [--model DIR] [--medsam2 CKPT] [--peak-tflops T] 2>&1 | tee gpu-check.txt
#   bash scripts/gpu_check.sh --benchmarks    # also bench.learner and bench.reward_server on CUDA
#   bash scripts/gpu_check.sh --smoke         # the same code on the CPU at tiny sizes (no GPU)
# It needs, in the Python on PATH: torch with CUDA, transformers, peft, DeepSpeed, sam2 and the
# project's requirements. On a box that has its own torch and no package index, carry the rest as
# wheels and give their folder: `--wheels DIR` installs every wheel in DIR but torch's own (torch,
# nvidia-*, triton) without an index, into a folder of its own put first on PYTHONPATH (the box's
# environment is left as it was). Make DIR where pip reaches the index, in the environment
# setup.sh built, for the box's Python, from the box's `pip freeze` (what it has at our versions
# stays out):
#   python -m bench.gpu_wheels DIR --python-version 3.12 --have box-freeze.txt
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
benchmarks=0
smoke=0
wheels=""
args=()
while (($#)); do
  case "$1" in
    --benchmarks) benchmarks=1 ;;
    --smoke) smoke=1 && args+=(--smoke) ;;
    --wheels)
      if (($# < 2)); then echo "gpu_check: --wheels needs a folder of wheels" >&2 && exit 2; fi
      wheels=$2 && shift ;;
    --wheels=*) wheels=${1#--wheels=} ;;
    *) args+=("$1") ;;
  esac
  shift
done

if [[ -n $wheels ]]; then
  if [[ ! -d $wheels ]]; then
    echo "gpu_check: --wheels $wheels: no such folder" >&2
    exit 2
  fi
  carried=()
  while IFS= read -r wheel; do carried+=("$wheel"); done < <(
    find "$wheels" -maxdepth 1 -name '*.whl' ! -name 'torch-*' ! -name 'nvidia_*' \
      ! -name 'triton-*' | sort
  )
  if ((${#carried[@]} == 0)); then
    echo "gpu_check: --wheels $wheels: no wheels there (torch's own are not installed)" >&2
    exit 2
  fi
  site=$(mktemp -d -t medvol-wheels.XXXXXX)
  trap 'rm -rf "$site"' EXIT
  echo "gpu_check: installing ${#carried[@]} wheels from $wheels for $(command -v python)" \
    "into $site (first on PYTHONPATH)"
  # --no-deps: the folder is the whole set, resolved where it was made; the box's torch stays.
  python -m pip install --quiet --no-index --no-deps --no-compile --progress-bar off \
    --target "$site" "${carried[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ((!smoke)); then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi not found: this check needs an NVIDIA GPU and its driver" \
      "(--smoke runs it on the CPU)" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
MEDVOL_GPU_CHECK_SMOKE=$smoke python - <<'PY'
import importlib.metadata
import importlib.util
import os
import sys

# module: its distribution
needed = {
    "torch": "torch", "transformers": "transformers", "peft": "peft", "deepspeed": "deepspeed",
    "sam2": "sam2", "scipy": "scipy", "skimage": "scikit-image", "hydra": "hydra-core",
    "nibabel": "nibabel",  # the dataset (phantom volumes of --benchmarks' bench.reward_server)
}  # fmt: skip
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(
        f"gpu_check: {sys.executable} lacks {', '.join(missing)} (--wheels DIR installs carried "
        "wheels)"
    )
# which version of each runs, and from where (carried wheels come first on PYTHONPATH)
for module, distribution in needed.items():
    folder = os.path.dirname(os.path.dirname(importlib.util.find_spec(module).origin))
    print(f"gpu_check: {distribution} {importlib.metadata.version(distribution)} from {folder}")
import torch

if os.environ["MEDVOL_GPU_CHECK_SMOKE"] == "1":
    print(f"torch {torch.__version__}, smoke run on the CPU")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit(
        f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'}) "
        "sees no GPU; check the driver against the CUDA version torch was built for"
    )
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
python -m bench.gpu_check ${args[@]+"${args[@]}"}
if ((benchmarks)); then
  # The comparisons that need no vLLM or Ray: per-completion vs grouped learner pass, and the
  # reward scorer's group path vs MedSAM2's per-anchor procedure at 512 px.
  python -m bench.learner --shape paper --repeats 3
  python -m bench.reward_server --device cuda --no-workers --image-size 512 --groups 4 --repeats 3
fi
