#!/usr/bin/env bash
# The test command from README.md: set up .venv/ (pinned), lint, then run the whole suite.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
export GX_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
