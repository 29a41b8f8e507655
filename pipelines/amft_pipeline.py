"""The AMFT retraining pipeline (Kubeflow Pipelines v2).

    preflight → prepare data → validate (gate) → warm start (GPU) → train (GPU) → evaluate → register (gate)
    exit handler: run summary

Warm start and training scale out (p3_warm_start_* / p4_train_ num_nodes × nproc_per_node): one
process runs in the task's pod; more run as a Kubeflow Trainer v2 TrainJob the task launches and
watches (cluster) or under a local torchrun (run-local). See amft_lib.run.scale_out.

Two variants are built from one definition, because what a cluster needs cannot run locally:

- `amft_pipeline` (cluster; compiled to amft_pipeline.yaml by `amft pipeline compile`): GPU requests,
  CPU/memory requests, node selector and tolerations for the GPU pool, /dev/shm, and S3/registry
  credentials from Kubernetes secrets (kfp-kubernetes).
- `amft_pipeline_local` (`amft pipeline run-local`): the same tasks, gates, retries and caching
  settings without those. kfp.local ignores resource setters (with a warning) and cannot apply
  kfp-kubernetes platform config; locally the tasks inherit S3 and registry settings from the
  environment that `run-local` sets up.

Every stage's caching is off: each one writes into the run's S3 root keyed by the run id, and a
cache hit would skip that write and leave the run root incomplete.
"""

# No `from __future__ import annotations`: KFP reads the pipeline signature's real types.
from typing import Any

from kfp import dsl, kubernetes

from amft_lib.lineage import SIGNING_KEY_ENV
from amft_lib.run.settings import pipeline_docstring
from amft_lib.run.trainjob import kueue_labels
from components import CPU_IMAGE, CUDA_IMAGE
from components.evaluate import evaluate
from components.preflight import preflight
from components.prepare_data import prepare_data
from components.register import register
from components.run_summary import run_summary
from components.stop_run import stop_run
from components.train import train
from components.validate_data import validate_data
from components.warm_start import warm_start

PIPELINE_NAME = "amft-pipeline"
# The pipeline parameters preflight takes under their own names (it turns them into stage configs).
PREFLIGHT_INPUTS = frozenset(preflight.component_spec.inputs) - {"job_id"}

# CPU-side requests are fixed; the GPU stages' are pipeline parameters (node pools differ most there).
CPU_REQUEST, MEMORY_REQUEST = "1", "4Gi"

SUMMARY = """AMFT retraining: preflight → prepare data → validate (gate) → warm start (GPU) → train (GPU,
checkpoints + μ history to s3://…/runs/RUN_ID, resume auto) → evaluate (vs base, warm start,
champion) → register if blessed; the run summary runs whatever happened. Parameters are grouped by
phase (p0 … p6); *_overrides take KEY=VALUE for any config key not listed."""


def build_pipeline(target: str = "cluster", kueue_queue: str = "", kueue_priority_class: str = "") -> Any:
    """The pipeline for `target` "cluster" (everything) or "local" (what kfp.local can run).

    `kueue_queue` / `kueue_priority_class` become Kueue's labels on every GPU task pod and the defaults
    of p0_kueue_queue / p0_kueue_priority_class (which label the TrainJobs at run time). Compile time,
    because KFP's pod labels are literals in the compiled spec (kfp-kubernetes' `add_pod_label` takes a
    string; the platform spec's pod_metadata is a map of strings): a run parameter cannot reach them."""
    if target not in ("cluster", "local"):
        raise ValueError(f"target={target!r}: choose cluster or local")
    cluster = target == "cluster"
    pod_labels = kueue_labels(kueue_queue, kueue_priority_class, queue_param="--kueue-queue",
                              priority_param="--kueue-priority-class")
    # A GPU task that died is usually a lost node or preemption: give the cluster a minute to
    # reschedule. kfp.local sleeps the backoff too, and locally there is nothing to wait for.
    gpu_backoff = "60s" if cluster else "1s"

    def cpu_task(task: Any, cpu: str = CPU_REQUEST, memory: str = MEMORY_REQUEST) -> None:
        if cluster:
            task.set_cpu_request(cpu).set_memory_request(memory)

    def gpu_task(task: Any, pre: Any, stage: str, node_selector: Any, tolerations: Any) -> None:
        """Place `task` on the GPU pool with the pod request preflight resolved for `stage` (string
        outputs, which is what KFP's driver reads for resources): the GPU shape when the stage runs
        in its pod, no GPU when it only launches a TrainJob."""
        if cluster:
            gpus, cpu, memory = (pre.outputs[f"{stage}_{field}"] for field in ("gpus", "cpu", "memory"))
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
            task.set_cpu_request(cpu).set_memory_request(memory)
            # resource setters do not register their channels as the task's inputs, so the enclosing
            # condition/exit-handler DAGs would not receive preflight's outputs (compile fails)
            task.register_pipeline_channels([gpus, cpu, memory])
            kubernetes.add_node_selector_json(task, node_selector)
            kubernetes.add_toleration_json(task, tolerations)
            # NCCL and DataLoader workers need more shared memory than a pod's 64 MiB default
            kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
            for key, value in pod_labels.items():  # Kueue admits the pod through its queue (none: no label)
                kubernetes.add_pod_label(task, key, value)

    def scale_out(num_nodes: Any, nproc_per_node: Any, s3_secret: Any, gpus: Any, cpu: Any, memory: Any,
                  node_selector: Any, tolerations: Any, timeout_h: Any, queue: Any, priority_class: Any,
                  **extra: Any) -> dict[str, Any]:
        """A GPU stage's scale-out inputs: more than one process runs as a TrainJob on the GPU pool on a
        cluster (needs pipelines/rbac/trainjob-launcher.yaml), a local torchrun otherwise; the task fills
        its outputs from the run root either way (amft_lib.run.scale_out)."""
        args = dict(num_nodes=num_nodes, nproc_per_node=nproc_per_node)
        if cluster:
            args.update(launcher="trainjob", image=CUDA_IMAGE, s3_secret=s3_secret, gpus_per_node=gpus,
                        cpu_per_node=cpu, memory_per_node=memory, node_selector=node_selector,
                        tolerations=tolerations, trainjob_timeout_h=timeout_h, kueue_queue=queue,
                        kueue_priority_class=priority_class, **extra)
        return args

    def secrets(task: Any, s3_secret: Any, registry_secret: Any = None, lineage_secret: Any = None) -> None:
        """S3 keys (required), registry credentials and the lineage signing key (optional) from Kubernetes
        secrets, as env vars: only the secret's name is compiled in, never a value."""
        if cluster:
            kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
            if registry_secret is not None:
                kubernetes.use_secret_as_env(task, secret_name=registry_secret, optional=True, secret_key_to_env={
                    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN"})
            if lineage_secret is not None:  # absent: the record is written unsigned, `--verify` says so
                kubernetes.use_secret_as_env(task, secret_name=lineage_secret, optional=True,
                                             secret_key_to_env={SIGNING_KEY_ENV: SIGNING_KEY_ENV})

    def amft_pipeline(
        # ── phase 0: run, storage, credentials, GPU pool ──
        p0_run_id: str = "",
        p0_s3_root: str = "s3://amft/pipelines",
        p0_s3_endpoint_url: str = "",
        p0_s3_secret: str = "amft-s3",
        p0_registry_secret: str = "amft-registry",
        p0_lineage_secret: str = "amft-lineage",
        p0_gpu_count: int = 1,
        p0_gpu_cpu_request: str = "8",
        p0_gpu_memory_request: str = "32Gi",
        p0_gpu_memory_gib: float = 80.0,
        p0_gpu_node_selector: dict = {"nvidia.com/gpu.present": "true"},  # noqa: B006 (a KFP default)
        p0_gpu_tolerations: list = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],  # noqa: B006
        p0_trainjob_timeout_h: float = 72.0,
        p0_kueue_queue: str = kueue_queue,
        p0_kueue_priority_class: str = kueue_priority_class,
        # ── phase 1: data ──
        p1_data_task: str = "general_points",
        p1_data_input_uri: str = "",
        p1_data_train_size: int = 8000,
        p1_data_val_size: int = 200,
        p1_data_test_id_size: int = 200,
        p1_data_test_ood_size: int = 200,
        p1_data_seed: int = 1234,
        # ── phase 2: validation gate ──
        p2_validate_min_rows: dict = {"train": 100, "val": 10, "test_id": 10},  # noqa: B006
        p2_validate_max_prompt_tokens: int = 2048,
        # ── phase 3: base model and warm start ──
        p3_model_name: str = "smollm2-135m",
        p3_model_allow_download: bool = False,
        p3_model_settings: list = ["model.lora=true", "model.chat_template=true", "engine.precision=bf16-mixed"],  # noqa: B006
        p3_model_max_new_tokens: int = 128,
        p3_warm_start_warmup_steps: int = 300,
        p3_warm_start_final_sft_steps: int = 100,
        p3_warm_start_rs_samples: int = 8,
        p3_warm_start_rs_max_prompts: int = 256,
        p3_warm_start_checkpoint_every: int = 50,
        p3_warm_start_num_nodes: int = 1,
        p3_warm_start_nproc_per_node: int = 1,
        p3_warm_start_distributed_strategy: str = "auto",
        p3_warm_start_overrides: list = [],  # noqa: B006
        # ── phase 4: AMFT training ──
        p4_train_method: str = "amft",
        p4_train_max_steps: int = 200,
        p4_train_lr: float = 2e-4,
        p4_train_mu_init: float = 0.5,
        p4_train_mu_min: float = 0.05,
        p4_train_mu_max: float = 0.95,
        p4_train_eta_mu: float = 0.05,
        p4_train_eta_h: float = 0.05,
        p4_train_meta_interval: int = 10,
        p4_train_checkpoint_every: int = 20,
        p4_train_num_nodes: int = 1,
        p4_train_nproc_per_node: int = 1,
        p4_train_distributed_strategy: str = "auto",
        p4_train_seed: int = 0,
        p4_train_overrides: list = [],  # noqa: B006
        # ── phase 5: evaluation and blessing ──
        p5_eval_metric: str = "test_id.accuracy",
        p5_eval_threshold: float = 0.0,
        p5_eval_max_regression: float = 0.0,
        p5_eval_warm_start_check: bool = True,
        p5_eval_pass_k: int = 4,
        p5_eval_n_samples: int = 8,
        p5_eval_max_examples: int = 0,
        # ── phase 6: registry ──
        p6_registry_model_name: str = "amft-gp",
        p6_registry_tracking_uri: str = "",
        p6_registry_artifact_root: str = "",
        p6_registry_alias: str = "champion",
    ):
        # The docstring (with every parameter's description) comes from the settings table: see below.
        params = dict(locals())
        job_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

        # ── exit handler: the run summary, whatever happens inside ──
        summary_task = run_summary(s3_root=p0_s3_root, run_id=p0_run_id, job_id=job_id,
                                   s3_endpoint_url=p0_s3_endpoint_url)
        summary_task.set_display_name("run summary").set_caching_options(False)
        cpu_task(summary_task)
        secrets(summary_task, p0_s3_secret)

        with dsl.ExitHandler(summary_task, name="amft"):
            # ── Stage 0: preflight (CPU, before any GPU is requested) ──
            pre = preflight(job_id=job_id, **{k: v for k, v in params.items() if k in PREFLIGHT_INPUTS})
            pre.set_display_name("preflight").set_caching_options(False)
            cpu_task(pre)
            secrets(pre, p0_s3_secret, p0_registry_secret)
            run_root = pre.outputs["run_root"]

            # ── Stage 1: prepare data ──
            data = prepare_data(
                run_root=run_root, s3_endpoint_url=p0_s3_endpoint_url, task=p1_data_task,
                input_uri=p1_data_input_uri, train_size=p1_data_train_size, val_size=p1_data_val_size,
                test_id_size=p1_data_test_id_size, test_ood_size=p1_data_test_ood_size, seed=p1_data_seed)
            data.set_display_name("prepare data").set_caching_options(False).set_retry(num_retries=1)
            cpu_task(data)
            secrets(data, p0_s3_secret)

            # ── Stage 2: validation gate ──
            gate = validate_data(dataset=data.outputs["dataset"], run_root=run_root,
                                 s3_endpoint_url=p0_s3_endpoint_url, min_rows=p2_validate_min_rows,
                                 max_prompt_tokens=p2_validate_max_prompt_tokens)
            gate.set_display_name("validate data").set_caching_options(False).set_retry(num_retries=1)
            cpu_task(gate)
            secrets(gate, p0_s3_secret)

            # Gates compare a task's single `Output` with a literal of its own type (bool here, 0.5 for
            # floats): kfp.local skips a branch silently when it cannot resolve or type a condition.
            with dsl.If(gate.outputs["Output"] == True, name="data-valid"):  # noqa: E712 (a KFP condition)
                # ── Stage 3: warm start (GPU) ──
                warm = warm_start(dataset=data.outputs["dataset"], warm_start_config=pre.outputs["warm_start_config"],
                                  run_root=run_root, s3_endpoint_url=p0_s3_endpoint_url,
                                  **scale_out(p3_warm_start_num_nodes, p3_warm_start_nproc_per_node, p0_s3_secret,
                                              p0_gpu_count, p0_gpu_cpu_request, p0_gpu_memory_request,
                                              p0_gpu_node_selector, p0_gpu_tolerations, p0_trainjob_timeout_h,
                                              p0_kueue_queue, p0_kueue_priority_class))
                warm.set_display_name("warm start").set_caching_options(False)
                warm.set_retry(num_retries=2, backoff_duration=gpu_backoff, backoff_factor=2.0,
                               backoff_max_duration="600s")
                gpu_task(warm, pre, "warm_start", p0_gpu_node_selector, p0_gpu_tolerations)
                secrets(warm, p0_s3_secret)

                # ── Stage 4: AMFT training (GPU; checkpoints to the run root, resume auto) ──
                trained = train(warm_start_model=warm.outputs["model"], dataset=data.outputs["dataset"],
                                train_config=pre.outputs["train_config"], target_entropy=warm.outputs["Output"],
                                run_root=run_root, s3_endpoint_url=p0_s3_endpoint_url,
                                registry_tracking_uri=p6_registry_tracking_uri,
                                **scale_out(p4_train_num_nodes, p4_train_nproc_per_node, p0_s3_secret, p0_gpu_count,
                                            p0_gpu_cpu_request, p0_gpu_memory_request, p0_gpu_node_selector,
                                            p0_gpu_tolerations, p0_trainjob_timeout_h, p0_kueue_queue,
                                            p0_kueue_priority_class, registry_secret=p0_registry_secret))
                trained.set_display_name("train").set_caching_options(False)
                # a retried task resumes from its newest checkpoint instead of starting over
                trained.set_retry(num_retries=2, backoff_duration=gpu_backoff, backoff_factor=2.0,
                                  backoff_max_duration="600s")
                gpu_task(trained, pre, "train", p0_gpu_node_selector, p0_gpu_tolerations)
                secrets(trained, p0_s3_secret, p0_registry_secret)  # MLflow: params and curves while it trains

                # ── Stage 5: evaluate (vs base, warm start and champion) ──
                scored = evaluate(
                    model=trained.outputs["model"], base_model=warm.outputs["base_model"],
                    warm_start_model=warm.outputs["model"], train_run=trained.outputs["run_dir"],
                    dataset=data.outputs["dataset"], train_config=pre.outputs["train_config"], run_root=run_root,
                    s3_endpoint_url=p0_s3_endpoint_url, registry_model_name=p6_registry_model_name,
                    registry_tracking_uri=p6_registry_tracking_uri, metric=p5_eval_metric,
                    threshold=p5_eval_threshold, max_regression=p5_eval_max_regression,
                    warm_start_check=p5_eval_warm_start_check, pass_k=p5_eval_pass_k,
                    n_samples=p5_eval_n_samples, max_examples=p5_eval_max_examples)
                scored.set_display_name("evaluate").set_caching_options(False)
                scored.set_retry(num_retries=2, backoff_duration=gpu_backoff, backoff_factor=2.0,
                                 backoff_max_duration="600s")
                # on the GPU pool: generation is evaluation's cost (bf16 and batched there; CPU locally)
                gpu_task(scored, pre, "evaluate", p0_gpu_node_selector, p0_gpu_tolerations)
                secrets(scored, p0_s3_secret, p0_registry_secret)

                with dsl.If(scored.outputs["Output"] == True, name="blessed"):  # noqa: E712 (a KFP condition)
                    # ── Stage 6: register (MLflow, champion alias, lineage record) ──
                    registered = register(
                        model=trained.outputs["model"], run_id=pre.outputs["run_id"], run_root=run_root,
                        s3_root=p0_s3_root, s3_endpoint_url=p0_s3_endpoint_url,
                        registry_model_name=p6_registry_model_name, registry_tracking_uri=p6_registry_tracking_uri,
                        registry_artifact_root=p6_registry_artifact_root, registry_alias=p6_registry_alias)
                    # idempotent on the run id, so retrying cannot create a second version
                    registered.set_display_name("register").set_caching_options(False).set_retry(num_retries=2)
                    cpu_task(registered)
                    secrets(registered, p0_s3_secret, p0_registry_secret, p0_lineage_secret)  # signs lineage
                    if cluster:  # the lineage record names the images (pin them by digest at compile time)
                        registered.set_env_variable("AMFT_IMAGE_DIGEST_CPU", CPU_IMAGE)
                        registered.set_env_variable("AMFT_IMAGE_DIGEST_CUDA", CUDA_IMAGE)

            with dsl.Else(name="data-invalid"):
                stopped = stop_run(reason="data validation failed",
                                   details="the validate-data task's report lists the failed checks")
                stopped.set_display_name("stop: data invalid").set_caching_options(False)
                cpu_task(stopped)

    amft_pipeline.__doc__ = pipeline_docstring(SUMMARY)  # KFP reads each parameter's description from it
    return dsl.pipeline(name=PIPELINE_NAME)(amft_pipeline)


amft_pipeline = build_pipeline("cluster")
amft_pipeline_local = build_pipeline("local")


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(amft_pipeline, "pipelines/amft_pipeline.yaml")
