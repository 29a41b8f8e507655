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


# ── KFP 2.17's MLflow plugin (KEP-12862) ───────────────────────────────────────────────────────────


def _plugin_runs(client, kfp_run: str) -> tuple[str, str]:
    """What the plugin's driver makes before a task starts: one parent run per KFP run, a nested run
    per task (created here with the client, as the driver does through the REST API; no KFP server runs)."""
    exp = client.create_experiment(f"kfp-{kfp_run}")
    parent = client.create_run(exp, run_name=kfp_run).info.run_id
    task = client.create_run(exp, run_name="train", tags={"mlflow.parentRunId": parent}).info.run_id
    return parent, task


def _amft_tree(client, run_id: str) -> list:
    """Runs our own tree would have created for pipeline run `run_id` (in our experiment, if any)."""
    exp = client.get_experiment_by_name(tracking.EXPERIMENT)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.RUN_ID_TAG}` = '{run_id}'") \
        if exp else []


def test_with_the_plugins_run_id_the_stage_logs_into_that_run_and_creates_no_tree(store, tmp_path, monkeypatch):
    client = registry.get_client(store)
    parent, task = _plugin_runs(client, "kfp-1")
    # the variables exactly as the plugin injects them into the task's container
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_RUN_ID", task)
    monkeypatch.setenv("MLFLOW_WORKSPACE", "team-a")
    runs_before = {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    with tracking.track_stage("sqlite:////nonexistent/elsewhere.db", "run-p", "train", {"max_steps": 4}, tmp_path,
                              interval_s=0.05, system_metrics_s=0.2) as child:
        _write(tmp_path / "metrics.jsonl", range(4), final=True)
        time.sleep(0.5)  # a system-metrics sample or two
    assert child == task  # the plugin's run, not one of ours (and its tracking URI, not the argument)
    runs_after = {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert runs_after == runs_before  # no parent, no nested run of our own
    assert _amft_tree(client, "run-p") == []
    run = client.get_run(task)
    assert [m.step for m in client.get_metric_history(task, "mu")] == list(range(4))
    assert run.data.params["max_steps"] == "4" and run.data.metrics["val_accuracy"] == 0.25
    assert run.data.tags[tracking.RUN_ID_TAG] == "run-p" and run.data.tags[tracking.STAGE_TAG] == "train"
    assert run.data.tags["mlflow.parentRunId"] == parent  # the plugin's tree, untouched
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    assert run.info.status == "RUNNING"  # the plugin's driver ends its own run


def test_a_retried_task_under_the_plugin_continues_without_duplicates(store, tmp_path, monkeypatch):
    client = registry.get_client(store)
    _, task = _plugin_runs(client, "kfp-2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_RUN_ID", task)
    with pytest.raises(RuntimeError), tracking.track_stage(None, "run-q", "train", {"seed": 0}, tmp_path,
                                                           interval_s=0.05, system_metrics_s=None):
        _write(tmp_path / "metrics.jsonl", range(3))
        raise RuntimeError("killed")
    retry = tmp_path / "retry"
    retry.mkdir()
    with tracking.track_stage(None, "run-q", "train", {"seed": 0}, retry, interval_s=0.05, system_metrics_s=None):
        _write(retry / "metrics.jsonl", range(5))
    assert [m.step for m in client.get_metric_history(task, "mu")] == list(range(5))


def test_without_the_plugin_the_stage_builds_its_own_tree(store, tmp_path, monkeypatch):
    for name in tracking.PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    client = registry.get_client(store)
    with tracking.track_stage(store, "run-t", "train", {}, tmp_path, interval_s=0.05, system_metrics_s=None) as child:
        _write(tmp_path / "metrics.jsonl", range(2))
    tree = {r.data.tags[tracking.STAGE_TAG]: r for r in _amft_tree(client, "run-t")}
    assert set(tree) == {"pipeline", "train"} and tree["train"].info.run_id == child
    assert tree["train"].data.tags["mlflow.parentRunId"] == tree["pipeline"].info.run_id
    assert tree["train"].info.status == "FINISHED"


def test_plugin_env_needs_the_run_id():
    assert tracking.plugin_env({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}) == {}
    assert tracking.plugin_env({"MLFLOW_RUN_ID": "abc", "MLFLOW_WORKSPACE": "ns", "OTHER": "x"}) == {
        "MLFLOW_RUN_ID": "abc", "MLFLOW_WORKSPACE": "ns"}


# ── checkpoints as MLflow 3 LoggedModels ──────────────────────────────────────────────────────────


def _save(root, step, val_reward):
    """A real checkpoint (amft_lib.checkpoint) of a 2-tensor model, retention keep_last=2."""
    import torch

    from amft_lib import checkpoint

    payload = checkpoint.CheckpointPayload(
        model_state={"w": torch.full((2, 2), float(step)), "b": torch.zeros(2)}, optimizer_state={"state": {}},
        scheduler_state={"last_epoch": step}, controller_state={"mu": 0.5}, rng_state=checkpoint.capture_rng_state(),
        trainer_state={"step": step})
    return checkpoint.save_checkpoint(str(root), step, payload, "cfg-1", keep_last=2, metric=val_reward)


def _write_eval(path, step, acc, final=False):
    """One metrics.jsonl record at `step` whose val numbers evaluate the weights after step + 1 updates
    (the final record: after `step`), as trainer.py writes them."""
    with path.open("a") as f:
        f.write(json.dumps({"step": step, "mu": 0.5, "val_accuracy": acc, "val_reward": acc / 2,
                            **({"final": True} if final else {})}) + "\n")


def test_each_checkpoint_becomes_a_logged_model_pointing_at_it(store, tmp_path, monkeypatch):
    for name in tracking.PLUGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    client = registry.get_client(store)
    root, logs = tmp_path / "root", tmp_path / "logs"
    logs.mkdir()
    with tracking.track_stage(store, "run-lm", "train", {}, logs, interval_s=0.05, checkpoint_root=str(root),
                              system_metrics_s=None) as child:
        for n, step in enumerate((2, 4, 6), 1):  # eval at k = step - 1 measures checkpoint `step`
            _write_eval(logs / "metrics.jsonl", step - 1, acc=step / 10)
            _save(root, step, step / 20)
            # training takes a while between checkpoints; here: until the tail has seen this one (a
            # checkpoint that retention deletes within one poll interval is never recorded)
            deadline = time.time() + 10
            while len(client.get_run(child).outputs.model_outputs) < n and time.time() < deadline:
                time.sleep(0.05)
            assert len(client.get_run(child).outputs.model_outputs) == n  # recorded while training runs
        _save(root, 7, None)  # the final checkpoint, then the final evaluation of those weights
        _write_eval(logs / "metrics.jsonl", 7, acc=0.9, final=True)
    exp = client.get_run(child).info.experiment_id
    models = client.search_logged_models([exp], filter_string="tags.`amft.run_id` = 'run-lm'")
    by_step = {int(m.tags[tracking.CHECKPOINT_STEP_TAG]): m for m in models}
    assert sorted(by_step) == [2, 4, 6, 7]  # one per checkpoint
    outputs = {o.model_id: o.step for o in client.get_run(child).outputs.model_outputs}
    for step, model in by_step.items():
        assert outputs[model.model_id] == step  # logged as the run's output at its step
        assert model.tags[tracking.CHECKPOINT_URI_TAG] == str(root / "checkpoints" / f"step-{step:07d}")
        assert model.tags[tracking.EXTERNAL_TAG] == "true" and model.source_run_id == child
        assert client.list_logged_model_artifacts(model.model_id) == []  # no second copy of the weights
        metrics = {m.key: m.value for m in client.get_logged_model(model.model_id).metrics}
        expected = 0.9 if step == 7 else step / 10
        assert metrics == {"val_accuracy": expected, "val_reward": expected / 2}, step
    # retention (keep_last=2, best by val_reward = step 6) deleted steps 2 and 4: tagged, not forgotten
    states = {s: client.get_logged_model(m.model_id).tags[tracking.CHECKPOINT_STATE_TAG] for s, m in by_step.items()}
    assert states == {2: "deleted", 4: "deleted", 6: "complete", 7: "complete"}
    # the val points are the run's own (no duplicates in its history)
    assert [m.step for m in client.get_metric_history(child, "val_accuracy")] == [1, 3, 5, 7]
