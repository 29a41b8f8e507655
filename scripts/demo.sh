#!/usr/bin/env bash
# The main job from README.md: set up .venv/ (pinned), then run the whole pipeline locally.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
export GX_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1
out="${AMFT_DEMO_OUT:-runs/demo}"
.venv/bin/amft warm-start --config configs/tiny_warm_start.yaml --out "$out/warm_start"
.venv/bin/amft train --config configs/tiny_gp.yaml --init-model "$out/warm_start/model" --out "$out/train"
