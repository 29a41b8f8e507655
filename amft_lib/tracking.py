"""MLflow experiment tracking for a pipeline run: one MLflow run per pipeline run, a nested run per
stage that trains, the stage config as params and every per-step curve as metrics, logged while
the stage runs — what a TRL user gets from `report_to="mlflow"`.

Why a tail of metrics.jsonl and not a callback in the trainer: the trainer's loop stays one
readable loop with one output (metrics.jsonl, the contract), and whatever reads that file — this
module, the reports, an auditor — sees the same numbers. A background thread follows the file
and sends new records in batches; the last batch is sent when the stage ends, so the MLflow
history holds exactly one point per training step.

mlflow is imported inside the functions (`amft --help` stays fast).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXPERIMENT = "amft"
RUN_ID_TAG = "amft.run_id"  # the pipeline run id, on the parent MLflow run and its stage runs
STAGE_TAG = "amft.stage"
_MAX_PARAM = 500  # MLflow's limit on a param value's length
# metrics.jsonl fields that are bookkeeping, not curves
_NOT_METRICS = {"step", "final", "elapsed_s"}
_FINAL_METRICS = {"val_reward", "val_accuracy"}  # what the final record adds (as the training curves read it)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"controller.mu_init": "0.5", …}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:_MAX_PARAM]
    return out


def metric_points(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of one metrics.jsonl record (nulls, NaN and strings have no MLflow point)."""
    return {k: float(v) for k, v in record.items()
            if k not in _NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def pipeline_run(client: Any, run_id: str, artifact_root: str | None = None) -> str:
    """The MLflow run of pipeline run `run_id` (created on first use, found again by its tag so a
    retried task or a resumed pipeline run logs into the same one)."""
    from amft_lib.registry import experiment_id

    exp = experiment_id(client, EXPERIMENT, artifact_root)
    found = client.search_runs([exp], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}' and tags.`{STAGE_TAG}` = "
                               "'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp, run_name=run_id, tags={RUN_ID_TAG: run_id, STAGE_TAG: "pipeline"})
    return run.info.run_id


class _Tail:
    """Follows metrics.jsonl and logs each new complete record to an MLflow run, one point per step."""

    def __init__(self, client: Any, mlflow_run_id: str, path: Path, interval_s: float, skip_through: int) -> None:
        self.client, self.mlflow_run_id, self.path, self.interval_s = client, mlflow_run_id, path, interval_s
        self.skip_through = skip_through  # steps a retried task's earlier attempt already logged
        self.offset = 0
        self._seen = b""
        self.logged_steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="amft-mlflow-tail", daemon=True)

    def __enter__(self) -> _Tail:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.flush()  # whatever the last interval wrote
        except Exception as exc:  # as in _run: the run root keeps every number, the stage must not fail here
            log.warning("mlflow: could not log the last metrics (%s)", type(exc).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception as exc:  # tracking must never stop training; the final flush retries
                log.warning("mlflow: could not log metrics yet (%s)", type(exc).__name__)

    def flush(self) -> None:
        from mlflow.entities import Metric

        if not self.path.is_file():
            return
        with self.path.open("rb") as f:
            f.seek(max(0, self.offset - len(self._seen)))
            if f.read(len(self._seen)) != self._seen:
                # rewritten under us: a resumed trainer cuts its restored logs at the checkpoint's step and
                # appends from there, so the offset may point into another line; read it again from the
                # start (steps already logged are skipped below)
                self.offset, self._seen = 0, b""
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # only complete lines; a half-written one waits for the next round
        if not end:
            return
        metrics, last_step = [], self.skip_through
        stamp = int(time.time() * 1000)  # MLflow timestamps are wall-clock epoch milliseconds
        for line in data[:end].decode("utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:  # not a record (a line cut by a rewrite): the file keeps it, MLflow skips it
                continue
            step = int(record.get("step", 0))
            if step <= last_step and not record.get("final"):  # an earlier attempt, or a re-read, logged it
                continue
            if not record.get("final"):
                last_step = step
            points = metric_points(record)
            if record.get("final"):  # the end-of-run evaluation; its μ is the last step's update, not a new step
                points = {k: v for k, v in points.items() if k in _FINAL_METRICS}
            metrics += [Metric(k, v, stamp, step) for k, v in points.items()]
            self.logged_steps += 0 if record.get("final") else 1
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.mlflow_run_id, metrics=metrics[start:start + 1000])
        self.offset += end
        self._seen = (self._seen + data[:end])[-256:]  # the bytes before the offset, to notice a rewrite
        self.skip_through = last_step  # logged: a re-read after a rewrite must not log these steps twice


@contextlib.contextmanager
def track_stage(tracking_uri: str | None, run_id: str, stage: str, config: Mapping[str, Any], run_dir: str | Path,
                *, artifact_root: str | None = None, interval_s: float = 5.0) -> Iterator[str | None]:
    """Log a training stage into a nested MLflow run of pipeline run `run_id`: `config` as params,
    `run_dir/metrics.jsonl` as metrics while the block runs. Yields the nested MLflow run id.

    A registry that cannot be reached does not fail the stage: the error is logged once and the
    block runs untracked (the run root keeps every number; MLflow is a view of it)."""
    from amft_lib import registry

    try:
        client = registry.get_client(tracking_uri)
        parent = pipeline_run(client, run_id, artifact_root)
        found = client.search_runs([client.get_run(parent).info.experiment_id],
                                   filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}' and tags.`{STAGE_TAG}` = '{stage}'",
                                   max_results=1)
        logged = -1
        if found:  # a retried task: the same nested run, continued after the steps it already has
            child = found[0].info.run_id
            client.update_run(child, status="RUNNING")
            logged = max((m.step for m in client.get_metric_history(child, "mu")), default=-1)
        else:
            child = client.create_run(client.get_run(parent).info.experiment_id, run_name=stage, tags={
                RUN_ID_TAG: run_id, STAGE_TAG: stage, "mlflow.parentRunId": parent}).info.run_id
            params = flatten(config)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in sorted(params.items())]
            for start in range(0, len(items), 100):
                client.log_batch(child, params=items[start:start + 100])
    except Exception as exc:
        from amft_lib.lineage import redact_text

        log.warning("mlflow tracking off for %s: %s", stage, redact_text(" ".join(str(exc).split())))
        yield None
        return
    tail = _Tail(client, child, Path(run_dir) / "metrics.jsonl", interval_s, logged)
    status = "FAILED"
    try:
        with tail:
            yield child
        status = "FINISHED"
    finally:
        client.set_terminated(child, status)
        log.info("mlflow: %d steps logged to run %s (%s)", tail.logged_steps, child, status)
