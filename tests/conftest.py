"""Shared by every test run. tests/airflow/ runs in the Airflow virtualenv (.venv-airflow/, see
scripts/bootstrap_airflow.sh and scripts/test.sh): the project venv has no Airflow, so its pytest run
leaves that folder out instead of failing to import it."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("airflow") else ["airflow"]
