"""Issue 21 item 6: an answer line that claims a value other than the target earns nothing.

Hand-worked: the hand 3 8 A A (values 3 8 1 1) makes 24 as 3*8*1*1; Countdown 15 3 7 → 36 as 7*3+15; math
reference 24. Before the fix every "=..." after the expression was dropped, so `Answer: 3*8*1*1 = 25` scored 1.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from amft_lib.tasks import countdown as cd
from amft_lib.tasks import general_points as gp
from amft_lib.tasks.math import MathTask, answer_segment, claims_agree

HAND = gp.decode_answer(gp.encode_answer(["3", "8", "A", "A"], "face10"))
CD = cd.encode_answer([15, 3, 7], 36)


@pytest.mark.parametrize(("completion", "expected"), [
    ("Answer: 3*8*1*1", (1.0, True, "ok")),
    ("Answer: 3*8*1*1 = 24", (1.0, True, "ok")),
    ("Answer: 3*8*1*1 = 25", (0.0, True, "wrong_claim")),  # the case: right expression, false claim
    ("Answer: 3*8*1*1 = 23", (0.0, True, "wrong_claim")),
    ("Answer: 3*8*1*1 = 6*4 = 24", (1.0, True, "ok")),  # 6*4 = 24: every claim true
    ("Answer: 3*8*1*1 = 6*4 = 25", (0.0, True, "wrong_claim")),  # the last claim is false
    ("Answer: 3*8*1*1 = 6*5 = 24", (0.0, True, "wrong_claim")),  # 6*5 = 30: a middle claim is false
    ("Answer: 3*8*1*1 = 48/2", (1.0, True, "ok")),  # exact arithmetic: 48/2 = 24
    ("Answer: 3*8*1*1 = 24/0", (0.0, True, "wrong_claim")),  # division by zero claims nothing true
    ("Answer: 3*8*1*1 =", (0.0, False, "bad_claim")),  # an empty claim is a format error
    ("Answer: 3*8*1*1 = 24 points", (0.0, False, "bad_claim")),  # words after "=" are not arithmetic
    ("Answer: 3*8*1*1 = 24.0", (0.0, False, "bad_claim")),  # no decimals, as in the expression
    ("Answer: \\boxed{3*8*1*1 = 25}", (0.0, True, "wrong_claim")),  # boxed content is judged the same way
    ("Answer: 3*8+1*1 = 25", (0.0, True, "not_24")),  # a wrong expression stays not_24 (claim true or not)
    ("Answer: 3*8*1 = 24", (0.0, True, "wrong_numbers")),  # numbers are still checked first
])
def test_general_points_claims(completion: str, expected: tuple[float, bool, str]) -> None:
    v = gp.verify_completion(HAND, completion)
    assert (v.reward, v.format_ok, v.reason) == expected


@pytest.mark.parametrize(("completion", "expected"), [
    ("Answer: 7*3+15 = 36", (1.0, True, "ok")),
    ("Answer: 7*3+15 = 37", (0.0, True, "wrong_claim")),
    ("Answer: 7*3+15 = 21+15 = 36", (1.0, True, "ok")),
    ("Answer: 7*3+15 = 21+15 = 35", (0.0, True, "wrong_claim")),
])
def test_countdown_claims(completion: str, expected: tuple[float, bool, str]) -> None:
    v = cd.CountdownTask().verify(CD, completion)
    assert (v.reward, v.format_ok, v.reason) == expected


@pytest.mark.parametrize(("completion", "expected"), [
    ("#### 24", (1.0, True, "ok")),
    ("#### 25 = 24", (0.0, True, "wrong_claim")),  # last number 24, but 25 is claimed too
    ("#### 18+6 = 24", (1.0, True, "ok")),  # 18+6 = 24
    ("#### 18+5 = 24", (0.0, True, "wrong_claim")),  # 18+5 = 23
    ("#### 48/2 = 24", (1.0, True, "ok")),
    ("#### x = 24", (1.0, True, "ok")),  # a symbol is not judged
    ("#### 24 = 24.0", (1.0, True, "ok")),  # decimals compare exactly
    ("#### 3*8 = 25", (0.0, True, "wrong_answer")),  # the last number is the answer: wrong, as before
    ("\\boxed{3 \\cdot 8 = 25}", (0.0, True, "wrong_answer")),
    ("\\boxed{25 = 24}", (0.0, True, "wrong_claim")),
    ("so 25 = 24 maybe, 24", (1.0, True, "ok")),  # no deciding segment: free text is not parsed for claims
])
def test_math_claims(completion: str, expected: tuple[float, bool, str]) -> None:
    v = MathTask().verify("24", completion)
    assert (v.reward, v.format_ok, v.reason) == expected


def test_math_helpers() -> None:
    assert answer_segment("work\n#### 1,234\nmore") == " 1,234"
    assert answer_segment("no marker") is None
    assert claims_agree(" 1,234 = 1234", Fraction(1234))
    assert not claims_agree("2/0 = 5", Fraction(5))


def test_verifiers_stay_pure() -> None:
    """Same input, same verdict, no state: scoring the false claim twice, interleaved with a true one."""
    bad, good = "Answer: 3*8*1*1 = 25", "Answer: 3*8*1*1 = 24"
    verdicts = [gp.verify_completion(HAND, c).reward for c in (bad, good, bad, good)]
    assert verdicts == [0.0, 1.0, 0.0, 1.0]
