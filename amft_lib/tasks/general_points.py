"""General Points, the 24-card game of "SFT Memorizes, RL Generalizes", in text form.

Game (AMFT.md §5). Four cards with ranks A(1), 2..10, J, Q, K, drawn *with replacement* from a
seeded `random.Random`, redrawn until the hand can make the target 24 using every card exactly once
with + - * / and parentheses. Two rules:

- "face10" (in distribution): J, Q, K count as 10.
- "face_ranks" (out of distribution): J, Q, K count as 11, 12, 13, and the hand holds at least one
  face card (otherwise the rule change would not show).

Solver. `solve(values)` searches every expression tree over the multiset (all orders × operators ×
bracketings) in exact `Fraction` arithmetic, skipping division by zero. The reachable values of every
sub-multiset are memoised on its sorted value tuple, and the root only looks up the partner each value
needs to make 24 (e.g. 24 - a for +), so a cold 4-card solve costs a few milliseconds and a warm one
microseconds. Among all solutions it returns the one with the smallest key, compared in this order:

1. fewest intermediate results that are not natural numbers (fractions or negatives are hard to
   write down for a small model);
2. fewest pairs of parentheses (the expression is printed faithfully to its tree with the minimum
   parentheses, so a+(b+c) costs a pair and its left-to-right twin a+b+c wins);
3. the expression text, as a plain string.

The key is applied greedily per (sub-multiset, value), so it is deterministic and simple but not a
proven global minimum. `Solution.n_solutions` counts distinct expression trees (children of + and *
unordered, equal cards interchangeable); fewer trees means a harder hand.

Prompt (`make_prompt`, ≤ ~100 chars, printable ASCII):

    Cards: A 7 Q 3. A=1, J=Q=K=10. Use each card once with + - * / ( ) to make 24.

Demonstration (`make_demonstration`). The hand's values sorted, then one line per step that
combines two of the numbers still in play, each followed by the numbers left after it, then the
whole expression:

    Numbers: 2 2 4 10
    10-4=6 left 2 2 6
    2+2=4 left 4 6
    6*4=24
    Answer: (10-4)*(2+2)

Why this shape: a model that must hold the remaining numbers in its head memorises hands instead of
computing them. Writing the state down makes every line a local problem (pick two numbers from the
line above, do one operation, copy the rest), and `solution_paths` gives *every* such sequence for a
hand, so the rows of one hand teach different routes rather than one string to recite. Measured with
the `tiny` model, SFT on unseen hands (key split, same steps): the old one-solution,
no-state format reached greedy accuracy 0.02 on val; every-path-with-state 0.21
(experiment recorded in the issue 6 closing note). Operands that are fractions or negative are
wrapped in parentheses so every step line is itself a valid expression; results and the numbers
left are printed bare. `+` and `*` write the larger operand first.

Verifier (`verify_completion`). The final answer is the last line starting with "Answer:" (its
content may be wrapped in `\\boxed{}`); failing that, the last `\\boxed{...}` anywhere. Everything
before the first "=" is the expression; each "="-separated part after it is a claim ("...=24" is
fine, "...=25" for target 24 is not). The expression is tokenised and parsed by our own
recursive-descent parser over non-negative integers, + - * /, parentheses and spaces; nothing is ever
evaluated by Python. Rejected (reward 0, never an exception) with these reasons:

- format errors (format_ok=False): "no_answer", "empty", "too_long" (> MAX_ANSWER_CHARS characters,
  or a completion over MAX_COMPLETION_CHARS), "too_deep" (> MAX_DEPTH nested parentheses),
  "unknown_symbol" (letters, "_", quotes, unicode operators, card letters such as "Q": write the
  value), "power" ("**" or "^"), "decimal" (any "."), "bad_number" (a leading zero, "08"),
  "unary_op" (a sign with no left operand: "-3+27" is refused, since every card is positive and
  allowing it would let a model negate a card), "parse_error", "trailing_junk";
- well-formed but wrong (format_ok=True): "wrong_numbers" (the multiset of numbers differs from the
  hand's values; this is what catches concatenated digits such as "12" from the cards 1 and 2),
  "div_by_zero", "not_24" (the value differs from the target; the name keeps the game's target),
  "wrong_claim" (the expression is right but a claim after "=" evaluates to another value:
  "Answer: 3*8 = 25"); a claim that is empty or not arithmetic ("3*8 =", "= 24 points") is the
  format error "bad_claim".

Numbers are checked *before* evaluation, so only expressions over the hand's four small numbers are
computed as the answer; claims are computed only after a correct expression, over at most
MAX_ANSWER_CHARS characters with no powers (a few hundred digits at worst).

The `answer` column is JSON: {"cards": ["A","7","Q","3"], "values": [1,7,10,3], "target": 24,
"rule": "face10"}.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Protocol

from amft_lib.tasks.base import Verdict, extract_boxed

# ── The game ────────────────────────────────────────────────────────────────────────────────────
RANKS = ("A", "2", "3", "4", "5", "6", "7", "8", "9", "10", "J", "Q", "K")
FACE_RANKS = ("J", "Q", "K")
RULES = ("face10", "face_ranks")
SPLITS = ("train", "val", "test_id", "test_ood")  # DESIGN.md dataset contract
TARGET = 24
N_CARDS = 4
TASK_NAME = "general_points"

# ── Verifier limits: generous for a real answer, tiny for an attack ─────────────────────────────
MAX_COMPLETION_CHARS = 65_536
MAX_ANSWER_CHARS = 512
MAX_DEPTH = 16

_FORMAT_ERRORS = frozenset(
    {
        "no_answer",
        "empty",
        "too_long",
        "too_deep",
        "unknown_symbol",
        "power",
        "decimal",
        "bad_number",
        "unary_op",
        "parse_error",
        "trailing_junk",
        "bad_claim",
    }
)


def card_value(rank: str, rule: str) -> int:
    """The number a card stands for under `rule` (A=1; J/Q/K = 10 or 11/12/13)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    if rank not in RANKS:
        raise ValueError(f"unknown rank {rank!r}; known: {' '.join(RANKS)}")
    index = RANKS.index(rank) + 1  # A=1 ... K=13
    return min(index, 10) if rule == "face10" else index


def hand_values(cards: Sequence[str], rule: str) -> tuple[int, ...]:
    """The card values of a hand, in the hand's order."""
    return tuple(card_value(rank, rule) for rank in cards)


# ── Solver ──────────────────────────────────────────────────────────────────────────────────────
_LEAF, _MUL, _ADD = 3, 2, 1  # precedence of an expression's top operator; a leaf binds tightest
_PREC = {"+": _ADD, "-": _ADD, "*": _MUL, "/": _MUL}


@dataclass(frozen=True, slots=True)
class _Expr:
    """One expression tree with the cached facts the solution key needs."""

    value: Fraction
    text: str  # faithful to the tree, minimum parentheses
    prec: int
    parens: int
    non_natural: int  # intermediate results (this node included) that are fractions or negative
    op: str = ""
    left: _Expr | None = None
    right: _Expr | None = None

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.non_natural, self.parens, self.text)


def _leaf(value: int) -> _Expr:
    return _Expr(Fraction(value), str(value), _LEAF, 0, 0)


def _combine(left: _Expr, op: str, right: _Expr) -> _Expr | None:
    """`left op right` as a new tree; None for division by zero."""
    a, b = left.value, right.value
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    elif b == 0:
        return None
    else:
        value = a / b
    prec = _PREC[op]
    ltext, rtext, parens = left.text, right.text, left.parens + right.parens
    if left.prec < prec:  # (a+b)*c
        ltext, parens = f"({ltext})", parens + 1
    if right.prec <= prec:  # a-(b+c), a/(b*c), and a+(b+c) kept faithful to the tree
        rtext, parens = f"({rtext})", parens + 1
    natural = value.denominator == 1 and value >= 0
    non_natural = left.non_natural + right.non_natural + (0 if natural else 1)
    return _Expr(value, f"{ltext}{op}{rtext}", prec, parens, non_natural, op, left, right)


def _better(a: _Expr | None, b: _Expr | None) -> _Expr | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a.key <= b.key else b


@lru_cache(maxsize=4096)
def _splits(values: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], tuple[int, ...], bool], ...]:
    """Every unordered split of a sorted multiset into two non-empty sorted parts, once each.

    The flag says both parts are the same multiset; then the pairs of trees (t1, t2) and (t2, t1)
    come from one set and the counting must not take both.
    """
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    out = []
    for mask in range(1, (1 << len(values)) - 1):
        part_a = tuple(v for i, v in enumerate(values) if mask >> i & 1)
        part_b = tuple(v for i, v in enumerate(values) if not mask >> i & 1)
        if part_a > part_b or (part_a, part_b) in seen:
            continue
        seen.add((part_a, part_b))
        out.append((part_a, part_b, part_a == part_b))
    return tuple(out)


def _commutative_count(a: Fraction, b: Fraction, ca: int, cb: int, same: bool) -> int:
    """Trees `ta op tb` for a commutative op, counting {ta, tb} once when both come from one set."""
    if not same:
        return ca * cb
    if a < b:
        return ca * cb
    if a == b:
        return ca * (ca + 1) // 2  # unordered pairs with repetition from ca trees
    return 0  # counted when the loop meets (b, a)


@lru_cache(maxsize=4096)
def _reach(values: tuple[int, ...]) -> dict[Fraction, tuple[_Expr, int]]:
    """Every value a sorted multiset can make -> (best expression by key, number of trees).

    Memoised on the sorted tuple: 13 card values give at most 559 sub-multisets of size ≤ 3, so the
    cache stays tiny. Callers must not mutate the returned dict.
    """
    if len(values) == 1:
        return {Fraction(values[0]): (_leaf(values[0]), 1)}
    best: dict[Fraction, _Expr] = {}
    count: dict[Fraction, int] = {}

    def offer(expr: _Expr | None, n: int) -> None:
        if expr is None or n == 0:
            return
        incumbent = best.get(expr.value)
        if incumbent is None or expr.key < incumbent.key:
            best[expr.value] = expr
        count[expr.value] = count.get(expr.value, 0) + n

    for part_a, part_b, same in _splits(values):
        reach_a, reach_b = _reach(part_a), _reach(part_b)
        for a, (ea, ca) in reach_a.items():
            for b, (eb, cb) in reach_b.items():
                n_comm = _commutative_count(a, b, ca, cb, same)
                if n_comm:
                    for op in "+*":  # both renderings compete for the key, the tree counts once
                        offer(_better(_combine(ea, op, eb), _combine(eb, op, ea)), n_comm)
                for op in "-/":
                    offer(_combine(ea, op, eb), ca * cb)
                    if not same:  # with one set, (a, b) and (b, a) are both visited already
                        offer(_combine(eb, op, ea), ca * cb)
    return {v: (best[v], count[v]) for v in best}


def _partners(a: Fraction, target: Fraction, same: bool) -> list[tuple[str, Fraction, bool]]:
    """(op, b, a_is_left) such that `a op b` (or `b op a`) equals target."""
    out = [("+", target - a, True), ("-", a - target, True)]
    if a != 0:
        out += [("*", target / a, True), ("/", a / target, True)]
    if not same:  # b - a and b / a; with one set the loop over a meets these as (b, a)
        out.append(("-", a + target, False))
        if a != 0:
            out.append(("/", a * target, False))
    return out


@dataclass(frozen=True)
class Solution:
    """A solver answer: the chosen expression, its step lines, and how many trees solve the hand."""

    expression: str
    steps: tuple[str, ...]
    n_solutions: int
    needs_fraction: bool


def _fmt(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _operand(value: Fraction) -> str:
    """A step operand; fractions and negatives in parentheses so the step line parses."""
    text = _fmt(value)
    return text if value.denominator == 1 and value >= 0 else f"({text})"


def _steps(expr: _Expr) -> list[str]:
    if expr.left is None or expr.right is None:
        return []
    line = f"{_operand(expr.left.value)}{expr.op}{_operand(expr.right.value)}={_fmt(expr.value)}"
    return [*_steps(expr.left), *_steps(expr.right), line]


def _has_fraction(expr: _Expr) -> bool:
    if expr.left is None or expr.right is None:
        return False
    return expr.value.denominator != 1 or _has_fraction(expr.left) or _has_fraction(expr.right)


@lru_cache(maxsize=8192)
def _solve_sorted(values: tuple[int, ...], target: int) -> Solution | None:
    goal = Fraction(target)
    if len(values) == 1:
        return Solution(str(values[0]), (), 1, False) if values[0] == target else None
    best: _Expr | None = None
    total = 0
    for part_a, part_b, same in _splits(values):
        reach_a, reach_b = _reach(part_a), _reach(part_b)
        for a, (ea, ca) in reach_a.items():
            for op, b, a_left in _partners(a, goal, same):
                hit = reach_b.get(b)
                if hit is None:
                    continue
                eb, cb = hit
                if op in "+*":
                    n = _commutative_count(a, b, ca, cb, same)
                    candidate = _better(_combine(ea, op, eb), _combine(eb, op, ea)) if n else None
                else:
                    n = ca * cb
                    candidate = _combine(ea, op, eb) if a_left else _combine(eb, op, ea)
                if candidate is None:  # a / 0
                    continue
                total += n
                best = _better(best, candidate)
    if best is None:
        return None
    return Solution(best.text, tuple(_steps(best)), total, _has_fraction(best))


def solve(values: Sequence[int], target: int = TARGET) -> Solution | None:
    """The simplest solution for a hand (see the module docstring for "simplest"), or None.

    Order of `values` does not matter: results are memoised on the sorted tuple.
    """
    if not values:
        raise ValueError("a hand needs at least one card")
    return _solve_sorted(tuple(sorted(int(v) for v in values)), int(target))


def is_solvable(values: Sequence[int], target: int = TARGET) -> bool:
    return solve(values, target) is not None


@dataclass(frozen=True, slots=True)
class SolutionPath:
    """One sequential solution: combine two numbers at a time until only the target is left.

    `steps` are the demonstration's step lines ("7-1=6 left 2 2 6"; the last one has no "left"),
    `expression` the whole computation as one expression with minimum parentheses, `natural` says
    every intermediate result is a non-negative integer.
    """

    steps: tuple[str, ...]
    expression: str
    natural: bool


@lru_cache(maxsize=65_536)
def _can_make(values: tuple[Fraction, ...], goal: Fraction) -> bool:
    """Whether a sorted multiset of exact numbers makes `goal`: the pruning test of `_paths_sorted`,
    on values only, so strings are built for successful routes alone."""
    if len(values) == 1:
        return values[0] == goal
    for i in range(len(values)):
        for j in range(i + 1, len(values)):
            a, b = values[i], values[j]
            rest = values[:i] + values[i + 1 : j] + values[j + 1 :]
            results = {a + b, a - b, b - a, a * b}
            if b:
                results.add(a / b)
            if a:
                results.add(b / a)
            if any(_can_make(tuple(sorted((*rest, r))), goal) for r in results):
                return True
    return False


@lru_cache(maxsize=8192)
def _paths_sorted(values: tuple[int, ...], target: int) -> tuple[SolutionPath, ...]:
    goal = Fraction(target)
    found: dict[tuple[str, ...], SolutionPath] = {}

    def walk(items: list[tuple[Fraction, _Expr]], lines: tuple[str, ...], natural: bool) -> None:
        if len(items) == 1:
            if items[0][0] == goal and lines not in found:
                found[lines] = SolutionPath(lines, items[0][1].text, natural)
            return
        for i, (a, ea) in enumerate(items):
            for j, (b, eb) in enumerate(items):
                if i == j:
                    continue
                rest = [item for k, item in enumerate(items) if k not in (i, j)]
                for op in "+-*/":
                    if op in "+*" and (a, i) < (b, j):  # commutative: larger operand first, once
                        continue
                    expr = _combine(ea, op, eb)
                    if expr is None:
                        continue
                    value = expr.value
                    left = [*rest, (value, expr)]
                    state = tuple(sorted(v for v, _ in left))  # the pruning key and the "left" text
                    if not _can_make(state, goal):
                        continue
                    line = f"{_operand(a)}{op}{_operand(b)}={_fmt(value)}"
                    if len(left) > 1:
                        line += f" left {' '.join(map(_fmt, state))}"
                    is_natural = natural and value.denominator == 1 and value >= 0
                    walk(left, (*lines, line), is_natural)

    walk([(Fraction(v), _leaf(v)) for v in values], (), True)
    paths = tuple(found.values())
    natural = tuple(p for p in paths if p.natural)
    return natural or paths


def solution_paths(values: Sequence[int], target: int = TARGET) -> tuple[SolutionPath, ...]:
    """Every distinct sequential solution of a hand, in a deterministic order; empty if unsolvable.

    Only the natural-number paths when the hand has any (fractions and negatives are hard to write
    for a small model); otherwise all paths. Order of `values` does not matter.
    """
    return _paths_sorted(tuple(sorted(int(v) for v in values)), int(target))


# ── Rows: prompt, answer, demonstration ─────────────────────────────────────────────────────────
_RULE_TEXT = {"face10": "A=1, J=Q=K=10.", "face_ranks": "A=1, J=11, Q=12, K=13."}


def make_prompt(cards: Sequence[str], rule: str, target: int = TARGET) -> str:
    """The short prompt a tiny character-level model reads: cards as ranks, the rule, the goal."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    return f"Cards: {' '.join(cards)}. {_RULE_TEXT[rule]} Use each card once with + - * / ( ) to make {target}.\n"


def make_demonstration(values: Sequence[int], path: SolutionPath) -> str:
    """"Numbers:" line, the path's step lines, then "Answer: <expression>", newline-terminated (the
    newline is the stop cue)."""
    numbers = " ".join(str(v) for v in sorted(values))
    return f"Numbers: {numbers}\n" + "".join(f"{line}\n" for line in path.steps) + f"Answer: {path.expression}\n"


@dataclass(frozen=True)
class Hand:
    """A decoded `answer` column."""

    cards: tuple[str, ...]
    values: tuple[int, ...]
    target: int
    rule: str


def encode_answer(cards: Sequence[str], rule: str, target: int = TARGET) -> str:
    """The `answer` column: JSON with cards, their values under `rule`, target and rule."""
    return json.dumps({"cards": list(cards), "values": list(hand_values(cards, rule)), "target": target, "rule": rule})


@lru_cache(maxsize=4096)  # RL scores G completions per prompt: decode each answer once
def decode_answer(answer: str) -> Hand:
    """Parse and validate an `answer` column; ValueError says what is wrong."""
    try:
        obj = json.loads(answer)
    except (TypeError, ValueError) as err:
        raise ValueError(f"answer is not JSON: {err}") from None
    if not isinstance(obj, dict) or set(obj) != {"cards", "values", "target", "rule"}:
        raise ValueError("answer must be a JSON object with exactly: cards, values, target, rule")
    cards, values, target, rule = obj["cards"], obj["values"], obj["target"], obj["rule"]
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    if not isinstance(cards, list) or len(cards) != N_CARDS or any(c not in RANKS for c in cards):
        raise ValueError(f"cards must be a list of {N_CARDS} ranks from {' '.join(RANKS)}, got {cards!r}")
    if not isinstance(values, list) or any(type(v) is not int for v in values):
        raise ValueError(f"values must be a list of ints, got {values!r}")
    if tuple(values) != hand_values(cards, rule):
        raise ValueError(f"values {values} do not match cards {cards} under rule {rule}")
    if type(target) is not int or target <= 0:
        raise ValueError(f"target must be a positive int, got {target!r}")
    return Hand(tuple(cards), tuple(values), target, rule)


def canonical_key_of(hand: Hand) -> str:
    """rule | sorted values | target: the same puzzle (in any card order, J or 10) gets one key."""
    return f"{hand.rule}|{','.join(map(str, sorted(hand.values)))}|{hand.target}"


def draw_hand(rng: random.Random, rule: str, target: int = TARGET) -> tuple[str, ...]:
    """Draw ranks with replacement until the hand is solvable (and, for face_ranks, has a face card)."""
    for _ in range(100_000):
        cards = tuple(rng.choice(RANKS) for _ in range(N_CARDS))
        if rule == "face_ranks" and not any(c in FACE_RANKS for c in cards):
            continue
        if is_solvable(hand_values(cards, rule), target):
            return cards
    raise RuntimeError(f"no solvable hand in 100000 draws for rule={rule} target={target}")


def generate_rows(n: int, rule: str, seed: int, split: str, id_prefix: str = "gp") -> list[dict]:
    """`n` dataset rows (DESIGN.md columns) for one rule and split, deterministic in `seed`.

    Hands may repeat (drawn with replacement, ≤ 1820 distinct rank multisets exist): dedup and the
    split by `canonical_key` belong to data preparation, not here.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    rng = random.Random(seed)
    route_rng = random.Random(seed * 7_919 + 1)  # own stream: the hands drawn do not depend on it
    first_route: dict[tuple[int, ...], int] = {}
    seen: dict[tuple[int, ...], int] = {}
    rows = []
    for i in range(n):
        cards = draw_hand(rng, rule)
        values = hand_values(cards, rule)
        solution = solve(values)
        assert solution is not None  # draw_hand only returns solvable hands
        # Each time a hand comes back it gets the next of its routes, starting at a random one, so
        # the rows of one hand show as many different solutions as it has.
        paths = solution_paths(values)
        key = tuple(sorted(values))
        start = first_route.setdefault(key, route_rng.randrange(len(paths)))
        path = paths[(start + seen.get(key, 0)) % len(paths)]
        seen[key] = seen.get(key, 0) + 1
        meta = {"rule": rule, "n_solutions": solution.n_solutions, "needs_fraction": solution.needs_fraction,
                "n_routes": len(paths)}
        rows.append(
            {
                "id": f"{id_prefix}-{rule}-{split}-s{seed}-{i:06d}",
                "task": TASK_NAME,
                "prompt": make_prompt(cards, rule),
                "answer": encode_answer(cards, rule),
                "demonstration": make_demonstration(values, path),
                "split": split,
                "meta": json.dumps(meta),
            }
        )
    return rows


# ── Safe verifier ───────────────────────────────────────────────────────────────────────────────
class AnswerRejected(ValueError):
    """A rejection reason raised by `tokenize`/`parse_expression`; `verify` turns it into a Verdict."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# AST: an int leaf, or (op, left, right).
_Node = int | tuple


def extract_final_answer(completion: str) -> str | None:
    """The raw answer expression: last "Answer:" line (boxed content unwrapped), else last \\boxed{}."""
    for line in reversed(completion.splitlines()):
        stripped = line.strip()
        if stripped.startswith("Answer:"):
            body = stripped[len("Answer:") :].strip()
            boxed = extract_boxed(body)
            return body if boxed is None else boxed
    return extract_boxed(completion)


def tokenize(expr: str) -> list[str]:
    """Split an expression into numbers, operators and parentheses; raises AnswerRejected on anything else."""
    tokens: list[str] = []
    depth = 0
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch in " \t":
            i += 1
        elif ch in "0123456789":  # not str.isdigit(): that admits "²" and other unicode digits
            j = i
            while j < len(expr) and expr[j] in "0123456789":
                j += 1
            if j < len(expr) and expr[j] == ".":
                raise AnswerRejected("decimal")
            if expr[i] == "0" and j - i > 1:
                raise AnswerRejected("bad_number")
            tokens.append(expr[i:j])
            i = j
        elif ch == "^" or expr.startswith("**", i):
            raise AnswerRejected("power")
        elif ch in "+-*/":
            tokens.append(ch)
            i += 1
        elif ch in "()":
            depth += 1 if ch == "(" else -1
            if depth > MAX_DEPTH:
                raise AnswerRejected("too_deep")
            tokens.append(ch)
            i += 1
        elif ch == ".":
            raise AnswerRejected("decimal")
        else:
            raise AnswerRejected("unknown_symbol")
    return tokens


def _parse_expr(tokens: list[str], pos: int) -> tuple[_Node, int]:
    """expr := term (('+' | '-') term)*   — loops, not recursion, for long chains."""
    node, pos = _parse_term(tokens, pos)
    while pos < len(tokens) and tokens[pos] in ("+", "-"):
        op = tokens[pos]
        right, pos = _parse_term(tokens, pos + 1)
        node = (op, node, right)
    return node, pos


def _parse_term(tokens: list[str], pos: int) -> tuple[_Node, int]:
    """term := factor (('*' | '/') factor)*"""
    node, pos = _parse_factor(tokens, pos)
    while pos < len(tokens) and tokens[pos] in ("*", "/"):
        op = tokens[pos]
        right, pos = _parse_factor(tokens, pos + 1)
        node = (op, node, right)
    return node, pos


def _parse_factor(tokens: list[str], pos: int) -> tuple[_Node, int]:
    """factor := NUMBER | '(' expr ')'   — recursion depth is bounded by MAX_DEPTH parentheses."""
    if pos >= len(tokens):
        raise AnswerRejected("parse_error")
    tok = tokens[pos]
    if tok in ("+", "-"):
        raise AnswerRejected("unary_op")
    if tok == "(":
        node, pos = _parse_expr(tokens, pos + 1)
        if pos >= len(tokens) or tokens[pos] != ")":
            raise AnswerRejected("parse_error")
        return node, pos + 1
    if tok[0] in "0123456789":
        return int(tok), pos + 1
    raise AnswerRejected("parse_error")


def parse_expression(expr: str) -> _Node:
    """Tokenise and parse a whole expression into an AST; raises AnswerRejected with the reason."""
    tokens = tokenize(expr)
    if not tokens:
        raise AnswerRejected("empty")
    node, pos = _parse_expr(tokens, 0)
    if pos != len(tokens):
        raise AnswerRejected("trailing_junk")
    return node


def expression_value(expr: str) -> Fraction:
    """The exact value of an arithmetic expression (the verifier's parser, any non-negative integers);
    raises AnswerRejected with the reason. Bounded by MAX_DEPTH and, at the callers, MAX_ANSWER_CHARS."""
    return _evaluate(parse_expression(expr))


def _leaves(node: _Node) -> list[int]:
    """The numbers of an AST, iteratively (a 512-char chain "1+1+..." is 256 levels deep)."""
    out, stack = [], [node]
    while stack:
        item = stack.pop()
        if isinstance(item, int):
            out.append(item)
        else:
            stack.extend((item[2], item[1]))
    return out


def _evaluate(node: _Node) -> Fraction:
    """Exact value of an AST whose numbers already match the hand (so it has only a few nodes)."""
    if isinstance(node, int):
        return Fraction(node)
    op, left, right = node
    a, b = _evaluate(left), _evaluate(right)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise AnswerRejected("div_by_zero")
    return a / b


class Puzzle(Protocol):
    """What the verifier needs: the numbers to use, each exactly once, and the target. A General Points
    `Hand` and a Countdown `Instance` both are one, so the two games share one verifier."""

    @property
    def values(self) -> tuple[int, ...]: ...

    @property
    def target(self) -> int: ...


def verify_completion(hand: Puzzle, completion: str) -> Verdict:
    """Judge a completion against a hand (any `Puzzle`). Never raises, never executes anything from the
    completion. A wrong value is reported as "not_24" for every target (the name is kept for reports)."""
    if not isinstance(completion, str):
        return Verdict(0.0, False, "no_answer")
    if len(completion) > MAX_COMPLETION_CHARS:
        return Verdict(0.0, False, "too_long")
    raw = extract_final_answer(completion)
    if raw is None:
        return Verdict(0.0, False, "no_answer")
    if len(raw) > MAX_ANSWER_CHARS:
        return Verdict(0.0, False, "too_long")
    expr, *claims = raw.split("=")
    try:
        node = parse_expression(expr)
        if sorted(_leaves(node)) != sorted(hand.values):
            return Verdict(0.0, True, "wrong_numbers")
        value = _evaluate(node)
    except AnswerRejected as rejection:
        return Verdict(0.0, rejection.reason not in _FORMAT_ERRORS, rejection.reason)
    except RecursionError:  # unreachable with MAX_DEPTH, kept so verify can never raise
        return Verdict(0.0, False, "too_deep")
    if value != hand.target:
        return Verdict(0.0, True, "not_24")
    return check_claims(claims, value)


def check_claims(claims: Sequence[str], value: Fraction) -> Verdict:
    """Judge what an answer line claims after its expression ("= 24", "= 6*4 = 24") once the expression
    is right: every claim must be an arithmetic expression (the same parser; any numbers) equal to
    `value`. `Answer: 3*8 = 25` for target 24 claims a falsehood and earns nothing ("wrong_claim"); an
    empty or unparseable claim ("3*8 =", "= 24 points") is a format error ("bad_claim"). The claims
    share the answer's MAX_ANSWER_CHARS bound, so evaluating them is as cheap as the expression."""
    for claim in claims:
        try:
            claimed = expression_value(claim)
        except AnswerRejected as rejection:
            if rejection.reason == "div_by_zero":
                return Verdict(0.0, True, "wrong_claim")
            return Verdict(0.0, False, "bad_claim")
        except RecursionError:  # unreachable with MAX_DEPTH, kept so verify can never raise
            return Verdict(0.0, False, "bad_claim")
        if claimed != value:
            return Verdict(0.0, True, "wrong_claim")
    return Verdict(1.0, True, "ok")


class GeneralPointsTask:
    """General Points behind the Task protocol."""

    name = TASK_NAME

    def verify(self, answer: str, completion: str) -> Verdict:
        """Reward 1 iff the final answer uses exactly the hand's numbers and makes the target.

        Raises ValueError only for a malformed `answer` (a data bug `check_answer` catches first).
        """
        return verify_completion(decode_answer(answer), completion)

    def canonical_key(self, answer: str, prompt: str) -> str:
        """rule | sorted values | target, so a hand never straddles splits (the prompt is not needed)."""
        return canonical_key_of(decode_answer(answer))

    def check_answer(self, answer: str) -> str | None:
        """None for a well-formed, solvable hand; else a one-line reason for the data gate."""
        if not isinstance(answer, str):
            return f"answer must be a string, got {type(answer).__name__}"
        try:
            hand = decode_answer(answer)
        except ValueError as err:
            return str(err)
        if hand.rule == "face_ranks" and not any(c in FACE_RANKS for c in hand.cards):
            return "a face_ranks (OOD) hand must hold at least one face card"
        if not is_solvable(hand.values, hand.target):
            return f"hand {' '.join(hand.cards)} cannot make {hand.target}"
        return None
