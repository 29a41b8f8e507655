"""decide_blessing: TFX-style value threshold AND no regression beyond δ vs the champion, table-driven."""

from __future__ import annotations

import math

import pytest

from amft_lib.evaluate import decide_blessing


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
