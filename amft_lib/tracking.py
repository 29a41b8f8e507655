"""MLflow experiment tracking for a pipeline run: one MLflow run per pipeline run, a nested run per
stage that trains, the stage config as params and every per-step curve as metrics, logged while
the stage runs — what a TRL user gets from `report_to="mlflow"`.

Why a tail of metrics.jsonl and not a callback in the trainer: the trainer's loop stays one
readable loop with one output (metrics.jsonl, the contract), and whatever reads that file — this
module, the reports, an auditor — sees the same numbers. A background thread follows the file
and sends new records in batches; the last batch is sent when the stage ends, so the MLflow
history holds exactly one point per training step.

With KFP 2.17's MLflow plugin on (KEP-12862), the driver has already made one MLflow run per KFP
run and a nested one per task, and injects MLFLOW_TRACKING_URI, MLFLOW_WORKSPACE and MLFLOW_RUN_ID
into the task's container: then the stage logs into *that* run (params, curves, system metrics)
and creates no tree of its own, or the run would appear twice. We use the client API with explicit
run ids throughout, never `mlflow.start_run(nested=True, parent_run_id=…)`, which MLFLOW_RUN_ID
would silently override (mlflow#15713). MLflow reads MLFLOW_WORKSPACE from the environment itself.

Checkpoints as MLflow 3 LoggedModels: the same tail follows `<run root>/checkpoints/*/MANIFEST.json`
and records each complete checkpoint as an *external* LoggedModel (tag `mlflow.model.isExternal`,
like `mlflow.create_external_model`) whose `amft.checkpoint_uri` tag points at the checkpoint in the
run root — no second copy of the weights — logged as a run output at its step, with the val
metrics measured on those weights attached (the same points the run's curves have). A checkpoint
that retention later deletes is tagged `amft.checkpoint_state=deleted`, not forgotten (one created and
deleted between two polls of the tail is never seen: retention keeps the last two and the best).

mlflow is imported inside the functions (`amft --help` stays fast).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from amft_lib.mlflow_names import (
    CHECKPOINT_MODEL_TYPE,
    CHECKPOINT_STATE_TAG,
    CHECKPOINT_STEP_TAG,
    CHECKPOINT_URI_TAG,
    EXTERNAL_TAG,
    STAGE_TAG,
)

log = logging.getLogger(__name__)

EXPERIMENT = "amft"
RUN_ID_TAG = "amft.run_id"  # the pipeline run id, on the parent MLflow run and its stage runs
_MAX_PARAM = 500  # MLflow's limit on a param value's length
# metrics.jsonl fields that are bookkeeping, not curves
_NOT_METRICS = {"step", "final", "elapsed_s"}
_FINAL_METRICS = {"val_reward", "val_accuracy"}  # what the final record adds (as the training curves read it)
# What KFP 2.17's MLflow plugin injects into a task container (KEP-12862).
PLUGIN_ENV = ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_WORKSPACE")


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


def plugin_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The KFP MLflow plugin's variables present in `environ` (default os.environ); {} when
    MLFLOW_RUN_ID is not set (no plugin: the stage builds its own run tree)."""
    env = os.environ if environ is None else environ
    if not env.get("MLFLOW_RUN_ID"):
        return {}
    return {k: env[k] for k in PLUGIN_ENV if env.get(k)}


def _max_step(client: Any, run_id: str, key: str = "mu") -> int:
    return max((m.step for m in client.get_metric_history(run_id, key)), default=-1)


def _plugin_run(client: Any, plugin: Mapping[str, str], run_id: str, stage: str, config: Mapping[str, Any]) -> int:
    """Adopt the plugin's task run: tag it with our run id and stage, add the config params it lacks
    (a retried task finds them there; MLflow refuses to change a param) and return the last step it has."""
    from mlflow.entities import Param, RunTag

    task_run = plugin["MLFLOW_RUN_ID"]
    have = client.get_run(task_run).data.params
    items = [Param(k, v) for k, v in sorted(flatten(config).items()) if k not in have]
    client.log_batch(task_run, tags=[RunTag(RUN_ID_TAG, run_id), RunTag(STAGE_TAG, stage)])
    for start in range(0, len(items), 100):
        client.log_batch(task_run, params=items[start:start + 100])
    return _max_step(client, task_run)


class _Checkpoints:
    """One external LoggedModel per complete checkpoint under `root` (see the module docstring)."""

    def __init__(self, client: Any, mlflow_run_id: str, root: str, run_id: str, stage: str) -> None:
        self.client, self.mlflow_run_id, self.root, self.run_id, self.stage = client, mlflow_run_id, root, run_id, stage
        self.experiment_id = client.get_run(mlflow_run_id).info.experiment_id
        self.models: dict[int, Any] = {}  # checkpoint step → LoggedModel (a retried task's earlier ones too)
        for model in client.search_logged_models(
                [self.experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}' and tags.`{STAGE_TAG}` = "
                f"'{stage}'", max_results=1000):
            if CHECKPOINT_STEP_TAG in model.tags:
                self.models[int(model.tags[CHECKPOINT_STEP_TAG])] = model
        self.with_metrics = {s for s, m in self.models.items() if m.metrics}
        self.deleted = {s for s, m in self.models.items() if m.tags.get(CHECKPOINT_STATE_TAG) == "deleted"}

    def poll(self, val_points: Mapping[int, list[Any]]) -> None:
        """Record new complete checkpoints, attach val points now known, mark deleted checkpoints."""
        from amft_lib import checkpoint

        present = {step: uri for step, uri, complete in checkpoint.list_checkpoints(self.root) if complete}
        for step, uri in sorted(present.items()):
            if step not in self.models:
                self.models[step] = self._create(step, uri)
        for step, model in self.models.items():
            if step not in self.with_metrics and val_points.get(step):
                from mlflow.entities import Metric

                self.client.log_batch(self.mlflow_run_id, metrics=[
                    Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id) for m in val_points[step]])
                self.with_metrics.add(step)
            if step not in present and step not in self.deleted:
                self.client.set_logged_model_tags(model.model_id, {CHECKPOINT_STATE_TAG: "deleted"})
                self.deleted.add(step)

    def _create(self, step: int, uri: str) -> Any:
        from mlflow.entities import LoggedModelOutput

        from amft_lib import checkpoint

        tags = {RUN_ID_TAG: self.run_id, STAGE_TAG: self.stage, CHECKPOINT_STEP_TAG: str(step),
                CHECKPOINT_URI_TAG: uri, CHECKPOINT_STATE_TAG: "complete", EXTERNAL_TAG: "true"}
        with contextlib.suppress(checkpoint.CheckpointError):
            tags["amft.config_hash"] = str(checkpoint.read_manifest(uri).get("config_hash"))
        name = f"{self.stage}-{checkpoint.step_dir_name(step)}"
        model = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=self.mlflow_run_id,
                                                tags=tags, model_type=CHECKPOINT_MODEL_TYPE)
        self.client.log_outputs(self.mlflow_run_id, [LoggedModelOutput(model.model_id, step)])
        model = self.client.finalize_logged_model(model.model_id, "READY")
        log.info("mlflow: checkpoint step %d recorded as LoggedModel %s", step, model.model_id)
        return model


class _Tail:
    """Follows metrics.jsonl and logs each new complete record to an MLflow run, one point per step;
    with `checkpoints`, records each new checkpoint as a LoggedModel in the same round."""

    def __init__(self, client: Any, mlflow_run_id: str, path: Path, interval_s: float, skip_through: int,
                 checkpoints: _Checkpoints | None = None) -> None:
        self.client, self.mlflow_run_id, self.path, self.interval_s = client, mlflow_run_id, path, interval_s
        self.skip_through = skip_through  # steps a retried task's earlier attempt already logged
        self.checkpoints = checkpoints
        # weights step → the val points logged for those weights: a record at step k evaluates the
        # weights after k + 1 updates (checkpoint k + 1); the final record evaluates its own step's
        self.val_points: dict[int, list[Any]] = {}
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
            self._poll_checkpoints()
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
            new = [Metric(k, v, stamp, step) for k, v in points.items()]
            metrics += new
            self.logged_steps += 0 if record.get("final") else 1
            val = [m for m in new if m.key in _FINAL_METRICS]
            if val:
                self.val_points[step if record.get("final") else step + 1] = val
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.mlflow_run_id, metrics=metrics[start:start + 1000])
        self.offset += end
        self._seen = (self._seen + data[:end])[-256:]  # the bytes before the offset, to notice a rewrite
        self.skip_through = last_step  # logged: a re-read after a rewrite must not log these steps twice
        self._poll_checkpoints()

    def _poll_checkpoints(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.poll(self.val_points)


@contextlib.contextmanager
def track_stage(tracking_uri: str | None, run_id: str, stage: str, config: Mapping[str, Any], run_dir: str | Path,
                *, artifact_root: str | None = None, interval_s: float = 5.0, checkpoint_root: str | None = None,
                plugin: Mapping[str, str] | None = None,
                system_metrics_s: float | None = 10.0) -> Iterator[str | None]:
    """Log a training stage into a nested MLflow run of pipeline run `run_id`: `config` as params,
    `run_dir/metrics.jsonl` as metrics while the block runs. Yields the MLflow run id it logs into.

    With the KFP MLflow plugin's variables (`plugin`, default: this process's environment; see
    `plugin_env`) it logs into the plugin's task run instead and leaves that run's status to the
    plugin. `checkpoint_root`: the run root whose checkpoints become LoggedModels. System metrics
    (CPU, memory, disk, network, GPU; MLflow's monitor, psutil) every `system_metrics_s` s; None: off.

    A registry that cannot be reached does not fail the stage: the error is logged once and the
    block runs untracked (the run root keeps every number; MLflow is a view of it)."""
    from amft_lib import registry

    plugin = plugin_env() if plugin is None else plugin_env(plugin)
    try:
        if plugin:  # KFP's MLflow plugin made this task's run: log into it (no tree of our own)
            if plugin.get("MLFLOW_WORKSPACE"):  # a launched worker got it through the launch spec
                os.environ.setdefault("MLFLOW_WORKSPACE", plugin["MLFLOW_WORKSPACE"])
            client = registry.get_client(plugin.get("MLFLOW_TRACKING_URI") or tracking_uri)
            child = plugin["MLFLOW_RUN_ID"]
            logged = _plugin_run(client, plugin, run_id, stage, config)
        else:
            client, child, logged = _own_run(registry.get_client(tracking_uri), run_id, stage, config, artifact_root)
        checkpoints = _Checkpoints(client, child, checkpoint_root, run_id, stage) if checkpoint_root else None
    except Exception as exc:
        from amft_lib.lineage import redact_text

        log.warning("mlflow tracking off for %s: %s", stage, redact_text(" ".join(str(exc).split())))
        yield None
        return
    tail = _Tail(client, child, Path(run_dir) / "metrics.jsonl", interval_s, logged, checkpoints)
    monitor = _system_metrics(client, child, system_metrics_s)
    status = "FAILED"
    try:
        with tail:
            yield child
        status = "FINISHED"
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()
        if not plugin:  # the plugin's driver ends its own run
            client.set_terminated(child, status)
        log.info("mlflow: %d steps logged to run %s (%s)", tail.logged_steps, child, status)


def _own_run(client: Any, run_id: str, stage: str, config: Mapping[str, Any],
             artifact_root: str | None) -> tuple[Any, str, int]:
    """Without the plugin: the stage's nested run under pipeline run `run_id` (created, or continued by
    a retried task after the steps it already has). Returns (client, run id, last logged step)."""
    parent = pipeline_run(client, run_id, artifact_root)
    found = client.search_runs([client.get_run(parent).info.experiment_id],
                               filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}' and tags.`{STAGE_TAG}` = '{stage}'",
                               max_results=1)
    if found:  # a retried task: the same nested run, continued after the steps it already has
        child = found[0].info.run_id
        client.update_run(child, status="RUNNING")
        return client, child, _max_step(client, child)
    child = client.create_run(client.get_run(parent).info.experiment_id, run_name=stage, tags={
        RUN_ID_TAG: run_id, STAGE_TAG: stage, "mlflow.parentRunId": parent}).info.run_id
    params = flatten(config)
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        client.log_batch(child, params=items[start:start + 100])
    return client, child, -1


def _system_metrics(client: Any, mlflow_run_id: str, interval_s: float | None) -> Any:
    """MLflow's system-metrics monitor on `mlflow_run_id` (None when off or unavailable: it needs psutil)."""
    if not interval_s:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(mlflow_run_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=client.tracking_uri)
        monitor.start()
        return monitor
    except Exception as exc:  # ImportError (no psutil) and the like: curves matter, these are extra
        log.info("mlflow: no system metrics (%s)", type(exc).__name__)
        return None
