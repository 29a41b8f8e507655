"""Countdown: make a target number from a few numbers, each used exactly once, with + - * / and brackets.

Why this task beside General Points: General Points has only ~566 solvable in-distribution hands, so
its evaluation splits hold a few dozen unseen hands and cannot rank methods (one hand ≈ 0.025 of
accuracy). Countdown keeps the same game shape (and so the same solver, route demonstrations and
safe verifier, imported from `general_points`, not copied) over a space of ~16,000 in-distribution
instances, enough for ≥ 2000 unseen instances in each evaluation split (standard error ≈ 0.01).

Instance space (`CountdownSpec`):

- in distribution ("id"): `n_numbers` = 3 numbers from 1..`max_number` = 20, drawn as a multiset,
  and a target in 1..`max_target` = 100 that the numbers can make exactly (every one used once);
  the target is drawn uniformly from the integers in that range the multiset can reach;
- out of distribution ("ood"): the same numbers (3 from 1..20) but a target in `max_target`+1 ..
  `ood_max_target` = 101..200, a range no training target comes from.

Why OOD means "larger targets" and not "one more number" or "larger operands": both of those were
measured on the warm-start `tiny` model (150 instances each, greedy and pass@8): 4 numbers → 0.00 /
0.00; 3 numbers with one of them in 21..30 → 0.00 / 0.00, and 21..40 → 0.000 / 0.000 on 2000 — the
character model cannot even copy an operand it has never seen (it rewrites "35 14 8" as "7 14 15" on
its first line), so such a split is structurally 0 for every method, as General Points' OOD split is,
and ranks nothing. Targets 101..200 keep every input familiar and ask whether the search extrapolates
to results outside the trained range (warm start: greedy 0.00, pass@8 0.06). Such instances never
occur in distribution (every ID target is ≤ 100), so no key crosses.

Prompt (≤ ~70 chars; numbers in the drawn order, not sorted):

    Numbers: 15 3 7. Target: 36. Use each number once with + - * / ( ).

Demonstration: General Points' route format (`make_demonstration`): the sorted numbers, one line per
combination with the numbers left, then the whole expression:

    Numbers: 3 7 15
    7*3=21 left 15 21
    21+15=36
    Answer: 7*3+15

Each OOD instance is drawn as a multiset first, then a target, so it is not uniform over OOD instances;
the ID space is enumerated and is uniform.

The `answer` column is JSON: {"numbers": [15, 3, 7], "target": 36}. The canonical key is
"countdown|3,7,15|36" (sorted numbers and target): an instance lands in exactly one split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations_with_replacement

from amft_lib.tasks.base import Verdict
from amft_lib.tasks.general_points import _reach, make_demonstration, solution_paths, verify_completion

TASK_NAME = "countdown"
RULES = ("id", "ood")
MAX_NUMBERS = 5  # the verifier and solver are exponential in the count; the data gate refuses more
MAX_VALUE = 10_000  # numbers and targets above this are refused by `decode_answer`


@dataclass(frozen=True)
class CountdownSpec:
    """The instance space: how many numbers, their ranges (ID and OOD) and the target range."""

    n_numbers: int = 3
    max_number: int = 20
    max_target: int = 100
    ood_max_target: int = 200

    def __post_init__(self) -> None:
        if not 2 <= self.n_numbers <= MAX_NUMBERS:
            raise ValueError(f"n_numbers={self.n_numbers}: must be in [2, {MAX_NUMBERS}]")
        if not 1 <= self.max_number <= MAX_VALUE:
            raise ValueError(f"max_number={self.max_number}: must be in [1, {MAX_VALUE}]")
        if not 1 <= self.max_target < self.ood_max_target <= MAX_VALUE:
            raise ValueError(
                f"max_target={self.max_target}, ood_max_target={self.ood_max_target}: need "
                f"1 <= max_target < ood_max_target <= {MAX_VALUE} (OOD targets lie above max_target)"
            )


@dataclass(frozen=True)
class Instance:
    """A decoded `answer` column: the numbers in prompt order and the target (a verifier `Puzzle`)."""

    values: tuple[int, ...]
    target: int


def reachable_targets(values: Sequence[int], max_target: int, min_target: int = 1) -> tuple[int, ...]:
    """The integers in min_target..max_target that the numbers make using each exactly once, ascending."""
    reach = _reach(tuple(sorted(values)))
    return tuple(sorted(int(v) for v in reach if v.denominator == 1 and min_target <= v <= max_target))


def canonical_key_of(instance: Instance) -> str:
    """countdown | sorted numbers | target: the same puzzle in any number order gets one key."""
    return f"{TASK_NAME}|{','.join(map(str, sorted(instance.values)))}|{instance.target}"


def encode_answer(values: Sequence[int], target: int) -> str:
    return json.dumps({"numbers": [int(v) for v in values], "target": int(target)})


@lru_cache(maxsize=4096)  # RL scores G completions per prompt: decode each answer once
def decode_answer(answer: str) -> Instance:
    """Parse and validate an `answer` column; ValueError says what is wrong."""
    try:
        obj = json.loads(answer)
    except (TypeError, ValueError) as err:
        raise ValueError(f"answer is not JSON: {err}") from None
    if not isinstance(obj, dict) or set(obj) != {"numbers", "target"}:
        raise ValueError("answer must be a JSON object with exactly: numbers, target")
    numbers, target = obj["numbers"], obj["target"]
    if (not isinstance(numbers, list) or not 2 <= len(numbers) <= MAX_NUMBERS
            or any(type(v) is not int or not 1 <= v <= MAX_VALUE for v in numbers)):
        raise ValueError(f"numbers must be a list of 2..{MAX_NUMBERS} ints in 1..{MAX_VALUE}, got {numbers!r}")
    if type(target) is not int or not 1 <= target <= MAX_VALUE:
        raise ValueError(f"target must be an int in 1..{MAX_VALUE}, got {target!r}")
    return Instance(tuple(numbers), target)


def make_prompt(values: Sequence[int], target: int) -> str:
    numbers = " ".join(str(v) for v in values)
    return f"Numbers: {numbers}. Target: {target}. Use each number once with + - * / ( ).\n"


def id_instances(spec: CountdownSpec) -> Iterator[tuple[tuple[int, ...], int]]:
    """Every in-distribution (sorted numbers, target), in a fixed order: the whole ID space."""
    for values in combinations_with_replacement(range(1, spec.max_number + 1), spec.n_numbers):
        for target in reachable_targets(values, spec.max_target):
            yield values, target


def draw_ood_instance(rng: random.Random, spec: CountdownSpec) -> tuple[tuple[int, ...], int]:
    """A random OOD (sorted numbers, target): ID numbers, target uniform over the reachable ones in
    max_target+1..ood_max_target (numbers redrawn when none is reachable, e.g. 1 1 2)."""
    for _ in range(100_000):
        values = tuple(sorted(rng.randint(1, spec.max_number) for _ in range(spec.n_numbers)))
        targets = reachable_targets(values, spec.ood_max_target, spec.max_target + 1)
        if targets:
            return values, rng.choice(targets)
    raise RuntimeError(f"no OOD instance with a reachable target in 100000 draws for {spec}")


def make_row(values: Sequence[int], target: int, rng: random.Random, split: str, row_id: str, rule: str,
             with_demonstration: bool) -> dict:
    """One dataset row (DESIGN.md columns). Numbers are shown in a random order; the demonstration,
    when asked for, follows a random one of the instance's routes (natural-number routes first)."""
    shown = list(values)
    rng.shuffle(shown)
    demonstration = None
    n_routes = None
    if with_demonstration:
        paths = solution_paths(values, target)
        n_routes = len(paths)
        demonstration = make_demonstration(values, paths[rng.randrange(len(paths))])
    meta = {"rule": rule, "n_routes": n_routes}
    return {
        "id": row_id,
        "task": TASK_NAME,
        "prompt": make_prompt(shown, target),
        "answer": encode_answer(shown, target),
        "demonstration": demonstration,
        "split": split,
        "meta": json.dumps(meta, sort_keys=True),
    }


def generate_splits(sizes: dict[str, int], demo_pool: int, seed: int,
                    spec: CountdownSpec = CountdownSpec()) -> tuple[list[dict], dict]:
    """Rows for train/val/test_id (disjoint ID instances) and test_ood (OOD instances), and notes.

    The ID space is enumerated and shuffled with `seed`; val and test_id take the first instances,
    train the next `sizes["train"]`; test_ood draws instances with targets above the ID range. Every
    instance occurs once, so no key can cross splits. Only the
    first `demo_pool` training rows carry a demonstration: the other training rows are prompts for
    RL, the scarce-demonstration regime AMFT is about. Rows are in generation order (deterministic).
    """
    rng = random.Random(seed)
    space = list(id_instances(spec))
    rng.shuffle(space)
    want_eval = sizes.get("val", 0) + sizes.get("test_id", 0)
    if want_eval > len(space):
        raise ValueError(f"val + test_id = {want_eval} exceeds the {len(space)} in-distribution instances")
    rows: list[dict] = []
    cursor = 0
    for split in ("val", "test_id", "train"):
        n = min(sizes.get(split, 0), len(space) - cursor)
        for i, (values, target) in enumerate(space[cursor : cursor + n]):
            rows.append(make_row(values, target, rng, split, f"cd-id-{split}-{i:06d}", "id",
                                 with_demonstration=split != "train" or i < demo_pool))
        cursor += n
    seen: set[tuple[tuple[int, ...], int]] = set()
    ood_rng = random.Random(seed * 1_000_003 + 2)
    while len(seen) < sizes.get("test_ood", 0):
        inst = draw_ood_instance(ood_rng, spec)
        if inst in seen:
            continue
        seen.add(inst)
        rows.append(make_row(*inst, ood_rng, "test_ood", f"cd-ood-test_ood-{len(seen) - 1:06d}", "ood",
                             with_demonstration=True))
    notes = {"id_space": len(space), "demo_pool": min(demo_pool, sizes.get("train", 0)),
             "spec": spec.__dict__, "train_shortfall": max(0, sizes.get("train", 0) - (len(space) - want_eval))}
    return rows, notes


class CountdownTask:
    """Countdown behind the Task protocol (the General Points verifier, any count of numbers and target)."""

    name = TASK_NAME

    def verify(self, answer: str, completion: str) -> Verdict:
        """Reward 1 iff the final answer uses exactly the instance's numbers and makes the target."""
        return verify_completion(decode_answer(answer), completion)

    def canonical_key(self, answer: str, prompt: str) -> str:
        return canonical_key_of(decode_answer(answer))

    def check_answer(self, answer: str) -> str | None:
        """None for a well-formed, solvable instance; else a one-line reason for the data gate."""
        if not isinstance(answer, str):
            return f"answer must be a string, got {type(answer).__name__}"
        try:
            inst = decode_answer(answer)
        except ValueError as err:
            return str(err)
        if inst.target not in set(reachable_targets(inst.values, inst.target)):
            return f"numbers {list(inst.values)} cannot make {inst.target}"
        return None
