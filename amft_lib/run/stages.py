"""Each pipeline stage as a plain function: what a KFP component does besides reading its input
artifacts and writing its outputs.

Why here and not in the components: a component body is embedded as source in the compiled YAML
and only runs inside kfp; logic there is logic that `amft` and the unit tests never execute. Each
function below takes local paths (the component's artifact paths, or any folder) and a `RunRoot`,
runs one library stage, publishes what it wrote to the run root (the durable layout), and returns a
`StageOutcome` the component copies into KFP's UI: scalar metrics, artifact metadata, and the
task's return value (a gate's decision, H*).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from amft_lib.run.layout import (
    RunRoot,
    fetch_input,
    model_uri,
    open_model,
    publish,
    put_json,
    stage_model,
    write_pointer,
)
from amft_lib.run.scale_out import (
    TRAIN,
    WARM_START,
    ClusterJob,
    ScaleOut,
    ScaleOutError,
    check_scale_out,
    launch_trainjob,
    run_torchrun,
)

log = logging.getLogger(__name__)

# Test hooks: SIGKILL the training (warm-start) task once, right after its first complete checkpoint.
FAULT_ENV = "AMFT_FAULT_KILL_TRAIN_AFTER_CHECKPOINT"
WARM_START_FAULT_ENV = "AMFT_FAULT_KILL_WARM_START_AFTER_CHECKPOINT"


@dataclass
class StageOutcome:
    """What a stage reports to the orchestrator: `metrics` (finite scalars for a KFP Metrics
    artifact), `metadata` per output artifact name, and `value` (the task's return value)."""

    metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    value: Any = None

    def add_metrics(self, values: dict[str, Any], prefix: str = "") -> None:
        """Keep the finite numbers of `values` (NaN and non-numbers have no place in KFP Metrics)."""
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
                self.metrics[prefix + key] = float(value)


# ── Stage 1: prepare data ───────────────────────────────────────────────────────────────────────


def prepare_stage(run: RunRoot, dataset_dir: str, *, task: str, input_uri: str, train_size: int, val_size: int,
                  test_id_size: int, test_ood_size: int, seed: int) -> StageOutcome:
    """Generate or ingest the dataset into `dataset_dir` and publish it to `<run>/data/`."""
    from amft_lib.data.prepare import PrepareConfig, run_prepare

    with tempfile.TemporaryDirectory(prefix="amft-input-") as tmp:
        local_input = fetch_input(input_uri, tmp) if input_uri else None
        result = run_prepare(PrepareConfig(
            out_dir=dataset_dir, task=task, input=local_input, seed=seed, train_size=train_size, val_size=val_size,
            test_id_size=test_id_size, test_ood_size=test_ood_size))
    publish(dataset_dir, run.data)
    out = StageOutcome(metadata={"dataset": {"task": result.card.task, "rows": result.rows, "uri": run.data}})
    out.add_metrics(result.rows, "rows_")
    out.add_metrics(dict(result.card.dropped), "dropped_")
    return out


# ── Stage 2: validation gate ────────────────────────────────────────────────────────────────────


def validate_stage(run: RunRoot, dataset_dir: str, *, html_path: str, markdown_path: str,
                   min_rows: dict[str, Any], max_prompt_tokens: int) -> StageOutcome:
    """Run the GX suite; copy its reports to the given paths and `<run>/validation/`, record the gate.
    `value` is whether the data passed."""
    from amft_lib.data.validate import ValidateConfig, run_validate

    with tempfile.TemporaryDirectory(prefix="amft-validate-") as tmp:
        # KFP passes a dict parameter's numbers as floats; the suite wants integer row counts
        rows = {split: int(n) for split, n in min_rows.items()}
        result = run_validate(ValidateConfig(dataset=dataset_dir, out_dir=tmp, min_rows=rows,
                                             max_prompt_tokens=max_prompt_tokens))
        shutil.copyfile(result.html_path, html_path)
        shutil.copyfile(result.markdown_path, markdown_path)
        publish(tmp, run.validation)
    failed = [f.check for f in result.failures]
    # the digest of the card bytes the suite validated, not a second read that could see another card
    put_json(run.gate, {"passed": result.passed, "failed_checks": failed, "statistics": result.statistics,
                        "card_sha256": result.card_sha256})
    out = StageOutcome(metadata={"report_md": {"failed_checks": failed}}, value=result.passed)
    keys = ("evaluated_expectations", "successful_expectations", "unsuccessful_expectations", "success_percent")
    out.add_metrics({k: result.statistics.get(k) for k in keys})
    out.metrics["passed"] = 1.0 if result.passed else 0.0
    log.info("validation %s; failed checks: %s", "passed" if result.passed else "FAILED", ", ".join(failed) or "none")
    return out


# ── Stage 3: warm start ─────────────────────────────────────────────────────────────────────────


def warm_start_stage(run: RunRoot, dataset_dir: str, config_json: str, *, model_dir: str,
                     base_model_dir: str, num_nodes: int = 1, nproc_per_node: int = 1, launcher: str = "torchrun",
                     cluster: ClusterJob | None = None) -> StageOutcome:
    """Snapshot the base model, build the warm-start model (SFT → rejection sampling → SFT) and
    publish both to the run root; the `model` / `base_model` artifacts point there (one stored copy
    of each). `value` is H* (nats/token) for the training controller.

    One process builds it here; more (num_nodes × nproc_per_node > 1) are launched like the train
    stage's (amft_lib.run.scale_out) and read the base model from the run root."""
    import dataclasses

    from amft_lib.config import WarmStartConfig, config_from_dict, config_to_dict
    from amft_lib.dataset import read_rows
    from amft_lib.model import load_policy, save_policy
    from amft_lib.model_source import allow_hub_downloads, resolve_model
    from amft_lib.warm_start import run_warm_start

    cfg = config_from_dict(json.loads(config_json), WarmStartConfig)
    cfg.data.path = run.data  # the durable copy; rows are read from the local artifact
    scale = check_scale_out(num_nodes, nproc_per_node, cfg.distributed.strategy, launcher,
                            cluster.gpus_per_node if cluster else 0, stage=WARM_START)
    allow_hub_downloads(cfg.model.allow_download)
    source = resolve_model(cfg.model.name, allow_download=cfg.model.allow_download)
    put_json(run.base_model_source, source.lineage())  # every file's sha256, for the lineage record
    if scale.world_size == 1:
        arm_fault(WARM_START_FAULT_ENV, run.warm_start, run.warm_start_fault_marker)
    with tempfile.TemporaryDirectory(prefix="amft-warm-start-") as tmp:
        base = Path(tmp, "base_model")
        if source.local_dir is not None:  # the files as they are: no load of a multi-GB model on the CPU
            shutil.copytree(source.local_dir, base, ignore=shutil.ignore_patterns(".*", "*.lock"))
        else:  # `tiny` is built from its config and seed
            policy, tokenizer = load_policy(dataclasses.replace(cfg.model, lora=False), device="cpu", seed=cfg.seed)
            save_policy(policy, tokenizer, base)
            del policy
        if scale.world_size > 1:  # the workers start from the run root's copy
            publish(base, run.base_model)
            _launch(run, WARM_START, scale, cluster, {"config": config_to_dict(cfg), "init_model": run.base_model})
            result = _read_json(run.warm_start_result)
        else:
            work = Path(tmp, "warm_start")
            gated = check_gated(run, dataset_dir)
            # checkpoints under <run>/warm_start/checkpoints/; a retried task resumes from the newest verified one
            result = _warm_start_record(run_warm_start(cfg, work, splits=read_rows(dataset_dir, gated),
                                                       init_model=str(base),
                                                       checkpoint_root=run.uri, resume="auto"))
            publish(work, run.warm_start)
            publish(base, run.base_model)
    write_pointer(base_model_dir, run.base_model, model_name=cfg.model.name)
    write_pointer(model_dir, run.warm_start_model, target_entropy=result["target_entropy"])
    out = StageOutcome(value=float(result["target_entropy"]), metadata={
        "base_model": {"model_name": cfg.model.name, "uri": run.base_model},
        "model": {"target_entropy": result["target_entropy"], "uri": run.warm_start_model}})
    out.add_metrics({"acceptance_rate": result["acceptance_rate"], f"pass_at_{cfg.rs_samples}": result["pass_at_k"],
                     "target_entropy": result["target_entropy"]})
    out.add_metrics(result["val_accuracy"], "val_accuracy_")
    if result["resumed_from"]:
        out.metadata["model"]["resumed_from"] = result["resumed_from"]
    return out


def _warm_start_record(result: Any) -> dict[str, Any]:
    """The WarmStartResult numbers a warm-start task reports (what a launched rank 0 writes as result.json)."""
    return {"target_entropy": result.target_entropy, "acceptance_rate": result.acceptance_rate,
            "pass_at_k": result.pass_at_k, "val_accuracy": dict(result.val_accuracy),
            "resumed_from": result.resumed_from}


def warm_start_worker_stage(run: RunRoot) -> None:
    """One rank of a launched warm start (`amft stage warm-start-worker`, under torchrun): every rank
    runs `run_warm_start` from the run root's data and base model; rank 0 publishes warm_start/ and
    its result.json."""
    from amft_lib.config import WarmStartConfig, config_from_dict
    from amft_lib.warm_start import run_warm_start

    with _worker_inputs(run, WARM_START) as (spec, rank, splits, init_model, tmp):
        cfg = config_from_dict(spec["config"], WarmStartConfig)
        work = Path(tmp, "warm_start")
        result = run_warm_start(cfg, work, splits=splits, init_model=init_model, checkpoint_root=run.uri,
                                resume="auto")
        if rank == 0:  # only rank 0 wrote `work`; every rank got the same result
            publish(work, run.warm_start)
            put_json(run.warm_start_result, _warm_start_record(result))
            log.info("rank 0 published warm_start/ to %s", run.uri)


# ── Stage 4: train ──────────────────────────────────────────────────────────────────────────────


def train_stage(run: RunRoot, dataset_dir: str, config_json: str, *, target_entropy: float, init_model: str,
                run_dir: str, model_dir: str, curves_path: str, tracking_uri: str = "", num_nodes: int = 1,
                nproc_per_node: int = 1, launcher: str = "torchrun", cluster: ClusterJob | None = None) -> StageOutcome:
    """The AMFT loop with checkpoints under the run root and `resume="auto"`, so a retried task (or a
    new pipeline run given the same run id) continues from the newest verified checkpoint. The config
    and every per-step curve go to a nested MLflow run of the pipeline run while it trains.

    One process (num_nodes × nproc_per_node = 1) trains here, in this process. More are launched
    (`launcher`: "torchrun" locally, "trainjob" on a cluster with `cluster` settings; see
    amft_lib.run.scale_out) and publish to the same run-root paths, from which the outputs are filled."""
    from amft_lib import checkpoint
    from amft_lib.config import config_to_dict
    from amft_lib.dataset import read_rows
    from amft_lib.tracking import track_stage
    from amft_lib.trainer import run_train

    cfg = _train_config(run, config_json, target_entropy)
    scale = check_scale_out(num_nodes, nproc_per_node, cfg.distributed.strategy, launcher,
                            cluster.gpus_per_node if cluster else 0)
    done = [step for step, _, complete in checkpoint.list_checkpoints(run.uri) if complete]
    if scale.world_size > 1:
        return _launched_train_stage(run, cfg, scale, cluster, init_model=init_model, tracking_uri=tracking_uri,
                                     resumed_from_step=max(done, default=0), run_dir=run_dir, model_dir=model_dir,
                                     curves_path=curves_path)
    arm_train_fault(run)
    gated = check_gated(run, dataset_dir)
    with tempfile.TemporaryDirectory(prefix="amft-init-model-") as staging, \
            track_stage(tracking_uri or None, run.run_id, "train", config_to_dict(cfg), run_dir,
                        artifact_root=run.mlflow_artifacts, checkpoint_root=run.uri):
        result = run_train(cfg, run_dir, init_model=open_model(init_model, staging),
                           splits=read_rows(dataset_dir, gated), progress=False, checkpoint_root=run.uri, resume="auto")
    summary = _publish_training(run, cfg, result, run_dir, resumed_from_step=max(done, default=0))
    return _train_outcome(run, summary, run_dir=run_dir, model_dir=model_dir, curves_path=curves_path)


def _train_config(run: RunRoot, config_json: str, target_entropy: float) -> Any:
    """The TrainConfig the stage trains with: preflight's JSON, the run root's data, the warm start's H*."""
    from amft_lib.config import TrainConfig, config_from_dict
    from amft_lib.model_source import allow_hub_downloads

    cfg = config_from_dict(json.loads(config_json), TrainConfig)
    cfg.data.path = run.data  # the durable copy; rows are read from the local artifact
    cfg.controller.target_entropy = target_entropy
    # the temperature H* was measured at (warm start stats): the trainer refuses one unlike its rollouts'
    cfg.controller.target_entropy_temperature = _read_json(run.warm_start_stats).get("target_entropy_temperature")
    allow_hub_downloads(cfg.model.allow_download)
    return cfg


def _publish_training(run: RunRoot, cfg: Any, result: Any, run_dir: str | Path, *, resumed_from_step: int) -> dict:
    """Publish a finished training's logs (`run_dir` → <run>/train/), model (→ <run>/model/) and summary
    (<run>/train/result.json); returns the summary. Done by the one process that wrote `run_dir`."""
    model_files = Path(tempfile.mkdtemp(prefix="amft-model-"))
    shutil.move(str(result.model_dir), model_files / "model")  # out of run_dir: the logs artifact stays small
    summary = {"steps": result.steps, "mu_final": result.mu_final, "target_entropy": result.target_entropy,
               "val_accuracy_initial": result.val_accuracy_initial, "val_accuracy_final": result.val_accuracy_final,
               "val_reward_initial": result.val_reward_initial, "val_reward_final": result.val_reward_final,
               "resumed_from_step": resumed_from_step, "elapsed_s": result.elapsed_s,
               "method": cfg.controller.method}
    publish(run_dir, run.train)
    publish(model_files / "model", run.model)
    shutil.rmtree(model_files, ignore_errors=True)
    put_json(run.train_result, summary)
    return summary


def _train_outcome(run: RunRoot, summary: dict, *, run_dir: str, model_dir: str, curves_path: str) -> StageOutcome:
    """The train task's KFP outputs from a published training: the curves page (from `run_dir`'s
    metrics), the model pointer and the summary's numbers."""
    from amft_lib.reports import training_report_html

    Path(curves_path).write_text(training_report_html(run_dir, summary), encoding="utf-8")
    write_pointer(model_dir, run.model, method=summary["method"])
    out = StageOutcome(metadata={"model": {"uri": run.model, "method": summary["method"]}})
    out.add_metrics(summary)
    return out


def _launched_train_stage(run: RunRoot, cfg: Any, scale: ScaleOut, cluster: ClusterJob | None, *, init_model: str,
                          tracking_uri: str, resumed_from_step: int, run_dir: str, model_dir: str,
                          curves_path: str) -> StageOutcome:
    """Hand the workers their inputs through the run root, run them, and read back what rank 0 published."""
    from amft_lib import storage
    from amft_lib.config import config_to_dict
    from amft_lib.tracking import plugin_env

    _launch(run, TRAIN, scale, cluster, {"config": config_to_dict(cfg), "init_model": model_uri(init_model),
                                         "tracking_uri": tracking_uri, "resumed_from_step": resumed_from_step,
                                         "mlflow_plugin": plugin_env()})  # the KFP plugin's run, for rank 0
    summary = _read_json(run.train_result)
    storage.download_prefix(run.train, run_dir)
    return _train_outcome(run, summary, run_dir=run_dir, model_dir=model_dir, curves_path=curves_path)


def _launch(run: RunRoot, stage: str, scale: ScaleOut, cluster: ClusterJob | None, spec: dict[str, Any]) -> None:
    """Write `stage`'s launch spec under the run root and run its workers (torchrun here, or a TrainJob)."""
    from amft_lib import storage

    if scale.launcher == "trainjob":  # a TrainJob's pods see S3, not this pod's files
        if cluster is None:
            raise ScaleOutError("launcher=trainjob needs the cluster settings (image, secrets, GPU pool)")
        for what, uri in (("run root", run.uri), ("init model", spec["init_model"])):
            if not storage.is_s3(uri):
                raise ScaleOutError(f"{what} {uri}: a TrainJob's pods read their inputs from S3; use an s3:// run root")
    put_json(run.launch_spec(stage), spec)
    if scale.launcher == "trainjob":
        launch_trainjob(run, scale, cluster, stage=stage)
    else:
        run_torchrun(run, scale.nproc_per_node, stage=stage)


@contextlib.contextmanager
def _worker_inputs(run: RunRoot, stage: str) -> Iterator[tuple[dict[str, Any], int, dict, str, str]]:
    """What every rank of a launched `stage` starts from: (launch spec, rank, the data's splits, a local
    init model, a temp dir), all fetched from the run root."""
    from amft_lib import storage

    if not storage.exists(run.launch_spec(stage)):
        raise ScaleOutError(f"{run.launch_spec(stage)}: no launch spec (the {stage} task writes it before launching)")
    spec = _read_json(run.launch_spec(stage))
    from amft_lib.dataset import read_rows
    from amft_lib.model_source import allow_hub_downloads

    allow_hub_downloads(spec["config"]["model"]["allow_download"])
    rank = int(os.environ.get("RANK", "0"))
    with tempfile.TemporaryDirectory(prefix=f"amft-worker-{rank}-") as tmp:
        data = Path(tmp, "data")
        if not storage.download_prefix(run.data, data):
            raise ScaleOutError(f"{run.data}: no prepared data under the run root")
        gated = check_gated(run, data)
        yield spec, rank, read_rows(str(data), gated), stage_model(spec["init_model"], Path(tmp, "init_model")), tmp


def train_worker_stage(run: RunRoot) -> None:
    """One rank of a launched train stage (`amft stage train-worker`, under torchrun): read the launch
    spec, the data and the init model from the run root, call `run_train()` like every other rank (it sets
    up and tears down the process group), and on rank 0 publish what the in-pod path publishes."""
    from amft_lib.config import TrainConfig, config_from_dict
    from amft_lib.tracking import track_stage
    from amft_lib.trainer import run_train

    with _worker_inputs(run, TRAIN) as (spec, rank, splits, init_model, tmp):
        cfg = config_from_dict(spec["config"], TrainConfig)
        run_dir = Path(tmp, "run")
        tracking = (track_stage(spec.get("tracking_uri") or None, run.run_id, "train", spec["config"], run_dir,
                                artifact_root=run.mlflow_artifacts, checkpoint_root=run.uri,
                                plugin=spec.get("mlflow_plugin")) if rank == 0 else contextlib.nullcontext())
        with tracking:
            result = run_train(cfg, run_dir, init_model=init_model, splits=splits, progress=False,
                           checkpoint_root=run.uri, resume="auto")
        if rank == 0:  # only rank 0 wrote run_dir (metrics, model); every rank got the same result
            _publish_training(run, cfg, result, run_dir, resumed_from_step=int(spec.get("resumed_from_step", 0)))
            log.info("rank 0 published model/ and train/ to %s", run.uri)


def _read_json(uri: str) -> dict[str, Any]:
    from amft_lib.run.summary import read_json

    return read_json(uri)


def check_gated(run: RunRoot, dataset_dir: str | Path) -> str | None:
    """The dataset a GPU stage is about to read is the one the data gate passed: its card.json has the
    sha256 the gate recorded (and read_rows then checks every file against that card). Why: read_rows
    alone accepts a dataset whose files *and* card were rewritten together after the gate, since the
    card is the only reference it has; the gate record in the run root is a second, earlier one.

    Returns that sha256 for the stage to pass on as `read_rows(..., card_sha256=)`: checked here first so
    a changed dataset fails before a model is staged, and again on the bytes read_rows parses, so a card
    swapped in between is refused too. No gate record (a stage called outside the pipeline, e.g. in
    tests) is logged and allowed (None): the DAG never reaches a GPU stage without one."""
    from amft_lib import storage
    from amft_lib.data.schema import DataError
    from amft_lib.dataset import card_digest

    if not storage.exists(run.gate):
        log.warning("%s: no data-gate record; the dataset is not bound to a gate verdict", run.gate)
        return None
    gate = _read_json(run.gate)
    if gate.get("passed") is not True:
        raise DataError(f"{run.gate}: the data gate did not pass this run's dataset ({gate.get('failed_checks')})")
    digest = card_digest(dataset_dir)
    if gate.get("card_sha256") != digest:
        raise DataError(f"{Path(dataset_dir) / 'card.json'}: sha256 {digest[:12]}… is not the card the data gate "
                        f"validated ({str(gate.get('card_sha256'))[:12]}… in {run.gate}): the dataset changed after "
                        "the gate")
    return digest


def arm_train_fault(run: RunRoot) -> None:
    """Test hook (``AMFT_FAULT_KILL_TRAIN_AFTER_CHECKPOINT=1``): SIGKILL this process once, as soon as
    the first complete checkpoint is under the run root, to prove a retried task resumes from it.
    A marker object under the run root makes the retry (a fresh process) leave itself alone."""
    arm_fault(FAULT_ENV, run.uri, run.fault_marker)


def arm_fault(env: str, checkpoint_root: str, marker: str) -> None:
    """If ``$env`` is "1" and `marker` does not exist: SIGKILL this process once, as soon as the first
    complete checkpoint is under `checkpoint_root` (writing `marker` first, so the retry runs clean)."""
    if os.environ.get(env) != "1":
        return
    from amft_lib import checkpoint, storage

    if storage.exists(marker):
        return

    def watch() -> None:
        while True:
            with contextlib.suppress(Exception):
                if any(complete for _, _, complete in checkpoint.list_checkpoints(checkpoint_root)):
                    storage.put_bytes(marker, b"SIGKILL after the first complete checkpoint\n")
                    log.warning("fault injection: SIGKILL after the first checkpoint (%s)", env)
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.2)

    threading.Thread(target=watch, name="amft-fault", daemon=True).start()


# ── Stage 5: evaluate ───────────────────────────────────────────────────────────────────────────


def evaluate_stage(run: RunRoot, dataset_dir: str, config_json: str, *, model: str, base_model: str,
                   warm_start_model: str, train_run: str, registry_model_name: str, registry_tracking_uri: str,
                   metric: str, threshold: float, max_regression: float, pass_k: int, n_samples: int,
                   max_examples: int, html_path: str, markdown_path: str,
                   warm_start_check: bool = True) -> StageOutcome:
    """Score the candidate against base, warm start and champion into `<run>/eval/`; `value` is the
    blessing. Decoding follows the training config (max_new_tokens, chat template, seed, device)."""
    from amft_lib import storage
    from amft_lib.config import TrainConfig, config_from_dict
    from amft_lib.evaluate import EvalConfig, run_evaluate

    cfg = config_from_dict(json.loads(config_json), TrainConfig)  # typed and validated, as the train stage reads it
    gated = check_gated(run, dataset_dir)
    # the models by their run-root URIs (what the report and metrics.json name); evaluate stages them
    result = run_evaluate(EvalConfig(
        model=model_uri(model), data=dataset_dir, data_card_sha256=gated, out_dir=run.eval,
        base_model=model_uri(base_model),
        warm_start_model=model_uri(warm_start_model), champion_model=f"models:/{registry_model_name}@champion",
        run_dir=train_run, tracking_uri=registry_tracking_uri or None, metric=metric, threshold=threshold,
        max_regression=max_regression, warm_start_check=warm_start_check, pass_k=pass_k, n_samples=n_samples,
        max_examples=max_examples, max_new_tokens=cfg.rollout.max_new_tokens, chat_template=cfg.model.chat_template,
        seed=cfg.seed, device=cfg.device, engine=cfg.engine, score_cache=run.score_cache))
    storage.get_file(run.path("eval", "report.html"), html_path)
    storage.get_file(run.path("eval", "report.md"), markdown_path)
    out = StageOutcome(value=result.blessed, metadata={"report": {"reason": result.reason}})
    for split in ("test_id", "test_ood"):
        fields = ("accuracy", "pass_at_k", "format_error_rate")
        out.add_metrics({f: (result.metrics.get(split) or {}).get(f) for f in fields}, f"{split}_")
    out.metrics["blessed"] = 1.0 if result.blessed else 0.0
    return out


# ── Stage 6: register ───────────────────────────────────────────────────────────────────────────


def register_stage(run: RunRoot, model_dir: str, *, s3_root: str, registry_model_name: str,
                   registry_tracking_uri: str, registry_artifact_root: str, registry_alias: str = "champion") -> Any:
    """Write the lineage record, register the blessed model (idempotent on the run id) and record
    what happened in `<run>/registry.json`. Returns the registry's RegisterResult."""
    from amft_lib import storage
    from amft_lib.registry import read_eval_metrics, register_model
    from amft_lib.run.summary import record_registry_copy, write_run_lineage

    lineage_uri = write_run_lineage(run)
    with tempfile.TemporaryDirectory(prefix="amft-register-") as tmp:
        result = register_model(
            open_model(model_dir, tmp), read_eval_metrics(run.eval), registry_model_name, run.run_id,
            lineage_uri=lineage_uri, tracking_uri=registry_tracking_uri or None,
            artifact_root=registry_artifact_root or storage.join(s3_root.rstrip("/"), "mlflow"), alias=registry_alias)
    record_registry_copy(lineage_uri, result, registry_tracking_uri or None)  # hash what the registry serves
    put_json(run.registry, {
        "registered": result.registered, "name": result.name, "version": result.version, "created": result.created,
        "model_uri": result.model_uri, "alias_moved": result.alias_moved, "reason": result.reason,
        "alias": result.alias, "logged_model_id": result.logged_model_id})
    return result


# ── exit handler: run summary ───────────────────────────────────────────────────────────────────


def summary_stage(s3_root: str, run_id: str, job_id: str, *, state: str, error: str, kfp_job: str,
                  markdown_path: str) -> dict[str, Any]:
    """Summarise the run into `markdown_path` and `<run>/summary.json`; never fails because of what
    the run left behind (S3 down is reported in the artifact, not raised)."""
    from amft_lib import storage
    from amft_lib.run.summary import summarize_run, summary_markdown

    result = summarize_run(s3_root, run_id, job_id, state, error)
    result["kfp_job"] = kfp_job
    Path(markdown_path).write_text(summary_markdown(result), encoding="utf-8")
    if result.get("run_root"):
        with contextlib.suppress(storage.StorageError):
            put_json(RunRoot.at(result["run_root"]).summary, result)
    return result
