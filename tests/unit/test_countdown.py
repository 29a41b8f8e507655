"""Tests for amft_lib/tasks/countdown.py and `amft data prepare --task countdown`."""

from __future__ import annotations

import itertools
import json
import random
from fractions import Fraction

import pytest

from amft_lib.data.prepare import PrepareConfig, run_prepare
from amft_lib.dataset import read_rows
from amft_lib.tasks import countdown as cd
from amft_lib.tasks import get_task
from amft_lib.tasks.general_points import solution_paths

TASK = get_task("countdown")
# Worked by hand: numbers 15 3 7, target 36 = 3*7 + 15 (21 + 15).
ANSWER = cd.encode_answer([15, 3, 7], 36)


def verdict(completion: str, answer: str = ANSWER) -> tuple[float, bool, str]:
    v = TASK.verify(answer, completion)
    return v.reward, v.format_ok, v.reason


# ── Independent reference: every value of every expression tree over the numbers (no shared code) ──
def brute_force_values(values: tuple[int, ...]) -> set[Fraction]:
    if len(values) == 1:
        return {Fraction(values[0])}
    out: set[Fraction] = set()
    n = len(values)
    for mask in range(1, (1 << n) - 1):
        left = tuple(v for i, v in enumerate(values) if mask >> i & 1)
        right = tuple(v for i, v in enumerate(values) if not mask >> i & 1)
        for a in brute_force_values(left):
            for b in brute_force_values(right):
                out |= {a + b, a - b, a * b}
                if b:
                    out.add(a / b)
    return out


@pytest.mark.parametrize("values", [(1, 2, 3), (4, 4, 7), (1, 1, 20), (13, 17, 19)])
def test_reachable_targets_match_brute_force(values):
    expect = sorted(int(v) for v in brute_force_values(values) if v.denominator == 1 and 1 <= v <= 100)
    assert list(cd.reachable_targets(values, 100)) == expect


def test_reachable_targets_above_a_floor():
    # 4 4 7: the largest value is 4*4*7 = 112; the next ones, (7+4)*4 = 44 and 7*4+4 = 32, stay ≤ 100
    assert cd.reachable_targets((4, 4, 7), 200, 101) == (112,)


def test_reachable_targets_hand_worked():
    # 1 2 3, every number once: 3-2*1 = 1, 3-2+1 = 2, 3*(2-1) = 3, 3+2-1 = 4, 3*2-1 = 5, 1+2+3 = 6,
    # 3*2+1 = 7, (1+3)*2 = 8, (1+2)*3 = 9; nothing reaches 10 (the largest value is (1+2)*3 = 9).
    assert cd.reachable_targets((1, 2, 3), 100) == (1, 2, 3, 4, 5, 6, 7, 8, 9)


def test_answer_round_trip_key_and_check():
    inst = cd.decode_answer(ANSWER)
    assert inst == cd.Instance((15, 3, 7), 36)
    assert TASK.canonical_key(ANSWER, "") == "countdown|3,7,15|36"
    assert TASK.canonical_key(cd.encode_answer([7, 15, 3], 36), "") == "countdown|3,7,15|36"  # order-free
    assert TASK.check_answer(ANSWER) is None
    assert "cannot make 1000" in TASK.check_answer(cd.encode_answer([1, 2, 3], 1000))
    for bad, why in [("{", "not JSON"), ('{"numbers": [1, 2]}', "exactly: numbers, target"),
                     ('{"numbers": [1], "target": 1}', "2..5 ints"), ('{"numbers": [1, 2.5], "target": 3}', "ints"),
                     ('{"numbers": [1, 2], "target": 0}', "target must be"),
                     ('{"numbers": [1, 2, 3, 4, 5, 6], "target": 3}', "2..5 ints")]:
        assert why in TASK.check_answer(bad)
    assert "must be a string" in TASK.check_answer(None)


def test_prompt_and_demonstration_format():
    rng = random.Random(0)
    row = cd.make_row((3, 7, 15), 36, rng, "train", "x", "id", with_demonstration=True)
    shown = json.loads(row["answer"])["numbers"]
    assert sorted(shown) == [3, 7, 15]
    numbers = " ".join(map(str, shown))
    assert row["prompt"] == f"Numbers: {numbers}. Target: 36. Use each number once with + - * / ( ).\n"
    demo = row["demonstration"]
    assert demo.startswith("Numbers: 3 7 15\n") and demo.endswith("\n")
    assert TASK.verify(row["answer"], demo).reward == 1.0
    assert cd.make_row((3, 7, 15), 36, rng, "train", "x", "id", with_demonstration=False)["demonstration"] is None


# ── Verifier: every solver route is accepted; the General Points adversarial cases are rejected ─────────
@pytest.mark.parametrize("seed", range(4))
def test_every_solver_route_verifies(seed):
    rng = random.Random(seed)
    space = list(cd.id_instances(cd.CountdownSpec()))
    for values, target in rng.sample(space, 25) + [cd.draw_ood_instance(rng, cd.CountdownSpec()) for _ in range(10)]:
        answer = cd.encode_answer(values, target)
        paths = solution_paths(values, target)
        assert paths, (values, target)
        for path in paths:
            assert TASK.verify(answer, f"Answer: {path.expression}").reward == 1.0, (values, target, path)
            assert TASK.verify(answer, "Numbers: x\n" + "\n".join(path.steps) + f"\nAnswer: {path.expression}\n"
                               ).reward == 1.0


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Answer: 3*7+15", (1.0, True, "ok")),
        ("work\nAnswer: (3*7+15)=36\n", (1.0, True, "ok")),  # "=36" stripped
        ("Answer: \\boxed{15+7*3}", (1.0, True, "ok")),
        ("Answer: 3*7+15\nAnswer: 1+1", (0.0, True, "wrong_numbers")),  # the last Answer line counts
        ("Answer: 3*7-15", (0.0, True, "not_24")),  # 6: right numbers, wrong value ("not_24" = wrong value)
        ("Answer: 3*7+15+3", (0.0, True, "wrong_numbers")),  # a number used twice
        ("Answer: 21+15", (0.0, True, "wrong_numbers")),  # an intermediate result is not a number of the puzzle
        ("Answer: 36", (0.0, True, "wrong_numbers")),
        ("Answer: 37*1-15+14", (0.0, True, "wrong_numbers")),
        ("Answer: 153*7", (0.0, True, "wrong_numbers")),  # concatenated digits "15" and "3"
        ("Answer: 15/(7-7)+3", (0.0, True, "wrong_numbers")),  # numbers checked before evaluating
        ("no answer, 36", (0.0, False, "no_answer")),
        ("Answer:", (0.0, False, "empty")),
        ("Answer: 3**7+15", (0.0, False, "power")),
        ("Answer: 3^7+15", (0.0, False, "power")),
        ("Answer: 3.0*7+15", (0.0, False, "decimal")),
        ("Answer: 03*7+15", (0.0, False, "bad_number")),
        ("Answer: -3*7+15", (0.0, False, "unary_op")),
        ("Answer: 3×7+15", (0.0, False, "unknown_symbol")),
        ("Answer: __import__('os').system('x')", (0.0, False, "unknown_symbol")),
        ("Answer: (3*7+15", (0.0, False, "parse_error")),
        ("Answer: 3*7+15)", (0.0, False, "trailing_junk")),
        ("Answer: " + "(" * 17 + "3*7+15" + ")" * 17, (0.0, False, "too_deep")),
        ("Answer: " + "1+" * 300 + "1", (0.0, False, "too_long")),
    ],
)
def test_verifier_hand_worked(completion, expected):
    assert verdict(completion) == expected


def test_division_by_zero_and_fractions():
    answer = cd.encode_answer([2, 2, 6], 3)
    assert verdict("Answer: 6/(2-2)*2", answer)[2] == "wrong_numbers"
    assert verdict("Answer: 6/(2-2)+2", cd.encode_answer([2, 2, 6, 2], 3)) == (0.0, True, "div_by_zero")
    # exact Fractions: 3/4 = 0.75, 1 − 3/4 = 1/4, 6 / (1/4) = 24 (floats would make it 24.000000000000004-prone)
    assert verdict("Answer: 6/(1-3/4)", cd.encode_answer([1, 3, 4, 6], 24)) == (1.0, True, "ok")


# ── Data: sizes, splits by key, OOD rule, determinism ──────────────────────────────────────────────
def test_generate_splits_small_is_disjoint_and_deterministic():
    sizes = {"train": 300, "val": 50, "test_id": 50, "test_ood": 40}
    rows, notes = cd.generate_splits(sizes, demo_pool=100, seed=3)
    again, _ = cd.generate_splits(sizes, demo_pool=100, seed=3)
    assert rows == again
    by = {s: [r for r in rows if r["split"] == s] for s in sizes}
    assert {s: len(v) for s, v in by.items()} == sizes
    assert sum(r["demonstration"] is not None for r in by["train"]) == 100  # the fixed SFT pool
    keys = {s: {TASK.canonical_key(r["answer"], r["prompt"]) for r in v} for s, v in by.items()}
    assert all(len(keys[s]) == sizes[s] for s in sizes)  # each instance once
    for a, b in itertools.combinations(sizes, 2):
        assert not keys[a] & keys[b], (a, b)
    for r in by["test_ood"]:  # ID numbers, targets above the ID range
        answer = json.loads(r["answer"])
        assert 100 < answer["target"] <= 200 and all(1 <= v <= 20 for v in answer["numbers"])
        assert TASK.check_answer(r["answer"]) is None
    for r in by["val"] + by["train"] + by["test_id"]:
        answer = json.loads(r["answer"])
        assert 1 <= answer["target"] <= 100 and all(1 <= v <= 20 for v in answer["numbers"])
    assert notes["id_space"] == 16292  # 3-multisets of 1..20 × reachable integer targets in 1..100


def test_prepare_countdown_writes_2000_unseen_instances_per_eval_split(tmp_path):
    """The issue's requirement: ≥ 2000 rows in each of val / test_id / test_ood, no key shared with train."""
    result = run_prepare(PrepareConfig(task="countdown", out_dir=str(tmp_path)))
    assert result.rows["train"] >= 10_000
    for split in ("val", "test_id", "test_ood"):
        assert result.rows[split] >= 2000
    splits = read_rows(tmp_path)
    train_keys = {TASK.canonical_key(r["answer"], r["prompt"]) for r in splits["train"]}
    for split in ("val", "test_id", "test_ood"):
        keys = {TASK.canonical_key(r["answer"], r["prompt"]) for r in splits[split]}
        assert len(keys) == len(splits[split]) and not keys & train_keys, split
    assert sum(r["demonstration"] is not None for r in splits["train"]) == 2000
    assert result.card.task == "countdown" and result.card.notes["demonstrations_removed"] == 0


def test_prepare_config_accepts_countdown_without_input():
    assert PrepareConfig(task="countdown").countdown_eval_size == 2000
    with pytest.raises(ValueError, match="is generated"):
        PrepareConfig(task="countdown", input="x.jsonl")
    with pytest.raises(ValueError, match="val \\+ test_id"):
        cd.generate_splits({"val": 10_000, "test_id": 10_000}, 0, 0)


def test_spec_validation():
    with pytest.raises(ValueError, match="n_numbers"):
        cd.CountdownSpec(n_numbers=1)
    with pytest.raises(ValueError, match="OOD targets lie above"):
        cd.CountdownSpec(max_target=200, ood_max_target=200)
