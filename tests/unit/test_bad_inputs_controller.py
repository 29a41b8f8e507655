"""Bad controller settings (issue 23's meta_update, meta_estimator, evidence and gac fields) on `amft train`.

Same contract as tests/unit/test_bad_inputs.py (its row runner): the real command line in-process, exit 2,
exactly one `error:` line naming the field, no traceback, the output folder left exactly as it was (absent).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_bad_inputs as table  # the main table's Case and row runner (pytest puts tests/unit on sys.path)

Case = table.Case
ROOT = Path(__file__).resolve().parents[2]
TRAIN = "train --config {config} --out {out} --set "

CASES = [
    Case("cosine_without_backward", TRAIN + "controller.meta_update=cosine", "controller.meta_update=cosine needs"),
    Case("evidence_with_backward", TRAIN + "controller.meta_estimator=backward",
         "controller.meta_update=evidence needs SE(m)"),
    Case("meta_update_unknown", TRAIN + "controller.meta_update=none", "controller.meta_update"),
    Case("meta_normalize_removed", TRAIN + "controller.meta_normalize=cosine", "meta_normalize"),
    Case("meta_estimator_unknown", TRAIN + "controller.meta_estimator=forward", "controller.meta_estimator"),
    Case("meta_t_min_negative", TRAIN + "controller.meta_t_min=-1", "controller.meta_t_min"),
    Case("meta_t_ref_zero", TRAIN + "controller.meta_t_ref=0", "controller.meta_t_ref"),
    Case("meta_t_ref_nan", TRAIN + "controller.meta_t_ref=nan", "controller.meta_t_ref"),
    Case("entropy_tolerance_negative", TRAIN + "controller.entropy_tolerance=-0.1", "controller.entropy_tolerance"),
    Case("gac_beta_one", TRAIN + "controller.gac_beta=1", "controller.gac_beta"),
    Case("gac_cap_zero", TRAIN + "controller.gac_cap=0", "controller.gac_cap"),
    Case("gac_cap_above_one", TRAIN + "controller.gac_cap=1.5", "controller.gac_cap"),
    Case("gac_prior_weight_negative", TRAIN + "controller.gac_prior_weight=-0.2", "controller.gac_prior_weight"),
    Case("gac_method_wrong_case", TRAIN + "controller.method=GAC", "controller.method"),
]


@pytest.fixture(scope="module")
def world() -> dict[str, str]:
    return {"config": str(ROOT / "configs" / "tiny_countdown.yaml")}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_controller_setting(case: Case, world, tmp_path, capsys):
    table.run_row(case, world, str(tmp_path / "out"), capsys)
