"""All checkpoints corrupt ⇒ `--resume auto` refuses (unless force_restart); retention never lets a
corrupt checkpoint hold a keep-last slot. Local run roots only (the S3 paths share the code)."""

from __future__ import annotations

import os

import pytest
import torch

from amft_lib import checkpoint
from amft_lib.checkpoint import CheckpointPayload, NoValidCheckpointError
from amft_lib.errors import UserError

HASH = "cfg-corrupt-test"


def _payload(step: int) -> CheckpointPayload:
    torch.manual_seed(step)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
    return CheckpointPayload(
        model_state=dict(model.state_dict()), optimizer_state=opt.state_dict(), scheduler_state=sched.state_dict(),
        controller_state={"mu": 0.5}, rng_state=checkpoint.capture_rng_state(), trainer_state={"step": step},
    )


def _save(root: str, step: int, keep_last: int = 2) -> str:
    return checkpoint.save_checkpoint(root, step, _payload(step), HASH, keep_last=keep_last)


def _corrupt(root: str, step: int) -> None:
    path = os.path.join(checkpoint.checkpoint_uri(root, step), checkpoint.MODEL_FILE)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[-1] ^= 0xFF  # same size, different sha256
    with open(path, "wb") as f:
        f.write(bytes(data))


def _steps(root: str) -> list[int]:
    return [step for step, _, complete in checkpoint.list_checkpoints(root) if complete]


def test_all_corrupt_refuses_with_the_reason(tmp_path) -> None:
    root = str(tmp_path / "run")
    for step in (10, 20):
        _save(root, step)
        _corrupt(root, step)
    with pytest.raises(NoValidCheckpointError) as info:
        checkpoint.resume(root, HASH)
    message = str(info.value)
    assert isinstance(info.value, UserError)  # the CLI prints it as one `error:` line, exit 2
    assert "all 2 complete checkpoint(s) are corrupt" in message
    assert "step-0000020" in message and "step-0000010" in message and "sha256 mismatch" in message
    assert "--force-restart" in message
    assert _steps(root) == [10, 20]  # refusing deletes nothing


def test_force_restart_starts_from_scratch(tmp_path, caplog) -> None:
    root = str(tmp_path / "run")
    _save(root, 10)
    _corrupt(root, 10)
    assert checkpoint.resume(root, HASH, force_restart=True) is None
    assert "force_restart" in caplog.text


def test_nothing_or_only_incomplete_starts_fresh(tmp_path) -> None:
    root = str(tmp_path / "run")
    assert checkpoint.resume(root, HASH) is None  # no checkpoints at all
    _save(root, 10)
    os.remove(os.path.join(checkpoint.checkpoint_uri(root, 10), checkpoint.MANIFEST))  # a crashed first save
    assert checkpoint.resume(root, HASH) is None


def test_one_valid_among_corrupt_is_used(tmp_path) -> None:
    root = str(tmp_path / "run")
    for step in (10, 20, 30):
        _save(root, step, keep_last=3)
    _corrupt(root, 30)
    _corrupt(root, 20)
    uri, step, _ = checkpoint.resume(root, HASH)
    assert step == 10 and uri.endswith("step-0000010")


def test_retention_keeps_the_newest_valid_checkpoints(tmp_path) -> None:
    """Corrupt checkpoints at steps 10 and 20; the run restarts (force) and saves 5 then 15. Counting
    by step alone, 20 and 10 would hold both keep-last slots and the valid 5 would be deleted by the
    save of 15; now the slots go to 15 and 5, and the corrupt ones are deleted."""
    root = str(tmp_path / "run")
    for step in (10, 20):
        _save(root, step)
        _corrupt(root, step)
    assert checkpoint.resume(root, HASH, force_restart=True) is None
    _save(root, 5)
    _save(root, 15)
    assert _steps(root) == [5, 15]
    for step in (5, 15):
        checkpoint.verify_checkpoint(checkpoint.checkpoint_uri(root, step))
    _save(root, 25)
    assert _steps(root) == [15, 25]  # steady state: the oldest valid one goes
    assert checkpoint.resume(root, HASH)[1] == 25


def test_retention_skips_a_corrupt_older_checkpoint(tmp_path) -> None:
    root = str(tmp_path / "run")
    for step in (1, 2):
        _save(root, step)
    _corrupt(root, 2)
    _save(root, 3)
    assert _steps(root) == [1, 3]  # 2 is corrupt: it does not count, 1 (valid) stays


def test_resume_of_a_missing_checkpoint_uri_is_a_user_error(tmp_path) -> None:
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint there"):
        checkpoint.load_checkpoint(str(tmp_path / "run" / "checkpoints" / "step-0000007"))
