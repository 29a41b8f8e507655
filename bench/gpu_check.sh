#!/usr/bin/env bash
# The one prepared script for the lent GPU machine (see bench/gpu_check.py). Usage: bash bench/gpu_check.sh OUTDIR
set -uo pipefail
out=${1:?usage: gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.txt"
python3 bench/gpu_check.py --out "$out" 2>&1 | tail -40
common=(--device cuda --precision bf16-mixed --steps 11 --meta-interval 10 --results-dir "$out")
python3 bench/bench_step.py --model tiny "${common[@]}" --prompts 16 --group 8 --max-new-tokens 64 2>&1 | grep '^|'
python3 bench/bench_step.py --model smollm2-135m-arch "${common[@]}" --prompts 16 --group 8 --max-new-tokens 128 \
  --label smollm2-arch-full-cuda 2>&1 | grep '^|'
python3 bench/bench_step.py --model smollm2-135m-arch --lora "${common[@]}" --prompts 16 --group 8 --max-new-tokens 128 \
  --label smollm2-arch-lora-cuda 2>&1 | grep '^|'
ls -la "$out"
