"""Distributed training (issue 13) with the real engine: `torchrun`, 2 ranks, gloo on CPU.

- DDP and FSDP2 runs of the same config train what a single process trains: the same rollouts
  (rewards equal exactly: sampling is seeded per row, so it does not depend on the world size), the
  same losses, entropies and μ trajectory, and the same final weights, within float32 reduction-order
  noise (see TOL), with μ identical on both ranks at every step.
- The meta-gradient under FSDP2 (each rank holds half of every parameter) equals the single-process
  one and the finite difference of the lookahead utility.
- SIGKILL of one rank mid-run, relaunch with --resume auto: the end state equals an uninterrupted
  2-rank run bitwise (DCP sharded checkpoints on a real SeaweedFS).
- Elastic resume: a 2-rank FSDP2 checkpoint continues in one process and that run's checkpoint on 2 DDP
  ranks, both ending where the uninterrupted run ends; a 1-process checkpoint under FSDP2 is refused.
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
from amft_lib.tasks.general_points import generate_rows

pytestmark = pytest.mark.slow
STEPS = 6
TIMING = {"tokens_per_s", "elapsed_s", "time_rollout_s", "time_update_s", "time_meta_s"}
# Why not bitwise: with 2 ranks every sum over the batch (losses, gradients, entropy) is added in another
# order (per-rank partial sums, then the all-reduce), and micro-batches hold other rows. In float32 that is
# ~1e-7 relative per step, which Adam's g/√v amplifies to ~1e-5 in grad_norm after six steps (measured) —
# too loose to catch a subtle bug. So the comparison runs in float64, where reduction order costs ~1e-15:
# a 1e-9 tolerance then fails on anything but rounding (one wrongly weighted micro-batch moves losses by
# > 1e-2). The kill-and-resume test runs in the default float32 and is bitwise.
TOL = {"rel": 1e-9, "abs": 1e-12}
WEIGHT_ATOL = 1e-9
SETS = ["model.tiny_hidden=64", "model.tiny_layers=2", "model.tiny_heads=2", "rollout.prompts_per_step=4",
        "rollout.group_size=4", "rollout.max_new_tokens=112", "rollout.temperature=0.7", "loss.sft_batch_size=8",
        "loss.micro_batch_size=4", "controller.method=amft", "controller.meta_interval=2",
        "controller.meta_val_prompts=4", "controller.meta_val_group=2", "eval_prompts=4", "eval_every=3",
        # one estimator for every world size: FSDP2 shards have no JVP, so all runs take the central difference
        "controller.meta_estimator=central_difference",
        "optim.lr=5e-4", "optim.warmup_steps=1"]
FLOAT64 = ("--set", "model.dtype=float64")


def env() -> dict[str, str]:
    """Now, not at import: the s3 fixture puts the endpoint and credentials into os.environ."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset parquet, a tiny model pre-trained on its demonstrations so rollouts earn rewards)."""
    from amft_lib.config import WarmStartConfig, apply_overrides
    from amft_lib.model import load_policy, save_policy
    from amft_lib.warm_start import sft_steps

    base = tmp_path_factory.mktemp("dist")
    train = generate_rows(16, "face10", 1, "train")
    # validation = some of the training hands: this test needs rewards (a learning signal), not generalisation
    rows = train + [{**r, "id": f"val-{r['id']}", "split": "val"} for r in train[:8]]
    cols = ["id", "task", "prompt", "answer", "demonstration", "split", "meta"]
    pq.write_table(pa.table({c: [r[c] for r in rows] for c in cols}), base / "gp.parquet")
    cfg = apply_overrides(WarmStartConfig(), ["model.tiny_hidden=64", "model.tiny_layers=2", "model.tiny_heads=2",
                                              "batch_size=16", "lr=1e-2", "max_new_tokens=112"])
    model, tok = load_policy(cfg.model, seed=0)
    sft_steps(model, tok, train, 120, cfg, seed=0, phase="pretrain")
    save_policy(model, tok, base / "init")
    return base / "gp.parquet", base / "init"


def train_cmd(inputs: tuple[Path, Path], out: Path, nproc: int, strategy: str = "none",
              extra: tuple[str, ...] = (), steps: int = STEPS) -> list[str]:
    data, init = inputs
    launcher = [sys.executable] if nproc == 1 else [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*launcher, "-m", "amft_lib.cli", "train", "--out", str(out), "--data", str(data), "--init-model",
           str(init), "--max-steps", str(steps), "--no-progress", "--set", f"distributed.strategy={strategy}", *extra]
    for s in SETS:
        cmd += ["--set", s]
    return cmd


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def comparable(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records(out)]


def controller_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "controller.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    run_ok(train_cmd(inputs, out, 1, "none", FLOAT64))
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_train_what_one_process_trains(strategy, inputs, single, tmp_path):
    out = tmp_path / strategy
    run_ok(train_cmd(inputs, out, 2, strategy, FLOAT64))
    one, two = records(single), records(out)
    assert len(one) == len(two) == STEPS + 1
    steps_one, steps_two = one[:-1], two[:-1]
    assert any(r["reward_mean"] > 0 for r in steps_one), "degenerate test: no rollout earned a reward"
    assert any(r["meta_grad"] not in (None, 0.0) for r in steps_one), "degenerate test: no meta-gradient signal"
    assert all(b["world_size"] == 2 and b["mu_rank_spread"] == 0.0 for b in steps_two)  # one μ on both ranks
    assert_same_run(one, two, single, out, strategy)
    # the evidence of every meta step: global per-group terms, so SE and t are the single process's
    ctl_one, ctl_two = (controller_records(d) for d in (single, out))
    assert len(ctl_one) == len(ctl_two) == STEPS // 2 and all(r["n_groups"] == 4 for r in ctl_two)
    for a, b in zip(ctl_one, ctl_two, strict=True):
        assert b["meta_grad_se"] == pytest.approx(a["meta_grad_se"], **TOL) and b["reason"] == a["reason"]
        assert b["meta_grad_t"] == pytest.approx(a["meta_grad_t"], **TOL) and b["estimator"] == "central_difference"
    init = load_file(inputs[1] / "model.safetensors")
    wa = weights(single)
    assert any(not torch.equal(wa[k], init[k].double()) for k in wa), "nothing trained"


def assert_same_run(ref: list[dict], got: list[dict], ref_out: Path, got_out: Path, label: str) -> None:
    """`got` trained what `ref` trained, on every step `got` logged: the very same rollouts, and
    losses, entropy, μ, meta-gradient, final evaluation and weights within float64 reduction-order
    noise (TOL, WEIGHT_ATOL)."""
    steps = {r["step"]: r for r in ref[:-1]}
    assert got[:-1], f"{label}: no steps logged"
    for b in got[:-1]:
        a = steps[b["step"]]
        assert a["reward_mean"] == b["reward_mean"], (label, a["step"])  # the very same rollouts
        assert a["completion_len"] == b["completion_len"], (label, a["step"])
        for key in ("mu", "mu_next", "entropy", "sft_loss", "rl_loss", "grad_norm", "clip_frac"):
            assert b[key] == pytest.approx(a[key], **TOL), (label, a["step"], key)
        if a["meta_grad"] is not None:
            assert b["meta_grad"] == pytest.approx(a["meta_grad"], **TOL), (label, a["step"])
    assert got[-1]["mu"] == pytest.approx(ref[-1]["mu"], **TOL)
    assert got[-1]["val_reward"] == ref[-1]["val_reward"] and got[-1]["val_accuracy"] == ref[-1]["val_accuracy"]
    wa, wb = weights(ref_out), weights(got_out)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"{label}: max |Δw| = {worst:.2e} after {STEPS} steps")
    assert worst < WEIGHT_ATOL, label


def test_lora_under_fsdp2_matches_one_process(inputs, tmp_path):
    """LoRA (peft) with FSDP2: the root shard group goes on the HF model inside the peft wrapper, so
    sampling through peft's generate() still gathers the embeddings; only the adapters train."""
    lora = (*FLOAT64, "--set", "model.lora=true", "--set", "model.lora_r=4")
    run_ok(train_cmd(inputs, tmp_path / "one", 1, "none", lora, steps=3))
    run_ok(train_cmd(inputs, tmp_path / "two", 2, "fsdp", lora, steps=3))
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    for a, b in zip(one[:-1], two[:-1], strict=True):
        assert a["reward_mean"] == b["reward_mean"] and b["mu_rank_spread"] == 0.0
        for key in ("mu_next", "entropy", "sft_loss", "rl_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], **TOL), (a["step"], key)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")  # merged adapters, plain HF weights
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < WEIGHT_ATOL
    # the adapter alone, saved by rank 0 from the gathered full state dict under FSDP2
    aa, ab = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("one", "two"))
    assert aa.keys() == ab.keys() and aa
    assert max(float((aa[k] - ab[k]).abs().max()) for k in aa) < WEIGHT_ATOL


def test_meta_gradient_under_fsdp2_matches_single_process_and_finite_difference(tmp_path):
    worker = str(Path(__file__).parent / "workers" / "meta_gradient.py")
    subprocess.run([sys.executable, worker, str(tmp_path / "one.json")], env=env(), check=True, timeout=300)
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", worker, str(tmp_path / "two.json")],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert abs(two["m"]) > 1e-3, "degenerate test: the derivative is ~0"
    assert two["m"] == pytest.approx(one["m"], rel=1e-10)  # float64: the sharded sums change nothing visible
    assert two["m"] == pytest.approx(two["fd"], rel=1e-4)  # and it is the derivative of the lookahead utility
    assert two["half_cosine"] == pytest.approx(one["half_cosine"], rel=1e-8)
    # the per-rollout meta step on FSDP2 shards (central difference, group terms gathered) is the same m, with one t
    assert two["n_groups"] == one["n_groups"] == 4
    assert two["m_rollout"] == pytest.approx(one["m"], rel=1e-6)
    assert two["t_rollout"] == pytest.approx(one["t_rollout"], rel=1e-6)


def _rank_pids(launcher_pid: int) -> list[int]:
    """The worker processes torchrun started (its children running amft_lib.cli)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == launcher_pid and "amft_lib.cli" in cmdline:
            pids.append(int(entry))
    return pids


@pytest.mark.s3
def test_sigkill_one_rank_then_resume_matches_uninterrupted(inputs, s3_prefix, tmp_path):
    root_a, root_b = f"{s3_prefix}/a", f"{s3_prefix}/b"
    extra = ("--resume", "auto", "--set", "checkpoint_every=2")
    run_ok(train_cmd(inputs, tmp_path / "a", 2, "fsdp", ("--checkpoint-root", root_a, *extra)))

    victim = subprocess.Popen(train_cmd(inputs, tmp_path / "b", 2, "fsdp", ("--checkpoint-root", root_b, *extra)),
                              env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(c for _, _, c in ckpt.list_checkpoints(root_b)):
        assert victim.poll() is None, "the run finished before it could be killed"
        time.sleep(0.2)
    time.sleep(random.Random().uniform(0.0, 0.5))
    ranks = _rank_pids(victim.pid)
    assert len(ranks) == 2, ranks
    os.kill(random.Random().choice(ranks), signal.SIGKILL)  # one rank dies; torchrun takes the other down
    assert victim.wait(timeout=300) != 0
    killed_at = max(s for s, _, c in ckpt.list_checkpoints(root_b) if c)
    assert killed_at < STEPS, "killed too late to exercise resume"

    resumed = run_ok(train_cmd(inputs, tmp_path / "b2", 2, "fsdp", ("--checkpoint-root", root_b, *extra)))
    assert "resumed from" in resumed.stderr
    manifest = ckpt.read_manifest(ckpt.checkpoint_uri(root_b, STEPS))
    assert manifest["layout"] == "dcp" and manifest["world_size"] == 2
    assert {"dcp/.metadata", "rng-00000.pt", "rng-00001.pt"} <= set(manifest["files"])
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b2")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"
    assert comparable(tmp_path / "a") == comparable(tmp_path / "b2")



def test_training_resumes_under_another_world_size(inputs, tmp_path):
    """Elastic resume: a 2-rank FSDP2 checkpoint continues in one process (DCP reshards model and
    optimizer onto whole tensors), and that run's 1-process checkpoint continues on 2 DDP ranks; both
    end where the uninterrupted 2-rank run ends (float64, the tolerances above). A 1-process
    checkpoint under FSDP2 is refused before any work, with the reason."""
    # Retention keeps the newest two plus the best by val reward, so whether step 2 survives the reference
    # run depended on which of the 4-prompt val scores tied (ties go to the newer step): a fresh-clone CI
    # run once found no step 2. This test resumes from step 2 by name, so it keeps every checkpoint.
    extra = ("--set", "checkpoint_every=2", "--set", f"checkpoint_keep_last={STEPS}", *FLOAT64)
    ref, root2, root1 = tmp_path / "fsdp", tmp_path / "ckpt-fsdp", tmp_path / "ckpt-one"
    run_ok(train_cmd(inputs, ref, 2, "fsdp", ("--checkpoint-root", str(root2), *extra)))

    one = tmp_path / "one"
    done = run_ok(train_cmd(inputs, one, 1, "none", ("--resume", ckpt.checkpoint_uri(str(root2), 2),
                                                     "--checkpoint-root", str(root1), *extra)))
    assert "written by 2 process(es) (fsdp), continuing on 1 (none)" in done.stderr
    assert [r["step"] for r in records(one)[:-1]] == list(range(2, STEPS)), "resumed after 2 steps"
    assert_same_run(records(ref), records(one), ref, one, "fsdp×2 → 1")
    assert ckpt.read_manifest(ckpt.checkpoint_uri(str(root1), 4)).get("layout") != "dcp"  # one process: whole tensors

    ddp = tmp_path / "ddp"
    done = run_ok(train_cmd(inputs, ddp, 2, "ddp", ("--resume", ckpt.checkpoint_uri(str(root1), 4),
                                                    "--checkpoint-root", str(tmp_path / "ckpt-ddp"), *extra)))
    assert "written by 1 process(es) (none), continuing on 2 (ddp)" in done.stderr
    assert_same_run(records(ref), records(ddp), ref, ddp, "1 → ddp×2")

    refused = subprocess.run(train_cmd(inputs, tmp_path / "no", 2, "fsdp", ("--resume", ckpt.checkpoint_uri(
        str(root1), 4), "--checkpoint-root", str(tmp_path / "ckpt-no"), *extra)), env=env(), capture_output=True,
        text=True, timeout=300)
    # each rank exits 2 with the one-line error; torchrun then reports its own failure code
    assert refused.returncode != 0 and "written by 1 process (whole tensors, no DCP shards)" in refused.stderr
    assert not (tmp_path / "no").exists()


WARM_SETS = ["model.tiny_hidden=64", "model.tiny_layers=2", "model.tiny_heads=2", "model.dtype=float64",
             "warmup_steps=4", "batch_size=8", "lr=1e-3", "rs_samples=8", "rs_max_prompts=8", "rs_temperature=0.5",
             "max_new_tokens=112", "final_sft_steps=4", "entropy_prompts=4", "entropy_group=2",
             "entropy_temperature=0.7", "eval_prompts=4"]


def warm_cmd(inputs: tuple[Path, Path], out: Path, nproc: int, strategy: str) -> list[str]:
    data, init = inputs
    launcher = [sys.executable] if nproc == 1 else [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*launcher, "-m", "amft_lib.cli", "warm-start", "--out", str(out), "--data", str(data), "--model",
           str(init), "--set", f"distributed.strategy={strategy}"]
    for s in WARM_SETS:
        cmd += ["--set", s]
    return cmd


def test_warm_start_on_two_ranks_matches_one_process(inputs, tmp_path):
    """Rejection sampling splits each chunk's prompts over the ranks and gathers them: the accepted rows
    are the very same; the SFT phases and H* agree to float64 rounding."""
    run_ok(warm_cmd(inputs, tmp_path / "one", 1, "none"))
    run_ok(warm_cmd(inputs, tmp_path / "two", 2, "fsdp"))
    one, two = (json.loads((tmp_path / n / "stats.json").read_text()) for n in ("one", "two"))
    assert one["rejection_sampling"]["kept"] > 0, "degenerate test: nothing accepted"
    assert one["rejection_sampling"] == two["rejection_sampling"]
    assert pq.read_table(tmp_path / "one" / "accepted.parquet").to_pylist() == \
        pq.read_table(tmp_path / "two" / "accepted.parquet").to_pylist()
    assert two["target_entropy"] == pytest.approx(one["target_entropy"], **TOL)
    assert two["val_accuracy"] == one["val_accuracy"]
    history = [[json.loads(x) for x in (tmp_path / n / "sft_history.jsonl").read_text().splitlines()]
               for n in ("one", "two")]
    assert [h["sft_loss"] for h in history[1]] == pytest.approx([h["sft_loss"] for h in history[0]], **TOL)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < WEIGHT_ATOL
