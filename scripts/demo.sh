#!/usr/bin/env bash
# The main job from README.md: set up .venv/ (pinned), then run the whole KFP pipeline locally on embedded
# defaults (kfp.local SubprocessRunner, SeaweedFS S3, MLflow on SQLite, the `tiny` model) and print its summary.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
export GX_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1
# Threads per task: the engine decides at each stage's start (engine.threads=0, amft_lib/engine.py): one per
# core that other work leaves at least half idle (2 threads: 1.8× on an idle 2-core box; on a busy one two
# threads sharing a core ran 0.47× as fast, so it takes one). `--threads N` forces N.
exec .venv/bin/amft pipeline run-local --state-dir "${AMFT_DEMO_STATE:-runs/local-pipeline}" "$@"
