"""MLflow Model Registry on a real SQLite store: blessed-only registration, provenance tags, the
`champion` alias, idempotent retries, and no secrets in anything the registry keeps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from amft_lib import lineage, registry

SECRET = "s3cr3t-DO-NOT-LEAK-4f9a2c"


def blessed_metrics(acc: float = 0.6, blessed: bool = True) -> dict:
    return {
        "schema_version": 1,
        "model": "candidate",
        "test_id": {"accuracy": acc, "pass_at_k": 0.8, "k": 4, "n_samples": 8, "n": 50,
                    "format_error_rate": 0.1, "mean_response_tokens": 40.0},
        "test_ood": {"accuracy": acc / 2, "pass_at_k": 0.5, "k": 4, "n_samples": 8, "n": 50,
                     "format_error_rate": 0.2, "mean_response_tokens": 44.0},
        "blessed": blessed,
        "reason": "blessed: test_id.accuracy=0.6 >= threshold 0.5; no champion (first run)" if blessed
        else "not blessed: test_id.accuracy=0.1 is below the threshold 0.5",
        "comparisons": {"base": {"model": "tiny", "test_id": {"accuracy": 0.0}}},
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One SQLite registry for the module (creating its schema costs ~4 s); tests use distinct names."""
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy, save_policy
    from amft_lib.tasks.general_points import generate_rows

    root = tmp_path_factory.mktemp("registry")
    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    model_dir = save_policy(model, tok, root / "model")
    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=1)
    other_model = save_policy(model, tok, root / "other_model")
    data = root / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(generate_rows(4, "face10", seed=0, split="train")), data / "train.parquet")
    return {
        "root": root,
        "uri": f"sqlite:///{root / 'mlflow.db'}",
        "artifacts": str(root / "mlartifacts"),
        "model": model_dir,
        "other_model": other_model,
        "data": data,
    }


def write_record(store: dict, run_id: str, path: Path, **extra) -> str:
    record = lineage.build_lineage(
        run_id,
        config={"seed": 0, "controller": {"method": "amft"}},
        inputs=lineage.describe_inputs("dataset", str(store["data"])),
        validation={"passed": True, "statistics": {"success_percent": 100.0, "evaluated_expectations": 12}},
        base_model={"id": "tiny", "uri": str(store["model"])},
        warm_start={"acceptance_rate": 0.35, "accepted": 70, "target_entropy": 1.23},
        mu_summary=lineage.summarize_mu([0.5, 0.6, 0.4, 0.45]),
        eval_metrics=blessed_metrics(),
        **extra,
    )
    return lineage.write_lineage(record, str(path))


def register(store: dict, name: str, run_id: str, metrics: dict | None = None, lineage_uri: str | None = None):
    return registry.register_model(
        store["model"], metrics or blessed_metrics(), name, run_id, lineage_uri=lineage_uri,
        tracking_uri=store["uri"], artifact_root=store["artifacts"],
    )


def n_versions(store: dict, name: str) -> int:
    return len(registry.get_client(store["uri"]).search_model_versions(f"name = '{name}'"))


def n_runs(store: dict) -> int:
    client = registry.get_client(store["uri"])
    exp = client.get_experiment_by_name(registry.DEFAULT_EXPERIMENT)
    return 0 if exp is None else len(client.search_runs([exp.experiment_id]))


def test_register_tags_alias_and_idempotent_retry(store, tmp_path):
    name = "gp-main"
    lin1 = write_record(store, "run-1", tmp_path / "run-1" / "lineage.json")
    first = register(store, name, "run-1", lineage_uri=lin1)
    assert first.registered and first.created and first.version == "1" and first.alias_moved

    mv = registry.resolve(f"{name}:1", store["uri"])
    tags = mv.tags
    assert tags["amft.run_id"] == "run-1"
    assert tags["amft.lineage_uri"] == lin1
    assert tags["amft.data_sha256"] == lineage.data_digest(lineage.read_lineage(lin1))
    assert tags["amft.validation.passed"] == "true"
    assert tags["amft.base_model"] == "tiny" and len(tags["amft.base_model_sha256"]) == 64
    assert tags["amft.warm_start.acceptance_rate"] == "0.35"
    assert float(tags["amft.mu.final"]) == pytest.approx(0.45)
    assert float(tags["amft.eval.test_id.accuracy"]) == pytest.approx(0.6)
    assert float(tags["amft.eval.test_ood.pass_at_k"]) == pytest.approx(0.5)
    # an MLflow transformers model: MLmodel with explicit requirements, safetensors, no pickle-format files
    files = {p.name for p in Path(mv.artifact_uri).rglob("*")}
    assert {"MLmodel", "requirements.txt", "model.safetensors", "config.json", "tokenizer.json"} <= files
    assert not {f for f in files if f.endswith((".bin", ".pt", ".pkl"))}
    assert "torch==" in (Path(mv.artifact_uri) / "requirements.txt").read_text()
    # the lineage record now names the registered version
    assert lineage.read_lineage(lin1)["registry"]["version"] == "1"

    # a newer blessed run with another model: version 2, the alias moves
    second = registry.register_model(store["other_model"], blessed_metrics(0.7), name, "run-2",
                                     tracking_uri=store["uri"], artifact_root=store["artifacts"])
    assert second.version == "2" and second.created and second.alias_moved
    assert registry.resolve(f"{name}@champion", store["uri"]).version == "2"
    assert registry.resolve(name, store["uri"]).version == "2"  # NAME alone: latest
    assert "champion" in registry.resolve(f"{name}@champion", store["uri"]).aliases

    # retrying run-1 (pipeline retry): same version back, nothing created, champion stays at 2
    runs_before = n_runs(store)
    again = register(store, name, "run-1", lineage_uri=lin1)
    assert again.registered and not again.created and again.version == "1" and not again.alias_moved
    assert n_versions(store, name) == 2 and n_runs(store) == runs_before
    assert registry.resolve(f"{name}@champion", store["uri"]).version == "2"


def test_evaluate_resolves_registry_uris(store, tmp_path):
    from amft_lib.evaluate import _resolve_model

    register(store, "gp-eval", "run-e")
    local = _resolve_model("models:/gp-eval@champion", tmp_path, "champion", store["uri"])
    assert (Path(local) / "model.safetensors").exists()
    # no champion yet (first run): the comparison is dropped, not an error
    assert _resolve_model("models:/gp-none@champion", tmp_path, "champion", store["uri"]) is None


def test_not_blessed_registers_nothing(store):
    runs_before = n_runs(store)
    result = register(store, "gp-unblessed", "run-x", blessed_metrics(0.1, blessed=False))
    assert not result.registered and result.version is None
    assert "did not bless" in result.reason and "below the threshold" in result.reason
    assert n_versions(store, "gp-unblessed") == 0 and n_runs(store) == runs_before
    with pytest.raises(LookupError):
        registry.resolve("gp-unblessed@champion", store["uri"])
    with pytest.raises(LookupError):
        registry.resolve("gp-unblessed", store["uri"])


def test_tags_and_records_never_hold_secrets(store, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    path = tmp_path / "lineage.json"
    write_record(store, "run-s", path)
    # simulate a leak that bypassed build_lineage: the secret written straight into the file
    record = json.loads(path.read_text())
    record["warm_start"]["note"] = f"key={SECRET}"
    record["inputs"][0]["uri_hint"] = f"s3://user:{SECRET}@host/bucket"
    path.write_text(json.dumps(record))
    metrics = blessed_metrics()
    metrics["reason"] += f" (debug {SECRET})"
    result = register(store, "gp-secret", "run-s", metrics, lineage_uri=str(path))
    assert result.registered

    mv = registry.resolve("gp-secret:1", store["uri"])
    assert mv.tags["amft.warm_start.note"] == "key=***"
    client = registry.get_client(store["uri"])
    run = client.get_run(mv.run_id)
    dumped = json.dumps([mv.tags, run.data.tags, run.data.params, run.data.metrics,
                         client.get_model_version("gp-secret", "1").description])
    assert SECRET not in dumped
    assert SECRET not in path.read_text()  # the record was rewritten (registry fields) redacted
    logged = Path(mv.artifact_uri).parent / "lineage" / "lineage.json"
    assert logged.exists() and SECRET not in logged.read_text()


def test_refuses_pickled_weights_and_bad_names(store, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickle"):
        registry.register_model(bad, blessed_metrics(), "gp-bad", "run-b", tracking_uri=store["uri"])
    with pytest.raises(ValueError, match="run id"):
        registry.register_model(store["model"], blessed_metrics(), "gp", "x' or '1'='1", tracking_uri=store["uri"])


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("gp", registry.ModelSpec("gp")),
        ("gp:3", registry.ModelSpec("gp", version="3")),
        ("gp@champion", registry.ModelSpec("gp", alias="champion")),
        ("models:/gp/7", registry.ModelSpec("gp", version="7")),
        ("models:/gp@champion", registry.ModelSpec("gp", alias="champion")),
    ],
)
def test_parse_model_spec(spec, expected):
    assert registry.parse_model_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "gp:latest", "gp@", "gp'x"])
def test_parse_model_spec_rejects(spec):
    with pytest.raises(ValueError):
        registry.parse_model_spec(spec)


def test_cli_register_and_lineage_verify_local(store, tmp_path, capsys):
    from amft_lib.cli.evaluate import register as add_commands

    parser = argparse.ArgumentParser(prog="amft")
    add_commands(parser.add_subparsers(dest="command"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.parquet").write_bytes((store["data"] / "train.parquet").read_bytes())
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    (eval_dir / "metrics.json").write_text(json.dumps(blessed_metrics()))
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    # a complete record: what makes the model besides the data (`--verify` refuses less)
    objects = [*lineage.describe_inputs("model", str(store["model"])),
               *lineage.describe_inputs("warm_start_model", str(store["model"])),
               *lineage.describe_inputs("train_config", str(tmp_path / "config.yaml")),
               *lineage.describe_inputs("eval_metrics", str(eval_dir / "metrics.json"))]
    record = lineage.build_lineage("run-cli", inputs=lineage.describe_inputs("dataset", str(data)), objects=objects,
                                   base_model={"id": "tiny"}, eval_metrics=blessed_metrics())
    lin = lineage.write_lineage(record, str(tmp_path / "lineage.json"))

    argv = ["register", "--model", str(store["model"]), "--eval", str(eval_dir), "--name", "gp-cli",
            "--run-id", "run-cli", "--lineage", lin, "--tracking-uri", store["uri"],
            "--artifact-root", store["artifacts"]]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    assert "gp-cli version 1 (created, @champion moved)" in capsys.readouterr().out

    args = parser.parse_args(["lineage", "gp-cli@champion", "--tracking-uri", store["uri"], "--verify"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "gp-cli version 1 @champion" in out and "train.parquet" in out and "verify: ok" in out

    (data / "train.parquet").write_bytes(b"tampered")
    args = parser.parse_args(["lineage", "gp-cli", "--tracking-uri", store["uri"], "--verify"])
    assert args.handler(args) == 1
    failed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("verify: FAILED")]
    assert len(failed) == 2 and "train.parquet: sha256 mismatch" in failed[0]  # one per mismatch, then a summary
    assert failed[1].startswith("verify: FAILED 1 mismatch(es); ")

    from amft_lib import cli  # the boundary that turns a user error into one line and exit 2

    assert cli.main(["lineage", "gp-nope@champion", "--tracking-uri", store["uri"]]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_champion_is_servable_and_downloads_as_a_plain_hf_directory(store, tmp_path, monkeypatch):
    """`mlflow.pyfunc.load_model("models:/NAME@champion")` answers a prompt (what `mlflow models serve`
    runs), and evaluation still gets a plain HF directory back."""
    import mlflow

    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy

    name = "gp-served"
    register(store, name, "run-served")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    served = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    answer = served.predict(["Cards: 1 2 3 4"])
    assert isinstance(answer[0], str) and answer[0].startswith("Cards: 1 2 3 4")
    local = registry.download_model(f"{name}@champion", tmp_path / "champion", store["uri"])
    assert (local / "config.json").is_file() and (local / "tokenizer.json").is_file()
    model, tok = load_policy(ModelConfig(name=str(local)))
    assert tok.decode(tok.encode("Cards: 1 2")) == "Cards: 1 2"


def _flip_one_weight_byte(folder: Path) -> None:
    """Change one byte inside the tensor data (past the header), so the file stays valid safetensors."""
    weights = folder / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    header = int.from_bytes(blob[:8], "little")
    blob[8 + header + 3] ^= 0x01
    weights.write_bytes(bytes(blob))


def test_an_identical_model_never_becomes_a_new_version(store, tmp_path):
    """Issue 21 item 5: the same weights again — here a staged copy carrying the model-source cache
    file `.amft-source.json` and a README, exactly what a same-seed rerun produced — are not a new
    version and @champion stays; one changed weight byte is a different model and is registered.
    The registry's own copy (MLflow transformers model, re-saved by save_pretrained) hashes the same
    as the folder it came from, so the evaluator's comparison against a downloaded champion holds."""
    from amft_lib import model_files

    name = "gp-identity"
    first = register(store, name, "run-a")
    assert first.created and first.version == "1"

    copy = tmp_path / "staged-copy"
    import shutil

    shutil.copytree(store["model"], copy)
    (copy / ".amft-source.json").write_text(json.dumps({"source": "s3://bucket/runs/run-b/model", "files": []}))
    (copy / "README.md").write_text("same model, other folder\n")
    again = registry.register_model(copy, blessed_metrics(0.9), name, "run-b", tracking_uri=store["uri"],
                                    artifact_root=store["artifacts"])
    assert not again.registered and not again.created and again.version == "1"
    assert "equals gp-identity version 1" in again.reason
    assert n_versions(store, name) == 1
    assert registry.resolve(f"{name}@champion", store["uri"]).version == "1"

    downloaded = registry.download_model(f"{name}@champion", tmp_path / "champion", store["uri"])
    assert model_files.content_digest(downloaded) == model_files.content_digest(store["model"])
    assert model_files.content_digest(copy) == model_files.content_digest(store["model"])

    _flip_one_weight_byte(copy)
    changed = registry.register_model(copy, blessed_metrics(0.9), name, "run-c", tracking_uri=store["uri"],
                                      artifact_root=store["artifacts"])
    assert changed.registered and changed.created and changed.version == "2" and changed.alias_moved
    assert registry.resolve(f"{name}@champion", store["uri"]).version == "2"
