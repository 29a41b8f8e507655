#!/usr/bin/env bash
# The main job from README.md: set up .venv/ (pinned), then run the whole KFP pipeline locally on embedded
# defaults (kfp.local SubprocessRunner, SeaweedFS S3, MLflow on SQLite, the `tiny` model) and print its summary.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
export GX_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1
# One torch thread per task: the numbers do not depend on the core count, and a second job on a 2-core box
# cannot oversubscribe it (two OpenMP threads sharing one core ran the warm start 8× slower).
exec .venv/bin/amft pipeline run-local --state-dir "${AMFT_DEMO_STATE:-runs/local-pipeline}" --threads 1 "$@"
