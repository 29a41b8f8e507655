"""Rejection-sampled warm start (AMFT.md §3)."""

import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from amft_lib import checkpoint as ckpt
from amft_lib import cli
from amft_lib.config import ConfigError, WarmStartConfig, apply_overrides
from amft_lib.model import build_char_tokenizer
from amft_lib.tasks import get_task
from amft_lib.tasks.general_points import generate_rows
from amft_lib.warm_start import keep_better, rejection_sample, run_warm_start


class ScriptedPolicy(torch.nn.Module):
    """A policy whose outputs are known in advance: the i-th call for a prompt returns script[prompt][i].

    A test double for the sampler only (the real sampling path is exercised by the trainer tests);
    it lets the test know exactly which samples the verifier must accept.
    """

    def __init__(self, tokenizer, script: dict[str, list[str]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.script = tokenizer, script
        self.calls: dict[str, int] = {}

    def generate(self, input_ids, attention_mask, generation_config, **sampling):
        # `sampling` (the per-row seeded logits processors) does not matter: the script decides the text
        outs = []
        for row, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(row[mask.bool()][1:])  # drop BOS
            i = self.calls.get(prompt, 0)
            self.calls[prompt] = i + 1
            text = self.script[prompt][i % len(self.script[prompt])]
            outs.append(row.tolist() + self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id])
        width = max(map(len, outs))
        return torch.tensor([o + [self.tok.pad_token_id] * (width - len(o)) for o in outs])


def test_rejection_sampling_keeps_only_verified_distinct_capped():
    tok = build_char_tokenizer()
    task = get_task("general_points")
    rows = generate_rows(3, "face10", 0, "train")
    good = [r["demonstration"].strip() for r in rows]
    script = {
        rows[0]["prompt"]: ["Answer: 1+1", good[0], good[0], "Answer: 2*2*2*3"],  # 1 distinct good (maybe 2)
        rows[1]["prompt"]: ["garbage", "Answer: (", "Answer: 24", "Answer: 5*5-1"],  # nothing verifies
        rows[2]["prompt"]: [good[2] + " ", "x\n" + good[2], "y\n" + good[2], "z\n" + good[2]],  # 4 good, 3 distinct
    }
    cfg = WarmStartConfig(rs_samples=4, rs_max_per_prompt=2, max_new_tokens=200)
    accepted, stats = rejection_sample(ScriptedPolicy(tok, script), tok, task, rows, cfg)
    assert all(task.verify(a["answer"], a["demonstration"]).reward == 1.0 for a in accepted)
    by_parent = {}
    for a in accepted:
        meta = json.loads(a["meta"])
        assert meta["source"] == "rejection_sampling"
        by_parent.setdefault(meta["parent_id"], []).append(a["demonstration"])
    assert rows[1]["id"] not in by_parent
    assert len(by_parent[rows[2]["id"]]) == 2  # capped at c=2 although 3 distinct correct samples exist
    assert all(len(set(v)) == len(v) for v in by_parent.values())  # deduplicated
    # the demonstration itself is not "new data": sample 0/1 of prompt 0 equal the demo and are skipped
    assert rows[0]["id"] not in by_parent or all(d.strip() != good[0] for d in by_parent[rows[0]["id"]])
    correct = [sum(task.verify(r["answer"], t).reward for t in script[r["prompt"]]) for r in rows]
    assert stats["sampled"] == 12 and stats["correct"] == sum(correct)
    assert stats["acceptance_rate"] == pytest.approx(sum(correct) / 12)
    assert stats["pass_at_k"] == pytest.approx(sum(c > 0 for c in correct) / 3)


def test_run_warm_start_writes_model_accepted_and_stats(tmp_path):
    splits = {"train": generate_rows(32, "face10", 1, "train"), "val": generate_rows(4, "face10", 2, "val")}
    cfg = apply_overrides(WarmStartConfig(), [
        "model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "warmup_steps=3", "batch_size=8",
        "rs_samples=2", "rs_max_prompts=8", "final_sft_steps=2", "max_new_tokens=16", "entropy_prompts=4",
        "entropy_group=2", "eval_prompts=4",
    ])
    res = run_warm_start(cfg, tmp_path, splits=splits)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["rejection_sampling"]["prompts"] == 8 and stats["rejection_sampling"]["sampled"] == 16
    assert 0.0 <= stats["rejection_sampling"]["acceptance_rate"] <= 1.0
    assert stats["target_entropy"] == pytest.approx(res.target_entropy) and res.target_entropy > 0
    assert set(stats["val_accuracy"]) == {"initial", "after_warmup", "final_sft", "warm_start"}
    assert stats["val_accuracy"]["warm_start"] == stats["val_accuracy"][stats["kept_model"]]
    assert (res.model_dir / "model.safetensors").exists()
    table = pq.read_table(res.accepted_path)
    assert table.column_names == ["id", "task", "prompt", "answer", "demonstration", "split", "meta"]
    history = [json.loads(x) for x in (tmp_path / "sft_history.jsonl").read_text().splitlines()]
    assert [h["phase"] for h in history] == ["warmup"] * 3 + ["final_sft"] * 2
    # the final phase peaks at lr × final_sft_lr_ratio: it refines a converged model, it does not restart it
    peak = {phase: max(h["lr"] for h in history if h["phase"] == phase) for phase in ("warmup", "final_sft")}
    assert peak["warmup"] == pytest.approx(cfg.lr)
    assert peak["final_sft"] == pytest.approx(cfg.lr * cfg.final_sft_lr_ratio)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_final_sft_lr_ratio_is_validated(ratio):
    with pytest.raises(ConfigError, match="final_sft_lr_ratio"):
        WarmStartConfig(final_sft_lr_ratio=ratio)


# ── H* at the rollout temperature (issue 14: at T=2 an H* measured at T=1 pinned μ to its floor) ──────


def test_target_entropy_is_measured_at_the_configured_temperature():
    """measure_target_entropy samples and scores at cfg.entropy_temperature; a hotter policy has a higher H*."""
    import dataclasses

    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy
    from amft_lib.warm_start import measure_target_entropy

    torch.manual_seed(0)
    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    rows = generate_rows(4, "face10", seed=0, split="train")
    cfg = WarmStartConfig(entropy_group=2, max_new_tokens=8)
    h = {t: measure_target_entropy(model, tok, rows, dataclasses.replace(cfg, entropy_temperature=t))
         for t in (0.5, 2.0)}
    assert h[0.5] < h[2.0]  # entropy of softmax(z/T) grows with T; a mismatch is not a rounding matter


def test_target_entropy_temperature_mismatch_is_refused():
    from amft_lib.config import TrainConfig, check_target_entropy_temperature

    ok = apply_overrides(TrainConfig(), ["rollout.temperature=2.0", "controller.target_entropy=0.7",
                                         "controller.target_entropy_temperature=2.0"])
    assert ok.controller.target_entropy == 0.7
    with pytest.raises(ConfigError, match=r"measured at temperature 1\.0 but rollout\.temperature=2\.0"):
        apply_overrides(TrainConfig(), ["rollout.temperature=2.0", "controller.target_entropy=0.7",
                                        "controller.target_entropy_temperature=1.0"])
    # the pipeline's train component sets fields after loading: the trainer checks again at start
    mutated = apply_overrides(TrainConfig(), ["rollout.temperature=2.0"])
    mutated.controller.target_entropy, mutated.controller.target_entropy_temperature = 0.7, 1.0
    with pytest.raises(ConfigError, match="measure H\\* at the rollout temperature"):
        check_target_entropy_temperature(mutated)


def test_trainer_refuses_a_mismatched_target_entropy(tmp_path):
    from amft_lib.config import TrainConfig
    from amft_lib.trainer import run_train

    cfg = apply_overrides(TrainConfig(), ["rollout.temperature=2.0"])
    cfg.controller.target_entropy, cfg.controller.target_entropy_temperature = 0.7, 1.0
    with pytest.raises(ConfigError, match=r"rollout\.temperature=2\.0"):
        run_train(cfg, tmp_path / "run", splits={"train": []}, progress=False)


def test_default_and_shipped_temperatures_agree():
    """Pipeline defaults and the shipped warm-start/train config pairs measure H* where the rollouts run."""
    from pathlib import Path

    from amft_lib.config import RolloutConfig, load_config

    assert WarmStartConfig().entropy_temperature == RolloutConfig().temperature
    root = Path(__file__).resolve().parents[2] / "configs"
    for train_yaml, warm_yaml in [("tiny_countdown.yaml", "tiny_countdown_warm_start.yaml"),
                                  ("tiny_gp.yaml", "tiny_warm_start.yaml")]:
        assert (load_config(root / warm_yaml, WarmStartConfig).entropy_temperature
                == load_config(root / train_yaml).rollout.temperature), train_yaml


def test_bench_passes_h_star_measured_at_the_rollout_temperature(tmp_path):
    """bench_methods re-measures H* when a reused warm start measured it at another temperature."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_methods.py"
    spec = importlib.util.spec_from_file_location("bench_methods", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    warm = tmp_path / "warm"
    warm.mkdir()
    stats = {"target_entropy": 0.25, "target_entropy_temperature": 2.0}
    model = warm / "model"
    assert bench.h_star_at(warm, model, stats, 2.0, "unused.yaml", tmp_path) == 0.25  # measured there: used as is
    (warm / "target_entropy_T2.0.json").write_text(json.dumps({"target_entropy": 0.9, "temperature": 2.0}))
    assert bench.h_star_at(warm, model, {"target_entropy": 0.25}, 2.0, "unused.yaml", tmp_path) == 0.9  # T=1: not used


# ── checkpoints and resume (issue 12) ───────────────────────────────────────────────────────────────
# 3 warm-up steps, 2 rejection-sampling chunks (8 prompts, k=64 → 4 prompts per chunk), 3 final SFT steps:
# global steps 1-3, 4-5, 6-8, a checkpoint after each (checkpoint_every=1), all kept.
RESUME_SETS = ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "warmup_steps=3", "batch_size=8",
               "rs_samples=64", "rs_max_prompts=8", "final_sft_steps=3", "max_new_tokens=16", "entropy_prompts=4",
               "entropy_group=2", "eval_prompts=4", "checkpoint_every=1", "checkpoint_keep_last=100"]
OUTPUTS = ("model/model.safetensors", "accepted.parquet", "sft_history.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(splits, cfg, out dir, checkpoint root, result) of one warm start that checkpoints every step."""
    base = tmp_path_factory.mktemp("ws-resume")
    splits = {"train": generate_rows(32, "face10", 1, "train"), "val": generate_rows(4, "face10", 2, "val")}
    cfg = apply_overrides(WarmStartConfig(), RESUME_SETS)
    res = run_warm_start(cfg, base / "a", splits=splits, checkpoint_root=str(base / "root"), resume="auto")
    return splits, cfg, base / "a", base / "root", res


def _stats(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    stats.pop("elapsed_s")
    return stats


def test_warm_start_checkpoints_every_step_with_phase_and_resumes_bitwise_from_each(uninterrupted, tmp_path):
    splits, cfg, out_a, root, res_a = uninterrupted
    assert res_a.resumed_from is None
    found = ckpt.list_checkpoints(str(root / "warm_start"))
    assert [(s, complete) for s, _, complete in found] == [(s, True) for s in range(1, 9)]
    assert (root / "warm_start" / "checkpoints" / "LATEST").read_text().strip() == "step-0000008"
    phases = []
    for step, uri, _ in found:
        state = json.loads((Path(uri) / "trainer_state.json").read_text())
        phases.append((state["phase"], state["phase_step"], state["phase_steps"]))
        # a fresh root holding only this checkpoint, as if the run had been killed right after it
        resume_root = tmp_path / f"root{step}" / "warm_start" / "checkpoints"
        shutil.copytree(uri, resume_root / Path(uri).name)
        if step > 5:  # inside the final SFT: retention keeps the last sampling checkpoint (the fall-back weights)
            shutil.copytree(Path(uri).parent / "step-0000005", resume_root / "step-0000005")
        res_b = run_warm_start(cfg, tmp_path / f"b{step}", splits=splits, checkpoint_root=str(tmp_path / f"root{step}"),
                               resume="auto")
        assert res_b.resumed_from == str(resume_root / Path(uri).name)
        for name in OUTPUTS:
            assert (out_a / name).read_bytes() == (tmp_path / f"b{step}" / name).read_bytes(), (step, name)
        assert _stats(out_a) == _stats(tmp_path / f"b{step}"), step
        assert res_b.target_entropy == res_a.target_entropy
    assert phases == [("warmup", 1, 3), ("warmup", 2, 3), ("warmup", 3, 3), ("rejection_sampling", 1, 2),
                      ("rejection_sampling", 2, 2), ("final_sft", 1, 3), ("final_sft", 2, 3), ("final_sft", 3, 3)]


def test_warm_start_resume_refuses_another_config_unless_forced(uninterrupted, tmp_path):
    splits, cfg, _, root, _ = uninterrupted
    other = apply_overrides(cfg, ["lr=1e-3"])
    with pytest.raises(ckpt.ConfigMismatchError, match="config hash"):
        run_warm_start(other, tmp_path / "c", splits=splits, checkpoint_root=str(root), resume="auto")
    res = run_warm_start(other, tmp_path / "d", splits=splits, checkpoint_root=str(root), resume="auto",
                         force_resume=True)
    assert res.resumed_from.endswith("step-0000008")  # the final SFT's last step: only H* and the outputs remain


def test_warm_start_resume_auto_needs_a_checkpoint_root(tmp_path):
    cfg = apply_overrides(WarmStartConfig(), ["checkpoint_every=2"])
    with pytest.raises(ValueError, match="checkpoint root"):
        run_warm_start(cfg, tmp_path / "o", splits={"train": generate_rows(4, "face10", 1, "train")}, resume="auto")


@pytest.mark.parametrize("override", ["checkpoint_every=-1", "checkpoint_keep_last=0"])
def test_checkpoint_settings_are_validated(override):
    with pytest.raises(ConfigError, match=r"checkpoint_(every|keep_last)="):
        apply_overrides(WarmStartConfig(), [override])


def test_cli_warm_start_resume_auto_needs_checkpoint_root(tmp_path, capsys):
    assert cli.main(["warm-start", "--out", str(tmp_path / "o"), "--resume", "auto"]) == 2
    assert "--resume auto needs --checkpoint-root" in capsys.readouterr().err


def test_default_log_of_a_checkpointing_warm_start_has_no_per_save_lines(tmp_path, caplog):
    """Issue 25: "saved checkpoint" / "retention: deleted" pairs were 80 % of the demo's log. At INFO a warm
    start that saves 8 checkpoints and deletes 5 logs one checkpoint line per phase; the per-save lines are
    still there at DEBUG for whoever needs them."""
    splits = {"train": generate_rows(32, "face10", 1, "train"), "val": generate_rows(4, "face10", 2, "val")}
    cfg = apply_overrides(WarmStartConfig(), [*RESUME_SETS[:-1], "checkpoint_keep_last=2"])
    with caplog.at_level(logging.DEBUG, logger="amft_lib"):
        run_warm_start(cfg, tmp_path / "out", splits=splits, checkpoint_root=str(tmp_path / "root"))
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert not [m for m in info if "saved checkpoint" in m or "retention" in m]
    assert sum("saved checkpoint" in m for m in debug) == 8 and sum("retention: deleted" in m for m in debug) == 5
    phase_lines = [m for m in info if "checkpointed" in m]
    assert [m.split(":")[0] for m in phase_lines] == ["warmup", "rejection_sampling", "final_sft"]
    assert "8 save(s)" in phase_lines[-1] and "step-0000008" in phase_lines[-1]


@pytest.mark.parametrize("after_warmup, after_final, kept", [(0.5, 0.25, "after_warmup"), (0.25, 0.5, "final_sft"),
                                                             (0.5, 0.5, "final_sft")])
def test_keep_better_by_val(after_warmup, after_final, kept):
    assert keep_better(after_warmup, after_final) == kept


def _scripted_val(monkeypatch, scores: dict[str, float]) -> None:
    """Replace the greedy val measurement by scripted scores in call order (initial, after the warm-up,
    after the final SFT): a test double for the score only, so the test decides which phase "won" a
    comparison that a 1-layer model cannot make non-zero in seconds. Training, sampling, checkpoints,
    retention and the written model are real."""
    import amft_lib.warm_start as ws_module

    def fake(ws):
        state = ws.checkpoints.progress.get("val_accuracy") or {}
        return scores[next(k for k in ("initial", "after_warmup", "final_sft") if k not in state)]

    monkeypatch.setattr(ws_module, "evaluate", fake)


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_final_sft_that_scores_lower_on_val_is_not_kept_even_after_a_resume(tmp_path, monkeypatch):
    """Issue 25: the final SFT took val accuracy 0.22 → 0.10 and that model became the warm start. Now the
    after-warm-up weights come back (stats.json: kept = after_warmup), also for a run resumed inside the
    final SFT with the default retention (the last rejection-sampling checkpoint is kept by its score)."""
    _scripted_val(monkeypatch, {"initial": 0.0, "after_warmup": 0.5, "final_sft": 0.25})
    splits = {"train": generate_rows(32, "face10", 1, "train"), "val": generate_rows(4, "face10", 2, "val")}
    cfg = apply_overrides(WarmStartConfig(), [*RESUME_SETS[:-1], "checkpoint_keep_last=2"])
    root = tmp_path / "root"
    run_warm_start(cfg, tmp_path / "a", splits=splits, checkpoint_root=str(root))
    stats = _stats(tmp_path / "a")
    assert stats["kept_model"] == "after_warmup"
    assert stats["val_accuracy"] == {"initial": 0.0, "after_warmup": 0.5, "final_sft": 0.25, "warm_start": 0.5}
    # steps: warm-up 1-3, sampling 4-5, final SFT 6-8; retention kept the last two and step 5 (scored)
    kept = [s for s, _, complete in ckpt.list_checkpoints(str(root / "warm_start")) if complete]
    assert kept == [5, 7, 8]
    out = _weights(tmp_path / "a" / "model" / "model.safetensors")
    after_warmup = _weights(root / "warm_start" / "checkpoints" / "step-0000005" / "model.safetensors")
    after_final = _weights(root / "warm_start" / "checkpoints" / "step-0000008" / "model.safetensors")
    assert any(not torch.equal(after_warmup[k], after_final[k]) for k in after_final)  # the final SFT did train
    assert all(torch.equal(out[k].to(after_warmup[k].dtype), after_warmup[k]) for k in after_warmup)
    # killed after final-SFT step 7: the resumed run falls back to the same weights
    resumed = tmp_path / "resumed" / "warm_start" / "checkpoints"
    for step in ("step-0000005", "step-0000007"):
        shutil.copytree(root / "warm_start" / "checkpoints" / step, resumed / step)
    run_warm_start(cfg, tmp_path / "b", splits=splits, checkpoint_root=str(tmp_path / "resumed"), resume="auto")
    assert _stats(tmp_path / "b") == stats
    assert (tmp_path / "b" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "a" / "model" / "model.safetensors").read_bytes()


def test_a_final_sft_that_scores_at_least_as_well_is_kept(tmp_path, monkeypatch):
    _scripted_val(monkeypatch, {"initial": 0.0, "after_warmup": 0.25, "final_sft": 0.25})
    splits = {"train": generate_rows(32, "face10", 1, "train"), "val": generate_rows(4, "face10", 2, "val")}
    cfg = apply_overrides(WarmStartConfig(), [*RESUME_SETS[:-1], "checkpoint_keep_last=100"])
    run_warm_start(cfg, tmp_path / "a", splits=splits, checkpoint_root=str(tmp_path / "root"))
    assert _stats(tmp_path / "a")["kept_model"] == "final_sft"
    out = _weights(tmp_path / "a" / "model" / "model.safetensors")
    last = _weights(tmp_path / "root" / "warm_start" / "checkpoints" / "step-0000008" / "model.safetensors")
    assert all(torch.equal(out[k].to(last[k].dtype), last[k]) for k in last)
