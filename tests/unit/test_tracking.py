"""amft_lib.tracking: a training stage's config and per-step curves in MLflow, one point per step,
logged while the stage runs (real MLflow on SQLite)."""

from __future__ import annotations

import json
import time

import pytest

from amft_lib import registry, tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _write(path, steps, final=False):
    with path.open("a") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "mu": 0.5 + 0.01 * s, "entropy": 1.0, "meta_grad": None, "sft_loss": 2.0,
                                "elapsed_s": 0.1 * s}) + "\n")
        if final:
            f.write(json.dumps({"step": steps[-1] + 1, "final": True, "val_accuracy": 0.25}) + "\n")


def test_curves_are_logged_while_the_stage_runs_one_point_per_step(store, tmp_path):
    client = registry.get_client(store)
    config = {"controller": {"mu_init": 0.5, "method": "amft"}, "max_steps": 6}
    with tracking.track_stage(store, "run-a", "train", config, tmp_path, interval_s=0.05) as child:
        _write(tmp_path / "metrics.jsonl", range(3))
        deadline = time.time() + 10
        while len(client.get_metric_history(child, "mu")) < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert len(client.get_metric_history(child, "mu")) == 3  # before the stage ended
        _write(tmp_path / "metrics.jsonl", range(3, 6), final=True)
    run = client.get_run(child)
    assert run.info.status == "FINISHED"
    assert run.data.params["controller.mu_init"] == "0.5" and run.data.params["max_steps"] == "6"
    assert [m.step for m in client.get_metric_history(child, "mu")] == list(range(6))
    assert "meta_grad" not in run.data.metrics  # nulls are not points
    assert run.data.metrics["val_accuracy"] == 0.25
    parent = tracking.pipeline_run(client, "run-a")
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags[tracking.RUN_ID_TAG] == "run-a"


def test_a_retried_stage_continues_its_run_without_duplicate_points(store, tmp_path):
    client = registry.get_client(store)
    with pytest.raises(RuntimeError), tracking.track_stage(store, "run-b", "train", {"seed": 0}, tmp_path,
                                                           interval_s=0.05):
        _write(tmp_path / "metrics.jsonl", range(4))
        raise RuntimeError("killed")  # the first attempt dies after 4 steps
    first = client.search_runs([client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id],
                               filter_string="tags.`amft.run_id` = 'run-b' and tags.`amft.stage` = 'train'")
    assert first[0].info.status == "FAILED"
    # the retry resumes from a checkpoint at step 2: its metrics.jsonl holds steps 0..1 again, then continues
    retry = tmp_path / "retry"
    retry.mkdir()
    with tracking.track_stage(store, "run-b", "train", {"seed": 0}, retry, interval_s=0.05) as child:
        _write(retry / "metrics.jsonl", range(6))
    assert child == first[0].info.run_id
    assert [m.step for m in client.get_metric_history(child, "mu")] == list(range(6))


def test_a_log_rewritten_under_the_tail_is_reread_not_misparsed(store, tmp_path):
    """A resumed trainer rewrites metrics.jsonl (restored logs cut at the checkpoint's step) after the
    tail has read further into the old file, then appends: the tail's offset then points into the middle
    of a line. Seen as a failed retried train task (JSONDecodeError in the final flush) in
    tests/integration/test_pipeline_local.py; here the same sequence, deterministically."""
    client = registry.get_client(store)
    mlflow_run = tracking.pipeline_run(client, "run-c")  # any run to log into
    path = tmp_path / "metrics.jsonl"
    tail = tracking._Tail(client, mlflow_run, path, interval_s=3600, skip_through=-1)
    _write(path, range(5))  # what an earlier attempt left, steps 0..4, read by the tail
    tail.flush()
    path.write_text("")  # the restore: cut at step 2 …
    _write(path, range(2))
    with path.open("a") as f:  # … and the resumed run appends past the old offset (its own numbers)
        for step in range(2, 12):
            f.write(json.dumps({"step": step, "mu": 0.4, "entropy": 1.25, "resumed_from": 2}) + "\n")
    tail.flush()
    assert [m.step for m in client.get_metric_history(mlflow_run, "mu")] == list(range(12))


def test_an_unreachable_registry_does_not_stop_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default backoff takes minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with tracking.track_stage("http://127.0.0.1:9/", "run-c", "train", {}, tmp_path, interval_s=0.05) as child:
        assert child is None
