"""Paired bootstrap comparisons (amft_lib/significance.py)."""

import numpy as np
import pytest

from amft_lib.significance import change_text, paired_bootstrap, paired_change, pass_at_k_any


def test_identical_methods_give_a_zero_interval():
    a = np.array([[1, 0, 1, 1, 0, 0, 1, 0]])
    d = paired_bootstrap(a, a.copy(), n_boot=200)
    assert (d.diff, d.lo, d.hi) == (0.0, 0.0, 0.0) and not d.significant


def test_hand_worked_difference_and_pairing():
    # A solves instances 0..3 and 4; B solves 0..3 only: per instance A − B = [0,0,0,0,1,0,0,0,0,0] → mean 0.1.
    a = np.array([[1, 1, 1, 1, 1, 0, 0, 0, 0, 0]] * 3)
    b = np.array([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]] * 3)
    d = paired_bootstrap(a, b, n_boot=2000, seed=1)
    assert d.diff == pytest.approx(0.1)
    # the paired difference is never negative in any replicate: the interval lies in [0, 0.5]
    assert 0.0 <= d.lo <= d.diff <= d.hi <= 0.5
    assert d.n_instances == 10 and d.n_boot == 2000


def test_a_consistent_gain_on_many_instances_is_significant_and_noise_is_not():
    rng = np.random.default_rng(0)
    base = rng.random((3, 2000)) < 0.2  # [S=3, N=2000]
    better = base | (rng.random((3, 2000)) < 0.05)  # ≈ +0.04 on top of the same instances
    assert paired_bootstrap(better, base, n_boot=1000).significant
    noise = rng.random((3, 2000)) < 0.2  # an unrelated method of the same quality
    assert not paired_bootstrap(noise, base, n_boot=1000, seed=3).significant


def test_seed_resampling_widens_the_interval():
    rng = np.random.default_rng(0)
    a = (rng.random((3, 500)) < np.array([[0.1], [0.3], [0.2]]))  # seeds disagree strongly
    b = rng.random((3, 500)) < 0.2
    wide = paired_bootstrap(a, b, n_boot=1000, resample_seeds=True)
    narrow = paired_bootstrap(a, b, n_boot=1000, resample_seeds=False)
    assert wide.hi - wide.lo > narrow.hi - narrow.lo


def test_deterministic_and_validates_shapes():
    a, b = np.eye(4)[:2], np.zeros((1, 4))
    assert paired_bootstrap(a, b, n_boot=100, seed=5) == paired_bootstrap(a, b, n_boot=100, seed=5)
    with pytest.raises(ValueError, match="same ones"):
        paired_bootstrap(np.zeros((1, 3)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap(a, b, level=1.0)


def test_pass_at_k_from_correct_counts():
    assert pass_at_k_any(np.array([0, 1, 8, 3]), 8).tolist() == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="\\[0, 8\\]"):
        pass_at_k_any(np.array([9]), 8)


def test_paired_change_names_the_verdict_and_covers_the_observed_difference():
    rng = np.random.default_rng(3)
    before = (rng.random(1000) < 0.2).astype(float)
    noisy = before.copy()  # 25 solved ones lost and 25 others gained: churn, no net change
    noisy[np.flatnonzero(before == 1.0)[:25]] = 0.0
    noisy[np.flatnonzero(before == 0.0)[:25]] = 1.0
    worse = np.where(before == 1.0, (rng.random(1000) < 0.5).astype(float), before)  # loses half its solved ones
    same = paired_change(noisy, before)
    assert same["verdict"] == "no significant change" and same["lo"] <= same["diff"] <= same["hi"]
    assert same["diff"] == pytest.approx(noisy.mean() - before.mean()) and same["n"] == 1000
    down = paired_change(worse, before)
    assert down["verdict"] == "worse" and down["hi"] < 0
    assert paired_change(before, worse)["verdict"] == "improved"
    assert paired_change(before, before) == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 1000,
                                             "verdict": "no significant change"}
    assert change_text(down).endswith("on 1000 instances: worse")
