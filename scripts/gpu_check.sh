#!/usr/bin/env bash
# The check to run on a single-GPU machine (no Ray needed): the time, peak memory and numerics of
# a GRPO learner step (with its MFU and the grouped pass's log-prob gap), of MedSAM2 propagation
# (batched vs MedSAM2's own procedure) and of rollout (transformers, and vLLM when it imports),
# at the paper's shape (python -m bench.gpu_check; its --help lists the options).
#   bash scripts/gpu_check.sh [--model DIR] [--medsam2 CKPT] [--peak-tflops T] 2>&1 | tee gpu-check.txt
#   bash scripts/gpu_check.sh --benchmarks    # also bench.learner and bench.reward_server on CUDA
#   bash scripts/gpu_check.sh --smoke         # the same code on the CPU at tiny sizes (no GPU)
# It needs, in the Python on PATH: torch with CUDA, transformers, peft, DeepSpeed, sam2 and the
# project's requirements. On a box that has only torch, carry the rest as wheels and give their
# folder: `--wheels DIR` installs every wheel in DIR but torch's own (torch, nvidia-*, triton)
# without an index. Make DIR where pip reaches the registry, from the environment setup.sh built:
#   pip download --no-deps -d DIR $(pip freeze | grep -v -e '^torch' -e '^nvidia' -e '^triton' \
#       -e '^vllm' -e '^ray' -e '^sam2' -e '^medvol')
#   SAM2_BUILD_CUDA=0 pip wheel --no-deps --no-build-isolation -w DIR sam2==1.1.0
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
  echo "gpu_check: installing ${#carried[@]} wheels from $wheels into $(command -v python)"
  # --no-deps: the folder is the whole set, resolved where it was made; the box's torch stays.
  python -m pip install --no-index --no-deps --progress-bar off "${carried[@]}"
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
import importlib.util
import os
import sys

needed = ("torch", "transformers", "peft", "deepspeed", "sam2", "scipy", "skimage", "hydra")
missing = [name for name in needed if importlib.util.find_spec(name) is None]
if missing:
    sys.exit(
        f"gpu_check: {sys.executable} lacks {', '.join(missing)} (--wheels DIR installs carried "
        "wheels)"
    )
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
