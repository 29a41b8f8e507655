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
import torch
from safetensors.torch import load_file

from amft_lib import checkpoint as ckpt
from amft_lib import lineage, storage
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
    mu_a, mu_b = lineage.mu_trajectory(str(tmp_path / "a")), lineage.mu_trajectory(str(tmp_path / "b2"))
    assert mu_a == mu_b and len(mu_a) == STEPS + 1  # μ before every step, then after the last update
    latest = storage.get_bytes(storage.join(root_b, "checkpoints", "LATEST")).decode().strip()
    assert latest == f"step-{STEPS:07d}"


# ── the warm start (issue 12): SIGKILL in each phase, retry with --resume auto ──────────────────────
#
# The warm start begins from a tiny model pre-trained on the same demonstrations (in-process, ~5 s), so
# rejection sampling accepts samples and the final SFT trains on demonstrations ∪ accepted: every piece of
# state a checkpoint carries is exercised. 16 warm-up steps, 4 rejection-sampling chunks (16 prompts, k=64,
# 4 prompts per chunk), 16 final SFT steps; a checkpoint every 2 steps of the global counter.
WARM_SETS = ["warmup_steps=16", "batch_size=16", "lr=1e-3", "rs_samples=64", "rs_max_prompts=16",
             "rs_temperature=0.5", "max_new_tokens=112", "final_sft_steps=16", "entropy_prompts=4",
             "entropy_group=2", "eval_prompts=4", "checkpoint_every=2"]
WARM_OUTPUTS = ("model/model.safetensors", "accepted.parquet", "sft_history.jsonl")


@pytest.fixture(scope="module")
def warm_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset parquet, pre-trained tiny model directory)."""
    from amft_lib.config import WarmStartConfig, apply_overrides
    from amft_lib.model import load_policy, save_policy
    from amft_lib.warm_start import sft_steps

    base = tmp_path_factory.mktemp("warm")
    rows = generate_rows(16, "face10", 1, "train") + generate_rows(4, "face10", 2, "val")
    cols = ["id", "task", "prompt", "answer", "demonstration", "split", "meta"]
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in cols}), base / "gp.parquet")
    cfg = apply_overrides(WarmStartConfig(), ["model.tiny_hidden=64", "model.tiny_layers=1", "model.tiny_heads=2",
                                              "batch_size=16", "lr=1e-2", "max_new_tokens=112"])
    model, tok = load_policy(cfg.model, seed=0)
    sft_steps(model, tok, [r for r in rows if r["split"] == "train"], 120, cfg, seed=0, phase="pretrain")
    save_policy(model, tok, base / "init")
    return base / "gp.parquet", base / "init"


def warm_command(inputs: tuple[Path, Path], out: Path, root: str | None) -> list[str]:
    data, init = inputs
    cmd = [sys.executable, "-m", "amft_lib.cli", "warm-start", "--out", str(out), "--data", str(data),
           "--model", str(init)]
    if root is not None:
        cmd += ["--checkpoint-root", root, "--resume", "auto"]
    for s in WARM_SETS:
        cmd += ["--set", s]
    return cmd


def warm_stats(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    stats.pop("elapsed_s")
    return stats


@pytest.fixture(scope="module")
def warm_reference(warm_inputs, tmp_path_factory) -> Path:
    """The uninterrupted warm start, with no checkpoint root at all: checkpointing must not perturb it."""
    out = tmp_path_factory.mktemp("warm-ref") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(warm_command(warm_inputs, out, None), env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert warm_stats(out)["rejection_sampling"]["kept"] > 0, "nothing accepted: the test would not cover it"
    return out


def _newest_complete(root: str) -> tuple[int, dict] | None:
    done = [(s, uri) for s, uri, complete in ckpt.list_checkpoints(root) if complete]
    if not done:
        return None
    step, uri = max(done)
    try:
        return step, json.loads(storage.get_bytes(storage.join(uri, "trainer_state.json")))
    except storage.ObjectNotFoundError:  # deleted by retention between the listing and the read
        return None


@pytest.mark.parametrize("phase", ["warmup", "rejection_sampling", "final_sft"])
def test_warm_start_sigkill_and_resume_matches_uninterrupted(phase, warm_inputs, warm_reference, s3_prefix,
                                                             tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = f"{s3_prefix}/run"
    ckpt_root = storage.join(root, "warm_start")
    victim = subprocess.Popen(warm_command(warm_inputs, tmp_path / "b", root), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while True:  # kill at the first sight of a checkpoint inside `phase`: the run is then in that phase's next step
        assert time.time() < deadline and victim.poll() is None, f"the run ended before it could be killed in {phase}"
        newest = _newest_complete(ckpt_root)
        if newest and newest[1]["phase"] == phase and newest[1]["phase_step"] < newest[1]["phase_steps"]:
            time.sleep(random.Random().uniform(0.0, 0.05))
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = _newest_complete(ckpt_root)
    assert killed is not None and killed[1]["phase"] == phase, f"killed after {killed and killed[1]['phase']}"

    resumed = subprocess.run(warm_command(warm_inputs, tmp_path / "b2", root), env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {killed[0]}, {phase} step" in resumed.stderr, resumed.stderr[-3000:]

    for name in WARM_OUTPUTS:  # bitwise: weights, accepted samples, SFT history
        assert (warm_reference / name).read_bytes() == (tmp_path / "b2" / name).read_bytes(), name
    assert warm_stats(warm_reference) == warm_stats(tmp_path / "b2")  # acceptance, pass@k, H*, val accuracy
    a = load_file(warm_reference / "model" / "model.safetensors")
    b = load_file(tmp_path / "b2" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [s for s, _, complete in ckpt.list_checkpoints(ckpt_root) if complete]
    latest = storage.get_bytes(storage.join(ckpt_root, "checkpoints", "LATEST")).decode().strip()
    assert latest == f"step-{max(steps):07d}" and max(steps) == 16 + 4 + 16  # W + C + final SFT steps
    # retention: checkpoint_keep_last=2, plus the rejection-sampling checkpoint (W + C = 20): it holds the
    # after-warm-up weights the final SFT falls back to when it scores lower on val (warm_start.keep_better)
    assert sorted(steps) == [20, 34, 36], steps
