"""The pure parts of running under torchrun: strategy resolution, batch sharding, and sampling that is
seeded per row, so a rollout does not depend on the batch it is drawn in (what makes a 2-rank run
sample what a 1-rank run samples). The multi-process behaviour itself is in
tests/integration/test_distributed.py (real torchrun, gloo)."""

from __future__ import annotations

import re

import pytest
import torch

from amft_lib.config import ConfigError, DistributedConfig, ModelConfig, TrainConfig, apply_overrides, config_hash
from amft_lib.distributed import Dist, check_divisible, resolve_strategy
from amft_lib.model import load_policy
from amft_lib.rollout import row_seeds, sample_completions


def test_strategy_resolution():
    assert resolve_strategy(DistributedConfig(strategy="fsdp"), 1) == "none"  # one process: nothing to shard
    assert resolve_strategy(DistributedConfig(strategy="auto"), 4) == "ddp"
    assert resolve_strategy(DistributedConfig(strategy="fsdp"), 4) == "fsdp"
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 .* every rank would train its own copy"):
        resolve_strategy(DistributedConfig(strategy="none"), 2)


def test_global_batches_must_split_evenly():
    check_divisible(2, **{"rollout.prompts_per_step": 8})
    with pytest.raises(ConfigError, match=r"rollout.prompts_per_step=6 does not split over 4 ranks"):
        check_divisible(4, **{"rollout.prompts_per_step": 6})


def test_shards_are_contiguous_blocks_that_cover_the_batch():
    batch = list(range(12))
    blocks = [Dist(rank=r, world_size=3).shard(batch) for r in range(3)]
    assert blocks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [Dist(rank=r, world_size=3).offset(12) for r in range(3)] == [0, 4, 8]
    assert Dist().shard(batch) == batch and Dist().sum([1.5, 2]) == [1.5, 2.0] and Dist().spread(0.3) == 0.0


def test_launch_settings_are_not_part_of_the_config_hash():
    a = TrainConfig()
    b = apply_overrides(TrainConfig(), ["distributed.strategy=fsdp", "distributed.backend=gloo"])
    assert config_hash(a) == config_hash(b)  # a 2-rank run trains what a 1-rank run of the same config does
    assert config_hash(a) != config_hash(apply_overrides(TrainConfig(), ["seed=1"]))


def test_row_seeds_are_stable_and_distinct():
    assert row_seeds(0, "rollout", 3, 0, 4) == row_seeds(0, "rollout", 3, 0, 4)
    assert row_seeds(0, "rollout", 3, 2, 2) == row_seeds(0, "rollout", 3, 0, 4)[2:]  # a block of the batch
    everything = row_seeds(0, "rollout", 3, 0, 4) + row_seeds(0, "rollout", 4, 0, 4) + row_seeds(0, "meta", 3, 0, 4) \
        + row_seeds(1, "rollout", 3, 0, 4)
    assert len(set(everything)) == len(everything)
    assert all(0 <= s < 2**63 for s in everything)


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    return model.eval(), tok


def test_a_seeded_row_samples_the_same_whatever_shares_its_batch(tiny):
    model, tok = tiny
    prompts = ["12 3 4 5", "1 1 1 1 and more", "7 8", "2 2 6 9"]
    seeds = row_seeds(5, "rollout", 0, 0, len(prompts) * 2)
    whole = sample_completions(model, tok, prompts, group_size=2, max_new_tokens=24, temperature=1.0, seeds=seeds)
    # the same rows as two "ranks" (other padding, other batch), and in chunks of one row
    first = sample_completions(model, tok, prompts[:2], group_size=2, max_new_tokens=24, seeds=seeds[:4])
    second = sample_completions(model, tok, prompts[2:], group_size=2, max_new_tokens=24, seeds=seeds[4:])
    chunked = sample_completions(model, tok, prompts, group_size=2, max_new_tokens=24, seeds=seeds, batch_size=1)
    assert whole.texts == first.texts + second.texts == chunked.texts
    assert len(set(whole.texts)) > 1  # really sampled, not one greedy answer
    other = sample_completions(model, tok, prompts, group_size=2, max_new_tokens=24,
                               seeds=row_seeds(6, "rollout", 0, 0, len(prompts) * 2))
    assert other.texts != whole.texts


def test_gumbel_sampling_draws_from_the_softmax():
    """argmax(logits/T + Gumbel) with one generator per row is a sample of softmax(logits/T): the
    frequencies over many seeded rows match the probabilities (3σ)."""
    from amft_lib.rollout import _seeded_sampling

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    n = 4000
    processors = _seeded_sampling(row_seeds(0, "test", 0, 0, n), temperature=0.7, top_p=1.0)
    scores = processors(torch.zeros(n, 1, dtype=torch.long), logits.repeat(n, 1))
    counts = torch.bincount(scores.argmax(-1), minlength=4).double() / n
    probs = torch.softmax(logits[0] / 0.7, -1).double()
    assert torch.all((counts - probs).abs() < 3 * (probs * (1 - probs) / n).sqrt() + 1e-9), (counts, probs)


def test_strategy_none_under_torchrun_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from amft_lib.trainer import run_train

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = apply_overrides(TrainConfig(), ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2",
                                          "data.train_size=20", "data.val_size=4"])
    with pytest.raises(ConfigError, match=r"distributed\.strategy=none"):
        run_train(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    cfg = apply_overrides(cfg, ["distributed.strategy=ddp", "rollout.prompts_per_step=3"])
    with pytest.raises(ConfigError, match=r"rollout\.prompts_per_step=3 does not split over 2 ranks"):
        run_train(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("saved", "now", "elastic", "refused"), [
    ((2, "fsdp"), (2, "fsdp"), False, None),
    ((1, "none"), (1, "none"), False, None),
    ((2, "fsdp"), (1, "none"), False, "written by 2 process(es) with distributed.strategy=fsdp"),
    ((2, "ddp"), (2, "fsdp"), False, "the warm start does not change world size"),
    ((2, "fsdp"), (1, "none"), True, None),  # DCP reshards onto whole tensors
    ((4, "fsdp"), (2, "ddp"), True, None),
    ((1, "none"), (2, "ddp"), True, None),  # every DDP rank loads the whole 1-process state
    ((1, "none"), (2, "fsdp"), True, "written by 1 process (whole tensors, no DCP shards)"),
])
def test_which_checkpoints_a_launch_can_continue(saved, now, elastic, refused):
    """The trainer resumes elastically; the warm start (and any strict caller) only on the same layout."""
    from amft_lib.checkpoint import CheckpointError, check_world

    state = {"world_size": saved[0], "strategy": saved[1]}
    dist = Dist(world_size=now[0], strategy=now[1])
    if refused is None:
        change = check_world("s3://b/run/checkpoints/step-0000004", state, dist, elastic=elastic)
        assert change == ("" if saved == now else
                          f"written by {saved[0]} process(es) ({saved[1]}), continuing on {now[0]} ({now[1]})")
    else:
        with pytest.raises(CheckpointError, match=re.escape(refused)):
            check_world("s3://b/run/checkpoints/step-0000004", state, dist, elastic=elastic)
