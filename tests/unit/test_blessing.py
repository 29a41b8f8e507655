"""decide_blessing: TFX-style value threshold AND no regression beyond δ vs the champion, table-driven."""

from __future__ import annotations

import math

import pytest

from amft_lib.evaluate import decide_blessing, find_change, paired_changes


def m(test_id: float | None, test_ood: float | None = None, field: str = "accuracy") -> dict:
    """metrics.json-shaped dict; None leaves the split out."""
    out = {}
    if test_id is not None:
        out["test_id"] = {field: test_id, "n": 100}
    if test_ood is not None:
        out["test_ood"] = {field: test_ood, "n": 100}
    return out


CASES = [
    # (id, candidate, champion, threshold, δ, blessed, words the reason must contain)
    ("first-run", m(0.60, 0.30), None, 0.5, 0.0, True, ["first run", "change check skipped"]),
    ("first-run-at-threshold", m(0.50, 0.30), None, 0.5, 0.0, True, ["first run"]),
    ("better-on-both", m(0.70, 0.40), m(0.60, 0.30), 0.5, 0.0, True, ["test_id.accuracy +0.1000", "test_ood"]),
    # 0.68 - 0.70 = -0.02 (float: -0.0200000000000000178) is exactly δ: allowed
    ("within-delta", m(0.68, 0.40), m(0.70, 0.40), 0.5, 0.02, True, ["within δ=0.0200"]),
    # ID improves, OOD drops 0.40 → 0.30 = -0.10 > δ=0.02 ⇒ regression on one split is enough
    ("worse-ood", m(0.80, 0.30), m(0.70, 0.40), 0.5, 0.02, False, ["regression", "test_ood.accuracy"]),
    ("worse-id", m(0.55, 0.40), m(0.70, 0.40), 0.5, 0.02, False, ["test_id.accuracy 0.7000 -> 0.5500"]),
    ("threshold-not-met", m(0.40, 0.90), None, 0.5, 0.0, False, ["below the threshold 0.5000"]),
    ("threshold-not-met-with-champion", m(0.40), m(0.10), 0.5, 0.0, False, ["below the threshold"]),
    ("missing-metric", {"test_ood": {"accuracy": 0.9}}, None, 0.0, 0.0, False, ["no test_id.accuracy"]),
    ("null-metric", {"test_id": {"accuracy": None}}, None, 0.0, 0.0, False, ["no test_id.accuracy"]),
    ("nan-metric", m(math.nan), None, 0.0, 0.0, False, ["not a number"]),
    ("candidate-lacks-split-champion-has", m(0.70), m(0.60, 0.30), 0.5, 0.0, False, ["no test_ood.accuracy"]),
    ("champion-lacks-ood", m(0.70, 0.30), m(0.60), 0.5, 0.0, True, ["champion not scored on test_ood"]),
    ("champion-has-no-metrics", m(0.70, 0.30), {}, 0.5, 0.0, False, ["cannot be checked"]),
]


@pytest.mark.parametrize(
    "candidate, champion, threshold, delta, blessed, words",
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decide_blessing(candidate, champion, threshold, delta, blessed, words):
    ok, reason = decide_blessing(candidate, champion, "test_id.accuracy", threshold, delta)
    assert ok is blessed, reason
    assert reason.startswith("blessed:" if blessed else "not blessed:")
    for word in words:
        assert word in reason
    assert "\n" not in reason


def test_gates_on_the_chosen_metric_and_compares_that_field():
    candidate = {"test_id": {"accuracy": 0.1, "pass_at_k": 0.9}, "test_ood": {"accuracy": 0.0, "pass_at_k": 0.5}}
    champion = {"test_id": {"accuracy": 0.9, "pass_at_k": 0.8}, "test_ood": {"accuracy": 0.9, "pass_at_k": 0.5}}
    # accuracy collapsed but pass@k did not: a pass_at_k gate only looks at pass_at_k
    ok, reason = decide_blessing(candidate, champion, "test_id.pass_at_k", 0.5, 0.0)
    assert ok, reason
    ok, _ = decide_blessing(candidate, champion, "test_id.accuracy", 0.0, 0.0)
    assert not ok


def test_extra_keys_of_metrics_json_are_ignored():
    candidate = {**m(0.6, 0.3), "blessed": False, "reason": "x", "comparisons": {"base": m(0.1)}, "model": "d"}
    ok, _ = decide_blessing(candidate, None, "test_id.accuracy", 0.5, 0.0)
    assert ok


def test_malformed_metric_name_is_a_programming_error():
    with pytest.raises(ValueError, match=r"SPLIT\.FIELD"):
        decide_blessing(m(0.5), None, "accuracy", 0.0, 0.0)


# ── the candidate against the warm start it trained from (issue 25) ─────────────────────────────


def scored(correct: list[int], test_ood: list[int] | None = None) -> dict:
    """metrics.json-shaped block with per-instance greedy scores (what evaluate_split writes)."""
    out = {"test_id": {"accuracy": sum(correct) / len(correct), "n": len(correct),
                       "per_instance": {"accuracy": [float(c) for c in correct], "pass_at_k": None}}}
    if test_ood is not None:
        out["test_ood"] = {"accuracy": sum(test_ood) / len(test_ood), "n": len(test_ood),
                           "per_instance": {"accuracy": [float(c) for c in test_ood], "pass_at_k": None}}
    return out


# 300 instances; the warm start solves the first 60 (0.20)
WARM = [1] * 60 + [0] * 240
REGRESSED = [1] * 30 + [0] * 270  # lost 30, gained none: 0.10, a paired drop no resample of 300 hides
NOISE = [1] * 58 + [0] * 2 + [1] * 3 + [0] * 237  # lost 2, gained 3: +0.003
IMPROVED = [1] * 60 + [1] * 30 + [0] * 210  # kept all, gained 30: 0.30


def vs_warm(candidate: dict, warm: dict) -> dict:
    """candidate − warm start on test_id.accuracy, as run_evaluate computes it."""
    change = find_change(paired_changes(candidate, {"warm_start": warm}), "warm_start", "candidate",
                         "test_id.accuracy")
    assert change is not None
    return change


def test_significantly_worse_than_its_warm_start_is_not_blessed_even_on_a_first_run():
    change = vs_warm(scored(REGRESSED), scored(WARM))
    assert change["verdict"] == "worse" and change["hi"] < 0
    ok, reason = decide_blessing(scored(REGRESSED), None, "test_id.accuracy", 0.01, 0.0, warm_start_change=change)
    assert not ok
    assert reason.startswith("not blessed: significantly worse than its warm start on test_id.accuracy")
    assert "-0.1000" in reason and "worse" in reason
    # the same candidate without the check: the old first-run rule (threshold only) blessed it
    assert decide_blessing(scored(REGRESSED), None, "test_id.accuracy", 0.01, 0.0)[0]


def test_no_significant_change_vs_warm_start_follows_the_existing_rules():
    change = vs_warm(scored(NOISE), scored(WARM))
    assert change["verdict"] == "no significant change" and change["lo"] < 0 < change["hi"]
    ok, reason = decide_blessing(scored(NOISE), None, "test_id.accuracy", 0.01, 0.0, warm_start_change=change)
    assert ok and "no significant change" in reason and "first run" in reason
    # the rules it falls through to still decide: an unreachable threshold, a champion regression
    ok, reason = decide_blessing(scored(NOISE), None, "test_id.accuracy", 0.5, 0.0, warm_start_change=change)
    assert not ok and "below the threshold" in reason
    ok, reason = decide_blessing(scored(NOISE), scored(IMPROVED), "test_id.accuracy", 0.01, 0.0,
                                 warm_start_change=change)
    assert not ok and "regression vs champion" in reason


def test_improvement_over_the_warm_start_is_blessed_and_said():
    change = vs_warm(scored(IMPROVED), scored(WARM))
    assert change["verdict"] == "improved" and change["lo"] > 0
    ok, reason = decide_blessing(scored(IMPROVED), None, "test_id.accuracy", 0.01, 0.0, warm_start_change=change)
    assert ok and "vs its warm start +0.1000" in reason and "improved" in reason


def test_paired_changes_cover_every_stage_pair_present_and_skip_unmatched_rows():
    base = scored([0] * 300, [0] * 50)
    changes = paired_changes(scored(IMPROVED, [1] * 5 + [0] * 45), {"base": base, "warm_start": scored(WARM, [0] * 50)})
    pairs = {(c["from"], c["to"], c["split"]) for c in changes}
    assert pairs == {(a, b, s) for a, b in [("base", "warm_start"), ("warm_start", "candidate"), ("base", "candidate")]
                     for s in ("test_id", "test_ood")}
    # scored on other rows (different length): no paired comparison is invented
    assert not paired_changes(scored(IMPROVED), {"warm_start": scored(WARM[:200])})
