"""Math word problems with a numeric final answer (GSM8K-like): extraction, parsing, comparison.

The `answer` column holds the reference answer as a plain string ("72", "-3", "1,234", "0.25",
"3/4"). A completion is judged by its *final* answer, found in this order (the first source present
decides; later ones are not consulted, so a `####` line with no number is a miss, not a fall-through):

1. the last line containing `####` (GSM8K's own convention): the last number after the marker;
2. the last `\\boxed{...}` (nested braces matched): the last number inside, after light LaTeX
   clean-up: `\\frac{a}{b}`, `\\dfrac`, `\\tfrac` with numeric arguments become `a/b`, `\\text{..}`
   wrappers are dropped, `{,}` becomes `,`, `$` and thin spaces disappear. Symbolic answers
   (`\\sqrt2`, `\\pi`, `x+1`) are out of scope: only the last number in the box is read;
3. otherwise the last number anywhere in the text.

A number is: an optional minus (only when it is not a binary minus, so "10-5" reads as 5, not -5),
digits with optional thousands commas ("1,234"), an optional decimal part, an optional "/denominator"
("3/4"), an optional trailing "%". A percent sign is dropped, not divided by 100, because GSM8K-style
references write a percentage as the bare number ("What percent...? #### 25"). Scientific notation
and mixed numbers ("3 1/2") are not read. Numbers longer than `MAX_NUMBER_CHARS` are refused, which
also keeps Python's int-from-string limit out of reach.

A deciding `####` line or box that claims two values ("#### 25 = 24", "\\boxed{18+5=24}") scores 0 as
"wrong_claim" (`claims_agree`): the last number alone would have accepted it.

Comparison is exact on `Fraction`s by default ("0.5" == "1/2" == "0.50"); `MathTask(rel_tol=...)`
accepts |pred - ref| <= rel_tol * |ref| instead (so a zero reference still needs an exact zero).
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from dataclasses import dataclass
from fractions import Fraction

from amft_lib.confusables import skeleton
from amft_lib.tasks.base import Verdict, extract_boxed

# Longest number text we will convert; anything longer is model babble, not an answer.
MAX_NUMBER_CHARS = 64
# Longest completion the verifier reads (~25k tokens, far beyond any max_new_tokens we use). Scanning
# for the last number is linear but not free (~1.7 s for 10 MB): a longer text scores 0 as "too_long"
# in microseconds instead of stalling the reward loop.
MAX_COMPLETION_CHARS = 100_000

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
# The sign counts only when the '-' does not follow an operand ("10-5" is 10 minus 5), and a number
# never starts in the middle of another one (the digit/dot look-behind).
_NUMBER_RE = re.compile(
    rf"(?P<sign>(?<![\w)\]}}])-)?(?<![\d.])(?P<num>{_DIGITS})(?:\s*/\s*(?P<den>{_DIGITS}))?",
    re.ASCII,
)
# Sign, "$" and "%" are peeled off in code first: stacked optional `\s*` groups here would backtrack
# cubically on a long run of spaces.
_STRICT_NUMBER_RE = re.compile(rf"(?P<num>{_DIGITS})(?:\s*/\s*(?P<den>{_DIGITS}))?", re.ASCII)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def _clean_latex(segment: str) -> str:
    """Strip the LaTeX a model wraps around a number so the number regex can see it."""
    segment = segment.replace("{,}", ",").replace("\\%", "%").replace("\\$", "$")
    for noise in ("\\!", "\\,", "\\;", "\\ ", "$"):
        segment = segment.replace(noise, "")
    segment = _TEXT_RE.sub(r"\1", segment)
    return _FRAC_RE.sub(r"\1/\2", segment)


def _last_number(text: str) -> str | None:
    """The text of the last number in `text` (sign and fraction included), or None."""
    tail = deque(_NUMBER_RE.finditer(text), maxlen=1)  # only the final match, in O(1) memory
    if not tail:
        return None
    last = tail[0]
    sign = "-" if last.group("sign") else ""
    den = last.group("den")
    return sign + last.group("num") + (f"/{den}" if den else "")


def answer_segment(completion: str) -> str | None:
    """The text that decides the answer, LaTeX cleaned: the last `####` line after the marker, else the
    last `\\boxed{}`'s content; None when the completion has neither (the last number anywhere counts)."""
    marker = completion.rfind("####")
    if marker >= 0:
        line_end = completion.find("\n", marker)
        return _clean_latex(completion[marker + 4 : line_end if line_end >= 0 else len(completion)])
    boxed = extract_boxed(completion)
    return None if boxed is None else _clean_latex(boxed)


def extract_answer(completion: str) -> str | None:
    """The final-answer number text of a completion (`####` line, else `\\boxed{}`, else last number).

    Returns e.g. "1,234", "-3/4", "0.5"; None when the deciding source holds no number.
    """
    segment = answer_segment(completion)
    return _last_number(completion if segment is None else segment)


def claims_agree(segment: str, value: Fraction) -> bool:
    """False when the answer segment claims another value beside the answer: "#### 25 = 24" reads 24
    (the last number) but also claims 25. Each "="-separated part that is one number, or integer
    arithmetic the General Points parser accepts ("18+6"), must equal `value`; parts with words or
    symbols ("x", "\\frac{a}{b} apples") are not judged, since math answers are not expressions here."""
    from amft_lib.tasks.general_points import MAX_ANSWER_CHARS, AnswerRejected, expression_value

    if "=" not in segment:
        return True
    for part in segment.split("="):
        claimed = parse_number(part)
        if claimed is None and part.strip() and len(part) <= MAX_ANSWER_CHARS:
            try:
                claimed = expression_value(part)
            except AnswerRejected as rejection:
                if rejection.reason == "div_by_zero":
                    return False
            except RecursionError:  # unreachable with the parser's depth bound
                claimed = None
        if claimed is not None and claimed != value:
            return False
    return True


def _to_fraction(digits: str) -> Fraction | None:
    """Convert one unsigned number text ("1,234.5", ".25") to an exact Fraction."""
    plain = digits.replace(",", "")
    if not plain or len(plain) > MAX_NUMBER_CHARS:
        return None
    return Fraction(plain)


def parse_number(text: str) -> Fraction | None:
    """Parse a whole string as one number, exactly; None when it is not exactly one number.

    Accepts "72", "-3", "1,234", "3.25", ".5", "3/4", "-3/4", "$12", "25%"; rejects "3/0",
    "1e5", "72 apples", "" and anything longer than `MAX_NUMBER_CHARS` digits.
    """
    if len(text) > 4 * MAX_NUMBER_CHARS:
        return None
    body = text.strip()
    negative = body.startswith("-")
    body = body.removeprefix("-").lstrip().removeprefix("$").lstrip()  # "-3", "- 3", "-$3", "$3"
    if not negative and body.startswith("-"):  # "$-3"
        negative, body = True, body[1:].lstrip()
    body = body.removesuffix("%").rstrip()
    match = _STRICT_NUMBER_RE.fullmatch(body)
    if match is None:
        return None
    value = _to_fraction(match.group("num"))
    if value is None:
        return None
    if match.group("den") is not None:
        den = _to_fraction(match.group("den"))
        if den is None or den == 0:
            return None
        value /= den
    return -value if negative else value


def answers_match(pred: Fraction, ref: Fraction, rel_tol: float = 0.0) -> bool:
    """Exact equality when rel_tol == 0, else |pred - ref| <= rel_tol * |ref| (in exact arithmetic)."""
    if rel_tol == 0:
        return pred == ref
    return abs(pred - ref) <= Fraction(rel_tol) * abs(ref)


def normalize_question(text: str) -> str:
    """NFKC, lowercase, homoglyphs folded, collapse whitespace, strip punctuation at both ends.

    Two copies of a question that differ only in case, spacing, full-width characters, look-alike
    letters from another script (Cyrillic `а` for Latin `a`: see amft_lib.confusables) or a trailing
    "?" get one key, so they cannot land in different splits.
    """
    text = " ".join(skeleton(text).split())
    start, end = 0, len(text)
    while start < end and unicodedata.category(text[start]).startswith("P"):
        start += 1
    while end > start and unicodedata.category(text[end - 1]).startswith("P"):
        end -= 1
    return text[start:end].strip()


@dataclass(frozen=True)
class MathTask:
    """Numeric-answer math (GSM8K-like) behind the Task protocol.

    rel_tol: relative tolerance for a match; 0.0 (default) means exact rational equality.
    """

    rel_tol: float = 0.0
    name = "math"

    def __post_init__(self) -> None:
        if not 0.0 <= self.rel_tol < 1.0:
            raise ValueError(f"rel_tol must be in [0, 1), got {self.rel_tol}; use 0.0 for exact matching")

    def verify(self, answer: str, completion: str) -> Verdict:
        """Reward 1 iff the completion's final number equals the reference; never raises on a completion.

        Raises ValueError only for a malformed *reference* (a data bug that `check_answer` catches first).
        """
        ref = parse_number(answer)
        if ref is None:
            raise ValueError(f"reference answer is not a number: {answer[:80]!r}")
        if not isinstance(completion, str):
            return Verdict(0.0, False, "no_answer")
        if len(completion) > MAX_COMPLETION_CHARS:
            return Verdict(0.0, False, "too_long")
        pred_text = extract_answer(completion)
        if pred_text is None:
            return Verdict(0.0, False, "no_answer")
        pred = parse_number(pred_text)
        if pred is None:
            return Verdict(0.0, False, "parse_error")
        if not answers_match(pred, ref, self.rel_tol):
            return Verdict(0.0, True, "wrong_answer")
        segment = answer_segment(completion)
        if segment is not None and not claims_agree(segment, pred):
            return Verdict(0.0, True, "wrong_claim")
        return Verdict(1.0, True, "ok")

    def canonical_key(self, answer: str, prompt: str) -> str:
        """The normalised question text (the answer plays no part: one question, one split)."""
        return normalize_question(prompt)

    def check_answer(self, answer: str) -> str | None:
        """None when the reference parses as a number, else why not."""
        if not isinstance(answer, str):
            return f"answer must be a string, got {type(answer).__name__}"
        if parse_number(answer) is None:
            return f"reference answer is not a number: {answer[:80]!r}"
        return None
