"""Tests for amft_lib/tasks/math.py: final-answer extraction, number parsing, comparison, key."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amft_lib.tasks import get_task
from amft_lib.tasks.base import Verdict
from amft_lib.tasks.math import (
    MathTask,
    answers_match,
    extract_answer,
    extract_boxed,
    normalize_question,
    parse_number,
)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # #### wins over everything else, and reads the last number on its line
        ("She has 3 apples and buys 4.\n#### 7", "7"),
        ("\\boxed{5}\n#### 72\nthen 9", "72"),
        ("#### $1,234.", "1,234"),
        ("#### 5 apples and 3 pears", "3"),
        ("#### seventy-two", None),  # the marker decides: no fall-through to other numbers
        # \boxed{} next, nested braces matched
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{3}{4}}", "3/4"),
        ("\\boxed{\\dfrac{-3}{4}}", "-3/4"),
        ("\\boxed{-\\frac{3}{4}}", "-3/4"),
        ("\\boxed{\\text{72 dollars}}", "72"),
        ("\\boxed{1{,}234}", "1,234"),
        ("\\boxed{x = \\{5\\}}", "5"),
        ("\\boxed{50\\%}", "50"),
        ("\\boxed{3", "3"),  # unclosed box: falls back to the last number
        # last number in the text
        ("He pays $1,234,567 in total.", "1,234,567"),
        ("The temperature is -5 degrees.", "-5"),
        ("So 10-5=5", "5"),
        ("x = 10 - 5", "5"),  # a binary minus is not a sign
        ("It is 3.25 m long.", "3.25"),
        ("He ate 3/4 of it.", "3/4"),
        ("The answer is 72.", "72"),
        ("It costs .5 dollars", ".5"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("72", Fraction(72)),
        (" -3 ", Fraction(-3)),
        ("1,234", Fraction(1234)),
        ("1,234,567.5", Fraction(2469135, 2)),
        ("3.25", Fraction(13, 4)),
        (".5", Fraction(1, 2)),
        ("3/4", Fraction(3, 4)),
        ("-3/4", Fraction(-3, 4)),
        ("6/8", Fraction(3, 4)),
        ("$12", Fraction(12)),
        ("25%", Fraction(25)),  # the percent sign is dropped, not divided by 100
        ("3/0", None),
        ("1e5", None),
        ("72 apples", None),
        ("", None),
        ("1,23", None),
        ("--3", None),
        ("9" * 65, None),  # longer than MAX_NUMBER_CHARS
        ("9" * 10_000, None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_tolerance_comparison():
    # exact by default: 0.5 == 1/2, but 0.33 != 1/3
    assert answers_match(Fraction(1, 2), parse_number("0.50"))
    assert not answers_match(parse_number("0.33"), Fraction(1, 3))
    # rel_tol 1%: |0.33 - 1/3| = 1/300 = 1% of 1/3, on the boundary, accepted; 0.32 is 4% off
    assert answers_match(parse_number("0.33"), Fraction(1, 3), rel_tol=0.01 + 1e-12)
    assert not answers_match(parse_number("0.32"), Fraction(1, 3), rel_tol=0.01)
    # a zero reference needs an exact zero whatever the tolerance
    assert not answers_match(Fraction(1, 10**9), Fraction(0), rel_tol=0.5)
    task = MathTask(rel_tol=0.01)
    assert task.verify("100", "#### 100.9").reward == 1.0
    assert task.verify("100", "#### 101.1").reward == 0.0
    with pytest.raises(ValueError, match="rel_tol"):
        MathTask(rel_tol=-0.1)


def test_verify_verdicts():
    task = get_task("math")
    assert task.name == "math"
    assert task.verify("72", "5 + 67 = 72\n#### 72") == Verdict(1.0, True, "ok")
    assert task.verify("3/4", "\\boxed{0.75}") == Verdict(1.0, True, "ok")
    assert task.verify("1234", "It is 1,234.") == Verdict(1.0, True, "ok")
    assert task.verify("-5", "The answer is -5") == Verdict(1.0, True, "ok")
    assert task.verify("72", "#### 71") == Verdict(0.0, True, "wrong_answer")
    assert task.verify("72", "I don't know") == Verdict(0.0, False, "no_answer")
    assert task.verify("72", "#### " + "9" * 100) == Verdict(0.0, False, "parse_error")
    with pytest.raises(ValueError, match="not a number"):
        task.verify("seventy", "#### 70")


def test_check_answer():
    task = MathTask()
    assert task.check_answer("72") is None
    assert task.check_answer("3/4") is None
    assert task.check_answer("-1,234.5") is None
    assert "not a number" in task.check_answer("x+1")
    assert "not a number" in task.check_answer("")
    assert task.check_answer(72) is not None  # type: ignore[arg-type]


def test_canonical_key_normalises_question():
    task = MathTask()
    a = task.canonical_key("72", "  How many  apples does Tom have?\n")
    b = task.canonical_key("72", "how many apples does tom have")
    c = task.canonical_key("72", "\uff28ow many apples does Tom have ?")  # full-width H (NFKC)
    assert a == b == c == "how many apples does tom have"
    assert normalize_question("...") == ""
    assert normalize_question("¿Qué?") == "qué"


def test_extract_boxed_nesting():
    assert extract_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{{}") is None
    assert extract_boxed("no box") is None


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_arbitrary_text_never_raises(text):
    v = MathTask().verify("72", text)
    assert v.reward in (0.0, 1.0)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789,.-/%$#\\boxed{}frac \n", max_size=60))
def test_number_noise_never_raises(text):
    assert MathTask().verify("3/4", text).reward in (0.0, 1.0)
    parse_number(text)


@settings(max_examples=100, deadline=None)
@given(st.fractions(min_value=-(10**6), max_value=10**6, max_denominator=1000))
def test_fraction_round_trip(value):
    text = str(value)  # "3/4", "-7", "-3/4"
    assert parse_number(text) == value
    assert MathTask().verify(text, f"Reasoning...\n#### {text}").reward == 1.0
    assert MathTask().verify(text, f"\\boxed{{{text}}}").reward == 1.0


def test_huge_inputs_are_fast():
    for completion in ["1" * 1_000_000, "#### " + "-" * 500_000, "\\boxed{" * 100_000, "1,000," * 100_000]:
        start = time.perf_counter()
        v = MathTask().verify("72", completion)
        assert v.reward == 0.0 and time.perf_counter() - start < 1.0
