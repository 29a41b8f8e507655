"""Evaluation: the pass@k estimator against hand-worked values, and run_evaluate end to end on a
tiny model with a tiny General Points dataset (outputs follow the DESIGN.md contract)."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amft_lib.config import ConfigError
from amft_lib.evaluate import EvalConfig, mean_pass_at_k, pass_at_k, run_evaluate
from amft_lib.reports import evaluation_report, to_markdown

# ── pass@k ──────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 0, 1, 0.0),  # nothing correct
        (5, 5, 3, 1.0),  # everything correct
        (5, 2, 1, 0.4),  # k=1: 1 - C(3,1)/C(5,1) = 1 - 3/5 = c/n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 1 - 1/12
        (3, 2, 2, 1.0),  # n - c = 1 < k: every pair holds a correct one
        (8, 1, 8, 1.0),  # k = n: pass iff any is correct
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_mean_pass_at_k_averages_prompts():
    # n=4, k=2: c=0 → 0; c=2 → 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6; mean = 5/12
    assert mean_pass_at_k([0, 2], n=4, k=2) == pytest.approx(5 / 12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_fraction_of_k_subsets_with_a_correct_sample(nck):
    n, c, k = nck
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    exact = Fraction(sum(any(outcomes[i] for i in s) for s in subsets), len(subsets))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, 1, 0), (3, 1, 4), (3, -1, 1)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ── config validation ───────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"n_samples": 2, "pass_k": 4}, "n >= k"),
        ({"metric": "test_id.format_error_rate"}, "FIELD in accuracy"),
        ({"metric": "accuracy"}, "SPLIT.FIELD"),
        ({"max_regression": -0.1}, "δ"),
        ({"threshold": 1.5}, r"\[0, 1\]"),
        ({"splits": ["test"]}, "choose from"),
        ({"model": ""}, "eval.model is required"),
        ({"data_card_sha256": "ABC"}, r"eval.data_card_sha256='ABC': give 64 lowercase hex"),
    ],
)
def test_eval_config_rejects_bad_values(overrides, match):
    base = {"model": "m", "data": "d", "out_dir": "o"}
    with pytest.raises(ConfigError, match=match):
        EvalConfig(**{**base, **overrides})


# ── run_evaluate on a tiny model ────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from amft_lib.config import ModelConfig
    from amft_lib.model import load_policy, save_policy
    from amft_lib.tasks.general_points import generate_rows

    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    data.mkdir()
    rows = [*generate_rows(3, "face10", seed=1, split="test_id"),
            *generate_rows(3, "face_ranks", seed=2, split="test_ood")]
    pq.write_table(pa.Table.from_pylist(rows), data / "eval.parquet")
    small = {"tiny_hidden": 32, "tiny_layers": 1, "tiny_heads": 2}
    model, tok = load_policy(ModelConfig(name="tiny", **small), seed=0)
    candidate = save_policy(model, tok, root / "candidate")
    model, tok = load_policy(ModelConfig(name="tiny", **small), seed=1)
    champion = save_policy(model, tok, root / "champion")
    run = root / "run"
    run.mkdir()
    steps = [
        {"step": s, "mu": 0.5 + 0.05 * s, "entropy": 2.0 - 0.1 * s, "target_entropy": 1.9, "sft_loss": 3.0 - s,
         "rl_loss": 0.1 * s if s else None, "reward_mean": 0.1 * s, "val_reward": 0.2 if s == 2 else None}
        for s in range(4)
    ]
    steps.append({"step": 4, "val_reward": 0.25, "final": True, "mu": 0.7})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    return {"data": data, "candidate": candidate, "champion": champion, "run": run, "root": root}


def _cfg(setup, out: Path, **kw) -> EvalConfig:
    args = {
        "model": str(setup["candidate"]), "data": str(setup["data"]), "out_dir": str(out),
        "max_new_tokens": 6, "pass_k": 1, "n_samples": 2, "batch_size": 4, "device": "cpu",
    }
    return EvalConfig(**{**args, **kw})


def test_run_evaluate_writes_contract_metrics_and_self_contained_report(tiny_setup, tmp_path):
    out = tmp_path / "eval"
    cfg = _cfg(tiny_setup, out, champion_model=str(tiny_setup["champion"]), base_model="tiny",
               run_dir=str(tiny_setup["run"]), threshold=0.0, max_regression=1.0)
    result = run_evaluate(cfg)

    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("test_id", "test_ood"):
        block = metrics[split]
        for key in ("accuracy", "pass_at_k", "n", "format_error_rate", "mean_response_tokens"):
            assert key in block, (split, key)
        assert block["n"] == 3
        assert 0.0 <= block["accuracy"] <= 1.0 and 0.0 <= block["pass_at_k"] <= 1.0
        assert 0 < block["mean_response_tokens"] <= 6
    assert metrics["blessed"] is result.blessed is True  # threshold 0, δ=1: nothing can fail
    assert "vs champion" in metrics["reason"]
    assert set(metrics["comparisons"]) == {"base", "champion"}
    assert metrics["comparisons"]["champion"]["test_ood"]["n"] == 3
    assert metrics["training"]["mu"]["final"] == pytest.approx(0.7)

    files = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    assert {"metrics.json", "report.md", "report.html", "plots/mu.png", "plots/entropy.png",
            "plots/losses.png", "plots/val_reward.png", "plots/reward.png"} <= files
    assert not [f for f in files if ".tmp-" in f]  # atomic writes left no temp files

    page = (out / "report.html").read_text()
    assert not re.search(r"https?://", page)  # no external CSS/JS/images
    assert "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == 6  # 5 training curves + the accuracy chart
    assert "champion" in page and "BLESSED" in page
    md = (out / "report.md").read_text()
    assert "| metric | candidate | base | Δ vs base | champion | Δ vs champion |" in md
    # images travel inside the report (the KFP UI shows the artifact without its folder)
    assert "![mu](data:image/png;base64," in md
    assert not re.search(r"!\[[^\]]*\]\((?!data:)", md)  # no relative image links
    # the rule names every condition that could refuse the candidate, the warm-start check included
    assert "not significantly below the warm start's" in md
    off = to_markdown(evaluation_report({**metrics, "blessing": {**metrics["blessing"], "warm_start_check": False}},
                                        {}, {}))
    assert "Rule: " in off and "warm start's" not in off


def test_champion_regression_blocks_blessing_and_first_run_is_explained(tiny_setup, tmp_path):
    # A champion that scores exactly like the candidate (the lowest mantissa bit of one float32 weight
    # flipped: another model, by 1 part in 2^23 of one weight): Δ = 0, so δ=0 blesses...
    twin = tmp_path / "twin"
    shutil.copytree(tiny_setup["candidate"], twin)
    blob = bytearray((twin / "model.safetensors").read_bytes())
    blob[8 + int.from_bytes(blob[:8], "little")] ^= 0x01  # little-endian: the first byte holds the lowest bits
    (twin / "model.safetensors").write_bytes(bytes(blob))
    same = run_evaluate(_cfg(tiny_setup, tmp_path / "a", champion_model=str(twin), n_samples=0, splits=["test_id"]))
    assert same.blessed, same.reason
    assert same.metrics["test_id"]["pass_at_k"] is None  # n_samples=0 skips pass@k
    assert "test_ood" not in same.metrics
    # ...and an unreachable threshold does not, whatever the champion says.
    first = run_evaluate(_cfg(tiny_setup, tmp_path / "b", threshold=1.0, n_samples=0, splits=["test_id"]))
    assert not first.blessed and "below the threshold" in first.reason
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["blessed"] is False


def test_cli_evaluate_and_error_line(tiny_setup, tmp_path, capsys):
    from amft_lib.cli.evaluate import register

    parser = argparse.ArgumentParser(prog="amft")
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args([
        "evaluate", "--model", str(tiny_setup["candidate"]), "--data", str(tiny_setup["data"]), "--out", str(out),
        "--max-new-tokens", "4", "--n-samples", "0", "--splits", "test_ood", "--device", "cpu",
        "--threshold", "1.0", "--fail-if-not-blessed",
    ])
    assert args.handler(args) == 1  # not blessed and asked to fail
    assert "blessed=no" in capsys.readouterr().out
    assert (out / "metrics.json").exists()

    from amft_lib import cli  # the boundary that turns a user error into one line and exit 2

    assert cli.main(["evaluate", "--model", "x", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")

    # a pinned card (an audit re-scoring exactly the dataset the gate validated): this folder has none
    pinned = tmp_path / "pinned"
    assert cli.main(["evaluate", "--model", str(tiny_setup["candidate"]), "--data", str(tiny_setup["data"]),
                     "--out", str(pinned), "--data-card-sha256", "0" * 64, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "card.json: the data gate validated a dataset card (000000000000…)" in err[0]
    assert not (pinned / "metrics.json").exists()


def test_comparison_scores_are_cached_by_model_content(tiny_setup, tmp_path, monkeypatch):
    """The base model (or an unchanged champion) is generated once per content hash, data and decoding."""
    from amft_lib import evaluate

    calls: list[str] = []
    real = evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda path, *a, **k: calls.append(a[-1]) or real(path, *a, **k))
    cache = str(tmp_path / "cache")
    first = run_evaluate(_cfg(tiny_setup, tmp_path / "a", champion_model=str(tiny_setup["champion"]),
                              n_samples=0, score_cache=cache))
    assert calls == ["candidate", "champion"]
    second = run_evaluate(_cfg(tiny_setup, tmp_path / "b", champion_model=str(tiny_setup["champion"]),
                               n_samples=0, score_cache=cache))
    assert calls == ["candidate", "champion", "candidate"]  # the champion's scores came from the cache
    assert second.metrics["comparisons"]["champion"]["test_id"] == first.metrics["comparisons"]["champion"]["test_id"]
    run_evaluate(_cfg(tiny_setup, tmp_path / "c", champion_model=str(tiny_setup["champion"]), n_samples=0,
                      score_cache=cache, max_new_tokens=5))
    assert calls[-1] == "champion"  # other decoding: a different key, generated again


def test_a_candidate_identical_to_the_champion_is_not_blessed(tiny_setup, tmp_path):
    result = run_evaluate(_cfg(tiny_setup, tmp_path / "a", champion_model=str(tiny_setup["candidate"]),
                               n_samples=0, splits=["test_id"]))
    assert not result.blessed and "identical to the champion" in result.reason


def test_identity_is_model_content_not_a_folder_listing(tiny_setup, tmp_path):
    """Issue 21 item 5: a copy of the candidate with a cache file (`.amft-source.json`, what staging
    writes) and a README is still identical (not blessed, so never a new champion version); one
    changed weight byte is a different model."""
    from amft_lib.evaluate import _same_content

    copy = tmp_path / "champion-copy"
    shutil.copytree(tiny_setup["candidate"], copy)
    (copy / ".amft-source.json").write_text(json.dumps({"source": "s3://b/runs/r/model", "files": []}))
    (copy / "README.md").write_text("cached copy\n")
    result = run_evaluate(_cfg(tiny_setup, tmp_path / "a", champion_model=str(copy), n_samples=0,
                               splits=["test_id"], threshold=0.0, max_regression=1.0))
    assert not result.blessed and "identical to the champion" in result.reason
    assert _same_content(str(tiny_setup["candidate"]), str(copy))

    weights = copy / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[8 + int.from_bytes(blob[:8], "little") + 5] ^= 0x10  # a byte of tensor data, past the header
    weights.write_bytes(bytes(blob))
    assert not _same_content(str(tiny_setup["candidate"]), str(copy))
    result = run_evaluate(_cfg(tiny_setup, tmp_path / "b", champion_model=str(copy), n_samples=0,
                               splits=["test_id"], threshold=0.0, max_regression=1.0))
    assert result.blessed, result.reason  # equal scores pass with δ = 1: only identity blocked the first one


def test_decoding_length_follows_the_model_when_not_given(tmp_path):
    """`amft evaluate` without --max-new-tokens decodes a model as it was trained (generation_config.json)."""
    from amft_lib.config import ModelConfig
    from amft_lib.evaluate import DEFAULT_MAX_NEW_TOKENS, trained_max_new_tokens
    from amft_lib.model import load_policy, save_policy

    model, tok = load_policy(ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2), seed=0)
    assert trained_max_new_tokens(str(save_policy(model, tok, tmp_path / "a", max_new_tokens=112))) == 112
    assert trained_max_new_tokens(str(save_policy(model, tok, tmp_path / "b"))) == DEFAULT_MAX_NEW_TOKENS


def test_per_instance_scores_give_paired_changes_and_the_warm_start_check(tiny_setup, tmp_path):
    """metrics.json keeps each model's 0/1 per prompt (row order), pairs base → warm start → candidate
    with a paired interval, and the blessing reason carries the candidate − warm start verdict."""
    result = run_evaluate(_cfg(tiny_setup, tmp_path / "a", warm_start_model=str(tiny_setup["champion"]),
                               base_model="tiny", n_samples=2, pass_k=1))
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for block in (metrics, metrics["comparisons"]["warm_start"], metrics["comparisons"]["base"]):
        for split in ("test_id", "test_ood"):
            each = block[split]["per_instance"]
            assert len(each["accuracy"]) == len(each["pass_at_k"]) == 3
            assert sum(each["accuracy"]) / 3 == pytest.approx(block[split]["accuracy"])
            assert sum(each["pass_at_k"]) / 3 == pytest.approx(block[split]["pass_at_k"])
    pairs = {(c["from"], c["to"], c["split"], c["field"]) for c in metrics["changes"]}
    assert ("warm_start", "candidate", "test_id", "accuracy") in pairs and ("base", "warm_start", "test_ood",
                                                                            "pass_at_k") in pairs
    vs_warm = metrics["blessing"]["vs_warm_start"]
    assert vs_warm["n"] == 3 and vs_warm["lo"] <= vs_warm["diff"] <= vs_warm["hi"]
    assert "vs its warm start" in result.reason and vs_warm["verdict"] in result.reason
    off = run_evaluate(_cfg(tiny_setup, tmp_path / "b", warm_start_model=str(tiny_setup["champion"]),
                            n_samples=0, splits=["test_id"], warm_start_check=False))
    assert "warm start" not in off.reason and off.metrics["blessing"]["vs_warm_start"] is None
    none = run_evaluate(_cfg(tiny_setup, tmp_path / "c", n_samples=0, splits=["test_id"]))
    assert "warm-start check skipped" in none.reason


def test_a_cache_entry_without_per_instance_scores_is_scored_again(tiny_setup, tmp_path, monkeypatch):
    from amft_lib import evaluate

    cache = str(tmp_path / "cache")
    run_evaluate(_cfg(tiny_setup, tmp_path / "a", champion_model=str(tiny_setup["champion"]), n_samples=0,
                      splits=["test_id"], score_cache=cache))
    (entry,) = Path(cache).glob("*.json")
    old = json.loads(entry.read_text())
    for block in old["scores"].values():
        del block["per_instance"]  # as written before issue 25
    entry.write_text(json.dumps(old))
    calls: list[str] = []
    real = evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda path, *a, **k: calls.append(a[-1]) or real(path, *a, **k))
    again = run_evaluate(_cfg(tiny_setup, tmp_path / "b", champion_model=str(tiny_setup["champion"]), n_samples=0,
                              splits=["test_id"], score_cache=cache))
    assert calls == ["candidate", "champion"]
    assert "per_instance" in again.metrics["comparisons"]["champion"]["test_id"]
    assert "per_instance" in json.loads(entry.read_text())["scores"]["test_id"]
