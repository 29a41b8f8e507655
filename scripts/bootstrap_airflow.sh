#!/usr/bin/env bash
# Creates (or refreshes) the Airflow virtualenv at .venv-airflow/ for the Airflow DAG (pipelines/airflow/) and
# its tests (tests/airflow/), pinned by requirements/airflow-lock.txt.
# Why a second venv: Airflow 3.3 needs fastapi<0.137 and mlflow pins 0.165, so Airflow cannot live in .venv/
# (requirements/lock.txt stays as it is). The DAG needs only Airflow, kfp and boto3 — no torch, no amft_lib.
# Why a stamp: scripts/test.sh calls this on every run, and a no-op must cost < 1 s.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv-airflow"
stamp="$venv/.amft-stamp"
want=$(cat requirements/airflow.txt requirements/airflow-lock.txt | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/airflow" ]]; then
  exit 0
fi
echo "[bootstrap-airflow] setting up $venv (pinned installs from requirements/airflow-lock.txt)" >&2
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -r requirements/airflow.txt -c requirements/airflow-lock.txt
"${pip[@]}" check >&2
echo "$want" > "$stamp"
echo "[bootstrap-airflow] done" >&2
