"""Lineage against a real SeaweedFS: the record traces a registered model to its S3 inputs,
`amft lineage --verify` passes on intact data and fails (exit 1, one line per problem) on a
tampered, deleted or added dataset object; secrets never reach the record."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from amft_lib import lineage, registry, storage


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy, save_policy

    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    return save_policy(model, tok, tmp_path_factory.mktemp("lineage") / "model")


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    """One SQLite registry for the module (its schema takes seconds to create); tests use distinct names."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _parser() -> argparse.ArgumentParser:
    from amft_lib.cli.evaluate import register

    parser = argparse.ArgumentParser(prog="amft")
    register(parser.add_subparsers(dest="command"))
    return parser


def _upload_dataset(prefix: str) -> str:
    data = storage.join(prefix, "data")
    storage.put_bytes(storage.join(data, "train.parquet"), b"PAR1 train rows PAR1")
    storage.put_bytes(storage.join(data, "test_id.parquet"), b"PAR1 test rows PAR1")
    card = {"task": "general_points", "source": "generated", "generator": {"rule_id": "face10", "seed": 1234},
            "splits": {"train": {"file": "train.parquet", "rows": 3, "sha256": "…"}}, "inputs": []}
    storage.put_bytes(storage.join(data, "card.json"), json.dumps(card).encode())
    return data


def _delete_object(s3, uri: str) -> None:
    import boto3

    bucket, key = storage.split_s3(uri)
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region,
                          aws_access_key_id=s3.access_key_id, aws_secret_access_key=s3.secret_access_key)
    client.delete_object(Bucket=bucket, Key=key)
    assert not storage.exists(uri)


@pytest.mark.s3
def test_verify_passes_on_intact_data_and_catches_tampering(s3, s3_prefix, model_dir, tracking, tmp_path, capsys):
    data = _upload_dataset(s3_prefix)
    record = lineage.build_lineage(
        "run-s3",
        config={"seed": 0},
        inputs=lineage.describe_inputs("dataset", data),
        validation={"passed": True, "statistics": {"success_percent": 100.0}},
        base_model={"id": "tiny"},
        checkpoints=[storage.join(s3_prefix, "checkpoints", "step-0000010")],
        mu_summary=lineage.summarize_mu([0.5, 0.55, 0.6]),
        eval_metrics={"blessed": True, "reason": "blessed: first run", "test_id": {"accuracy": 0.5}},
    )
    assert {e["uri"].rsplit("/", 1)[-1] for e in record["inputs"]} == {"train.parquet", "test_id.parquet",
                                                                       "card.json"}
    assert all(e["group"] == data for e in record["inputs"])
    lin = lineage.write_lineage(record, storage.join(s3_prefix, "lineage.json"))
    assert lineage.verify_lineage(lineage.read_lineage(lin)) == []

    result = registry.register_model(
        model_dir, {"blessed": True, "reason": "blessed: first run", "test_id": {"accuracy": 0.5}}, "gp-s3",
        "run-s3", lineage_uri=lin, tracking_uri=tracking, artifact_root=str(tmp_path / "mlartifacts"),
    )
    assert result.created

    parser = _parser()
    args = parser.parse_args(["lineage", "gp-s3@champion", "--tracking-uri", tracking, "--verify"])
    # the data match, but a record naming only data does not prove the model: each missing object named
    assert args.handler(args) == 1
    out = capsys.readouterr().out
    assert "gp-s3 version 1 @champion" in out and f"{data}/train.parquet" in out
    assert "↑ validation  passed" in out and "step-0000010" in out
    assert "↑ raw data    generated general_points; generator rule_id=face10, seed=1234" in out
    failed = [ln for ln in out.splitlines() if ln.startswith("verify: FAILED")]
    assert failed[:-1] == [f"verify: FAILED {n} -: not recorded" for n in (*lineage.REQUIRED_OBJECTS,
                                                                            lineage.REGISTRY_OBJECT)]
    assert failed[-1].startswith("verify: FAILED 5 mismatch(es); ") and "3 file(s)" in failed[-1]
    assert "signature unsigned" in failed[-1]  # written without AMFT_LINEAGE_SECRET_KEY

    # tamper with one object, delete another, drop a new file into the dataset folder
    storage.put_bytes(storage.join(data, "train.parquet"), b"PAR1 poisoned rows PAR1")
    _delete_object(s3, storage.join(data, "card.json"))  # storage.delete_prefix treats URIs as folders
    storage.put_bytes(storage.join(data, "extra.parquet"), b"PAR1 injected PAR1")
    args = parser.parse_args(["lineage", "gp-s3:1", "--tracking-uri", tracking, "--verify"])
    assert args.handler(args) == 1
    failed = [ln for ln in capsys.readouterr().out.splitlines()
              if ln.startswith("verify: FAILED") and not ln.endswith("not recorded")][:-1]
    assert len(failed) == 3
    by_file = {ln.split(": ", 2)[1].rsplit("/", 1)[-1]: ln for ln in failed}
    assert "size mismatch: 23 bytes, more than the recorded 20" in by_file["train.parquet"]  # not downloaded
    assert "missing" in by_file["card.json"]
    assert "unexpected file" in by_file["extra.parquet"]


@pytest.mark.s3
def test_lineage_record_has_no_secrets(s3, s3_prefix, tmp_path):
    data = _upload_dataset(s3_prefix)
    secret = s3.secret_access_key
    record = lineage.build_lineage(
        "run-secret",
        # a careless caller passes credentials along: the record must still not hold them
        config={"storage": {"secret": secret, "endpoint": f"http://key:{secret}@127.0.0.1:1/"}},
        inputs=lineage.describe_inputs("dataset", data),
        warm_start={"note": f"signed https://h/o?X-Amz-Signature={secret}&x=1"},
    )
    uri = lineage.write_lineage(record, storage.join(s3_prefix, "lineage.json"))
    text = storage.get_bytes(uri).decode()
    assert secret not in text and s3.access_key_id not in json.dumps(record["inputs"])
    assert '"***"' in text and "http://***@127.0.0.1" in text and "X-Amz-Signature=***" in text
    assert lineage.read_lineage(uri)["run_id"] == "run-secret"
    assert len(lineage.read_lineage(s3_prefix)["inputs"]) == 3  # a run folder resolves to its lineage.json


@pytest.mark.s3
def test_registry_artifacts_on_s3_round_trip(s3, s3_prefix, model_dir, tracking, tmp_path):
    """MLflow's artifact root on SeaweedFS (MLFLOW_S3_ENDPOINT_URL from the fixture): log, then download."""
    result = registry.register_model(
        model_dir, {"blessed": True, "reason": "ok"}, "gp-s3-artifacts", "run-art",
        tracking_uri=tracking, artifact_root=storage.join(s3_prefix, "mlflow"),
        experiment="amft-s3",  # the artifact root applies when an experiment is created
    )
    ref = registry.resolve("gp-s3-artifacts@champion", tracking)
    assert ref.artifact_uri.startswith(s3_prefix) and result.version == ref.version
    # an MLflow transformers model on S3: MLmodel beside the weights (safetensors)
    assert storage.exists(storage.join(ref.artifact_uri, "MLmodel"))
    assert storage.exists(storage.join(ref.artifact_uri, "model", "model.safetensors"))
    local = registry.download_model(ref, tmp_path / "dl", tracking)
    from safetensors.torch import load_file

    got, want = load_file(local / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)  # the same weights back


def test_run_facts_and_base_model_hash_local(tmp_path, monkeypatch):
    """Without S3: μ summary from metrics.jsonl, complete checkpoints only, the base model
    folder hash, image digests from the environment, and a changed base model caught by verify."""
    monkeypatch.setenv("AMFT_IMAGE_DIGEST_CPU", "sha256:" + "a" * 64)
    run = tmp_path / "run"
    for step, complete in ((10, True), (20, True), (30, False)):  # step 30 crashed before its manifest
        ck = run / "checkpoints" / f"step-{step:07d}"
        ck.mkdir(parents=True)
        (ck / "model.safetensors").write_bytes(b"w")
        if complete:
            (ck / "MANIFEST.json").write_text("{}")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (  # μ per step, then the final μ
        {"step": 0, "mu": 0.5}, {"step": 1, "mu": 0.7}, {"step": 2, "mu": 0.3}, {"step": 3, "final": True, "mu": 0.4})))
    (run / "config.yaml").write_text("seed: 3\ncontroller:\n  method: amft\n")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"weights")

    record = lineage.build_lineage(
        "run-local",
        config=lineage.read_run_config(str(run)),
        base_model={"id": "my-base", "uri": str(base)},
        checkpoints=lineage.find_checkpoints(str(run)),
        mu_summary=lineage.summarize_mu(lineage.mu_trajectory(str(run))),
    )
    assert [c.rsplit("/", 1)[-1] for c in record["checkpoints"]] == ["step-0000010", "step-0000020"]
    assert record["mu_summary"] == pytest.approx({"min": 0.3, "max": 0.7, "final": 0.4, "mean": 0.475,
                                                  "first": 0.5, "n": 4})
    assert record["config"]["seed"] == 3 and len(record["config_hash"]) == 64
    assert record["image_digests"] == {"cpu": "sha256:" + "a" * 64}
    assert record["git_commit"] is None or len(record["git_commit"]) >= 40
    from amft_lib.config import TrainConfig, config_hash

    # a config dataclass is recorded with the same hash checkpoints carry
    assert lineage.build_lineage("r", config=TrainConfig())["config_hash"] == config_hash(TrainConfig())
    chain = lineage.format_chain(record)
    assert "my-base" in chain and "step-0000020" in chain and "final=0.4" in chain

    assert lineage.verify_lineage(record) == []
    (base / "model.safetensors").write_bytes(b"other weights")
    [problem] = lineage.verify_lineage(record)
    assert problem.name == "base_model" and problem.problem == "sha256 mismatch"
