"""Issue 21 item 5 end to end: the whole DAG (kfp.local, real SeaweedFS, MLflow on SQLite) run twice with
the same seed into one registry. The second run trains byte-identical weights; its evaluation stages the
candidate from S3 (the staged copy carries `.amft-source.json`) and downloads the champion from MLflow
(re-saved by save_pretrained), so a folder listing differs while the model does not. The second run
must not add a version, and @champion must stay on version 1."""

from __future__ import annotations

import uuid

import pytest

from amft_lib import registry
from pipelines import local as pc
from pipelines.profiles import TEST

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_a_same_seed_rerun_adds_no_version_and_keeps_the_champion(tmp_path, s3_server):
    tracking = f"sqlite:///{tmp_path / 'registry' / 'mlflow.db'}"
    name = f"gp-rerun-{uuid.uuid4().hex[:6]}"
    runs = []
    for attempt in ("first", "second"):
        arguments = {**TEST, "p0_run_id": f"{name}-{attempt}", "p0_s3_root": s3_server.settings.uri("tests", name),
                     "p6_registry_model_name": name, "p6_registry_tracking_uri": tracking}
        runs.append(pc.run_local(tmp_path / attempt, arguments, s3_settings=s3_server.settings, threads=1))
        assert runs[-1].state == "SUCCEEDED", runs[-1].error
    first, second = (run.summary["stages"] for run in runs)
    assert first["register"]["registered"] is True and first["register"]["version"] == "1"
    assert second["eval"]["blessed"] is False and "identical to the champion" in second["eval"]["reason"], second
    assert not (second.get("register") or {}).get("registered"), second  # the register step is skipped
    versions = registry.get_client(tracking).search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert registry.resolve(f"{name}@champion", tracking).version == "1"
