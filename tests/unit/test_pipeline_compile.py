"""The compiled pipeline (IR YAML) carries what a cluster needs, read from the YAML itself: GPU
requests on the GPU stages, retry policies, caching off, secrets as env vars, node selector and
tolerations, the gates and the exit handler. And the committed YAML equals a fresh compile."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.build import compile_pipeline

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "pipelines" / "amft_pipeline.yaml"
GPU_STAGES = ("warm-start", "train", "evaluate")
S3_STAGES = ("preflight", "prepare-data", "validate-data", "warm-start", "train", "evaluate", "register",
             "run-summary")
REGISTRY_STAGES = ("preflight", "train", "evaluate", "register")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec) of a fresh compile of the cluster variant."""
    path = compile_pipeline(tmp_path_factory.mktemp("ir") / "p.yaml")
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG (root and sub-DAGs: exit handler, conditions), by task name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update((component.get("dag") or {}).get("tasks") or {})
    return tasks


def executor(spec: dict, stage: str) -> dict:
    return spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]


def placeholder_input(value: str) -> str:
    """The input parameter a resource placeholder names: {{$.inputs.parameters['NAME']}} → NAME."""
    match = re.fullmatch(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}", value)
    assert match, f"not an input placeholder: {value!r}"
    return match.group(1)


def test_gpu_stages_request_the_pod_preflight_resolved_as_strings(compiled):
    """Each GPU stage's pod request comes from preflight's string outputs for that stage. Strings,
    because KFP's driver reads a resource placeholder's value with GetStringValue
    (backend/src/v2/driver/resolve.go): an integer input (p0_gpu_count, as this pipeline once wired it)
    resolves to "" and the pod silently gets no GPU."""
    spec, _ = compiled
    preflight_outputs = spec["components"]["comp-preflight"]["outputDefinitions"]["parameters"]
    declared = {}  # every DAG component's input parameter types, by name
    for component in spec["components"].values():
        declared.update({name: d["parameterType"]
                         for name, d in (component.get("inputDefinitions") or {}).get("parameters", {}).items()})
    for stage in GPU_STAGES:
        resources = executor(spec, stage)["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        key = stage.replace("-", "_")
        for field, value in (("gpus", resources["accelerator"]["resourceCount"]),
                             ("cpu", resources["resourceCpuRequest"]), ("memory", resources["resourceMemoryRequest"])):
            name = placeholder_input(value)
            assert name == f"pipelinechannel--preflight-{key}_{field}", (stage, field, name)
            assert preflight_outputs[f"{key}_{field}"]["parameterType"] == "STRING", (stage, field)
            assert declared[name] == "STRING", f"{stage} {field}: the enclosing DAG passes {declared[name]}"
    for stage in ("preflight", "prepare-data", "validate-data", "register", "run-summary"):
        assert "accelerator" not in executor(spec, stage).get("resources", {}), f"{stage} must not ask for a GPU"


def test_gpu_stages_use_the_cuda_image_and_the_rest_the_cpu_image(compiled):
    from components import CPU_IMAGE, CUDA_IMAGE

    spec, _ = compiled
    for stage in (*S3_STAGES, "stop-run"):
        assert executor(spec, stage)["image"] == (CUDA_IMAGE if stage in GPU_STAGES else CPU_IMAGE)


def test_no_task_pip_installs_at_start(compiled):
    """Our images carry kfp and amft_lib; a runtime pip install would need the network and could drift."""
    spec, _ = compiled
    for name, ex in spec["deploymentSpec"]["executors"].items():
        assert "pip install" not in " ".join(ex["container"]["command"]), name


def test_retry_policies(compiled):
    spec, _ = compiled
    tasks = all_tasks(spec)
    for stage in GPU_STAGES:
        policy = tasks[stage]["retryPolicy"]
        assert policy["maxRetryCount"] == 2 and policy["backoffDuration"] == "60s"
    assert tasks["register"]["retryPolicy"]["maxRetryCount"] == 2  # idempotent on the run id
    assert "retryPolicy" not in tasks["preflight"]  # fail fast
    assert "retryPolicy" not in tasks["stop-run"]


def test_caching_is_off_for_every_task(compiled):
    spec, _ = compiled
    for name, task in all_tasks(spec).items():
        if "componentRef" in task and not name.startswith(("condition", "exit-handler")):
            assert task["cachingOptions"].get("enableCache") is not True, f"{name} is cached"


def test_secrets_become_env_vars(compiled):
    _, executors = compiled
    for stage in S3_STAGES:
        mounts = executors[f"exec-{stage}"]["secretAsEnv"]
        s3 = [m for m in mounts if "p0_s3_secret" in str(m["secretNameParameter"])]
        assert len(s3) == 1 and s3[0]["optional"] is False
        assert {k["envVar"] for k in s3[0]["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        registry = [m for m in mounts if "p0_registry_secret" in str(m["secretNameParameter"])]
        assert bool(registry) == (stage in REGISTRY_STAGES), stage
        if registry:
            assert registry[0]["optional"] is True  # an MLflow server without auth needs no secret
    assert "secretAsEnv" not in executors.get("exec-stop-run", {})


def test_gpu_pool_placement(compiled):
    _, executors = compiled
    for stage in GPU_STAGES:
        ex = executors[f"exec-{stage}"]
        assert "p0_gpu_node_selector" in str(ex["nodeSelector"])
        assert "p0_gpu_tolerations" in str(ex["tolerations"])
        assert ex["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    for stage in ("preflight", "register"):
        assert "nodeSelector" not in executors[f"exec-{stage}"]


def test_gates_and_exit_handler(compiled):
    spec, _ = compiled
    tasks = all_tasks(spec)
    conditions = {name: (t.get("triggerPolicy") or {}).get("condition", "") for name, t in tasks.items()}
    gate = [c for c in conditions.values() if "validate-data-Output" in c]
    # the data gate: If(passed) and its Else (negated); the blessing gate: If(blessed)
    assert sorted(gate) == sorted(["inputs.parameter_values['pipelinechannel--validate-data-Output'] == true",
                                   "!(inputs.parameter_values['pipelinechannel--validate-data-Output'] == true)"])
    assert any(c == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true" for c in conditions.values())
    summary = spec["root"]["dag"]["tasks"]["run-summary"]
    assert summary["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert "taskFinalStatus" in summary["inputs"]["parameters"]["status"]
    # training and registration sit inside the gates, not beside them
    exit_dag = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert {"preflight", "prepare-data", "validate-data"} <= set(exit_dag)
    assert "train" not in exit_dag and "register" not in exit_dag


def test_train_stage_carries_what_launches_the_trainjob(compiled):
    """Cluster variant: the train task gets the scale-out parameters and the TrainJob's image, secret
    *names* and GPU-pool placement from the pipeline parameters (one source each), launcher=trainjob."""
    from components import CUDA_IMAGE

    spec, _ = compiled
    params = all_tasks(spec)["train"]["inputs"]["parameters"]
    from_pipeline = {"num_nodes": "p4_train_num_nodes", "nproc_per_node": "p4_train_nproc_per_node",
                     "s3_secret": "p0_s3_secret", "registry_secret": "p0_registry_secret",
                     "gpus_per_node": "p0_gpu_count", "cpu_per_node": "p0_gpu_cpu_request",
                     "memory_per_node": "p0_gpu_memory_request", "node_selector": "p0_gpu_node_selector",
                     "tolerations": "p0_gpu_tolerations", "trainjob_timeout_h": "p0_trainjob_timeout_h",
                     "kueue_queue": "p0_kueue_queue", "kueue_priority_class": "p0_kueue_priority_class"}
    for name, parameter in from_pipeline.items():
        assert params[name]["componentInputParameter"] == f"pipelinechannel--{parameter}", name
    assert params["launcher"]["runtimeValue"]["constant"] == "trainjob"
    assert params["image"]["runtimeValue"]["constant"] == CUDA_IMAGE
    # the strategy reaches the trainer through the config preflight builds (key distributed.strategy)
    assert "p4_train_distributed_strategy" in all_tasks(spec)["preflight"]["inputs"]["parameters"]
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert root["p4_train_num_nodes"]["defaultValue"] == 1 and root["p4_train_nproc_per_node"]["defaultValue"] == 1
    assert root["p4_train_distributed_strategy"]["defaultValue"] == "auto"
    # the launcher only names secrets; secretKeyRef entries are built at run time, never compiled in
    assert "secretKeyRef" not in yaml.safe_dump(spec)


def test_warm_start_stage_carries_its_own_scale_out(compiled):
    """The warm start has its own process counts (p3_warm_start_*) and the same GPU pool; no registry secret."""
    spec, _ = compiled
    params = all_tasks(spec)["warm-start"]["inputs"]["parameters"]
    for name, parameter in {"num_nodes": "p3_warm_start_num_nodes", "nproc_per_node": "p3_warm_start_nproc_per_node",
                            "s3_secret": "p0_s3_secret", "gpus_per_node": "p0_gpu_count",
                            "node_selector": "p0_gpu_node_selector", "tolerations": "p0_gpu_tolerations",
                            "trainjob_timeout_h": "p0_trainjob_timeout_h"}.items():
        assert params[name]["componentInputParameter"] == f"pipelinechannel--{parameter}", name
    assert params["launcher"]["runtimeValue"]["constant"] == "trainjob"
    assert "registry_secret" not in params
    assert "p3_warm_start_distributed_strategy" in all_tasks(spec)["preflight"]["inputs"]["parameters"]


def test_local_variant_launches_torchrun(tmp_path):
    from kfp import compiler

    from pipelines.amft_pipeline import amft_pipeline_local

    path = tmp_path / "local.yaml"
    compiler.Compiler().compile(amft_pipeline_local, str(path))
    tasks = all_tasks(yaml.safe_load(path.read_text()))
    for task, prefix in (("train", "p4_train"), ("warm-start", "p3_warm_start")):
        params = tasks[task]["inputs"]["parameters"]
        assert params["nproc_per_node"]["componentInputParameter"] == f"pipelinechannel--{prefix}_nproc_per_node"
        assert "launcher" not in params and "s3_secret" not in params  # the component's default: torchrun


def test_run_id_comes_from_the_kfp_job(compiled):
    spec, _ = compiled
    params = all_tasks(spec)["preflight"]["inputs"]["parameters"]
    assert params["job_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


def test_every_parameter_has_a_default_and_a_phase_prefix(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert len(params) > 30
    for name, definition in params.items():
        assert name[:3] in {f"p{i}_" for i in range(7)}, name
        assert definition.get("isOptional") is True and "defaultValue" in definition, name


def test_no_credentials_in_the_compiled_yaml(tmp_path):
    """Secrets in the compiling environment must not leak into the IR (only secret *names* do)."""
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "sentinel-secret-9f3a1c", "AWS_ACCESS_KEY_ID": "sentinel-key-77ab",
           "KFP_TOKEN": "sentinel-token-5e2d"}
    out = tmp_path / "p.yaml"
    subprocess.run([sys.executable, "-m", "amft_lib.cli", "pipeline", "compile", "--out", str(out)], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    text = out.read_text()
    for value in ("sentinel-secret-9f3a1c", "sentinel-key-77ab", "sentinel-token-5e2d"):
        assert value not in text


def test_local_variant_has_no_cluster_settings(tmp_path):
    from kfp import compiler

    from pipelines.amft_pipeline import amft_pipeline_local

    path = tmp_path / "local.yaml"
    compiler.Compiler().compile(amft_pipeline_local, str(path))
    docs = list(yaml.safe_load_all(path.read_text()))
    assert len(docs) == 1  # no kubernetes platform spec
    for ex in docs[0]["deploymentSpec"]["executors"].values():
        assert "resources" not in ex["container"]
    assert all_tasks(docs[0])["train"]["retryPolicy"]["maxRetryCount"] == 2  # retries do run locally


def test_committed_yaml_equals_a_fresh_compile(tmp_path):
    """`amft pipeline compile` with the default images must reproduce pipelines/amft_pipeline.yaml byte
    for byte; if this fails, run `amft pipeline compile` (with AMFT_IMAGE_* unset) and commit the result."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMFT_IMAGE_")}
    out = tmp_path / "fresh.yaml"
    subprocess.run([sys.executable, "-m", "amft_lib.cli", "pipeline", "compile", "--out", str(out)], cwd=ROOT,
                   env=env, check=True, capture_output=True)
    assert COMMITTED.is_file(), "pipelines/amft_pipeline.yaml is missing: run `amft pipeline compile`"
    assert out.read_text() == COMMITTED.read_text(), (
        "pipelines/amft_pipeline.yaml is stale: run `amft pipeline compile` (AMFT_IMAGE_* unset) and commit it")


KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class"


def test_compiled_with_a_queue_every_gpu_task_pod_carries_kueues_labels(tmp_path):
    """`amft pipeline compile --kueue-queue` (KFP pod labels are compile-time literals): every GPU task
    pod carries the queue and priority class, no CPU task does, and the run parameters that label the
    TrainJobs default to the same values."""
    from amft_lib import cli

    out = tmp_path / "queued.yaml"
    assert cli.main(["pipeline", "compile", "--out", str(out), "--kueue-queue", "team-a-gpu",
                     "--kueue-priority-class", "batch-low"]) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in GPU_STAGES:
        labels = executors[f"exec-{stage}"]["podMetadata"]["labels"]
        assert labels == {KUEUE_QUEUE_LABEL: "team-a-gpu", KUEUE_PRIORITY_LABEL: "batch-low"}, stage
    for stage in ("preflight", "prepare-data", "validate-data", "register", "run-summary"):
        assert "podMetadata" not in executors.get(f"exec-{stage}", {}), stage
    root = spec["root"]["inputDefinitions"]["parameters"]
    assert root["p0_kueue_queue"]["defaultValue"] == "team-a-gpu"
    assert root["p0_kueue_priority_class"]["defaultValue"] == "batch-low"


def test_without_a_queue_no_pod_carries_a_kueue_label(compiled):
    spec, executors = compiled
    assert "kueue.x-k8s.io" not in yaml.safe_dump(executors)  # today's behaviour: nothing to admit through
    assert spec["root"]["inputDefinitions"]["parameters"]["p0_kueue_queue"].get("defaultValue", "") == ""


def test_a_bad_queue_name_is_refused_at_compile_time(tmp_path, capsys):
    from amft_lib import cli

    out = tmp_path / "bad.yaml"
    assert cli.main(["pipeline", "compile", "--out", str(out), "--kueue-queue", "Team A"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --kueue-queue='Team A': not a Kubernetes label value (at most 63 characters: letters, "
                   "digits, '-', '_', '.', starting and ending with a letter or digit)"]
    assert not out.exists()
def test_lineage_signing_key_reaches_only_the_register_stage(compiled):
    """The optional signing secret (p0_lineage_secret) is mounted as AMFT_LINEAGE_SECRET_KEY on the one
    task that writes the lineage record; only the secret's name is in the IR, never a key."""
    from amft_lib.lineage import SIGNING_KEY_ENV

    _, executors = compiled
    for name, ex in executors.items():
        mounts = [m for m in ex.get("secretAsEnv", []) if "p0_lineage_secret" in str(m["secretNameParameter"])]
        if name != "exec-register":
            assert not mounts, name
            continue
        assert len(mounts) == 1 and mounts[0]["optional"] is True  # absent: the record is written unsigned
        assert [k["envVar"] for k in mounts[0]["keyToEnv"]] == [SIGNING_KEY_ENV]
