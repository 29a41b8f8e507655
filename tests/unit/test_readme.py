"""The README shows only numbers a run produced: its demo section is rendered from the committed
run record of a demo run (`amft pipeline run-local --record`), and the two set-up commands stay two."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipelines.local import demo_markdown
from pipelines.profiles import LOCAL

ROOT = Path(__file__).resolve().parents[2]
RECORD = ROOT / "bench" / "results" / "demo_run.json"


def test_readme_demo_section_equals_the_committed_run_record():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- demo:begin -->\n(.*?)<!-- demo:end -->", readme, re.S)
    assert section, "README.md lost its demo markers"
    record = json.loads(RECORD.read_text())
    assert record["state"] == "SUCCEEDED"
    assert section.group(1) == demo_markdown(record), "re-render with: python bench/render_results.py"


def test_the_record_is_a_whole_demo_run():
    record = json.loads(RECORD.read_text())
    stages = record["summary"]["stages"]
    assert {"preflight", "prepare-data", "validate-data", "warm-start", "train", "evaluate", "run-summary"} \
        <= set(record["tasks"])
    assert stages["train"]["steps"] == LOCAL["p4_train_max_steps"]  # a record of the profile the demo runs
    assert set(record["summary"]["accuracy"]) >= {"base", "warm_start", "final"}


def test_exactly_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## The two commands\n\n```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == [
        "bash scripts/demo.sh", "bash scripts/test.sh"]
