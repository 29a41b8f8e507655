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
    s3_root: str,
    run_id: str,
    job_id: str,
    s3_endpoint_url: str,
    registry_tracking_uri: str,
    data_task: str,
    data_input_uri: str,
    model_name: str,
    model_settings: list,
    max_new_tokens: int,
    warmup_steps: int,
    final_sft_steps: int,
    rs_samples: int,
    rs_max_prompts: int,
    warm_start_overrides: list,
    method: str,
    max_steps: int,
    lr: float,
    mu_init: float,
    mu_min: float,
    mu_max: float,
    eta_mu: float,
    eta_h: float,
    meta_interval: int,
    checkpoint_every: int,
    seed: int,
    train_overrides: list,
) -> NamedTuple("Outputs", [("run_id", str), ("run_root", str), ("warm_start_config", str), ("train_config", str)]):
    """Validate settings and connectivity; output the resolved run and configs.

    Args:
        s3_root: s3://BUCKET/PREFIX; the run root is <s3_root>/runs/<run id>.
        run_id: explicit run id (continue an earlier run); empty uses job_id.
        job_id: the KFP job id (dsl.PIPELINE_JOB_ID_PLACEHOLDER).
        model_settings: KEY=VALUE applied to both configs (model.*, precision, device).
        warm_start_overrides / train_overrides: KEY=VALUE for any other key of that stage's config.
    """
    from collections import namedtuple

    from amft_lib.pipeline_commands import checks_markdown, run_preflight, use_s3_endpoint

    use_s3_endpoint(s3_endpoint_url)
    config_kwargs = dict(
        task=data_task, model_name=model_name, model_settings=model_settings, max_new_tokens=max_new_tokens,
        warmup_steps=warmup_steps, final_sft_steps=final_sft_steps, rs_samples=rs_samples,
        rs_max_prompts=rs_max_prompts, warm_start_overrides=warm_start_overrides, method=method,
        max_steps=max_steps, lr=lr, mu_init=mu_init, mu_min=mu_min, mu_max=mu_max, eta_mu=eta_mu, eta_h=eta_h,
        meta_interval=meta_interval, checkpoint_every=checkpoint_every, seed=seed, train_overrides=train_overrides,
    )
    checks, resolved = run_preflight(s3_root=s3_root, run_id=run_id, job_id=job_id, tracking_uri=registry_tracking_uri,
                                     model_name=model_name, data_input_uri=data_input_uri, config_kwargs=config_kwargs)
    with open(report.path, "w", encoding="utf-8") as f:
        f.write(checks_markdown(checks))
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    if failed:
        raise RuntimeError("preflight failed: " + "; ".join(failed))
    outputs = namedtuple("Outputs", ["run_id", "run_root", "warm_start_config", "train_config"])
    return outputs(resolved["run_id"], resolved["run_root"], resolved["warm_start_config"], resolved["train_config"])


if __name__ == "__main__":
    from kfp import compiler

    compiler.Compiler().compile(preflight, "preflight.yaml")
