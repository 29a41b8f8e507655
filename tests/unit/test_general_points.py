"""Tests for amft_lib/tasks/general_points.py: solver, generator, prompt/demo format, safe verifier."""

from __future__ import annotations

import itertools
import json
import random
import re
import string
import time
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amft_lib.tasks import general_points as gp
from amft_lib.tasks import get_task, known_tasks

PRINTABLE = set(string.printable) - set("\t\r\x0b\x0c")  # printable ASCII plus "\n"

# A hand worked by hand: A 7 Q 3 under face10 is 1, 7, 10, 3.
HAND = gp.Hand(cards=("A", "7", "Q", "3"), values=(1, 7, 10, 3), target=24, rule="face10")
ANSWER = gp.encode_answer(HAND.cards, HAND.rule)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def verdict(completion: str, hand: gp.Hand = HAND) -> tuple[float, bool, str]:
    v = gp.verify_completion(hand, completion)
    return v.reward, v.format_ok, v.reason


# ── Independent reference evaluator (shunting-yard to RPN), so the parser is not checked by itself ──
def rpn_value(expr: str) -> Fraction | None:
    """Value of a test-built expression (digits, + - * /, parens, no unary); None on division by zero."""
    out: list[str] = []
    ops: list[str] = []
    prec = {"+": 1, "-": 1, "*": 2, "/": 2}
    for tok in gp.tokenize(expr):
        if tok.isdigit():
            out.append(tok)
        elif tok == "(":
            ops.append(tok)
        elif tok == ")":
            while ops[-1] != "(":
                out.append(ops.pop())
            ops.pop()
        else:
            while ops and ops[-1] != "(" and prec[ops[-1]] >= prec[tok]:
                out.append(ops.pop())
            ops.append(tok)
    out.extend(reversed(ops))
    stack: list[Fraction] = []
    for tok in out:
        if tok.isdigit():
            stack.append(Fraction(int(tok)))
            continue
        b, a = stack.pop(), stack.pop()
        if tok == "/" and b == 0:
            return None
        stack.append({"+": a + b, "-": a - b, "*": a * b}[tok] if tok != "/" else a / b)
    return stack[0]


# ── Rules and answer column ─────────────────────────────────────────────────────────────────────
def test_card_values_under_both_rules():
    assert gp.hand_values(("A", "10", "J", "Q", "K"), "face10") == (1, 10, 10, 10, 10)
    assert gp.hand_values(("A", "10", "J", "Q", "K"), "face_ranks") == (1, 10, 11, 12, 13)
    with pytest.raises(ValueError, match="unknown rule"):
        gp.card_value("A", "face11")
    with pytest.raises(ValueError, match="unknown rank"):
        gp.card_value("1", "face10")


def test_answer_round_trip_and_check():
    hand = gp.decode_answer(ANSWER)
    assert hand == HAND
    assert json.loads(ANSWER) == {
        "cards": ["A", "7", "Q", "3"],
        "values": [1, 7, 10, 3],
        "target": 24,
        "rule": "face10",
    }
    task = gp.GeneralPointsTask()
    assert task.check_answer(ANSWER) is None
    bad = {
        "not json": "not JSON",
        json.dumps({"cards": ["A", "7", "Q", "3"]}): "exactly",
        json.dumps(
            {"cards": ["A", "7", "Q", "3"], "values": [1, 7, 12, 3], "target": 24, "rule": "face10"}
        ): "do not match",
        json.dumps(
            {"cards": ["A", "A", "A", "A"], "values": [1, 1, 1, 1], "target": 24, "rule": "face10"}
        ): "cannot make 24",
        json.dumps(
            {"cards": ["A", "2", "3", "4"], "values": [1, 2, 3, 4], "target": 24, "rule": "face_ranks"}
        ): "face card",
        json.dumps({"cards": ["Z", "2", "3", "4"], "values": [1, 2, 3, 4], "target": 24, "rule": "face10"}): "ranks",
    }
    for answer, reason in bad.items():
        message = task.check_answer(answer)
        assert message is not None and reason in message, (answer, message)
    assert task.check_answer(123) is not None  # type: ignore[arg-type]


def test_canonical_key_ignores_card_order_and_face_spelling():
    task = gp.GeneralPointsTask()
    a = task.canonical_key(gp.encode_answer(("J", "7", "A", "3"), "face10"), "")
    b = task.canonical_key(gp.encode_answer(("3", "A", "10", "7"), "face10"), "")
    assert a == b == "face10|1,3,7,10|24"
    assert task.canonical_key(gp.encode_answer(("J", "7", "A", "3"), "face_ranks"), "") == "face_ranks|1,3,7,11|24"


# ── Solver ──────────────────────────────────────────────────────────────────────────────────────
def test_solver_hand_worked():
    # 1 7 10 3: 10*3 = 30, 1 + 30 = 31, 31 - 7 = 24: natural steps, no parentheses; among the
    # parenthesis-free texts "1+10*3-7" sorts first ("1" < "3" < "7").
    s = gp.solve(HAND.values)
    assert s == gp.Solution("1+10*3-7", ("10*3=30", "1+30=31", "31-7=24"), 7, False)
    # 3 3 8 8 has exactly one tree, 8/(3-8/3), and it needs fractions: 8/3, 1/3.
    s = gp.solve((8, 3, 8, 3))
    assert s == gp.Solution("8/(3-8/3)", ("8/3=8/3", "3-(8/3)=1/3", "8/(1/3)=24"), 1, True)
    assert gp.solve((1, 1, 1, 1)) is None and not gp.is_solvable((13, 13, 13, 13))
    assert gp.solve((6, 4)) == gp.Solution("4*6", ("4*6=24",), 1, False)  # ties go to the smaller text


def brute_force_trees(values: tuple[int, ...], target: int) -> set[str]:
    """Every tree hitting `target`, as a canonical string (children of + and * sorted)."""

    def trees(vals: tuple[int, ...]) -> list[tuple[str, Fraction]]:
        if len(vals) == 1:
            return [(str(vals[0]), Fraction(vals[0]))]
        out = []
        for k in range(1, len(vals)):
            for left_idx in itertools.combinations(range(len(vals)), k):
                left = tuple(vals[i] for i in left_idx)
                right = tuple(v for i, v in enumerate(vals) if i not in left_idx)
                for (lt, lv), (rt, rv) in itertools.product(trees(left), trees(right)):
                    out.append((f"+({min(lt, rt)},{max(lt, rt)})", lv + rv))
                    out.append((f"*({min(lt, rt)},{max(lt, rt)})", lv * rv))
                    out.append((f"-({lt},{rt})", lv - rv))
                    if rv != 0:
                        out.append((f"/({lt},{rt})", lv / rv))
        return out

    return {text for text, value in trees(values) if value == target}


@pytest.mark.parametrize(
    "hand", [(1, 2, 3, 4), (3, 3, 8, 8), (2, 2, 10, 4), (5, 5, 5, 1), (6, 6, 6, 6), (1, 1, 1, 1), (11, 12, 13, 1)]
)
def test_solution_count_matches_brute_force(hand):
    expected = len(brute_force_trees(hand, 24))
    s = gp.solve(hand)
    assert (s.n_solutions if s else 0) == expected


@FAST
@given(ranks=st.lists(st.sampled_from(gp.RANKS), min_size=4, max_size=4), rule=st.sampled_from(gp.RULES))
def test_every_solver_output_verifies(ranks, rule):
    values = gp.hand_values(ranks, rule)
    solution = gp.solve(values)
    hand = gp.Hand(tuple(ranks), values, 24, rule)
    if solution is None:  # the solver says unsolvable: at least the brute force agrees
        assert not brute_force_trees(values, 24)
        return
    assert verdict(f"Answer: {solution.expression}", hand) == (1.0, True, "ok")
    assert rpn_value(solution.expression) == 24
    for line in solution.steps:  # each step line is itself a true equation
        lhs, rhs = line.split("=")
        assert rpn_value(lhs) == Fraction(rhs)


def test_solver_speed():
    gp._solve_sorted.cache_clear()
    gp._reach.cache_clear()
    start = time.perf_counter()
    gp.solve((7, 9, 11, 13))  # cold: fills the sub-multiset cache
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for hand in itertools.islice(itertools.combinations_with_replacement(range(1, 11), 4), 200):
        gp.solve(hand)
    per_hand = (time.perf_counter() - start) / 200
    assert cold < 0.1 and per_hand < 0.01  # measured ~7 ms cold and ~1 ms average on a shared CPU


# ── Generator, prompt, demonstration ────────────────────────────────────────────────────────────
def test_generate_rows_is_deterministic_and_well_formed():
    rows = gp.generate_rows(40, "face10", seed=7, split="train")
    assert rows == gp.generate_rows(40, "face10", seed=7, split="train")
    assert rows != gp.generate_rows(40, "face10", seed=8, split="train")
    assert len({r["id"] for r in rows}) == 40
    task = get_task("general_points")
    for row in rows:
        assert set(row) == {"id", "task", "prompt", "answer", "demonstration", "split", "meta"}
        assert row["task"] == "general_points" and row["split"] == "train"
        assert task.check_answer(row["answer"]) is None  # parses, values match rule, solvable
        hand = gp.decode_answer(row["answer"])
        assert hand.values == tuple(min(gp.RANKS.index(c) + 1, 10) for c in hand.cards)
        assert task.verify(row["answer"], row["demonstration"]) == gp.Verdict(1.0, True, "ok")
        assert set(row["prompt"] + row["demonstration"]) <= PRINTABLE
        assert len(row["prompt"]) <= 120 and row["prompt"].startswith("Cards: ")
        meta = json.loads(row["meta"])
        assert meta["rule"] == "face10" and meta["n_solutions"] >= 1


def test_ood_rows_hold_a_face_card_valued_by_rank():
    rows = gp.generate_rows(60, "face_ranks", seed=1, split="test_ood")
    for row in rows:
        hand = gp.decode_answer(row["answer"])
        assert any(c in gp.FACE_RANKS for c in hand.cards)
        assert hand.values == tuple(gp.RANKS.index(c) + 1 for c in hand.cards)
        assert "J=11, Q=12, K=13" in row["prompt"]
        assert gp.verify_completion(hand, row["demonstration"]).reward == 1.0


def test_prompt_and_demonstration_format():
    assert gp.make_prompt(("A", "7", "Q", "3"), "face10") == (
        "Cards: A 7 Q 3. A=1, J=Q=K=10. Use each card once with + - * / ( ) to make 24.\n"
    )
    path = gp.SolutionPath(("10-4=6 left 2 2 6", "2+2=4 left 4 6", "6*4=24"), "(10-4)*(2+2)", True)
    demo = gp.make_demonstration((10, 2, 4, 2), path)
    assert demo == "Numbers: 2 2 4 10\n10-4=6 left 2 2 6\n2+2=4 left 4 6\n6*4=24\nAnswer: (10-4)*(2+2)\n"
    assert path in gp.solution_paths((2, 2, 4, 10))


# ── Routes: every sequential solution, with the numbers left ────────────────────────────────────
def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def brute_force_routes(values, target) -> set[tuple[str, ...]]:
    """Every route's step lines, by plain recursion over ordered pairs (no pruning, no memo)."""
    out: set[tuple[str, ...]] = set()

    def operand(x: Fraction) -> str:
        return _fmt(x) if x.denominator == 1 and x >= 0 else f"({_fmt(x)})"

    def walk(items: list[Fraction], lines: tuple[str, ...]) -> None:
        if len(items) == 1:
            if items[0] == target:
                out.add(lines)
            return
        for i, j in itertools.permutations(range(len(items)), 2):
            a, b = items[i], items[j]
            rest = [x for k, x in enumerate(items) if k not in (i, j)]
            ops = [("-", a - b)] + ([("/", a / b)] if b else [])
            if a >= b:
                ops += [("+", a + b), ("*", a * b)]
            for op, value in ops:
                left = sorted([*rest, value])
                line = f"{operand(a)}{op}{operand(b)}={_fmt(value)}"
                line += f" left {' '.join(map(_fmt, left))}" if len(left) > 1 else ""
                walk(left, (*lines, line))

    walk([Fraction(v) for v in values], ())
    return out


def _is_natural(route: tuple[str, ...]) -> bool:
    return all(Fraction(line.split("=")[1].split(" left")[0]) >= 0 and "/" not in line.split("=")[1]
               for line in route)


@FAST
@given(ranks=st.lists(st.sampled_from(gp.RANKS), min_size=4, max_size=4), rule=st.sampled_from(gp.RULES))
def test_routes_are_every_sequential_solution_natural_first(ranks, rule):
    values = gp.hand_values(ranks, rule)
    routes = gp.solution_paths(values)
    every = brute_force_routes(values, 24)
    natural = {r for r in every if _is_natural(r)}
    assert {p.steps for p in routes} == (natural or every)  # complete, and natural-only when possible
    assert bool(routes) == gp.is_solvable(values)
    assert all(p.natural == bool(natural) for p in routes)
    assert gp.solution_paths(list(reversed(values))) == routes  # card order does not matter


@FAST
@given(ranks=st.lists(st.sampled_from(gp.RANKS), min_size=4, max_size=4), rule=st.sampled_from(gp.RULES))
def test_every_route_demonstration_verifies_and_keeps_the_books(ranks, rule):
    values = gp.hand_values(ranks, rule)
    hand = gp.Hand(tuple(ranks), values, 24, rule)
    for path in gp.solution_paths(values):
        demo = gp.make_demonstration(values, path)
        assert verdict(demo, hand) == (1.0, True, "ok")
        state = sorted(Fraction(v) for v in values)
        assert demo.splitlines()[0] == "Numbers: " + " ".join(map(_fmt, state))
        for line in path.steps:
            equation, _, left = line.partition(" left ")
            lhs, rhs = equation.split("=")
            assert rpn_value(lhs) == Fraction(rhs)  # the step is a true equation
            for operand in re.findall(r"\(-?\d+(?:/\d+)?\)|\d+", lhs):
                state.remove(Fraction(operand.strip("()")))  # both operands were in play
            state = sorted([*state, Fraction(rhs)])
            assert (left.split() if left else [str(24)]) == [_fmt(x) for x in state]  # the books balance


def test_rows_of_one_hand_cycle_through_its_routes():
    rows = gp.generate_rows(400, "face10", seed=3, split="train")
    by_hand: dict[tuple[int, ...], list[str]] = {}
    for row in rows:
        by_hand.setdefault(tuple(sorted(gp.decode_answer(row["answer"]).values)), []).append(row["demonstration"])
    for values, demos in by_hand.items():
        n_routes = len(gp.solution_paths(values))
        assert len(set(demos)) == min(len(demos), n_routes)  # no route repeats before all were shown


def test_generator_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown rule"):
        gp.generate_rows(1, "face11", 0, "train")
    with pytest.raises(ValueError, match="unknown split"):
        gp.generate_rows(1, "face10", 0, "dev")
    assert gp.generate_rows(0, "face10", 0, "val") == []


# ── Verifier: hand-worked cases ─────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Answer: 10*3-7+1", (1.0, True, "ok")),  # 30 - 7 + 1 = 24
        ("work\nAnswer: (10*3-7+1)=24\n", (1.0, True, "ok")),  # "=24" stripped
        ("  Answer:   10 * 3 - 7 + 1  ", (1.0, True, "ok")),
        ("Answer: \\boxed{10*3-7+1}", (1.0, True, "ok")),
        ("so \\boxed{(1+7)*3*10/10}", (0.0, True, "wrong_numbers")),  # five numbers
        ("The result is \\boxed{10*3-7+1}.", (1.0, True, "ok")),
        ("Answer: 1+1\nAnswer: 10*3-7+1", (1.0, True, "ok")),  # the last Answer line counts
        ("Answer: 10*3-7+1\nAnswer: 1+1", (0.0, True, "wrong_numbers")),
        ("Answer: 10*3+7-1", (0.0, True, "not_24")),  # 30 + 7 - 1 = 36
        ("Answer: 10*3-7", (0.0, True, "wrong_numbers")),  # a card unused
        ("Answer: 10*3-7+1+1", (0.0, True, "wrong_numbers")),  # a card used twice
        ("Answer: 3/(7-7)+10+1", (0.0, True, "wrong_numbers")),  # numbers checked before evaluating
        ("Answer: 24", (0.0, True, "wrong_numbers")),
        ("no answer here, 24", (0.0, False, "no_answer")),
        ("", (0.0, False, "no_answer")),
        ("Answer:", (0.0, False, "empty")),
        ("Answer: =24", (0.0, False, "empty")),
        ("Answer: 10*3**1-7", (0.0, False, "power")),
        ("Answer: 10^1*3-7+1", (0.0, False, "power")),
        ("Answer: 10*3-7+1.0", (0.0, False, "decimal")),
        ("Answer: 10*3-7+.5", (0.0, False, "decimal")),
        ("Answer: 010*3-7+1", (0.0, False, "bad_number")),
        ("Answer: -7+10*3+1", (0.0, False, "unary_op")),
        ("Answer: 10*3+(-7)+1", (0.0, False, "unary_op")),
        ("Answer: +10*3-7+1", (0.0, False, "unary_op")),
        ("Answer: Q*3-7+A", (0.0, False, "unknown_symbol")),
        ("Answer: 10×3−7+1", (0.0, False, "unknown_symbol")),
        ("Answer: 10*3-7+1²", (0.0, False, "unknown_symbol")),
        ("Answer: (10*3-7+1", (0.0, False, "parse_error")),
        ("Answer: 10*3-7+", (0.0, False, "parse_error")),
        ("Answer: 10*3-7+1)", (0.0, False, "trailing_junk")),
        ("Answer: 10*3-7+1 2", (0.0, False, "trailing_junk")),
        ("Answer: 10 * * 3", (0.0, False, "parse_error")),
        ("Answer: \\boxed{10*3-7+1", (0.0, False, "unknown_symbol")),  # unbalanced box: raw text
    ],
)
def test_verifier_hand_worked(completion, expected):
    assert verdict(completion) == expected


def test_verifier_division_and_concatenation():
    hand = gp.Hand(("A", "2", "3", "4"), (1, 2, 3, 4), 24, "face10")
    assert verdict("Answer: 4/(3-3)*2*1", hand)[2] == "wrong_numbers"
    assert verdict("Answer: 4/(2-2)*3*1", hand)[2] == "wrong_numbers"
    twos = gp.Hand(("2", "2", "3", "4"), (2, 2, 3, 4), 24, "face10")
    assert verdict("Answer: 3*4/(2-2)", twos) == (0.0, True, "div_by_zero")
    assert verdict("Answer: 12*3-4", hand) == (0.0, True, "wrong_numbers")  # "12" is not 1 then 2
    assert verdict("Answer: 1*2*3*4", hand) == (1.0, True, "ok")
    assert verdict("Answer: (1+2+3)*4", hand) == (1.0, True, "ok")
    ood = gp.Hand(("Q", "2", "A", "A"), (12, 2, 1, 1), 24, "face_ranks")
    assert verdict("Answer: 12*2*1*1", ood) == (1.0, True, "ok")  # "12" is the Queen under face_ranks
    assert verdict("Answer: 10*2+1+1", ood) == (0.0, True, "wrong_numbers")  # face10 values do not count


def test_task_verify_and_registry():
    task = get_task("general_points")
    assert task.name == "general_points" and known_tasks() == ("countdown", "general_points", "math")
    assert task.verify(ANSWER, "Answer: (7-1)*(10-3)*1") == gp.Verdict(0.0, True, "wrong_numbers")
    assert task.verify(ANSWER, "Answer: (7+1)*(10-3)") == gp.Verdict(0.0, True, "not_24")
    with pytest.raises(ValueError, match="not JSON"):
        task.verify("{broken", "Answer: 1")
    with pytest.raises(ValueError, match="unknown task 'chess'; known tasks: countdown, general_points, math"):
        get_task("chess")


# ── Verifier: malicious and huge inputs ─────────────────────────────────────────────────────────
MALICIOUS = [
    "Answer: __import__('os').system('x')",
    "__import__('os').system('touch /tmp/pwned')",
    "\\boxed{__import__('os').system('x')}",
    "Answer: 1e999",
    "Answer: 9**9**9",
    "Answer: 9^9^9",
    "Answer: " + "(" * 40 + "1",
    "Answer: " + "(" * 17 + "1+7+10+3" + ")" * 17,
    "Answer: " + "(" * 100_000 + "1",
    "Answer: " + "1+" * 5_000 + "1",
    "Answer: " + "9" * 500,
    "Answer: " + "9" * 100_000,
    "x" * 1_000_000,
    "Answer: 1\n" * 100_000,
    "\\boxed{" * 10_000,
    "Answer: 10*3-7+1\x00",
    "Answer: lambda: 0",
    "Answer: [1,7,10,3]",
    "Answer: 1_0*3-7+1",
    "Answer: 0x18",
]


@pytest.mark.parametrize("completion", MALICIOUS, ids=range(len(MALICIOUS)))
def test_malicious_inputs_rejected_quickly(completion, tmp_path):
    start = time.perf_counter()
    v = gp.verify_completion(HAND, completion)
    elapsed = time.perf_counter() - start
    assert v.reward == 0.0 and v.reason != "ok"
    assert elapsed < 0.2, elapsed  # linear scans only; typically well under 10 ms


def test_reasons_for_limits():
    assert verdict("Answer: " + "(" * 17 + "1+7+10+3" + ")" * 17)[2] == "too_deep"
    assert verdict("Answer: " + "(" * 16 + "1+7+10*3" + ")" * 16)[2] == "not_24"  # 16 levels still parse
    assert verdict("Answer: " + "(" * 16 + "10*3-7+1" + ")" * 16)[2] == "ok"
    assert verdict("Answer: " + "1+" * 300 + "1")[2] == "too_long"
    assert verdict("x" * (gp.MAX_COMPLETION_CHARS + 1)) == (0.0, False, "too_long")


# ── Verifier: properties ────────────────────────────────────────────────────────────────────────
@settings(max_examples=200, deadline=None)
@given(st.text())
def test_arbitrary_text_never_raises(text):
    v = gp.verify_completion(HAND, text)
    assert v.reward in (0.0, 1.0) and isinstance(v.reason, str)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789+-*/()^.= \\boxed{}Answer:\n", max_size=80))
def test_arithmetic_noise_never_raises(text):
    v = gp.verify_completion(HAND, "Answer: " + text)
    assert v.reward in (0.0, 1.0)
    assert v.reward == 0.0 or v.reason == "ok"


@st.composite
def random_expression(draw, values: tuple[int, ...]) -> str:
    """A random fully parenthesised expression using each value once, in a random order and shape."""
    leaves = [str(v) for v in draw(st.permutations(values))]
    while len(leaves) > 1:
        i = draw(st.integers(0, len(leaves) - 2))
        op = draw(st.sampled_from("+-*/"))
        leaves[i : i + 2] = [f"({leaves[i]}{op}{leaves[i + 1]})"]
    return leaves[0]


@FAST
@given(st.data())
def test_random_expressions_judged_like_reference_evaluator(data):
    values = tuple(data.draw(st.lists(st.integers(1, 13), min_size=4, max_size=4)))
    hand = gp.Hand(("A",) * 4, values, 24, "face_ranks")  # cards are irrelevant to the verifier
    expr = data.draw(random_expression(values))
    value = rpn_value(expr)
    reward, format_ok, reason = verdict(f"Answer: {expr}", hand)
    assert format_ok
    if value is None:
        assert reason == "div_by_zero"
    else:
        assert (reward == 1.0) == (value == 24)


def _perturbations(expression: str, values: tuple[int, ...]):
    """Every single-number and single-operator change of an expression, plus the tokens."""
    tokens = gp.tokenize(expression)
    for i, tok in enumerate(tokens):
        if tok.isdigit():
            for other in range(1, 14):
                if other != int(tok):
                    yield "number", "".join([*tokens[:i], str(other), *tokens[i + 1 :]])
        elif tok in "+-*/":
            for op in "+-*/":
                if op != tok:
                    yield "operator", "".join([*tokens[:i], op, *tokens[i + 1 :]])


@FAST
@given(ranks=st.lists(st.sampled_from(gp.RANKS), min_size=4, max_size=4), rule=st.sampled_from(gp.RULES))
def test_perturbed_solutions_do_not_verify(ranks, rule):
    values = gp.hand_values(ranks, rule)
    solution = gp.solve(values)
    if solution is None:
        return
    hand = gp.Hand(tuple(ranks), values, 24, rule)
    for kind, perturbed in _perturbations(solution.expression, values):
        reward, _, reason = verdict(f"Answer: {perturbed}", hand)
        if kind == "number":  # the multiset changed, whatever the value
            assert (reward, reason) == (0.0, "wrong_numbers"), perturbed
        else:  # same numbers: accepted exactly when the reference evaluator also gets 24
            assert (reward == 1.0) == (rpn_value(perturbed) == 24), perturbed
    outsider = next(v for v in range(1, 14) if v not in values)
    assert verdict(f"Answer: {solution.expression}*{outsider}/{outsider}", hand)[2] == "wrong_numbers"


def test_hands_drawn_with_replacement_and_seeded():
    rng_a, rng_b = random.Random(3), random.Random(3)
    hands = [gp.draw_hand(rng_a, "face10") for _ in range(200)]
    assert hands == [gp.draw_hand(rng_b, "face10") for _ in range(200)]
    assert any(len(set(h)) < 4 for h in hands)  # repeated ranks occur: drawn with replacement
    assert all(gp.is_solvable(gp.hand_values(h, "face10")) for h in hands)
