"""Kill-and-resume equivalence against a real SeaweedFS (issue 4).

A training process is SIGKILLed at a random moment after its first checkpoint reached S3, then
restarted with --resume auto. It must end with bitwise the same weights (CPU), the same μ
history and the same metrics.jsonl (timings aside) as a run that was never interrupted.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from amft_lib import checkpoint as ckpt
from amft_lib import storage
from amft_lib.tasks.general_points import generate_rows

pytestmark = pytest.mark.s3
TIMING = {"tokens_per_s", "elapsed_s", "time_rollout_s", "time_update_s", "time_meta_s"}
STEPS = 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    rows = generate_rows(48, "face10", 1, "train") + generate_rows(8, "face10", 2, "val")
    cols = ["id", "task", "prompt", "answer", "demonstration", "split", "meta"]
    path = tmp_path_factory.mktemp("data") / "gp.parquet"
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in cols}), path)
    return path


def command(method: str, dataset: Path, out: Path, root: str) -> list[str]:
    sets = ["eval_every=4", "eval_prompts=4", "checkpoint_every=2", "model.tiny_hidden=32", "model.tiny_layers=1",
            "model.tiny_heads=2", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=10",
            "loss.sft_batch_size=4", "controller.meta_interval=2", "controller.meta_val_prompts=2",
            "controller.meta_val_group=2", "optim.lr=1e-2", "loss.ppo_epochs=2"]
    cmd = [sys.executable, "-m", "amft_lib.cli", "train", "--out", str(out), "--data", str(dataset),
           "--method", method, "--max-steps", str(STEPS), "--no-progress", "--checkpoint-root", root,
           "--resume", "auto"]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def comparable(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in path.read_text().splitlines()]


@pytest.mark.parametrize("method", ["amft", "grpo"])
def test_sigkill_and_resume_matches_uninterrupted(method, dataset, s3_prefix, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root_a, root_b = f"{s3_prefix}/a", f"{s3_prefix}/b"
    ref = subprocess.run(command(method, dataset, tmp_path / "a", root_a), env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    victim = subprocess.Popen(command(method, dataset, tmp_path / "b", root_b), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(c for _, _, c in ckpt.list_checkpoints(root_b)):
        assert victim.poll() is None, "the run finished before it could be killed"
        time.sleep(0.2)
    time.sleep(random.Random().uniform(0.0, 0.3))  # somewhere after the first checkpoint
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(s for s, _, c in ckpt.list_checkpoints(root_b) if c)
    assert killed_at < STEPS, "killed too late to exercise resume"

    resumed = subprocess.run(command(method, dataset, tmp_path / "b2", root_b), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b2" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed weights differ from the uninterrupted run"
    assert comparable(tmp_path / "a" / "metrics.jsonl") == comparable(tmp_path / "b2" / "metrics.jsonl")
    hist_a, hist_b = ckpt.read_controller_history(root_a), ckpt.read_controller_history(root_b)
    assert [h["mu"] for h in hist_a] == [h["mu"] for h in hist_b] and len(hist_a) == STEPS
    latest = storage.get_bytes(storage.join(root_b, "checkpoints", "LATEST")).decode().strip()
    assert latest == f"step-{STEPS:07d}"
