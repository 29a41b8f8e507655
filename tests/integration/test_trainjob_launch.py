"""The train stage's cluster path end to end, minus Kubernetes: `train_stage(..., launcher="trainjob")`
on a run root in a real SeaweedFS, with the API server replaced by `LocalTrainer` — a stand-in for the
Kubernetes API server *and* Kubeflow Trainer's controller. Creating a TrainJob runs what the job's pod
would run: the manifest's `trainer.command + args` with only the manifest's env (plain values, and
secretKeyRefs resolved from a fake secret store holding the S3 keys) plus the `PET_*` variables the
runtime's torch plugin injects for torchrun (PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT). Its status follows the process: Created, then Complete or Failed.
It also answers the two CoreV1Api calls of the log tail: the process is the job's node-0 pod, and its
output, timestamped line by line as the kubelet does, is that pod's log.

So this checks what a unit test cannot: the TrainJob's command starts the worker under torchrun from the
PET_* variables alone, the worker gets its credentials only through the secret references (the test's
own AWS_* variables are not passed on), reads everything from the S3 run root, and rank 0 publishes what
the launcher then turns into the task's outputs. One node × 2 CPU ranks (gloo), a tiny model, 4 steps.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes.client import V1ObjectMeta, V1Pod, V1PodList, V1PodStatus

from amft_lib import storage
from amft_lib.config import TrainConfig, apply_overrides, config_to_dict, load_config
from amft_lib.run import scale_out, stages
from amft_lib.run.layout import RunRoot, publish, put_json, write_pointer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.s3

TINY = ["max_steps=4", "eval_every=0", "eval_prompts=4", "eval_samples=1", "device=cpu", "checkpoint_every=2",
        "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "rollout.prompts_per_step=2",
        "rollout.group_size=2", "rollout.max_new_tokens=16", "loss.sft_batch_size=4", "controller.meta_interval=2",
        "controller.meta_val_prompts=4", "controller.meta_val_group=2", "log_samples=0",
        "distributed.strategy=ddp", "distributed.backend=gloo"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalTrainer:
    """Stand-in for the API server + Trainer controller (see the module docstring). Records calls."""

    def __init__(self, secrets: dict[str, dict[str, str]], schema: dict) -> None:
        self.secrets, self.schema = secrets, schema
        self.jobs: dict[str, tuple[dict, subprocess.Popen]] = {}
        self.calls: list[str] = []
        self.pod_logs: dict[str, list[str]] = {}  # pod name → kubelet-style "RFC3339Nano line" entries
        self.kubelets: dict[str, threading.Thread] = {}

    def _env(self, manifest: dict) -> dict[str, str]:
        trainer = manifest["spec"]["trainer"]
        env = {k: os.environ[k] for k in ("PATH", "HOME", "PYTHONPATH", "TMPDIR") if k in os.environ}
        env["OMP_NUM_THREADS"] = "1"
        for entry in trainer["env"]:
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            ref = entry["valueFrom"]["secretKeyRef"]
            value = self.secrets.get(ref["name"], {}).get(ref["key"])
            if value is None and not ref.get("optional"):
                raise AssertionError(f"pod would not start: secret {ref['name']}/{ref['key']} missing")
            if value is not None:
                env[entry["name"]] = value
        env.update(PET_NNODES=str(trainer["numNodes"]), PET_NPROC_PER_NODE=str(trainer["numProcPerNode"]),
                   PET_NODE_RANK="0", PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(free_port()))
        return env

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append("create")
        jsonschema.validate(body, self.schema)
        assert body["spec"]["trainer"]["numNodes"] == 1, "this stand-in runs one node"
        command = [sys.executable if c == "python" else c for c in body["spec"]["trainer"]["command"]]
        proc = subprocess.Popen([*command, *body["spec"]["trainer"]["args"]], env=self._env(body),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.jobs[body["metadata"]["name"]] = (body, proc)
        lines = self.pod_logs.setdefault(f"{body['metadata']['name']}-node-0-0-x", [])
        self.kubelets[body["metadata"]["name"]] = threading.Thread(target=self._kubelet, args=(proc, lines),
                                                                   daemon=True)
        self.kubelets[body["metadata"]["name"]].start()
        return body

    @staticmethod
    def _kubelet(proc: subprocess.Popen, lines: list[str]) -> None:
        for line in proc.stdout:
            lines.append(f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%dT%H:%M:%S.%fZ')} {line.rstrip()}")

    def list_namespaced_pod(self, namespace, label_selector=""):
        wanted = dict(part.split("=", 1) for part in label_selector.split(","))
        pods = []
        for name, (_, proc) in self.jobs.items():
            labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                      "batch.kubernetes.io/job-completion-index": "0"}
            if wanted.items() <= labels.items():
                phase = "Running" if proc.poll() is None else "Succeeded" if proc.returncode == 0 else "Failed"
                pods.append(V1Pod(metadata=V1ObjectMeta(name=f"{name}-node-0-0-x", labels=labels),
                                  status=V1PodStatus(phase=phase)))
        return V1PodList(items=pods)

    def read_namespaced_pod_log(self, name, namespace, container="", tail_lines=None, timestamps=False, **kwargs):
        assert container == "node"
        lines = list(self.pod_logs[name])[-tail_lines:] if tail_lines else list(self.pod_logs[name])
        return "".join((line if timestamps else line.split(" ", 1)[1]) + "\n" for line in lines)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append("get")
        body, proc = self.jobs[name]
        if proc.poll() is not None:
            self.kubelets[name].join()  # as on a node: the container's log is whole once it has exited
        conditions = [{"type": "Created", "status": "True", "reason": "JobSetCreated"}]
        if proc.poll() == 0:
            conditions.append({"type": "Complete", "status": "True", "reason": "JobSetCompleted"})
        elif proc.poll() is not None:
            conditions.append({"type": "Failed", "status": "True", "reason": "JobsFailed",
                               "message": f"node-0 exited with {proc.returncode}"})
        return {**body, "status": {"conditions": conditions}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self.calls.append("delete")
        body, proc = self.jobs.pop(name)
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def crd_schema() -> dict:
    crd = yaml.safe_load((ROOT / "tests" / "specs" / "kubeflow-trainer" / "trainer.kubeflow.org_trainjobs.yaml")
                         .read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_trainjob_path_trains_and_publishes_through_s3(s3, s3_prefix, tmp_path, monkeypatch, crd_schema, capfd):
    from amft_lib.model import load_policy, save_policy

    run = RunRoot.at(f"{s3_prefix}/runs/tj1")
    cfg = apply_overrides(load_config(ROOT / "configs" / "tiny_gp.yaml", TrainConfig), TINY)
    stages.prepare_stage(run, str(tmp_path / "dataset"), task="general_points", input_uri="", train_size=48,
                         val_size=8, test_id_size=4, test_ood_size=4, seed=3)
    policy, tokenizer = load_policy(cfg.model, device="cpu", seed=0)
    save_policy(policy, tokenizer, tmp_path / "warm_model")
    publish(tmp_path / "warm_model", run.warm_start_model)
    write_pointer(tmp_path / "warm_artifact", run.warm_start_model)  # what the warm-start task's artifact holds
    put_json(run.warm_start_stats, {"target_entropy_temperature": cfg.rollout.temperature})

    fake = LocalTrainer({"amft-s3": {"AWS_ACCESS_KEY_ID": s3.access_key_id,
                                     "AWS_SECRET_ACCESS_KEY": s3.secret_access_key}}, crd_schema)
    monkeypatch.setattr(stages, "launch_trainjob",
                        functools.partial(scale_out.launch_trainjob, api=fake, core=fake, namespace="team-a"))
    job = scale_out.ClusterJob(image="amft:test", s3_secret="amft-s3", registry_secret="amft-registry",
                               s3_endpoint_url=s3.endpoint_url, poll_s=0.5, timeout_s=300)
    out = tmp_path / "kfp"
    outcome = stages.train_stage(
        run, str(tmp_path / "dataset"), json.dumps(config_to_dict(cfg)), target_entropy=1.0,
        init_model=str(tmp_path / "warm_artifact"), run_dir=str(out / "run_dir"), model_dir=str(out / "model"),
        curves_path=str(out / "curves.html"), num_nodes=1, nproc_per_node=2, launcher="trainjob", cluster=job)

    assert fake.calls[0] == "create" and fake.calls[-1] == "delete"  # deleted once Complete
    printed = capfd.readouterr().out.splitlines()
    pod_lines = [line.split("] ", 1)[1] for line in printed if line.startswith("[amft-tj1-train-node-0-0-x] ")]
    assert "rank 1/2 (local 1) on cpu: ddp over gloo" in "\n".join(pod_lines)  # torchrun from PET_* alone
    # the node-0 pod's whole output reached the task's log, each line once, in order
    assert pod_lines == [line.split(" ", 1)[1] for line in fake.pod_logs["amft-tj1-train-node-0-0-x"]]
    assert any(k.endswith(".safetensors") for k in storage.list_prefix(run.model))
    assert json.loads(storage.get_bytes(run.train_result))["steps"] == 4
    assert outcome.metrics["steps"] == 4.0 and (out / "run_dir" / "metrics.jsonl").is_file()
    assert json.loads((out / "model" / "MODEL_URI.json").read_text())["uri"] == run.model
