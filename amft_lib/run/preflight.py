"""Preflight: everything that can fail before a GPU is requested (research anchors F.1).

Checks the run id, both stage configs (built from the pipeline settings), S3 write/read/delete
under the run root, the registry, the base model and the input data. Every check runs even after
a failure, so one report lists every problem; the preflight component fails the task afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from amft_lib.run import scale_out
from amft_lib.run.layout import RunRoot, put_json
from amft_lib.run.settings import SETTINGS, build_configs


@dataclasses.dataclass
class Check:
    """One preflight check: a name, whether it passed, and a one-line detail (never a secret)."""

    name: str
    ok: bool
    detail: str


@dataclasses.dataclass
class Preflight:
    """The checks, and — only when all passed — the resolved run, both configs as JSON, and what each
    GPU stage's own task pod requests (keyed by stage: warm_start, train, evaluate)."""

    checks: list[Check]
    run: RunRoot | None = None
    warm_start_config: str = ""
    train_config: str = ""
    pods: dict[str, scale_out.PodRequest] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]


def run_preflight(params: Mapping[str, Any], *, job_id: str = "") -> Preflight:
    """Run every check for the pipeline parameters `params` (names from the settings table; missing
    ones take their defaults). Writes `preflight.json` under the run root when all checks pass."""
    from amft_lib import lineage, storage
    from amft_lib.config import config_to_dict

    values = {name: params.get(name, SETTINGS[name].default) for name in SETTINGS}
    result = Preflight(checks=[])

    def attempt(name: str, fn: Callable[[], tuple[Any, str]]) -> Any:
        try:
            value, detail = fn()
        except Exception as exc:  # a failed check is a result, reported with its cause
            detail = lineage.redact_text(" ".join(str(exc).split()) or type(exc).__name__)
            result.checks.append(Check(name, False, detail))
            return None
        result.checks.append(Check(name, True, detail))
        return value

    run = attempt("run id", lambda: (RunRoot.resolve(values["p0_s3_root"], values["p0_run_id"], job_id),
                                     values["p0_run_id"] or job_id))
    config_values = {name: values[name] for name, s in SETTINGS.items() if s.keys}
    configs = attempt("config", lambda: (check_stage_parameters(config_values),
                                         "warm-start and training configs are valid"))

    def probe_s3() -> tuple[bool, str]:
        probe = run.path(f".preflight-{uuid.uuid4().hex[:8]}")
        payload = b"amft preflight\n"
        storage.put_bytes(probe, payload)
        try:
            if storage.get_bytes(probe) != payload:
                raise RuntimeError(f"{probe}: read back different bytes")
        finally:
            storage.delete(probe)
        from amft_lib import checkpoint

        done = [step for step, _, complete in checkpoint.list_checkpoints(run.uri) if complete]
        resume = f"; existing checkpoints up to step {max(done)} (training will resume)" if done else ""
        return True, f"write/read/delete under {run.uri} ok{resume}"

    if run is not None:
        attempt("s3", probe_s3)

    def probe_registry() -> tuple[bool, str]:
        from amft_lib import registry

        uri = values["p6_registry_tracking_uri"] or registry.default_tracking_uri()
        registry.check_reachable(uri)  # one line within seconds, not MLflow's retries
        registry.get_client(uri).search_registered_models(max_results=1)
        return True, f"reachable at {lineage.redact_text(uri)}"

    attempt("registry", probe_registry)

    def probe_model() -> tuple[bool, str]:
        from amft_lib.model_source import probe_model_source

        return True, probe_model_source(values["p3_model_name"], values["p3_model_allow_download"])

    attempt("base model", probe_model)
    if configs is not None:
        def probe_memory() -> tuple[bool, str]:
            from amft_lib.memory import probe_training_memory

            if all(cfg.device == "cpu" for cfg in configs):
                return True, "skipped: both stages run on CPU (device=cpu)"
            details = []
            for stage, cfg in ((scale_out.WARM_START, configs[0]), (scale_out.TRAIN, configs[1])):
                world = stage_world_size(values, stage)  # FSDP2 shards the state over nodes × processes per node
                details.append(f"{stage.replace('_', ' ')}: "
                               f"{probe_training_memory(cfg, values['p0_gpu_memory_gib'], world_size=world)}")
            return True, "; ".join(details)

        attempt("gpu memory", probe_memory)

        def probe_scale_out() -> tuple[bool, str]:
            timeout_h = values["p0_trainjob_timeout_h"]
            if not (isinstance(timeout_h, int | float) and 0 < timeout_h < float("inf")):
                raise scale_out.ScaleOutError(f"p0_trainjob_timeout_h={timeout_h!r}: must be a number of hours > 0")
            details = []
            for stage, cfg in ((scale_out.WARM_START, configs[0]), (scale_out.TRAIN, configs[1])):
                prefix, strategy = scale_out.PARAMETER_PREFIX[stage], cfg.distributed.strategy
                scale = scale_out.check_scale_out(values[f"{prefix}_num_nodes"], values[f"{prefix}_nproc_per_node"],
                                                  strategy, "trainjob", gpus_per_node=values["p0_gpu_count"],
                                                  stage=stage)
                details.append(f"{stage}: 1 process (in the task's pod)" if scale.world_size == 1 else
                               f"{stage}: {scale.num_nodes} node(s) × {scale.nproc_per_node} process(es) ({strategy}), "
                               "launched by the task (TrainJob on a cluster, torchrun locally; the task's own pod "
                               "requests no GPU)")
            return True, "; ".join(details)

        attempt("scale-out", probe_scale_out)

    if values.get("p0_kueue_queue"):
        from amft_lib.run.kueue import probe_kueue

        attempt("kueue", lambda: (True, probe_kueue(values["p0_kueue_queue"], values["p0_kueue_priority_class"])))
    data_uri = values["p1_data_input_uri"]
    if data_uri:
        def probe_data() -> tuple[bool, str]:
            if not storage.exists(data_uri):
                raise FileNotFoundError(f"p1_data_input_uri={data_uri}: input data not found")
            return True, f"{data_uri} exists"

        attempt("input data", probe_data)

    if result.passed:
        result.run = run
        result.warm_start_config = json.dumps(config_to_dict(configs[0]), sort_keys=True)
        result.train_config = json.dumps(config_to_dict(configs[1]), sort_keys=True)
        result.pods = task_pods(values)
        put_json(run.preflight, {"checks": [dataclasses.asdict(c) for c in result.checks], "run_id": run.run_id,
                                 "warm_start_config": config_to_dict(configs[0]),
                                 "train_config": config_to_dict(configs[1])})
    return result


def check_stage_parameters(params: Mapping[str, Any]) -> tuple[Any, Any]:
    """The (warm-start, training) configs of the stage parameters in `params`, validated; else a
    ConfigError that names the pipeline parameter at fault (e.g. ``p4_train_overrides: train config:
    override 'foo=1': unknown key 'foo'``).

    Why a function of its own: it needs nothing but the parameters, so `amft pipeline run-local`
    and `submit|schedule` call it before any service starts or any request is sent (a bad override
    used to fail only in the run, after S3 and MLflow had started), and preflight runs it again on
    the cluster. The combination is what counts; only when it fails is each changed parameter tried
    alone (others at their defaults) to name the one to fix, so a valid combination is never refused.
    """
    from amft_lib.config import ConfigError

    values = {name: value for name, value in params.items() if name in SETTINGS and SETTINGS[name].keys}
    try:
        return build_configs(values)
    except ConfigError as exc:
        combined = exc
    for name, value in values.items():
        if value == SETTINGS[name].default:
            continue
        try:
            build_configs({name: value})
        except ConfigError as exc:
            raise ConfigError(f"{name}: {' '.join(str(exc).split())}") from None
    changed = [name for name, value in values.items() if value != SETTINGS[name].default]
    raise ConfigError(f"pipeline parameters {', '.join(changed) or '(defaults)'}: "
                      f"{' '.join(str(combined).split())}") from None


def task_pods(values: Mapping[str, Any]) -> dict[str, scale_out.PodRequest]:
    """Each GPU stage task's pod request for these (checked) settings: a stage that runs more than one
    process launches them and needs no GPU itself; evaluation always runs in its pod."""
    shape = values["p0_gpu_count"], values["p0_gpu_cpu_request"], values["p0_gpu_memory_request"]
    pods = {stage: scale_out.task_pod(stage_world_size(values, stage), *shape)
            for stage in (scale_out.WARM_START, scale_out.TRAIN)}
    pods["evaluate"] = scale_out.task_pod(1, *shape)
    return pods


def stage_world_size(values: Mapping[str, Any], stage: str) -> int:
    """Processes a GPU stage runs: its pipeline parameters' nodes × processes per node."""
    prefix = scale_out.PARAMETER_PREFIX[stage]
    return values[f"{prefix}_num_nodes"] * values[f"{prefix}_nproc_per_node"]


def checks_markdown(checks: Sequence[Check]) -> str:
    """The preflight report shown in the KFP UI."""
    ok = all(c.ok for c in checks)
    lines = [f"# Preflight: {'passed' if ok else 'FAILED'}", "", "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c.name} | {'ok' if c.ok else '**failed**'} | {c.detail.replace('|', '/')} |" for c in checks]
    return "\n".join(lines) + "\n"
