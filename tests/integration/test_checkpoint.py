"""amft_lib.checkpoint on a local folder and on a real SeaweedFS: round trip, integrity, resume rules,
retention, and a store that goes away in the middle of a save."""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import threading

import numpy as np
import pytest
import torch

from amft_lib import checkpoint, storage
from amft_lib.checkpoint import CheckpointPayload
from amft_lib.s3server import EmbeddedS3

pytestmark = pytest.mark.s3

HASH = "cfg-3f2a9c"


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    """A run root on local disk or on the shared SeaweedFS."""
    if request.param == "local":
        return str(tmp_path / "run")
    return storage.join(request.getfixturevalue("s3_prefix"), "runs", "r1")


def _payload(seed: int = 0, step: int = 3) -> CheckpointPayload:
    """A few real optimizer steps on a tiny model with tied weights, plus odd dtypes."""
    torch.manual_seed(seed)
    embed = torch.nn.Embedding(16, 8)
    head = torch.nn.Linear(8, 16, bias=False)
    head.weight = embed.weight  # tied, as in SmolLM2: safetensors refuses shared storage unless handled
    model = torch.nn.Sequential(embed, torch.nn.LayerNorm(8), head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=10)
    for _ in range(step):
        loss = model(torch.randint(0, 16, (4, 5))).logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    model_state = dict(model.state_dict())
    model_state["extra.bf16"] = torch.randn(3, 5).to(torch.bfloat16)
    model_state["extra.int"] = torch.arange(7)
    return CheckpointPayload(
        model_state=model_state,
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        controller_state={"mu": 0.25 + seed, "mu_velocity": -0.01, "target_entropy": 1.5},
        rng_state=checkpoint.capture_rng_state(),
        trainer_state={"step": step, "data_cursor": {"epoch": 1, "index": 37}, "sampler_seed": 1234},
    )


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where  # bitwise for every dtype used here
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _corrupt(uri: str, how: str) -> None:
    data = bytearray(storage.get_bytes(uri))
    if how == "truncate":
        del data[len(data) // 2 :]
    else:  # flip one bit, same size: only the sha can tell
        data[-1] ^= 0x01
    storage.put_bytes(uri, bytes(data))


def test_save_load_round_trip(root: str) -> None:
    payload = _payload()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    payload.rng_state = checkpoint.capture_rng_state()
    expected_draws = _draws()

    uri = checkpoint.save_checkpoint(root, 3, payload, HASH)

    assert uri == storage.join(root, "checkpoints", "step-0000003")
    assert storage.get_bytes(storage.join(root, "checkpoints", "LATEST")).decode().strip() == "step-0000003"
    manifest = json.loads(storage.get_bytes(storage.join(uri, "MANIFEST.json")))
    assert manifest["step"] == 3 and manifest["config_hash"] == HASH
    assert set(manifest["files"]) == set(checkpoint.FILES)
    for name, entry in manifest["files"].items():
        data = storage.get_bytes(storage.join(uri, name))
        assert (len(data), storage.sha256_bytes(data)) == (entry["size"], entry["sha256"])

    _draws()  # move every RNG on, as training would
    step, loaded = checkpoint.load_checkpoint(uri)
    assert step == 3
    _assert_same(payload.model_state, loaded.model_state, "model")
    _assert_same(payload.optimizer_state, loaded.optimizer_state, "optimizer")
    _assert_same(payload.scheduler_state, loaded.scheduler_state, "scheduler")
    assert loaded.controller_state == payload.controller_state
    assert loaded.trainer_state == payload.trainer_state
    checkpoint.restore_rng_state(loaded.rng_state)
    assert _draws() == expected_draws

    # The loaded state drives real objects again.
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 16, bias=False))
    model[2].weight = model[0].weight
    model.load_state_dict({k: v for k, v in loaded.model_state.items() if not k.startswith("extra.")})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(loaded.optimizer_state)
    assert optimizer.state_dict()["state"][0]["step"].item() == 3


@pytest.mark.parametrize("how", ["truncate", "alter"])
def test_find_resumable_skips_corrupt_and_incomplete(root: str, how: str, caplog: pytest.LogCaptureFixture) -> None:
    for step in (10, 20, 30):
        checkpoint.save_checkpoint(root, step, _payload(step=1), HASH, keep_last=5)
    # A save that died before its manifest: newest folder, no MANIFEST.json.
    storage.put_bytes(storage.join(root, "checkpoints", "step-0000040", "model.safetensors"), b"partial")
    _corrupt(storage.join(checkpoint.checkpoint_uri(root, 30), "model.safetensors"), how)

    caplog.set_level(logging.WARNING, logger="amft_lib.checkpoint")
    assert checkpoint.find_resumable(root, HASH) == checkpoint.checkpoint_uri(root, 20)
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 2
    assert "step-0000040" in skipped[0] and "incomplete" in skipped[0]
    assert "step-0000030" in skipped[1] and "model.safetensors" in skipped[1]

    with pytest.raises(checkpoint.CorruptCheckpointError):
        checkpoint.load_checkpoint(checkpoint.checkpoint_uri(root, 30))

    _corrupt(storage.join(checkpoint.checkpoint_uri(root, 20), "optimizer.pt"), how)
    found = checkpoint.resume(root, HASH)
    assert found is not None and found[:2] == (checkpoint.checkpoint_uri(root, 10), 10)
    listed = [(s, c) for s, _, c in checkpoint.list_checkpoints(root)]
    assert listed == [(10, True), (20, True), (30, True), (40, False)]


def test_config_hash_mismatch_is_refused_unless_forced(root: str, caplog: pytest.LogCaptureFixture) -> None:
    uri = checkpoint.save_checkpoint(root, 5, _payload(), HASH)
    with pytest.raises(checkpoint.ConfigMismatchError, match=f"{HASH}.*other-hash.*force"):
        checkpoint.find_resumable(root, "other-hash")
    caplog.set_level(logging.WARNING, logger="amft_lib.checkpoint")
    assert checkpoint.find_resumable(root, "other-hash", force=True) == uri
    assert "the run's config wins" in caplog.text
    assert checkpoint.find_resumable(storage.join(root, "elsewhere"), HASH) is None


@pytest.mark.parametrize(("mode", "best"), [("max", 2), ("min", 1)])
def test_retention_keeps_last_k_plus_best(s3_prefix: str, mode: str, best: int) -> None:
    root = storage.join(s3_prefix, "run")
    storage.put_bytes(storage.join(root, "checkpoints", "step-0000000", "model.safetensors"), b"crashed save")
    metrics = {1: 0.1, 2: 0.9, 3: 0.3, 4: 0.2, 5: 0.4, 6: 0.5}
    payload = _payload(step=1)
    for step, metric in metrics.items():
        checkpoint.save_checkpoint(root, step, payload, HASH, keep_last=2, metric=metric, metric_mode=mode)
        # The invariant at every point: LATEST names a complete checkpoint.
        latest = storage.get_bytes(storage.join(root, "checkpoints", "LATEST")).decode().strip()
        assert storage.exists(storage.join(root, "checkpoints", latest, "MANIFEST.json"))

    kept = {(s, complete) for s, _, complete in checkpoint.list_checkpoints(root)}
    assert kept == {(0, False), (best, True), (5, True), (6, True)}  # incomplete ones are left alone
    for step in (best, 5, 6):
        checkpoint.verify_checkpoint(checkpoint.checkpoint_uri(root, step))


def test_resave_of_latest_step_never_leaves_latest_dangling(root: str) -> None:
    checkpoint.save_checkpoint(root, 1, _payload(step=1), HASH)
    checkpoint.save_checkpoint(root, 2, _payload(step=1), HASH)
    checkpoint.save_checkpoint(root, 2, _payload(seed=3, step=2), HASH)  # e.g. save-on-preemption after resume
    step, loaded = checkpoint.load_checkpoint(checkpoint.checkpoint_uri(root, 2))
    assert loaded.controller_state["mu"] == 3.25
    assert storage.get_bytes(storage.join(root, "checkpoints", "LATEST")).decode().strip() == "step-0000002"


def test_unsafe_pickle_is_refused_even_with_a_matching_sha(tmp_path) -> None:
    root = str(tmp_path / "run")
    uri = checkpoint.save_checkpoint(root, 1, _payload(step=1), HASH)
    evil = storage.join(uri, "optimizer.pt")
    torch.save({"state": {}, "param_groups": [], "x": argparse.Namespace(cmd="rm -rf /")}, evil)
    manifest = checkpoint.read_manifest(uri)
    manifest["files"]["optimizer.pt"] = {"sha256": storage.sha256_file(evil), "size": len(storage.get_bytes(evil))}
    storage.put_bytes(storage.join(uri, "MANIFEST.json"), json.dumps(manifest).encode())
    with pytest.raises(checkpoint.CorruptCheckpointError, match="weights_only"):
        checkpoint.load_checkpoint(uri)


def test_store_stopped_mid_save_then_restarted(
    private_s3: EmbeddedS3, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    root = private_s3.settings.uri("runs", "crash")
    first = _payload(step=1)
    uri1 = checkpoint.save_checkpoint(root, 1, first, HASH)

    # The store goes away as soon as the first file of the next checkpoint is up (uploads run in
    # parallel, so the others are in flight or not started yet).
    real_put_file = storage.put_file
    done: list[str] = []
    lock = threading.Lock()

    def put_file_then_stop(src, uri, **kwargs) -> None:
        real_put_file(src, uri, **kwargs)
        with lock:
            done.append(uri)
            if len(done) == 1:
                private_s3.stop()

    monkeypatch.setattr(storage, "put_file", put_file_then_stop)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    staging_root = tmp_path / "staging"
    staging_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging_root))
    caplog.set_level(logging.DEBUG, logger="botocore.retries")
    with pytest.raises(storage.StorageError) as info:
        checkpoint.save_checkpoint(root, 2, _payload(step=2), HASH)
    # Which request fails first depends on timing (a part, the history or the manifest): a connection
    # failure once the server is gone, or the 500 a shutting-down server answers (seen on a loaded CI
    # box); both are retried by botocore first, and both name this run's checkpoints/ folder.
    connection = {"EndpointConnectionError", "ConnectionClosedError", "ResponseStreamingError"}
    assert info.value.code in connection | {"InternalError", "ServiceUnavailable"}
    assert "/checkpoints/" in str(info.value)
    if info.value.code in connection:
        assert "gave up after" in str(info.value)
    assert any("Retry needed" in r.getMessage() for r in caplog.records)
    assert list(staging_root.iterdir()) == []  # the local staging dir was cleaned up
    monkeypatch.setattr(storage, "put_file", real_put_file)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")

    private_s3.start()  # same data dir: what was written before the outage is still there
    latest = storage.join(root, "checkpoints", "LATEST")
    assert storage.get_bytes(latest).decode().strip() == "step-0000001"
    assert [(s, c) for s, _, c in checkpoint.list_checkpoints(root)] == [(1, True), (2, False)]
    found = checkpoint.resume(root, HASH)
    assert found is not None and found[:2] == (uri1, 1)
    _assert_same(first.model_state, found[2].model_state)

    # The rerun of step 2 replaces the partial folder.
    checkpoint.save_checkpoint(root, 2, _payload(step=2), HASH)
    assert storage.get_bytes(latest).decode().strip() == "step-0000002"
    assert checkpoint.find_resumable(root, HASH) == checkpoint.checkpoint_uri(root, 2)
