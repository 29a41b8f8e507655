"""Submit a run, or create/update a recurring run, on a KFP API server (`amft pipeline submit|schedule`).

A bearer token comes from `$KFP_TOKEN` only: never a command-line flag, which shells and CI logs keep.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipelines.build import compile_pipeline


def kfp_client(host: str, namespace: str | None = None) -> Any:
    """A kfp.Client for `host`; a bearer token comes from $KFP_TOKEN only."""
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        return kfp.Client(host=host, existing_token=os.environ.get("KFP_TOKEN") or None,
                          namespace=namespace or "kubeflow")


@contextlib.contextmanager
def _package(path: Path | None) -> Iterator[str]:
    if path is not None:
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="amft-kfp-") as tmp:
        yield str(compile_pipeline(Path(tmp) / "amft_pipeline.yaml"))


def normalize_cron(expr: str) -> str:
    """KFP's scheduler takes 6 fields (seconds first); a classic 5-field cron gets '0' seconds."""
    from amft_lib.config import ConfigError

    fields = expr.split()
    if len(fields) == 5:
        fields.insert(0, "0")
    if len(fields) != 6:
        raise ConfigError(f"cron {expr!r}: expected 6 fields (sec min hour day month weekday) or 5 classic ones")
    return " ".join(fields)


def submit_run(host: str, params: Mapping[str, Any], *, experiment: str = "amft", run_name: str | None = None,
               namespace: str | None = None, package: Path | None = None) -> str:
    """Create one run; returns its run id."""
    client = kfp_client(host, namespace)
    name = run_name or "amft-" + dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    with _package(package) as path:
        result = client.create_run_from_pipeline_package(path, arguments=dict(params), run_name=name,
                                                         experiment_name=experiment, namespace=namespace)
    return result.run_id


def schedule_run(host: str, cron: str, params: Mapping[str, Any], *, name: str = "amft-retrain",
                 experiment: str = "amft", namespace: str | None = None, package: Path | None = None,
                 enabled: bool = True) -> tuple[str, list[str]]:
    """Create the recurring run `name` (max_concurrency=1, no catch-up) and delete any older one of
    that name in the experiment, so re-running updates the schedule. KFP has no update call for
    recurring runs; creating first and deleting after means a failure never leaves no schedule.
    Returns (new id, replaced ids)."""
    cron = normalize_cron(cron)
    client = kfp_client(host, namespace)
    experiment_id = client.create_experiment(name=experiment, namespace=namespace).experiment_id
    old = _recurring_runs_named(client, experiment_id, name)
    with _package(package) as path:
        created = client.create_recurring_run(
            experiment_id=experiment_id, job_name=name, cron_expression=cron, max_concurrency=1, no_catchup=True,
            params=dict(params), pipeline_package_path=path, enabled=enabled,
            description="AMFT scheduled retraining (amft pipeline schedule)")
    for rid in old:
        client.delete_recurring_run(rid)
    return created.recurring_run_id, old


def _recurring_runs_named(client: Any, experiment_id: str, name: str) -> list[str]:
    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(experiment_id=experiment_id, page_size=100, page_token=token, filter=flt)
        found += [r.recurring_run_id for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token or ""
        if not token:
            return found
