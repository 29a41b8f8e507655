"""The study harness (bench/study_countdown.py, bench/study_report.py): what each row trains, how tuning
is picked, that a resumed study refuses another question, and that the verdict follows the paired CIs.
Training itself is the trainer's tests' business; records here are synthetic so every number is known."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import study_countdown as sc  # noqa: E402
import study_report as sr  # noqa: E402

from amft_lib.config import apply_overrides, load_config  # noqa: E402

CONFIG = str(BENCH.parent / "configs" / "tiny_countdown.yaml")


def test_rows_train_what_their_names_say():
    spec = sc.Spec(steps=200)
    tuned = {"sft_grpo": 100, "fixed": 0.75}
    assert sc.method_overrides("sft_grpo", spec, tuned) == ["controller.method=sft_grpo", "controller.switch_step=100"]
    assert sc.method_overrides("sft_grpo_rl50", spec, tuned)[-1] == "controller.switch_step=150"  # 50 RL steps
    assert sc.method_overrides("fixed", spec, tuned)[-1] == "controller.mu_init=0.75"
    assert "controller.meta_update=evidence" in sc.method_overrides("amft", spec, tuned)
    assert sc.method_overrides("grpo", spec, tuned) == ["controller.method=grpo"]
    # follow-up rows are amft plus their own settings, each of which the config accepts
    pooled = sc.method_overrides("amft_pooled_raw_entropy", spec, tuned)
    assert pooled[:2] == sc.method_overrides("amft", spec, tuned)
    cfg = apply_overrides(load_config(CONFIG), pooled)
    assert (cfg.controller.method, cfg.controller.meta_accumulate, cfg.controller.entropy_tolerance) == ("amft", 4, 0)


def test_fixed_budget_gets_amfts_meta_rollouts_as_training_prompts():
    amft = apply_overrides(load_config(CONFIG), ["controller.meta_val_prompts=64", "controller.meta_val_group=4",
                                                 "controller.meta_interval=8", "rollout.prompts_per_step=8",
                                                 "rollout.group_size=8"])
    assert sc.meta_rollouts_per_step(amft) == 32.0  # 256 validation rollouts every 8 steps
    over = sc.method_overrides("fixed_budget", sc.Spec(), {"fixed": 0.5}, amft)
    assert over[-1] == "rollout.prompts_per_step=12"  # 8 prompts + 32 rollouts / G=8


def test_tuning_picks_the_best_val_value_first_on_ties():
    recs = [{"method": "fixed", "value": 0.25, "val_accuracy": 0.10}, {"method": "fixed", "value": 0.5,
                                                                       "val_accuracy": 0.14},
            {"method": "fixed", "value": 0.75, "val_accuracy": 0.14}, {"method": "sft_grpo", "value": 50,
                                                                       "val_accuracy": 0.2}]
    assert sc.pick_tuned(recs) == {"fixed": 0.5, "sft_grpo": 50}


def test_a_resumed_study_refuses_another_question(tmp_path: Path):
    spec = sc.Spec(steps=200, seeds=(0, 1, 2))
    facts = {"data_card_sha256": "a" * 64, "warm_start_digest": "b" * 64}
    sc.write_json(tmp_path / "study.json", {"fingerprint": {**spec.fingerprint(), **facts}})
    sc.check_fingerprint(tmp_path, spec, facts)  # the same question: accepted (tuples vs JSON lists too)
    sc.check_fingerprint(tmp_path, sc.Spec(steps=200, seeds=(0, 1, 2, 3), methods=("amft",)), facts)  # extends
    with pytest.raises(SystemExit, match="field 'steps' is 200, this invocation asks 100"):
        sc.check_fingerprint(tmp_path, sc.Spec(steps=100), facts)
    with pytest.raises(SystemExit, match="'warm_start_digest'"):
        sc.check_fingerprint(tmp_path, spec, {**facts, "warm_start_digest": "c" * 64})


def test_plan_resumes_seed_major_and_holds_tuned_rows(tmp_path: Path):
    spec = sc.Spec(steps=200, seeds=(0, 1), methods=("amft", "fixed"))
    sc.write_json(sc.run_path(tmp_path, "amft", 0), {"done": True})
    sc.write_json(tmp_path / "warm_start_scores.json", {})
    jobs = sc.plan(spec, tmp_path, tmp_path / "out", {})
    runs = [(j["method"], j["seed"], j["needs_tuning"]) for j in jobs if j["kind"] == "run"]
    assert runs == [("fixed", 0, True), ("amft", 1, False), ("fixed", 1, True)]
    assert [j["name"] for j in jobs if j["kind"] == "tune"] == [t["name"] for t in sc.tuning_jobs(spec)]
    assert not any(j["kind"] == "warm_start" for j in jobs)


def test_records_are_written_whole(tmp_path: Path):
    path = tmp_path / "runs" / "x-s0.json.gz"
    sc.write_json(path, {"a": [1, 2]})
    assert sc.read_json(path) == {"a": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["x-s0.json.gz"]  # no temp file left behind


def _record(method: str, seed: int, p_id: float, p_ood: float, n: int = 400) -> dict:
    rng = np.random.default_rng(seed)  # the same draws for every method: equal p ⇒ identical instances
    inst = {}
    for split, p in (("test_id", p_id), ("test_ood", p_ood)):
        greedy = (rng.random(n) < p).astype(int).tolist()
        inst[split] = {"ids": list(range(n)), "greedy": greedy, "correct_of_8": [8 * g for g in greedy[:50]]}
    return {"method": method, "seed": seed, "steps": 200, "instances": inst, "accuracy": sc.summary_of(inst, 8),
            "curves": {"step": [0, 1], "mu": [0.5, 0.5], "val": [[0, 0.1], [2, 0.2]],
                       "meta": [{"step": 0, "meta_grad_t": 2.5}, {"step": 1, "meta_grad_t": 0.3}]},
            "mu_final": 0.5, "rollouts_train": 12800, "rollouts_meta": 0, "train_s": 60.0, "eval_s": 30.0}


@pytest.mark.parametrize("amft_ood, expected", [(0.6, "**Yes**"), (0.1, "**No**"), (0.3, "Not distinguishable")])
def test_the_verdict_follows_the_paired_cis(tmp_path: Path, amft_ood: float, expected: str):
    methods, seeds = ("sft_grpo", "fixed", "amft"), (0, 1)
    for s in seeds:
        sc.write_json(sc.run_path(tmp_path, "sft_grpo", s), _record("sft_grpo", s, 0.3, 0.3))
        sc.write_json(sc.run_path(tmp_path, "fixed", s), _record("fixed", s, 0.3, 0.3))
        sc.write_json(sc.run_path(tmp_path, "amft", s), _record("amft", s, 0.3, amft_ood))
    meta = {"command": "x", "spec": {"steps": 200, "pass_k": 8, "pass_k_rows": 50}, "methods": list(methods),
            "seeds": list(seeds), "tuned": {"fixed": 0.5}}
    md = sr.report(tmp_path, meta, n_boot=300, out_dir=tmp_path)
    assert expected in md
    assert "On test_id: AMFT − sft_grpo = +0.000" in md  # the other split is reported beside the target's
    assert "2 seeds" not in md and "| amft | 2 |" in md  # seeds per row are counted, not assumed
    assert "50% of 4" in md  # |t| ≥ 2 on one of the two meta steps of each of 2 seeds
    assert (tmp_path / "methods_countdown_curves.png").stat().st_size > 10_000
    # a follow-up row is reported beside the question's rows but counts in neither its progress nor verdict
    sc.write_json(sc.run_path(tmp_path, "amft_pooled", 0), _record("amft_pooled", 0, 0.3, 0.3))
    follow = {**meta, "methods": [*methods, "amft_pooled"], "question": list(methods),
              "follow_up": {"rows": ["amft_pooled"], "command": "x --methods amft_pooled"}}
    md = sr.report(tmp_path, follow, n_boot=300, out_dir=tmp_path)
    assert expected in md and "| amft_pooled | 1 |" in md and "6/6 runs" in md
    assert "Follow-up rows (beside the question's; not in its verdict or progress): amft_pooled" in md
    sc.run_path(tmp_path, "fixed", 1).unlink()  # an unfinished study never claims an answer
    assert "**Not answered yet**: 5 of 6 runs" in sr.report(tmp_path, meta, n_boot=300, out_dir=tmp_path)


def test_a_changed_default_is_caught_but_a_new_setting_is_not(tmp_path: Path):
    spec = sc.Spec(steps=200)
    cfg = sc.flat_config(spec)
    assert cfg["max_steps"] == 200 and cfg["rollout.group_size"] == 8 and "seed" not in cfg
    facts = {"train_config": cfg}
    sc.write_json(tmp_path / "study.json", {"fingerprint": {**spec.fingerprint(), "train_config": cfg}})
    sc.check_fingerprint(tmp_path, spec, {"train_config": {**cfg, "engine.new_switch": True}})
    with pytest.raises(SystemExit, match=r"setting .rollout\.group_size. was 8 when the study started and "
                                         r"resolves to 4"):
        sc.check_fingerprint(tmp_path, spec, {"train_config": {**cfg, "rollout.group_size": 4}})
    assert facts["train_config"] is cfg  # the caller's facts are not consumed by the check


def test_records_land_where_git_can_commit_them(tmp_path: Path):
    sc.check_committable(sc.STUDY)  # the default study folder is inside the checkout and not ignored
    with pytest.raises(SystemExit, match="outside the checkout or ignored by git"):
        sc.check_committable(tmp_path / "study")


def test_the_reported_command_is_the_question_not_how_it_ran():
    argv = ["--task", "countdown", "--workers", "1", "--commit", "--seeds", "0", "1", "--n-boot=200", "--report-only"]
    assert sc.canonical_command(argv) == "amft bench methods --task countdown --seeds 0 1"
    # which rows run is not the question either: a follow-up invocation names the study it extends
    argv = ["--task", "countdown", "--methods", "amft_pooled", "amft_pooled_raw_entropy", "--commit", "--seeds", "0"]
    assert sc.canonical_command(sc.without_methods(argv)) == "amft bench methods --task countdown --seeds 0"
    assert sc.without_methods(["--methods=amft", "--steps", "60"]) == ["--steps", "60"]


def test_a_resumed_runs_wall_time_counts_its_earlier_processes():
    # process 1 ran steps 0-4 (checkpoint at 4, step 4 thrown away), process 2 ran 4-7 (checkpoint at 8),
    # the resuming process 3 starts at 8: earlier share = 3.0 (step 3) + 2.5 (step 7)
    rows = [{"step": s, "elapsed_s": e} for s, e in [(0, 1.0), (1, 2.0), (2, 2.5), (3, 3.0),
                                                      (4, 0.5), (5, 1.0), (6, 2.0), (7, 2.5),
                                                      (8, 0.7), (9, 1.4)]]
    rows.append({"step": 10, "final": True, "val_accuracy": 0.1})
    assert sc.earlier_train_s(rows, 8) == pytest.approx(5.5)
    assert sc.earlier_train_s(rows, 0) == 0.0  # a fresh run: nothing earlier
    # resumed at the end (the previous process finished every step but died before scoring)
    assert sc.earlier_train_s(rows[:10], 10) == pytest.approx(3.0 + 2.5 + 1.4)


def _args(**kw):
    from argparse import Namespace

    base = dict(model="tiny", config=None, warm_config=None, study=None, methods=None, seeds=None, out=None,
                steps=None, eval_rows=None, pass_k_rows=None, tuned=None, set=[], pass_k=8,
                switch_grid=[50, 100, 150], mu_grid=[0.25, 0.5, 0.75])
    return Namespace(**{**base, **kw})


def test_the_model_presets_ask_their_own_question():
    tiny = _args(steps=200, methods=list(sc.METHODS), seeds=[0, 1, 2])
    sc.apply_model_preset(tiny)
    # the tiny study's question is the default Spec's: a preset must not change a running study's fingerprint
    assert sc.spec_from_args(tiny).fingerprint() == sc.Spec(steps=200).fingerprint()
    smol = _args(model="smollm2", tuned=["sft_grpo=15", "fixed=0.25"])
    sc.apply_model_preset(smol)
    spec = sc.spec_from_args(smol)
    assert (spec.steps, spec.eval_rows, spec.pass_k_rows, spec.eval_prompts, spec.checkpoint_every) == (60, 500, 100,
                                                                                                       100, 10)
    assert spec.methods == ("amft", "sft_grpo", "fixed") and spec.seeds == (0,)
    assert spec.given == (("fixed", 0.25), ("sft_grpo", 15.0))
    assert smol.study.endswith("study_countdown_smollm2") and spec.config.endswith("smollm2_countdown_lora.yaml")
    # what the user says still wins over the preset
    mine = _args(model="smollm2", steps=80, eval_rows=0)
    sc.apply_model_preset(mine)
    assert (mine.steps, mine.eval_rows, mine.pass_k_rows) == (80, 0, 100)


def test_given_values_are_checked_and_the_unused_grid_is_not():
    smol = _args(model="smollm2", tuned=["sft_grpo=70", "fixed=0.25"])  # 60 steps: RL would never start
    sc.apply_model_preset(smol)
    with pytest.raises(SystemExit, match=r"--tuned sft_grpo=70: outside 1\.\.59"):
        sc.main(smol)
    tiny = _args(steps=60, methods=list(sc.METHODS), seeds=[0])  # tuned on val: the grid must fit the steps
    sc.apply_model_preset(tiny)
    with pytest.raises(SystemExit, match=r"--switch-grid: \[100, 150\] outside 1\.\.59"):
        sc.main(tiny)


def test_a_warm_start_too_big_for_git_stays_in_the_working_folder(tmp_path: Path, monkeypatch):
    """SmolLM2's merged warm start is ~540 MB: only its stats are committed, runs read the model from the
    working folder, its digest is in the fingerprint, and a checkout without it is refused in one line."""
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy, save_policy
    from amft_lib.model_files import content_digest

    out, study = tmp_path / "out", tmp_path / "study"
    (out / "data").mkdir(parents=True)
    (out / "data" / "card.json").write_text('{"task": "countdown"}')  # prepare() skips a prepared folder
    built = out / "warm_start"
    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    save_policy(model, tok, built / "model")
    (built / "stats.json").write_text('{"target_entropy": 0.5, "target_entropy_temperature": 1.0}')
    spec = sc.Spec(steps=60, config=CONFIG)
    monkeypatch.setattr(sc, "COMMIT_MODEL_MAX", 1024)  # the tiny model (~100 kB) counts as big here
    prep = sc.prepare(spec, study, out, do_commit=False)
    assert sorted(p.name for p in (study / "warm_start").iterdir()) == ["stats.json"]
    assert prep["warm_model"] == str(built / "model")
    assert prep["facts"]["warm_start_digest"] == content_digest(built / "model")
    shutil.rmtree(built)
    with pytest.raises(SystemExit, match=r"warm-start model is not committed .* is missing"):
        sc.prepare(spec, study, out, do_commit=False)
    monkeypatch.setattr(sc, "COMMIT_MODEL_MAX", 32 << 20)  # small enough: committed whole, subfolders too
    save_policy(model, tok, built / "model")
    (built / "stats.json").write_text('{"target_entropy": 0.5, "target_entropy_temperature": 1.0}')
    shutil.rmtree(study)
    prep = sc.prepare(spec, study, out, do_commit=False)
    assert prep["warm_model"] == str(study / "warm_start" / "model")
    assert content_digest(study / "warm_start" / "model") == content_digest(built / "model")


def test_a_lora_warm_start_too_big_for_git_is_rebuilt_from_its_committed_adapter(tmp_path: Path, monkeypatch):
    """A LoRA warm start whose merged model is over the limit commits its adapter (a few MB for SmolLM2);
    a checkout without the working folder merges it back onto the base and gets the same digest."""
    import yaml

    from amft_lib.config import ModelConfig
    from amft_lib.distributed import SINGLE
    from amft_lib.model import load_policy, trainable_parameters
    from amft_lib.policy import Policy, save_final_policy

    out, study = tmp_path / "out", tmp_path / "study"
    (out / "data").mkdir(parents=True)
    (out / "data" / "card.json").write_text('{"task": "countdown"}')  # prepare() skips a prepared folder
    lora = {"name": "tiny", "tiny_hidden": 32, "tiny_layers": 1, "tiny_heads": 2, "lora": True, "lora_r": 4}
    warm_config = tmp_path / "warm.yaml"
    warm_config.write_text(yaml.safe_dump({"seed": 3, "model": lora, "data": {"task": "countdown"}}))
    model, tok = load_policy(ModelConfig(**lora), seed=3)  # what the warm start trained from its seed
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    built = out / "warm_start"
    save_final_policy(Policy.of(model, tok, SINGLE, torch.device("cpu")), ModelConfig(**lora), built / "model")
    (built / "stats.json").write_text('{"target_entropy": 0.5, "target_entropy_temperature": 1.0}')
    adapter_bytes, model_bytes = sc._bytes(built / "adapter"), sc._bytes(built / "model")
    assert adapter_bytes < model_bytes
    monkeypatch.setattr(sc, "COMMIT_MODEL_MAX", (adapter_bytes + model_bytes) // 2)
    spec = sc.Spec(steps=60, config=CONFIG, warm_config=str(warm_config))
    first = sc.prepare(spec, study, out, do_commit=False)
    assert sorted(p.name for p in (study / "warm_start").iterdir()) == ["adapter", "stats.json"]
    shutil.rmtree(built)  # another checkout: only what git holds
    again = sc.prepare(spec, study, out, do_commit=False)
    assert again["warm_model"] == str(built / "model")
    assert again["facts"]["warm_start_digest"] == first["facts"]["warm_start_digest"]
