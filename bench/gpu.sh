#!/usr/bin/env bash
# The benchmarks that need no vLLM or Ray, on a GPU: the learner phase at the paper's shape
# (per-completion vs grouped pass, DeepSpeed on CUDA) and the reward scorer's group path against
# MedSAM2's per-anchor procedure (MedSAM2's 512 px input, bf16 autocast). For a GPU machine
# where the CPU environment's vLLM cannot be used; needs torch with CUDA, transformers, peft,
# DeepSpeed, SAM2 and the project importable. Run from the repository root:
#   bash bench/gpu.sh 2>&1 | tee bench-gpu.txt
set -euo pipefail
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
python -m bench.learner --shape paper --repeats 3
python -m bench.reward_server --device cuda --no-workers --image-size 512 --groups 4 --repeats 3
