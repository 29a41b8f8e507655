"""`amft pipeline run-local` keeps one line per event: kfp.local's executor dumps are filtered out."""

from __future__ import annotations

import io
import logging

from pipelines.local import KfpChatter, QuietExecutor

STREAMED = """    [KFP Executor 2026-12-02 16:40:36,821 INFO]: Looking for component `show` in `/x.py`
    [KFP Executor 2026-12-02 16:40:36,826 INFO]: Got executor_input:
    {
        "inputs": {
            "parameterValues": {"n": 5}
        }
    }
2026-12-02 16:40:37 INFO amft_lib.trainer: step 3/60 mu=0.700 (2.1 step/s, ETA 27 s)
    [KFP Executor 2026-12-02 16:40:38,100 INFO]: eval candidate/test_id: 8/8 prompts, 2.00 prompts/s, ETA 0 s
    [KFP Executor 2026-12-02 16:40:36,827 INFO]: Wrote executor output file to /x/executor_output.json.
--------------------------------------------------------------------------------

"""


def test_executor_bookkeeping_is_dropped_and_task_logs_kept_with_a_short_prefix():
    out = io.StringIO()
    quiet = QuietExecutor(out)
    for chunk in (STREAMED[:100], STREAMED[100:250], STREAMED[250:]):  # arbitrary chunking, as print() delivers
        quiet.write(chunk)
    quiet.flush()
    assert out.getvalue() == ("2026-12-02 16:40:37 INFO amft_lib.trainer: step 3/60 mu=0.700 (2.1 step/s, ETA 27 s)\n"
                              "    16:40:38 INFO eval candidate/test_id: 8/8 prompts, 2.00 prompts/s, ETA 0 s\n")


def test_kfp_bookkeeping_records_are_dropped():
    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("root", logging.INFO, __file__, 1, msg, None, None)

    chatter = KfpChatter()
    assert not chatter.filter(record("Streamed logs:\n"))
    assert not chatter.filter(record("Task \x1b[96m'train'\x1b[0m outputs:\n    Output: '{...}'"))
    assert chatter.filter(record("Task \x1b[96m'train'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m"))
    assert chatter.filter(record("Executing task 'train'"))
    assert not chatter.filter(record("Skipping conditional task condition-5 (condition evaluated to False)"))
    assert not chatter.filter(record("Running pipeline: \x1b[95m'amft-pipeline'\x1b[0m"))
