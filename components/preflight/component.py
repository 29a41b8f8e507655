"""Preflight: fail fast on CPU, before any GPU is requested (research anchors F.1).

Checks the run id, both configs (warm start and training, built from the UI parameters), S3
write/read/delete under the run root, the registry, the base model and the input data; writes a
Markdown report either way and fails the task when any check failed. Its outputs are the
resolved run id, run root and configs every later stage uses, so parameters are turned into
configs exactly once.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from components import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preflight(
    report: Output[Markdown],
    job_id: str,
    p0_run_id: str,
    p0_s3_root: str,
    p0_s3_endpoint_url: str,
    p0_gpu_count: int,
    p0_gpu_cpu_request: str,
    p0_gpu_memory_request: str,
    p0_gpu_memory_gib: float,
    p0_trainjob_timeout_h: float,
    p1_data_task: str,
    p1_data_input_uri: str,
    p3_model_name: str,
    p3_model_allow_download: bool,
    p3_model_settings: list,
    p3_model_max_new_tokens: int,
    p3_warm_start_warmup_steps: int,
    p3_warm_start_final_sft_steps: int,
    p3_warm_start_rs_samples: int,
    p3_warm_start_rs_max_prompts: int,
    p3_warm_start_checkpoint_every: int,
    p3_warm_start_num_nodes: int,
    p3_warm_start_nproc_per_node: int,
    p3_warm_start_distributed_strategy: str,
    p3_warm_start_overrides: list,
    p4_train_method: str,
    p4_train_max_steps: int,
    p4_train_lr: float,
    p4_train_mu_init: float,
    p4_train_mu_min: float,
    p4_train_mu_max: float,
    p4_train_eta_mu: float,
    p4_train_eta_h: float,
    p4_train_meta_interval: int,
    p4_train_checkpoint_every: int,
    p4_train_num_nodes: int,
    p4_train_nproc_per_node: int,
    p4_train_distributed_strategy: str,
    p4_train_seed: int,
    p4_train_overrides: list,
    p6_registry_tracking_uri: str,
) -> NamedTuple("Outputs", [("run_id", str), ("run_root", str), ("warm_start_config", str), ("train_config", str),
                            ("warm_start_gpus", str), ("warm_start_cpu", str), ("warm_start_memory", str),
                            ("train_gpus", str), ("train_cpu", str), ("train_memory", str),
                            ("evaluate_gpus", str), ("evaluate_cpu", str), ("evaluate_memory", str)]):
    """Validate settings and connectivity; output the resolved run and configs.

    Takes the pipeline parameters under their own names (amft_lib.run.settings describes each one;
    a test keeps this list equal to the settings that preflight needs).

    Args:
        job_id: the KFP job id (dsl.PIPELINE_JOB_ID_PLACEHOLDER); the run id when p0_run_id is empty.

    Returns the run, both stage configs, and each GPU task's own pod request (strings: what KFP's
    driver reads for resources): no GPU for a stage that launches a TrainJob.
    """
    params = dict(locals())  # first statement: exactly the parameters above
    from collections import namedtuple

    from amft_lib.run.layout import use_s3_endpoint
    from amft_lib.run.preflight import checks_markdown, run_preflight

    report_path, job = params.pop("report").path, params.pop("job_id")
    use_s3_endpoint(params.pop("p0_s3_endpoint_url"))
    result = run_preflight(params, job_id=job)
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(checks_markdown(result.checks))
    if not result.passed:
        raise RuntimeError("preflight failed: " + "; ".join(result.failures()))
    pods = {f"{stage}_{field}": getattr(pod, field) for stage, pod in result.pods.items()
            for field in ("gpus", "cpu", "memory")}
    outputs = namedtuple("Outputs", ["run_id", "run_root", "warm_start_config", "train_config", *pods])
    return outputs(result.run.run_id, result.run.uri, result.warm_start_config, result.train_config, **pods)

if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(preflight, "preflight.yaml")
