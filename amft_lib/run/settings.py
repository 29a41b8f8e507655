"""The pipeline's settings, in one table: name, type, default, one-line help, UI group, and which
config key(s) each one sets.

Why a table: the KFP run form, `amft pipeline params`, preflight's config building and the
pipeline docstring (where KFP takes each parameter's description from) all need the same facts.
Copied by hand they drifted (four defaults for `mu_init`); now each is derived from, or checked
against, `SETTINGS`:

- the pipeline signature in `pipelines/amft_pipeline.py` stays explicit (kfp reads real annotations
  and literal defaults), and `tests/unit/test_settings.py` fails when it disagrees with the table;
- `build_configs` turns parameter values into the warm-start and training configs by walking the
  table, so a new setting is one row, not five edits;
- `pipeline_docstring()` renders the `Args:` section KFP copies into the IR as descriptions.

A default of `FROM_CONFIG` means "whatever the config dataclass says" (one source of truth); a
literal default is a deliberate cluster-side choice and its help says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from amft_lib.config import (
    BASELINES,
    ConfigError,
    TrainConfig,
    WarmStartConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)

WARM_START, TRAIN = "warm_start", "train"
STAGE_CONFIGS = {WARM_START: WarmStartConfig, TRAIN: TrainConfig}
OVERRIDES = "*"  # a `list` setting of KEY=VALUE strings applied to the stage's config after the named keys
FROM_CONFIG = object()

GROUPS = {
    "p0": "run, storage, credentials, GPU pool",
    "p1": "data",
    "p2": "validation gate",
    "p3": "base model and warm start",
    "p4": "AMFT training",
    "p5": "evaluation and blessing",
    "p6": "registry",
}


@dataclass(frozen=True)
class Setting:
    """One pipeline parameter. `keys` maps a stage ("warm_start", "train") to the dotted config key
    the value sets there, or to `OVERRIDES` for KEY=VALUE lists; empty for run-level settings."""

    name: str
    type: type
    default: Any
    help: str
    keys: Mapping[str, str] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return GROUPS[self.name.split("_", 1)[0]]


def _s(name: str, tp: type, default: Any, text: str, **keys: str) -> Setting:
    return Setting(name, tp, default, text, keys)


BOTH = {WARM_START: OVERRIDES, TRAIN: OVERRIDES}

_TABLE: tuple[Setting, ...] = (
    # ── p0: run, storage, credentials, GPU pool ──
    _s("p0_run_id", str, "", "Run id; empty uses the KFP job id. Reuse an earlier id to continue that run "
       "(training resumes from its checkpoints)."),
    _s("p0_s3_root", str, "s3://amft/pipelines", "S3 prefix runs go under; a run's files are in "
       "<s3_root>/runs/<run id>/."),
    _s("p0_s3_endpoint_url", str, "", "S3 endpoint for non-AWS stores (SeaweedFS, MinIO); empty uses the "
       "environment's."),
    _s("p0_s3_secret", str, "amft-s3", "Kubernetes secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."),
    _s("p0_registry_secret", str, "amft-registry", "Kubernetes secret with MLflow credentials (optional keys)."),
    _s("p0_lineage_secret", str, "amft-lineage", "Kubernetes secret with AMFT_LINEAGE_SECRET_KEY (optional): the "
       "register stage signs the lineage record with it (HMAC-SHA256); `amft lineage --verify` given the same key "
       "checks the signature."),
    _s("p0_gpu_count", int, 1, "GPUs per GPU task (warm start, train)."),
    _s("p0_gpu_cpu_request", str, "8", "CPU request of a GPU task."),
    _s("p0_gpu_memory_request", str, "32Gi", "Memory request of a GPU task."),
    _s("p0_gpu_memory_gib", float, 80.0, "Memory of one GPU (GiB): preflight refuses a warm-start or training plan "
       "whose estimated need (weights, grads, AdamW, meta step, activations) exceeds it."),
    _s("p0_gpu_node_selector", dict, {"nvidia.com/gpu.present": "true"}, "Node selector of the GPU pool."),
    _s("p0_gpu_tolerations", list, [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
       "Tolerations of the GPU pool's taints."),
    _s("p0_trainjob_timeout_h", float, 72.0, "Longest a scale-out TrainJob (warm start or train on more than one "
       "process) may run: then the launcher deletes it and fails the task; checkpoints stay, and a retry resumes."),
    _s("p0_kueue_queue", str, "", "Kueue LocalQueue of the GPU work: label kueue.x-k8s.io/queue-name on every "
       "TrainJob and GPU task pod; empty: no label (no Kueue). KFP fixes pod labels when the pipeline is compiled, "
       "so the GPU task pods carry the queue `amft pipeline compile --kueue-queue` gave (this default); a run's value "
       "labels its TrainJobs."),
    _s("p0_kueue_priority_class", str, "", "Kueue WorkloadPriorityClass (label kueue.x-k8s.io/priority-class, "
       "needs p0_kueue_queue), applied like the queue; empty: the queue's default priority."),
    # ── p1: data ──
    _s("p1_data_task", str, FROM_CONFIG, "Task: general_points or countdown (generated), or math (ingested from "
       "input_uri).",
       warm_start="data.task", train="data.task"),
    _s("p1_data_input_uri", str, "", "User JSONL/parquet (local path or s3://); empty generates General Points."),
    _s("p1_data_train_size", int, 8000, "Generated training rows."),
    _s("p1_data_val_size", int, 200, "Generated validation rows."),
    _s("p1_data_test_id_size", int, 200, "Generated in-distribution test rows."),
    _s("p1_data_test_ood_size", int, 200, "Generated out-of-distribution test rows."),
    _s("p1_data_seed", int, 1234, "Generator and split-hash seed."),
    # ── p2: validation gate ──
    _s("p2_validate_min_rows", dict, {"train": 100, "val": 10, "test_id": 10}, "Minimum rows per split."),
    _s("p2_validate_max_prompt_tokens", int, 2048, "Longest prompt accepted (characters without a tokenizer)."),
    # ── p3: base model and warm start ──
    _s("p3_model_name", str, "smollm2-135m", "Base model: tiny, smollm2-135m, an HF directory in the pod (e.g. a PVC "
       "mount), s3://bucket/prefix/ of an HF directory, or a hub id with p3_model_allow_download. The cluster default "
       "is the pretrained model (the configs' default `tiny` is for tests).",
       warm_start="model.name", train="model.name"),
    _s("p3_model_allow_download", bool, FROM_CONFIG, "Allow a model-hub id as p3_model_name (downloaded at load "
       "time); off, runs are offline and a hub id is refused.", warm_start="model.allow_download",
       train="model.allow_download"),
    _s("p3_model_settings", list, ["model.lora=true", "model.chat_template=true", "engine.precision=bf16-mixed"],
       "KEY=VALUE applied to both configs (model.*, engine.*, device).", **BOTH),
    _s("p3_model_max_new_tokens", int, FROM_CONFIG, "Longest completion (tokens) in rejection sampling and rollouts.",
       warm_start="max_new_tokens", train="rollout.max_new_tokens"),
    _s("p3_warm_start_warmup_steps", int, FROM_CONFIG, "W: SFT steps on demonstrations before rejection sampling.",
       warm_start="warmup_steps"),
    _s("p3_warm_start_final_sft_steps", int, FROM_CONFIG, "SFT steps on demonstrations ∪ accepted samples.",
       warm_start="final_sft_steps"),
    _s("p3_warm_start_rs_samples", int, FROM_CONFIG, "k: completions sampled per prompt in rejection sampling.",
       warm_start="rs_samples"),
    _s("p3_warm_start_rs_max_prompts", int, 256, "Training prompts sampled in rejection sampling (0: all); capped "
       "on the cluster so the warm start's GPU time is bounded.", warm_start="rs_max_prompts"),
    _s("p3_warm_start_checkpoint_every", int, 50, "Warm-start steps (SFT steps; a rejection-sampling chunk counts "
       "as one) between checkpoints to <run root>/warm_start/checkpoints/, plus one at each phase's end; a retried "
       "task resumes from the newest. 0: none (the config's default, for tests).", warm_start="checkpoint_every"),
    _s("p3_warm_start_num_nodes", int, 1, "Warm-start nodes; with p3_warm_start_nproc_per_node as for training "
       "(p4_train_num_nodes): more than one process in all runs as a TrainJob on the cluster."),
    _s("p3_warm_start_nproc_per_node", int, 1, "Warm-start processes per node (locally: torchrun --standalone)."),
    _s("p3_warm_start_distributed_strategy", str, "auto", "How several warm-start processes share the work: auto, "
       "ddp, fsdp or none (as p4_train_distributed_strategy).", warm_start="distributed.strategy"),
    _s("p3_warm_start_overrides", list, [], "KEY=VALUE for any other warm-start config key.",
       warm_start=OVERRIDES),
    # ── p4: AMFT training ──
    _s("p4_train_method", str, FROM_CONFIG, f"amft, or a baseline: {', '.join(BASELINES)}.",
       train="controller.method"),
    _s("p4_train_max_steps", int, 200, "Training steps (one rollout batch + one SFT batch each).", train="max_steps"),
    _s("p4_train_lr", float, FROM_CONFIG, "Peak AdamW learning rate.", train="optim.lr"),
    _s("p4_train_mu_init", float, FROM_CONFIG, "Initial μ (weight of the SFT loss).", train="controller.mu_init"),
    _s("p4_train_mu_min", float, FROM_CONFIG, "Lower bound of μ.", train="controller.mu_min"),
    _s("p4_train_mu_max", float, FROM_CONFIG, "Upper bound of μ.", train="controller.mu_max"),
    _s("p4_train_eta_mu", float, FROM_CONFIG, "η_μ: step size of the meta-gradient term.", train="controller.eta_mu"),
    _s("p4_train_eta_h", float, FROM_CONFIG, "η_H: step size of the entropy term η_H·(H* − H).",
       train="controller.eta_h"),
    _s("p4_train_meta_interval", int, FROM_CONFIG, "T_meta: steps between meta-gradients.",
       train="controller.meta_interval"),
    _s("p4_train_checkpoint_every", int, 20, "Steps between checkpoints to the run root (a retried task resumes "
       "from the newest); the config's 0 (never) is for tests.", train="checkpoint_every"),
    _s("p4_train_num_nodes", int, 1, "Training nodes. With p4_train_nproc_per_node, more than one process in all "
       "runs training as a Kubeflow Trainer TrainJob of nodes × processes on the cluster (a local run has one "
       "node); 1 × 1 trains in the task's own pod."),
    _s("p4_train_nproc_per_node", int, 1, "Training processes per node (one per GPU on the cluster; locally "
       "`torchrun --standalone` starts this many)."),
    _s("p4_train_distributed_strategy", str, "auto", "How several processes share the training: auto (ddp when "
       "there is more than one process, else none), ddp, fsdp, or none (refused with more than one process). "
       "The config's default is none; auto here so p4_train_num_nodes/p4_train_nproc_per_node alone scale out.",
       train="distributed.strategy"),
    _s("p4_train_seed", int, FROM_CONFIG, "Seed of both the warm start and training.", warm_start="seed", train="seed"),
    _s("p4_train_overrides", list, [], "KEY=VALUE for any other training config key.", train=OVERRIDES),
    # ── p5: evaluation and blessing ──
    _s("p5_eval_metric", str, "test_id.accuracy", "Gating metric SPLIT.FIELD."),
    _s("p5_eval_threshold", float, 0.0, "Blessed only when the gating metric is at least this."),
    _s("p5_eval_max_regression", float, 0.0, "Largest drop allowed vs the champion on any split."),
    _s("p5_eval_warm_start_check", bool, True, "Not blessed when the candidate is significantly worse than the "
       "warm start it trained from: per-instance paired bootstrap on the gating metric's split, 95 % interval of "
       "candidate − warm start below 0 (a first run's threshold alone once registered a model training had made "
       "worse). No significant change: the threshold and champion rules decide."),
    _s("p5_eval_pass_k", int, 4, "k of pass@k."),
    _s("p5_eval_n_samples", int, 8, "Sampled completions per prompt for pass@k (0: greedy only)."),
    _s("p5_eval_max_examples", int, 0, "Prompts per split (0: all)."),
    # ── p6: registry ──
    _s("p6_registry_model_name", str, "amft-gp", "Registered model name; the blessed version gets @champion."),
    _s("p6_registry_tracking_uri", str, "", "MLflow tracking URI; empty uses $MLFLOW_TRACKING_URI."),
    _s("p6_registry_artifact_root", str, "", "Artifact root of a new MLflow experiment; empty: <s3_root>/mlflow."),
    _s("p6_registry_alias", str, "champion", "Alias the blessed version gets: champion (it serves at once), or e.g. "
       "candidate to leave @champion to an approval (the Airflow DAG's approve step, or "
       "amft_lib.registry.promote)."),
)


def _config_default(stage: str, key: str) -> Any:
    value: Any = config_to_dict(STAGE_CONFIGS[stage]())
    for part in key.split("."):
        value = value[part]
    return value


def _resolve(setting: Setting) -> Setting:
    if setting.default is not FROM_CONFIG:
        return setting
    stage, key = next(iter(setting.keys.items()))
    return dataclasses.replace(setting, default=_config_default(stage, key))


SETTINGS: dict[str, Setting] = {s.name: _resolve(s) for s in _TABLE}


def defaults() -> dict[str, Any]:
    """{name: default} of every pipeline parameter (copies, so callers may mutate them)."""
    import copy

    return {name: copy.deepcopy(s.default) for name, s in SETTINGS.items()}


def build_configs(values: Mapping[str, Any]) -> tuple[WarmStartConfig, TrainConfig]:
    """(WarmStartConfig, TrainConfig) from pipeline parameter values, validated.

    Order per stage: dataclass defaults → every named setting (table order) → KEY=VALUE lists
    (`p3_model_settings` first, then the stage's own overrides). Later wins, so the override
    lists are the escape hatch for any key the run form does not name. Missing names take the
    table default; unknown names are an error. Raises ConfigError naming the parameter.
    """
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown pipeline setting(s) {unknown}; `amft pipeline params` lists them")
    merged = {**defaults(), **values}
    configs = []
    for stage, cls in STAGE_CONFIGS.items():
        data = config_to_dict(cls())
        overrides: list[str] = []
        for setting in SETTINGS.values():
            key = setting.keys.get(stage)
            if not key:
                continue
            value = merged[setting.name]
            if key == OVERRIDES:
                if not isinstance(value, Sequence) or isinstance(value, str):
                    raise ConfigError(f"{setting.name}={value!r}: expected a list of KEY=VALUE strings")
                overrides += [str(v) for v in value]
                continue
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                node = node[part]
            node[leaf] = value
        try:
            configs.append(apply_overrides(config_from_dict(data, cls), overrides))
        except ConfigError as exc:
            raise ConfigError(f"{stage} config: {exc}") from None
    warm_start, train = configs
    # H* is compared with the training rollouts' entropy, which grows with temperature: the warm start
    # measures it at the rollout temperature (one source: rollout.temperature), never at its own default
    return dataclasses.replace(warm_start, entropy_temperature=train.rollout.temperature), train


def config_settings() -> list[str]:
    """Names of the settings that feed a stage config (what preflight must receive)."""
    return [name for name, s in SETTINGS.items() if s.keys]


def pipeline_docstring(summary: str) -> str:
    """`summary` plus a Google-style `Args:` section from the table; KFP turns each entry into the
    parameter's `description` in the compiled IR (what the KFP UI shows beside the run form)."""
    lines = [summary.rstrip(), "", "Args:"]
    for name, setting in SETTINGS.items():
        lines.append(f"    {name}: [{setting.group}] {setting.help}")
    return "\n".join(lines) + "\n"
