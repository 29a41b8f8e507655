"""amft_lib.run.summary (mirror test): the summary of a run read back from its stage records, never raising
for missing ones, and its Markdown. A local run root with hand-written records."""

from __future__ import annotations

from amft_lib.run.layout import RunRoot, put_json
from amft_lib.run.summary import accuracy_table, summarize_run, summary_markdown


def test_a_run_with_no_records_summarizes_to_its_state_and_no_stages(tmp_path):
    summary = summarize_run(str(tmp_path), "r-1", "", "FAILED", error="boom")
    assert summary["state"] == "FAILED" and summary["stages"] == {} and summary["run_id"] == "r-1"
    assert "Error: boom" in summary_markdown(summary)


def test_a_bad_run_id_is_a_problem_not_an_exception(tmp_path):
    summary = summarize_run(str(tmp_path), "../x", "", "FAILED")
    assert summary["problems"] and "run id" in summary["problems"][0]


def test_an_unreadable_record_is_listed_and_the_rest_is_read(tmp_path):
    run = RunRoot.resolve(str(tmp_path), "r-1")
    put_json(run.data_card, {"splits": {"train": {"rows": 10}, "val": {"rows": 2}}})
    from pathlib import Path

    Path(run.gate).parent.mkdir(parents=True, exist_ok=True)
    Path(run.gate).write_text("{not json")
    summary = summarize_run(str(tmp_path), "r-1", "", "RUNNING")
    assert summary["stages"]["data"]["rows"] == {"train": 10, "val": 2}
    assert any(p.startswith("validation/gate.json") for p in summary["problems"])
    text = summary_markdown(summary)
    assert "- data: train 10, val 2" in text and "Problems reading the run root:" in text


def test_accuracy_table_has_one_row_per_role_present_in_role_order():
    rows = accuracy_table({"final": {"test_id": {"accuracy": 0.5, "pass_at_k": 0.75}},
                           "base": {"test_ood": {"accuracy": 0.125}}})
    assert rows[2].startswith("| base |") and rows[3].startswith("| final |") and len(rows) == 4
    assert "0.5" in rows[3] and "0.75" in rows[3] and "0.125" in rows[2]


def test_summary_prints_each_stage_change_in_words_and_the_verdict_once(tmp_path):
    """metrics.json's paired changes become one row per stage with the verdict in plain words; the
    blessing line says "not blessed" once (it used to read "not blessed — not blessed: …")."""
    from amft_lib.evaluate import paired_changes

    def block(correct: list[int]) -> dict:
        return {"test_id": {"accuracy": sum(correct) / len(correct), "n": len(correct),
                            "per_instance": {"accuracy": [float(c) for c in correct]}}}

    base, warm, final = block([0] * 200), block([1] * 40 + [0] * 160), block([1] * 39 + [0] * 161)
    run = RunRoot.resolve(str(tmp_path), "r-1")
    reason = "not blessed: significantly worse than its warm start on test_id.accuracy: …"
    put_json(run.warm_start_stats, {"val_accuracy": {"after_warmup": 0.2, "final_sft": 0.1, "warm_start": 0.2},
                                    "kept_model": "after_warmup"})
    put_json(run.eval_metrics, {**final, "blessed": False, "reason": reason,
                                "comparisons": {"base": base, "warm_start": warm},
                                "changes": paired_changes(final, {"base": base, "warm_start": warm})})
    summary = summarize_run(str(tmp_path), "r-1", "", "SUCCEEDED")
    assert [(c["from"], c["to"]) for c in summary["changes"]] == [("base", "warm_start"), ("warm_start", "candidate"),
                                                                  ("base", "candidate")]
    text = summary_markdown(summary)
    assert "- evaluation: not blessed — significantly worse than its warm start" in text
    assert text.count("not blessed") == 1
    assert "0.2000 after the warm-up, 0.1000 after the final SFT: kept the after-warmup model" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "**improved**" in rows["warm start (base → warm start)"]
    assert "+0.200" in rows["warm start (base → warm start)"]
    assert "no significant change" in rows["training (warm start → final)"] and "-0.005" in rows[
        "training (warm start → final)"]
    assert "- what training changed (final − warm start, paired): test_id no significant change (-0.005" in text
