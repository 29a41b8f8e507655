"""The contract every task (a prompt family plus its verifier) implements.

A dataset row (see DESIGN.md) carries `prompt`, `answer` (a string holding whatever the
verifier needs; JSON for General Points) and an optional `demonstration`. The trainer, the
data gates and the evaluator only ever talk to a task through this protocol, so adding a task
means adding one module and one registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Verdict:
    """The verifier's judgement of one completion.

    reward: the explicit reward R(τ) ∈ {0, 1} of AMFT Eq. 1.
    format_ok: False when no answer could be extracted/parsed at all (counts as a format error
        in evaluation; a well-formed but wrong answer has format_ok=True, reward=0).
    reason: a short machine-readable reason ("ok", "no_answer", "wrong_numbers", "not_24",
        "div_by_zero", "parse_error", ...), used in reports and tests.
    """

    reward: float
    format_ok: bool
    reason: str


class Task(Protocol):
    """A family of prompts with an exact verifier."""

    name: str

    def verify(self, answer: str, completion: str) -> Verdict:
        """Judge `completion` (model output after the prompt) against the row's `answer`.

        Must never raise on any completion string and never execute model output.
        """
        ...

    def canonical_key(self, answer: str, prompt: str) -> str:
        """The key that decides split membership and contamination (sorted hand, normalised question)."""
        ...

    def check_answer(self, answer: str) -> str | None:
        """None if `answer` is well-formed for this task, else a one-line reason (used by the data gate)."""
        ...


def extract_boxed(text: str) -> str | None:
    """Return the contents of the last `\\boxed{...}` in `text`, matching nested braces.

    None when there is no `\\boxed{` or its braces never close (a truncated completion). Linear in
    the text length, so a huge completion cannot stall the reward loop.
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None
