"""MLflow 3 LoggedModels end to end on a real SQLite store: the training stage's tail records each
checkpoint (real amft_lib.checkpoint saves) as an external LoggedModel; registration logs the servable
model into the final checkpoint's LoggedModel, so the version's source *is* that LoggedModel
(`models:/<model_id>`), the lineage record names it, and the version still loads and serves. A
`candidate` alias leaves @champion to `registry.promote` (the approval)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amft_lib import lineage, registry, tracking

BLESSED = {"blessed": True, "reason": "blessed: test_id.accuracy=0.6 >= 0.5",
           "test_id": {"accuracy": 0.6, "n": 10}}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy, save_policy

    root = tmp_path_factory.mktemp("lm")
    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    return {"root": root, "uri": f"sqlite:///{root / 'mlflow.db'}", "artifacts": str(root / "mlartifacts"),
            "model": save_policy(model, tok, root / "model")}


def _train(store: dict, run_id: str, steps: tuple[int, ...], tmp: Path) -> dict[int, str]:
    """What the train stage does for `run_id`: checkpoints under the run root while the tail runs;
    returns {step: LoggedModel id}."""
    import torch

    from amft_lib import checkpoint

    root, logs = tmp / "run-root", tmp / "logs"
    logs.mkdir(parents=True)
    with tracking.track_stage(store["uri"], run_id, "train", {"max_steps": steps[-1]}, logs, interval_s=0.05,
                              artifact_root=store["artifacts"], checkpoint_root=str(root), system_metrics_s=None):
        for step in steps:
            with (logs / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": step - 1, "mu": 0.5, "val_accuracy": step / 10}) + "\n")
            checkpoint.save_checkpoint(str(root), step, checkpoint.CheckpointPayload(
                model_state={"w": torch.ones(2)}, optimizer_state={"state": {}}, scheduler_state={},
                controller_state={}, rng_state=checkpoint.capture_rng_state(), trainer_state={"step": step}),
                "cfg", keep_last=5)
    client = registry.get_client(store["uri"])
    exp = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    return {int(m.tags[tracking.CHECKPOINT_STEP_TAG]): m.model_id for m in client.search_logged_models(
        [exp], filter_string=f"tags.`amft.run_id` = '{run_id}'")}


def test_the_registered_version_is_the_final_checkpoints_logged_model(store, tmp_path, monkeypatch):
    for name in tracking.PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    models = _train(store, "run-lm-1", (2, 4), tmp_path)
    assert sorted(models) == [2, 4]
    record = tmp_path / "lineage.json"
    lineage.write_lineage(lineage.build_lineage("run-lm-1", config={"seed": 0}), str(record))

    result = registry.register_model(store["model"], BLESSED, "amft-lm", "run-lm-1", lineage_uri=str(record),
                                     tracking_uri=store["uri"], artifact_root=store["artifacts"],
                                     alias=registry.CANDIDATE_ALIAS)
    client = registry.get_client(store["uri"])
    version = client.get_model_version("amft-lm", result.version)
    assert result.logged_model_id == models[4] and version.source == f"models:/{models[4]}"
    final = client.get_logged_model(models[4])
    assert tracking.EXTERNAL_TAG not in final.tags  # it holds the servable model now
    assert final.tags[tracking.CHECKPOINT_URI_TAG].endswith("step-0000004")  # and still points at its checkpoint
    assert {m.key: m.value for m in final.metrics} == {"val_accuracy": 0.4}
    assert "MLmodel" in {f.path for f in client.list_logged_model_artifacts(models[4])}
    assert client.list_artifacts(result.mlflow_run_id, registry.MODEL_ARTIFACT_PATH) == []  # one copy, not two
    assert client.list_logged_model_artifacts(models[2]) == []  # the other checkpoints stay external
    assert lineage.read_lineage(str(record))["registry"]["logged_model_id"] == models[4]
    # the lineage record hashes what the registry serves: the LoggedModel's files, where MLflow keeps them
    from amft_lib.run.summary import record_registry_copy

    assert record_registry_copy(str(record), result, store["uri"]) is True
    served_files = [e for e in lineage.read_lineage(str(record))["objects"] if e["name"] == lineage.REGISTRY_OBJECT]
    assert served_files and all(e["uri"].startswith(final.artifact_location) for e in served_files)
    assert any(e["path"].endswith(".safetensors") for e in served_files)
    # registered as the candidate: @champion is left to the approval
    assert result.alias == "candidate" and result.alias_moved
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias("amft-lm", "champion")
    # the version still downloads as a plain HF directory and serves
    hf = registry.download_model("amft-lm@candidate", tmp_path / "dl", tracking_uri=store["uri"])
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    mlflow.set_tracking_uri(store["uri"])
    served = mlflow.pyfunc.load_model("models:/amft-lm@candidate")
    assert isinstance(served.predict(["1 2 3 4"])[0], str)

    # a retried registration finds the same version and LoggedModel
    again = registry.register_model(store["model"], BLESSED, "amft-lm", "run-lm-1", tracking_uri=store["uri"],
                                    artifact_root=store["artifacts"], alias=registry.CANDIDATE_ALIAS)
    assert (again.created, again.version, again.logged_model_id) == (False, result.version, models[4])

    # the approval: promote moves @champion forward only
    assert registry.promote("amft-lm", result.version, tracking_uri=store["uri"]) is True
    assert str(client.get_model_version_by_alias("amft-lm", "champion").version) == result.version
    assert registry.promote("amft-lm", result.version, tracking_uri=store["uri"]) is False


def test_without_logged_models_the_register_run_holds_the_model_as_before(store, monkeypatch):
    for name in tracking.PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    result = registry.register_model(store["model"], BLESSED, "amft-lm-plain", "run-lm-none",
                                     tracking_uri=store["uri"], artifact_root=store["artifacts"])
    version = registry.get_client(store["uri"]).get_model_version("amft-lm-plain", result.version)
    assert result.logged_model_id is None and version.source.startswith("runs:/")
    assert result.alias == "champion" and result.alias_moved


@pytest.mark.parametrize("alias", ["latest", "v3", "", "cand idate", "-x"])
def test_a_bad_alias_is_refused_in_one_line(store, alias):
    with pytest.raises(registry.RegistryInputError, match="alias") as err:
        registry.register_model(store["model"], BLESSED, "amft-lm-bad", "run-bad", tracking_uri=store["uri"],
                                alias=alias)
    assert "\n" not in str(err.value)
