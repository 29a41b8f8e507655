"""Paired comparisons of two methods on the same evaluation instances: is A really better than B?

Why paired: every method is scored on the same instances, and instances differ far more in difficulty
than methods do. Comparing per instance removes that shared variance, so a difference of 0.01 can be
resolved with 2000 instances where two independent means ± std over 3 seeds cannot.

Why seeds are resampled too (`resample_seeds=True`): a method's score also depends on its training
seed. Each bootstrap replicate draws the instances (the same draw for A and B: the pairing) and, for
each method independently, its seeds with replacement; the replicate's difference is the mean over
the drawn seeds and instances. The interval therefore covers both sources of noise; with 3 seeds the
seed part is coarse, which widens the interval (the conservative direction).

Scores are an array [S, N] per method: S seeds × N instances (0/1 correctness, or any per-instance
number such as pass@k). A difference is called significant only when its 95 % interval excludes 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PairedDiff(NamedTuple):
    """mean(A) − mean(B) with its bootstrap percentile interval."""

    diff: float  # observed mean difference over all seeds and instances
    lo: float  # lower end of the interval
    hi: float  # upper end
    n_instances: int
    n_boot: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.lo > 0.0 or self.hi < 0.0


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    n_boot: int = 5000,
    level: float = 0.95,
    seed: int = 0,
    resample_seeds: bool = True,
) -> PairedDiff:
    """Paired bootstrap interval of mean(a) − mean(b) over shared instances.

    a: [S_a, N] per-seed, per-instance scores of method A; b: [S_b, N] of method B, same instance order.
    Deterministic in `seed`.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a has {a.shape[1]} instances, b has {b.shape[1]}: a paired comparison needs the same ones")
    if a.shape[1] == 0:
        raise ValueError("no instances to compare")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}: must be in (0, 1)")
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    diffs = np.empty(n_boot)
    for r in range(n_boot):
        idx = rng.integers(0, n, n)  # [N] the same instance draw for both methods: the pairing
        rows_a = rng.integers(0, a.shape[0], a.shape[0]) if resample_seeds else np.arange(a.shape[0])
        rows_b = rng.integers(0, b.shape[0], b.shape[0]) if resample_seeds else np.arange(b.shape[0])
        per_instance = a[rows_a].mean(axis=0) - b[rows_b].mean(axis=0)  # [N]
        diffs[r] = per_instance[idx].mean()
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(diffs, [tail, 1.0 - tail])
    return PairedDiff(float(a.mean() - b.mean()), float(lo), float(hi), n, n_boot)


def pass_at_k_any(correct_counts: np.ndarray, k: int) -> np.ndarray:
    """Per-instance pass@k from exactly k samples each: 1 when any of the k was correct, else 0."""
    counts = np.asarray(correct_counts)
    if np.any(counts < 0) or np.any(counts > k):
        raise ValueError(f"correct counts must lie in [0, {k}]")
    return (counts > 0).astype(np.float64)


# ── one model against another, one seed (the pipeline's evaluation) ─────────────────────────────

IMPROVED, WORSE, NO_CHANGE = "improved", "worse", "no significant change"


def paired_change(after: np.ndarray, before: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """after − before on the same instances (one score per instance each: a single trained model, so
    there are no seeds to resample), with its 95 % paired-bootstrap interval and the verdict in words:
    "improved" / "worse" when the interval excludes 0, else "no significant change".

    Why words: the run summary and the blessing say what a stage did, and a newcomer reading
    "+0.010" on 500 instances cannot tell it from noise; the verdict can. Returns a JSON-ready dict
    {diff, lo, hi, n, verdict}.
    """
    d = paired_bootstrap(np.asarray(after, dtype=np.float64)[None], np.asarray(before, dtype=np.float64)[None],
                         n_boot=n_boot, seed=seed, resample_seeds=False)
    verdict = IMPROVED if d.lo > 0 else WORSE if d.hi < 0 else NO_CHANGE
    return {"diff": d.diff, "lo": d.lo, "hi": d.hi, "n": d.n_instances, "verdict": verdict}


def change_text(change: dict) -> str:
    """'+0.0250, 95 % CI [+0.0100, +0.0400], improved' — one phrase for summaries and reasons."""
    return (f"{change['diff']:+.4f}, 95 % CI [{change['lo']:+.4f}, {change['hi']:+.4f}] on {change['n']} instances: "
            f"{change['verdict']}")
