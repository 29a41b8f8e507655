"""The TrainJob the train stage launches (amft_lib.run.trainjob, amft_lib.run.scale_out.trainjob_for) is
what Kubeflow Trainer v2 admits: validated with `jsonschema` against the CRD's OpenAPI v3 schema
(tests/specs/kubeflow-trainer/, copied from kubeflow/trainer; see its SOURCE.md), plus the CEL rules
jsonschema cannot run (name format and length, numProcPerNode ≥ 1) checked by reading them from the
CRD. No cluster and no mocks: the manifest is a pure function."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from amft_lib.run.layout import RunRoot
from amft_lib.run.scale_out import ClusterJob, ScaleOut, trainjob_for
from amft_lib.run.trainjob import (
    NAME_MAX,
    NODE,
    TrainJobError,
    resources_per_node,
    secret_env,
    trainjob_manifest,
    trainjob_name,
)

SPECS = Path(__file__).resolve().parents[1] / "specs" / "kubeflow-trainer"
SECRET_VALUE = "sentinel-secret-value-4b1d"


@pytest.fixture(scope="module")
def crd() -> dict:
    return yaml.safe_load((SPECS / "trainer.kubeflow.org_trainjobs.yaml").read_text())


def strict(node):
    """The schema as the API server applies it with strict field validation (kubectl's default): an
    object with declared `properties` refuses any other key (it would be an error, or silently pruned).
    Plain JSON Schema allows extra keys, so without this a misspelt or removed field (the old
    `podSpecOverrides`) would pass."""
    if isinstance(node, dict):
        node = {k: strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


@pytest.fixture(scope="module")
def schema(crd) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return strict(version["schema"]["openAPIV3Schema"])


def cel_name_pattern(crd: dict) -> str:
    """The regex of the CRD's `metadata.name` CEL rule (self.metadata.name.matches('…'))."""
    (version,) = crd["spec"]["versions"]
    rules = [v["rule"] for v in version["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]]
    (rule,) = [r for r in rules if ".matches(" in r]
    return re.search(r"matches\('(.+)'\)", rule).group(1)


def cluster_job(**kw) -> ClusterJob:
    base = dict(image="registry.test/amft:cuda@sha256:def", s3_secret="amft-s3", registry_secret="amft-registry",
                s3_endpoint_url="http://seaweedfs.kubeflow:8333", gpus_per_node=4, cpu_per_node="32",
                memory_per_node="256Gi", node_selector={"nvidia.com/gpu.present": "true"},
                tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    return ClusterJob(**{**base, **kw})


def stage_manifest(**kw) -> dict:
    run = RunRoot.resolve("s3://amft/pipelines", "3f2a9c1e-7d4b-4c1a-9e8f-0a1b2c3d4e5f")
    return trainjob_for(run, ScaleOut(2, 4, "trainjob"), cluster_job(**kw), "kubeflow-user")


def test_the_train_stage_trainjob_validates_against_the_crd(schema, crd):
    manifest = stage_manifest()
    jsonschema.validate(manifest, schema)
    # the CEL rules jsonschema does not run
    assert re.fullmatch(cel_name_pattern(crd), manifest["metadata"]["name"])
    assert len(manifest["metadata"]["name"]) <= 63
    trainer = manifest["spec"]["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"] == {"requests": {"cpu": "32", "memory": "256Gi"},
                                           "limits": {"nvidia.com/gpu": 4}}
    assert trainer["command"] == ["python", "-m", "torch.distributed.run"]
    assert trainer["args"] == ["-m", "amft_lib.cli", "stage", "train-worker", "--run-root",
                               "s3://amft/pipelines/runs/3f2a9c1e-7d4b-4c1a-9e8f-0a1b2c3d4e5f"]
    assert manifest["spec"]["runtimeRef"]["name"] == "torch-distributed"


def test_the_warm_start_trainjob_runs_its_own_worker(schema, crd):
    run = RunRoot.resolve("s3://amft/pipelines", "r-7")
    manifest = trainjob_for(run, ScaleOut(1, 2, "trainjob"), cluster_job(), "ns", stage="warm_start")
    jsonschema.validate(manifest, schema)
    assert manifest["metadata"]["name"] == "amft-r-7-warm-start"
    assert re.fullmatch(cel_name_pattern(crd), manifest["metadata"]["name"])
    assert manifest["spec"]["trainer"]["args"][:4] == ["-m", "amft_lib.cli", "stage", "warm-start-worker"]
    assert manifest["metadata"]["labels"]["amft.pipeline/stage"] == "warm-start"


def test_pod_settings_go_through_runtime_patches_onto_the_runtimes_node_job(schema):
    """Node selector, tolerations and /dev/shm reach the stock runtime's replicated job and container,
    both named `node` there (torch_distributed_runtime.yaml); no removed override field is used."""
    runtime = yaml.safe_load((SPECS / "torch_distributed_runtime.yaml").read_text())
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    (container,) = job["template"]["spec"]["template"]["spec"]["containers"]
    assert job["name"] == container["name"] == NODE

    spec = stage_manifest(service_account="amft-trainer")["spec"]
    assert "podSpecOverrides" not in spec and "podTemplateOverrides" not in spec
    (patch,) = spec["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == NODE
    pod = rjob["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["serviceAccountName"] == "amft-trainer"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    assert pod["containers"] == [{"name": NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]


def test_secrets_are_references_and_no_value_reaches_the_manifest(monkeypatch, schema):
    """Credentials in the launcher's environment stay there: the manifest names secrets and keys only."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_VALUE + "-id")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET_VALUE + "-mlflow")
    manifest = stage_manifest()
    text = json.dumps(manifest)
    assert SECRET_VALUE not in text
    env = {e["name"]: e for e in manifest["spec"]["trainer"]["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key]
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "amft-s3", "key": key, "optional": False}
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_ENDPOINT_URL_S3"] == {"name": "AWS_ENDPOINT_URL_S3", "value": "http://seaweedfs.kubeflow:8333"}
    assert not any(name.startswith("PET_") for name in env)  # the runtime's torch plugin owns those


def test_a_literal_secret_value_is_refused_without_echoing_it():
    with pytest.raises(TrainJobError, match="never a value") as err:
        trainjob_manifest(name="amft-r-train", namespace="ns", image="img", command=["torchrun"],
                          secret_env_vars=[{"name": "AWS_SECRET_ACCESS_KEY", "value": SECRET_VALUE}])
    assert SECRET_VALUE not in str(err.value)


def test_a_cpu_only_job_has_no_gpu_limit_and_no_patch_when_nothing_pod_level_is_set(schema):
    manifest = trainjob_manifest(name="amft-r-train", namespace="ns", image="img", command=["torchrun"],
                                 resources=resources_per_node(gpus=0, cpu="2", memory="8Gi"))
    jsonschema.validate(manifest, schema)
    assert manifest["spec"]["trainer"]["resourcesPerNode"] == {"requests": {"cpu": "2", "memory": "8Gi"}}
    assert "runtimePatches" not in manifest["spec"]


@pytest.mark.parametrize("run_id", ["3f2a9c1e-7d4b-4c1a-9e8f-0a1b2c3d4e5f", "Local_2026.12.02", "x" * 128, "9-lives"])
def test_names_are_stable_valid_and_distinct(run_id, crd):
    name = trainjob_name(run_id, "train")
    assert name == trainjob_name(run_id, "train")  # a retried launcher finds its own job
    assert re.fullmatch(cel_name_pattern(crd), name) and len(name) <= NAME_MAX
    assert trainjob_name(run_id, "train") != trainjob_name(run_id + "b", "train")


@pytest.mark.parametrize("field, value, message", [
    ("num_nodes", 0, "num_nodes=0: must be a whole number ≥ 1"),
    ("num_nodes", -2, "num_nodes=-2"),
    ("nproc_per_node", 0, "nproc_per_node=0"),
    ("nproc_per_node", 1.5, "nproc_per_node=1.5"),
    ("image", "", "image is empty"),
    ("command", [], "command is empty"),
    ("namespace", " ", "namespace is empty"),
    ("name", "Amft_Run", "trainjob name='Amft_Run'"),
])
def test_bad_input_is_one_clear_line(field, value, message):
    args = dict(name="amft-r-train", namespace="ns", image="img", command=["torchrun"])
    with pytest.raises(TrainJobError, match=re.escape(message)) as err:
        trainjob_manifest(**{**args, field: value})
    assert "\n" not in str(err.value)


def test_the_schema_itself_refuses_what_we_refuse(schema):
    """Cross-check: a negative numNodes, a missing runtimeRef and the removed `podSpecOverrides` fail the
    CRD schema too (so the validation in these tests has teeth)."""
    manifest = trainjob_manifest(name="amft-r-train", namespace="ns", image="img", command=["torchrun"])
    bad = json.loads(json.dumps(manifest))
    bad["spec"]["trainer"]["numNodes"] = -1
    with pytest.raises(jsonschema.ValidationError, match="minimum"):
        jsonschema.validate(bad, schema)
    del bad["spec"]["runtimeRef"]
    with pytest.raises(jsonschema.ValidationError, match="runtimeRef"):
        jsonschema.validate(bad, schema)
    removed = json.loads(json.dumps(manifest))
    removed["spec"]["podSpecOverrides"] = [{"targetJobs": [{"name": NODE}], "nodeSelector": {"a": "b"}}]
    with pytest.raises(jsonschema.ValidationError, match="podSpecOverrides"):
        jsonschema.validate(removed, schema)


@pytest.mark.parametrize("env, message", [
    ({"PET_NNODES": "2"}, "set by the runtime's torch plugin"),
    ({"bad name": "x"}, "not a valid environment variable name"),
])
def test_env_rules(env, message):
    with pytest.raises(TrainJobError, match=message):
        trainjob_manifest(name="amft-r-train", namespace="ns", image="img", command=["torchrun"], env=env)
    with pytest.raises(TrainJobError, match="each variable may be set once"):
        trainjob_manifest(name="amft-r-train", namespace="ns", image="img", command=["torchrun"],
                          env={"AWS_ACCESS_KEY_ID": "x"}, secret_env_vars=secret_env("s", ["AWS_ACCESS_KEY_ID"]))


def test_rbac_grants_exactly_what_the_watcher_calls():
    """pipelines/rbac/trainjob-launcher.yaml: create/get/delete on trainjobs, list pods and get pods/log
    (the log tail), bound to a service account; read from the calls the launcher's modules make."""
    import inspect

    from amft_lib.run import kueue, trainjob_logs, trainjob_watch

    role, binding = yaml.safe_load_all((Path(__file__).resolve().parents[2] / "pipelines" / "rbac" /
                                        "trainjob-launcher.yaml").read_text())
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"]}
    source = inspect.getsource(trainjob_watch)
    jobs = {verb for verb in ("create", "get", "delete", "patch", "list", "replace")
            if f".{verb}_namespaced_custom_object(" in source}
    logs_source = inspect.getsource(trainjob_logs)
    pods = {verb for verb in ("list", "read", "create", "delete", "patch") if f".{verb}_namespaced_pod(" in logs_source}
    queues = {"get"} if ".get_namespaced_custom_object(" in inspect.getsource(kueue) else set()
    assert granted == {("trainer.kubeflow.org", "trainjobs"): jobs, ("", "pods"): pods,
                       ("", "pods/log"): {"get"} if ".read_namespaced_pod_log(" in logs_source else set(),
                       ("kueue.x-k8s.io", "localqueues"): queues}
    assert jobs == {"create", "get", "delete"} and pods == {"list"}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["kind"] == "ServiceAccount"


# ── Kueue and the active deadline ──────────────────────────────────────────────────────────────────
# Kueue's convention (sigs.k8s.io/kueue pkg/controller/constants): a job is admitted through the LocalQueue
# named by its label QueueLabel and prioritised by the WorkloadPriorityClass in WorkloadPriorityClassLabel.
# The TrainJob CRD types `metadata` as a bare object, so the label syntax the API server enforces (a
# qualified-name key, a ≤ 63-character value) is checked here from the Kubernetes grammar.
KUEUE_QUEUE_LABEL, KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class"
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def assert_valid_labels(labels: dict) -> None:
    for key, value in labels.items():
        assert LABEL_KEY.match(key) and len(key.split("/")[-1]) <= 63, key
        assert isinstance(value, str) and LABEL_VALUE.match(value), (key, value)


def test_a_queued_trainjob_carries_kueues_labels_and_the_deadline(schema, crd):
    manifest = stage_manifest(kueue_queue="team-a-gpu", kueue_priority_class="batch-low", timeout_s=72 * 3600.0)
    jsonschema.validate(manifest, schema)
    labels = manifest["metadata"]["labels"]
    assert labels[KUEUE_QUEUE_LABEL] == "team-a-gpu" and labels[KUEUE_PRIORITY_LABEL] == "batch-low"
    assert_valid_labels(labels)
    assert manifest["spec"]["activeDeadlineSeconds"] == 72 * 3600  # p0_trainjob_timeout_h's default, in seconds
    # Kueue admits the TrainJob as one workload: its pods must not carry a queue of their own
    assert KUEUE_QUEUE_LABEL not in json.dumps(manifest["spec"])


def test_no_queue_means_no_kueue_label_as_before(schema):
    manifest = stage_manifest(timeout_s=1.5)
    jsonschema.validate(manifest, schema)
    assert not [k for k in manifest["metadata"]["labels"] if k.startswith("kueue.x-k8s.io/")]
    assert_valid_labels(manifest["metadata"]["labels"])
    assert manifest["spec"]["activeDeadlineSeconds"] == 2  # whole seconds, rounded up (the CRD's int64)


def test_the_schema_refuses_a_zero_deadline(schema):
    manifest = trainjob_manifest(name="amft-r-train", namespace="ns", image="img", command=["torchrun"],
                                 active_deadline_s=10)
    manifest["spec"]["activeDeadlineSeconds"] = 0
    with pytest.raises(jsonschema.ValidationError, match="minimum"):
        jsonschema.validate(manifest, schema)
    with pytest.raises(TrainJobError, match="active deadline=-5"):
        trainjob_manifest(name="amft-r-train", namespace="ns", image="img", command=["torchrun"], active_deadline_s=-5)


@pytest.mark.parametrize(("queue", "priority", "message"), [
    ("Team A", "", "p0_kueue_queue='Team A': not a Kubernetes label value"),
    ("q" * 64, "", "p0_kueue_queue='qqqq"),
    ("team-a", "-low", "p0_kueue_priority_class='-low'"),
    ("", "batch-low", "p0_kueue_priority_class='batch-low' needs p0_kueue_queue"),
])
def test_bad_kueue_settings_are_one_clear_line(queue, priority, message):
    with pytest.raises(TrainJobError, match=re.escape(message)) as err:
        stage_manifest(kueue_queue=queue, kueue_priority_class=priority)
    assert "\n" not in str(err.value)
