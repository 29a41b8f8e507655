#!/usr/bin/env bash
# The test command from README.md: set up .venv/ (pinned), lint, then run the whole suite; then set up
# .venv-airflow/ (Airflow cannot share the project's lock) and run the Airflow DAG's tests in it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/bootstrap.sh
bash scripts/bootstrap_airflow.sh
export GX_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"  # tests/conftest.py leaves tests/airflow/ out here
.venv-airflow/bin/python -m pytest -q tests/airflow
